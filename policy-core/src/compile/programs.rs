//! Decision programs and the tables they read: per-endpoint programs,
//! rule references, CIDR classes and address identities, refreshed from the
//! work a change left.

use super::*;

impl Compiler {
    /// Recomputes the programs of every dirty local endpoint.
    pub(super) fn refresh_programs(&mut self, w: &mut Work) {
        for l in w.labels.clone() {
            self.forget_keys(l);
            if let Some(eps) = self.identity_eps.get(&l) {
                w.slots.extend(eps.iter().cloned());
            }
        }
        let eps: Vec<EndpointKey> = std::mem::take(&mut w.slots).into_iter().collect();
        // Keys that need a program, computed once each.
        let mut wanted: Vec<(Slot, ProgramKey)> = Vec::new();
        for e in &eps {
            // Slots of this endpoint that exist now.
            let current: Vec<Slot> = match self.endpoints.get(e) {
                Some(st) if st.local => st
                    .ips
                    .iter()
                    .flat_map(|ip| {
                        Direction::ALL.map(|d| Slot {
                            endpoint: e.clone(),
                            addr: *ip,
                            direction: d,
                        })
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let previous = self.ep_slots.remove(e).unwrap_or_default();
            for s in previous.iter().filter(|s| !current.contains(s)) {
                if let Some(pid) = self.slots.remove(s) {
                    self.unref_program(pid);
                }
            }
            if !current.is_empty() {
                self.ep_slots.insert(e.clone(), current.clone());
            }
            let Some(label) = self.endpoints.get(e).map(|st| st.label) else {
                continue;
            };
            for slot in current {
                let needs_address = self.needs_address(label, slot.direction);
                let ip = slot.addr;
                let shared = self
                    .hosts
                    .get(&addr_key(&ip))
                    .is_some_and(|(_, v)| v.len() > 1);
                let key = ProgramKey {
                    label,
                    direction: slot.direction,
                    version: IpVersion::of(&ip),
                    ip: (shared || needs_address).then_some(ip),
                };
                wanted.push((slot, key));
            }
        }
        // Build the missing programs: items need &mut self (peer-set bits);
        // the decision structures are built in parallel.
        let mut to_build: Vec<(ProgramKey, IpAddr)> = Vec::new();
        let mut seen: HashSet<ProgramKey> = HashSet::default();
        for (slot, key) in &wanted {
            if !self.program_of_key.contains_key(key) && seen.insert(key.clone()) {
                to_build.push((key.clone(), slot.addr));
            }
        }
        let mut inputs = Vec::with_capacity(to_build.len());
        for (key, ip) in to_build {
            let mut sets = Vec::new();
            let mut rules = Vec::new();
            let items = self.program_items(&key, ip, &mut sets, &mut rules);
            inputs.push((key, items, sets, rules));
        }
        // Identities a policy set treats alike get the same item list (one
        // `all()` policy: every identity): build each distinct list once.
        let mut distinct: HashMap<&[program::Item], usize> = HashMap::default();
        let mut unique: Vec<&[program::Item]> = Vec::new();
        let which: Vec<usize> = inputs
            .iter()
            .map(|(_, items, _, _)| {
                *distinct.entry(items.as_slice()).or_insert_with(|| {
                    unique.push(items.as_slice());
                    unique.len() - 1
                })
            })
            .collect();
        // Parallel only when there is enough work to pay for waking threads.
        let unique_built: Vec<Arc<Program>> = if unique.len() >= 32 {
            unique
                .par_iter()
                .map(|items| Arc::new(program::build(items)))
                .collect()
        } else {
            unique
                .iter()
                .map(|items| Arc::new(program::build(items)))
                .collect()
        };
        let built: Vec<Arc<Program>> = which.iter().map(|i| unique_built[*i].clone()).collect();
        for ((key, _, sets, rules), prog) in inputs.into_iter().zip(built) {
            let pid = match self.program_ids.id(&prog) {
                // An identical program already exists and holds its sets and rules.
                Some(pid) => pid,
                None => {
                    // A program holds exactly the peer sets it tests and the
                    // rule ids its leaves name: residualisation may acquire
                    // more (rules shadowed or impossible in every region).
                    let tested: HashSet<Bit> = prog.bits().into_iter().collect();
                    let mut held: Vec<PeerSetKey> = sets
                        .iter()
                        .filter(|k| {
                            self.peer_sets
                                .get(*k)
                                .is_some_and(|p| tested.contains(&p.bit))
                        })
                        .cloned()
                        .collect();
                    held.sort();
                    held.dedup();
                    for k in &held {
                        self.acquire_bit(k);
                    }
                    let mut leaf_rules: Vec<RuleId> = prog.leaves.iter().map(|l| l.rule).collect();
                    leaf_rules.sort_unstable();
                    leaf_rules.dedup();
                    for r in &leaf_rules {
                        // Building took a reference on every rule it named,
                        // released below, so each is still interned here.
                        let live = self.rule_ids.retain(*r);
                        debug_assert!(live, "rule {r} released while building");
                    }
                    // Unreferenced until a slot points at it (below).
                    let (pid, _) = self.program_ids.intern(prog.clone());
                    self.programs.insert(pid, prog);
                    self.program_sets.insert(pid, held);
                    self.program_rules.insert(pid, leaf_rules);
                    pid
                }
            };
            for k in &sets {
                self.release_bit(k);
            }
            for r in &rules {
                self.unref_rule(*r);
            }
            self.keys_of_label
                .entry(key.label)
                .or_default()
                .insert(key.clone());
            // Dropping the program must also forget the keys that lead to it.
            self.keys_of_program
                .entry(pid)
                .or_default()
                .insert(key.clone());
            self.program_of_key.insert(key, pid);
        }
        // Point slots at their programs; take the new reference before
        // dropping the old one so a shared program is never freed in between.
        let mut released = Vec::new();
        for (slot, key) in wanted {
            let Some(pid) = self.program_of_key.get(&key).copied() else {
                debug_assert!(false, "slot {slot:?} wants a program never built");
                continue;
            };
            self.program_ids.retain(pid);
            if let Some(old) = self.slots.get(&slot).copied() {
                released.push(old);
            }
            self.slots.insert(slot, pid);
        }
        for old in released {
            self.unref_program(old);
        }
        // Programs built but not used by any slot (all slots moved on).
        for pid in self.program_ids.unreferenced() {
            self.drop_program(pid);
        }
    }

    pub(super) fn unref_program(&mut self, pid: ProgramId) {
        if self.program_ids.release(pid).is_some() {
            self.forget_program(pid);
        }
    }

    pub(super) fn drop_program(&mut self, pid: ProgramId) {
        self.program_ids.remove(pid);
        self.forget_program(pid);
    }

    /// Releases what a dropped program held.
    fn forget_program(&mut self, pid: ProgramId) {
        self.programs.remove(&pid);
        for k in self.program_sets.remove(&pid).unwrap_or_default() {
            self.release_bit(&k);
        }
        for r in self.program_rules.remove(&pid).unwrap_or_default() {
            self.unref_rule(r);
        }
        for k in self.keys_of_program.remove(&pid).unwrap_or_default() {
            self.program_of_key.remove(&k);
            if let Some(set) = self.keys_of_label.get_mut(&k.label) {
                set.remove(&k);
            }
        }
    }

    pub(super) fn unref_rule(&mut self, id: RuleId) {
        if self.rule_ids.release(id).is_some() {
            self.rules.remove(&id);
        }
    }

    pub(super) fn intern_class(&mut self, bits: Bits) -> ClassId {
        if let Some(id) = self.class_ids.id(&bits) {
            self.class_ids.retain(id);
            return id;
        }
        let (id, _) = self.class_ids.acquire(bits.clone());
        self.classes.insert(id, bits);
        id
    }

    pub(super) fn unref_class(&mut self, id: ClassId) {
        if self.class_ids.release(id).is_some() {
            self.classes.remove(&id);
        }
    }

    /// CIDR memberships of a prefix or address: every registered prefix that
    /// contains it contributes its bits.
    pub(super) fn cidr_bits(&self, family: u8, addr: u128, len: u8) -> Bits {
        let mut bits = Bits::new();
        let width = if family == 4 { 32 } else { 128 };
        for l in 0..=len {
            let mask = if l == 0 {
                0
            } else {
                (!0u128 << (width - u32::from(l))) & if width == 32 { 0xffff_ffff } else { !0 }
            };
            if let Some((_, m)) = self.prefix_bits.get(&(family, addr & mask, l)) {
                for b in m.keys() {
                    bits.set(*b);
                }
            }
        }
        bits
    }

    pub(super) fn refresh_classes(&mut self, w: &mut Work) {
        let mut ranges = std::mem::take(&mut w.ranges);
        ranges.append(&mut self.pending_ranges);
        // Prefix entries: every registered prefix inside a dirty range, and
        // entries whose prefix disappeared.
        let mut prefixes: BTreeSet<(u8, u128, u8)> = BTreeSet::new();
        let mut hosts: BTreeSet<(u8, u128)> = w.hosts.iter().map(addr_key).collect();
        for r in &ranges {
            let (lo, hi) = range_of(r);
            for (k, _) in self.prefix_bits.range((lo.0, lo.1, 0)..=(hi.0, hi.1, 255)) {
                prefixes.insert(*k);
            }
            prefixes.insert(net_key(r));
            for (k, _) in self.hosts.range(lo..=hi) {
                hosts.insert(*k);
            }
        }
        for k in prefixes {
            let net = self.prefix_bits.get(&k).map(|(n, _)| *n);
            // The entry for this exact prefix, if it still exists.
            let old = self
                .prefix_class
                .iter()
                .find(|(n, _)| net_key(n) == k)
                .map(|(n, c)| (*n, *c));
            if let Some((n, c)) = old {
                self.prefix_class.remove(&n);
                self.unref_class(c);
            }
            if let Some(n) = net {
                let bits = self.cidr_bits(k.0, k.1, k.2);
                let c = self.intern_class(bits);
                self.prefix_class.insert(n, c);
            }
        }
        for k in hosts {
            let ip = self.hosts.get(&k).map(|(ip, _)| *ip);
            let old_ip = match k.0 {
                4 => IpAddr::from(std::net::Ipv4Addr::from(k.1 as u32)),
                _ => IpAddr::from(std::net::Ipv6Addr::from(k.1)),
            };
            if let Some(old) = self.host_entries.remove(&old_ip) {
                self.unref_class(old.class);
                self.unref_union(old.identity);
            }
            let Some(ip) = ip else { continue };
            let eps = self.hosts[&k].1.clone();
            let labels: Vec<LabelId> = eps
                .iter()
                .filter_map(|e| self.endpoints.get(e).map(|s| s.label))
                .collect();
            if labels.is_empty() {
                continue;
            }
            let identity = self.address_identity(labels);
            let width = if k.0 == 4 { 32 } else { 128 };
            let bits = self.cidr_bits(k.0, k.1, width);
            let class = self.intern_class(bits);
            self.host_entries.insert(ip, HostEntry { identity, class });
        }
        self.refresh_unions();
    }

    pub(super) fn address_identity(&mut self, mut labels: Vec<LabelId>) -> u32 {
        labels.sort_unstable();
        labels.dedup();
        if labels.len() == 1 {
            return labels[0];
        }
        self.unions.acquire(labels).0
    }

    pub(super) fn unref_union(&mut self, id: u32) {
        if id < UNION_IDENTITY_BASE {
            return;
        }
        if self.unions.release(id).is_some() {
            self.id_bits.remove(&id);
        }
    }

    /// Union identities get the OR of their members' bits.
    pub(super) fn refresh_unions(&mut self) {
        let unions: Vec<(Vec<LabelId>, u32)> = self
            .unions
            .iter()
            .map(|(id, k, _)| (k.clone(), id))
            .collect();
        for (members, id) in unions {
            let mut bits = Bits::new();
            for m in &members {
                if let Some(b) = self.id_bits.get(m) {
                    bits.union_with(b);
                }
            }
            if self.id_bits.get(&id) != Some(&bits) {
                if bits.is_empty() {
                    self.id_bits.remove(&id);
                } else {
                    self.id_bits.insert(id, bits);
                }
            }
        }
    }

    pub(super) fn take_delta(&mut self) -> Delta {
        Delta {
            programs: self.programs.take_changes().into_iter().collect(),
            slots: self.slots.take_changes().into_iter().collect(),
            identities: self.id_bits.take_changes().into_iter().collect(),
            classes: self.classes.take_changes().into_iter().collect(),
            prefixes: self.prefix_class.take_changes().into_iter().collect(),
            hosts: self.host_entries.take_changes().into_iter().collect(),
            rules: self.rules.take_changes().into_iter().collect(),
        }
    }
}
