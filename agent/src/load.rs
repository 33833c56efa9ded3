//! Reading manifests and conformance cases from files and folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use policy_core::manifest::{ManifestSet, Skipped};
use policy_core::{Cluster, Errors};

/// `--verbose`: list every skipped document, not only a count per kind.
pub static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Files under `paths` with one of `exts`, sorted. Folders are walked
/// recursively, leaving out entries whose names start with `.` (`.git/`, the
/// `..data` links of a mounted ConfigMap); symbolic links are followed unless
/// they lead back into a folder being walked.
pub fn collect_files(paths: &[PathBuf], exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, exts, &mut Vec::new(), &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

/// `ancestors` holds the canonical paths of the folders above `dir`: a folder
/// met again among them is a symlink loop, and is not entered.
fn walk(
    dir: &Path,
    exts: &[&str],
    ancestors: &mut Vec<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    if ancestors.contains(&canonical) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    ancestors.push(canonical);
    for p in entries {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        if p.is_dir() {
            walk(&p, exts, ancestors, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.contains(&e))
        {
            out.push(p);
        }
    }
    ancestors.pop();
    Ok(())
}

/// One warning line per skipped kind, with the count; with `--verbose`, a
/// line per document under it.
fn warn_skipped(skipped: &[Skipped]) {
    let mut by_kind: BTreeMap<(&str, &str), Vec<&Skipped>> = BTreeMap::new();
    for s in skipped {
        by_kind
            .entry((s.kind.as_str(), s.api_version.as_str()))
            .or_default()
            .push(s);
    }
    let verbose = VERBOSE.load(Ordering::Relaxed);
    for ((kind, api), docs) in by_kind {
        let n = docs.len();
        eprintln!(
            "warning: skipped {n} {kind} ({api}) object{}: Palisade does not act on this kind{}",
            if n == 1 { "" } else { "s" },
            if verbose {
                ""
            } else {
                " (--verbose lists them)"
            }
        );
        if verbose {
            for s in docs {
                eprintln!("  {}: {kind} {}", s.origin, s.name);
            }
        }
    }
}

/// Loads manifests (YAML/JSON files or folders) into a cluster. All or
/// nothing: every error of every file is reported (see [`Errors`]).
pub fn load_cluster(paths: &[PathBuf]) -> Result<Cluster> {
    let files = collect_files(paths, &["yaml", "yml", "json"])?;
    if files.is_empty() {
        bail!("no manifest files (.yaml, .yml, .json) found");
    }
    let mut set = ManifestSet::new();
    let mut errors = Errors::new();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        if let Err(e) = set.add_source(&f.display().to_string(), &text) {
            errors.extend(e);
        }
    }
    if !errors.is_empty() {
        return Err(errors.into());
    }
    warn_skipped(set.skipped());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("palisade-load-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    #[test]
    fn dot_entries_and_symlink_loops_are_not_walked() {
        let s = Scratch::new("walk");
        s.write("ns.yaml", NS);
        s.write(".git/copy.yaml", NS);
        s.write(".hidden.yaml", NS);
        // A mounted ConfigMap: ..data -> ..2026_01, file -> ..data/file.
        s.write(
            "cm/..2026_01/policy.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: cm}\n",
        );
        std::os::unix::fs::symlink("..2026_01", s.0.join("cm/..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.yaml", s.0.join("cm/policy.yaml")).unwrap();
        // A loop back to the top, and a symlink to a folder elsewhere.
        std::os::unix::fs::symlink("..", s.0.join("cm/loop")).unwrap();
        let other = Scratch::new("walk-other");
        other.write(
            "more.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: more}\n",
        );
        std::os::unix::fs::symlink(&other.0, s.0.join("linked")).unwrap();

        let files = collect_files(std::slice::from_ref(&s.0), &["yaml"]).unwrap();
        let rel: Vec<_> = files
            .iter()
            .map(|f| f.strip_prefix(&s.0).unwrap().display().to_string())
            .collect();
        assert_eq!(rel, ["cm/policy.yaml", "linked/more.yaml", "ns.yaml"]);
        let cluster = load_cluster(std::slice::from_ref(&s.0)).unwrap();
        assert_eq!(cluster.namespaces().count(), 3);
    }

    #[test]
    fn other_kinds_are_skipped_and_all_errors_reported() {
        let s = Scratch::new("kinds");
        s.write(
            "app.yaml",
            &format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n\
                 apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {{name: default}}\n---\n\
                 apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n---\n{NS}"
            ),
        );
        s.write("ns.yaml", &NS.replace("shop", "web"));
        assert_eq!(
            load_cluster(std::slice::from_ref(&s.0))
                .unwrap()
                .namespaces()
                .count(),
            2
        );

        s.write(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, lables: {}}\n",
        );
        s.write("b.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  ingres: []\n");
        let e = load_cluster(std::slice::from_ref(&s.0)).unwrap_err();
        let errors = e.downcast_ref::<Errors>().expect("load errors");
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{errors}");
        assert!(
            shown[0].contains("a.yaml:3:21: Namespace a: metadata.lables"),
            "{errors}"
        );
        assert!(
            shown[1].contains("b.yaml:5:3: NetworkPolicy p: spec.ingres"),
            "{errors}"
        );
    }
}
