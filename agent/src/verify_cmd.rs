//! `palisade verify`: runs conformance cases through an engine.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use palisade_testing::conformance::{
    Case, ProbeResult, ProbeStatus, describe_mismatch, parse_case, run_case,
};
use palisade_testing::kernel_engine::KernelEngine;
use palisade_testing::maps_engine::MapsEngine;
use palisade_testing::netns_engine::NetnsEngine;
use policy_bpf::lower::Capacity;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{ProbeOutcome, evaluate_connection};
use policy_core::flow::{Decision, Verdict};
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
    /// Real traffic between network namespaces through the attached programs.
    Netns,
    /// Real traffic over a two-node cluster on this machine (agents, VXLAN,
    /// pods through CNI): `matrix` and `explain` only.
    Lab,
}

/// Builds an engine for a cluster.
pub fn build_engine<'a>(
    kind: EngineKind,
    cluster: &'a policy_core::Cluster,
) -> Result<Box<dyn Engine + 'a>, EngineError> {
    Ok(match kind {
        EngineKind::Reference => Box::new(ReferenceEngine::new(cluster)),
        EngineKind::Compiled => Box::new(
            Compiler::from_cluster(cluster, CompileOptions::default())
                .map_err(|e| EngineError::InvalidCluster(e.to_string()))?
                .0,
        ),
        EngineKind::Maps => Box::new(MapsEngine::new(cluster, Capacity::verification())?),
        EngineKind::Kernel => Box::new(KernelEngine::new(cluster, Capacity::verification())?),
        EngineKind::Netns => Box::new(NetnsEngine::new(cluster, Capacity::verification())?),
        EngineKind::Lab => return Err(lab_only()),
    })
}

fn run_engine(kind: EngineKind, case: &Case) -> Vec<ProbeResult> {
    match kind {
        EngineKind::Reference => {
            let engine = ReferenceEngine::new(&case.cluster);
            run_case(&engine as &dyn Engine, case)
        }
        EngineKind::Compiled => {
            match Compiler::from_cluster(&case.cluster, CompileOptions::default()) {
                Ok((engine, _)) => run_checked(case, &engine),
                Err(e) => failed_all(case, &format!("compilation failed: {e}")),
            }
        }
        EngineKind::Maps => match MapsEngine::new(&case.cluster, Capacity::verification()) {
            Ok(engine) => run_checked(case, &engine),
            Err(e) => failed_all(case, &format!("lowering failed: {e}")),
        },
        EngineKind::Kernel => match KernelEngine::new(&case.cluster, Capacity::verification()) {
            Ok(engine) => run_checked(case, &engine),
            Err(EngineError::Unavailable(why)) => skipped_all(case, &why),
            Err(e) => failed_all(case, &format!("loading the datapath failed: {e}")),
        },
        EngineKind::Netns => match NetnsEngine::new(&case.cluster, Capacity::verification()) {
            Ok(engine) => run_checked(case, &engine),
            Err(EngineError::Unavailable(why)) => skipped_all(case, &why),
            Err(e) => failed_all(case, &format!("building the namespaces failed: {e}")),
        },
        EngineKind::Lab => failed_all(case, &lab_only().to_string()),
    }
}

/// The lab engine starts a cluster from files: only `matrix` and `explain` run it.
fn lab_only() -> EngineError {
    EngineError::Unavailable(
        "the lab engine starts a cluster from the manifests: `matrix` and `explain` run it".into(),
    )
}

fn skipped_all(case: &Case, why: &str) -> Vec<ProbeResult> {
    case.probes
        .iter()
        .map(|p| ProbeResult {
            probe: p.clone(),
            status: ProbeStatus::Skipped(why.to_string()),
        })
        .collect()
}

/// Runs every probe through an engine other than the reference. Each probe
/// runs once; the verdict must match upstream's expectation and every
/// decision the engine reports must name the same rule as the reference (a
/// right verdict for the wrong reason fails). An engine that sends real
/// traffic cannot see the server's ingress when the client's egress dropped
/// the packet; only then may it report no ingress decision.
fn run_checked(case: &Case, engine: &dyn Engine) -> Vec<ProbeResult> {
    let reference = ReferenceEngine::new(&case.cluster);
    case.probes
        .iter()
        .map(|p| {
            let status = if let Some(why) = &p.skip {
                ProbeStatus::Skipped(why.clone())
            } else {
                match evaluate_connection(engine, &case.cluster, &p.from, &p.to, &p.flow) {
                    Err(EngineError::Unavailable(why)) => ProbeStatus::Skipped(why),
                    Err(e) => ProbeStatus::Failed(format!("engine error: {e}")),
                    Ok(got) if got.allowed != p.allowed => {
                        ProbeStatus::Failed(describe_mismatch(p, &got))
                    }
                    Ok(got) => {
                        match evaluate_connection(
                            &reference,
                            &case.cluster,
                            &p.from,
                            &p.to,
                            &p.flow,
                        ) {
                            Ok(want) => provenance(&want, &got),
                            Err(e) => ProbeStatus::Failed(format!("reference error: {e}")),
                        }
                    }
                }
            };
            ProbeResult {
                probe: p.clone(),
                status,
            }
        })
        .collect()
}

