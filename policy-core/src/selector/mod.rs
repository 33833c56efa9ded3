//! Calico's selector language: parsing, evaluation, canonical form, selector
//! IDs and per-label restrictions.
//!
//! ```
//! use policy_core::selector::Selector;
//! use std::collections::BTreeMap;
//!
//! let sel = Selector::parse("app == 'web' && !has(canary)").unwrap();
//! let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
//! assert!(sel.matches(&labels));
//! assert_eq!(sel.canonical(), "(app == \"web\" && !has(canary))");
//! assert!(sel.id().starts_with("s:"));
//!
//! let err = Selector::parse("app = 'web'").unwrap_err();
//! assert_eq!(err.offset, 4);
//! ```

mod lexer;
mod parser;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha224};

pub use lexer::{MAX_LABEL_LENGTH, is_valid_label_key};

/// A selector that failed to parse: where, what was expected, what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?} at byte {offset}: expected {expected}, found {found}")]
pub struct SelectorError {
    /// The selector text.
    pub selector: String,
    /// Byte offset of the offending token.
    pub offset: usize,
    /// What the parser expected there.
    pub expected: String,
    /// What it found instead.
    pub found: String,
}

impl SelectorError {
    pub(crate) fn new(
        selector: &str,
        offset: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Self {
        Self {
            selector: selector.to_string(),
            offset,
            expected: expected.into(),
            found: found.into(),
        }
    }
}

/// Read access to a label set; lets selectors run over maps or interned stores.
pub trait Labels {
    /// The value of label `key`, if present.
    fn get_label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn get_label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl Labels for HashMap<String, String> {
    fn get_label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl<L: Labels + ?Sized> Labels for &L {
    fn get_label(&self, key: &str) -> Option<&str> {
        (**self).get_label(key)
    }
}

/// Selector syntax tree. `In`/`NotIn` hold sorted, de-duplicated values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expr {
    /// `all()`: matches everything.
    All,
    /// `global()`: matches everything; in namespace selectors it means "no namespace".
    Global,
    /// `has(k)`
    Has(String),
    /// `k == "v"`
    Eq(String, String),
    /// `k != "v"` (true when `k` is absent)
    Ne(String, String),
    /// `k contains "v"`
    Contains(String, String),
    /// `k starts with "v"`
    StartsWith(String, String),
    /// `k ends with "v"`
    EndsWith(String, String),
    /// `k in {"a", "b"}`
    In(String, Vec<String>),
    /// `k not in {"a", "b"}` (true when `k` is absent)
    NotIn(String, Vec<String>),
    /// `!x`
    Not(Box<Expr>),
    /// `x && y && ...` (at least two operands)
    And(Vec<Expr>),
    /// `x || y || ...` (at least two operands)
    Or(Vec<Expr>),
}

impl Expr {
    /// Evaluates the expression over a label set with Calico's missing-label rules.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        match self {
            Expr::All | Expr::Global => true,
            Expr::Has(k) => labels.get_label(k).is_some(),
            Expr::Eq(k, v) => labels.get_label(k) == Some(v.as_str()),
            Expr::Ne(k, v) => labels.get_label(k) != Some(v.as_str()),
            Expr::Contains(k, v) => labels.get_label(k).is_some_and(|x| x.contains(v.as_str())),
            Expr::StartsWith(k, v) => labels
                .get_label(k)
                .is_some_and(|x| x.starts_with(v.as_str())),
            Expr::EndsWith(k, v) => labels.get_label(k).is_some_and(|x| x.ends_with(v.as_str())),
            Expr::In(k, vs) => labels
                .get_label(k)
                .is_some_and(|x| vs.binary_search_by(|v| v.as_str().cmp(x)).is_ok()),
            Expr::NotIn(k, vs) => labels
                .get_label(k)
                .is_none_or(|x| vs.binary_search_by(|v| v.as_str().cmp(x)).is_err()),
            Expr::Not(e) => !e.matches(labels),
            Expr::And(es) => es.iter().all(|e| e.matches(labels)),
            Expr::Or(es) => es.iter().any(|e| e.matches(labels)),
        }
    }

