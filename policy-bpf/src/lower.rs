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
            ..Capacity::default()
        }
    }
}

/// Lowering failures. Nothing was written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
pub enum MapWrite {
    /// A program node.
    Node(u32, Node),
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

/// The user-space mirror of the datapath maps.
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    /// Program nodes (index -> node); absent entries read as zero.
    pub nodes: HashMap<u32, Node>,
    /// Endpoint slots.
    pub slots: HashMap<SlotKey, SlotValue>,
    /// Managed interfaces.
    pub interfaces: HashMap<u32, u32>,
    /// IPv4 LPM.
    pub lpm4: BTreeMap<(u32, [u8; 4]), PeerClass>,
    /// IPv6 LPM.
    pub lpm6: BTreeMap<(u32, [u8; 16]), PeerClass>,
    /// Identity rows by slot, as last written.
    pub identities: HashMap<u32, Bits>,
    /// Class rows by slot, as last written.
    pub classes: HashMap<u32, Bits>,
    /// Layout words of the identity and class rows.
    pub layouts: (u64, u64),
}

impl Mirror {
    /// Applies one write.
    pub fn apply(&mut self, w: &MapWrite) {
        match w {
            MapWrite::Node(i, n) => {
                self.nodes.insert(*i, *n);
            }
            MapWrite::Slot(k, v) => match v {
                Some(v) => {
                    self.slots.insert(*k, *v);
                }
                None => {
                    self.slots.remove(k);
                }
            },
            MapWrite::Interface(i, z) => match z {
                Some(z) => {
                    self.interfaces.insert(*i, *z);
                }
                None => {
                    self.interfaces.remove(i);
                }
            },
            MapWrite::Lpm4(l, a, v) => match v {
                Some(v) => {
                    self.lpm4.insert((*l, *a), *v);
                }
                None => {
                    self.lpm4.remove(&(*l, *a));
                }
            },
            MapWrite::Lpm6(l, a, v) => match v {
                Some(v) => {
                    self.lpm6.insert((*l, *a), *v);
                }
                None => {
                    self.lpm6.remove(&(*l, *a));
                }
            },
            MapWrite::Identity(i, _, b) => {
                self.identities.insert(*i, b.clone());
            }
            MapWrite::Class(i, _, b) => {
                self.classes.insert(*i, b.clone());
            }
            MapWrite::Layouts(i, c) => self.layouts = (*i, *c),
            MapWrite::ResetCounter(_) => {}
        }
    }

    /// Word `i` of the identity (`identity`) or class rows' map, as the
    /// live layout reads it: the interpreter's view of the array the
    /// program reads (words of no live row read as zero, as a reused
    /// region's stale words are never reached through a live row).
    pub fn member_word(&self, identity: bool, i: u32) -> Option<u64> {
        let (layout, rows) = if identity {
            (self.layouts.0, &self.identities)
        } else {
            (self.layouts.1, &self.classes)
        };
        let stride = member_stride(layout);
        if stride == 0 {
            return None;
        }
        let off = i.checked_sub(member_base(layout))?;
        let row = rows.get(&(off / stride))?;
        Some(
            row.words()
                .get((off % stride) as usize)
                .copied()
                .unwrap_or(0),
        )
    }

    /// Whether a peer (identity slot + 1, 0 for none; class slot) has
    /// membership bit `bit`: the walk's test, over the mirror.
    pub fn peer_bit(&self, identity: u32, class: u32, bit: u32) -> bool {
        let id_row = if identity > 0 {
            MemberRow::of(self.layouts.0, identity - 1)
        } else {
            MemberRow::default()
        };
        member_bit(id_row, bit, |i| self.member_word(true, i))
            || member_bit(MemberRow::of(self.layouts.1, class), bit, |i| {
                self.member_word(false, i)
            })
    }

