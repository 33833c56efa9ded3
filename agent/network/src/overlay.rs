//! The VXLAN overlay as Calico's felix programs it, as plain data: from the
//! nodes (underlay address, tunnel address and MAC) and the IPAM blocks
//! (which node each is affine to, its pool's encapsulation), what the
//! kernel must hold:
//!
//! | what | where | for |
//! |---|---|---|
//! | route `block via <tunnel addr> dev vxlan.calico onlink` | main table, proto 80 | every remote node's block in a VXLAN pool |
//! | route `block via <underlay addr>` | main table, proto 80 | remote blocks of `vxlanMode: Never` pools (a shared L2 underlay), and of `CrossSubnet` pools within the node's subnet |
//! | `blackhole block` | main table, proto 80 | every local block (unused addresses go nowhere) |
//! | neighbour `<tunnel addr> lladdr <mac>` permanent | vxlan.calico | every remote node with a tunnel |
//! | FDB `<mac> dst <underlay addr>` permanent | vxlan.calico | the same nodes |
//!
//! [`diff`] turns the wanted state and what the kernel holds into the
//! operations between them: a node added or removed changes exactly its
//! entries, and an agent restarted over stale entries sweeps them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use crate::netlink::{Neighbour, Route};

/// The VXLAN device's name, as Calico's.
pub const DEVICE: &str = "vxlan.calico";
/// Calico's VNI.
pub const VNI: u32 = 4096;
/// VXLAN's IANA port.
pub const PORT: u16 = 4789;

/// How a pool's blocks reach other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the VXLAN device.
    Vxlan,
    /// Through the VXLAN device only to nodes outside this node's subnet.
    CrossSubnet,
    /// Routed directly over the underlay (nodes share an L2 segment).
    Direct,
}

/// A node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its underlay address.
    pub underlay: Ipv4Addr,
    /// Its VXLAN tunnel address and device MAC, once it has them.
    pub tunnel: Option<(Ipv4Addr, [u8; 6])>,
}

/// An IPAM block and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block.
    pub cidr: IpNet,
    /// The node it is affine to.
    pub node: String,
    /// Its pool's mode.
    pub mode: Mode,
}

/// Everything the plan depends on.
#[derive(Debug, Clone)]
pub struct Input {
    /// This node's name.
    pub node: String,
    /// This node's underlay subnet (for `CrossSubnet`).
    pub subnet: Ipv4Net,
    /// The VXLAN device's index here.
    pub device: u32,
    /// Every node (this one included).
    pub nodes: Vec<Node>,
    /// Every block with an affinity.
    pub blocks: Vec<Block>,
}

/// What the kernel should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Routes Palisade owns (blackholes and routes via a gateway).
    pub routes: BTreeSet<Route>,
    /// Permanent neighbours on the device.
    pub neighbours: BTreeSet<Neighbour>,
    /// Permanent FDB entries on the device.
    pub fdb: BTreeSet<Neighbour>,
}

/// Whether a Palisade route belongs to the overlay (pods' /32 routes to
/// their veths belong to CNI).
pub fn overlay_route(r: &Route) -> bool {
    r.blackhole || r.via.is_some()
}

