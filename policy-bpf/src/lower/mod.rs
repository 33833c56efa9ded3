//! Lowering: compiled deltas become ordered map writes, and a user-space mirror
//! of every map's contents is kept so the `maps` engine can answer from
//! exactly what the kernel holds.
//!
//! Writes come in three phases so that no packet ever sees a half-written
//! policy: (1) new program nodes and membership rows that nothing points at
//! yet; (2) the switches — LPM entries and slot roots; (3) the removal of what
//! is no longer referenced. A batch is checked against map capacities before
//! anything is written, and fails with an error naming the map.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use policy_bpf_common::*;
use policy_core::compile::{
    Bits, ClassId, Compiler, Delta, Next, Program, ProgramId, RuleId, RuleRef, Slot,
};
use policy_core::model::{Direction, EndpointKey};

mod alloc;
mod mirror;
mod plan;
mod restart;
use alloc::*;
pub use mirror::Mirror;
pub use restart::full_delta;

/// Map capacities (entries). Defaults fit a large node comfortably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Program nodes (all programs together).
    pub nodes: u32,
    /// Endpoint slots (endpoint x address x direction).
    pub slots: u32,
    /// Managed interfaces.
    pub interfaces: u32,
    /// Interfaces with an index below this are found by direct indexing
    /// (cheaper per packet); others in a hash of `interfaces` entries.
    pub interface_index: u32,
    /// IPv4 LPM entries (prefixes and endpoint addresses).
    pub lpm4: u32,
    /// IPv6 LPM entries.
    pub lpm6: u32,
    /// Identity rows.
    pub identities: u32,
    /// Address-class rows.
    pub classes: u32,
    /// Words of the identity rows' map. Rows are `stride` words each (the
    /// peer-set bits in use, see [`member_layout`]); half the map holds the
    /// live rows, the other half the next layout while the stride grows,
    /// so identity rows × stride may take at most half of these.
    pub identity_words: u32,
    /// Words of the address-class rows' map (half usable, as above).
    pub class_words: u32,
    /// Rule counters.
    pub rules: u32,
    /// Tracked connections, per address family (IPv4 and IPv6 each have a
    /// table of this size). Rounded up to a power of two, each connection
    /// takes two ways (an 8-byte state word and a home entry each) and
    /// half a log entry with its 8-byte owner: 180 bytes for IPv4 and 340
    /// for IPv6 (45 and 85 MiB at the default).
    pub conntrack: u32,
    /// The service maps.
    pub services: crate::services::ServiceCapacity,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            nodes: 262_144,
            slots: 65_536,
            interfaces: 16_384,
            interface_index: 65_536,
            lpm4: 262_144,
            lpm6: 262_144,
            identities: 65_536,
            classes: 16_384,
            // 64 and 16 MiB: 65,536 identities at 4,096 peer sets, 16,384
            // at 16,384, 4,096 at 65,536 (and classes a quarter of that).
            identity_words: 8 << 20,
            class_words: 2 << 20,
            rules: 65_536,
            conntrack: 262_144,
            services: crate::services::ServiceCapacity::default(),
        }
    }
}

impl Capacity {
    /// The default maps with a conntrack table for a handful of
    /// connections: the verification engines forget every connection
    /// before each decision, and clearing a production-sized table (half a
    /// million ways per family) each time would dominate their run time.
    pub fn verification() -> Self {
        Capacity {
            conntrack: 1024,
            services: crate::services::ServiceCapacity::verification(),
            ..Capacity::default()
        }
    }
}

