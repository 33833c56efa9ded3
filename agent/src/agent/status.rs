//! The agent's own view (`/status` as JSON) and `palisade status`, which
//! fetches and shows it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::sync::Problem;

/// How far the agent is with its datastore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyncState {
    /// Waiting for the first complete listing.
    #[default]
    Starting,
    /// The first listing is written; changes are followed.
    Synced,
    /// The datastore went away: the last good state is enforced.
    Disconnected,
}

/// A local endpoint and its interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalEndpointStatus {
    /// namespace/name.
    pub endpoint: String,
    /// Host-side interface.
    pub interface: String,
    /// `attached`, or why it is waiting.
    pub state: String,
}

/// Entries and capacity of one map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapFill {
    /// Short name.
    pub map: String,
    /// Entries written.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
}

/// Conntrack use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Tracked connections.
    pub entries: u64,
    /// Capacity.
    pub capacity: u64,
    /// Sweeps run.
    pub sweeps: u64,
    /// Connections expired by them.
    pub expired: u64,
}

/// The agent's view, as `/status` serves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// This node.
    pub node: String,
    /// The datastore (kind and location).
    pub datastore: String,
    /// Sync state.
    pub sync: SyncState,
    /// Why the datastore is disconnected, when it is.
    pub datastore_error: Option<String>,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// The datastore revision applied last.
    pub revision: u64,
    /// Whether this run adopted what an earlier agent left enforcing.
    pub adopted: bool,
    /// The pin directory.
    pub pin_path: String,
    /// This node's endpoints.
    pub endpoints: Vec<LocalEndpointStatus>,
    /// Endpoints known cluster-wide (local and remote identities).
    pub known_endpoints: usize,
    /// Policies in force (tiered, staged excluded from enforcement).
    pub policies: usize,
    /// Map fill.
    pub maps: Vec<MapFill>,
    /// Conntrack.
    pub conntrack: ConntrackStatus,
    /// Objects skipped now because they do not convert.
    pub rejected: Vec<Problem>,
    /// The last errors (newest last).
    pub errors: Vec<Problem>,
    /// The VXLAN overlay, once it ran.
    #[serde(default)]
    pub overlay: Option<OverlayStatus>,
    /// The service table, once one was written.
    #[serde(default)]
    pub services: Option<ServiceStatus>,
    /// kube-proxy's rules found on this node (empty: none): with them,
    /// kube-proxy and Palisade both load-balance Services.
    #[serde(default)]
    pub kube_proxy: Vec<String>,
    /// Programs another balancer put on the socket hooks' cgroup (empty:
    /// none): with them, two balancers rewrite the node's `connect()`s.
    #[serde(default)]
    pub foreign_socket_hooks: Vec<String>,
}

/// The service dataplane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Service ports with a frontend here.
    pub ports: usize,
    /// Frontends (ClusterIPs, external and load-balancer IPs, NodePorts).
    pub frontends: usize,
    /// Endpoints reached.
    pub backends: usize,
    /// NAT entries of translated connections, and the capacity.
    pub nat_entries: u64,
    pub nat_capacity: u64,
    /// ClientIP affinities held.
    pub affinities: u64,
}

/// The overlay as the last pass left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayStatus {
    /// The VXLAN device (none: no pool uses VXLAN).
    pub device: Option<String>,
    /// Its MTU.
    pub device_mtu: u32,
    /// The pods' MTU.
    pub pod_mtu: u32,
    /// The underlay link and address.
    pub underlay: String,
    /// The underlay's MTU.
    pub underlay_mtu: u32,
    /// This node's tunnel address.
    pub tunnel: Option<String>,
    /// Overlay routes in the kernel.
    pub routes: usize,
    /// The other nodes.
    pub nodes: Vec<OverlayNodeStatus>,
    /// Pools whose pods are masqueraded leaving the pools (`natOutgoing`).
    #[serde(default)]
    pub nat_outgoing: Vec<String>,
    /// The last pass's error, if it failed.
    pub error: Option<String>,
}

