//! The `palisade` binary as users run it: pipes, empty folders, big inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[path = "palisade/agent.rs"]
mod agent;
#[path = "palisade/cluster.rs"]
mod cluster;
#[path = "palisade/cni.rs"]
mod cni;
#[path = "palisade/deploy.rs"]
mod deploy;
#[path = "palisade/health_checks.rs"]
mod health_checks;
#[path = "palisade/ipam.rs"]
mod ipam;
#[path = "palisade/ipam_stress.rs"]
mod ipam_stress;
#[path = "palisade/kube_api.rs"]
mod kube_api;
#[path = "palisade/kubernetes.rs"]
mod kubernetes;
#[path = "palisade/lab.rs"]
mod lab;
#[path = "palisade/natout.rs"]
mod natout;
#[path = "palisade/overlay.rs"]
mod overlay;
#[path = "palisade/podman.rs"]
mod podman;
#[path = "palisade/services.rs"]
mod services;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn palisade() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_palisade"));
    c.current_dir(repo());
    c
}

/// A fresh scratch folder for one test: removed when the test passes,
/// kept (and named on stderr) when it fails, for a look.
fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("palisade-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for a look: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
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
        // An allowed connection: a denied one exits 1 by design, which is
        // what this test saw whenever explain finished writing before the
        // reader was gone (a race, not a broken pipe handled badly).
        &[
            "explain",
            "-f",
            zt,
            "--from",
            "shop-frontend/web",
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

    impl AsRef<std::ffi::OsStr> for Scratch {
        fn as_ref(&self) -> &std::ffi::OsStr {
            self.0.as_os_str()
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
        // No pods: matrix says so and fails, after the same warnings.
        let (code, err) = palisade(&["--verbose", "matrix", "-f"], &s.0);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("the manifests hold no Pod"), "{err}");
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

/// Matrix, explain and compile at scale: filters, views, unknown names.
mod matrix {

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    use palisade_testing::testgen::{Scale, scale_manifests};
    use serde_json::Value;

    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: analytics}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: reporting, namespace: analytics, labels: {app: reporting}}
status: {podIP: 10.0.1.1}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: shop}
spec:
  selector: app == 'db'
  ingress:
  - action: Allow
    source: {selector: app == 'web'}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: reporting-egress, namespace: analytics}
spec:
  selector: app == 'reporting'
  types: [Egress]
  egress:
  - action: Deny
    destination: {namespaceSelector: projectcalico.org/name == 'shop', selector: app == 'web'}
  - action: Allow
