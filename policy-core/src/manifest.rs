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

/// An object with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Source, document index and position.
    pub origin: Origin,
    /// The object.
    pub object: Object,
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
pub const ACTED_ON_KINDS: [&str; 13] = [
    "NetworkPolicy",
    "GlobalNetworkPolicy",
    "StagedNetworkPolicy",
    "StagedGlobalNetworkPolicy",
    "StagedKubernetesNetworkPolicy",
    "Tier",
    "NetworkSet",
    "GlobalNetworkSet",
    "Profile",
    "Namespace",
    "Pod",
    "ServiceAccount",
    "List",
];

/// Splits a text into documents. JSON input (starting with `{` or `[`) is
/// parsed as JSON, a top-level array giving one document per item; anything
/// else as YAML, one document per `---` section. Empty documents are left
/// out. Every malformed YAML document is reported (YAML documents are
/// independent, so the others are still read); JSON stops at its first error.
pub fn split_documents(source: &str, text: &str) -> Result<Vec<Document>, Errors> {
    let (docs, errors) = split_all(source, text);
    errors.or_ok(docs)
}

/// The documents that parse, and the errors of those that do not.
fn split_all(source: &str, text: &str) -> (Vec<Document>, Errors) {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let (docs, error) = split_json(source, text);
        return (docs, error.into_iter().collect());
    }
    let mut out = Vec::new();
    let mut errors = Errors::new();
    for chunk in yaml_chunks(text) {
        for doc in serde_norway::Deserializer::from_str(chunk.text) {
            let document = out.len() + errors.len() + 1;
            let origin = |(line, column)| Origin {
                source: source.to_string(),
                document,
                line,
                column,
            };
            match <serde_json::Value as serde::Deserialize>::deserialize(doc) {
                // Empty documents (a trailing `---`) are not objects.
                Ok(serde_json::Value::Null) => {}
                Ok(value) => out.push(Document {
                    origin: origin(chunk.start),
                    value,
                    span: chunk.begin..chunk.begin + chunk.text.len(),
                    first_line: chunk.line,
                    json_start: None,
                }),
                Err(e) => {
                    let at = e
                        .location()
                        .map_or((chunk.line, 1), |l| (chunk.line + l.line() - 1, l.column()));
                    errors.push(
                        Error::new(ErrorKind::Syntax {
                            format: "YAML",
                            message: shift_lines(&e.to_string(), chunk.line - 1),
                        })
                        .from_origin(origin(at)),
                    );
                    // The parser cannot go on in this section.
                    break;
                }
            }
        }
    }
    (out, errors)
}

fn split_json(source: &str, text: &str) -> (Vec<Document>, Option<Error>) {
    let mut out = Vec::new();
    let lines = LineIndex::new(text);
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    loop {
        let start = stream.byte_offset();
        let start = start + text[start..].len() - text[start..].trim_start().len();
        let Some(v) = stream.next() else { break };
        let document = out.len() + 1;
        let (line, column) = lines.position(start);
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                let message = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                let error = Error::new(ErrorKind::Syntax {
                    format: "JSON",
                    message: message
                        .strip_suffix(&suffix)
                        .unwrap_or(&message)
                        .to_string(),
                })
                .from_origin(Origin {
                    source: source.to_string(),
                    document,
                    line: e.line(),
                    column: e.column(),
                });
                return (out, Some(error));
            }
        };
        let origin = |document| Origin {
            source: source.to_string(),
            document,
            line,
            column,
        };
        match v {
            serde_json::Value::Array(items) => {
                let starts = json_item_starts(&text[start..stream.byte_offset()]);
                for (i, value) in items.into_iter().enumerate() {
                    let at = starts.get(i).map_or(start, |&o| start + o);
                    let (line, column) = lines.position(at);
                    out.push(Document {
                        origin: Origin {
                            source: source.to_string(),
                            document: out.len() + 1,
                            line,
                            column,
                        },
                        value,
                        span: 0..0,
                        first_line: line,
                        json_start: Some(at),
                    });
                }
            }
            value => out.push(Document {
                origin: origin(document),
                value,
                span: 0..0,
                first_line: line,
                json_start: Some(start),
            }),
        }
    }
    (out, None)
}

