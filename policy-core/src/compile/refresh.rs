//! Incremental bookkeeping of a change: identities, hosts, endpoints,
//! network sets, policies, profiles, named ports, policy sets and the
//! membership bits that peer sets hold.

use super::*;

impl Compiler {
    pub(super) fn identity_added(&mut self, l: LabelId, w: &mut Work) {
        let key = self.ids.key(l).clone();
        let matched = self.selectors.add_identity(l, &key.labels);
        let mut bits = Bits::new();
        for s in &matched {
            if let Some(b) = self.selector_bit.get(s) {
                bits.set(*b);
            }
        }
        for (name, proto, port) in &key.ports {
            if name.is_empty() {
                continue;
            }
            let r = (Protocol(*proto), *port);
            let count = self
                .realizations
                .entry(name.clone())
                .or_default()
                .entry(r)
                .or_insert(0);
            *count += 1;
            if *count == 1 {
                w.named_ports.insert(name.clone());
            }
            if let Some(sets) = self.np_by_realization.get(&(name.clone(), r.0, r.1)) {
                for k in sets {
                    if let PeerSetKey::NamedPort { selector, .. } = k
                        && selector.as_ref().is_none_or(|s| matched.contains(s))
                    {
                        bits.set(self.peer_sets[k].bit);
                    }
                }
            }
        }
        if !bits.is_empty() {
            self.id_bits.insert(l, bits);
        }
    }

    pub(super) fn identity_removed(&mut self, l: LabelId, key: &IdentityKey, w: &mut Work) {
        self.selectors.remove_identity(l, &key.labels);
        self.id_bits.remove(&l);
        for (name, proto, port) in &key.ports {
            if name.is_empty() {
                continue;
            }
            if let Some(m) = self.realizations.get_mut(name) {
                let r = (Protocol(*proto), *port);
                if let Some(c) = m.get_mut(&r) {
                    *c -= 1;
                    if *c == 0 {
                        m.remove(&r);
                        w.named_ports.insert(name.clone());
                    }
                }
                if m.is_empty() {
                    self.realizations.remove(name);
                }
            }
        }
        for d in Direction::ALL {
            if let Some(set) = self.policy_sets.remove(&(l, d)) {
                for p in set.iter() {
                    if let Some(u) = self.policy_users.get_mut(p) {
                        u.remove(&l);
                    }
                }
            }
        }
        for p in &key.profiles {
            if let Some(u) = self.profile_users.get_mut(p) {
                u.remove(&l);
            }
        }
        self.forget_keys(l);
    }

    pub(super) fn forget_keys(&mut self, l: LabelId) {
        if let Some(keys) = self.keys_of_label.remove(&l) {
            for k in keys {
                if let Some(pid) = self.program_of_key.remove(&k)
                    && let Some(set) = self.keys_of_program.get_mut(&pid)
                {
                    set.remove(&k);
                }
            }
        }
    }

    pub(super) fn host_touch(&mut self, ip: IpAddr, ep: &EndpointKey, add: bool, w: &mut Work) {
        let k = addr_key(&ip);
        let entry = self.hosts.entry(k).or_insert_with(|| (ip, Vec::new()));
        if add {
            if !entry.1.contains(ep) {
                entry.1.push(ep.clone());
                entry.1.sort();
            }
        } else {
            entry.1.retain(|e| e != ep);
        }
        let shared = entry.1.len() > 1;
        if entry.1.is_empty() {
            self.hosts.remove(&k);
        }
        w.hosts.insert(ip);
        // Endpoints sharing an address resolve local matches together, so
        // their programs change when the sharing does.
        if let Some((_, eps)) = self.hosts.get(&k)
            && (shared || eps.len() == 1 && !add)
        {
            for e in eps.clone() {
                if let Some(st) = self.endpoints.get(&e) {
                    w.labels.insert(st.label);
                }
                w.slots.insert(e);
            }
        }
    }