/// The state `input` wants.
///
/// ```
/// use palisade_network::overlay::*;
/// let input = Input {
///     node: "a".into(),
///     subnet: "192.168.100.0/24".parse().unwrap(),
///     device: 7,
///     nodes: vec![
///         Node { name: "a".into(), underlay: "192.168.100.1".parse().unwrap(), tunnel: Some(("10.10.0.0".parse().unwrap(), [2, 0, 0, 0, 0, 1])) },
///         Node { name: "b".into(), underlay: "192.168.100.2".parse().unwrap(), tunnel: Some(("10.10.0.64".parse().unwrap(), [2, 0, 0, 0, 0, 2])) },
///     ],
///     blocks: vec![
///         Block { cidr: "10.10.0.0/26".parse().unwrap(), node: "a".into(), mode: Mode::Vxlan },
///         Block { cidr: "10.10.0.64/26".parse().unwrap(), node: "b".into(), mode: Mode::Vxlan },
///     ],
/// };
/// let want = wanted(&input);
/// assert_eq!(want.routes.len(), 2); // a's blackhole, b's block via b's tunnel
/// assert_eq!((want.neighbours.len(), want.fdb.len()), (1, 1));
/// ```
pub fn wanted(input: &Input) -> State {
    let mut s = State::default();
    for n in input.nodes.iter().filter(|n| n.name != input.node) {
        if let Some((addr, mac)) = n.tunnel {
            s.neighbours.insert(Neighbour {
                dev: input.device,
                ip: IpAddr::V4(addr),
                mac,
            });
            s.fdb.insert(Neighbour {
                dev: input.device,
                ip: IpAddr::V4(n.underlay),
                mac,
            });
        }
    }
    for b in &input.blocks {
        if b.node == input.node {
            s.routes.insert(Route {
                dst: b.cidr,
                via: None,
                dev: None,
                scope_link: false,
                onlink: false,
                blackhole: true,
            });
            continue;
        }
        let Some(node) = input.nodes.iter().find(|n| n.name == b.node) else {
            // A block of a node that is gone: nothing reaches it.
            continue;
        };
        let direct = match b.mode {
            Mode::Direct => true,
            Mode::CrossSubnet => input.subnet.contains(&node.underlay),
            Mode::Vxlan => false,
        };
        if direct {
            s.routes.insert(Route {
                dst: b.cidr,
                via: Some(IpAddr::V4(node.underlay)),
                dev: None,
                scope_link: false,
                onlink: false,
                blackhole: false,
            });
        } else if let Some((tunnel, _)) = node.tunnel {
            s.routes.insert(Route {
                dst: b.cidr,
                via: Some(IpAddr::V4(tunnel)),
                dev: Some(input.device),
                scope_link: false,
                onlink: true,
                blackhole: false,
            });
        }
    }
    s
}

/// The operations that turn `have` into `want`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    /// Routes to add (or replace).
    pub add_routes: Vec<Route>,
    /// Routes to delete.
    pub del_routes: Vec<Route>,
    /// Neighbours to write.
    pub add_neighbours: Vec<Neighbour>,
    /// Neighbours to delete.
    pub del_neighbours: Vec<Neighbour>,
    /// FDB entries to write.
    pub add_fdb: Vec<Neighbour>,
    /// FDB entries to delete.
    pub del_fdb: Vec<Neighbour>,
}

impl Ops {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self == &Ops::default()
    }
}

/// A kernel route matches a wanted one when they agree on everything the
/// wanted one says (the kernel fills in the device of a gateway route).
fn same_route(want: &Route, have: &Route) -> bool {
    want.dst == have.dst
        && want.via == have.via
        && want.blackhole == have.blackhole
        && want.onlink == have.onlink
        && (want.dev.is_none() || want.dev == have.dev)
}

/// The operations from `have` (what the kernel holds: Palisade's overlay
/// routes, the device's permanent neighbours and FDB entries) to `want`.
pub fn diff(want: &State, have: &State) -> Ops {
    let mut ops = Ops::default();
    for w in &want.routes {
        if !have.routes.iter().any(|h| same_route(w, h)) {
            ops.add_routes.push(w.clone());
        }
    }
    for h in &have.routes {
        // A route whose destination is wanted differently is replaced by
        // the add; only destinations nobody wants are deleted.
        if !want.routes.iter().any(|w| w.dst == h.dst) {
            ops.del_routes.push(h.clone());
        }
    }
    ops.add_neighbours = want
        .neighbours
        .difference(&have.neighbours)
        .cloned()
        .collect();
    ops.del_neighbours = have
        .neighbours
        .iter()
        .filter(|h| !want.neighbours.iter().any(|w| w.ip == h.ip))
        .cloned()
        .collect();
    ops.add_fdb = want.fdb.difference(&have.fdb).cloned().collect();
    ops.del_fdb = have.fdb.difference(&want.fdb).cloned().collect();
    ops
}

/// The VXLAN device's MAC for a node: stable across restarts (a hash of
/// its name), locally administered, unicast.
pub fn device_mac(node: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(node.as_bytes());
    [(d[0] & 0xfe) | 0x02, d[1], d[2], d[3], d[4], d[5]]
}

