//! The namespace-by-namespace summary of `palisade matrix`: counts per
//! (client namespace, server namespace) pair and the decision behind most
//! of each pair's denials, for sets too large to draw cell by cell.

use std::collections::HashMap;
use std::io::Write;

use anyhow::Result;
use policy_core::compile::Leaf;
use policy_core::flow::Verdict;
use policy_core::matrix::Cell;
use policy_core::{Direction, EndpointKey};

use super::{MatrixFormat, Names, Source, esc};

/// Counts for one (client namespace, server namespace) pair.
#[derive(Default, Clone)]
pub(super) struct PairCount {
    allowed: u64,
    denied: u64,
    no_connection: u64,
    /// Denials by the deciding (direction, leaf).
    deniers: HashMap<(Direction, Leaf), u64>,
}

/// The summary: namespaces on each side and counts per pair.
pub(super) struct Summary {
    row_ns: Vec<usize>,
    col_ns: Vec<usize>,
    from_names: Vec<String>,
    to_names: Vec<String>,
    counts: Vec<PairCount>,
}

impl Summary {
    pub(super) fn new(from: &[EndpointKey], to: &[EndpointKey]) -> Self {
        fn index(keys: &[EndpointKey]) -> (Vec<usize>, Vec<String>) {
            let mut names: Vec<String> = keys.iter().map(|k| k.namespace.clone()).collect();
            names.sort();
            names.dedup();
            let at: HashMap<&str, usize> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i))
                .collect();
            (
                keys.iter().map(|k| at[k.namespace.as_str()]).collect(),
                names,
            )
        }
        let (row_ns, from_names) = index(from);
        let (col_ns, to_names) = index(to);
        let counts = vec![PairCount::default(); from_names.len() * to_names.len()];
        Summary {
            row_ns,
            col_ns,
            from_names,
            to_names,
            counts,
        }
    }

    pub(super) fn add_row(&mut self, i: usize, cells: &[Option<Cell>]) {
        let width = self.to_names.len();
        for (j, c) in cells.iter().enumerate() {
            let p = &mut self.counts[self.row_ns[i] * width + self.col_ns[j]];
            match c {
                None => p.no_connection += 1,
                Some(c) if c.allowed => p.allowed += 1,
                Some(c) => {
                    p.denied += 1;
                    if let Some(d) = denier(c) {
                        *p.deniers.entry(d).or_insert(0) += 1;
                    }
                }
            }
        }
    }

    pub(super) fn pairs(&self) -> impl Iterator<Item = (&str, &str, &PairCount)> {
        let width = self.to_names.len();
        self.counts.iter().enumerate().map(move |(k, p)| {
            (
                self.from_names[k / width].as_str(),
                self.to_names[k % width].as_str(),
                p,
            )
        })
    }
}

/// The decision that denied a cell: the client's egress first.
fn denier(c: &Cell) -> Option<(Direction, Leaf)> {
    match (c.egress, c.ingress) {
        (Some(e), _) if e.verdict == Verdict::Deny => Some((Direction::Egress, e)),
        (_, Some(i)) if i.verdict == Verdict::Deny => Some((Direction::Ingress, i)),
        _ => None,
    }
}

fn top_denier(p: &PairCount) -> Option<(Direction, Leaf, u64)> {
    p.deniers
        .iter()
        .map(|((d, l), n)| (*d, *l, *n))
        // Most denials first; ties broken by a stable key.
        .max_by_key(|(d, l, n)| (*n, std::cmp::Reverse((*d == Direction::Ingress, l.rule))))
}

