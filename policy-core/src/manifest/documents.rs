//! Splitting a source into documents: YAML sections, JSON values and arrays,
//! with the line each starts on.

use super::*;

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
pub(super) fn split_all(source: &str, text: &str) -> (Vec<Document>, Errors) {
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

pub(super) fn split_json(source: &str, text: &str) -> (Vec<Document>, Option<Error>) {
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
pub(super) fn json_item_starts(array: &str) -> Vec<usize> {
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
pub(super) struct LineIndex(Vec<usize>);

impl LineIndex {
    pub(super) fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(super) fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&s| s <= offset).max(1);
        (line, offset - self.0[line - 1] + 1)
    }
}

/// One `---` section of a YAML text.
pub(super) struct Chunk<'t> {
    pub(super) text: &'t str,
    /// Byte offset of `text` in the source.
    pub(super) begin: usize,
    /// 1-based line where the section's text begins.
    pub(super) line: usize,
    /// 1-based line and column of its first token (the document's start).
    pub(super) start: (usize, usize),
}

/// Whether a line is a YAML document marker (`---` or `...` at column 0).
/// The YAML spec forbids such lines inside any scalar, so they always split.
pub(super) fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
}

/// Splits YAML text at its document markers, keeping line numbers. A section
/// holding only directives (`%YAML`) goes with the document after it.
pub(super) fn yaml_chunks(text: &str) -> Vec<Chunk<'_>> {
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
pub(super) fn first_token(text: &str, first_line: usize) -> (usize, usize) {
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
pub(super) fn shift_lines(message: &str, by: usize) -> String {
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
