//! A pod's network, wired as Calico wires it: a veth pair whose host end
//! (`cali…`, MAC `ee:ee:ee:ee:ee:ee`, proxy ARP) carries a /32 (/128)
//! route to each pod address, and whose pod end (`eth0`) holds the
//! addresses and routes everything through the link-local gateway
//! 169.254.1.1 (a permanent neighbour entry; IPv6: the host end's link-local address). No ARP for the
//! node is ever needed beyond proxy ARP, and the pod never sees the node's
//! addressing.
//!
//! [`wire`] does it in [`WireStep`]s and undoes all of it when any step
//! fails (deleting the host end takes the pod end, its addresses and the
//! routes with it). It must run on a thread in the host namespace: the
//! host end's sysctls are written there.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::NetError;
use crate::netlink::{LinkSettings, Neighbour, Netlink, Route, is_missing, sysctl};

/// The MAC of every host end.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// The IPv4 gateway pods route through.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway: the host end's link-local address (EUI-64 of [`HOST_MAC`]).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// The host end's name for a workload: `cali` and 11 hex digits of a
/// hash of `key` (the pod's `namespace.name`, or the container ID), so
/// the same workload always gets the same name and names fit IFNAMSIZ.
///
/// ```
/// let a = palisade_network::pod::host_ifname("default.web");
/// assert_eq!(a.len(), 15);
/// assert!(a.starts_with("cali"));
/// assert_eq!(a, palisade_network::pod::host_ifname("default.web"));
/// ```
pub fn host_ifname(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("cali{}", &hex[..11])
}

/// The steps of [`wire`], in order (for fault injection and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireStep {
    /// The veth pair is created.
    CreateVeth,
    /// The host end gets its MAC, MTU, sysctls and goes up.
    HostEnd,
    /// The pod end moves into the pod's namespace.
    MoveToPod,
    /// The pod end is renamed, sized, addressed and brought up.
    PodEnd,
    /// The pod's gateway and default routes.
    PodRoutes,
    /// The host's routes to the pod's addresses.
    HostRoutes,
}

impl WireStep {
    /// Every step, in order.
    pub const ALL: [WireStep; 6] = [
        WireStep::CreateVeth,
        WireStep::HostEnd,
        WireStep::MoveToPod,
        WireStep::PodEnd,
        WireStep::PodRoutes,
        WireStep::HostRoutes,
    ];
}

/// What to wire.
#[derive(Debug)]
pub struct PodWiring<'a> {
    /// The host end's name (see [`host_ifname`]).
    pub host_ifname: &'a str,
    /// The pod end's name (`CNI_IFNAME`).
    pub pod_ifname: &'a str,
    /// The pod's network namespace.
    pub netns: &'a File,
    /// The pod's addresses (each becomes a /32 or /128 on the pod end).
    pub addrs: &'a [IpAddr],
    /// Both ends' MTU.
    pub mtu: u32,
}

/// What [`wire`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    /// The host end's index.
    pub host_index: u32,
    /// The pod end's MAC.
    pub pod_mac: [u8; 6],
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Wires a pod (see the module doc); `fault` runs before each step and
/// may fail it (tests inject failures there; callers pass `|_| Ok(())`).
/// On any failure nothing wired stays.
pub fn wire(
    host: &Netlink,
    spec: &PodWiring<'_>,
    fault: &mut dyn FnMut(WireStep) -> Result<(), NetError>,
) -> Result<Wired, NetError> {
    // A host end of the same name is a leftover of this workload's
    // earlier ADD that did not finish: replaced, as Calico does.
    if let Some(old) = host.link(spec.host_ifname)? {
        host.delete_link(old.index)?;
    }
    let peer = format!("tmp{}", &spec.host_ifname[4..]);
    let mut created = None;
    let result = wire_steps(host, spec, &peer, &mut created, fault);
    if result.is_err() {
        undo(host, spec, &peer, created);
    }
    result
}

