//! The node agent's latency report: from a write to etcd to every node's
//! maps holding it, p50/p99 over a few hundred changes, next to the floor
//! measured in the same run (etcd delivering the same write to a plain
//! watcher in this process); and each agent's time from start to ready and
//! its memory. Writes `docs/agent-latency.md`.
//!
//! ```text
//! cargo xtask report agent                       # 1k x 100 and 10k x 1k
//! cargo xtask report agent -- --sizes 1000x100 --changes 50
//! ```
//!
//! Three agents (release build) run as three nodes: a network namespace
//! each with a veth per local endpoint, fed by one etcd on
//! loopback. The rest of the pods live on nodes that are not run, so each
//! agent holds the whole cluster's identities and compiles programs for its
//! own endpoints, as on a node of a large cluster. A node's maps hold a
//! write once the agent logs that batch as written (the log line is emitted
//! after the map writes return); the timestamps of that line and of the
//! write share the machine's clock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, WatchOptions};
use palisade_testing::etcd::EtcdCluster;
use palisade_testing::netns::{Netns, ip_batch};

const NODES: usize = 3;
/// Local endpoints per node (dummy interfaces with programs attached).
const LOCAL: usize = 20;
const NAMESPACE_SIZE: usize = 100;

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing writes
/// it (`2026-12-04T07:10:15.067528Z`).
fn parse_time(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn wep(pod: usize, namespaces: usize, app: usize) -> serde_json::Value {
    let ns = format!("ns-{}", pod % namespaces);
    let local = pod < NODES * LOCAL;
    let node = if local {
        format!("node{}", pod % NODES)
    } else {
        format!("far-{}", pod % 97)
    };
    let iface = if local {
        format!("d{}", pod / NODES)
    } else {
        format!("far{pod}")
    };
    let name = format!("pod-{pod}");
    serde_json::json!({
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": format!("{node}-k8s-{name}-eth0"), "namespace": ns,
                     "labels": {"app": format!("a{app}"), "tier": format!("t{}", pod % 7)}},
        "spec": {"node": node, "orchestrator": "k8s", "pod": name, "endpoint": "eth0",
                 "interfaceName": iface,
                 "ipNetworks": [format!("10.{}.{}.{}/32", 64 + pod / 65_536, (pod / 256) % 256, pod % 256)],
                 "profiles": [format!("kns.{ns}")]}
    })
}

fn policy(k: usize, namespaces: usize, port: u16) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": format!("p{k}"), "namespace": format!("ns-{}", k % namespaces)},
        "spec": {"order": 100 + k % 50, "selector": format!("app == 'a{}'", k % 50),
                 "types": ["Ingress", "Egress"],
                 "ingress": [{"action": "Allow", "protocol": "TCP",
                              "source": {"selector": format!("app == 'a{}' || tier == 't{}'", (k + 1) % 50, k % 7)},
                              "destination": {"ports": [port]}}],
                 "egress": [{"action": "Allow", "protocol": "TCP",
                             "destination": {"namespaceSelector": format!("team == 'x{}'", k % 10)}}]}
    })
}

fn key(doc: &serde_json::Value) -> String {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let plural = match kind {
        "WorkloadEndpoint" => "workloadendpoints",
        "NetworkPolicy" => "networkpolicies",
        _ => "profiles",
    };
    let ns = doc["metadata"]["namespace"].as_str();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    match ns {
        Some(ns) => format!("/calico/resources/v3/projectcalico.org/{plural}/{ns}/{name}"),
        None => format!("/calico/resources/v3/projectcalico.org/{plural}/{name}"),
    }
}

fn namespace(i: usize) -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                       "metadata": {"name": format!("ns-{i}"), "labels": {"team": format!("x{}", i % 10)}}})
}

struct Agent {
    child: Child,
    log: PathBuf,
    pins: PathBuf,
    metrics: String,
    read: u64,
    /// Revision -> when its batch was written.
    written: BTreeMap<u64, f64>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

impl Agent {
    /// Reads the log lines written since the last call.
    fn poll(&mut self) -> Result<()> {
        let mut f = std::fs::File::open(&self.log)?;
        f.seek(SeekFrom::Start(self.read))?;
        let mut r = BufReader::new(f);
        let mut line = String::new();
        while r.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break;
            }
            self.read += line.len() as u64;
            if line.contains("batch written")
                && let (Some(ts), Some(rev)) = (
                    line.split_whitespace().next().and_then(parse_time),
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix("revision="))
                        .and_then(|r| r.parse::<u64>().ok()),
                )
            {
                self.written.insert(rev, ts);
            }
            line.clear();
        }
        Ok(())
    }

    /// When the first batch at or after `rev` was written.
    fn written_at(&self, rev: u64) -> Option<f64> {
        self.written.range(rev..).next().map(|(_, t)| *t)
    }

    /// `palisade status -o json` (exit 0 once ready).
    fn status_json(&self) -> Option<String> {
        let out = Command::new(palisade_bin())
            .args(["status", "-o", "json", "--metrics-addr", &self.metrics])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Resident memory in MB: the agent's own (heap, stacks: `RssAnon`)
    /// and the BPF maps it has mapped (`RssFile` + `RssShmem`: kernel
    /// memory the programs use, shared with them).
    fn rss_mb(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
    }
}