    fn write_canonical(&self, out: &mut String) {
        fn quoted(out: &mut String, s: &str) {
            // Calico quotes with " unless the value itself holds a ".
            let q = if s.contains('"') { '\'' } else { '"' };
            out.push(q);
            out.push_str(s);
            out.push(q);
        }
        fn op(out: &mut String, k: &str, op: &str, v: &str) {
            out.push_str(k);
            out.push_str(op);
            quoted(out, v);
        }
        fn set(out: &mut String, k: &str, op: &str, vs: &[String]) {
            out.push_str(k);
            out.push_str(op);
            out.push('{');
            for (i, v) in vs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quoted(out, v);
            }
            out.push('}');
        }
        match self {
            Expr::All => out.push_str("all()"),
            Expr::Global => out.push_str("global()"),
            Expr::Has(k) => {
                out.push_str("has(");
                out.push_str(k);
                out.push(')');
            }
            Expr::Eq(k, v) => op(out, k, " == ", v),
            Expr::Ne(k, v) => op(out, k, " != ", v),
            Expr::Contains(k, v) => op(out, k, " contains ", v),
            Expr::StartsWith(k, v) => op(out, k, " starts with ", v),
            Expr::EndsWith(k, v) => op(out, k, " ends with ", v),
            Expr::In(k, vs) => set(out, k, " in ", vs),
            Expr::NotIn(k, vs) => set(out, k, " not in ", vs),
            Expr::Not(e) => {
                out.push('!');
                // Calico prints `!!x` for a negation of a parenthesised negation,
                // which re-parses as `x` (leading `!`s collapse). Keeping the
                // parentheses makes the canonical form re-parse to the same tree.
                if matches!(**e, Expr::Not(_)) {
                    out.push('(');
                    e.write_canonical(out);
                    out.push(')');
                } else {
                    e.write_canonical(out);
                }
            }
            Expr::And(es) | Expr::Or(es) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " && "
                } else {
                    " || "
                };
                out.push('(');
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    e.write_canonical(out);
                }
                out.push(')');
            }
        }
    }

    /// The canonical string form, as Calico prints it.
    pub fn canonical(&self) -> String {
        let mut s = String::new();
        self.write_canonical(&mut s);
        s
    }

    /// Calls `f` on every label key the expression reads.
    pub fn visit_labels<'a>(&'a self, f: &mut impl FnMut(&'a str)) {
        match self {
            Expr::All | Expr::Global => {}
            Expr::Has(k)
            | Expr::Eq(k, _)
            | Expr::Ne(k, _)
            | Expr::Contains(k, _)
            | Expr::StartsWith(k, _)
            | Expr::EndsWith(k, _)
            | Expr::In(k, _)
            | Expr::NotIn(k, _) => f(k),
            Expr::Not(e) => e.visit_labels(f),
            Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| e.visit_labels(f)),
        }
    }

    /// Returns a copy with every label key prefixed (Calico's PrefixVisitor),
    /// used to turn namespace selectors into `pcns.` selectors.
    pub fn with_label_prefix(&self, prefix: &str) -> Expr {
        let p = |k: &String| format!("{prefix}{k}");
        match self {
            Expr::All => Expr::All,
            Expr::Global => Expr::Global,
            Expr::Has(k) => Expr::Has(p(k)),
            Expr::Eq(k, v) => Expr::Eq(p(k), v.clone()),
            Expr::Ne(k, v) => Expr::Ne(p(k), v.clone()),
            Expr::Contains(k, v) => Expr::Contains(p(k), v.clone()),
            Expr::StartsWith(k, v) => Expr::StartsWith(p(k), v.clone()),
            Expr::EndsWith(k, v) => Expr::EndsWith(p(k), v.clone()),
            Expr::In(k, v) => Expr::In(p(k), v.clone()),
            Expr::NotIn(k, v) => Expr::NotIn(p(k), v.clone()),
            Expr::Not(e) => Expr::Not(Box::new(e.with_label_prefix(prefix))),
            Expr::And(es) => Expr::And(es.iter().map(|e| e.with_label_prefix(prefix)).collect()),
            Expr::Or(es) => Expr::Or(es.iter().map(|e| e.with_label_prefix(prefix)).collect()),
        }
    }

    /// Lower-bound restrictions on labels that any matching label set satisfies
    /// (Calico's LabelRestrictions). Keys absent from the map are unrestricted.
    pub fn label_restrictions(&self) -> BTreeMap<String, LabelRestriction> {
        match self {
            Expr::Eq(k, v) => BTreeMap::from([(
                k.clone(),
                LabelRestriction {
                    must_be_present: true,
                    must_be_absent: false,
                    one_of: Some(vec![v.clone()]),
                },
            )]),
            Expr::In(k, vs) => BTreeMap::from([(
                k.clone(),
                LabelRestriction {
                    must_be_present: true,
                    must_be_absent: false,
                    one_of: Some(vs.clone()),
                },
            )]),
            Expr::Has(k) | Expr::Contains(k, _) | Expr::StartsWith(k, _) | Expr::EndsWith(k, _) => {
                BTreeMap::from([(k.clone(), LabelRestriction::present())])
            }
            Expr::Not(e) => match &**e {
                Expr::Has(k) => BTreeMap::from([(
                    k.clone(),
                    LabelRestriction {
                        must_be_present: false,
                        must_be_absent: true,
                        one_of: None,
                    },
                )]),
                // Most negations say nothing: !(a == 'b') does not require a to be absent.
                _ => BTreeMap::new(),
            },
            Expr::And(es) => {
                let mut out: BTreeMap<String, LabelRestriction> = BTreeMap::new();
                for e in es {
                    for (k, r) in e.label_restrictions() {
                        let base = out.entry(k).or_default();
                        base.must_be_present |= r.must_be_present;
                        base.must_be_absent |= r.must_be_absent;
                        base.one_of = match (base.one_of.take(), r.one_of) {
                            (None, x) | (x, None) => x,
                            (Some(a), Some(b)) => {
                                Some(a.into_iter().filter(|v| b.contains(v)).collect())
                            }
                        };
                    }
                }
                out
            }
            Expr::Or(es) => {
                let mut out = es[0].label_restrictions();
                for e in &es[1..] {
                    let other = e.label_restrictions();
                    out.retain(|k, r| {
                        let o = other.get(k).cloned().unwrap_or_default();
                        r.must_be_present &= o.must_be_present;
                        r.one_of = if !r.must_be_present {
                            None
                        } else {
                            match (r.one_of.take(), o.one_of) {
                                (Some(mut a), Some(b)) => {
                                    for v in b {
                                        if !a.contains(&v) {
                                            a.push(v);
                                        }
                                    }
                                    a.sort();
                                    Some(a)
                                }
                                _ => None,
                            }
                        };
                        r.must_be_absent &= o.must_be_absent;
                        r.must_be_present || r.must_be_absent
                    });
                }
                out
            }
            Expr::All | Expr::Global | Expr::Ne(..) | Expr::NotIn(..) => BTreeMap::new(),
        }
    }
}