fn provenance(want: &ProbeOutcome, got: &ProbeOutcome) -> ProbeStatus {
    let egress_denied = got
        .egress
        .as_ref()
        .is_some_and(|d| d.verdict == Verdict::Deny);
    let ingress_ok = match (&want.ingress, &got.ingress) {
        (w, g) if w == g => true,
        (Some(_), None) => egress_denied,
        _ => false,
    };
    if want.egress == got.egress && ingress_ok {
        return ProbeStatus::Passed;
    }
    let show = |d: &Option<Decision>| d.as_ref().map_or("-".to_string(), |d| d.to_string());
    ProbeStatus::Failed(format!(
        "verdict agrees but provenance differs from the reference: egress {} (reference {}), ingress {} (reference {})",
        show(&got.egress),
        show(&want.egress),
        show(&got.ingress),
        show(&want.ingress)
    ))
}

fn failed_all(case: &Case, why: &str) -> Vec<ProbeResult> {
    case.probes
        .iter()
        .map(|p| ProbeResult {
            probe: p.clone(),
            status: ProbeStatus::Failed(why.to_string()),
        })
        .collect()
}

pub fn verify(
    engine: EngineKind,
    paths: &[PathBuf],
    stores: &mut crate::ipam_verify::StoreFactory,
    verbose: bool,
) -> Result<Tally> {
    let files = collect_files(paths, &["json"])?;
    let mut tally = Tally::default();
    if files.is_empty() {
        bail!(
            "no case files (.json) under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // The kernel's service program, loaded at the first service case.
    let mut service_kernel = None;
    // The kernel and netns engines take minutes on the full corpora.
    let progress = crate::progress::bar(files.len() as u64, "cases");
    for f in &files {
        let name = f.display().to_string();
        progress.set_message(name.clone());
        progress.inc(1);
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {name}"))?;
        // IPAM scenarios (steps against a store) have their own runner.
        if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text)
            && crate::ipam_verify::is_scenario(&doc)
        {
            tally.add(&crate::ipam_verify::run_file(f, &doc, stores, verbose)?);
            continue;
        }
        // Service cases (kube-proxy's tests) have their own schema.
        if let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text)
            && crate::services_verify::is_case(&doc)
        {
            use crate::services_verify::ServiceEngine;
            let service_engine = match engine {
                EngineKind::Reference => ServiceEngine::Reference,
                EngineKind::Maps => ServiceEngine::Maps,
                EngineKind::Kernel => ServiceEngine::Kernel,
                EngineKind::Netns => ServiceEngine::Netns,
                other => ServiceEngine::Unsupported(format!("{other:?}").to_lowercase()),
            };
            tally.add(&crate::services_verify::run_file(
                f,
                &doc,
                service_engine,
                &mut service_kernel,
                verbose,
            )?);
            continue;
        }
        let case = match parse_case(&name, &text) {
            Ok(c) => c,
            Err(e) => {
                outln!("FAIL {name}: case does not load: {e}")?;
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
                    outln!("FAIL {name} {}: {why}", r.probe)?;
                }
                ProbeStatus::Skipped(why) => {
                    case_tally.skipped += 1;
                    *case_tally.skip_reasons.entry(skip_group(why)).or_insert(0) += 1;
                    if verbose {
                        outln!("skip {name} {}: {why}", r.probe)?;
                    }
                }
            }
        }
        if verbose {
            outln!(
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
            )?;
        }
        tally.add(&case_tally);
    }
    progress.finish_and_clear();
    Ok(tally)
}

/// Skip reasons grouped for the summary: addresses are generalised so one
/// cause is one line.
fn skip_group(why: &str) -> String {
    why.split(' ')
        .map(|w| {
            if w.parse::<std::net::IpAddr>().is_ok() {
                "<address>"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