/// Byte offsets of the items of a JSON array (the text of a whole array
/// that parsed), found by tracking strings and nesting.
fn json_item_starts(array: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut expect_item = false;
    for (i, b) in array.bytes().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if expect_item && !b.is_ascii_whitespace() {
            expect_item = false;
            if b != b']' {
                starts.push(i);
            }
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_item = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_item = true,
            _ => {}
        }
    }
    starts
}

/// Byte offsets of line starts, to turn an offset into a line and column.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts)
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.0[line - 1] + 1)
    }
}

/// One `---` section of a YAML text.
struct Chunk<'t> {
    text: &'t str,
    /// Byte offset of `text` in the source.
    begin: usize,
    /// 1-based line where the section's text begins.
    line: usize,
    /// 1-based line and column of its first token (the document's start).
    start: (usize, usize),
}

/// Whether a line is a YAML document marker (`---` or `...` at column 0).
/// The YAML spec forbids such lines inside any scalar, so they always split.
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

/// Splits YAML text at its document markers, keeping line numbers. A section
/// holding only directives (`%YAML`) goes with the document after it.
fn yaml_chunks(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut begin = 0; // byte offset where the current section begins
    let mut begin_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let content = line.trim_end_matches(['\n', '\r']);
        if is_marker(content, "---") && offset > begin {
            let directives_only = text[begin..offset].lines().all(|l| {
                let t = l.trim();
                t.is_empty() || t.starts_with('#') || l.starts_with('%')
            }) && text[begin..offset].lines().any(|l| l.starts_with('%'));
            if !directives_only {
                chunks.push((begin, offset, begin_line));
                begin = offset;
                begin_line = i + 1;
            }
        }
        offset += line.len();
        if is_marker(content, "...") {
            chunks.push((begin, offset, begin_line));
            begin = offset;
            begin_line = i + 2;
        }
    }
    if offset > begin {
        chunks.push((begin, offset, begin_line));
    }
    chunks
        .into_iter()
        .map(|(b, e, line)| {
            let text = &text[b..e];
            Chunk {
                text,
                begin: b,
                line,
                start: first_token(text, line),
            }
        })
        .collect()
}

/// Line and column of the first token of a section that is not a comment, a
/// directive or the `---` marker itself.
fn first_token(text: &str, first_line: usize) -> (usize, usize) {
    for (i, line) in text.lines().enumerate() {
        let mut rest = line;
        let mut col = 1;
        if is_marker(line, "---") {
            rest = &line[3..];
            col = 4;
        } else if line.starts_with('%') {
            continue;
        }
        let trimmed = rest.trim_start();
        col += rest.len() - trimmed.len();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            return (first_line + i, col);
        }
    }
    (first_line, 1)
}

/// Adds `by` to every `line N` in a parser message, whose lines count from
/// the start of the document's section rather than of the file.
fn shift_lines(message: &str, by: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) if digits > 0 => out.push_str(&n.saturating_add(by).to_string()),
            _ => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

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
    if let Some(near) = closest(kind, ACTED_ON_KINDS) {
        return Err(Error::invalid(
            "kind",
            format!("unknown kind {kind:?} (apiVersion {api:?}); did you mean {near}?"),
        ));
    }
    Ok(false)
}