    pub(super) fn refresh_endpoint(&mut self, key: &EndpointKey, w: &mut Work) {
        let old = self.endpoints.remove(key);
        let new = self.cluster.endpoint(key).cloned();
        if let Some(old) = &old {
            for ip in old.ips.clone() {
                self.host_touch(ip, key, false, w);
            }
            if let Some(set) = self.identity_eps.get_mut(&old.label) {
                set.remove(key);
            }
            if old.local {
                let c = self.local_count.entry(old.label).or_insert(1);
                *c -= 1;
                if *c == 0 {
                    self.local_count.remove(&old.label);
                }
            }
            for p in &old.profiles {
                if let Some(set) = self.profile_eps.get_mut(p) {
                    set.remove(key);
                    if set.is_empty() {
                        self.profile_eps.remove(p);
                    }
                }
            }
            let okey = self.ids.key(old.label).clone();
            if self.ids.release(old.label) {
                self.identity_eps.remove(&old.label);
                self.identity_removed(old.label, &okey, w);
            }
            w.slots.insert(key.clone());
        }
        if let Some(ep) = new {
            let profiles = ep.profile_names();
            let mut cache: Vec<(String, Option<Arc<Profile>>)> = Vec::new();
            for p in &profiles {
                cache.push((p.clone(), self.profile_of(p)));
                self.profile_eps
                    .entry(p.clone())
                    .or_default()
                    .insert(key.clone());
            }
            let labels = crate::cluster::endpoint_labels_with(&ep, |name| {
                cache
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, p)| p.as_ref())
                    .map(|p| &p.labels_to_apply)
            });
            let (l, fresh) =
                self.ids
                    .acquire(IdentityKey::new(labels, &ep.ports, profiles.clone()));
            if fresh {
                self.identity_added(l, w);
            }
            self.identity_eps.entry(l).or_default().insert(key.clone());
            let local = self.is_local(&ep);
            if local {
                let c = self.local_count.entry(l).or_insert(0);
                *c += 1;
                if *c == 1 {
                    w.policy_sets.insert(l);
                    for p in &profiles {
                        self.profile_users.entry(p.clone()).or_default().insert(l);
                    }
                }
            }
            let mut ips = ep.ips.clone();
            ips.sort();
            ips.dedup();
            self.endpoints.insert(
                key.clone(),
                EpState {
                    label: l,
                    ips: ips.clone(),
                    local,
                    profiles,
                },
            );
            for ip in ips {
                self.host_touch(ip, key, true, w);
            }
            w.slots.insert(key.clone());
        }
    }

    pub(super) fn netset_cidrs_add(&mut self, nets: &[IpNet], bit: Bit, add: bool, w: &mut Work) {
        for n in nets {
            let k = net_key(n);
            let e = self
                .prefix_bits
                .entry(k)
                .or_insert_with(|| (*n, HashMap::default()));
            if add {
                *e.1.entry(bit).or_insert(0) += 1;
            } else if let Some(c) = e.1.get_mut(&bit) {
                *c -= 1;
                if *c == 0 {
                    e.1.remove(&bit);
                }
            }
            if e.1.is_empty() {
                self.prefix_bits.remove(&k);
            }
            w.ranges.push(*n);
        }
    }

    pub(super) fn refresh_netset(&mut self, key: &(Option<String>, String), w: &mut Work) {
        let old = self.netsets.remove(key);
        let new = self
            .cluster
            .network_sets()
            .find(|s| s.namespace == key.0 && s.name == key.1)
            .map(|s| (self.cluster.network_set_labels(s), s.nets.clone()));
        let sel_sets: Vec<(Selector, Bit)> = self
            .selector_bit
            .iter()
            .map(|(s, b)| (s.clone(), *b))
            .collect();
        for (s, bit) in sel_sets {
            let was = old.as_ref().is_some_and(|(l, _)| s.matches(l));
            let now = new.as_ref().is_some_and(|(l, _)| s.matches(l));
            let pk = PeerSetKey::Selector(s.clone());
            if was {
                let nets = old.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                self.netset_cidrs_add(&nets, bit, false, w);
                if let Some(ps) = self.peer_sets.get_mut(&pk) {
                    for n in &nets {
                        if let Some(i) = ps.cidrs.iter().position(|x| x == n) {
                            ps.cidrs.remove(i);
                        }
                    }
                }
            }
            if now {
                let nets = new.as_ref().map(|(_, n)| n.clone()).unwrap_or_default();
                self.netset_cidrs_add(&nets, bit, true, w);
                if let Some(ps) = self.peer_sets.get_mut(&pk) {
                    ps.cidrs.extend(nets.iter().copied());
                }
            }
        }
        // Local-side matches may depend on network sets: programs keyed by
        // address are recomputed.
        let ip_keyed: Vec<LabelId> = self
            .program_of_key
            .keys()
            .filter(|k| k.ip.is_some())
            .map(|k| k.label)
            .collect();
        w.labels.extend(ip_keyed);
        if let Some(ns) = &key.0 {
            let set = self.netsets_by_ns.entry(ns.clone()).or_default();
            if new.is_some() {
                set.insert(key.clone());
            } else {
                set.remove(key);
            }
        }
        if let Some(n) = new {
            self.netsets.insert(key.clone(), n);
        }
    }

    pub(super) fn refresh_policy(&mut self, id: &PolicyId, w: &mut Work) {
        if let Some(old) = self.policy_selector.remove(id) {
            if let Some(bm) = self.selectors.bitmap(&old) {
                w.policy_sets
                    .extend(bm.iter().filter(|l| self.local_count.contains_key(l)));
            }
            if let Some(s) = self.selector_policies.get_mut(&old) {
                s.remove(id);
                if s.is_empty() {
                    self.selector_policies.remove(&old);
                }
            }
            self.selectors.release(&old);
        }
        self.policy_local_side.remove(id);
        self.policy_arcs.remove(id);
        self.set_named_ports((Owner::Policy, id.to_string()), Vec::new());
        if let Some(users) = self.policy_users.get(id) {
            w.labels.extend(users.iter().copied());
            w.policy_sets.extend(users.iter().copied());
        }
        let Some(p) = self.cluster.policy(id).cloned() else {
            return;
        };
        if !p.enforced() {
            return;
        }
        self.selectors.acquire(&p.selector, &self.ids);
        if let Some(bm) = self.selectors.bitmap(&p.selector) {
            w.policy_sets
                .extend(bm.iter().filter(|l| self.local_count.contains_key(l)));
        }
        self.selector_policies
            .entry(p.selector.clone())
            .or_default()
            .insert(id.clone());
        self.policy_selector.insert(id.clone(), p.selector.clone());
        self.policy_arcs.insert(id.clone(), Arc::new(p.clone()));
        self.policy_local_side.insert(
            id.clone(),
            [
                p.ingress
                    .iter()
                    .any(|r| residual::has_local_side(r, Direction::Ingress)),
                p.egress
                    .iter()
                    .any(|r| residual::has_local_side(r, Direction::Egress)),
            ],
        );
        let names = residual::peer_named_ports(&p.ingress, Direction::Ingress)
            .into_iter()
            .chain(residual::peer_named_ports(&p.egress, Direction::Egress))
            .collect();
        self.set_named_ports((Owner::Policy, id.to_string()), names);
    }

    pub(super) fn refresh_profile(&mut self, name: &str, w: &mut Work) {
        if let Some(users) = self.profile_users.get(name) {
            w.labels.extend(users.iter().copied());
        }
        let names = match self.cluster.profile(name) {
            Some(p) => residual::peer_named_ports(&p.ingress, Direction::Ingress)
                .into_iter()
                .chain(residual::peer_named_ports(&p.egress, Direction::Egress))
                .collect(),
            None => Vec::new(),
        };
        self.set_named_ports((Owner::Profile, name.to_string()), names);
    }

    pub(super) fn set_named_ports(&mut self, owner: (Owner, String), names: Vec<String>) {
        if let Some(old) = self.owner_named_ports.remove(&owner) {
            for n in old {
                if let Some(u) = self.named_port_users.get_mut(&n) {
                    u.remove(&owner);
                    if u.is_empty() {
                        self.named_port_users.remove(&n);
                    }
                }
            }
        }
        if !names.is_empty() {
            for n in &names {
                self.named_port_users
                    .entry(n.clone())
                    .or_default()
                    .insert(owner.clone());
            }
            self.owner_named_ports.insert(owner, names);
        }
    }

    /// Programs of rules with peer-side named port `name` depend on which
    /// (protocol, port) pairs endpoints declare for it.
    pub(super) fn invalidate_named_port(&mut self, name: &str, w: &mut Work) {
        let Some(owners) = self.named_port_users.get(name) else {
            return;
        };
        for (kind, id) in owners {
            let users = match kind {
                Owner::Policy => self
                    .policy_users
                    .iter()
                    .find(|(p, _)| p.to_string() == *id)
                    .map(|(_, u)| u),
                Owner::Profile => self.profile_users.get(id),
            };
            if let Some(u) = users {
                w.labels.extend(u.iter().copied());
            }
        }
    }

    pub(super) fn sorted_policy_set(&self, l: LabelId, dir: Direction) -> Vec<PolicyId> {
        let labels = &self.ids.key(l).labels;
        let mut v: Vec<&Policy> = Vec::new();
        for s in self.selectors.matching(labels) {
            if let Some(ps) = self.selector_policies.get(&s) {
                for id in ps {
                    if let Some(p) = self.cluster.policy(id)
                        && p.enforced()
                        && p.applies_in(dir)
                    {
                        v.push(p);
                    }
                }
            }
        }
        let tier_key = |name: &str| {
            self.cluster
                .tier(name)
                .map(|t| t.sort_key())
                .unwrap_or((OrderKey(f64::INFINITY), name.to_string()))
        };
        v.sort_by_cached_key(|p| (tier_key(&p.tier), p.sort_key()));
        v.dedup_by(|a, b| a.id == b.id);
        v.into_iter().map(|p| p.id.clone()).collect()
    }

    pub(super) fn refresh_policy_sets(&mut self, l: LabelId, w: &mut Work) {
        if !self.local_count.contains_key(&l) {
            return;
        }
        let mut touched: Vec<PolicyId> = Vec::new();
        for d in Direction::ALL {
            let new = self.sorted_policy_set(l, d);
            let old = self.policy_sets.get(&(l, d)).cloned();
            if old.as_deref() == Some(&new) {
                continue;
            }
            if let Some(old) = &old {
                touched.extend(old.iter().cloned());
            }
            touched.extend(new.iter().cloned());
            self.policy_sets.insert((l, d), Arc::new(new));
            w.labels.insert(l);
        }
        // A label uses a policy while either direction's set holds it, so
        // membership is decided on both sets, not per direction.
        for p in touched {
            let uses = Direction::ALL.iter().any(|d| {
                self.policy_sets
                    .get(&(l, *d))
                    .is_some_and(|set| set.contains(&p))
            });
            if uses {
                self.policy_users.entry(p).or_default().insert(l);
            } else if let Some(u) = self.policy_users.get_mut(&p) {
                u.remove(&l);
                if u.is_empty() {
                    self.policy_users.remove(&p);
                }
            }
        }
    }

    pub(super) fn acquire_bit(&mut self, key: &PeerSetKey) -> Bit {
        if let Some(ps) = self.peer_sets.get_mut(key) {
            ps.refs += 1;
            return ps.bit;
        }
        let bit = match self.free_bits.pop() {
            Some(b) => b,
            None => {
                self.bit_owner.push(None);
                (self.bit_owner.len() - 1) as Bit
            }
        };
        self.bit_owner[bit as usize] = Some(key.clone());
        let mut cidrs: Vec<IpNet> = Vec::new();
        match key {
            PeerSetKey::Selector(s) => {
                self.selectors.acquire(s, &self.ids);
                for (l, nets) in self.netsets.values() {
                    if s.matches(l) {
                        cidrs.extend(nets.iter().copied());
                    }
                }
                self.selector_bit.insert(s.clone(), bit);
            }
            PeerSetKey::Nets(n) => cidrs = n.clone(),
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                if let Some(s) = selector {
                    self.selectors.acquire(s, &self.ids);
                }
                self.np_by_realization
                    .entry((name.clone(), *protocol, *port))
                    .or_default()
                    .insert(key.clone());
            }
        }
        let members = self.identity_members(key);
        for l in members {
            self.id_bits.update(l, |b| b.set(bit), Bits::new);
        }
        let mut scratch = Work::default();
        self.netset_cidrs_add(&cidrs, bit, true, &mut scratch);
        self.pending_ranges.extend(scratch.ranges);
        self.peer_sets.insert(
            key.clone(),
            PeerSet {
                bit,
                refs: 1,
                cidrs,
            },
        );
        bit
    }

    /// Identities whose addresses belong to a peer set (its CIDRs aside).
    pub(super) fn identity_members(&self, key: &PeerSetKey) -> Vec<LabelId> {
        match key {
            PeerSetKey::Selector(s) => self
                .selectors
                .bitmap(s)
                .map(|b| b.iter().collect())
                .unwrap_or_default(),
            PeerSetKey::Nets(_) => Vec::new(),
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                let want = (name.clone(), protocol.0, *port);
                let pool: Vec<LabelId> = match selector {
                    Some(s) => self
                        .selectors
                        .bitmap(s)
                        .map(|b| b.iter().collect())
                        .unwrap_or_default(),
                    None => self.ids.all().iter().collect(),
                };
                pool.into_iter()
                    .filter(|l| self.ids.key(*l).ports.contains(&want))
                    .collect()
            }
        }
    }

    pub(super) fn release_bit(&mut self, key: &PeerSetKey) {
        let Some(ps) = self.peer_sets.get_mut(key) else {
            return;
        };
        ps.refs -= 1;
        if ps.refs > 0 {
            return;
        }
        let Some(ps) = self.peer_sets.remove(key) else {
            return;
        };
        let bit = ps.bit;
        let members = self.identity_members(key);
        for l in members {
            let mut empty = false;
            self.id_bits.update(
                l,
                |b| {
                    b.clear(bit);
                    empty = b.is_empty();
                },
                Bits::new,
            );
            if empty {
                self.id_bits.remove(&l);
            }
        }
        let mut scratch = Work::default();
        self.netset_cidrs_add(&ps.cidrs, bit, false, &mut scratch);
        self.pending_ranges.extend(scratch.ranges);
        match key {
            PeerSetKey::Selector(s) => {
                self.selector_bit.remove(s);
                self.selectors.release(s);
            }
            PeerSetKey::Nets(_) => {}
            PeerSetKey::NamedPort {
                name,
                selector,
                protocol,
                port,
            } => {
                if let Some(s) = selector {
                    self.selectors.release(s);
                }
                let rk = (name.clone(), *protocol, *port);
                if let Some(set) = self.np_by_realization.get_mut(&rk) {
                    set.remove(key);
                    if set.is_empty() {
                        self.np_by_realization.remove(&rk);
                    }
                }
            }
        }
        self.bit_owner[bit as usize] = None;
        self.free_bits.push(bit);
    }
}
