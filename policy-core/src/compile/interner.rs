//! One reference-counted interner for the compiler's shared values
//! (address classes, union identities, programs, rule references): equal
//! values get one id, each holder takes a reference, and the value is
//! forgotten when the last reference goes.
//!
//! ```
//! use policy_core::compile::interner::Interner;
//!
//! let mut classes: Interner<&str> = Interner::new(1);
//! let (a, fresh) = classes.acquire("10.0.0.0/8");
//! assert!(fresh);
//! assert_eq!(classes.acquire("10.0.0.0/8"), (a, false));
//! assert_eq!(classes.release(a), None); // one reference left
//! assert_eq!(classes.release(a), Some("10.0.0.0/8"));
//! assert!(classes.is_empty());
//! ```

use std::hash::Hash;

use rustc_hash::FxHashMap as HashMap;

/// Reference count of a value that is never released.
const PERMANENT: u32 = u32::MAX;

/// Values of type `V` numbered from a base, with a reference count each.
#[derive(Debug, Clone)]
pub struct Interner<V: Hash + Eq + Clone> {
    ids: HashMap<V, u32>,
    entries: HashMap<u32, (V, u32)>,
    next: u32,
}

impl<V: Hash + Eq + Clone> Interner<V> {
    /// An empty interner whose first id is `first`.
    pub fn new(first: u32) -> Self {
        Self {
            ids: HashMap::default(),
            entries: HashMap::default(),
            next: first,
        }
    }

    /// Interns `value` under `id` for good: `release` never drops it.
    pub fn insert_permanent(&mut self, id: u32, value: V) {
        self.ids.insert(value.clone(), id);
        self.entries.insert(id, (value, PERMANENT));
        self.next = self.next.max(id.saturating_add(1));
    }

    /// The id of `value`, interning it if new, with one more reference.
    /// The flag says whether the value is new.
    pub fn acquire(&mut self, value: V) -> (u32, bool) {
        let (id, fresh) = self.intern(value);
        self.retain(id);
        (id, fresh)
    }

    /// The id of `value`, interning it if new, without taking a reference:
    /// a new value starts unreferenced (see [`Self::unreferenced`]).
    pub fn intern(&mut self, value: V) -> (u32, bool) {
        if let Some(id) = self.ids.get(&value) {
            return (*id, false);
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(value.clone(), id);
        self.entries.insert(id, (value, 0));
        (id, true)
    }

    /// One more reference to a live id; false if the id is not interned.
    pub fn retain(&mut self, id: u32) -> bool {
        match self.entries.get_mut(&id) {
            Some((_, refs)) => {
                if *refs != PERMANENT {
                    *refs += 1;
                }
                true
            }
            None => false,
        }
    }

    /// One reference fewer; the value, when that was the last one.
    /// Releasing an id that is not interned does nothing.
    pub fn release(&mut self, id: u32) -> Option<V> {
        let (_, refs) = self.entries.get_mut(&id)?;
        if *refs == PERMANENT {
            return None;
        }
        *refs = refs.saturating_sub(1);
        if *refs == 0 { self.remove(id) } else { None }
    }

    /// Forgets an id whatever its references; its value, if it was interned.
    pub fn remove(&mut self, id: u32) -> Option<V> {
        let (value, _) = self.entries.remove(&id)?;
        self.ids.remove(&value);
        Some(value)
    }

    /// The id of an interned value.
    pub fn id(&self, value: &V) -> Option<u32> {
        self.ids.get(value).copied()
    }

    /// The value of an id.
    pub fn value(&self, id: u32) -> Option<&V> {
        self.entries.get(&id).map(|(v, _)| v)
    }

    /// References held on an id (0 for an unknown id).
    pub fn refs(&self, id: u32) -> u32 {
        self.entries.get(&id).map_or(0, |(_, r)| *r)
    }

    /// Ids interned without any reference, in ascending order.
    pub fn unreferenced(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .entries
            .iter()
            .filter(|(_, (_, r))| *r == 0)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Every id with its value and references, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &V, u32)> {
        self.entries.iter().map(|(id, (v, r))| (*id, v, *r))
    }

    /// Number of interned values.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is interned.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_an_id_and_ids_are_not_reused_while_live() {
        let mut i: Interner<Vec<u32>> = Interner::new(10);
        let (a, _) = i.acquire(vec![1, 2]);
        let (b, _) = i.acquire(vec![3]);
        assert_eq!((a, b), (10, 11));
        assert_eq!(i.acquire(vec![1, 2]).0, a);
        assert_eq!(i.refs(a), 2);
        assert_eq!(i.release(b), Some(vec![3]));
        assert_eq!(i.id(&vec![3]), None);
        let (c, fresh) = i.acquire(vec![3]);
        assert!(fresh);
        assert_eq!(c, 12, "ids only grow");
    }

    #[test]
    fn permanent_values_survive_every_release() {
        let mut i: Interner<&str> = Interner::new(1);
        i.insert_permanent(0, "none");
        assert_eq!(i.acquire("none"), (0, false));
        for _ in 0..3 {
            assert_eq!(i.release(0), None);
        }
        assert_eq!(i.value(0), Some(&"none"));
        assert_eq!(i.acquire("x").0, 1);
    }

    #[test]
    fn unreferenced_values_wait_for_a_holder_or_a_sweep() {
        let mut i: Interner<&str> = Interner::new(1);
        let (p, fresh) = i.intern("program");
        assert!(fresh);
        assert_eq!(i.unreferenced(), vec![p]);
        assert!(i.retain(p));
        assert!(i.unreferenced().is_empty());
        assert!(!i.retain(99), "unknown ids are refused, not invented");
        assert_eq!(i.release(99), None);
        assert_eq!(i.release(p), Some("program"));
        assert!(i.is_empty());
    }
}