/// Lowering failures. Nothing was written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LowerError {
    /// A map would overflow.
    #[error(
        "map {map} would overflow: {needed} entries needed, capacity {capacity} (raise it in the datapath configuration)"
    )]
    Overflow {
        /// Map name.
        map: &'static str,
        /// Entries needed.
        needed: u64,
        /// Configured capacity.
        capacity: u32,
    },
    /// A program is deeper than the kernel walk allows.
    #[error(
        "program {program} needs {depth} steps, more than the datapath's walk bound of {MAX_WALK}"
    )]
    TooDeep {
        /// Program.
        program: ProgramId,
        /// Its depth.
        depth: usize,
    },
    /// The membership rows do not fit their map at the stride the peer
    /// sets in use need.
    #[error(
        "{map} need {needed} words ({rows} rows of {stride} words for {bits} peer sets), more than the {capacity} a layout may take (half of the map, the other half holds the next layout while it grows; raise the {map} words in the datapath configuration)"
    )]
    MembershipOverflow {
        /// `"identity rows"` or `"class rows"`.
        map: &'static str,
        /// Words needed: rows × stride.
        needed: u64,
        /// Rows (highest slot in use + 1).
        rows: u64,
        /// Words per row.
        stride: u32,
        /// Peer-set bits the rows hold (stride × 64).
        bits: u64,
        /// Words a layout may take.
        capacity: u32,
    },
    /// More peer sets than a membership row can hold.
    #[error("policy needs {bits} peer sets (membership bits), more than the datapath's {limit}")]
    TooManyPeerSets {
        /// Bits needed.
        bits: u64,
        /// Most bits a row holds.
        limit: u64,
    },
    /// A delta refers to something the lowering never saw.
    #[error("inconsistent delta: {0}")]
    Inconsistent(String),
}

/// One map write. `None` values delete.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MapWrite {
    /// A program node.
    Node(u32, LoweredNode),
    /// An endpoint slot.
    Slot(SlotKey, Option<SlotValue>),
    /// A managed interface and its conntrack zone.
    Interface(u32, Option<u32>),
    /// An IPv4 LPM entry (prefix length, address).
    Lpm4(u32, [u8; 4], Option<PeerClass>),
    /// An IPv6 LPM entry.
    Lpm6(u32, [u8; 16], Option<PeerClass>),
    /// An identity's row (slot, the layout it is written in, its bits).
    Identity(u32, u64, Bits),
    /// An address class's row.
    Class(u32, u64, Bits),
    /// The switch to new layouts of the identity and class rows (see
    /// [`member_layout`]): every live row was written there first.
    Layouts(u64, u64),
    /// Zero a rule's counters (index reused).
    ResetCounter(u32),
}

/// Writes of one batch, in the order they must be applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WritePlan {
    /// Unreferenced new state.
    pub prepare: Vec<MapWrite>,
    /// The switches.
    pub switch: Vec<MapWrite>,
    /// Cleanup of what is no longer referenced.
    pub cleanup: Vec<MapWrite>,
}

impl WritePlan {
    /// All writes in order.
    pub fn iter(&self) -> impl Iterator<Item = &MapWrite> {
        self.prepare.iter().chain(&self.switch).chain(&self.cleanup)
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.prepare.len() + self.switch.len() + self.cleanup.len()
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Map entries live in the kernel that a new lowering must not overwrite
/// until it has switched away from them (read from the maps at restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    /// Node indexes reachable from the live slots.
    pub nodes: std::collections::BTreeSet<u32>,
    /// Identity slots the live address classes point at.
    pub identities: std::collections::BTreeSet<u32>,
    /// Class slots the live address classes point at.
    pub classes: std::collections::BTreeSet<u32>,
}

/// Where an endpoint lives on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Host-side interface index.
    pub ifindex: u32,
    /// Conntrack zone.
    pub zone: u32,
}

/// The lowering state: allocations and the mirror.
#[derive(Debug, Clone)]
pub struct Lowering {
    cap: Capacity,
    mirror: Mirror,
    /// The entries the last plan overwrote, as they were.
    before: Mirror,
    ranges: Ranges,
    programs: HashMap<ProgramId, (u32, u32, u32)>,
    identity_slots: HashMap<u32, u32>,
    identity_alloc: Dense,
    class_slots: HashMap<ClassId, u32>,
    class_alloc: Dense,
    rule_index: HashMap<RuleId, u32>,
    rule_alloc: Dense,
    rules: HashMap<u32, RuleRef>,
    slot_programs: HashMap<Slot, ProgramId>,
    bindings: HashMap<EndpointKey, Binding>,
    classes_by_id: HashMap<ClassId, Bits>,
    identity_by_slot: HashMap<u32, u32>,
    identity_bits: HashMap<u32, Bits>,
    identity_refs: HashMap<u32, u32>,
    reserved: Reserved,
    /// Addresses with a host entry.
    host_addrs: std::collections::HashSet<IpAddr>,
    /// Full-length prefixes (/32, /128) and their classes.
    full_prefixes: HashMap<IpAddr, ClassId>,
    /// Words per membership row (0: no rows written yet).
    stride: u32,
    /// Which half of the rows' maps the rows are in: a new stride is laid
    /// out in the other half, then switched to.
    half: u32,
}

