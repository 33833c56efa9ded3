//! The pods' MTU, from the underlay's: what VXLAN's encapsulation leaves.

use crate::netlink::Link;

/// What VXLAN over IPv4 adds to every packet: outer IPv4 (20), UDP (8),
/// VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The underlay MTU assumed when no interface says (a node whose only
/// link is loopback).
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;

/// Whether a link is Palisade's or a pod's, not the underlay.
fn ours(name: &str) -> bool {
    name == "lo"
        || name.starts_with("cali")
        || name.starts_with("tmp")
        || name.starts_with("vxlan.")
}

/// The underlay's MTU: the smallest of the links that are up and not
/// Palisade's own (as Calico's auto-detection), or the default.
///
/// ```
/// use palisade_network::netlink::Link;
/// use palisade_network::mtu::{underlay_mtu, VXLAN_OVERHEAD};
/// let link = |name: &str, mtu| Link { index: 1, name: name.into(), mac: vec![], mtu, up: true, vxlan: None };
/// let links = [link("lo", 65536), link("eth0", 1400), link("cali0123456789a", 1350)];
/// assert_eq!(underlay_mtu(&links) - VXLAN_OVERHEAD, 1350);
/// ```
pub fn underlay_mtu(links: &[Link]) -> u32 {
    links
        .iter()
        .filter(|l| l.up && !ours(&l.name) && l.mtu >= 576)
        .map(|l| l.mtu)
        .min()
        .unwrap_or(DEFAULT_UNDERLAY_MTU)
}