/// Another node as the overlay reaches it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayNodeStatus {
    /// Its name.
    pub node: String,
    /// Its underlay address.
    pub underlay: String,
    /// Its tunnel address (empty: none yet).
    pub tunnel: String,
    /// Its blocks.
    pub blocks: usize,
}

/// Errors kept in the status.
pub const ERRORS_KEPT: usize = 20;

impl Status {
    /// Keeps `problem` among the last errors.
    pub fn record(&mut self, problem: Problem) {
        if self.errors.len() == ERRORS_KEPT {
            self.errors.remove(0);
        }
        self.errors.push(problem);
    }

    /// The human view.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let sync = match self.sync {
            SyncState::Starting => "starting (waiting for the first listing)".to_string(),
            SyncState::Synced => format!("synced at revision {}", self.revision),
            SyncState::Disconnected => format!(
                "disconnected, enforcing revision {}: {}",
                self.revision,
                self.datastore_error.as_deref().unwrap_or("")
            ),
        };
        let _ = writeln!(s, "node        {}", self.node);
        let _ = writeln!(s, "datastore   {}", self.datastore);
        let _ = writeln!(s, "sync        {sync}");
        let _ = writeln!(s, "ready       {}", if self.ready { "yes" } else { "no" });
        let _ = writeln!(
            s,
            "pins        {}{}",
            self.pin_path,
            if self.adopted {
                " (adopted from the last run)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "policies    {} in force; {} endpoints known",
            self.policies, self.known_endpoints
        );
        if let Some(v) = &self.services {
            let _ = writeln!(
                s,
                "services    {} ports, {} frontends, {} backends; NAT {} of {} {}; {} affinities",
                v.ports,
                v.frontends,
                v.backends,
                v.nat_entries,
                v.nat_capacity,
                fill_bar(v.nat_entries, v.nat_capacity),
                v.affinities
            );
        }
        if !self.kube_proxy.is_empty() {
            let _ = writeln!(
                s,
                "kube-proxy  ACTIVE on this node: {}; it and Palisade both load-balance Services, turn kube-proxy off",
                self.kube_proxy.join(", ")
            );
        }
        if !self.foreign_socket_hooks.is_empty() {
            let _ = writeln!(
                s,
                "socket LB   ANOTHER on the hooks' cgroup: {}; two balancers rewrite connect(), turn the other off",
                self.foreign_socket_hooks.join(", ")
            );
        }
        let _ = writeln!(s, "\nLOCAL ENDPOINT                 INTERFACE        STATE");
        if self.endpoints.is_empty() {
            let _ = writeln!(s, "(none)");
        }
        for e in &self.endpoints {
            let _ = writeln!(s, "{:<30} {:<16} {}", e.endpoint, e.interface, e.state);
        }
        let _ = writeln!(s, "\nMAP          ENTRIES    CAPACITY   FILL");
        for m in &self.maps {
            let _ = writeln!(
                s,
                "{:<12} {:>8} {:>11}   {}",
                m.map,
                m.entries,
                m.capacity,
                fill_bar(m.entries, m.capacity)
            );
        }
        let c = &self.conntrack;
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>11}   {}  ({} sweeps, {} expired)",
            "conntrack",
            c.entries,
            c.capacity,
            fill_bar(c.entries, c.capacity),
            c.sweeps,
            c.expired
        );
        if let Some(o) = &self.overlay {
            let _ = writeln!(
                s,
                "\nOVERLAY      {} VNI 4096, MTU {} (underlay {}, MTU {}); pods MTU {}; tunnel {}; {} routes",
                o.device.as_deref().unwrap_or("(no VXLAN pool)"),
                o.device_mtu,
                o.underlay,
                o.underlay_mtu,
                o.pod_mtu,
                o.tunnel.as_deref().unwrap_or("-"),
                o.routes
            );
            let _ = writeln!(
                s,
                "natOutgoing  {}",
                if o.nat_outgoing.is_empty() {
                    "(no pool)".to_string()
                } else {
                    format!("{} (nft table inet palisade)", o.nat_outgoing.join(", "))
                }
            );
            if let Some(e) = &o.error {
                let _ = writeln!(s, "  last pass failed: {e}");
            }
            let _ = writeln!(
                s,
                "NODE                 UNDERLAY         TUNNEL           BLOCKS"
            );
            for n in &o.nodes {
                let _ = writeln!(
                    s,
                    "{:<20} {:<16} {:<16} {}",
                    n.node,
                    n.underlay,
                    if n.tunnel.is_empty() { "-" } else { &n.tunnel },
                    n.blocks
                );
            }
        }
        if !self.rejected.is_empty() {
            let _ = writeln!(
                s,
                "\nSKIPPED OBJECTS (their last good version stays in force)"
            );
            for p in &self.rejected {
                let _ = writeln!(s, "{} (revision {}): {}", p.object, p.revision, p.message);
            }
        }
        let _ = writeln!(s, "\nLAST ERRORS");
        if self.errors.is_empty() {
            let _ = writeln!(s, "(none)");
        }
        for p in &self.errors {
            let _ = writeln!(s, "revision {} {}: {}", p.revision, p.object, p.message);
        }
        s
    }
}