/// `aa:bb:..` for a MAC.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC from `aa:bb:..`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, i: u8, tunnel: bool) -> Node {
        Node {
            name: name.into(),
            underlay: Ipv4Addr::new(192, 168, 100, i),
            tunnel: tunnel.then(|| (Ipv4Addr::new(10, 10, i, 0), device_mac(name))),
        }
    }

    fn block(cidr: &str, node: &str, mode: Mode) -> Block {
        Block {
            cidr: cidr.parse().unwrap(),
            node: node.into(),
            mode,
        }
    }

    fn input(nodes: Vec<Node>, blocks: Vec<Block>) -> Input {
        Input {
            node: "a".into(),
            subnet: "192.168.100.0/24".parse().unwrap(),
            device: 9,
            nodes,
            blocks,
        }
    }

    #[test]
    fn a_node_joining_and_leaving_changes_exactly_its_entries() {
        let two = input(
            vec![node("a", 1, true), node("b", 2, true)],
            vec![
                block("10.10.1.0/26", "a", Mode::Vxlan),
                block("10.10.2.0/26", "b", Mode::Vxlan),
            ],
        );
        let mut three = two.clone();
        three.nodes.push(node("c", 3, true));
        three.blocks.push(block("10.10.3.0/26", "c", Mode::Vxlan));
        three.blocks.push(block("10.10.3.64/26", "c", Mode::Vxlan));
        let (s2, s3) = (wanted(&two), wanted(&three));
        let join = diff(&s3, &s2);
        assert_eq!(join.add_routes.len(), 2);
        assert_eq!((join.add_neighbours.len(), join.add_fdb.len()), (1, 1));
        assert!(
            join.del_routes.is_empty() && join.del_neighbours.is_empty() && join.del_fdb.is_empty()
        );
        assert!(
            join.add_routes
                .iter()
                .all(|r| r.via == Some("10.10.3.0".parse().unwrap()) && r.onlink)
        );
        let leave = diff(&s2, &s3);
        assert_eq!(
            (
                leave.del_routes.len(),
                leave.del_neighbours.len(),
                leave.del_fdb.len()
            ),
            (2, 1, 1)
        );
        assert!(leave.add_routes.is_empty());
        assert!(diff(&s3, &s3).is_empty());
    }

    #[test]
    fn modes_choose_vxlan_or_the_underlay_and_local_blocks_are_blackholes() {
        let mut far = node("d", 9, true);
        far.underlay = Ipv4Addr::new(172, 16, 0, 9);
        let s = wanted(&input(
            vec![node("a", 1, true), node("b", 2, true), far],
            vec![
                block("10.10.1.0/26", "a", Mode::Vxlan),
                block("10.40.2.0/26", "b", Mode::Direct),
                block("10.50.2.0/26", "b", Mode::CrossSubnet),
                block("10.50.9.0/26", "d", Mode::CrossSubnet),
                block("10.10.7.0/26", "gone", Mode::Vxlan),
            ],
        ));
        let by_dst = |d: &str| {
            s.routes
                .iter()
                .find(|r| r.dst == d.parse::<IpNet>().unwrap())
                .cloned()
        };
        assert!(by_dst("10.10.1.0/26").unwrap().blackhole);
        assert_eq!(
            by_dst("10.40.2.0/26").unwrap().via,
            Some("192.168.100.2".parse().unwrap())
        );
        assert_eq!(
            by_dst("10.50.2.0/26").unwrap().dev,
            None,
            "same subnet: direct"
        );
        assert_eq!(
            by_dst("10.50.9.0/26").unwrap().dev,
            Some(9),
            "another subnet: VXLAN"
        );
        assert!(
            by_dst("10.10.7.0/26").is_none(),
            "a block of a node that is gone"
        );
    }

    #[test]
    fn stale_entries_are_swept_and_kernel_filled_devices_are_not_churn() {
        let want = wanted(&input(
            vec![node("a", 1, true), node("b", 2, true)],
            vec![block("10.40.2.0/26", "b", Mode::Direct)],
        ));
        let mut have = want.clone();
        // The kernel reports the device it resolved for a gateway route.
        have.routes = have
            .routes
            .into_iter()
            .map(|mut r| {
                r.dev = Some(3);
                r
            })
            .collect();
        // Left behind by an earlier run: a node that is gone.
        have.routes.insert(Route {
            dst: "10.10.8.0/26".parse().unwrap(),
            via: Some("10.10.8.0".parse().unwrap()),
            dev: Some(9),
            scope_link: false,
            onlink: true,
            blackhole: false,
        });
        have.fdb.insert(Neighbour {
            dev: 9,
            ip: "192.168.100.8".parse().unwrap(),
            mac: device_mac("h"),
        });
        let ops = diff(&want, &have);
        assert!(ops.add_routes.is_empty(), "{ops:?}");
        assert_eq!((ops.del_routes.len(), ops.del_fdb.len()), (1, 1));
        assert_eq!(
            parse_mac(&mac_text(&device_mac("x"))),
            Some(device_mac("x"))
        );
        assert_eq!(device_mac("x")[0] & 0x03, 0x02);
    }
}
