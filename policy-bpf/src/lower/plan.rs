//! Turning a delta into a write plan: the capacity check of a whole batch,
//! then the three phases (new entries nothing points at, the switches,
//! cleanup), with membership rows copied when their stride grows.

use super::*;

/// What a lowering frees in its cleanup phase.
struct Unused {
    /// Class slots of transitional unions.
    transitional: Vec<u32>,
    /// Identities whose slot goes.
    identities: Vec<u32>,
    /// Removed rules and their indexes.
    rules: Vec<(RuleId, u32)>,
}

impl Lowering {
    /// Everything the delta points at exists once it is applied: the
    /// rules its programs' leaves name, the programs bound slots use, the
    /// classes of its prefixes and hosts. A delta from the compiler always
    /// passes; anything else is refused before a write, so the phases of
    /// [`Self::lower`] never meet a dangling id.
    fn check_references(&self, delta: &Delta) -> Result<(), LowerError> {
        let rule_known = |r: &RuleId| {
            self.rule_index.contains_key(r) || matches!(delta.rules.get(r), Some(Some(_)))
        };
        for (pid, p) in &delta.programs {
            let Some(p) = p else { continue };
            if let Some(leaf) = p.leaves.iter().find(|l| !rule_known(&l.rule)) {
                return Err(LowerError::Inconsistent(format!(
                    "program {pid} names rule id {}, which has no index",
                    leaf.rule
                )));
            }
        }
        for (slot, pid) in &delta.slots {
            let Some(pid) = pid else { continue };
            let added = matches!(delta.programs.get(pid), Some(Some(_)));
            if self.bindings.contains_key(&slot.endpoint)
                && !added
                && !self.programs.contains_key(pid)
            {
                return Err(LowerError::Inconsistent(format!(
                    "slot {slot:?} points at program {pid}, which is not lowered"
                )));
            }
        }
        let class_known = |c: &ClassId| {
            self.class_slots.contains_key(c) || matches!(delta.classes.get(c), Some(Some(_)))
        };
        let prefix_classes = delta
            .prefixes
            .iter()
            .filter_map(|(n, c)| Some((n.to_string(), c.as_ref()?)));
        let host_classes = delta
            .hosts
            .iter()
            .filter_map(|(ip, h)| Some((ip.to_string(), &h.as_ref()?.class)));
        if let Some((at, class)) = prefix_classes
            .chain(host_classes)
            .find(|(_, c)| !class_known(c))
        {
            return Err(LowerError::Inconsistent(format!(
                "{at} is in address class {class}, which the lowering never saw"
            )));
        }
        Ok(())
    }

    /// The capacity checks, on copies of the allocators: where new
    /// programs go and the stride the rows need.
    pub(super) fn checked(&self, delta: &Delta) -> Result<Checked, LowerError> {
        self.check_references(delta)?;
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

        // From here on nothing fails: each phase below appends to the plan
        // and updates the lowering's own bookkeeping.
        let mut plan = WritePlan::default();
        let relayout = self.switch_stride(stride);
        let (id_layout, class_layout) = self.layouts();
        let freed_rules = self.lower_rules(delta, &mut plan);
        self.lower_programs(delta, &placed, ranges, &mut plan);
        let freed_identities = self.lower_identities(delta, id_layout, &mut plan);
        self.lower_classes(delta, class_layout, &mut plan);
        let (transitional, late_lpm) = self.lower_lpm(delta, &mut plan);
        self.lower_slots(delta, &mut plan);
        plan.cleanup.extend(late_lpm);
        self.release_unused(
            delta,
            Unused {
                transitional,
                identities: freed_identities,
                rules: freed_rules,
            },
            class_layout,
            &mut plan,
        );
        if relayout {
            self.copy_rows(&mut plan);
        }
        self.before = self.mirror.before(&plan);
        for w in plan.iter() {
            self.mirror.apply(w);
        }
        Ok(plan)
    }

    /// A new stride: every row goes to the other half of its map at the
    /// new stride (rows this delta writes are written there below; the
    /// rest are copied), and the layouts switch before anything that
    /// could reach a new bit or a new row. True when the layout moves.
    fn switch_stride(&mut self, stride: u32) -> bool {
        let relayout = stride != self.stride;
        if relayout {
            self.stride = stride;
            self.half ^= 1;
        }
        relayout
    }

    /// Rules: new indexes with their counters reset; the indexes of
    /// removed rules, freed in the cleanup.
    fn lower_rules(&mut self, delta: &Delta, plan: &mut WritePlan) -> Vec<(RuleId, u32)> {
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
        freed_rules
    }

