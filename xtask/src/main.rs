//! Build orchestration for Palisade.
//!
//! ```text
//! cargo xtask demo                 # the main job on the embedded defaults
//! cargo xtask test                 # the whole test suite, as CI runs it
//! cargo xtask setup                # only install what building the workspace needs
//! cargo xtask report <compiler|datapath|veth> [-- ARGS]   # a report of docs/, with its tools
//! cargo xtask fuzz <target> [--seconds N]
//! cargo xtask structure            # file sizes and module import cycles
//! ```
//!
//! Each command installs what it needs on first use (rustup components,
//! cargo tools under `target/tools/`, Debian packages; see [`tools`]) and
//! prints every step it runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

mod structure;
mod tools;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command from the workspace root, echoing it; fails on non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    eprintln!("+ {shown}");
    let status = cmd
        .current_dir(root())
        .env("PATH", tools::search_path(&tools::tools_root()))
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Whether a command runs successfully (used to detect installed tools).
fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .env("PATH", tools::search_path(&tools::tools_root()))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What building the workspace, the kernel programs and the
/// network-namespace tests need: nightly with rust-src, bpf-linker in the
/// project's tool root (where `.cargo/config.toml` points the BPF target's
/// linker), protoc (the etcd client) and iproute2.
fn ensure_ebpf_tools() -> Result<()> {
    tools::ensure_nightly()?;
    tools::BPF_LINKER.ensure(&tools::tools_root())?;
    tools::ensure_debs(&[tools::NETNS_DEBS, tools::BUILD_DEBS].concat())
}

/// Whether this process may load BPF programs and create namespaces. When
/// it may not, privileged steps are skipped with a notice, unless
/// PALISADE_REQUIRE_PRIVILEGED is set (CI sets it): then it is an error.
fn privileged(what: &str) -> Result<bool> {
    let root = is_root();
    if root {
        return Ok(true);
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        bail!("{what} needs root, and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("SKIPPED (not root): {what}");
    Ok(false)
}

fn is_root() -> bool {
    // /proc/self/status: "Uid:\treal\teffective\t..."
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

struct Steps {
    done: Vec<(String, std::time::Duration)>,
}

impl Steps {
    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        eprintln!("\n=== {name}");
        let t = Instant::now();
        f().with_context(|| format!("step failed: {name}"))?;
        self.done.push((name.to_string(), t.elapsed()));
        Ok(())
    }
}

/// clippy for the kernel side as the BPF target builds it: without this the
/// workspace lints (`undocumented_unsafe_blocks` among them) never see the
/// code under `#[cfg(target_arch = "bpf")]`.
fn bpf_clippy() -> Command {
    let mut c = Command::new("rustup");
    c.args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "-p",
        "policy-bpf-ebpf",
        "-p",
        "policy-bpf-common",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ])
    .current_dir(root())
    .env("PATH", tools::search_path(&tools::tools_root()));
    c
}

fn palisade() -> PathBuf {
    root().join("target/release/palisade")
}