/// What the capacity checks found room for.
struct Checked {
    /// The node ranges with the new programs placed.
    ranges: Ranges,
    /// Where each new program goes.
    placed: Vec<(ProgramId, u32)>,
    /// Words per membership row after the delta.
    stride: u32,
}

/// Entries held back for an earlier process's live state.
#[derive(Debug, Clone, Default)]
struct Reserved {
    nodes: Vec<(u32, u32)>,
    identities: Vec<u32>,
    classes: Vec<u32>,
}

impl Lowering {
    /// An empty lowering with the given capacities.
    pub fn new(cap: Capacity) -> Self {
        let mut class_alloc = Dense::default();
        // Class slot 0 is "no memberships" and stays zero.
        class_alloc.alloc();
        Lowering {
            cap,
            mirror: Mirror::default(),
            before: Mirror::default(),
            ranges: Ranges::new(cap.nodes),
            programs: HashMap::new(),
            identity_slots: HashMap::new(),
            identity_alloc: Dense::default(),
            class_slots: HashMap::from([(0, 0)]),
            class_alloc,
            rule_index: HashMap::new(),
            rule_alloc: Dense::default(),
            rules: HashMap::new(),
            slot_programs: HashMap::new(),
            bindings: HashMap::new(),
            classes_by_id: HashMap::from([(0, Bits::new())]),
            identity_by_slot: HashMap::new(),
            identity_bits: HashMap::new(),
            identity_refs: HashMap::new(),
            reserved: Reserved::default(),
            host_addrs: std::collections::HashSet::new(),
            full_prefixes: HashMap::new(),
            stride: 0,
            // The first layout goes to half 0.
            half: 1,
        }
    }

    /// The layout words rows are written in now (identities, classes).
    fn layouts(&self) -> (u64, u64) {
        let base = |words: u32| self.half * (words / 2);
        (
            member_layout(base(self.cap.identity_words), self.stride),
            member_layout(base(self.cap.class_words), self.stride),
        )
    }

    /// Words per membership row in the current layout.
    pub fn stride(&self) -> u32 {
        self.stride
    }

    /// Capacities.
    pub fn capacity(&self) -> Capacity {
        self.cap
    }

    /// The mirror of the map contents.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// What the maps held, where the last plan (`lower` or `bind`) writes,
    /// before it: hand it to [`Datapath::write`] with that plan, so a failed
    /// write is undone without a copy of the whole mirror.
    ///
    /// [`Datapath::write`]: crate::datapath::Datapath::write
    pub fn before_last_plan(&self) -> &Mirror {
        &self.before
    }

    /// What a rule index stands for.
    pub fn rule(&self, index: u32) -> Option<&RuleRef> {
        self.rules.get(&index)
    }

    /// Rule indexes and what they stand for.
    pub fn rules(&self) -> impl Iterator<Item = (&u32, &RuleRef)> {
        self.rules.iter()
    }

    /// The binding of an endpoint.
    pub fn binding(&self, ep: &EndpointKey) -> Option<Binding> {
        self.bindings.get(ep).copied()
    }

