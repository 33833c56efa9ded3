//! Decision programs and their walk: node encoding, the features a program
//! reads, and the walk both the kernel and the `maps` engine run.

/// Most nodes a decision walk may visit; deeper programs are refused when lowered.
pub const MAX_WALK: u32 = 1024;

/// Leaf flag: the verdict is allow.
pub const LEAF_ALLOW: u8 = 1;
/// Leaf flag: a Log rule matched before the decision.
pub const LEAF_LOGGED: u8 = 2;

use crate::codes::{NodeFeature, NodeOp};

/// One node of a lowered decision program (16 bytes). Branches are absolute
/// indexes into the global node array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LoweredNode {
    /// A [`NodeOp`] code.
    pub op: u8,
    /// The [`NodeFeature`] code a [`NodeOp::Less`] node compares.
    pub feature: u8,
    /// Leaf flags ([`LEAF_ALLOW`], [`LEAF_LOGGED`]).
    pub flags: u8,
    /// Reserved.
    pub pad: u8,
    /// Constant for [`NodeOp::Less`], bit for [`NodeOp::Bit`], rule index for [`NodeOp::Leaf`].
    pub value: u32,
    /// Next node when the test holds.
    pub then: u32,
    /// Next node when it does not.
    pub otherwise: u32,
}

impl LoweredNode {
    /// A `feature < value` test.
    pub const fn less(feature: NodeFeature, value: u32, then: u32, otherwise: u32) -> LoweredNode {
        LoweredNode {
            op: NodeOp::Less.code(),
            feature: feature.code(),
            flags: 0,
            pad: 0,
            value,
            then,
            otherwise,
        }
    }

    /// A membership-bit test.
    pub const fn bit(bit: u32, then: u32, otherwise: u32) -> LoweredNode {
        LoweredNode {
            op: NodeOp::Bit.code(),
            feature: 0,
            flags: 0,
            pad: 0,
            value: bit,
            then,
            otherwise,
        }
    }

    /// A verdict.
    pub const fn leaf(allow: bool, logged: bool, rule: u32) -> LoweredNode {
        LoweredNode {
            op: NodeOp::Leaf.code(),
            feature: 0,
            flags: (allow as u8) | ((logged as u8) << 1),
            pad: 0,
            value: rule,
            then: 0,
            otherwise: 0,
        }
    }
}

/// Packet features a program reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacketFeatures {
    /// Protocol number.
    pub protocol: u32,
    /// The enforcing endpoint's port.
    pub local_port: u32,
    /// The peer's port.
    pub peer_port: u32,
    /// ICMP type.
    pub icmp_type: u32,
    /// ICMP code.
    pub icmp_code: u32,
}

impl PacketFeatures {
    /// The value of one feature (a [`NodeFeature`] code; an unknown code
    /// reads the ICMP code, as the lowering never writes one).
    #[inline(always)]
    pub fn get(&self, feature: u8) -> u32 {
        match NodeFeature::from_code(feature) {
            Some(NodeFeature::Protocol) => self.protocol,
            Some(NodeFeature::LocalPort) => self.local_port,
            Some(NodeFeature::PeerPort) => self.peer_port,
            Some(NodeFeature::IcmpType) => self.icmp_type,
            Some(NodeFeature::IcmpCode) | None => self.icmp_code,
        }
    }
}

/// The outcome of a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkOutcome {
    /// Allow or deny.
    pub allow: bool,
    /// A Log rule matched before the decision.
    pub logged: bool,
    /// Rule index of the decision.
    pub rule: u32,
    /// Nodes visited.
    pub steps: u32,
}

/// Why a walk failed (the packet is then dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// A node index had no node.
    MissingNode(u32),
    /// More than [`MAX_WALK`] nodes.
    TooDeep,
}

/// Walks a decision program from `root`. `node` reads the node array; `bit`
/// answers membership tests for the peer.
#[inline(always)]
pub fn walk(
    root: u32,
    features: &PacketFeatures,
    node: impl Fn(u32) -> Option<LoweredNode>,
    bit: impl Fn(u32) -> bool,
) -> Result<WalkOutcome, WalkError> {
    let mut at = root;
    let mut steps = 0u32;
    while steps < MAX_WALK {
        let n = match node(at) {
            Some(n) => n,
            None => return Err(WalkError::MissingNode(at)),
        };
        match step(&n, features, &bit, steps) {
            Step::Leaf(v) => return Ok(v),
            Step::Next(next) => at = next,
        }
        steps += 1;
    }
    Err(WalkError::TooDeep)
}

/// One step of a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The walk ended at a leaf.
    Leaf(WalkOutcome),
    /// Continue at this node.
    Next(u32),
}

/// One node of a walk: the kernel runs this in a `bpf_loop` callback, user
/// space in [`walk`], so both follow the same edges.
#[inline(always)]
pub fn step(
    n: &LoweredNode,
    features: &PacketFeatures,
    bit: impl Fn(u32) -> bool,
    steps: u32,
) -> Step {
    let holds = match NodeOp::from_code(n.op) {
        Some(NodeOp::Leaf) => {
            return Step::Leaf(WalkOutcome {
                allow: n.flags & LEAF_ALLOW != 0,
                logged: n.flags & LEAF_LOGGED != 0,
                rule: n.value,
                steps,
            });
        }
        Some(NodeOp::Less) => features.get(n.feature) < n.value,
        // The lowering writes only the three operations.
        Some(NodeOp::Bit) | None => bit(n.value),
    };
    Step::Next(if holds { n.then } else { n.otherwise })
}
