//! The nftables edge: runs `nft` (as kube-proxy's nftables mode does) in
//! the calling thread's network namespace, for the `natOutgoing` table
//! [`natout`](crate::natout) plans. A child inherits the namespace of the
//! thread that starts it, so [`in_netns`](crate::netlink::in_netns) works
//! here as it does for netlink sockets.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::NetError;
use crate::natout::{NatOutgoing, TABLE};

fn nft(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, NetError> {
    let what = format!("nft {}", args.join(" "));
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::io(format!("{what} (is nftables installed?)"), e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| NetError::io(&what, e))?;
    }
    child.wait_with_output().map_err(|e| NetError::io(&what, e))
}

/// Makes the kernel's `inet palisade` table hold `plan` (one atomic
/// transaction; removed when no pool masquerades).
pub fn apply(plan: &NatOutgoing) -> Result<(), NetError> {
    let out = nft(&["-f", "-"], Some(&plan.script()))?;
    if !out.status.success() {
        return Err(NetError::Invalid(format!(
            "nft refused the natOutgoing table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What the kernel's table holds (None: no table).
pub fn read() -> Result<Option<NatOutgoing>, NetError> {
    let out = nft(&["-j", "list", "table", "inet", TABLE], None)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NetError::Invalid(format!(
            "nft list table inet {TABLE}: {}",
            err.trim()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NetError::Invalid(format!("nft -j list: {e}")))?;
    Ok(NatOutgoing::from_listing(&json))
}

/// kube-proxy's rules in this namespace ([`kube_proxy::footprint`](crate::kube_proxy::footprint)).
pub fn kube_proxy_footprint() -> Result<Vec<String>, NetError> {
    let out = nft(&["-j", "list", "chains"], None)?;
    if !out.status.success() {
        return Err(NetError::Invalid(format!(
            "nft list chains: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| NetError::Invalid(format!("nft -j list chains: {e}")))?;
    Ok(crate::kube_proxy::footprint(&json))
}