fn skipped(doc: &serde_json::Value, origin: &Origin) -> Skipped {
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
        errors.push(place(Error::new(ErrorKind::Invalid(format!(
            "a manifest document must be an object, found {}",
            json_type(doc)
        )))));
        return;
    }
    match acted_on(doc) {
        Ok(true) => {}
        Ok(false) => {
            let at = origin_of(item.map(|j| format!("items[{j}]")).as_deref());
            parsed.skipped.push(skipped(doc, &at));
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
            convert_into(it, origin, section, Some(j), parsed, errors);
        }
        return;
    }
    match convert_document_all(doc) {
        Ok(object) => parsed.objects.push(Loaded {
            origin: origin.clone(),
            object,
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
    let (docs, syntax) = split_all(source, text);
    let mut parsed = Parsed::default();
    let mut all: Vec<(usize, Error)> = Vec::new();
    for d in &docs {
        let mut es = Errors::new();
        let section = match d.json_start {
            Some(start) => Section::Json(text, start),
            None => Section::Yaml(text.get(d.span.clone()).unwrap_or(""), d.first_line),
        };
        convert_into(&d.value, &d.origin, section, None, &mut parsed, &mut es);
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

/// A step of a field path: `spec`, `[0]`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Step::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').unwrap_or(inner.len());
            out.push(match inner[..end].parse() {
                Ok(i) => Step::Index(i),
                Err(_) => Step::Key(&inner[..end]),
            });
            rest = inner.get(end + 1..).unwrap_or("");
        }
    }
    out
}

/// Columns (0-based) where the tokens of a block YAML line start: its
/// indentation, then after each `- ` sequence entry marker.
fn token_columns(line: &str) -> Vec<usize> {
    let mut cols = Vec::new();
    let mut col = line.len() - line.trim_start_matches(' ').len();
    loop {
        cols.push(col);
        let rest = &line[col..];
        if rest == "-" || rest.starts_with("- ") {
            let after = &rest[1..];
            col += 1 + after.len() - after.trim_start_matches(' ').len();
            if col >= line.len() {
                break;
            }
        } else {
            break;
        }
    }
    cols
}

/// Whether `rest` starts with the mapping key `key` (plain or quoted).
fn is_key(rest: &str, key: &str) -> bool {
    let after = [
        rest.strip_prefix(key),
        rest.strip_prefix('"')
            .and_then(|r| r.strip_prefix(key))
            .and_then(|r| r.strip_prefix('"')),
        rest.strip_prefix('\'')
            .and_then(|r| r.strip_prefix(key))
            .and_then(|r| r.strip_prefix('\'')),
    ];
    after.into_iter().flatten().any(|a| {
        let a = a.trim_start_matches(' ');
        a == ":" || a.starts_with(": ") || a.starts_with(":\t")
    })
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#') && !is_marker(line, "---")
}

/// Where a field of a block-style YAML document is written: 0-based line in
/// `text` and 1-based column, of the deepest step of `path` that could be
/// found. Flow style (`{a: 1}`) and anything unusual end the search early,
/// at the enclosing field, so the answer is never past the field.
fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    // The current node: lines [start, end), entries at column `col`.
    let mut start = lines.iter().position(|l| is_content(l))?;
    let mut end = lines.len();
    let mut col = token_columns(lines[start]).last().copied()?;
    let mut found = None;
    let steps = steps(path);
    for (depth, &step) in steps.iter().enumerate() {
        let hit = (start..end).find(|&i| {
            let line = lines[i];
            is_content(line)
                && token_columns(line).contains(&col)
                && matches!(step, Step::Key(k) if is_key(&line[col..], k))
        });
        match step {
            Step::Key(_) => {
                let Some(line) = hit else { return found };
                found = Some((line, col + 1));
                // The value: on the same line (not block style), or the lines
                // below that are indented more, or a sequence at this column.
                let value_inline = {
                    let rest = lines[line][col..].split_once(':').map_or("", |(_, v)| v);
                    let v = rest.trim();
                    !v.is_empty() && !v.starts_with('#')
                };
                if value_inline {
                    // A flow value (`metadata: {name: a, lables: {}}`): the
                    // field's key, if it is written once on this line.
                    if let (true, Some(Step::Key(last))) = (depth + 1 < steps.len(), steps.last()) {
                        let text = lines[line];
                        let hits: Vec<usize> = text
                            .match_indices(last)
                            .map(|(i, _)| i)
                            .filter(|&i| i > col)
                            .map(|i| match text.as_bytes()[i - 1] {
                                b'"' | b'\'' => i - 1,
                                _ => i,
                            })
                            .filter(|&i| {
                                i > 0
                                    && matches!(
                                        text.as_bytes()[i - 1],
                                        b'{' | b',' | b' ' | b'\t' | b'['
                                    )
                                    && is_key(&text[i..], last)
                            })
                            .collect();
                        if let [at] = hits[..] {
                            return Some((line, at + 1));
                        }
                    }
                    return found;
                }
                let key_col = col;
                start = line + 1;
                end = (start..end)
                    .find(|&i| {
                        let l = lines[i];
                        is_content(l)
                            && (indent_of(l) < key_col
                                || (indent_of(l) == key_col && !l[key_col..].starts_with('-')))
                    })
                    .unwrap_or(end);
                let Some(first) = (start..end).find(|&i| is_content(lines[i])) else {
                    return found;
                };
                start = first;
                col = indent_of(lines[first]);
            }
            Step::Index(n) => {
                let items: Vec<usize> = (start..end)
                    .filter(|&i| {
                        let l = lines[i];
                        is_content(l)
                            && token_columns(l).contains(&col)
                            && (l[col..] == *"-" || l[col..].starts_with("- "))
                    })
                    .collect();
                let Some(&item) = items.get(n) else {
                    return found;
                };
                found = Some((item, col + 1));
                end = items.get(n + 1).copied().unwrap_or(end);
                start = item;
                let cols = token_columns(lines[item]);
                match cols
                    .iter()
                    .position(|&c| c == col)
                    .and_then(|p| cols.get(p + 1))
                {
                    Some(&c) => col = c,
                    None => {
                        let Some(first) = (item + 1..end).find(|&i| is_content(lines[i])) else {
                            return found;
                        };
                        start = first;
                        col = indent_of(lines[first]);
                    }
                }
            }
        }
    }
    found
}