    /// Programs: nodes written into the free ranges `checked` found.
    fn lower_programs(
        &mut self,
        delta: &Delta,
        placed: &[(ProgramId, u32)],
        ranges: Ranges,
        plan: &mut WritePlan,
    ) {
        let rule_index = self.rule_index.clone();
        for (pid, start) in placed {
            // `checked` placed only added programs and `check_references`
            // saw every rule they name.
            let Some(Some(p)) = delta.programs.get(pid) else {
                continue;
            };
            let Ok((nodes, root)) = self.layout(p, *start, &rule_index) else {
                debug_assert!(false, "program {pid} failed its layout after the checks");
                continue;
            };
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
    }

    /// Identities: new bits first (old | new), exact value after the
    /// switch. A slot lives while the identity has bits or an address
    /// points at it; the identities whose slot goes, freed in the cleanup.
    fn lower_identities(
        &mut self,
        delta: &Delta,
        id_layout: u64,
        plan: &mut WritePlan,
    ) -> Vec<u32> {
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
        freed_identities
    }

    /// Classes: immutable by id; new ones before, old ones after.
    fn lower_classes(&mut self, delta: &Delta, class_layout: u64, plan: &mut WritePlan) {
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
    }

    /// LPM switches. Where an entry's new class lacks bits of its old
    /// class, a transitional union class bridges until the slots switch:
    /// the transitional class slots, and the final LPM writes that go in
    /// the cleanup.
    fn lower_lpm(&mut self, delta: &Delta, plan: &mut WritePlan) -> (Vec<u32>, Vec<MapWrite>) {
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
                class: self.class_slot(c),
            });
            self.lpm_switch(
                len,
                &addr,
                old,
                new,
                &class_of,
                &mut transitional,
                plan,
                &mut late_lpm,
            );
        }
        for (ip, host) in &delta.hosts {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            let old = self.lpm_get(len, ip);
            let new = match host {
                Some(h) => Some(PeerClass {
                    identity: self.identity_slots.get(&h.identity).map_or(0, |s| s + 1),
                    class: self.class_slot(h.class),
                }),
                None => self.full_prefixes.get(ip).map(|c| PeerClass {
                    identity: 0,
                    class: self.class_slot(*c),
                }),
            };
            self.lpm_switch(
                len,
                ip,
                old,
                new,
                &class_of,
                &mut transitional,
                plan,
                &mut late_lpm,
            );
        }
        (transitional, late_lpm)
    }

    /// Slots: bound endpoints switch to their programs' roots; unbound
    /// ones are only remembered.
    fn lower_slots(&mut self, delta: &Delta, plan: &mut WritePlan) {
        for (slot, pid) in &delta.slots {
            match pid {
                Some(pid) => {
                    self.slot_programs.insert(slot.clone(), *pid);
                }
                None => {
                    self.slot_programs.remove(slot);
                }
            }
            let Some(b) = self.bindings.get(&slot.endpoint).copied() else {
                continue;
            };
            let key = self.slot_key(slot, b);
            match pid {
                // `check_references` saw the program of every bound slot.
                Some(pid) => {
                    if let Ok(root) = self.root(*pid) {
                        plan.switch
                            .push(MapWrite::Slot(key, Some(SlotValue { root, zone: b.zone })));
                    }
                }
                None => plan.cleanup.push(MapWrite::Slot(key, None)),
            }
        }
    }

    /// Cleanup: frees what nothing points at any more once the switches
    /// are done (transitional classes, removed programs' ranges, identity
    /// and class slots, rule indexes).
    fn release_unused(
        &mut self,
        delta: &Delta,
        unused: Unused,
        class_layout: u64,
        plan: &mut WritePlan,
    ) {
        for slot in unused.transitional {
            self.class_alloc.release(slot);
        }
        let removed_programs = delta
            .programs
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(pid, _)| *pid);
        for pid in removed_programs {
            if let Some((start, len, _)) = self.programs.remove(&pid) {
                self.ranges.release(start, len);
            }
        }
        for id in unused.identities {
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
        for (id, idx) in unused.rules {
            self.rule_index.remove(&id);
            self.rules.remove(&idx);
            self.rule_alloc.release(idx);
        }
    }

    /// For a new layout: copies into it, before the switch, every row the
    /// plan does not write there itself (live rows stay live until the
    /// cleanup), the class row 0 ("no memberships") included; then the
    /// switch to it comes first.
    pub(super) fn copy_rows(&self, plan: &mut WritePlan) {
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

    /// The row of an address class; row 0 ("no memberships") for a class
    /// without one, which `check_references` keeps from new entries.
    fn class_slot(&self, class: ClassId) -> u32 {
        self.class_slots.get(&class).copied().unwrap_or(0)
    }

    pub(super) fn identity_of_slot(&self, slot: u32) -> Option<u32> {
        self.identity_by_slot.get(&slot).copied()
    }

    pub(super) fn lpm_get(&self, len: u32, addr: &IpAddr) -> Option<PeerClass> {
        match addr {
            IpAddr::V4(a) => self.mirror.lpm4.get(&(len, a.octets())).copied(),
            IpAddr::V6(a) => self.mirror.lpm6.get(&(len, a.octets())).copied(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn lpm_switch(
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
}
