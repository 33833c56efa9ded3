//! The IPAM report: assignments and releases per second and their p50/p99
//! latency against the embedded store and etcd, at 1, 2 and 8 concurrent
//! allocator processes on one node, next to the floor measured in the
//! same run (one durable write of the store: an fsynced redb commit, one
//! etcd transaction round trip). Writes `docs/ipam-benchmark.md`.
//!
//! ```text
//! cargo xtask report ipam                 # 400 operations per allocator
//! cargo xtask report ipam -- --ops 1000
//! ```
//!
//! Allocators are `palisade ipam exercise` processes (release build), 60%
//! assigns and 40% releases, one address per assign, each draining what it
//! holds at the end; every acknowledged step is journaled, as in the
//! crash test. Throughput is operations over the slowest allocator's
//! loop time; latencies are per call as the allocator timed them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_datastore::{EmbeddedIpamStore, EtcdConfig, EtcdIpamStore};
use palisade_ipam::store::{Expect, IpamStore, Write};
use palisade_testing::etcd::EtcdCluster;

fn palisade_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/palisade")
}

struct Latency {
    p50_us: u64,
    p99_us: u64,
    per_second: f64,
}

fn percentiles(mut v: Vec<Duration>, wall: Duration) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_micros() as u64;
    Latency {
        p50_us: at(0.5),
        p99_us: at(0.99),
        per_second: v.len() as f64 / wall.as_secs_f64(),
    }
}

/// One durable single-key write, `n` times.
fn floor(store: &dyn IpamStore, n: usize) -> Result<Latency> {
    let mut v = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let w = Write::Put {
            key: format!("/calico/ipam/v2/handle/floor-{i}"),
            value: br#"{"block":{"10.0.0.0/26":1}}"#.to_vec(),
            expect: Expect::Absent,
        };
        let t = Instant::now();
        store.commit(&[w])?;
        v.push(t.elapsed());
    }
    Ok(percentiles(v, start.elapsed()))
}

/// One durable single-key write from each of `writers` threads at once,
/// `n` times each (distinct keys, so no conflicts): the floor when that
/// many allocators share the store and the machine.
fn concurrent_floor(store: &dyn IpamStore, writers: usize, n: usize) -> Result<Latency> {
    let start = Instant::now();
    let all: Vec<Duration> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut v = Vec::with_capacity(n);
                    for i in 0..n {
                        let write = Write::Put {
                            key: format!("/calico/ipam/v2/handle/floor-{w}-{i}"),
                            value: br#"{"block":{"10.0.0.0/26":1}}"#.to_vec(),
                            expect: Expect::Absent,
                        };
                        let t = Instant::now();
                        store.commit(&[write])?;
                        v.push(t.elapsed());
                    }
                    Ok(v)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow::anyhow!("a writer panicked"))?)
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    Ok(percentiles(all, start.elapsed()))
}

/// One single-key read, `n` times (what each extra round trip costs).
fn read_floor(store: &dyn IpamStore, n: usize) -> Result<Latency> {
    let mut v = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        store.get(&format!("/calico/ipam/v2/handle/floor-{}", i % 50))?;
        v.push(t.elapsed());
    }
    Ok(percentiles(v, start.elapsed()))
}

fn wipe(store: &dyn IpamStore) -> Result<()> {
    for chunk in store.list(palisade_ipam::store::PREFIX)?.chunks(64) {
        let writes: Vec<Write> = chunk
            .iter()
            .map(|e| Write::Delete {
                key: e.key.clone(),
                revision: e.revision,
            })
            .collect();
        store.commit(&writes)?;
    }
    Ok(())
}

