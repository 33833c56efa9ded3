//! Integration tests of the `palisade` CLI: what a user sees on stderr and
//! the exit status when loading manifests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh folder under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("palisade-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn write(&self, rel: &str, text: &str) -> &Self {
        std::fs::write(self.0.join(rel), text).unwrap();
        self
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn palisade(args: &[&str], dir: &Path) -> (i32, String) {
    let Output { status, stderr, .. } = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .arg(dir)
        .output()
        .unwrap();
    (status.code().unwrap(), String::from_utf8(stderr).unwrap())
}

const APP: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool}
spec: {cidr: 10.0.0.0/16}
";

#[test]
fn other_kinds_are_one_warning_per_kind() {
    let s = Scratch::new("skip");
    s.write("app.yaml", APP);
    let (code, err) = palisade(&["compile", "-f"], &s.0);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "warning: skipped 2 Deployment (apps/v1) objects: Palisade does not act on this kind (--verbose lists them)",
            "warning: skipped 1 IPPool (projectcalico.org/v3) object: Palisade does not act on this kind (--verbose lists them)",
        ]
    );
    let (code, err) = palisade(&["--verbose", "matrix", "-f"], &s.0);
    assert_eq!(code, 0, "{err}");
    let app = s.0.join("app.yaml").display().to_string();
    assert!(
        err.contains(&format!(
            "  {app}:5:1: Deployment shop/web\n  {app}:9:1: Deployment shop/api\n"
        )),
        "{err}"
    );
}

#[test]
fn every_error_is_printed_with_its_position() {
    let s = Scratch::new("errors");
    s.write("app.yaml", APP).write(
        "np.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api-to-db, namespace: shop}\n\
         spec:\n  podSelector:\n    matchLabel: {app: db}\n  ingres:\n  - from:\n    - podSelector: {}\n",
    );
    s.write(
        "z.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: z, lables: {}}\n",
    );
    let (code, err) = palisade(&["compile", "-f"], &s.0);
    assert_eq!(code, 2, "{err}");
    let np = s.0.join("np.yaml").display().to_string();
    let z = s.0.join("z.yaml").display().to_string();
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "error: {np}:6:5: NetworkPolicy shop/api-to-db: spec.podSelector.matchLabel: unknown field `matchLabel`; did you mean `matchLabels`?"
            ),
            format!(
                "error: {np}:7:3: NetworkPolicy shop/api-to-db: spec.ingres: unknown field `ingres`; did you mean `ingress`?"
            ),
            format!(
                "error: {z}:3:21: Namespace z: metadata.lables: unknown field `lables`; did you mean `labels`?"
            ),
        ]
    );
}
