//! Identities and selector bitmaps.
//!
//! Endpoints with the same effective labels (and the same declared ports and
//! profiles, which rules can also see) share an identity. A label -> value ->
//! identities index answers selectors by bitmap algebra; every selector in use
//! is kept as a roaring bitmap of identities. A new identity is tested only
//! against the selectors its labels can satisfy, found through each
//! selector's label restrictions.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;

use crate::model::{DeclaredPort, LabelMap};
use crate::selector::{Expr, Selector};

/// Identity number.
pub type LabelId = u32;

/// What makes two endpoints indistinguishable to policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    /// Effective labels (own, implicit, inherited).
    pub labels: LabelMap,
    /// Declared ports, sorted (named ports resolve against them).
    pub ports: Vec<(String, u8, u16)>,
    /// Profiles, in order.
    pub profiles: Vec<String>,
}

impl IdentityKey {
    /// Builds a key; ports are sorted so order does not matter.
    pub fn new(labels: LabelMap, ports: &[DeclaredPort], profiles: Vec<String>) -> Self {
        let mut p: Vec<(String, u8, u16)> = ports
            .iter()
            .map(|d| (d.name.clone(), d.protocol.0, d.port))
            .collect();
        p.sort();
        p.dedup();
        Self {
            labels,
            ports: p,
            profiles,
        }
    }
}

/// How a selector is found from a label set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// Only identities with one of these values of this key can match.
    Values(String, Vec<String>),
    /// Only identities with this key can match.
    Key(String),
    /// Anything may match.
    Anything,
    /// Nothing can match.
    Nothing,
}

fn route(sel: &Selector, ids: &Identities) -> Route {
    let r = sel.label_restrictions();
    if r.values().any(|x| !x.possible()) {
        return Route::Nothing;
    }
    // The most selective restriction: the one whose allowed values the
    // fewest identities carry now (namespace beats app, say).
    if let Some((k, x)) = r
        .iter()
        .filter(|(_, x)| x.one_of.is_some())
        .min_by_key(|(k, x)| {
            let values = x.one_of.as_deref().unwrap_or_default();
            let carriers: u64 = values
                .iter()
                .map(|v| {
                    ids.index
                        .get(*k)
                        .and_then(|m| m.get(v))
                        .map_or(0, |b| b.len())
                })
                .sum();
            (carriers, values.len())
        })
    {
        return Route::Values(k.clone(), x.one_of.clone().unwrap_or_default());
    }
    if let Some((k, _)) = r
        .iter()
        .filter(|(_, x)| x.must_be_present)
        .min_by_key(|(k, _)| ids.has.get(*k).map_or(0, |b| b.len()))
    {
        return Route::Key(k.clone());
    }
    Route::Anything
}

/// Identities and the label index over them.
#[derive(Debug, Default)]
pub struct Identities {
    keys: Vec<Option<Arc<IdentityKey>>>,
    free: Vec<LabelId>,
    by_key: HashMap<Arc<IdentityKey>, LabelId>,
    refs: Vec<u32>,
    index: HashMap<String, HashMap<String, RoaringBitmap>>,
    has: HashMap<String, RoaringBitmap>,
    all: RoaringBitmap,
}

impl Identities {
    /// The key of an identity.
    ///
    /// # Panics
    ///
    /// If `id` is not live: the compiler only asks for identities its
    /// endpoints and programs hold.
    pub fn key(&self, id: LabelId) -> &Arc<IdentityKey> {
        self.keys[id as usize]
            .as_ref()
            .expect("live identity has a key")
    }

    /// All live identities.
    pub fn all(&self) -> &RoaringBitmap {
        &self.all
    }