    /// Longest-prefix match, as the kernel's LPM trie does.
    pub fn classify(&self, ip: &IpAddr) -> PeerClass {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(*a);
                for len in (0..=32u32).rev() {
                    let masked = if len == 0 {
                        0
                    } else {
                        bits & (!0u32 << (32 - len))
                    };
                    if let Some(c) = self.lpm4.get(&(len, masked.to_be_bytes())) {
                        return *c;
                    }
                }
            }
            IpAddr::V6(a) => {
                let bits = u128::from(*a);
                for len in (0..=128u32).rev() {
                    let masked = if len == 0 {
                        0
                    } else {
                        bits & (!0u128 << (128 - len))
                    };
                    if let Some(c) = self.lpm6.get(&(len, masked.to_be_bytes())) {
                        return *c;
                    }
                }
            }
        }
        PeerClass::default()
    }
}

fn or(a: &Bits, b: &Bits) -> Bits {
    let mut out = a.clone();
    out.union_with(b);
    out
}

fn superset(a: &Bits, b: &Bits) -> bool {
    let (a, b) = (a.words(), b.words());
    b.iter()
        .enumerate()
        .all(|(i, y)| a.get(i).copied().unwrap_or(0) & y == *y)
}

/// Words per row that bits below `bits` need (at least one).
fn stride_for(bits: u64) -> u32 {
    bits.div_ceil(64).max(1) as u32
}