/// A ten-character bar and the percentage.
fn fill_bar(entries: u64, capacity: u64) -> String {
    if capacity == 0 {
        return String::new();
    }
    let pct = entries as f64 * 100.0 / capacity as f64;
    let full = ((pct / 10.0).round() as usize).min(10);
    format!("{}{} {pct:.1}%", "#".repeat(full), ".".repeat(10 - full))
}

/// A GET to the agent's HTTP endpoint: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to the agent at {addr} (is it running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the agent's answer from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the agent's answer has no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("the agent's answer has no status code")?;
    Ok((code, body.to_string()))
}

/// `palisade status`: the agent's view, as a table or its JSON.
pub fn show(addr: SocketAddr, json: bool) -> Result<bool> {
    let (code, body) = http_get(addr, "/status")?;
    if code != 200 {
        bail!("the agent at {addr} answered {code}: {body}");
    }
    let status: Status =
        serde_json::from_str(&body).context("the agent's /status is not a status")?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&status)?)?;
    } else {
        out!("{}", status.render())?;
    }
    Ok(status.ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_shows_fill_endpoints_and_errors() {
        let mut s = Status {
            node: "n1".into(),
            sync: SyncState::Disconnected,
            datastore_error: Some("etcd: connection refused".into()),
            revision: 7,
            maps: vec![MapFill {
                map: "nodes".into(),
                entries: 250,
                capacity: 1000,
            }],
            endpoints: vec![LocalEndpointStatus {
                endpoint: "shop/web".into(),
                interface: "cali1".into(),
                state: "attached".into(),
            }],
            kube_proxy: vec!["table ip kube-proxy (nftables mode)".into()],
            foreign_socket_hooks: vec!["connect4: program 812 (cil_sock4_conn)".into()],
            ..Status::default()
        };
        for i in 0..(ERRORS_KEPT + 3) {
            s.record(Problem {
                revision: i as u64,
                object: "GlobalNetworkPolicy/x".into(),
                message: "spec.selector: bad".into(),
            });
        }
        assert_eq!(s.errors.len(), ERRORS_KEPT);
        assert_eq!(s.errors[0].revision, 3, "the oldest go first");
        let text = s.render();
        for want in [
            "disconnected, enforcing revision 7: etcd: connection refused",
            "###....... 25.0%",
            "shop/web",
            "spec.selector: bad",
            "kube-proxy  ACTIVE on this node: table ip kube-proxy (nftables mode)",
            "socket LB   ANOTHER on the hooks' cgroup: connect4: program 812 (cil_sock4_conn)",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let round: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(round, s);
    }
}