fn palisade_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/palisade")
}

struct Row {
    pods: usize,
    policies: usize,
    changes: usize,
    floor: (f64, f64),
    nodes: (f64, f64),
    per_node_p99: Vec<f64>,
    ready_s: Vec<f64>,
    rss_mb: Vec<(f64, f64)>,
}

fn run(pods: usize, policies: usize, changes: usize, scratch: &Path) -> Result<Row> {
    let namespaces = pods.div_ceil(NAMESPACE_SIZE);
    eprintln!("== {pods} pods x {policies} policies: starting etcd");
    let etcd = EtcdCluster::start(&scratch.join("etcd"), 1, None)?;
    let endpoints = etcd.endpoints();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut client = rt.block_on(Client::connect(&endpoints, None))?;
    let mut docs: Vec<serde_json::Value> = (0..namespaces).map(namespace).collect();
    docs.extend((0..pods).map(|p| wep(p, namespaces, p % 50)));
    docs.extend((0..policies).map(|k| policy(k, namespaces, 8000 + (k % 100) as u16)));
    eprintln!("   writing {} objects", docs.len());
    for d in &docs {
        let k = match d["kind"].as_str() {
            Some("Namespace") => format!(
                "/palisade/resources/core/namespaces/{}",
                d["metadata"]["name"].as_str().unwrap_or_default()
            ),
            _ => key(d),
        };
        rt.block_on(client.put(k, d.to_string(), None))?;
    }

    // The nodes: a namespace each, with an interface per local endpoint.
    let nss: Vec<Netns> = (0..NODES)
        .map(|i| Netns::create(&format!("palbench{}-{i}", std::process::id())))
        .collect::<Result<_, _>>()?;
    for ns in &nss {
        let mut lines = vec!["link set lo up".to_string()];
        for j in 0..LOCAL {
            // veth, not dummy: this kernel has no dummy driver.
            lines.push(format!("link add d{j} type veth peer name e{j}"));
            lines.push(format!("link set d{j} up"));
            lines.push(format!("link set e{j} up"));
        }
        ip_batch(Some(ns.name()), &lines)?;
    }

    // The floor: a watcher in this process, as close to etcd as it gets.
    let (floor_tx, floor_rx) = mpsc::channel::<(u64, f64)>();
    {
        let mut client = client.clone();
        rt.spawn(async move {
            let Ok(mut stream) = client
                .watch("/calico/", Some(WatchOptions::new().with_prefix()))
                .await
            else {
                return;
            };
            while let Ok(Some(resp)) = stream.message().await {
                let at = now_s();
                if let Some(h) = resp.header()
                    && !resp.events().is_empty()
                {
                    let _ = floor_tx.send((h.revision() as u64, at));
                }
            }
        });
    }

    let mut agents = Vec::new();
    let mut ready_s = Vec::new();
    for (i, ns) in nss.iter().enumerate() {
        let metrics = format!("127.0.0.1:{}", 19_300 + i);
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-bench-{}-{i}",
            std::process::id()
        ));
        let log = scratch.join(format!("agent{i}.log"));
        let started = Instant::now();
        let child = Command::new(palisade_bin())
            .args([
                "agent",
                "--node",
                &format!("node{i}"),
                "--datastore",
                "etcd",
            ])
            .args(["--etcd-endpoints", &endpoints.join(",")])
            .args([
                "--netns",
                ns.name(),
                "--metrics-addr",
                &metrics,
                "--log",
                "palisade=debug",
            ])
            .arg("--pin-path")
            .arg(&pins)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent (build it: cargo build --release -p palisade)")?;
        let agent = Agent {
            child,
            log,
            pins,
            metrics,
            read: 0,
            written: BTreeMap::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(s) = agent.status_json()
                && s.contains("\"ready\": true")
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {i} not ready after 10 minutes: see {}",
                    agent.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ready_s.push(started.elapsed().as_secs_f64());
        agents.push(agent);
        eprintln!("   agent {i} ready in {:.2} s", ready_s[i]);
    }
    let rss_mb: Vec<(f64, f64)> = agents.iter().map(Agent::rss_mb).collect();

    // The changes: a policy's port or a pod's labels, one at a time.
    let mut floors = Vec::new();
    let mut worst = Vec::new();
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); NODES];
    let mut floor_seen: BTreeMap<u64, f64> = BTreeMap::new();
    for step in 0..changes {
        let doc = if step % 2 == 0 {
            let k = (step * 7) % policies;
            policy(k, namespaces, 9000 + (step % 1000) as u16)
        } else {
            let p = (step * 13) % pods;
            wep(p, namespaces, (p + step) % 50)
        };
        let t0 = now_s();
        let resp = rt.block_on(client.put(key(&doc), doc.to_string(), None))?;
        let rev = resp.header().map_or(0, |h| h.revision()) as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut times = [None; NODES];
        while times.iter().any(Option::is_none) || !floor_seen.contains_key(&rev) {
            while let Ok((r, at)) = floor_rx.try_recv() {
                floor_seen.insert(r, at);
            }
            for (i, a) in agents.iter_mut().enumerate() {
                if times[i].is_none() {
                    a.poll()?;
                    times[i] = a.written_at(rev);
                }
            }
            if Instant::now() > deadline {
                bail!("revision {rev} not written by every agent within 60 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        floors.push((floor_seen[&rev] - t0) * 1e3);
        let lat: Vec<f64> = times.iter().map(|t| (t.unwrap_or(t0) - t0) * 1e3).collect();
        for (i, l) in lat.iter().enumerate() {
            per_node[i].push(*l);
        }
        worst.push(lat.iter().copied().fold(0.0, f64::max));
        if step % 50 == 49 {
            eprintln!("   {} changes", step + 1);
        }
    }
    drop(agents);
    drop(nss);
    drop(etcd);
    Ok(Row {
        pods,
        policies,
        changes,
        floor: (percentile(&floors, 0.5), percentile(&floors, 0.99)),
        nodes: (percentile(&worst, 0.5), percentile(&worst, 0.99)),
        per_node_p99: per_node.iter().map(|v| percentile(v, 0.99)).collect(),
        ready_s,
        rss_mb,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let sizes: Vec<(usize, usize)> = flag("--sizes")
        .unwrap_or_else(|| "1000x100,10000x1000".into())
        .split(',')
        .map(|s| {
            let (p, q) = s.split_once('x').context("--sizes PODSxPOLICIES,...")?;
            Ok((p.parse()?, q.parse()?))
        })
        .collect::<Result<_>>()?;
    let changes: usize = flag("--changes").map_or(Ok(300), |c| c.parse())?;
    if !palisade_bin().exists() {
        bail!(
            "{} is missing: cargo build --release -p palisade",
            palisade_bin().display()
        );
    }
    let scratch =
        std::env::temp_dir().join(format!("palisade-agent-report-{}", std::process::id()));
    let mut rows = Vec::new();
    for (pods, policies) in sizes {
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        rows.push(run(pods, policies, changes, &scratch)?);
    }
    let _ = std::fs::remove_dir_all(&scratch);

    let mut md = String::new();
    writeln!(
        md,
        "# Agent latency: a datastore write to every node's maps\n"
    )?;
    writeln!(
        md,
        "`cargo xtask report agent` ({NODES} agents as {NODES} nodes, {LOCAL} local endpoints each, \
         one etcd member on loopback, {} cores). Each change is one write (a policy's port or a \
         pod's labels), the next one after every node wrote it. **Floor**: etcd delivering the same \
         write to a watcher in the report's process. **Nodes**: the last of the {NODES} agents to \
         have written its maps.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(
        md,
        "| pods x policies | changes | floor p50 | floor p99 | nodes p50 | nodes p99 | p99 above the floor | per node p99 (ms) | start to ready | agent memory | BPF maps mapped |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} x {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | **{:.2} ms** | {} | {} | {} | {} |",
            r.pods,
            r.policies,
            r.changes,
            r.floor.0,
            r.floor.1,
            r.nodes.0,
            r.nodes.1,
            r.nodes.1 - r.floor.1,
            r.per_node_p99
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.ready_s
                .iter()
                .map(|v| format!("{v:.1} s"))
                .collect::<Vec<_>>()
                .join(" / "),
            r.rss_mb
                .iter()
                .map(|v| format!("{:.0} MB", v.0))
                .collect::<Vec<_>>()
                .join(" / "),
            r.rss_mb
                .iter()
                .map(|v| format!("{:.0} MB", v.1))
                .collect::<Vec<_>>()
                .join(" / "),
        )?;
    }
    writeln!(
        md,
        "\nGoal: p99 within 10 ms of the floor at 10k x 1k (Cilium publishes seconds of policy \
         regeneration at that scale). Start to ready: process start to the first complete \
         listing compiled, loaded and attached; the agents start one after the other. \
         Memory: the agent's own resident memory (`RssAnon`), and the BPF maps it has \
         mapped into its address space (`RssFile` + `RssShmem`: kernel memory the programs \
         use, counted in RSS because the agent maps the large arrays to write them)."
    )?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent-latency.md");
    std::fs::write(&out, &md)?;
    print!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
