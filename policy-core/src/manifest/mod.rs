//! Manifest parsing: multi-document YAML, JSON, `kind: List` documents. Pure:
//! the caller reads files and passes their text with a source name.
//!
//! A load is all or nothing: [`parse_source`] returns every object, or every
//! error of the text (in document order, each with the line and column where
//! its document starts); [`ManifestSet`] rejects duplicates across sources.
//! Documents of kinds Palisade does not act on (Deployments, Services,
//! IPPools, ...) are left out and listed as [`Skipped`], so a folder that
//! holds a whole application still loads; every kind Palisade does act on is
//! validated strictly, unknown fields included.

use std::collections::BTreeMap;

use crate::convert::{Object, convert_document_all};
use crate::error::{Error, ErrorKind, Errors, ObjectRef, Origin};
use crate::suggest::closest;

mod documents;
mod locate;
pub use documents::split_documents;
use documents::*;
use locate::*;

/// An object with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Source, document index and position.
    pub origin: Origin,
    /// The object.
    pub object: Object,
    /// The document it was read from (the item, for a `List`), when the
    /// caller asked to keep it ([`parse_source_keeping_documents`]): what a
    /// datastore stores and prints back.
    pub document: Option<serde_json::Value>,
}

/// A document of a kind Palisade does not act on, left out of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it is.
    pub origin: Origin,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `kind`.
    pub kind: String,
    /// `namespace/name`, or `name`.
    pub name: String,
    /// The document, when the caller asked to keep documents: a datastore
    /// stores kinds other layers read (IP pools for IPAM).
    pub document: Option<serde_json::Value>,
}

/// What one source holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    /// The objects Palisade acts on, in document order.
    pub objects: Vec<Loaded>,
    /// The documents it left out, in document order.
    pub skipped: Vec<Skipped>,
}

/// One document of a source, parsed to JSON, with where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Source, index and the line/column of its first token.
    pub origin: Origin,
    /// The document.
    pub value: serde_json::Value,
    /// Its section of the source text (empty for JSON), and the line where
    /// that section begins: to find the line of a field.
    span: std::ops::Range<usize>,
    first_line: usize,
    /// For JSON: byte offset in the source where the value starts.
    json_start: Option<usize>,
}

/// Where a document's text is, to find its fields in.
#[derive(Clone, Copy)]
enum Section<'t> {
    /// A YAML section and the line it begins on.
    Yaml(&'t str, usize),
    /// The whole JSON source and where the value starts.
    Json(&'t str, usize),
}

/// The kinds Palisade acts on (any other kind is skipped).
pub const ACTED_ON_KINDS: [&str; 18] = [
    "NetworkPolicy",
    "GlobalNetworkPolicy",
    "StagedNetworkPolicy",
    "StagedGlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
    "Tier",
    "NetworkSet",
    "GlobalNetworkSet",
    "WorkloadEndpoint",
    "Profile",
    "Namespace",
    "Pod",
    "ServiceAccount",
    "EndpointSlice",
    "AdminNetworkPolicy",
    "BaselineAdminNetworkPolicy",
    "ClusterNetworkPolicy",
    "List",
];

/// Prefixes an error's field path (`items[3]` + `spec.x`).
fn prefix_field(e: Error, prefix: &str) -> Error {
    let field = match &e.field {
        Some(f) if f.starts_with('[') => format!("{prefix}{f}"),
        Some(f) => format!("{prefix}.{f}"),
        None => prefix.to_string(),
    };
    e.with_field(Some(field))
}

fn str_field<'v>(v: &'v serde_json::Value, key: &str) -> &'v str {
    v.get(key).and_then(|k| k.as_str()).unwrap_or("")
}

/// Whether a document is of a kind Palisade acts on; `Err` for documents
/// that are not Kubernetes objects at all and for kinds that look like a
/// misspelt one of Palisade's.
fn acted_on(doc: &serde_json::Value) -> Result<bool, Error> {
    let kind = str_field(doc, "kind");
    let api = str_field(doc, "apiVersion");
    let list = kind.ends_with("List") && doc.get("items").is_some();
    if ACTED_ON_KINDS.contains(&kind) || list || kind.is_empty() || api.is_empty() {
        // Conversion reports a missing kind or apiVersion.
        return Ok(true);
    }
    // A Kubernetes Node: the addresses admin policies' node peers select.
    // Calico's Node (projectcalico.org/v3) is IPAM's and skipped.
    if kind == "Node" && api == "v1" {
        return Ok(true);
    }
    if let Some(near) = closest(kind, ACTED_ON_KINDS) {
        return Err(Error::invalid(
            "kind",
            format!("unknown kind {kind:?} (apiVersion {api:?}); did you mean {near}?"),
        ));
    }
    Ok(false)
}

