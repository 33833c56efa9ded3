//! Build orchestration for Palisade.
//!
//! ```text
//! cargo xtask demo                 # the main job on the embedded defaults
//! cargo xtask test                 # the whole test suite, as CI runs it
//! cargo xtask fuzz <target> [--seconds N]
//! ```
//!
//! Each command installs what it needs on first use (rustup components,
//! cargo tools) and prints every step it runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

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
        .output()
        .is_ok_and(|o| o.status.success())
}

/// rustfmt and clippy for the stable toolchain.
fn ensure_lint_tools() -> Result<()> {
    if !have("cargo", &["fmt", "--version"]) {
        run(Command::new("rustup").args(["component", "add", "rustfmt"]))?;
    }
    if !have("cargo", &["clippy", "--version"]) {
        run(Command::new("rustup").args(["component", "add", "clippy"]))?;
    }
    Ok(())
}

/// The nightly toolchain and cargo-fuzz, for the fuzz targets.
fn ensure_fuzz_tools() -> Result<()> {
    if !have("rustc", &["+nightly", "--version"]) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !have("cargo", &["fuzz", "--version"]) {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// What the kernel programs need: nightly with rust-src (they build for the
/// BPF target with build-std), bpf-linker built against nightly's own LLVM,
/// and iproute2 for the network-namespace engine.
fn ensure_ebpf_tools() -> Result<()> {
    if !have("rustc", &["+nightly", "--version"]) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .context("rustc +nightly --print sysroot")?
            .stdout,
    )?
    .trim()
    .to_string();
    let rust_src = Path::new(&sysroot).join("lib/rustlib/src/rust/library");
    if !rust_src.exists() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13"));
    if !linker_ok {
        // Linked against the LLVM shared library that ships with nightly, so
        // the linker and rustc agree on the bitcode format.
        let lib = Path::new(&sysroot).join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
            .context("nightly ships no libLLVM-*.so")?;
        let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so");
        let l = lib.display();
        run(cargo()
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-L{l} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{l}"),
            )
            .args([
                "+nightly",
                "install",
                "bpf-linker@0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22,no-llvm-linking",
            ]))?;
    }
    if !have("ip", &["-V"]) {
        apt_install(&["iproute2"])?;
    }
    Ok(())
}

/// What the C ABI tests need: a C and C++ compiler, valgrind, and
/// unshare (util-linux) to attach in a private network namespace.
fn ensure_ffi_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !have("cc", &["--version"]) {
        missing.push("gcc");
    }
    if !have("c++", &["--version"]) {
        missing.push("g++");
    }
    if !have("valgrind", &["--version"]) {
        missing.push("valgrind");
    }
    if !have("unshare", &["--version"]) {
        missing.push("util-linux");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether this process may load BPF programs and create namespaces. When
/// it may not, privileged steps are skipped with a notice, unless
/// PALISADE_REQUIRE_PRIVILEGED is set (CI sets it): then it is an error.
fn privileged(what: &str) -> Result<bool> {
    let root = nix_uid_is_root();
    if root {
        return Ok(true);
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        bail!("{what} needs root, and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("SKIPPED (not root): {what}");
    Ok(false)
}

fn nix_uid_is_root() -> bool {
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

fn palisade() -> PathBuf {
    root().join("target/release/palisade")
}

fn test() -> Result<()> {
    let started = Instant::now();
    let mut s = Steps { done: Vec::new() };
    s.step("tools", || {
        ensure_lint_tools()?;
        ensure_ebpf_tools()?;
        ensure_ffi_tools()
    })?;
    s.step("format", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
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
                        .arg(c.join("extra")))
                },
            )?;
        }
    }
    s.step("fuzz targets build", || {
        ensure_fuzz_tools()?;
        run(Command::new("cargo").args(["+nightly", "fuzz", "build", "--fuzz-dir", "fuzz"]))
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

/// The corpus vendored in the repository, plus the shared one next to the
/// checkout when it exists (it may hold cases added since).
fn conformance_roots() -> Vec<PathBuf> {
    let vendored = root().join("conformance");
    let mut v = vec![vendored.clone()];
    let shared = root().join("../shared/conformance");
    if shared.join("selectors.jsonl").exists() && !same_tree(&vendored, &shared) {
        v.push(shared);
    }
    v
}

/// Whether two corpus folders hold the same files with the same contents.
fn same_tree(a: &Path, b: &Path) -> bool {
    fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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
    ensure_ebpf_tools()?;
    run(cargo().args(["build", "--release", "-p", "palisade"]))?;
    if !nix_uid_is_root() {
        bail!(
            "the demo enforces policy in the kernel (BPF programs, network namespaces): run it as root"
        );
    }
    let example = root().join("examples/zero-trust");
    eprintln!(
        "\nZero-trust example: default-deny GlobalNetworkPolicy + allow-only namespace policies,\n\
         enforced by the TC programs on real connections between pod namespaces\n"
    );
    for port in ["8080", "5432"] {
        run(Command::new(palisade())
            .args(["matrix", "--engine", "netns", "--port", port, "-f"])
            .arg(&example))?;
        println!();
    }
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
    ensure_fuzz_tools()?;
    let corpus = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    seed_corpus(target, &corpus)?;
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", target])
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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(),
        Some("fuzz") => fuzz(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <demo|test|fuzz TARGET [--seconds N]>");
            std::process::exit(2);
        }
    }
}
