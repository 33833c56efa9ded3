//! `palisade lint`: policies that are valid but will not do what they say.

use std::path::PathBuf;

use anyhow::Result;
use policy_core::Cluster;
use policy_core::lint::{Finding, lint};

use crate::load::load_cluster;

/// Findings shown as warnings by other commands before "see palisade lint".
const WARNINGS_SHOWN: usize = 5;

/// Prints every finding; `Ok(true)` when there were none.
pub fn run(files: &[PathBuf]) -> Result<bool> {
    let cluster = load_cluster(files)?;
    let findings = lint(&cluster);
    for f in &findings {
        outln!("{f}")?;
    }
    outln!(
        "{} finding{}",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    )?;
    Ok(findings.is_empty())
}

/// The first findings as warnings on stderr, for commands whose answer they
/// may explain (a matrix of denies, a policy that compiles to nothing).
pub fn warn(cluster: &Cluster) {
    let findings: Vec<Finding> = lint(cluster);
    for f in findings.iter().take(WARNINGS_SHOWN) {
        eprintln!("warning: {f}");
    }
    if findings.len() > WARNINGS_SHOWN {
        eprintln!(
            "warning: ... and {} more (palisade lint lists them all)",
            findings.len() - WARNINGS_SHOWN
        );
    }
}