fn skipped(doc: &serde_json::Value, origin: &Origin, keep_document: bool) -> Skipped {
    let meta = doc.get("metadata");
    let name = meta.map_or("", |m| str_field(m, "name"));
    let name = match meta.map(|m| str_field(m, "namespace")) {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    };
    Skipped {
        origin: origin.clone(),
        api_version: str_field(doc, "apiVersion").to_string(),
        kind: str_field(doc, "kind").to_string(),
        name,
        document: keep_document.then(|| doc.clone()),
    }
}

fn object_ref_of(doc: &serde_json::Value) -> ObjectRef {
    let meta = doc.get("metadata");
    let kind = str_field(doc, "kind");
    let ns = meta
        .map(|m| str_field(m, "namespace"))
        .filter(|n| !n.is_empty());
    let name = meta.map_or("", |m| str_field(m, "name"));
    ObjectRef::new(
        if kind.is_empty() { "<no kind>" } else { kind },
        ns,
        if name.is_empty() { "<unnamed>" } else { name },
    )
}

/// Converts one document (or the items of a `List`) and files the result.
fn convert_into(
    doc: &serde_json::Value,
    origin: &Origin,
    section: Section<'_>,
    item: Option<usize>,
    parsed: &mut Parsed,
    errors: &mut Errors,
    keep_documents: bool,
) {
    // Where a field is, when it can be found in the text.
    let origin_of = |field: Option<&str>| {
        let mut at = origin.clone();
        let found = field.and_then(|f| match section {
            Section::Yaml(text, first_line) => {
                locate(text, f).map(|(line, column)| (first_line + line, column))
            }
            Section::Json(text, start) => locate_json(text.get(start..)?, f).map(|offset| {
                let before = &text[..start + offset];
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                (
                    before.matches('\n').count() + 1,
                    before[line_start..].chars().count() + 1,
                )
            }),
        });
        if let Some((line, column)) = found {
            at.line = line;
            at.column = column;
        }
        at
    };
    let place = |e: Error| {
        let e = match item {
            Some(j) => prefix_field(e, &format!("items[{j}]")),
            None => e,
        };
        let at = origin_of(e.field.as_deref());
        e.from_origin(at)
    };
    if !doc.is_object() {
        errors.push(place(Error::new(ErrorKind::Invalid(
            format!(
                "a manifest document must be an object, found {}",
                json_type(doc)
            )
            .into(),
        ))));
        return;
    }
    match acted_on(doc) {
        Ok(true) => {}
        Ok(false) => {
            let at = origin_of(item.map(|j| format!("items[{j}]")).as_deref());
            parsed.skipped.push(skipped(doc, &at, keep_documents));
            return;
        }
        Err(e) => {
            errors.push(place(e.on(object_ref_of(doc))));
            return;
        }
    }
    let kind = str_field(doc, "kind");
    if item.is_none() && (kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()))
    {
        let Some(items) = doc.get("items").and_then(|i| i.as_array()) else {
            if doc.get("items").is_some_and(|i| !i.is_null()) {
                errors.push(place(Error::invalid("items", "items must be a list")));
            }
            return;
        };
        for (j, it) in items.iter().enumerate() {
            convert_into(it, origin, section, Some(j), parsed, errors, keep_documents);
        }
        return;
    }
    match convert_document_all(doc) {
        Ok(object) => parsed.objects.push(Loaded {
            origin: origin.clone(),
            object,
            document: keep_documents.then(|| doc.clone()),
        }),
        Err(es) => {
            for e in es {
                errors.push(place(e));
            }
        }
    }
}

/// Parses every object of a text, checking every document: all errors are
/// returned at once, in document order. Documents of kind `List` (or
/// `*List`) are expanded into their items; kinds Palisade does not act on are
/// listed in [`Parsed::skipped`].
pub fn parse_source(source: &str, text: &str) -> Result<Parsed, Errors> {
    parse_source_with(source, text, false)
}

/// [`parse_source`], keeping each object's document in [`Loaded::document`]
/// (for datastores, which store what was applied).
pub fn parse_source_keeping_documents(source: &str, text: &str) -> Result<Parsed, Errors> {
    parse_source_with(source, text, true)
}

