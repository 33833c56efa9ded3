//! Where a field is in a manifest's text: a field path (`spec.ingress[0]`)
//! to the line and column of its key, in YAML or JSON, so errors point at it.

use super::*;

/// A step of a field path: `spec`, `[0]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

pub(super) fn steps(path: &str) -> Vec<Step<'_>> {
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
pub(super) fn token_columns(line: &str) -> Vec<usize> {
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
pub(super) fn is_key(rest: &str, key: &str) -> bool {
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

pub(super) fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

pub(super) fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#') && !is_marker(line, "---")
}

/// Where a field of a block-style YAML document is written: 0-based line in
/// `text` and 1-based column, of the deepest step of `path` that could be
/// found. Flow style (`{a: 1}`) and anything unusual end the search early,
/// at the enclosing field, so the answer is never past the field.
pub(super) fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
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
pub(super) fn locate_json(text: &str, path: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    // Skips one value starting at `i` (after whitespace).
    pub(super) fn skip(b: &[u8], i: &mut usize) -> Option<()> {
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
