//! `palisade verify`: runs conformance cases through an engine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use policy_bpf::kernel_engine::KernelEngine;
use policy_bpf::lower::Capacity;
use policy_bpf::maps_engine::MapsEngine;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::conformance::{Case, ProbeStatus, evaluate_connection, parse_case, run_case};
use policy_core::{Engine, EngineError, ReferenceEngine};

use crate::Tally;
use crate::load::collect_files;

/// The engines `verify` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Direct evaluation of the ordered rules (the semantic oracle).
    Reference,
    /// Lookup in the compiled decision programs.
    Compiled,
    /// User-space interpreter of the exact lowered map contents.
    Maps,
    /// The real TC programs run on crafted packets (BPF_PROG_TEST_RUN).
    Kernel,
}

fn run_engine(kind: EngineKind, case: &Case) -> Vec<policy_core::conformance::ProbeResult> {
    match kind {
        EngineKind::Reference => {
            let engine = ReferenceEngine::new(&case.cluster);
            run_case(&engine as &dyn Engine, case)
        }
        EngineKind::Compiled => {
            match Compiler::from_cluster(&case.cluster, CompileOptions::default()) {
                Ok((engine, _)) => {
                    with_provenance_check(case, &engine, run_case(&engine as &dyn Engine, case))
                }
                Err(e) => failed_all(case, &format!("compilation failed: {e}")),
            }
        }
        EngineKind::Maps => match MapsEngine::new(&case.cluster, Capacity::default()) {
            Ok(engine) => {
                with_provenance_check(case, &engine, run_case(&engine as &dyn Engine, case))
            }
            Err(e) => failed_all(case, &format!("lowering failed: {e}")),
        },
        EngineKind::Kernel => match KernelEngine::new(&case.cluster, Capacity::default()) {
            Ok(engine) => {
                with_provenance_check(case, &engine, run_case(&engine as &dyn Engine, case))
            }
            Err(EngineError::Unavailable(why)) => skipped_all(case, &why),
            Err(e) => failed_all(case, &format!("loading the datapath failed: {e}")),
        },
    }
}

fn skipped_all(case: &Case, why: &str) -> Vec<policy_core::conformance::ProbeResult> {
    case.probes
        .iter()
        .map(|p| policy_core::conformance::ProbeResult {
            probe: p.clone(),
            status: ProbeStatus::Skipped(why.to_string()),
        })
        .collect()
}

/// An engine other than the reference must also agree on who decided: a
/// probe whose verdict is right but whose provenance differs fails.
fn with_provenance_check(
    case: &Case,
    engine: &dyn Engine,
    mut results: Vec<policy_core::conformance::ProbeResult>,
) -> Vec<policy_core::conformance::ProbeResult> {
    let reference = ReferenceEngine::new(&case.cluster);
    for r in &mut results {
        if r.status != ProbeStatus::Passed {
            continue;
        }
        let p = &r.probe;
        let want = evaluate_connection(&reference, &case.cluster, &p.from, &p.to, &p.flow);
        let got = evaluate_connection(engine, &case.cluster, &p.from, &p.to, &p.flow);
        match (want, got) {
            (Ok(w), Ok(g)) if w == g => {}
            (Ok(w), Ok(g)) => {
                r.status = ProbeStatus::Failed(format!(
                    "verdict agrees but provenance differs from the reference: egress {:?} vs {:?}, ingress {:?} vs {:?}",
                    g.egress.map(|d| d.to_string()),
                    w.egress.map(|d| d.to_string()),
                    g.ingress.map(|d| d.to_string()),
                    w.ingress.map(|d| d.to_string())
                ))
            }
            (w, g) => r.status = ProbeStatus::Failed(format!("reference {w:?}, engine {g:?}")),
        }
    }
    results
}

fn failed_all(case: &Case, why: &str) -> Vec<policy_core::conformance::ProbeResult> {
    case.probes
        .iter()
        .map(|p| policy_core::conformance::ProbeResult {
            probe: p.clone(),
            status: ProbeStatus::Failed(why.to_string()),
        })
        .collect()
}

pub fn verify(engine: EngineKind, paths: &[PathBuf], verbose: bool) -> Result<Tally> {
    let files = collect_files(paths, &["json"])?;
    let mut tally = Tally::default();
    for f in &files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {name}"))?;
        let case = match parse_case(&name, &text) {
            Ok(c) => c,
            Err(e) => {
                println!("FAIL {name}: case does not load: {e}");
                tally.failed += 1;
                continue;
            }
        };
        let results = run_engine(engine, &case);
        let mut case_tally = Tally::default();
        for r in &results {
            match &r.status {
                ProbeStatus::Passed => case_tally.passed += 1,
                ProbeStatus::Failed(why) => {
                    case_tally.failed += 1;
                    println!("FAIL {name} {}: {why}", r.probe);
                }
                ProbeStatus::Skipped(why) => {
                    case_tally.skipped += 1;
                    if verbose {
                        println!("skip {name} {}: {why}", r.probe);
                    }
                }
            }
        }
        if verbose {
            println!(
                "{} {} ({} passed, {} failed, {} skipped)",
                if case_tally.failed == 0 {
                    "ok  "
                } else {
                    "FAIL"
                },
                case.id,
                case_tally.passed,
                case_tally.failed,
                case_tally.skipped
            );
        }
        tally.add(&case_tally);
    }
    Ok(tally)
}
