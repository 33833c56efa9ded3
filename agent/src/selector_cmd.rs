//! `palisade selector parse|eval|test`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use policy_core::selector::{Selector, SelectorError};
use serde::Deserialize;

use crate::Tally;

/// Renders a parse error with a caret under the offending byte.
pub fn render_error(e: &SelectorError) -> String {
    let prefix: String = e
        .selector
        .char_indices()
        .take_while(|(i, _)| *i < e.offset)
        .map(|_| ' ')
        .collect();
    format!(
        "{}\n  {}\n  {}^ expected {}, found {}",
        "invalid selector", e.selector, prefix, e.expected, e.found
    )
}

pub fn parse(text: &str, json: bool) -> Result<()> {
    let sel = Selector::parse(text).map_err(|e| anyhow::anyhow!(render_error(&e)))?;
    let restrictions: BTreeMap<String, serde_json::Value> = sel
        .label_restrictions()
        .into_iter()
        .map(|(k, r)| {
            (
                k,
                serde_json::json!({
                    "mustBePresent": r.must_be_present,
                    "mustBeAbsent": r.must_be_absent,
                    "oneOf": r.one_of,
                }),
            )
        })
        .collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "canonical": sel.canonical(),
                "id": sel.id(),
                "labelRestrictions": restrictions,
            }))?
        )?;
    } else {
        outln!("canonical: {}", sel.canonical())?;
        outln!("id:        {}", sel.id())?;
        for (k, r) in restrictions {
            outln!("label {k}: {r}")?;
        }
    }
    Ok(())
}

pub fn eval(text: &str, labels: &[String]) -> Result<()> {
    let sel = Selector::parse(text).map_err(|e| anyhow::anyhow!(render_error(&e)))?;
    let mut map = BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not key=value");
        };
        map.insert(k.to_string(), v.to_string());
    }
    let m = sel.matches(&map);
    outln!("{}", if m { "match" } else { "no match" })?;
    if !m {
        std::process::exit(1);
    }
    Ok(())
}

#[derive(Deserialize)]
struct Vector {
    selector: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "match", default)]
    matches: Option<bool>,
    #[serde(default)]
    invalid: bool,
    #[serde(default)]
    canonical: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

/// Runs selector vectors: match/no-match, invalid, and canonical/ID lines.
pub fn test(path: &Path, verbose: bool) -> Result<Tally> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tally = Tally::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let lineno = n + 1;
        let v: Vector = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                outln!("FAIL line {lineno}: not a selector vector: {e}")?;
                tally.failed += 1;
                continue;
            }
        };
        let parsed = Selector::parse(&v.selector);
        let outcome: Result<(), String> = match (&parsed, v.invalid) {
            (Err(_), true) => Ok(()),
            (Ok(s), true) => Err(format!("expected a parse error, got {}", s.canonical())),
            (Err(e), false) => Err(format!("unexpected parse error: {e}")),
            (Ok(s), false) => {
                let mut problems = Vec::new();
                if let (Some(labels), Some(want)) = (&v.labels, v.matches) {
                    let got = s.matches(labels);
                    if got != want {
                        problems.push(format!("expected match={want}, got {got}"));
                    }
                }
                if let Some(c) = &v.canonical
                    && c != s.canonical()
                {
                    problems.push(format!("expected canonical {c:?}, got {:?}", s.canonical()));
                }
                if let Some(u) = &v.uid
                    && u != s.id()
                {
                    problems.push(format!("expected id {u}, got {}", s.id()));
                }
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems.join("; "))
                }
            }
        };
        match outcome {
            Ok(()) => {
                tally.passed += 1;
                if verbose {
                    outln!("ok   line {lineno}: {:?}", v.selector)?;
                }
            }
            Err(why) => {
                tally.failed += 1;
                outln!("FAIL line {lineno}: {:?}: {why}", v.selector)?;
            }
        }
    }
    Ok(tally)
}