/// What a selector requires of one label key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelRestriction {
    /// The label must be present.
    pub must_be_present: bool,
    /// The label must be absent.
    pub must_be_absent: bool,
    /// If set, the label's value must be one of these (an empty list means the
    /// selector can never match).
    pub one_of: Option<Vec<String>>,
}

impl LabelRestriction {
    fn present() -> Self {
        Self {
            must_be_present: true,
            must_be_absent: false,
            one_of: None,
        }
    }

    /// False when no label set can satisfy the restriction.
    pub fn possible(&self) -> bool {
        let contradictory = self.must_be_present && self.must_be_absent;
        let no_value_allowed = matches!(&self.one_of, Some(v) if v.is_empty());
        !contradictory && !no_value_allowed
    }
}

/// A parsed selector with its canonical form and Calico selector ID.
/// Cloning is cheap; equality and hashing follow the canonical form.
#[derive(Clone)]
pub struct Selector(Arc<SelectorInner>);

struct SelectorInner {
    expr: Expr,
    canonical: String,
    id: String,
}

impl Selector {
    /// Parses a selector; the empty string means `all()`.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        parser::parse(text).map(Selector::from_expr)
    }

    /// Wraps an expression tree.
    pub fn from_expr(expr: Expr) -> Selector {
        let canonical = expr.canonical();
        let id = selector_id(&canonical);
        Selector(Arc::new(SelectorInner {
            expr,
            canonical,
            id,
        }))
    }

    /// `all()`.
    pub fn all() -> Selector {
        Selector::from_expr(Expr::All)
    }

    /// The syntax tree.
    pub fn expr(&self) -> &Expr {
        &self.0.expr
    }

    /// Canonical text (Calico's `String()`).
    pub fn canonical(&self) -> &str {
        &self.0.canonical
    }

    /// Calico's selector ID: `"s:" + base64url_nopad(SHA224("s:" + canonical))`.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Evaluates the selector over a label set.
    pub fn matches<L: Labels + ?Sized>(&self, labels: &L) -> bool {
        self.0.expr.matches(labels)
    }

    /// Whether the selector is `all()`.
    pub fn is_all(&self) -> bool {
        self.0.expr == Expr::All
    }

    /// Per-label restrictions (see [`Expr::label_restrictions`]).
    pub fn label_restrictions(&self) -> BTreeMap<String, LabelRestriction> {
        self.0.expr.label_restrictions()
    }

    /// `(self) && (other)` as a new selector.
    pub fn and(&self, other: &Selector) -> Selector {
        Selector::from_expr(Expr::And(vec![self.expr().clone(), other.expr().clone()]))
    }
}