fn parse_source_with(source: &str, text: &str, keep_documents: bool) -> Result<Parsed, Errors> {
    let (docs, syntax) = split_all(source, text);
    let mut parsed = Parsed::default();
    let mut all: Vec<(usize, Error)> = Vec::new();
    for d in &docs {
        let mut es = Errors::new();
        let section = match d.json_start {
            Some(start) => Section::Json(text, start),
            None => Section::Yaml(text.get(d.span.clone()).unwrap_or(""), d.first_line),
        };
        convert_into(
            &d.value,
            &d.origin,
            section,
            None,
            &mut parsed,
            &mut es,
            keep_documents,
        );
        all.extend(es.into_iter().map(|e| (d.origin.document, e)));
    }
    // Syntax and conversion errors, merged in document order (stable).
    all.extend(
        syntax
            .into_iter()
            .map(|e| (e.origin.as_ref().map_or(0, |o| o.document), e)),
    );
    all.sort_by_key(|(n, _)| *n);
    all.into_iter()
        .map(|(_, e)| e)
        .collect::<Errors>()
        .or_ok(parsed)
}

/// Parses every object in a text, for embedders that want one error: the
/// first of [`parse_source`]'s. Kinds Palisade does not act on are left out.
pub fn parse_manifests(source: &str, text: &str) -> Result<Vec<Loaded>, Error> {
    parse_source(source, text)
        .map(|p| p.objects)
        .map_err(first_error)
}