pub(super) fn write_summary(
    out: &mut impl Write,
    format: MatrixFormat,
    s: &Summary,
    source: &Source,
    names: &mut Names,
    what: &str,
    engine_name: &str,
) -> Result<()> {
    let denial = |names: &mut Names, p: &PairCount| -> Option<(String, u64)> {
        top_denier(p).map(|(d, l, n)| (format!("{d} {}", names.get(source, l).0), n))
    };
    match format {
        MatrixFormat::Json => {
            for (a, b, p) in s.pairs() {
                let top = top_denier(p).map(|(d, l, n)| {
                    serde_json::json!({"direction": d.to_string(), "count": n,
                        "decision": serde_json::from_str::<serde_json::Value>(&names.get(source, l).1).unwrap_or_default()})
                });
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"fromNamespace": a, "toNamespace": b, "allowed": p.allowed,
                        "denied": p.denied, "noConnection": p.no_connection, "mostDenialsBy": top})
                )?;
            }
        }
        MatrixFormat::Text => {
            writeln!(
                out,
                "pod pairs per namespace pair for {what} by the {engine_name} engine ({} client namespaces, {} server namespaces)",
                s.from_names.len(),
                s.to_names.len()
            )?;
            let w = s
                .from_names
                .iter()
                .chain(&s.to_names)
                .map(String::len)
                .max()
                .unwrap_or(4)
                .max(4);
            writeln!(
                out,
                "{:<w$}  {:<w$}  {:>8}  {:>8}  most denials by",
                "from", "to", "allowed", "denied"
            )?;
            for (a, b, p) in s.pairs() {
                let top = denial(names, p)
                    .map(|(t, n)| format!("{t} ({n})"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{a:<w$}  {b:<w$}  {:>8}  {:>8}  {top}",
                    p.allowed, p.denied
                )?;
            }
        }
        MatrixFormat::Markdown => {
            writeln!(
                out,
                "| from namespace | to namespace | allowed | denied | most denials by |"
            )?;
            writeln!(out, "|---|---|---:|---:|---|")?;
            for (a, b, p) in s.pairs() {
                let top = denial(names, p)
                    .map(|(t, n)| format!("{t} ({n})"))
                    .unwrap_or_default();
                writeln!(out, "| {a} | {b} | {} | {} | {top} |", p.allowed, p.denied)?;
            }
        }
        MatrixFormat::Svg => {
            let cell = 16usize;
            let label = 14
                + 7 * s
                    .from_names
                    .iter()
                    .chain(&s.to_names)
                    .map(String::len)
                    .max()
                    .unwrap_or(0);
            let w = label + cell * s.to_names.len() + 20;
            let h = label + cell * s.from_names.len() + 60;
            writeln!(
                out,
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">"#
            )?;
            writeln!(
                out,
                "<title>allowed pod pairs per namespace pair for {} by the {engine_name} engine</title>",
                esc(what)
            )?;
            for (j, n) in s.to_names.iter().enumerate() {
                let x = label + j * cell + cell / 2 + 3;
                writeln!(
                    out,
                    r#"<text transform="translate({x},{}) rotate(-90)">{}</text>"#,
                    label - 4,
                    esc(n)
                )?;
            }
            for (i, n) in s.from_names.iter().enumerate() {
                writeln!(
                    out,
                    r#"<text x="4" y="{}">{}</text>"#,
                    label + i * cell + cell - 4,
                    esc(n)
                )?;
            }
            let width = s.to_names.len();
            for (k, (a, b, p)) in s.pairs().enumerate() {
                let (i, j) = (k / width, k % width);
                let total = p.allowed + p.denied;
                // Red (nothing allowed) to green (everything allowed); grey: no pairs.
                let fill = if total == 0 {
                    "#cccccc".to_string()
                } else {
                    let f = p.allowed as f64 / total as f64;
                    let r = (229.0 + (76.0 - 229.0) * f) as u8;
                    let g = (57.0 + (175.0 - 57.0) * f) as u8;
                    let bl = (53.0 + (80.0 - 53.0) * f) as u8;
                    format!("#{r:02x}{g:02x}{bl:02x}")
                };
                let top = denial(names, p)
                    .map(|(t, n)| format!("; most denials ({n}) by {t}"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"><title>{} -&gt; {}: {} allowed, {} denied{}</title></rect>"#,
                    label + j * cell,
                    label + i * cell,
                    cell - 1,
                    cell - 1,
                    esc(a),
                    esc(b),
                    p.allowed,
                    p.denied,
                    esc(&top)
                )?;
            }
            writeln!(
                out,
                "<text x=\"4\" y=\"{}\">rows: client namespace, columns: server namespace; colour: share of pod pairs allowed, red none, green all</text>\n</svg>",
                label + cell * s.from_names.len() + 20
            )?;
        }
    }
    Ok(())
}
