//! The `palisade matrix` scale report (docs/scale.md), and the generated
//! clusters behind it.
//!
//! ```text
//! cargo build --release -p palisade -p palisade-benches
//! target/release/matrix-report gen 2000 > cluster.json     # one cluster, JSON lines
//! target/release/matrix-report run > docs/scale.md          # the whole report
//! ```
//!
//! Clusters come from `palisade_testing::testgen::scale_manifests` (the same
//! clusters as the compiler report) with 11 policies per 40 pods (2,000 pods:
//! 550 policies, 10% global) and every 100th pod without `status.podIP`,
//! as a pod not yet running has none. `run` times `palisade matrix` with
//! `/usr/bin/time -v` (wall time and peak resident memory) for the
//! compiled engine (JSON lines: every cell; the text summary) and the
//! reference engine (every cell at 500 pods; above that one client
//! namespace's rows, scaled to the whole matrix by rows).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use palisade_benches::{PODS_PER_NODE, SEED};
use palisade_testing::testgen::{Scale, scale_manifests};

/// Sizes measured by `run`.
const SIZES: [usize; 3] = [500, 2000, 5000];
/// Pod counts up to this run the reference engine over the whole matrix.
const REFERENCE_FULL_UP_TO: usize = 500;

fn manifests(pods: usize) -> String {
    let scale = Scale {
        pods,
        policies: pods * 11 / 40,
        pods_per_node: PODS_PER_NODE,
    };
    let mut out = String::new();
    let mut pod = 0;
    for mut doc in scale_manifests(scale, SEED) {
        if doc["kind"] == "Pod" {
            if pod % 100 == 99 {
                doc.as_object_mut().expect("object").remove("status");
            }
            pod += 1;
        }
        out.push_str(&doc.to_string());
        out.push('\n');
    }
    out
}

struct Run {
    seconds: f64,
    peak_kb: u64,
    output_bytes: u64,
    /// The JSON header's client and server counts (JSON runs).
    clients: u64,
    servers: u64,
}

/// Runs palisade under `/usr/bin/time -v`; stdout is counted, not kept
/// (every cell of 5,000 pods is gigabytes of JSON).
fn measure(palisade: &Path, args: &[&str]) -> Result<Run> {
    use std::io::{BufRead, Read};
    let mut child = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(palisade)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running /usr/bin/time")?;
    let mut stdout =
        std::io::BufReader::with_capacity(1 << 20, child.stdout.take().context("stdout")?);
    let mut stderr_pipe = child.stderr.take().context("stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let mut first = String::new();
    let mut output_bytes = stdout.read_line(&mut first)? as u64;
    output_bytes += std::io::copy(&mut stdout, &mut std::io::sink())?;
    let status = child.wait()?;
    let stderr = stderr_reader.join().expect("stderr reader");
    if !status.success() {
        bail!("palisade {args:?} failed: {stderr}");
    }
    let field = |name: &str| -> Result<&str> {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name:?} in /usr/bin/time output"))
    };
    // "h:mm:ss" or "m:ss.cc".
    let wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss):")?;
    let seconds = wall
        .split(':')
        .try_fold(0.0, |acc, part| part.parse::<f64>().map(|v| acc * 60.0 + v))?;
    let peak_kb = field("Maximum resident set size (kbytes):")?.parse()?;
    let header: serde_json::Value = serde_json::from_str(&first).unwrap_or_default();
    let count = |k: &str| header["matrix"][k].as_u64().unwrap_or(0);
    Ok(Run {
        seconds,
        peak_kb,
        output_bytes,
        clients: count("clients"),
        servers: count("servers"),
    })
}

fn mb(kb: u64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

fn run(palisade: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("matrix-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for pods in SIZES {
        let file = dir.join(format!("cluster-{pods}.json"));
        std::fs::write(&file, manifests(pods))?;
        let f = file.to_str().context("path")?;
        eprintln!("{pods} pods: compiled, JSON lines");
        let json = measure(palisade, &["matrix", "-f", f, "-o", "json"])?;
        eprintln!("{pods} pods: compiled, text summary");
        let summary = measure(palisade, &["matrix", "-f", f])?;
        let (reference, note) = if pods <= REFERENCE_FULL_UP_TO {
            eprintln!("{pods} pods: reference, JSON lines");
            let r = measure(
                palisade,
                &["matrix", "-f", f, "-o", "json", "--engine", "reference"],
            )?;
            (r.seconds, "whole matrix".to_string())
        } else {
            // One namespace's pods as clients: 50 rows of the matrix.
            eprintln!("{pods} pods: reference, the rows of ns-0");
            let r = measure(
                palisade,
                &[
                    "matrix",
                    "-f",
                    f,
                    "-o",
                    "json",
                    "--engine",
                    "reference",
                    "--from",
                    "ns-0",
                ],
            )?;
            let rows_sampled = r.clients.max(1);
            let scale = json.clients as f64 / rows_sampled as f64;
            (
                r.seconds * scale,
                format!(
                    "{:.1} s for the {rows_sampled} rows of ns-0, × {scale:.0}",
                    r.seconds
                ),
            )
        };
        rows.push((pods, json, summary, reference, note));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "# `palisade matrix` at scale\n")?;
    writeln!(
        out,
        "Measured with `target/release/matrix-report run` (benches/src/bin/matrix-report.rs) on {} cores; \
         wall time and peak resident memory from `/usr/bin/time -v`, one run each. Clusters: \
         `palisade_testing::testgen::scale_manifests`, 11 policies per 40 pods (10% GlobalNetworkPolicies), \
         every 100th pod without `status.podIP` (reported and skipped). Port TCP/80.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )?;
    writeln!(
        out,
        "| pods | cells | compiled, `-o json` (every cell) | peak memory | output | compiled, text summary | peak memory | reference, every cell | reference measured on |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for (pods, json, summary, reference, note) in rows {
        writeln!(
            out,
            "| {pods} | {} | {:.1} s | {} | {:.0} MB | {:.1} s | {} | {:.0} s | {note} |",
            json.clients * json.servers,
            json.seconds,
            mb(json.peak_kb),
            json.output_bytes as f64 / 1e6,
            summary.seconds,
            mb(summary.peak_kb),
            reference,
        )?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gen") => {
            let pods: usize = args
                .get(1)
                .context("usage: matrix-report gen PODS")?
                .parse()?;
            print!("{}", manifests(pods));
            Ok(())
        }
        Some("run") => {
            let palisade = args.get(1).map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/palisade")
            });
            run(&palisade)
        }
        _ => bail!("usage: matrix-report gen PODS | run [PATH-TO-PALISADE]"),
    }
}
