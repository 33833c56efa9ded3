//! Reading manifests and conformance cases from files and folders.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use policy_core::Cluster;
use policy_core::manifest::ManifestSet;

/// Files under `paths` with one of `exts`, folders walked recursively, sorted.
pub fn collect_files(paths: &[PathBuf], exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, exts, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, exts, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Loads manifests (YAML/JSON files or folders) into a cluster. All or nothing.
pub fn load_cluster(paths: &[PathBuf]) -> Result<Cluster> {
    let files = collect_files(paths, &["yaml", "yml", "json"])?;
    if files.is_empty() {
        bail!("no manifest files (.yaml, .yml, .json) found");
    }
    let mut set = ManifestSet::new();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        set.add_source(&f.display().to_string(), &text)?;
    }
    let loaded = set.into_objects();
    let origins: Vec<_> = loaded
        .iter()
        .map(|l| (l.object.object_ref(), l.origin.clone()))
        .collect();
    Cluster::from_objects(loaded.into_iter().map(|l| l.object)).map_err(|e| {
        // Point cross-object errors (unknown tier, ...) at the offending document.
        let origin = e
            .object
            .as_ref()
            .and_then(|r| origins.iter().find(|(o, _)| o == r))
            .map(|(_, origin)| origin.clone());
        match origin {
            Some(o) => anyhow::Error::new(e.from_origin(o)),
            None => anyhow::Error::new(e),
        }
    })
}