fn addr_bytes(ip: &IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

/// Free-list allocator of dense indexes.
#[derive(Debug, Clone, Default)]
struct Dense {
    next: u32,
    free: Vec<u32>,
    used: u32,
}

impl Dense {
    fn alloc(&mut self) -> u32 {
        self.used += 1;
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
    fn release(&mut self, i: u32) {
        self.used -= 1;
        self.free.push(i);
    }
    /// Rows (highest index + 1) once `k` more are allocated: free ones first.
    fn rows_after(&self, k: u64) -> u64 {
        u64::from(self.next) + k.saturating_sub(self.free.len() as u64)
    }

    /// Marks `i` used without handing it out (it belongs to someone else).
    fn reserve(&mut self, i: u32) {
        if i >= self.next {
            self.free.extend(self.next..i);
            self.next = i + 1;
        } else if let Some(p) = self.free.iter().position(|f| *f == i) {
            self.free.swap_remove(p);
        } else {
            return;
        }
        self.used += 1;
    }
}

/// First-fit allocator of node ranges.
#[derive(Debug, Clone)]
struct Ranges {
    free: BTreeMap<u32, u32>,
}

impl Ranges {
    fn new(capacity: u32) -> Self {
        Ranges {
            free: BTreeMap::from([(0, capacity)]),
        }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (start, size) = self
            .free
            .iter()
            .find(|(_, s)| **s >= len)
            .map(|(a, b)| (*a, *b))?;
        self.free.remove(&start);
        if size > len {
            self.free.insert(start + len, size - len);
        }
        Some(start)
    }

    /// Takes `[start, start + len)` out of the free ranges.
    fn reserve(&mut self, start: u32, len: u32) {
        let end = start + len;
        let overlapping: Vec<(u32, u32)> = self
            .free
            .range(..end)
            .filter(|(s, l)| **s + **l > start)
            .map(|(s, l)| (*s, *l))
            .collect();
        for (s, l) in overlapping {
            self.free.remove(&s);
            if s < start {
                self.free.insert(s, start - s);
            }
            if s + l > end {
                self.free.insert(end, s + l - end);
            }
        }
    }

    fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        // Merge with neighbours.
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
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
            .filter(|(s, _)| &s.0 == ep)
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
        for w in plan.iter() {
            self.mirror.apply(w);
        }
        Ok(plan)
    }

    fn slot_key(&self, slot: &Slot, b: Binding) -> SlotKey {
        let (family, addr) = addr_bytes(&slot.1);
        SlotKey {
            ifindex: b.ifindex,
            direction: match slot.2 {
                Direction::Egress => DIR_EGRESS,
                Direction::Ingress => DIR_INGRESS,
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
    ) -> Result<(Vec<Node>, u32), LowerError> {
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
                        policy_core::compile::Feature::Protocol => FEATURE_PROTOCOL,
                        policy_core::compile::Feature::LocalPort => FEATURE_LOCAL_PORT,
                        policy_core::compile::Feature::PeerPort => FEATURE_PEER_PORT,
                        policy_core::compile::Feature::IcmpType => FEATURE_ICMP_TYPE,
                        policy_core::compile::Feature::IcmpCode => FEATURE_ICMP_CODE,
                    };
                    Node::less(feature, v, at(node.then), at(node.otherwise))
                }
                policy_core::compile::Test::Bit(b) => {
                    Node::bit(b, at(node.then), at(node.otherwise))
                }
            });
        }
        for leaf in &p.leaves {
            let idx = *rule_index.get(&leaf.rule).ok_or_else(|| {
                LowerError::Inconsistent(format!("rule id {} has no index", leaf.rule))
            })?;
            out.push(Node::leaf(
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

    /// The capacity checks, on copies of the allocators: where new
    /// programs go and the stride the rows need.
    fn checked(&self, delta: &Delta) -> Result<Checked, LowerError> {
        let mut ranges = self.ranges.clone();
        let mut placed: Vec<(ProgramId, u32)> = Vec::new();
        let mut needed_nodes: u64 = 0;
        for (pid, p) in &delta.programs {
            if let Some(p) = p {
                let len = (p.nodes.len() + p.leaves.len()) as u32;
                needed_nodes += u64::from(len);
                let depth = p.depth();
                if depth > MAX_WALK as usize {
                    return Err(LowerError::TooDeep {
                        program: *pid,
                        depth,
                    });
                }
                match ranges.alloc(len) {
                    Some(start) => placed.push((*pid, start)),
                    None => {
                        let used: u64 = self.programs.values().map(|(_, l, _)| u64::from(*l)).sum();
                        return Err(LowerError::Overflow {
                            map: "nodes",
                            needed: used + needed_nodes,
                            capacity: self.cap.nodes,
                        });
                    }
                }
            }
        }
        let new_ids = delta
            .identities
            .keys()
            .chain(delta.hosts.values().flatten().map(|h| &h.identity))
            .filter(|id| !self.identity_slots.contains_key(id))
            .collect::<std::collections::HashSet<_>>()
            .len() as u64;
        self.check(
            "identities",
            u64::from(self.identity_alloc.used) + new_ids,
            self.cap.identities,
        )?;
        let new_classes = delta
            .classes
            .iter()
            .filter(|(id, b)| b.is_some() && !self.class_slots.contains_key(id))
            .count() as u64;
        // Transitional classes for prefixes that lose bits (at most one each).
        let transitions = delta.prefixes.len() as u64 + delta.hosts.len() as u64;
        self.check(
            "classes",
            u64::from(self.class_alloc.used)
                + new_classes
                + transitions.min(u64::from(self.cap.classes)),
            self.cap.classes,
        )
        .or_else(|_| {
            self.check(
                "classes",
                u64::from(self.class_alloc.used) + new_classes,
                self.cap.classes,
            )
        })?;
        let new_rules = delta
            .rules
            .iter()
            .filter(|(id, r)| r.is_some() && !self.rule_index.contains_key(id))
            .count() as u64;
        self.check(
            "rules",
            u64::from(self.rule_alloc.used) + new_rules,
            self.cap.rules,
        )?;
        let (mut lpm4, mut lpm6) = (self.mirror.lpm4.len() as u64, self.mirror.lpm6.len() as u64);
        for n in delta.prefixes.keys() {
            match n {
                IpNet::V4(_) => lpm4 += 1,
                IpNet::V6(_) => lpm6 += 1,
            }
        }
        for ip in delta.hosts.keys() {
            match ip {
                IpAddr::V4(_) => lpm4 += 1,
                IpAddr::V6(_) => lpm6 += 1,
            }
        }
        self.check("lpm4", lpm4, self.cap.lpm4)?;
        self.check("lpm6", lpm6, self.cap.lpm6)?;
        let new_slots = delta.slots.iter().filter(|(_, v)| v.is_some()).count() as u64;
        self.check(
            "slots",
            self.mirror.slots.len() as u64 + new_slots,
            self.cap.slots,
        )?;
        // Membership rows: the stride the bits in use need (it only grows
        // here: a new stride means laying every row out again), and the
        // rows each map will have, fit half the map.
        let bits_needed = delta
            .identities
            .values()
            .chain(delta.classes.values())
            .flatten()
            .map(|b| b.words().len() as u64 * 64)
            .chain(delta.programs.values().flatten().flat_map(|p| {
                p.nodes.iter().filter_map(|n| match n.test {
                    policy_core::compile::Test::Bit(b) => Some(u64::from(b) + 1),
                    policy_core::compile::Test::Less(..) => None,
                })
            }))
            .max()
            .unwrap_or(0);
        let needed = stride_for(bits_needed);
        if needed > MAX_MEMBER_STRIDE {
            return Err(LowerError::TooManyPeerSets {
                bits: bits_needed,
                limit: u64::from(MAX_MEMBER_STRIDE) * 64,
            });
        }
        let stride = if self.stride == 0 {
            needed
        } else if needed > self.stride {
            // Doubling keeps relayouts to a few over a node's life.
            needed
                .max(self.stride.saturating_mul(2))
                .min(MAX_MEMBER_STRIDE)
        } else {
            self.stride
        };
        // Prefixes and hosts that have an entry now may each take a
        // transitional class (see `lpm_switch`).
        let transitions = delta
            .prefixes
            .keys()
            .filter(|n| {
                self.lpm_get(u32::from(n.prefix_len()), &n.network())
                    .is_some()
            })
            .count() as u64
            + delta
                .hosts
                .keys()
                .filter(|ip| {
                    self.lpm_get(if ip.is_ipv4() { 32 } else { 128 }, ip)
                        .is_some()
                })
                .count() as u64;
        let rows = [
            (
                "identity rows",
                self.identity_alloc.rows_after(new_ids),
                self.cap.identity_words,
            ),
            (
                "class rows",
                self.class_alloc.rows_after(new_classes + transitions),
                self.cap.class_words,
            ),
        ];
        for (map, rows, words) in rows {
            let needed = rows * u64::from(stride);
            if needed > u64::from(words / 2) {
                return Err(LowerError::MembershipOverflow {
                    map,
                    needed,
                    rows,
                    stride,
                    bits: u64::from(stride) * 64,
                    capacity: words / 2,
                });
            }
        }
        Ok(Checked {
            ranges,
            placed,
            stride,
        })
    }

    /// Turns a compiler delta into ordered writes and updates the mirror.
    /// On error nothing changed.
    pub fn lower(&mut self, delta: &Delta) -> Result<WritePlan, LowerError> {
        let Checked {
            ranges,
            placed,
            stride,
        } = self.checked(delta)?;

        // From here on nothing fails.
        let mut plan = WritePlan::default();

        // A new stride: every row goes to the other half of its map at the
        // new stride (rows this delta writes are written there below; the
        // rest are copied), and the layouts switch before anything that
        // could reach a new bit or a new row.
        let relayout = stride != self.stride;
        if relayout {
            self.stride = stride;
            self.half ^= 1;
        }
        let (id_layout, class_layout) = self.layouts();

        // Rules: new indexes, counters reset.
        let mut freed_rules = Vec::new();
        for (id, r) in &delta.rules {
            match r {
                Some(r) => {
                    let idx = match self.rule_index.get(id) {
                        Some(i) => *i,
                        None => {
                            let i = self.rule_alloc.alloc();
                            self.rule_index.insert(*id, i);
                            plan.prepare.push(MapWrite::ResetCounter(i));
                            i
                        }
                    };
                    self.rules.insert(idx, r.clone());
                }
                None => {
                    if let Some(i) = self.rule_index.get(id) {
                        freed_rules.push((*id, *i));
                    }
                }
            }
        }

        // Programs: nodes written into free ranges.
        let rule_index = self.rule_index.clone();
        for (pid, start) in &placed {
            let p = delta.programs[pid]
                .as_ref()
                .expect("placed programs are added");
            let (nodes, root) = self.layout(p, *start, &rule_index).expect("checked");
            for (i, n) in nodes.iter().enumerate() {
                plan.prepare.push(MapWrite::Node(start + i as u32, *n));
            }
            if let Some((old_start, old_len, _)) = self
                .programs
                .insert(*pid, (*start, nodes.len() as u32, root))
            {
                self.ranges.release(old_start, old_len);
            }
        }
        self.ranges = ranges;
        let removed_programs: Vec<ProgramId> = delta
            .programs
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(pid, _)| *pid)
            .collect();

        // Identities: new bits first (old | new), exact value after the switch.
        // A slot lives while the identity has bits or an address points at it.
        let mut touched_ids: Vec<u32> = Vec::new();
        for (id, b) in &delta.identities {
            let bits = b.clone().unwrap_or_default();
            self.identity_bits.insert(*id, bits);
            touched_ids.push(*id);
        }
        for (ip, host) in &delta.hosts {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            if let Some(old) = self.lpm_get(len, ip)
                && old.identity > 0
                && let Some(id) = self.identity_of_slot(old.identity - 1)
            {
                *self.identity_refs.entry(id).or_insert(1) -= 1;
                touched_ids.push(id);
            }
            if let Some(h) = host {
                *self.identity_refs.entry(h.identity).or_insert(0) += 1;
                touched_ids.push(h.identity);
            }
        }
        touched_ids.sort_unstable();
        touched_ids.dedup();
        let mut freed_identities = Vec::new();
        for id in touched_ids {
            let bits = self.identity_bits.get(&id).cloned().unwrap_or_default();
            let refs = self.identity_refs.get(&id).copied().unwrap_or(0);
            let live = refs > 0 || !bits.is_empty();
            match (self.identity_slots.get(&id).copied(), live) {
                (Some(slot), true) => {
                    let old = self
                        .mirror
                        .identities
                        .get(&slot)
                        .cloned()
                        .unwrap_or_default();
                    if old != bits {
                        plan.prepare
                            .push(MapWrite::Identity(slot, id_layout, or(&old, &bits)));
                        if !superset(&bits, &old) {
                            plan.cleanup.push(MapWrite::Identity(slot, id_layout, bits));
                        }
                    }
                }
                (None, true) => {
                    let slot = self.identity_alloc.alloc();
                    self.identity_slots.insert(id, slot);
                    self.identity_by_slot.insert(slot, id);
                    plan.prepare.push(MapWrite::Identity(slot, id_layout, bits));
                }
                (Some(slot), false) => {
                    plan.cleanup
                        .push(MapWrite::Identity(slot, id_layout, Bits::new()));
                    freed_identities.push(id);
                }
                (None, false) => {}
            }
            if !live {
                self.identity_bits.remove(&id);
                self.identity_refs.remove(&id);
            }
        }

        // Classes: immutable by id; new ones before, old ones after.
        for (id, b) in &delta.classes {
            if let Some(b) = b {
                let bits = b.clone();
                let slot = match self.class_slots.get(id) {
                    Some(s) => *s,
                    None => {
                        let s = self.class_alloc.alloc();
                        self.class_slots.insert(*id, s);
                        s
                    }
                };
                plan.prepare
                    .push(MapWrite::Class(slot, class_layout, bits.clone()));
                self.classes_by_id.insert(*id, bits);
            }
        }

        // LPM switches. Where an entry's new class lacks bits of its old
        // class, a transitional union class bridges until the slots switch.
        let mut transitional: Vec<u32> = Vec::new();
        let mut late_lpm: Vec<MapWrite> = Vec::new();
        let class_of =
            |this: &Lowering, id: ClassId| this.classes_by_id.get(&id).cloned().unwrap_or_default();
        // A host address and a full-length prefix share one LPM key: the
        // host entry (identity and class, the class already counting the
        // prefix) wins, and the prefix takes the key back when the host goes.
        for (ip, host) in &delta.hosts {
            if host.is_some() {
                self.host_addrs.insert(*ip);
            } else {
                self.host_addrs.remove(ip);
            }
        }
        for (net, class) in &delta.prefixes {
            if net.prefix_len() == net.max_prefix_len() {
                match class {
                    Some(c) => self.full_prefixes.insert(net.network(), *c),
                    None => self.full_prefixes.remove(&net.network()),
                };
            }
        }
        for (net, class) in &delta.prefixes {
            let (len, addr) = match net {
                IpNet::V4(n) => (u32::from(n.prefix_len()), IpAddr::V4(n.network())),
                IpNet::V6(n) => (u32::from(n.prefix_len()), IpAddr::V6(n.network())),
            };
            if net.prefix_len() == net.max_prefix_len() && self.host_addrs.contains(&addr) {
                continue;
            }
            let old = self.lpm_get(len, &addr);
            let new = class.map(|c| PeerClass {
                identity: 0,
                class: self.class_slots[&c],
            });
            self.lpm_switch(
                len,
                &addr,
                old,
                new,
                &class_of,
                &mut transitional,
                &mut plan,
                &mut late_lpm,
            );
        }
        for (ip, host) in &delta.hosts {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            let old = self.lpm_get(len, ip);
            let new = match host {
                Some(h) => Some(PeerClass {
                    identity: self.identity_slots.get(&h.identity).map_or(0, |s| s + 1),
                    class: self.class_slots[&h.class],
                }),
                None => self.full_prefixes.get(ip).map(|c| PeerClass {
                    identity: 0,
                    class: self.class_slots[c],
                }),
            };
            self.lpm_switch(
                len,
                ip,
                old,
                new,
                &class_of,
                &mut transitional,
                &mut plan,
                &mut late_lpm,
            );
        }

        // Slots.
        for (slot, pid) in &delta.slots {
            match pid {
                Some(pid) => {
                    self.slot_programs.insert(slot.clone(), *pid);
                }
                None => {
                    self.slot_programs.remove(slot);
                }
            }
            let Some(b) = self.bindings.get(&slot.0).copied() else {
                continue;
            };
            let key = self.slot_key(slot, b);
            match pid {
                Some(pid) => plan.switch.push(MapWrite::Slot(
                    key,
                    Some(SlotValue {
                        root: self.root(*pid).expect("program lowered"),
                        zone: b.zone,
                    }),
                )),
                None => plan.cleanup.push(MapWrite::Slot(key, None)),
            }
        }

        // Cleanup.
        plan.cleanup.extend(late_lpm);
        for slot in transitional {
            self.class_alloc.release(slot);
        }
        for pid in removed_programs {
            if let Some((start, len, _)) = self.programs.remove(&pid) {
                self.ranges.release(start, len);
            }
        }
        for id in freed_identities {
            if let Some(slot) = self.identity_slots.remove(&id) {
                self.identity_by_slot.remove(&slot);
                self.identity_alloc.release(slot);
            }
        }
        for (id, b) in &delta.classes {
            if b.is_none()
                && let Some(slot) = self.class_slots.remove(id)
            {
                self.classes_by_id.remove(id);
                plan.cleanup
                    .push(MapWrite::Class(slot, class_layout, Bits::new()));
                self.class_alloc.release(slot);
            }
        }
        for (id, idx) in freed_rules {
            self.rule_index.remove(&id);
            self.rules.remove(&idx);
            self.rule_alloc.release(idx);
        }
        if relayout {
            self.copy_rows(&mut plan);
        }
        for w in plan.iter() {
            self.mirror.apply(w);
        }
        Ok(plan)
    }

    /// For a new layout: copies into it, before the switch, every row the
    /// plan does not write there itself (live rows stay live until the
    /// cleanup), the class row 0 ("no memberships") included; then the
    /// switch to it comes first.
    fn copy_rows(&self, plan: &mut WritePlan) {
        let (id_layout, class_layout) = self.layouts();
        let mut written_ids = std::collections::HashSet::new();
        let mut written_classes = std::collections::HashSet::new();
        for w in &plan.prepare {
            match w {
                MapWrite::Identity(s, ..) => {
                    written_ids.insert(*s);
                }
                MapWrite::Class(s, ..) => {
                    written_classes.insert(*s);
                }
                _ => {}
            }
        }
        let mut copies = Vec::new();
        for (slot, bits) in &self.mirror.identities {
            if !written_ids.contains(slot) {
                copies.push(MapWrite::Identity(*slot, id_layout, bits.clone()));
            }
        }
        let zero = (!self.mirror.classes.contains_key(&0)).then(|| (0, Bits::new()));
        for (slot, bits) in self
            .mirror
            .classes
            .iter()
            .map(|(s, b)| (*s, b.clone()))
            .chain(zero)
        {
            if !written_classes.contains(&slot) {
                copies.push(MapWrite::Class(slot, class_layout, bits));
            }
        }
        copies.sort_by_key(|w| match w {
            MapWrite::Identity(s, ..) => (0, *s),
            MapWrite::Class(s, ..) => (1, *s),
            _ => (2, 0),
        });
        plan.prepare.extend(copies);
        plan.switch
            .insert(0, MapWrite::Layouts(id_layout, class_layout));
    }

    fn identity_of_slot(&self, slot: u32) -> Option<u32> {
        self.identity_by_slot.get(&slot).copied()
    }

    fn lpm_get(&self, len: u32, addr: &IpAddr) -> Option<PeerClass> {
        match addr {
            IpAddr::V4(a) => self.mirror.lpm4.get(&(len, a.octets())).copied(),
            IpAddr::V6(a) => self.mirror.lpm6.get(&(len, a.octets())).copied(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn lpm_switch(
        &mut self,
        len: u32,
        addr: &IpAddr,
        old: Option<PeerClass>,
        new: Option<PeerClass>,
        class_of: &dyn Fn(&Lowering, ClassId) -> Bits,
        transitional: &mut Vec<u32>,
        plan: &mut WritePlan,
        late: &mut Vec<MapWrite>,
    ) {
        let write = |v: Option<PeerClass>| match addr {
            IpAddr::V4(a) => MapWrite::Lpm4(len, a.octets(), v),
            IpAddr::V6(a) => MapWrite::Lpm6(len, a.octets(), v),
        };
        let slot_bits = |this: &Lowering, slot: u32| {
            this.mirror.classes.get(&slot).cloned().unwrap_or_else(|| {
                this.class_slots
                    .iter()
                    .find(|(_, s)| **s == slot)
                    .map(|(id, _)| class_of(this, *id))
                    .unwrap_or_default()
            })
        };
        match (old, new) {
            (_, None) => late.push(write(None)),
            (None, Some(n)) => plan.switch.push(write(Some(n))),
            (Some(o), Some(n)) => {
                let ob = slot_bits(self, o.class);
                let nb = plan
                    .prepare
                    .iter()
                    .rev()
                    .find_map(|w| match w {
                        MapWrite::Class(s, _, b) if *s == n.class => Some(b.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| slot_bits(self, n.class));
                if o.class == n.class || superset(&nb, &ob) {
                    plan.switch.push(write(Some(n)));
                } else {
                    let t = self.class_alloc.alloc();
                    transitional.push(t);
                    let layout = self.layouts().1;
                    plan.prepare.push(MapWrite::Class(t, layout, or(&ob, &nb)));
                    plan.switch.push(write(Some(PeerClass {
                        identity: n.identity,
                        class: t,
                    })));
                    late.push(write(Some(n)));
                }
            }
        }
    }

    /// A lowering for a restarted process: the maps already enforce what an
    /// earlier process wrote (`current`, with the entries in `in_use`). The
    /// plan writes the new state into entries nothing live points at, then
    /// switches slots and prefixes over and deletes what is stale, so new
    /// flows never see a half-written program and established ones are not
    /// touched. Call [`Lowering::release_reserved`] once the plan is written.
    pub fn restart(
        cap: Capacity,
        compiler: &Compiler,
        bindings: &[(EndpointKey, Binding)],
        current: &Mirror,
        in_use: &InUse,
    ) -> Result<(Lowering, WritePlan), LowerError> {
        let mut fresh = Lowering::new(cap);
        // The live rows stay where they are: the new ones go to the other
        // half of each map, then the layouts switch.
        fresh.half = u32::from(member_base(current.layouts.0) != 0);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for n in &in_use.nodes {
            match runs.last_mut() {
                Some((s, l)) if *s + *l == *n => *l += 1,
                _ => runs.push((*n, 1)),
            }
        }
        for (s, l) in &runs {
            fresh.ranges.reserve(*s, *l);
        }
        for i in &in_use.identities {
            fresh.identity_alloc.reserve(*i);
        }
        for c in in_use.classes.iter().filter(|c| **c != 0) {
            fresh.class_alloc.reserve(*c);
        }
        fresh.reserved = Reserved {
            nodes: runs,
            identities: in_use.identities.iter().copied().collect(),
            classes: in_use.classes.iter().copied().filter(|c| *c != 0).collect(),
        };
        let mut plan = fresh.lower(&full_delta(compiler))?;
        for (ep, b) in bindings {
            let p = fresh.bind(ep, Some(*b))?;
            plan.switch.extend(p.switch);
        }
        let new = fresh.mirror.clone();
        for k in current.slots.keys().filter(|k| !new.slots.contains_key(k)) {
            plan.cleanup.push(MapWrite::Slot(*k, None));
        }
        for k in current
            .interfaces
            .keys()
            .filter(|k| !new.interfaces.contains_key(k))
        {
            plan.cleanup.push(MapWrite::Interface(*k, None));
        }
        for (l, a) in current.lpm4.keys().filter(|k| !new.lpm4.contains_key(k)) {
            plan.cleanup.push(MapWrite::Lpm4(*l, *a, None));
        }
        for (l, a) in current.lpm6.keys().filter(|k| !new.lpm6.contains_key(k)) {
            plan.cleanup.push(MapWrite::Lpm6(*l, *a, None));
        }
        Ok((fresh, plan))
    }

    /// Returns the entries an earlier process was using (see
    /// [`Lowering::restart`]) to the allocators, once nothing points at them.
    pub fn release_reserved(&mut self) {
        let r = std::mem::take(&mut self.reserved);
        for (s, l) in r.nodes {
            self.ranges.release(s, l);
        }
        for i in r.identities {
            self.identity_alloc.release(i);
        }
        for c in r.classes {
            self.class_alloc.release(c);
        }
    }

    /// The writes that make the maps match `compiler` exactly, whatever they
    /// hold now (for recovery and for a restarted agent). The mirror is
    /// replaced.
    pub fn resync(&mut self, compiler: &Compiler) -> Result<WritePlan, LowerError> {
        let bindings = self.bindings.clone();
        let old = std::mem::take(&mut self.mirror);
        let mut fresh = Lowering::new(self.cap);
        // New rows in the other half; the live ones stay until the switch.
        fresh.half = self.half;
        let full = full_delta(compiler);
        let mut plan = fresh.lower(&full)?;
        for (ep, b) in bindings {
            let p = fresh.bind(&ep, Some(b))?;
            plan.switch.extend(p.switch);
        }
        // Delete what the old maps held and the new ones do not.
        let new = fresh.mirror.clone();
        let mut cleanup = Vec::new();
        for k in old.slots.keys().filter(|k| !new.slots.contains_key(k)) {
            cleanup.push(MapWrite::Slot(*k, None));
        }
        for k in old
            .interfaces
            .keys()
            .filter(|k| !new.interfaces.contains_key(k))
        {
            cleanup.push(MapWrite::Interface(*k, None));
        }
        for (l, a) in old.lpm4.keys().filter(|k| !new.lpm4.contains_key(k)) {
            cleanup.push(MapWrite::Lpm4(*l, *a, None));
        }
        for (l, a) in old.lpm6.keys().filter(|k| !new.lpm6.contains_key(k)) {
            cleanup.push(MapWrite::Lpm6(*l, *a, None));
        }
        plan.cleanup.extend(cleanup);
        *self = fresh;
        Ok(plan)
    }
}

/// A delta that adds everything a compiler holds.
pub fn full_delta(c: &Compiler) -> Delta {
    Delta {
        programs: c.programs().map(|(id, p)| (*id, Some(p.clone()))).collect(),
        slots: c.slots().map(|(s, p)| (s.clone(), Some(*p))).collect(),
        identities: c
            .identity_bits()
            .map(|(i, b)| (*i, Some(b.clone())))
            .collect(),
        classes: c.classes().map(|(i, b)| (*i, Some(b.clone()))).collect(),
        prefixes: c.prefixes().map(|(n, cl)| (*n, Some(*cl))).collect(),
        hosts: c.hosts().map(|(ip, h)| (*ip, Some(*h))).collect(),
        rules: c.rule_ids().map(|(i, r)| (*i, Some(r.clone()))).collect(),
    }
}