fn test() -> Result<()> {
    let started = Instant::now();
    let mut s = Steps { done: Vec::new() };
    s.step("tools (installed from nothing on a fresh clone)", || {
        tools::ensure_lint_tools()?;
        ensure_ebpf_tools()?;
        tools::ensure_debs(tools::FFI_DEBS)?;
        tools::ensure_debs(tools::ETCD_DEBS)?;
        tools::ensure_debs(tools::PODMAN_DEBS)?;
        tools::ensure_debs(tools::NFT_DEBS)?;
        tools::CARGO_FUZZ.ensure(&tools::tools_root())?;
        tools::check_debian_install_path()
    })?;
    s.step("format", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    s.step("structure (file sizes, module import cycles)", || {
        structure::check(&root())
    })?;
    s.step("clippy", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    s.step(
        "clippy, BPF target (kernel program and shared types)",
        || run(&mut bpf_clippy()),
    )?;
    s.step("unit and integration tests", || {
        run(cargo().args(["test", "--workspace"]))
    })?;
    s.step("doc tests and crate examples", || {
        run(cargo().args(["test", "--workspace", "--doc"]))
    })?;
    s.step("build palisade (release)", || {
        run(cargo().args(["build", "--release", "-p", "palisade"]))
    })?;
    let corpora = conformance_roots();
    for c in &corpora {
        s.step(&format!("selector vectors ({})", c.display()), || {
            run(Command::new(palisade())
                .args(["selector", "test"])
                .arg(c.join("selectors.jsonl")))?;
            run(Command::new(palisade())
                .args(["selector", "test"])
                .arg(c.join("selectors_canonical.jsonl")))
        })?;
        for engine in ["reference", "compiled", "maps", "kernel", "netns"] {
            if matches!(engine, "kernel" | "netns") && !privileged(&format!("the {engine} engine"))?
            {
                continue;
            }
            s.step(
                &format!("conformance, {engine} engine ({})", c.display()),
                || {
                    run(Command::new(palisade())
                        .args(["verify", "--engine", engine])
                        .arg(c.join("kubernetes"))
                        .arg(c.join("calico"))
                        .arg(c.join("extra"))
                        .arg(c.join("calico-services"))
                        .arg(c.join("anp-v1alpha1"))
                        .arg(c.join("cnp-v1alpha2"))
                        .args(extra_cases(c, &POLICY_EXTRA, engine)))
                },
            )?;
        }
    }
    for c in &corpora {
        // Service load balancing: kube-proxy's packet-flow and
        // endpoint-selection cases, on the model, on the lowered service
        // maps, on the kernel's service program (crafted packets) and on
        // real connections between namespaces.
        for engine in ["reference", "maps", "kernel", "netns"] {
            if matches!(engine, "kernel" | "netns")
                && !privileged(&format!("the {engine} engine on services"))?
            {
                continue;
            }
            s.step(
                &format!("conformance, services, {engine} engine ({})", c.display()),
                || {
                    run(Command::new(palisade())
                        .args(["verify", "--engine", engine])
                        .arg(c.join("services"))
                        .args(present(c, &["services-extra"])))
                },
            )?;
        }
    }
    for c in &corpora {
        // etcd's run is an integration test (it starts its own cluster);
        // here every corpus root, the shared one with any held-out cases
        // included, runs on the embedded store.
        s.step(
            &format!("conformance, Calico IPAM, embedded store ({})", c.display()),
            || {
                run(Command::new(palisade())
                    .args(["verify", "--store", "embedded"])
                    .arg(c.join("ipam"))
                    .args(present(c, &["ipam-extra"])))
            },
        )?;
    }
    s.step("fuzz targets build", || {
        run(Command::new("rustup").args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "build",
            "--fuzz-dir",
            "fuzz",
        ]))
    })?;
    eprintln!("\n=== summary");
    for (name, d) in &s.done {
        eprintln!("ok  {:>7.1}s  {name}", d.as_secs_f64());
    }
    eprintln!(
        "all {} steps passed in {:.0}s",
        s.done.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The policy cases we transcribed ourselves, next to the shared folders.
const POLICY_EXTRA: [&str; 5] = [
    "kubernetes-extra",
    "calico-extra",
    "anp-v1alpha1-extra",
    "cnp-v1alpha2-extra",
    "calico-services-extra",
];

/// What of our own transcribed folders `names` of corpus `c` an engine
/// runs: all of them on the user-space engines; on `kernel` and `netns`,
/// which load programs (and build namespaces) for every case, about 1 s
/// a case, a fixed quarter each, different quarters, so CI stays under
/// an hour and half the cases still meet a real kernel.
fn extra_cases(c: &Path, names: &[&str], engine: &str) -> Vec<PathBuf> {
    let folders = present(c, names);
    let offset = match engine {
        "kernel" => 0,
        "netns" => 2,
        _ => return folders,
    };
    let mut cases: Vec<PathBuf> = folders
        .iter()
        .flat_map(|f| std::fs::read_dir(f).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    cases.sort();
    cases
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 4 == offset)
        .map(|(_, p)| p)
        .collect()
}

/// The folders of corpus `c` among `names` that exist: the cases we
/// transcribed ourselves (`*-extra`) live only in the vendored corpus.
fn present(c: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| c.join(n))
        .filter(|p| p.is_dir())
        .collect()
}

/// What of a corpus `cargo xtask test` runs: the selector vectors and the
/// policy folders the engines verify.
const CHECKED_CORPUS: [&str; 10] = [
    "selectors.jsonl",
    "selectors_canonical.jsonl",
    "kubernetes",
    "calico",
    "extra",
    "ipam",
    "services",
    "calico-services",
    "anp-v1alpha1",
    "cnp-v1alpha2",
];

/// The corpus vendored in the repository, plus the shared one next to the
/// checkout when what CI runs of it differs (it may hold cases added since).
/// Folders CI does not run do not count, so an identical policy corpus is
/// never verified twice.
fn conformance_roots() -> Vec<PathBuf> {
    let vendored = root().join("conformance");
    let mut v = vec![vendored.clone()];
    let shared = root().join("../shared/conformance");
    if shared.join("selectors.jsonl").exists()
        && CHECKED_CORPUS
            .iter()
            .any(|part| !same_tree(&vendored.join(part), &shared.join(part)))
    {
        v.push(shared);
    }
    v
}

/// Whether two corpus files, or folders, hold the same files with the same
/// contents.
fn same_tree(a: &Path, b: &Path) -> bool {
    fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        if root.is_file() {
            return std::fs::read(root)
                .map(|c| vec![(PathBuf::new(), c)])
                .unwrap_or_default();
        }
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(c) = std::fs::read(&p) {
                    out.push((p.strip_prefix(root).unwrap_or(&p).to_path_buf(), c));
                }
            }
        }
        out.sort();
        out
    }
    files(a) == files(b)
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!(
            "the demo enforces policy in the kernel (BPF programs, network namespaces): run it as root"
        );
    }
    ensure_ebpf_tools()?;
    eprintln!("building palisade (release; the first build takes about 3 minutes on 2 cores)");
    run(cargo().args(["build", "--release", "-p", "palisade"]))?;
    tools::ensure_debs(tools::ETCD_DEBS)?;
    tools::ensure_debs(tools::NFT_DEBS)?;
    eprintln!(
        "\nA two-node cluster on this machine: a local etcd member, an agent per node, the\n\
         VXLAN overlay, pools frontend/backend/ci, zero-trust policy, pods added through CNI\n"
    );
    run(Command::new(palisade())
        .args([
            "lab",
            "--explain-from",
            "frontend/web",
            "--explain-to",
            "backend/api",
            "--explain-port",
            "9090",
            "-f",
        ])
        .arg(root().join("examples/cluster")))?;
    let example = root().join("examples/zero-trust");
    println!();
    eprintln!("Why can't analytics reach the shop API? (the kernel's own events and counters)\n");
    // explain exits 1 for a denied connection; that is the expected answer here.
    let status = Command::new(palisade())
        .args([
            "explain",
            "--engine",
            "netns",
            "--from",
            "analytics/reporting",
            "--to",
            "shop-backend/api",
            "--port",
            "8080",
            "-f",
        ])
        .arg(&example)
        .current_dir(root())
        .status()?;
    if status.code() != Some(1) {
        bail!("expected the analytics -> api connection to be denied");
    }
    Ok(())
}