fn first_error(e: Errors) -> Error {
    e.into_iter()
        .next()
        .unwrap_or_else(|| Error::new(ErrorKind::Invalid("rejected".into())))
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A set of loaded objects with duplicate detection across sources.
#[derive(Debug, Default, Clone)]
pub struct ManifestSet {
    objects: Vec<Loaded>,
    skipped: Vec<Skipped>,
    seen: BTreeMap<ObjectRef, Origin>,
}

impl ManifestSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the objects of one source; on error nothing from it is added and
    /// every error of the source is returned, in document order.
    pub fn add_source(&mut self, source: &str, text: &str) -> Result<usize, Errors> {
        let parsed = parse_source(source, text)?;
        let errors = self.duplicates(&parsed.objects);
        if !errors.is_empty() {
            return Err(errors);
        }
        self.skipped.extend(parsed.skipped);
        Ok(self.insert(parsed.objects))
    }

    /// Adds objects; a duplicate (same kind, namespace, name) is an error
    /// naming both places, and nothing from `loaded` is added.
    pub fn add_all(&mut self, loaded: Vec<Loaded>) -> Result<usize, Error> {
        let errors = self.duplicates(&loaded);
        if !errors.is_empty() {
            return Err(first_error(errors));
        }
        Ok(self.insert(loaded))
    }

    fn duplicates(&self, loaded: &[Loaded]) -> Errors {
        let mut batch: BTreeMap<ObjectRef, &Origin> = BTreeMap::new();
        let mut errors = Errors::new();
        for l in loaded {
            let r = l.object.object_ref();
            if let Some(first) = self.seen.get(&r).or_else(|| batch.get(&r).copied()) {
                errors.push(
                    Error::new(ErrorKind::Duplicate(r.clone(), format!(" at {first}")))
                        .on(r)
                        .from_origin(l.origin.clone()),
                );
            } else {
                batch.insert(r, &l.origin);
            }
        }
        errors
    }

    fn insert(&mut self, loaded: Vec<Loaded>) -> usize {
        for l in &loaded {
            self.seen.insert(l.object.object_ref(), l.origin.clone());
        }
        let n = loaded.len();
        self.objects.extend(loaded);
        n
    }

    /// The objects, in load order.
    pub fn objects(&self) -> &[Loaded] {
        &self.objects
    }

    /// The documents left out because Palisade does not act on their kind,
    /// in load order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Consumes the set.
    pub fn into_objects(self) -> Vec<Loaded> {
        self.objects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_yaml_with_origin() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: b\n---\n";
        let objs = parse_manifests("ns.yaml", text).unwrap();
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].origin.document, 2);
    }

    #[test]
    fn fields_are_found_in_block_yaml() {
        let text = "# c\nspec:\n  ingress:\n  - from:\n    - podSelector: {}\n    ports:\n    - port: 80\n  - from:\n    -   podSelecter:\n          x: y\n  egress: []\n";
        assert_eq!(locate(text, "spec"), Some((1, 1)));
        assert_eq!(locate(text, "spec.ingress[0].ports[0].port"), Some((6, 7)));
        assert_eq!(
            locate(text, "spec.ingress[1].from[0].podSelecter"),
            Some((8, 9))
        );
        assert_eq!(locate(text, "spec.egress"), Some((10, 3)));
        // Flow values: the key when it is written once on the line.
        let flow = "metadata: {name: a, \"lables\": {x: y}}\nspec: {a: {b: 1}, c: {b: 2}}\n";
        assert_eq!(locate(flow, "metadata.lables"), Some((0, 21)));
        assert_eq!(locate(flow, "spec.a.b"), Some((1, 1)));
        assert_eq!(locate(flow, "spec.c"), Some((1, 19)));
        // Not found: the deepest step that was.
        assert_eq!(locate(text, "spec.ingress[5].from"), Some((2, 3)));
        assert_eq!(locate(text, "nothing"), None);
        assert_eq!(locate("", "spec"), None);
        assert_eq!(
            steps("a.b[2][x].c"),
            [
                Step::Key("a"),
                Step::Key("b"),
                Step::Index(2),
                Step::Key("x"),
                Step::Key("c")
            ]
        );
    }

    #[test]
    fn json_fields_are_found() {
        let t = r#"{"a": {"x": "}\"", "b": [1, {"c": 2}, [3]]}, "d": 4}"#;
        assert_eq!(locate_json(t, "a"), Some(1));
        assert_eq!(locate_json(t, "d"), Some(45));
        assert_eq!(locate_json(t, "a.b[1].c"), Some(29));
        assert_eq!(locate_json(t, "a.b[2]"), Some(38));
        assert_eq!(locate_json(t, "a.b[7]"), Some(19));
        assert_eq!(locate_json(t, "zz"), None);
        assert_eq!(locate_json("", "a"), None);
        assert_eq!(locate_json("[1,", "[5]"), None);
    }

    #[test]
    fn json_items_have_their_offsets() {
        let a = r#"[ {"a": "x,]\"[{"}, [1, 2],
  "s" ]"#;
        assert_eq!(json_item_starts(a), [2, 20, 30]);
        assert_eq!(json_item_starts("[]"), Vec::<usize>::new());
        assert_eq!(json_item_starts("[ ]"), Vec::<usize>::new());
    }

    #[test]
    fn sections_keep_their_lines() {
        let text = "%YAML 1.2\n---\na: 1\n--- # two\n\n  b: 2\n...\nc: 3\n";
        let chunks: Vec<_> = yaml_chunks(text)
            .into_iter()
            .map(|c| (c.line, c.start))
            .collect();
        assert_eq!(chunks, [(1, (3, 1)), (4, (6, 3)), (8, (8, 1))]);
        assert_eq!(
            shift_lines("x at line 2 column 3, y at line 10 column 1", 5),
            "x at line 7 column 3, y at line 15 column 1"
        );
    }

    #[test]
    fn malformed_yaml() {
        let e = parse_manifests("bad.yaml", "kind: [unclosed\n").unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Syntax { .. }), "{e}");
        assert_eq!(e.origin.as_ref().unwrap().source, "bad.yaml");
    }

    #[test]
    fn kubernetes_nodes_are_read_and_calico_nodes_skipped() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {zone: a}}\n\
                    status: {addresses: [{type: InternalIP, address: 192.168.0.7}]}\n---\n\
                    apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n1}\n";
        let parsed = parse_source("nodes.yaml", text).unwrap();
        assert_eq!(parsed.objects.len(), 1);
        let Object::Node(n) = &parsed.objects[0].object else {
            panic!("{:?}", parsed.objects[0].object);
        };
        assert_eq!(n.ips, ["192.168.0.7".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(parsed.skipped.len(), 1, "the Calico Node is IPAM's");
    }

    #[test]
    fn duplicates_across_sources() {
        let mut set = ManifestSet::new();
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n";
        set.add_source("one.yaml", ns).unwrap();
        let e = set.add_source("two.yaml", ns).unwrap_err();
        let e = e.first().unwrap();
        assert!(matches!(e.kind, ErrorKind::Duplicate(..)), "{e}");
        assert!(e.to_string().contains("one.yaml"), "{e}");
        assert_eq!(set.objects().len(), 1);
    }

    mod never_panics {
        use super::super::*;
        use proptest::prelude::*;

        /// Lines built from YAML's structural pieces, so the splitter and
        /// the field locator meet markers, dashes, quotes and odd indents.
        fn yamlish() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                "---",
                "...",
                "- ",
                "-",
                "  ",
                " ",
                "\t",
                "\r",
                "#",
                "%YAML 1.2",
                "a:",
                "b: 1",
                "\"a\":",
                "'b': x",
                "{",
                "}",
                "[",
                "]",
                ":",
                "spec:",
                "ingress:",
                "kind: Pod",
                "apiVersion: v1",
                "metadata:",
                "name: x",
                "é",
                "\u{1F600}",
            ]);
            prop::collection::vec(prop::collection::vec(piece, 0..6), 0..12).prop_map(|lines| {
                lines
                    .into_iter()
                    .map(|l| l.concat())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]
            #[test]
            fn parse_and_locate_never_panic(
                text in yamlish(),
                path in "[a-z.\\[\\]0-9]{0,20}",
            ) {
                let _ = parse_source("p.yaml", &text);
                let _ = locate(&text, &path);
                let _ = locate(&text, "spec.ingress[0].a");
                let _ = locate_json(&text, &path);
                let _ = shift_lines(&text, usize::MAX);
            }
        }
    }
}
