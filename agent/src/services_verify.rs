//! `palisade verify` for the service corpus (kube-proxy's packet-flow and
//! endpoint-selection tests): each probe is one new connection, answered
//! by the engine asked for.

use std::path::Path;

use anyhow::Result;
use palisade_services::case::{Case, check_selection, outcome};
use serde_json::Value;

use crate::Tally;
use crate::verify_cmd::EngineKind;

pub use palisade_services::case::is_case;

/// Runs one case file on `engine`.
pub fn run_file(path: &Path, doc: &Value, engine: EngineKind, verbose: bool) -> Result<Tally> {
    let name = path.display().to_string();
    let mut tally = Tally::default();
    let case = match Case::from_json(&name, doc).and_then(|c| c.table().map(|t| (c, t))) {
        Ok(c) => c,
        Err(e) => {
            outln!("FAIL {name}: case does not load: {e}")?;
            tally.failed += 1;
            return Ok(tally);
        }
    };
    let (case, table) = case;
    let skip = |tally: &mut Tally, what: &str, why: String| -> Result<()> {
        tally.skipped += 1;
        *tally.skip_reasons.entry(why.clone()).or_insert(0) += 1;
        if verbose {
            outln!("skip {name} {what}: {why}")?;
        }
        Ok(())
    };
    let unsupported = (engine != EngineKind::Reference).then(|| {
        format!(
            "service load balancing is not on the {engine:?} engine yet (issue 21); reference only"
        )
    });
    for probe in &case.probes {
        if let Some(why) = probe.skip_reason(&case).or_else(|| unsupported.clone()) {
            skip(&mut tally, &probe.name, why)?;
            continue;
        }
        let result = probe.packet().and_then(|packet| {
            let want = probe.expected()?;
            let verdict = table.decide(&packet);
            let got = outcome(&verdict, packet.source);
            if got == want {
                Ok(())
            } else {
                Err(format!("got {got} ({verdict}), want {want}"))
            }
        });
        record(&mut tally, &name, &probe.name, result, verbose)?;
    }
    for check in &case.selection_checks {
        if let Some(why) = unsupported.clone() {
            skip(&mut tally, &check.name, why)?;
            continue;
        }
        record(
            &mut tally,
            &name,
            &check.name,
            check_selection(&case, check),
            verbose,
        )?;
    }
    Ok(tally)
}

fn record(
    tally: &mut Tally,
    file: &str,
    what: &str,
    result: std::result::Result<(), String>,
    verbose: bool,
) -> Result<()> {
    match result {
        Ok(()) => {
            tally.passed += 1;
            if verbose {
                outln!("ok   {file} {what}")?;
            }
        }
        Err(why) => {
            tally.failed += 1;
            outln!("FAIL {file} {what}: {why}")?;
        }
    }
    Ok(())
}