    /// Binds (or unbinds) an endpoint to its interface; returns the writes
    /// that attach (or detach) its slots.
    pub fn bind(
        &mut self,
        ep: &EndpointKey,
        binding: Option<Binding>,
    ) -> Result<WritePlan, LowerError> {
        let mut plan = WritePlan::default();
        let old = self.bindings.get(ep).copied();
        if old == binding {
            return Ok(plan);
        }
        let slots: Vec<(Slot, ProgramId)> = self
            .slot_programs
            .iter()
            .filter(|(s, _)| &s.endpoint == ep)
            .map(|(s, p)| (s.clone(), *p))
            .collect();
        if let Some(b) = binding {
            let new_slots = if old.is_some() { 0 } else { slots.len() as u64 };
            self.check(
                "slots",
                self.mirror.slots.len() as u64 + new_slots,
                self.cap.slots,
            )?;
            self.check(
                "interfaces",
                self.mirror.interfaces.len() as u64 + 1,
                self.cap.interfaces,
            )?;
            plan.switch
                .push(MapWrite::Interface(b.ifindex, Some(b.zone)));
            for (slot, pid) in &slots {
                let key = self.slot_key(slot, b);
                plan.switch.push(MapWrite::Slot(
                    key,
                    Some(SlotValue {
                        root: self.root(*pid)?,
                        zone: b.zone,
                    }),
                ));
            }
        }
        if let Some(b) = old {
            for (slot, _) in &slots {
                let key = self.slot_key(slot, b);
                if binding.is_none_or(|n| self.slot_key(slot, n) != key) {
                    plan.cleanup.push(MapWrite::Slot(key, None));
                }
            }
            if binding.is_none_or(|n| n.ifindex != b.ifindex) {
                plan.cleanup.push(MapWrite::Interface(b.ifindex, None));
            }
        }
        match binding {
            Some(b) => self.bindings.insert(ep.clone(), b),
            None => self.bindings.remove(ep),
        };
        self.before = self.mirror.before(&plan);
        for w in plan.iter() {
            self.mirror.apply(w);
        }
        Ok(plan)
    }

    fn slot_key(&self, slot: &Slot, b: Binding) -> SlotKey {
        let (family, addr) = addr_bytes(&slot.addr);
        SlotKey {
            ifindex: b.ifindex,
            direction: match slot.direction {
                Direction::Egress => HookDirection::Egress.code(),
                Direction::Ingress => HookDirection::Ingress.code(),
            },
            family,
            pad: [0; 2],
            addr,
        }
    }

    fn root(&self, pid: ProgramId) -> Result<u32, LowerError> {
        self.programs
            .get(&pid)
            .map(|(_, _, root)| *root)
            .ok_or_else(|| LowerError::Inconsistent(format!("program {pid} is not lowered")))
    }

    fn check(&self, map: &'static str, needed: u64, capacity: u32) -> Result<(), LowerError> {
        if needed > u64::from(capacity) {
            Err(LowerError::Overflow {
                map,
                needed,
                capacity,
            })
        } else {
            Ok(())
        }
    }

    /// Lays a program out at `start`: nodes first, then leaves.
    fn layout(
        &self,
        p: &Program,
        start: u32,
        rule_index: &HashMap<RuleId, u32>,
    ) -> Result<(Vec<LoweredNode>, u32), LowerError> {
        let n = p.nodes.len() as u32;
        let at = |x: Next| match x {
            Next::Node(i) => start + i,
            Next::Leaf(j) => start + n + j,
        };
        let mut out = Vec::with_capacity(p.nodes.len() + p.leaves.len());
        for node in &p.nodes {
            out.push(match node.test {
                policy_core::compile::Test::Less(f, v) => {
                    let feature = match f {
                        policy_core::compile::Feature::Protocol => NodeFeature::Protocol,
                        policy_core::compile::Feature::LocalPort => NodeFeature::LocalPort,
                        policy_core::compile::Feature::PeerPort => NodeFeature::PeerPort,
                        policy_core::compile::Feature::IcmpType => NodeFeature::IcmpType,
                        policy_core::compile::Feature::IcmpCode => NodeFeature::IcmpCode,
                    };
                    LoweredNode::less(feature, v, at(node.then), at(node.otherwise))
                }
                policy_core::compile::Test::Bit(b) => {
                    LoweredNode::bit(b, at(node.then), at(node.otherwise))
                }
            });
        }
        for leaf in &p.leaves {
            let idx = *rule_index.get(&leaf.rule).ok_or_else(|| {
                LowerError::Inconsistent(format!("rule id {} has no index", leaf.rule))
            })?;
            out.push(LoweredNode::leaf(
                leaf.verdict == policy_core::Verdict::Allow,
                leaf.logged,
                idx,
            ));
        }
        Ok((out, at(p.root)))
    }

    /// Whether `delta` fits the maps: the checks [`Lowering::lower`] makes
    /// before it writes anything, with the same error (for `palisade
    /// compile`, which reports what the datapath would refuse).
    pub fn check_capacity(&self, delta: &Delta) -> Result<(), LowerError> {
        self.checked(delta).map(|_| ())
    }
}