    /// Number of live identities.
    pub fn len(&self) -> usize {
        self.all.len() as usize
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Takes a reference to the identity for `key`, creating it if needed.
    /// Returns the id and whether it is new.
    pub fn acquire(&mut self, key: IdentityKey) -> (LabelId, bool) {
        if let Some(id) = self.by_key.get(&key) {
            self.refs[*id as usize] += 1;
            return (*id, false);
        }
        let key = Arc::new(key);
        let id = match self.free.pop() {
            Some(id) => {
                self.keys[id as usize] = Some(key.clone());
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.keys.push(Some(key.clone()));
                self.refs.push(1);
                (self.keys.len() - 1) as LabelId
            }
        };
        for (k, v) in &key.labels {
            self.index
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(id);
            self.has.entry(k.clone()).or_default().insert(id);
        }
        self.all.insert(id);
        self.by_key.insert(key, id);
        (id, true)
    }

    /// Drops a reference; returns true when the identity went away.
    pub fn release(&mut self, id: LabelId) -> bool {
        let r = &mut self.refs[id as usize];
        *r -= 1;
        if *r > 0 {
            return false;
        }
        let Some(key) = self.keys[id as usize].take() else {
            return false;
        };
        for (k, v) in &key.labels {
            if let Some(values) = self.index.get_mut(k) {
                if let Some(b) = values.get_mut(v) {
                    b.remove(id);
                    if b.is_empty() {
                        values.remove(v);
                    }
                }
                if values.is_empty() {
                    self.index.remove(k);
                }
            }
            if let Some(b) = self.has.get_mut(k) {
                b.remove(id);
                if b.is_empty() {
                    self.has.remove(k);
                }
            }
        }
        self.all.remove(id);
        self.by_key.remove(&key);
        self.free.push(id);
        true
    }

    fn value(&self, k: &str, v: &str) -> RoaringBitmap {
        self.index
            .get(k)
            .and_then(|m| m.get(v))
            .cloned()
            .unwrap_or_default()
    }

    fn values_where(&self, k: &str, pred: impl Fn(&str) -> bool) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        if let Some(m) = self.index.get(k) {
            for (v, b) in m {
                if pred(v) {
                    out |= b;
                }
            }
        }
        out
    }

    /// Evaluates a selector by bitmap algebra over the index (never by
    /// scanning identities).
    pub fn evaluate(&self, e: &Expr) -> RoaringBitmap {
        match e {
            Expr::All | Expr::Global => self.all.clone(),
            Expr::Has(k) => self.has.get(k).cloned().unwrap_or_default(),
            Expr::Eq(k, v) => self.value(k, v),
            Expr::Ne(k, v) => &self.all - &self.value(k, v),
            Expr::In(k, vs) => {
                let mut out = RoaringBitmap::new();
                for v in vs {
                    out |= self.value(k, v);
                }
                out
            }
            Expr::NotIn(k, vs) => {
                let mut out = self.all.clone();
                for v in vs {
                    out -= self.value(k, v);
                }
                out
            }
            Expr::Contains(k, s) => self.values_where(k, |v| v.contains(s.as_str())),
            Expr::StartsWith(k, s) => self.values_where(k, |v| v.starts_with(s.as_str())),
            Expr::EndsWith(k, s) => self.values_where(k, |v| v.ends_with(s.as_str())),
            Expr::Not(x) => &self.all - &self.evaluate(x),
            Expr::And(xs) => {
                let mut it = xs.iter();
                let mut out = it.next().map(|x| self.evaluate(x)).unwrap_or_default();
                for x in it {
                    if out.is_empty() {
                        break;
                    }
                    out &= self.evaluate(x);
                }
                out
            }
            Expr::Or(xs) => {
                let mut out = RoaringBitmap::new();
                for x in xs {
                    out |= self.evaluate(x);
                }
                out
            }
        }
    }
}

/// Every selector in use, with its bitmap of identities.
#[derive(Debug, Default)]
pub struct Selectors {
    entries: HashMap<Selector, SelectorEntry>,
    by_value: HashMap<String, HashMap<String, HashSet<Selector>>>,
    by_key: HashMap<String, HashSet<Selector>>,
    anything: HashSet<Selector>,
}

#[derive(Debug)]
struct SelectorEntry {
    bitmap: RoaringBitmap,
    users: u32,
    route: Route,
}