fn fuzz(args: &[String]) -> Result<()> {
    let Some(target) = args.first() else {
        bail!(
            "usage: cargo xtask fuzz <selector_parse|manifest_load|conformance_case> [--seconds N]"
        );
    };
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("600");
    tools::ensure_nightly()?;
    tools::CARGO_FUZZ.ensure(&tools::tools_root())?;
    let corpus = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    seed_corpus(target, &corpus)?;
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            target,
        ])
        .arg(&corpus)
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
        ]))
}

/// Seeds a fuzz corpus from the test data so fuzzing starts from real inputs.
fn seed_corpus(target: &str, corpus: &Path) -> Result<()> {
    let conf = root().join("conformance");
    match target {
        "selector_parse" => {
            for file in ["selectors.jsonl", "selectors_canonical.jsonl"] {
                let text = std::fs::read_to_string(conf.join(file))?;
                for (i, line) in text.lines().enumerate() {
                    if let Ok(v) = serde_json_selector(line) {
                        std::fs::write(corpus.join(format!("{file}-{i}")), v)?;
                    }
                }
            }
        }
        "manifest_load" => {
            for entry in std::fs::read_dir(root().join("examples/zero-trust"))? {
                let p = entry?.path();
                std::fs::copy(&p, corpus.join(p.file_name().expect("file")))?;
            }
        }
        "conformance_case" => {
            for dir in ["kubernetes", "extra"] {
                for entry in std::fs::read_dir(conf.join(dir))? {
                    let p = entry?.path();
                    std::fs::copy(&p, corpus.join(p.file_name().expect("file")))?;
                }
            }
        }
        other => bail!("unknown fuzz target {other}"),
    }
    Ok(())
}

