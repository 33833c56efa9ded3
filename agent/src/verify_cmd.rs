//! `palisade verify`: runs conformance cases through an engine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use policy_core::conformance::{Case, ProbeStatus, parse_case, run_case};
use policy_core::{Engine, ReferenceEngine};

use crate::Tally;
use crate::load::collect_files;

/// The engines `verify` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Direct evaluation of the ordered rules (the semantic oracle).
    Reference,
}

fn run_engine(kind: EngineKind, case: &Case) -> Vec<policy_core::conformance::ProbeResult> {
    match kind {
        EngineKind::Reference => {
            let engine = ReferenceEngine::new(&case.cluster);
            run_case(&engine as &dyn Engine, case)
        }
    }
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
