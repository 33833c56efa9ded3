//! Small bitsets and change-tracked maps used by the compiler.

use rustc_hash::FxHashMap as HashMap;
use std::hash::Hash;

/// A growable bitset with a canonical form (no trailing zero words), so equal
/// sets compare and hash equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// The empty set.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Sets bit `b`.
    pub fn set(&mut self, b: u32) {
        let w = (b / 64) as usize;
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << (b % 64);
    }

    /// Clears bit `b`.
    pub fn clear(&mut self, b: u32) {
        let w = (b / 64) as usize;
        if w < self.0.len() {
            self.0[w] &= !(1 << (b % 64));
            while self.0.last() == Some(&0) {
                self.0.pop();
            }
        }
    }

    /// Whether bit `b` is set.
    pub fn get(&self, b: u32) -> bool {
        self.0
            .get((b / 64) as usize)
            .is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    /// Adds every bit of `other`.
    pub fn union_with(&mut self, other: &Bits) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    /// The 64-bit words (word `i` holds bits `64*i ..`).
    pub fn words(&self) -> &[u64] {
        &self.0
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The set bits, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| {
            (0..64)
                .filter(move |b| w & (1u64 << b) != 0)
                .map(move |b| i as u32 * 64 + b)
        })
    }
}

/// A map that remembers, for each key touched since the last
/// [`Tracked::take_changes`], the value it had before, so the net change of a
/// batch can be reported.
#[derive(Debug, Clone)]
pub struct Tracked<K: Hash + Eq + Clone, V: Clone + PartialEq> {
    map: HashMap<K, V>,
    before: HashMap<K, Option<V>>,
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> Default for Tracked<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::default(),
            before: HashMap::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone + PartialEq> Tracked<K, V> {
    /// Current value.
    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    fn remember(&mut self, k: &K) {
        if !self.before.contains_key(k) {
            self.before.insert(k.clone(), self.map.get(k).cloned());
        }
    }

    /// Sets a value.
    pub fn insert(&mut self, k: K, v: V) {
        self.remember(&k);
        self.map.insert(k, v);
    }

    /// Removes a value.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.remember(k);
        self.map.remove(k)
    }

    /// Mutates a value in place (inserting a default first if absent).
    pub fn update(&mut self, k: K, f: impl FnOnce(&mut V), default: impl FnOnce() -> V) {
        self.remember(&k);
        f(self.map.entry(k).or_insert_with(default));
    }

    /// Current entries.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Net changes since the last call: keys whose value differs, with the new
    /// value (`None` = removed).
    pub fn take_changes(&mut self) -> Vec<(K, Option<V>)> {
        let before = std::mem::take(&mut self.before);
        before
            .into_iter()
            .filter_map(|(k, old)| {
                let now = self.map.get(&k).cloned();
                (now != old).then_some((k, now))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bits() {
        let mut a = Bits::new();
        a.set(130);
        a.clear(130);
        assert_eq!(a, Bits::new());
        a.set(3);
        a.set(64);
        assert!(a.get(64) && a.get(3) && !a.get(4));
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 64]);
    }

    #[test]
    fn tracked_net_changes() {
        let mut t: Tracked<u32, u32> = Tracked::default();
        t.insert(1, 10);
        t.take_changes();
        t.insert(1, 11);
        t.insert(1, 10);
        t.insert(2, 5);
        t.remove(&2);
        assert!(t.take_changes().is_empty());
        t.remove(&1);
        assert_eq!(t.take_changes(), vec![(1, None)]);
    }
}