fn selector_id(canonical: &str) -> String {
    let digest = Sha224::digest(format!("s:{canonical}").as_bytes());
    format!(
        "s:{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest)
    )
}

impl PartialEq for Selector {
    fn eq(&self, other: &Self) -> bool {
        self.0.canonical == other.0.canonical
    }
}
impl Eq for Selector {}
impl std::hash::Hash for Selector {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.canonical.hash(state)
    }
}
impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Selector {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.canonical.cmp(&other.0.canonical)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.canonical)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({:?})", self.0.canonical)
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn precedence_and_negation() {
        let s = Selector::parse("a == 'x' || b == 'y' && c == 'z'").unwrap();
        assert_eq!(s.canonical(), "(a == \"x\" || (b == \"y\" && c == \"z\"))");
        // '!' binds to one operation.
        let s = Selector::parse("!a == 'b'").unwrap();
        assert_eq!(
            s.expr(),
            &Expr::Not(Box::new(Expr::Eq("a".into(), "b".into())))
        );
        // Leading '!'s collapse.
        let s = Selector::parse("!!a == 'b'").unwrap();
        assert_eq!(s.expr(), &Expr::Eq("a".into(), "b".into()));
    }

    #[test]
    fn missing_labels() {
        let empty = labels(&[]);
        for (sel, want) in [
            ("a == 'x'", false),
            ("a != 'x'", true),
            ("a in {'x'}", false),
            ("a not in {'x'}", true),
            ("a contains 'x'", false),
            ("a starts with ''", false),
            ("a ends with ''", false),
            ("has(a)", false),
            ("!has(a)", true),
            ("all()", true),
            ("global()", true),
            ("", true),
        ] {
            assert_eq!(Selector::parse(sel).unwrap().matches(&empty), want, "{sel}");
        }
    }

    #[test]
    fn double_negation_through_parentheses_round_trips() {
        let s = Selector::parse("!(!a == 'b')").unwrap();
        assert_eq!(s.canonical(), "!(!a == \"b\")");
        let again = Selector::parse(s.canonical()).unwrap();
        assert_eq!(again.expr(), s.expr());
    }

    #[test]
    fn restrictions() {
        let r = Selector::parse("a == 'x' && a in {'x', 'y'} && !has(b)")
            .unwrap()
            .label_restrictions();
        assert_eq!(r["a"].one_of, Some(vec!["x".to_string()]));
        assert!(r["b"].must_be_absent);
        let r = Selector::parse("a == 'x' || a == 'y'")
            .unwrap()
            .label_restrictions();
        assert_eq!(r["a"].one_of, Some(vec!["x".to_string(), "y".to_string()]));
        let r = Selector::parse("a == 'x' || has(b)")
            .unwrap()
            .label_restrictions();
        assert!(r.is_empty());
        let r = Selector::parse("a == 'x' && a == 'y'")
            .unwrap()
            .label_restrictions();
        assert!(!r["a"].possible());
    }

    #[test]
    fn prefixing() {
        let s = Selector::parse("a == 'x' && !has(b)").unwrap();
        assert_eq!(
            s.expr().with_label_prefix("pcns.").canonical(),
            "(pcns.a == \"x\" && !has(pcns.b))"
        );
    }
}
