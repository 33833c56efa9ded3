//! The `palisade` binary as users run it: pipes, empty folders, big inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn palisade() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_palisade"));
    c.current_dir(repo());
    c
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether kernel tests may run: root, or a skip CI turns into a failure.
fn privileged() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("");
    if euid == "0" {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!("this test needs root and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("skipped: needs root (BPF, network namespaces)");
    false
}

/// One namespace `big` of `pods` pods labelled app=web, and a policy
/// letting them talk to each other.
fn wide_namespace(dir: &Path, pods: usize) {
    let mut yaml =
        String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: big, labels: {team: a}}\n");
    for i in 0..pods {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: big, labels: {{app: web}}}}\nstatus: {{podIP: 10.1.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    yaml.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: big}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {}}]}]\n",
    );
    std::fs::write(dir.join("big.yaml"), yaml).unwrap();
}

/// Runs with stdout a pipe whose reader is already gone, as `palisade ... | head`
/// after `head` has read its lines.
fn run_with_reader_gone(args: &[&str]) -> Output {
    let mut child = palisade()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn every_command_ends_quietly_when_nobody_reads_stdout() {
    let zt = "examples/zero-trust";
    let commands: &[&[&str]] = &[
        &["selector", "parse", "app == 'web' && has(tier)"],
        &["selector", "eval", "app == 'web'", "app=web"],
        &["selector", "test", "conformance/selectors.jsonl"],
        &["verify", "conformance/kubernetes"],
        &["compile", "-f", zt],
        &["compile", "-f", zt, "-o", "json"],
        &["compile", "-f", zt, "-o", "dot"],
        &["matrix", "-f", zt, "--port", "8080"],
        &["matrix", "-f", zt, "--port", "8080", "-o", "json"],
        &[
            "explain",
            "-f",
            zt,
            "--from",
            "analytics/reporting",
            "--to",
            "shop-backend/api",
            "--port",
            "8080",
        ],
    ];
    for args in commands {
        let out = run_with_reader_gone(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && out.status.code() != Some(101),
            "palisade {args:?} panicked on a closed pipe: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "palisade {args:?} should end quietly with 0, as grep does: {stderr}"
        );
        assert!(stderr.is_empty(), "palisade {args:?} said: {stderr}");
    }
}

#[test]
fn verify_fails_when_there_is_nothing_to_verify() {
    let empty = scratch("verify-empty");
    let out = palisade().arg("verify").arg(&empty).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a run that checked nothing passed"
    );
    assert!(stderr.contains("no case files"), "{stderr}");

    // Only a non-case file: still nothing checked.
    std::fs::write(empty.join("notes.txt"), "not a case").unwrap();
    let out = palisade().arg("verify").arg(&empty).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn compile_summary_lines_stay_readable_when_many_pods_share_a_program() {
    let dir = scratch("compile-wide");
    wide_namespace(&dir, 200);
    let out = palisade()
        .args(["compile", "-f"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest <= 160, "a summary line of {longest} characters");
    assert!(text.contains("used by 200 slots"), "{text}");
    assert!(text.contains("... and 196 more"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn explain_through_the_kernel_builds_namespaces_for_the_two_ends_only() {
    if !privileged() {
        return;
    }
    let dir = scratch("explain-netns");
    wide_namespace(&dir, 40);
    let out = palisade()
        .args(["explain", "--engine", "netns", "-f"])
        .arg(&dir)
        .args(["--from", "big/pod-3", "--to", "big/pod-7", "--port", "80"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("netns (2 of 40 pods in namespaces)"),
        "{text}"
    );
    assert!(text.contains("connected"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lint_names_the_zero_trust_surprises_and_compile_warns_about_them() {
    let dir = scratch("lint");
    std::fs::write(
        dir.join("cluster.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {env: prod}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: default-deny}\nspec: {selector: all(), types: [Ingress, Egress]}\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: prod-only}\nspec: {selector: env == 'prod', types: [Ingress]}\n",
    )
    .unwrap();
    let out = palisade().args(["lint", "-f"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("gnp:prod-only: selects no endpoint"),
        "{text}"
    );
    assert!(text.contains("`env` is a namespace label"), "{text}");
    assert!(text.contains("[dns-blocked]"), "{text}");
    assert!(text.contains("3 findings"), "{text}");

    let out = palisade()
        .args(["compile", "-f"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: gnp:prod-only: selects no endpoint"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loading manifests: what a user sees on stderr, and the exit status.
mod loading {

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    /// A fresh folder under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("palisade-cli-{name}-{}", std::process::id()));
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
}
