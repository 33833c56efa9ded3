//! The user-space mirror of every map's contents: what the `maps` engine
//! answers from, and what a write plan is diffed and rolled back against.

use super::*;

/// The user-space mirror of the datapath maps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mirror {
    /// Program nodes (index -> node); absent entries read as zero.
    pub nodes: HashMap<u32, LoweredNode>,
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

    /// What a failed write of `plan` is put back to: the entries it
    /// overwrites as this mirror holds them (absent ones absent), every
    /// slot and interface, and the layouts. Much smaller than the mirror
    /// (program nodes and rows the plan does not touch are left out), and
    /// all [`Datapath::write`] reads to undo the plan.
    ///
    /// [`Datapath::write`]: crate::datapath::Datapath::write
    pub fn before(&self, plan: &WritePlan) -> Mirror {
        let mut m = Mirror {
            slots: self.slots.clone(),
            interfaces: self.interfaces.clone(),
            layouts: self.layouts,
            ..Mirror::default()
        };
        for w in plan.iter() {
            match w {
                MapWrite::Node(i, _) => {
                    if let Some(n) = self.nodes.get(i) {
                        m.nodes.insert(*i, *n);
                    }
                }
                MapWrite::Lpm4(l, a, _) => {
                    if let Some(c) = self.lpm4.get(&(*l, *a)) {
                        m.lpm4.insert((*l, *a), *c);
                    }
                }
                MapWrite::Lpm6(l, a, _) => {
                    if let Some(c) = self.lpm6.get(&(*l, *a)) {
                        m.lpm6.insert((*l, *a), *c);
                    }
                }
                MapWrite::Identity(i, _, _) => {
                    if let Some(b) = self.identities.get(i) {
                        m.identities.insert(*i, b.clone());
                    }
                }
                MapWrite::Class(i, _, _) => {
                    if let Some(b) = self.classes.get(i) {
                        m.classes.insert(*i, b.clone());
                    }
                }
                MapWrite::Slot(..)
                | MapWrite::Interface(..)
                | MapWrite::Layouts(..)
                | MapWrite::ResetCounter(_) => {}
            }
        }
        m
    }

    /// The entries live policy depends on, as [`Datapath::read_in_use`]
    /// reads them from the kernel: nodes reachable from the slots, identity
    /// and class slots the prefixes point at.
    ///
    /// [`Datapath::read_in_use`]: crate::datapath::Datapath::read_in_use
    pub fn in_use(&self) -> InUse {
        let mut u = InUse::default();
        let mut stack: Vec<u32> = self.slots.values().map(|v| v.root).collect();
        while let Some(i) = stack.pop() {
            if !u.nodes.insert(i) {
                continue;
            }
            if let Some(n) = self.nodes.get(&i)
                && n.op != NodeOp::Leaf.code()
            {
                stack.push(n.then);
                stack.push(n.otherwise);
            }
        }
        for c in self.lpm4.values().chain(self.lpm6.values()) {
            if c.identity > 0 {
                u.identities.insert(c.identity - 1);
            }
            u.classes.insert(c.class);
        }
        u
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