/// Extracts the "selector" string of a JSON line without a JSON dependency.
fn serde_json_selector(line: &str) -> Result<String> {
    let key = "\"selector\": \"";
    let start = line.find(key).context("no selector")? + key.len();
    let mut out = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some(o) => {
                    out.push('\\');
                    out.push(o)
                }
                None => break,
            },
            '"' => return Ok(out),
            c => out.push(c),
        }
    }
    bail!("unterminated")
}

/// Installs what `cargo build --workspace` needs, so plain cargo works too.
fn setup() -> Result<()> {
    tools::ensure_lint_tools()?;
    ensure_ebpf_tools()?;
    eprintln!(
        "ready: the BPF target links with {} (see .cargo/config.toml)",
        tools::BPF_LINKER.path(&tools::tools_root()).display()
    );
    Ok(())
}

/// Runs one of the report binaries behind docs/, after installing its tools.
fn report(args: &[String]) -> Result<()> {
    let (name, rest) = match args.split_first() {
        Some((name, rest)) => (name.as_str(), rest),
        None => {
            bail!(
                "usage: cargo xtask report <compiler|datapath|veth|agent|ipam|cni|services|service-packets|service-traffic|kube> [-- ARGS]"
            )
        }
    };
    let bin = match name {
        "compiler" => "compiler-report",
        "datapath" => "datapath-report",
        "veth" => "veth-report",
        "agent" => "agent-report",
        "ipam" => "ipam-report",
        "cni" => "cni-report",
        "services" => "services-report",
        "service-packets" => "service-packet-report",
        "service-traffic" => "service-traffic-report",
        "kube" => "kube-report",
        other => {
            bail!(
                "unknown report {other:?}: expected compiler, datapath, veth, agent, ipam, cni, services, service-packets, service-traffic or kube"
            )
        }
    };
    if !matches!(name, "compiler" | "ipam") && !is_root() {
        bail!("the {name} report loads BPF programs and builds network namespaces: run it as root");
    }
    // The benches crate links the datapath, so every report builds the kernel programs.
    ensure_ebpf_tools()?;
    if matches!(name, "veth" | "services" | "service-traffic") {
        tools::ensure_debs(tools::VETH_REPORT_DEBS)?;
        tools::ensure_debs(tools::NFT_DEBS)?;
    }
    if name == "cni" {
        tools::ensure_debs(tools::PODMAN_DEBS)?;
        tools::ensure_debs(tools::NFT_DEBS)?;
    }
    if name == "agent" || name == "ipam" || name == "cni" {
        // It runs the release binary against etcd.
        tools::ensure_debs(tools::ETCD_DEBS)?;
        run(cargo().args(["build", "--release", "-p", "palisade"]))?;
    }
    let rest: Vec<&String> = rest.iter().filter(|a| *a != "--").collect();
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "palisade-benches",
            "--bin",
            bin,
            "--",
        ])
        .args(rest))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(),
        Some("setup") => setup(),
        Some("report") => report(&args[1..]),
        Some("fuzz") => fuzz(&args[1..]),
        Some("structure") => structure::check(&root()),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo|test|setup|structure|report NAME [-- ARGS]|fuzz TARGET [--seconds N]>"
            );
            std::process::exit(2);
        }
    }
}