fn wire_steps(
    host: &Netlink,
    spec: &PodWiring<'_>,
    peer: &str,
    created: &mut Option<u32>,
    fault: &mut dyn FnMut(WireStep) -> Result<(), NetError>,
) -> Result<Wired, NetError> {
    fault(WireStep::CreateVeth)?;
    host.add_veth(spec.host_ifname, peer)?;
    let host_link = host
        .link(spec.host_ifname)?
        .ok_or_else(|| NetError::Invalid(format!("veth {} vanished", spec.host_ifname)))?;
    *created = Some(host_link.index);
    let peer_link = host
        .link(peer)?
        .ok_or_else(|| NetError::Invalid(format!("veth peer {peer} vanished")))?;

    fault(WireStep::HostEnd)?;
    host.set_link(
        host_link.index,
        LinkSettings {
            mac: Some(HOST_MAC),
            mtu: Some(spec.mtu),
            up: true,
            ..Default::default()
        },
    )?;
    let h = spec.host_ifname;
    sysctl(&format!("net/ipv4/conf/{h}/proxy_arp"), "1")?;
    sysctl(&format!("net/ipv4/neigh/{h}/proxy_delay"), "0")?;
    sysctl(&format!("net/ipv4/conf/{h}/forwarding"), "1")?;
    settle_host_side(h)?;
    if spec.addrs.iter().any(IpAddr::is_ipv6) {
        sysctl(&format!("net/ipv6/conf/{h}/proxy_ndp"), "1")?;
        sysctl(&format!("net/ipv6/conf/{h}/forwarding"), "1")?;
    }

    fault(WireStep::MoveToPod)?;
    host.set_link(
        peer_link.index,
        LinkSettings {
            netns: Some(spec.netns),
            ..Default::default()
        },
    )?;

    fault(WireStep::PodEnd)?;
    let pod = Netlink::in_netns(spec.netns)?;
    if pod.link(spec.pod_ifname)?.is_some() {
        return Err(NetError::Invalid(format!(
            "the container already has an interface named {}",
            spec.pod_ifname
        )));
    }
    let pod_link = pod
        .link(peer)?
        .ok_or_else(|| NetError::Invalid(format!("veth peer {peer} is not in the pod")))?;
    pod.set_link(
        pod_link.index,
        LinkSettings {
            name: Some(spec.pod_ifname),
            mtu: Some(spec.mtu),
            up: true,
            ..Default::default()
        },
    )?;
    if let Some(lo) = pod.link("lo")? {
        pod.set_link(
            lo.index,
            LinkSettings {
                up: true,
                ..Default::default()
            },
        )?;
    }
    for ip in spec.addrs {
        pod.add_address(pod_link.index, host_prefix(*ip))?;
    }

    fault(WireStep::PodRoutes)?;
    if spec.addrs.iter().any(IpAddr::is_ipv4) {
        // A permanent entry for the gateway: proxy ARP answers only
        // where the node has a route onwards, which a node without a
        // default route (or one still coming up) lacks.
        pod.replace_neighbour(&Neighbour {
            dev: pod_link.index,
            ip: IpAddr::V4(GATEWAY_V4),
            mac: HOST_MAC,
        })?;
        pod.replace_route(&Route {
            dst: host_prefix(IpAddr::V4(GATEWAY_V4)),
            via: None,
            dev: Some(pod_link.index),
            scope_link: true,
            onlink: false,
            blackhole: false,
        })?;
        pod.replace_route(&Route {
            dst: "0.0.0.0/0"
                .parse()
                .map_err(|_| NetError::Invalid("0.0.0.0/0".into()))?,
            via: Some(IpAddr::V4(GATEWAY_V4)),
            dev: Some(pod_link.index),
            scope_link: false,
            onlink: false,
            blackhole: false,
        })?;
    }
    if spec.addrs.iter().any(IpAddr::is_ipv6) {
        pod.replace_route(&Route {
            dst: "::/0"
                .parse()
                .map_err(|_| NetError::Invalid("::/0".into()))?,
            via: Some(IpAddr::V6(GATEWAY_V6)),
            dev: Some(pod_link.index),
            scope_link: false,
            onlink: false,
            blackhole: false,
        })?;
    }
    let pod_mac = pod
        .link(spec.pod_ifname)?
        .and_then(|l| <[u8; 6]>::try_from(l.mac.as_slice()).ok())
        .ok_or_else(|| NetError::Invalid(format!("{} has no MAC", spec.pod_ifname)))?;

    fault(WireStep::HostRoutes)?;
    for ip in spec.addrs {
        host.replace_route(&Route {
            dst: host_prefix(*ip),
            via: None,
            dev: Some(host_link.index),
            scope_link: true,
            onlink: false,
            blackhole: false,
        })?;
    }
    Ok(Wired {
        host_index: host_link.index,
        pod_mac,
    })
}

