//! The `palisade` CLI as users run it: the built binary on manifests in a
//! temporary folder. (One integration-test binary for the crate.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use policy_core::testgen::{Scale, scale_manifests};
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