"#;

    /// A fresh folder under the target directory, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("temp dir");
            Dir(d)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn palisade(args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(args)
            .output()
            .expect("runs palisade")
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    fn path(p: &Path) -> &str {
        p.to_str().expect("utf-8 path")
    }

    /// JSON lines: the header, then the rest.
    fn json_lines(o: &Output) -> (Value, Vec<Value>) {
        assert!(o.status.success(), "{}", text(&o.stderr));
        let mut lines = text(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect::<Vec<_>>()
            .into_iter();
        let header = lines.next().expect("a header line");
        (header, lines.collect())
    }

    #[test]
    fn admin_policies_decide_before_namespace_policies_and_are_named() {
        // examples/admin-policies over examples/zero-trust: the
        // AdminNetworkPolicy's Deny in tier kube-admin decides analytics ->
        // shop-backend at ingress, before the default tier is consulted.
        for engine in ["reference", "compiled"] {
            let o = palisade(&[
                "matrix",
                "-f",
                "../examples/zero-trust",
                "-f",
                "../examples/admin-policies",
                "--port",
                "8080",
                "--engine",
                engine,
                "-o",
                "json",
            ]);
            let (_, cells) = json_lines(&o);
            let cell = |from: &str, to: &str| {
                cells
                    .iter()
                    .find(|c| c["from"] == from && c["to"] == to)
                    .unwrap_or_else(|| panic!("no cell {from} -> {to}"))
                    .clone()
            };
            for to in ["shop-backend/api", "shop-backend/db"] {
                let c = cell("analytics/reporting", to);
                assert_eq!(c["allowed"], false, "{engine}: {c}");
                let by = &c["ingress"]["decidedBy"];
                assert_eq!(by["tier"], "kube-admin", "{engine}: {c}");
                assert_eq!(by["policy"], "kanp:isolate-analytics", "{engine}: {c}");
            }
            // The shop's own traffic passes through the admin tier to its
            // namespace policies.
            let c = cell("shop-frontend/web", "shop-backend/api");
            assert_eq!(c["allowed"], true, "{engine}: {c}");
            assert_eq!(
                c["ingress"]["decidedBy"]["tier"], "default",
                "{engine}: {c}"
            );
        }
        let explain = |from: &str, to: &str, port: &str| {
            palisade(&[
                "explain",
                "-f",
                "../examples/zero-trust",
                "-f",
                "../examples/admin-policies",
                "--from",
                from,
                "--to",
                to,
                "--port",
                port,
            ])
        };
        let o = explain("analytics/reporting", "shop-backend/db", "5432");
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{out}{}", text(&o.stderr));
        assert!(out.contains("tier kube-admin"), "{out}");
        assert!(
            out.contains("rule 0 \"no-analytics\" deny: matched"),
            "{out}"
        );
        assert!(
            out.contains(
                "=> deny by tier kube-admin, kanp:isolate-analytics, rule 0 (deny), named \"no-analytics\""
            ),
            "{out}"
        );
        // A node peer over manifests: the Nodes in nodes.yaml are what
        // the no-kubelet policy's `nodes` peer selects.
        let o = explain("shop-frontend/web", "ip:192.168.100.2", "10250");
        let out = text(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{out}{}", text(&o.stderr));
        assert!(
            out.contains(
                "=> deny by tier kube-admin, kanp:no-kubelet, rule 0 (deny), named \"kubelet\""
            ),
            "{out}"
        );
    }

    #[test]
    fn explain_names_an_unknown_pod_and_the_closest_one() {
        let d = Dir::new("explain-unknown");
        let f = d.file("shop.yaml", SHOP);
        let o = palisade(&[
            "explain",
            "-f",
            path(&f),
            "--from",
            "shop/wbe",
            "--to",
            "shop/db",
            "--port",
            "80",
        ]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--from: no pod shop/wbe"), "{err}");
        assert!(err.contains("did you mean shop/web?"), "{err}");

        let o = palisade(&[
            "explain",
            "-f",
            path(&f),
            "--from",
            "shop/web",
            "--to",
            "nosuch/pod",
            "--port",
            "80",
        ]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--to: no pod nosuch/pod"), "{err}");
        assert!(!err.contains("did you mean"), "nothing is close: {err}");
    }

    #[test]
    fn compile_refuses_an_unknown_endpoint() {
        let d = Dir::new("compile-unknown");
        let f = d.file("shop.yaml", SHOP);
        let o = palisade(&["compile", "-f", path(&f), "--endpoint", "shop/dbb"]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "exit 0 for an unknown endpoint");
        assert!(o.stdout.is_empty(), "printed: {}", text(&o.stdout));
        assert!(err.contains("no pod shop/dbb"), "{err}");
        assert!(err.contains("did you mean shop/db?"), "{err}");
    }

    #[test]
    fn matrix_names_unknown_pods_namespaces_and_empty_selectors() {
        let d = Dir::new("matrix-unknown");
        let f = d.file("shop.yaml", SHOP);
        for (flag, value, want) in [
            ("--from", "shop/wbe", "did you mean shop/web?"),
            (
                "--to",
                "anlytics",
                "no namespace anlytics in the manifests; did you mean analytics?",
            ),
            ("--to", "app == 'nothing'", "matches no pod"),
        ] {
            let o = palisade(&["matrix", "-f", path(&f), flag, value]);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{flag} {value}: {err}");
            assert!(err.contains(want), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn matrix_json_is_streamed_lines_naming_both_directions() {
        let d = Dir::new("matrix-json");
        let f = d.file("shop.yaml", SHOP);
        let (header, cells) = json_lines(&palisade(&["matrix", "-f", path(&f), "-o", "json"]));
        assert_eq!(header["matrix"]["engine"], "compiled");
        assert_eq!(header["matrix"]["clients"], 3);
        assert_eq!(cells.len(), 9);
        let cell = |from: &str, to: &str| {
            cells
                .iter()
                .find(|c| c["from"] == from && c["to"] == to)
                .unwrap_or_else(|| panic!("no cell {from} -> {to}"))
                .clone()
        };
        // Denied at the client: the egress rule is named, and so is the server's ingress.
        let c = cell("analytics/reporting", "shop/web");
        assert_eq!(c["allowed"], false);
        assert_eq!(c["egress"]["verdict"], "deny");
        assert_eq!(
            c["egress"]["decidedBy"]["policy"],
            "np:analytics/reporting-egress"
        );
        assert_eq!(c["egress"]["decidedBy"]["rule"], 0);
        assert_eq!(c["ingress"]["verdict"], "allow");
        assert_eq!(c["ingress"]["decidedBy"]["kind"], "profile");
        // Denied at the server: its end of tier, with the client's allow next to it.
        let c = cell("analytics/reporting", "shop/db");
        assert_eq!(c["allowed"], false);
        assert_eq!(c["egress"]["decidedBy"]["rule"], 1);
        assert_eq!(c["ingress"]["decidedBy"]["kind"], "endOfTier");
        let c = cell("shop/web", "shop/db");
        assert_eq!(c["allowed"], true);
        assert_eq!(c["ingress"]["decidedBy"]["policy"], "np:shop/db-ingress");
    }

    #[test]
    fn matrix_text_grid_shows_both_deciders() {
        let d = Dir::new("matrix-text");
        let f = d.file("shop.yaml", SHOP);
        let o = palisade(&["matrix", "-f", path(&f)]);
        let out = text(&o.stdout);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let letter = |prefix: &str| {
            out.lines()
                .find_map(|l| {
                    let (code, what) = l.trim().split_once(" = ")?;
                    what.starts_with(prefix).then(|| code.to_string())
                })
                .unwrap_or_else(|| panic!("no legend entry {prefix:?} in {out}"))
        };
        let deny = letter("deny by tier default, np:analytics/reporting-egress, rule 0 (deny)");
        let open = letter("allow by profile kns.shop");
        // Row 1 is analytics/reporting; its cell to shop/web is denied by its
        // own egress while web's ingress would allow: both are named.
        let row = out
            .lines()
            .find(|l| l.starts_with("[1] analytics/reporting"))
            .expect("row 1");
        assert!(row.contains(&format!("✗{deny}/{open}")), "{out}");
    }

    #[test]
    fn matrix_filters_answer_who_can_reach_and_what_can_be_reached() {
        let d = Dir::new("matrix-filters");
        let f = d.file("shop.yaml", SHOP);
        let to_db = |args: &[&str]| {
            let mut all = vec!["matrix", "-f", path(&f), "-o", "json"];
            all.extend_from_slice(args);
            json_lines(&palisade(&all)).1
        };
        let cells = to_db(&["--to", "shop/db"]);
        assert_eq!(cells.len(), 3);
        assert!(cells.iter().all(|c| c["to"] == "shop/db"));
        let allowed: Vec<&str> = cells
            .iter()
            .filter(|c| c["allowed"] == true)
            .map(|c| c["from"].as_str().expect("name"))
            .collect();
        assert_eq!(allowed, ["shop/web"]);

        let cells = to_db(&["--from", "analytics", "--to", "app in {'web', 'db'}"]);
        let pairs: Vec<(&str, &str)> = cells
            .iter()
            .map(|c| {
                (
                    c["from"].as_str().expect("from"),
                    c["to"].as_str().expect("to"),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("analytics/reporting", "shop/db"),
                ("analytics/reporting", "shop/web")
            ]
        );
        // Rows and columns keep the cluster's order (namespace, then name).
        // Repeated values add up; each pod once.
        let cells = to_db(&["--from", "shop/web", "--from", "shop", "--to", "shop/db"]);
        assert_eq!(cells.len(), 2);
    }

    #[test]
    fn matrix_summary_counts_namespace_pairs() {
        let d = Dir::new("matrix-summary");
        let f = d.file("shop.yaml", SHOP);
        let (header, pairs) = json_lines(&palisade(&[
            "matrix",
            "-f",
            path(&f),
            "-o",
            "json",
            "--summary",
        ]));
        assert_eq!(header["matrix"]["view"], "summary");
        let pair = |a: &str, b: &str| {
            pairs
                .iter()
                .find(|p| p["fromNamespace"] == a && p["toNamespace"] == b)
                .expect("pair")
                .clone()
        };
        assert_eq!(pair("analytics", "shop")["allowed"], 0);
        assert_eq!(pair("analytics", "shop")["denied"], 2);
        assert_eq!(pair("shop", "shop")["allowed"], 3);
        assert_eq!(pair("shop", "shop")["denied"], 1);
        let total: u64 = pairs
            .iter()
            .map(|p| p["allowed"].as_u64().unwrap() + p["denied"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 9);
        let text_summary = text(&palisade(&["matrix", "-f", path(&f), "--summary"]).stdout);
        assert!(
            text_summary.lines().any(|l| l.starts_with("analytics")
                && l.contains("shop")
                && l.contains(
                    "egress deny by tier default, np:analytics/reporting-egress, rule 0 (deny) (1)"
                )),
            "{text_summary}"
        );
    }

    #[test]
    fn matrix_draws_svg_heatmaps() {
        let d = Dir::new("matrix-svg");
        let f = d.file("shop.yaml", SHOP);
        for (extra, rects) in [(None, 9), (Some("--summary"), 4)] {
            let mut args = vec!["matrix", "-f", path(&f), "-o", "svg"];
            args.extend(extra);
            let o = palisade(&args);
            let svg = text(&o.stdout);
            assert!(o.status.success(), "{}", text(&o.stderr));
            assert!(
                svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
                "{svg}"
            );
            assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
            assert_eq!(svg.matches("<rect ").count(), rects, "{svg}");
        }
    }

    #[test]
    fn matrix_reports_pods_without_an_address() {
        let d = Dir::new("matrix-no-ip");
        let pending = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: shop, labels: {app: web}}\n";
        let f = d.file("shop.yaml", &format!("{SHOP}{pending}"));
        let o = palisade(&["matrix", "-f", path(&f), "-o", "json"]);
        let err = text(&o.stderr);
        assert!(
            err.contains("skipped 1 pod: no IP address (no status.podIP"),
            "{err}"
        );
        assert!(err.contains("shop/pending"), "{err}");
        let (header, cells) = json_lines(&o);
        assert_eq!(header["matrix"]["skipped"][0]["pod"], "shop/pending");
        assert_eq!(cells.len(), 9);
        // Asking for it by name is an error, not a blank matrix.
        let o = palisade(&["matrix", "-f", path(&f), "--to", "shop/pending"]);
        assert_eq!(o.status.code(), Some(2));
        assert!(text(&o.stderr).contains("pod shop/pending has no IP address"));

        // Nothing left at all: a non-zero exit.
        let only = d.file(
            "pending.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: pending, namespace: shop}\n",
        );
        let o = palisade(&["matrix", "-f", path(&only)]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("no pods left"), "{err}");
        assert!(o.stdout.is_empty());
    }

    /// The compiled fast path and the reference engine give the same cells,
    /// deciding rules included, on a generated cluster read from files.
    #[test]
    fn matrix_engines_agree_on_a_generated_cluster() {
        let d = Dir::new("matrix-engines");
        let docs = scale_manifests(
            Scale {
                pods: 120,
                policies: 60,
                pods_per_node: 60,
            },
            11,
        );
        let text_docs: String = docs.iter().map(|v| format!("{v}\n")).collect();
        let f = d.file("cluster.json", &text_docs);
        for port in ["8080", "9090", "53"] {
            let run = |engine: &str| {
                json_lines(&palisade(&[
                    "matrix",
                    "-f",
                    path(&f),
                    "-o",
                    "json",
                    "--port",
                    port,
                    "--engine",
                    engine,
                ]))
                .1
            };
            let compiled = run("compiled");
            let reference = run("reference");
            assert_eq!(compiled.len(), 121 * 121);
            assert!(compiled.iter().any(|c| c["allowed"] == true));
            assert!(compiled.iter().any(|c| c["allowed"] == false));
            assert_eq!(compiled, reference, "port {port}");
        }
    }
}

/// `apply`, `get` and `delete` on the embedded datastore, as an operator
/// following the zero-trust recipe would run them.
#[test]
fn apply_get_delete_on_the_embedded_datastore() {
    let dir = scratch("store");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let run = |args: &[&str]| {
        let out = palisade()
            .args(args)
            .args(["--state-dir", state_arg])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (code, out, err) = run(&["apply", "-f", "examples/zero-trust"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("GlobalNetworkPolicy default-deny created"),
        "{out}"
    );
    assert!(out.ends_with("revision 1\n"), "{out}");

    let (code, out, _) = run(&["get", "gnp"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "NAME\nallow-dns\ndefault-deny\n");
    let (_, out, _) = run(&["get", "networkpolicies", "-n", "shop-backend", "-o", "wide"]);
    assert!(
        out.starts_with("NAMESPACE      NAME           REVISION   KEY\n"),
        "{out}"
    );
    assert!(
        out.contains(
            "/calico/resources/v3/projectcalico.org/networkpolicies/shop-backend/db-from-api"
        ),
        "{out}"
    );
    let (_, out, _) = run(&["get", "globalnetworkpolicy", "default-deny", "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["spec"]["order"], 2000);

    // Kubernetes syntax in a Calico policy: refused, with the Calico form,
    // and nothing written.
    let log = std::fs::read(state.join("changes.jsonl")).unwrap();
    let mixed = dir.join("mixed.yaml");
    std::fs::write(
        &mixed,
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: api, namespace: shop-backend}\n\
         spec:\n  selector: app == 'api'\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {tier: frontend}\n",
    )
    .unwrap();
    let (code, _, err) = run(&["apply", "-f", mixed.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(r#"`{action: Allow, source: {namespaceSelector: "tier == 'frontend'"}}`"#),
        "{err}"
    );
    assert_eq!(std::fs::read(state.join("changes.jsonl")).unwrap(), log);

    let (code, out, err) = run(&["delete", "gnp", "allow-dns"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "GlobalNetworkPolicy allow-dns deleted\nrevision 2\n");
    let (code, _, err) = run(&["delete", "gnp", "allow-dns"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = run(&["get", "deployments"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("known kinds: globalnetworkpolicies"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
