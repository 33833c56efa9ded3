//! Decision programs and their walk: node encoding, the features a program
//! reads, and the walk both the kernel and the `maps` engine run.

/// Most nodes a decision walk may visit; deeper programs are refused when lowered.
pub const MAX_WALK: u32 = 1024;

/// Node operation: a leaf (verdict).
pub const OP_LEAF: u8 = 0;
/// Node operation: `feature < value`.
pub const OP_LESS: u8 = 1;
/// Node operation: membership bit `value` set.
pub const OP_BIT: u8 = 2;

/// Feature: IP protocol.
pub const FEATURE_PROTOCOL: u8 = 0;
/// Feature: the enforcing endpoint's port.
pub const FEATURE_LOCAL_PORT: u8 = 1;
/// Feature: the peer's port.
pub const FEATURE_PEER_PORT: u8 = 2;
/// Feature: ICMP type.
pub const FEATURE_ICMP_TYPE: u8 = 3;
/// Feature: ICMP code.
pub const FEATURE_ICMP_CODE: u8 = 4;

/// Leaf flag: the verdict is allow.
pub const LEAF_ALLOW: u8 = 1;
/// Leaf flag: a Log rule matched before the decision.
pub const LEAF_LOGGED: u8 = 2;

/// Direction: traffic leaving the pod (program on the host veth's TC ingress).
pub const DIR_EGRESS: u8 = 0;
/// Direction: traffic entering the pod (program on the host veth's TC egress).
pub const DIR_INGRESS: u8 = 1;

/// Address family: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family: IPv6.
pub const FAMILY_V6: u8 = 6;

/// One node of a lowered decision program (16 bytes). Branches are absolute
/// indexes into the global node array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct LoweredNode {
    /// [`OP_LEAF`], [`OP_LESS`] or [`OP_BIT`].
    pub op: u8,
    /// Feature compared by [`OP_LESS`].
    pub feature: u8,
    /// Leaf flags ([`LEAF_ALLOW`], [`LEAF_LOGGED`]).
    pub flags: u8,
    /// Reserved.
    pub pad: u8,
    /// Constant for [`OP_LESS`], bit for [`OP_BIT`], rule index for [`OP_LEAF`].
    pub value: u32,
    /// Next node when the test holds.
    pub then: u32,
    /// Next node when it does not.
    pub otherwise: u32,
}

impl LoweredNode {
    /// A `feature < value` test.
    pub const fn less(feature: u8, value: u32, then: u32, otherwise: u32) -> LoweredNode {
        LoweredNode {
            op: OP_LESS,
            feature,
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
            op: OP_BIT,
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
            op: OP_LEAF,
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
    /// The value of one feature (`FEATURE_*`).
    #[inline(always)]
    pub fn get(&self, feature: u8) -> u32 {
        match feature {
            FEATURE_PROTOCOL => self.protocol,
            FEATURE_LOCAL_PORT => self.local_port,
            FEATURE_PEER_PORT => self.peer_port,
            FEATURE_ICMP_TYPE => self.icmp_type,
            _ => self.icmp_code,
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
    let holds = match n.op {
        OP_LEAF => {
            return Step::Leaf(WalkOutcome {
                allow: n.flags & LEAF_ALLOW != 0,
                logged: n.flags & LEAF_LOGGED != 0,
                rule: n.value,
                steps,
            });
        }
        OP_LESS => features.get(n.feature) < n.value,
        _ => bit(n.value),
    };
    Step::Next(if holds { n.then } else { n.otherwise })
}
