//! `palisade verify` for the service corpus (kube-proxy's packet-flow and
//! endpoint-selection tests): each probe is one new connection, answered
//! by the engine asked for.

use std::path::Path;

use anyhow::Result;
use palisade_services::case::{Case, Outcome, Output, check_selection, outcome};
use palisade_services::{Packet, ServiceTable};
use policy_bpf::services::{ServiceCapacity, ServiceEntries, lower_services, service_packet};
use policy_bpf_common::{ServiceAction, service_decide};
use serde_json::Value;

use crate::Tally;

pub use palisade_services::case::is_case;

/// Which engine answers the probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEngine {
    /// The semantic model (`palisade_services`).
    Reference,
    /// The service lookup over the lowered map entries.
    Maps,
    /// An engine without service load balancing yet: every probe is
    /// skipped with this name.
    Unsupported(String),
}

/// Runs one case file on `engine`.
pub fn run_file(path: &Path, doc: &Value, engine: ServiceEngine, verbose: bool) -> Result<Tally> {
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
    // The maps engine answers from the lowered map entries.
    let entries = match engine {
        ServiceEngine::Maps => match lower_services(&table, &ServiceCapacity::default()) {
            Ok(e) => Some(e),
            Err(e) => {
                outln!("FAIL {name}: service maps: {e}")?;
                tally.failed += 1;
                return Ok(tally);
            }
        },
        _ => None,
    };
    let skip = |tally: &mut Tally, what: &str, why: String| -> Result<()> {
        tally.skipped += 1;
        *tally.skip_reasons.entry(why.clone()).or_insert(0) += 1;
        if verbose {
            outln!("skip {name} {what}: {why}")?;
        }
        Ok(())
    };
    let unsupported = match &engine {
        ServiceEngine::Unsupported(name) => Some(format!(
            "service load balancing is not on the {name} engine yet (issue 21); reference and maps only"
        )),
        _ => None,
    };
    for probe in &case.probes {
        if let Some(why) = probe.skip_reason(&case).or_else(|| unsupported.clone()) {
            skip(&mut tally, &probe.name, why)?;
            continue;
        }
        let result = probe.packet().and_then(|packet| {
            let want = probe.expected()?;
            let (got, why) = answer(&table, entries.as_ref(), &packet);
            if got == want {
                Ok(())
            } else {
                Err(format!("got {got} ({why}), want {want}"))
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

/// One probe on the reference model, or on the map entries when given.
fn answer(
    table: &ServiceTable,
    entries: Option<&ServiceEntries>,
    packet: &Packet,
) -> (Outcome, String) {
    let Some(entries) = entries else {
        let verdict = table.decide(packet);
        return (outcome(&verdict, packet.source), verdict.to_string());
    };
    let action = service_decide(
        &service_packet(
            packet.source,
            packet.destination,
            packet.protocol,
            packet.port,
        ),
        entries,
    );
    let got = match action {
        ServiceAction::Forward {
            first,
            count,
            masquerade,
            ..
        } => {
            let backends = entries.backends_of(first, count);
            Outcome {
                masq: masquerade || backends.iter().any(|b| b.ip() == packet.source),
                output: Output::Endpoints(backends.into_iter().collect()),
            }
        }
        ServiceAction::Drop(_) => Outcome {
            output: Output::Drop,
            masq: false,
        },
        ServiceAction::Reject(_) => Outcome {
            output: Output::Reject,
            masq: false,
        },
        ServiceAction::Pass => Outcome {
            output: Output::Pass,
            masq: false,
        },
    };
    (got, format!("{action:?}"))
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