/// Where a field of a JSON value (that parsed) is written: the byte offset
/// in `text` of its key, or of the element for an index, for the deepest
/// step of `path` that could be found.
fn locate_json(text: &str, path: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Skips one value starting at `i` (after whitespace).
    fn skip(b: &[u8], i: &mut usize) -> Option<()> {
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        while *i < b.len() {
            let c = b[*i];
            *i += 1;
            if in_string {
                match c {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => {
                        in_string = false;
                        if depth == 0 {
                            return Some(());
                        }
                    }
                    _ => {}
                }
                continue;
            }
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(());
                    }
                }
                b',' | b':' if depth == 0 => {
                    *i -= 1;
                    return Some(());
                }
                c if depth == 0 && c.is_ascii_whitespace() => return Some(()),
                _ => {}
            }
        }
        Some(())
    }
    let mut found = None;
    for step in steps(path) {
        ws(&mut i);
        match step {
            Step::Key(k) => {
                if b.get(i) != Some(&b'{') {
                    return found;
                }
                i += 1;
                loop {
                    ws(&mut i);
                    if b.get(i) != Some(&b'"') {
                        return found;
                    }
                    let key_at = i;
                    skip(b, &mut i)?;
                    let key = text.get(key_at + 1..i.saturating_sub(1))?;
                    ws(&mut i);
                    if b.get(i) != Some(&b':') {
                        return found;
                    }
                    i += 1;
                    if key == k {
                        found = Some(key_at);
                        break;
                    }
                    ws(&mut i);
                    skip(b, &mut i)?;
                    ws(&mut i);
                    if b.get(i) != Some(&b',') {
                        return found;
                    }
                    i += 1;
                }
            }
            Step::Index(n) => {
                if b.get(i) != Some(&b'[') {
                    return found;
                }
                i += 1;
                for _ in 0..n {
                    ws(&mut i);
                    skip(b, &mut i)?;
                    ws(&mut i);
                    if b.get(i) != Some(&b',') {
                        return found;
                    }
                    i += 1;
                }
                ws(&mut i);
                found = Some(i);
            }
        }
    }
    found
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
