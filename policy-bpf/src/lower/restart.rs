//! Lowering against maps an earlier process wrote: a restarted agent takes
//! over without a gap (`restart`, `release_reserved`), and `resync` rewrites
//! everything from a compiler.

use super::*;

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

impl Lowering {
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