/// Removes what a failed [`wire`] made: the veth (either end; the other
/// and every address and route on them go with it).
fn undo(host: &Netlink, spec: &PodWiring<'_>, peer: &str, created: Option<u32>) {
    if let Some(index) = created
        && host.delete_link(index).is_ok()
    {
        return;
    }
    // The host end may be gone with the pod end still in the pod.
    if let Ok(pod) = Netlink::in_netns(spec.netns) {
        for name in [peer, spec.pod_ifname] {
            if created.is_some()
                && let Ok(Some(l)) = pod.link(name)
            {
                let _ = pod.delete_link(l.index);
            }
        }
    }
}

/// Removes a pod's wiring: its host end if there (the pod end goes with
/// it), else its pod end in `netns` if given and there. Removing what is
/// not there is no error (CNI DEL is idempotent).
pub fn unwire(
    host: &Netlink,
    host_ifname: &str,
    netns: Option<&File>,
    pod_ifname: &str,
) -> Result<(), NetError> {
    if let Some(l) = host.link(host_ifname)? {
        match host.delete_link(l.index) {
            Err(e) if !is_missing(&e) => return Err(e),
            _ => return Ok(()),
        }
    }
    if let Some(ns) = netns {
        let pod = Netlink::in_netns(ns)?;
        if let Some(l) = pod.link(pod_ifname)? {
            match pod.delete_link(l.index) {
                Err(e) if !is_missing(&e) => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// What CHECK finds wrong with a pod's wiring (empty: as wired).
pub fn check(
    host: &Netlink,
    host_ifname: &str,
    netns: &File,
    pod_ifname: &str,
    addrs: &[IpAddr],
) -> Result<Vec<String>, NetError> {
    let mut problems = Vec::new();
    let Some(h) = host.link(host_ifname)? else {
        return Ok(vec![format!("host interface {host_ifname} is missing")]);
    };
    if !h.up {
        problems.push(format!("host interface {host_ifname} is down"));
    }
    let routes = host.palisade_routes()?;
    for ip in addrs {
        let want = host_prefix(*ip);
        if !routes
            .iter()
            .any(|r| r.dst == want && r.dev == Some(h.index))
        {
            problems.push(format!("no host route to {want} via {host_ifname}"));
        }
    }
    let pod = Netlink::in_netns(netns)?;
    match pod.link(pod_ifname)? {
        None => problems.push(format!("the container has no interface {pod_ifname}")),
        Some(p) if !p.up => problems.push(format!("{pod_ifname} in the container is down")),
        Some(_) => {}
    }
    Ok(problems)
}

/// What the host side of an attached pod interface needs, whoever wired
/// it: the agent sets it again on every attach, so pods wired by an older
/// plugin (without it) get it too. Idempotent.
///
/// `accept_local`: a masqueraded service connection leaves the pod's
/// programs with a node address as its source, before routing; without
/// it the kernel drops it as a martian. A pod cannot send such a packet
/// itself (its programs drop any source but its own).
pub fn settle_host_side(host_ifname: &str) -> Result<(), NetError> {
    sysctl(&format!("net/ipv4/conf/{host_ifname}/accept_local"), "1")
}
