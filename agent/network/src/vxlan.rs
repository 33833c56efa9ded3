//! The overlay's kernel side: the node's underlay found, the VXLAN device
//! made to match (created, or fixed in place, or replaced), and the
//! [`overlay`](crate::overlay) plan's operations applied. What the kernel
//! holds is read back each time, so a restarted agent sweeps what an
//! earlier run left (mark and sweep) and changes nothing that is right.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::NetError;
use crate::netlink::{Link, LinkSettings, Netlink, is_exists, is_missing};
use crate::overlay::{self, DEVICE, Ops, PORT, State, VNI};

/// The link and address the node's VXLAN traffic leaves by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// The link.
    pub link: Link,
    /// Its address and subnet.
    pub addr: Ipv4Net,
}

fn ours(name: &str) -> bool {
    name == "lo" || name.starts_with("cali") || name.starts_with("tmp") || name == DEVICE
}

/// Finds the underlay: the link holding `want` when given, else the
/// first global IPv4 address of a link that is up and not Palisade's.
pub fn detect_underlay(nl: &Netlink, want: Option<Ipv4Addr>) -> Result<Underlay, NetError> {
    let links = nl.links()?;
    let mut candidates: Vec<(Link, Ipv4Net)> = Vec::new();
    for a in nl.addresses()? {
        let IpNet::V4(v4) = a.addr else { continue };
        let Some(link) = links.iter().find(|l| l.index == a.index) else {
            continue;
        };
        if want.is_some_and(|w| w == v4.addr()) {
            return Ok(Underlay {
                link: link.clone(),
                addr: v4,
            });
        }
        if a.global && link.up && !ours(&link.name) {
            candidates.push((link.clone(), v4));
        }
    }
    if let Some(w) = want {
        return Err(NetError::Invalid(format!(
            "no link holds the node address {w} (--node-ip)"
        )));
    }
    candidates.sort_by_key(|(l, _)| l.index);
    candidates
        .into_iter()
        .next()
        .map(|(link, addr)| Underlay { link, addr })
        .ok_or_else(|| {
            NetError::Invalid("no underlay: no link that is up has a global IPv4 address".into())
        })
}

/// Makes the VXLAN device match: VNI 4096, UDP 4789, learning off, source
/// `underlay`, MAC `mac`, MTU `mtu`, `tunnel`/32 its only address, up.
/// Settings that cannot change in place replace the device. Returns its
/// index.
pub fn ensure_device(
    nl: &Netlink,
    underlay: &Underlay,
    tunnel: Ipv4Addr,
    mac: [u8; 6],
    mtu: u32,
) -> Result<u32, NetError> {
    let wanted_info = |l: &Link| {
        l.vxlan.as_ref().is_some_and(|v| {
            v.vni == VNI
                && v.port == PORT
                && v.local == Some(underlay.addr.addr())
                && v.parent == Some(underlay.link.index)
        })
    };
    let existing = nl.link(DEVICE)?;
    let link = match existing {
        Some(l) if wanted_info(&l) => l,
        other => {
            if let Some(old) = other {
                nl.delete_link(old.index)?;
            }
            nl.add_vxlan(
                DEVICE,
                VNI,
                PORT,
                underlay.addr.addr(),
                underlay.link.index,
                mtu,
            )?;
            nl.link(DEVICE)?
                .ok_or_else(|| NetError::Invalid(format!("{DEVICE} vanished")))?
        }
    };
    if link.mtu != mtu || link.mac != mac || !link.up {
        nl.set_link(
            link.index,
            LinkSettings {
                mtu: Some(mtu),
                mac: Some(mac),
                up: true,
                ..Default::default()
            },
        )?;
    }
    let want = IpNet::from(IpAddr::V4(tunnel));
    let mut has = false;
    for a in nl
        .addresses()?
        .into_iter()
        .filter(|a| a.index == link.index)
    {
        if a.addr == want {
            has = true;
        } else if a.addr.addr().is_ipv4() {
            nl.delete_address(link.index, a.addr)?;
        }
    }
    if !has {
        match nl.add_address(link.index, want) {
            Err(e) if !is_exists(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(link.index)
}

/// What the kernel holds of the overlay: Palisade's gateway and blackhole
/// routes, the device's permanent neighbours and FDB entries.
pub fn observe(nl: &Netlink, device: u32) -> Result<State, NetError> {
    Ok(State {
        routes: nl
            .palisade_routes()?
            .into_iter()
            .filter(overlay::overlay_route)
            .collect(),
        neighbours: nl.neighbours(device, false)?.into_iter().collect(),
        fdb: nl.neighbours(device, true)?.into_iter().collect(),
    })
}

/// Applies `ops`: neighbours and FDB entries before the routes that use
/// them, deletions of routes before the entries they used. Goes on past
/// a failed operation (the next pass retries it); returns the failures.
pub fn apply(nl: &Netlink, ops: &Ops) -> Vec<NetError> {
    let mut failures = Vec::new();
    let mut keep = |r: Result<(), NetError>| {
        if let Err(e) = r
            && !is_missing(&e)
        {
            failures.push(e);
        }
    };
    for n in &ops.add_fdb {
        keep(nl.replace_fdb(n));
    }
    for n in &ops.add_neighbours {
        keep(nl.replace_neighbour(n));
    }
    for r in &ops.add_routes {
        keep(nl.replace_route(r));
    }
    for r in &ops.del_routes {
        keep(nl.delete_route(r));
    }
    for n in &ops.del_neighbours {
        keep(nl.delete_neighbour(n, false));
    }
    for n in &ops.del_fdb {
        keep(nl.delete_neighbour(n, true));
    }
    failures
}