impl Selectors {
    /// Adds a user of `sel`; a new selector is evaluated by bitmap algebra.
    /// Returns true when the selector is new.
    pub fn acquire(&mut self, sel: &Selector, ids: &Identities) -> bool {
        if let Some(e) = self.entries.get_mut(sel) {
            e.users += 1;
            return false;
        }
        let route = route(sel, ids);
        match &route {
            Route::Values(k, vs) => {
                for v in vs {
                    self.by_value
                        .entry(k.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default()
                        .insert(sel.clone());
                }
            }
            Route::Key(k) => {
                self.by_key
                    .entry(k.clone())
                    .or_default()
                    .insert(sel.clone());
            }
            Route::Anything => {
                self.anything.insert(sel.clone());
            }
            Route::Nothing => {}
        }
        let bitmap = if route == Route::Nothing {
            RoaringBitmap::new()
        } else {
            ids.evaluate(sel.expr())
        };
        self.entries.insert(
            sel.clone(),
            SelectorEntry {
                bitmap,
                users: 1,
                route,
            },
        );
        true
    }

    /// Drops a user; returns true when the selector is no longer in use.
    pub fn release(&mut self, sel: &Selector) -> bool {
        let Some(e) = self.entries.get_mut(sel) else {
            return false;
        };
        e.users -= 1;
        if e.users > 0 {
            return false;
        }
        let Some(e) = self.entries.remove(sel) else {
            return false;
        };
        match e.route {
            Route::Values(k, vs) => {
                if let Some(m) = self.by_value.get_mut(&k) {
                    for v in vs {
                        if let Some(s) = m.get_mut(&v) {
                            s.remove(sel);
                            if s.is_empty() {
                                m.remove(&v);
                            }
                        }
                    }
                    if m.is_empty() {
                        self.by_value.remove(&k);
                    }
                }
            }
            Route::Key(k) => {
                if let Some(s) = self.by_key.get_mut(&k) {
                    s.remove(sel);
                    if s.is_empty() {
                        self.by_key.remove(&k);
                    }
                }
            }
            Route::Anything => {
                self.anything.remove(sel);
            }
            Route::Nothing => {}
        }
        true
    }

    /// The identities a selector matches (empty for unknown selectors).
    pub fn bitmap(&self, sel: &Selector) -> Option<&RoaringBitmap> {
        self.entries.get(sel).map(|e| &e.bitmap)
    }

    /// Number of selectors in use.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none are in use.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Selectors that could match a label set, by their restrictions.
    fn candidates<'a>(&'a self, labels: &'a LabelMap) -> impl Iterator<Item = &'a Selector> + 'a {
        let by_value = labels.iter().flat_map(move |(k, v)| {
            self.by_value
                .get(k)
                .and_then(|m| m.get(v))
                .into_iter()
                .flatten()
        });
        let by_key = labels
            .keys()
            .flat_map(move |k| self.by_key.get(k).into_iter().flatten());
        by_value.chain(by_key).chain(self.anything.iter())
    }

    /// Adds a new identity to every selector that matches it; returns those selectors.
    pub fn add_identity(&mut self, id: LabelId, labels: &LabelMap) -> Vec<Selector> {
        let matched: Vec<Selector> = self
            .candidates(labels)
            .filter(|s| s.matches(labels))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for s in &matched {
            if let Some(e) = self.entries.get_mut(s) {
                e.bitmap.insert(id);
            }
        }
        matched
    }

    /// Removes an identity from every selector that had it; returns those selectors.
    pub fn remove_identity(&mut self, id: LabelId, labels: &LabelMap) -> Vec<Selector> {
        let matched: Vec<Selector> = self
            .candidates(labels)
            .filter(|s| self.entries.get(*s).is_some_and(|e| e.bitmap.contains(id)))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for s in &matched {
            if let Some(e) = self.entries.get_mut(s) {
                e.bitmap.remove(id);
            }
        }
        matched
    }

    /// Selectors in use that match a label set (candidates only).
    pub fn matching(&self, labels: &LabelMap) -> Vec<Selector> {
        self.candidates(labels)
            .filter(|s| s.matches(labels))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> LabelMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn algebra_matches_direct_evaluation() {
        let mut ids = Identities::default();
        let sets = [
            labels(&[("app", "web"), ("env", "prod")]),
            labels(&[("app", "db"), ("env", "prod")]),
            labels(&[("app", "web")]),
            labels(&[]),
        ];
        let got: Vec<LabelId> = sets
            .iter()
            .map(|l| ids.acquire(IdentityKey::new(l.clone(), &[], vec![])).0)
            .collect();
        for text in [
            "app == 'web'",
            "app != 'web'",
            "has(env) && !has(app)",
            "app in {'web', 'db'} || env == 'prod'",
            "app not in {'web'}",
            "app starts with 'w'",
            "env ends with 'od' && app contains 'e'",
            "all()",
        ] {
            let sel = Selector::parse(text).unwrap();
            let bm = ids.evaluate(sel.expr());
            for (l, id) in sets.iter().zip(&got) {
                assert_eq!(bm.contains(*id), sel.matches(l), "{text} on {l:?}");
            }
        }
    }

    #[test]
    fn new_identities_join_existing_selectors() {
        let mut ids = Identities::default();
        let mut sels = Selectors::default();
        let web = Selector::parse("app == 'web'").unwrap();
        let not_web = Selector::parse("app != 'web'").unwrap();
        sels.acquire(&web, &ids);
        sels.acquire(&not_web, &ids);
        let l = labels(&[("app", "web")]);
        let (id, new) = ids.acquire(IdentityKey::new(l.clone(), &[], vec![]));
        assert!(new);
        let matched = sels.add_identity(id, &l);
        assert_eq!(matched, vec![web.clone()]);
        assert!(sels.bitmap(&web).unwrap().contains(id));
        assert!(!sels.bitmap(&not_web).unwrap().contains(id));
    }
}