fn palisade(store: &[String], args: &[&str]) -> Result<String> {
    let out = Command::new(palisade_bin())
        .args(args)
        .args(store)
        .output()
        .context("running palisade")?;
    if !out.status.success() {
        bail!(
            "palisade {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

struct Run {
    ops: usize,
    seconds: f64,
    assign: (u64, u64),
    release: (u64, u64),
}

/// `n` allocators at once, `ops` each: all on node-a, or (`spread`) one
/// per node, as one agent per node would be.
fn allocators(store: &[String], dir: &Path, n: usize, ops: usize, spread: bool) -> Result<Run> {
    let children: Vec<_> = (0..n)
        .map(|i| {
            let node = if spread {
                NODES[i % NODES.len()]
            } else {
                "node-a"
            };
            Command::new(palisade_bin())
                .args(["ipam", "exercise", "--node", node, "--drain"])
                .args(["--ops", &ops.to_string(), "--seed", &(i + 1).to_string()])
                .arg("--journal")
                .arg(dir.join(format!("journal-{n}-{i}")))
                .args(store)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut run = Run {
        ops: 0,
        seconds: 0.0,
        assign: (0, 0),
        release: (0, 0),
    };
    let (mut a50, mut r50) = (Vec::new(), Vec::new());
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("allocator: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let count = |k: &str| v[k]["count"].as_u64().unwrap_or(0) as usize;
        run.ops += count("assign") + count("release");
        run.seconds = run.seconds.max(v["seconds"].as_f64().unwrap_or(0.0));
        a50.push(v["assign"]["p50_us"].as_u64().unwrap_or(0));
        r50.push(v["release"]["p50_us"].as_u64().unwrap_or(0));
        run.assign.1 = run
            .assign
            .1
            .max(v["assign"]["p99_us"].as_u64().unwrap_or(0));
        run.release.1 = run
            .release
            .1
            .max(v["release"]["p99_us"].as_u64().unwrap_or(0));
    }
    // p50: the median allocator's; p99: the worst allocator's (conservative).
    a50.sort();
    r50.sort();
    run.assign.0 = a50[a50.len() / 2];
    run.release.0 = r50[r50.len() / 2];
    Ok(run)
}

const POOLS: &str = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: frontend}\n\
spec: {cidr: 10.10.0.0/16, vxlanMode: Always, natOutgoing: true}\n---\n\
apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-a}\n";

/// Nodes for allocators spread one per node.
const NODES: [&str; 8] = [
    "node-a", "node-b", "node-c", "node-d", "node-e", "node-f", "node-g", "node-h",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ops: usize = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(400), |s| s.parse())?;
    if !palisade_bin().exists() {
        bail!(
            "{} is missing: cargo build --release -p palisade",
            palisade_bin().display()
        );
    }
    let dir = std::env::temp_dir().join(format!("palisade-ipam-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pools = dir.join("pools.yaml");
    std::fs::write(&pools, POOLS)?;
    let nodes = dir.join("nodes.yaml");
    let node_docs: Vec<String> = NODES
        .iter()
        .map(|n| format!("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {n}}}\n"))
        .collect();
    std::fs::write(&nodes, node_docs.join("---\n"))?;
    let etcd = EtcdCluster::start(&dir.join("etcd"), 1, None)?;
    let endpoint = etcd.endpoint(0);
    let etcd_config = EtcdConfig {
        endpoints: vec![endpoint.clone()],
        ..EtcdConfig::default()
    };

    let mut md = String::new();
    writeln!(
        md,
        "# IPAM: assignments and releases against the store's floor\n"
    )?;
    writeln!(
        md,
        "`cargo xtask report ipam` on this machine ({} cores), {ops} operations per allocator (60% assigns of one address, 40% releases of a handle), all allocators on one node (so they contend for the same blocks) unless said otherwise. Floor: one durable single-key write of the same store in the same run. Goal: assign p50 within 2x of the floor (the common assignment is one commit: the block and its handle).\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )?;
    writeln!(
        md,
        "| store | allocators | ops/s | assign p50 | assign p99 | release p50 | release p99 | floor p50 | floor p99 | one read p50 | assign p50 / floor p50 | floor p50, as many writers | assign p50 / that floor |"
    )?;
    writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    // The embedded store is one node's; etcd also with one allocator per
    // node, where they do not share blocks.
    let runs = [
        ("embedded", 1usize, false),
        ("embedded", 2, false),
        ("embedded", 8, false),
        ("etcd", 1, false),
        ("etcd", 2, false),
        ("etcd", 8, false),
        ("etcd", 2, true),
        ("etcd", 8, true),
    ];
    for (kind, n, spread) in runs {
        {
            let state = dir.join(format!("state-{kind}-{n}"));
            let store: Vec<String> = match kind {
                "embedded" => vec!["--state-dir".into(), state.display().to_string()],
                _ => vec![
                    "--datastore".into(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    endpoint.clone(),
                ],
            };
            palisade(&store, &["apply", "-f", pools.to_str().unwrap_or_default()])?;
            if spread {
                palisade(&store, &["apply", "-f", nodes.to_str().unwrap_or_default()])?;
            }
            let records: Box<dyn IpamStore> = match kind {
                "embedded" => Box::new(EmbeddedIpamStore::open(state.join("ipam.redb"))?),
                _ => Box::new(EtcdIpamStore::connect(&etcd_config)?),
            };
            wipe(records.as_ref())?;
            let f = floor(records.as_ref(), 300)?;
            let r = read_floor(records.as_ref(), 300)?;
            wipe(records.as_ref())?;
            let fc = concurrent_floor(records.as_ref(), n, 300usize.div_ceil(n).max(60))?;
            wipe(records.as_ref())?;
            let label = if spread {
                format!("{n}, one per node")
            } else {
                n.to_string()
            };
            eprintln!("{kind}: {label} allocators x {ops} ...");
            let run = allocators(&store, &dir, n, ops, spread)?;
            let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
            writeln!(
                md,
                "| {kind} | {label} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.2} |",
                run.ops as f64 / run.seconds,
                ms(run.assign.0),
                ms(run.assign.1),
                ms(run.release.0),
                ms(run.release.1),
                ms(f.p50_us),
                ms(f.p99_us),
                ms(r.p50_us),
                run.assign.0 as f64 / f.p50_us.max(1) as f64,
                ms(fc.p50_us),
                run.assign.0 as f64 / fc.p50_us.max(1) as f64
            )?;
            let _ = f.per_second;
        }
    }
    writeln!(
        md,
        "\nReading it:\n\n- An allocator that has run before remembers the host's affinities, the IPAM config and its blocks with their revisions, and assigns in **one etcd transaction** that also checks all of them (config, every affinity, no new affinity, each block passed over, the block used, the handle new): it lands only when a fresh read would have chosen the same. When something changed, the transaction fails, the allocator reads (one round trip, everything at once) and commits again.\n- A release reads the handle, then commits with the block as last seen (a stale one is a failed comparison and a read).\n- Several allocators on one node pick the same first block with room, as Calico does, so each commit makes the others' view stale: a conflict, a read and a retry, which shows in p99. Their floor is measured with as many writers at once (distinct keys, no conflicts), since they share etcd and the machine's 2 cores. A cluster runs one allocator per node (the agent), each with its own blocks: the rows \"one per node\".
- The embedded store's floor with several writers is threads of one process; its allocators are processes taking turns at the file's lock.\n"
    )?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ipam-benchmark.md");
    std::fs::write(&out, &md)?;
    print!("{md}");
    eprintln!("wrote {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
