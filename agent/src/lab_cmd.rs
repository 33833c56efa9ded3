//! `palisade lab`: the manifests of a folder on a real cluster of this
//! machine (`palisade_testing::lab`): nodes as namespaces on one underlay,
//! an agent each, a local etcd member, the VXLAN overlay; the folder's Pods
//! run on their `spec.nodeName` through CNI, everything else goes to the
//! datastore. Then it shows what the cluster did: the matrix of real
//! connections beside the reference engine's, the drops as each node's
//! kernel counted them, each node's VXLAN device and MTU, and where the
//! metrics are; and removes it all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use palisade_testing::lab::{Lab, LabConfig, http_get};
use policy_core::EndpointKey;
use rayon::prelude::*;
use serde_json::Value;

use crate::load::collect_files;

/// `palisade lab` flags.
#[derive(Args, Debug)]
pub struct LabArgs {
    /// Manifest files or folders: Pods run on the cluster, the rest is applied.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// The nodes.
    #[arg(long, value_delimiter = ',', default_value = "node-a,node-b")]
    nodes: Vec<String>,
    /// The shared datastore: a local etcd member, or the embedded store.
    #[arg(long, value_enum, default_value = "etcd")]
    datastore: crate::store_cmd::DatastoreKind,
    /// Node i's agent serves /metrics on 127.0.0.1:(this + i).
    #[arg(long, default_value_t = 9201)]
    first_port: u16,
    /// Explain one connection across the cluster (namespace/pod): the
    /// kernel's verdict and counters on both nodes beside the reference
    /// trace. With --explain-to and --explain-port.
    #[arg(long, requires_all = ["explain_to", "explain_port"])]
    explain_from: Option<String>,
    /// The connection's server (namespace/pod).
    #[arg(long)]
    explain_to: Option<String>,
    /// The connection's TCP port.
    #[arg(long)]
    explain_port: Option<u16>,
}

/// A drop a node's kernel counted: node, series, how many.
pub type Counted = (String, String, u64);

/// The counters that rose between two readings.
pub(crate) fn counted(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> Vec<Counted> {
    after
        .iter()
        .filter_map(|((node, series), v)| {
            let was = before
                .get(&(node.clone(), series.clone()))
                .copied()
                .unwrap_or(0);
            (*v > was).then(|| (node.clone(), series.clone(), v - was))
        })
        .collect()
}

/// Every node's non-zero drop counters, by node and series.
pub(crate) fn drop_counters(lab: &Lab) -> Result<BTreeMap<(String, String), u64>> {
    let mut out = BTreeMap::new();
    for node in &lab.nodes {
        let (_, metrics) = http_get(node.metrics, "/metrics")?;
        for l in metrics
            .lines()
            .filter(|l| l.starts_with("palisade_policy_drops"))
        {
            if let Some((series, v)) = l.rsplit_once(' ') {
                out.insert(
                    (node.name.clone(), series.to_string()),
                    v.parse().unwrap_or(0),
                );
            }
        }
    }
    Ok(out)
}

/// One connection across the lab: what happened, what each kernel
/// counted for it, and the reference engine's trace.
fn explain(
    lab: &Lab,
    dir: &Path,
    manifests: &str,
    endpoints: &str,
    from: &str,
    to: &str,
    port: u16,
) -> Result<()> {
    let find = |name: &str| {
        lab.pods
            .iter()
            .position(|p| p.key.to_string() == name)
            .with_context(|| format!("--explain: no pod {name} in the lab"))
    };
    let (a, b) = (find(from)?, find(to)?);
    let before = drop_counters(lab)?;
    let ok = lab.connects(a, lab.pods[b].addr, port, Duration::from_secs(1));
    // Drop events reach the counters through each agent's telemetry.
    std::thread::sleep(Duration::from_millis(1500));
    let after = drop_counters(lab)?;
    println!(
        "{from} ({} on {}) -> {to} ({} on {}) TCP {port}: {}",
        lab.pods[a].addr,
        lab.nodes[lab.pods[a].node].name,
        lab.pods[b].addr,
        lab.nodes[lab.pods[b].node].name,
        if ok { "connected" } else { "no connection" }
    );
    let rose = counted(&before, &after);
    for (node, series, n) in &rose {
        println!("  {node}'s kernel: +{n} {series}");
    }
    if rose.is_empty() {
        println!("  no kernel counted a drop for it");
    }
    let m = dir.join("explain");
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("manifests.yaml"), manifests)?;
    std::fs::write(m.join("endpoints.yaml"), endpoints)?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "explain",
            "--from",
            from,
            "--to",
            to,
            "--port",
            &port.to_string(),
            "-f",
        ])
        .arg(&m)
        .output()?;
    println!("  the reference engine's trace:");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {l}");
    }
    Ok(())
}

/// A Pod of the manifests, to run.
pub(crate) struct Workload {
    pub key: EndpointKey,
    pub node: usize,
    labels: serde_json::Map<String, Value>,
    pools: Vec<String>,
    pub ports: Vec<u16>,
}

pub(crate) fn step(n: &mut usize, text: &str) {
    *n += 1;
    eprintln!("[{n:>2}] {text}");
}

/// Splits the documents: Pods to run, the rest (as YAML) to apply.
fn split(files: &[PathBuf], nodes: &[String]) -> Result<(Vec<Workload>, String)> {
    let mut pods = Vec::new();
    let mut rest = String::new();
    for path in collect_files(files, &["yaml", "yml", "json"])? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let v: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("{} document {}", path.display(), i + 1))?;
            if v.is_null() {
                continue;
            }
            if v["kind"] != "Pod" {
                rest.push_str("---\n");
                rest.push_str(&serde_json::to_string(&v)?);
                rest.push('\n');
                continue;
            }
            let meta = &v["metadata"];
            let key = EndpointKey::new(
                meta["namespace"].as_str().unwrap_or("default"),
                meta["name"].as_str().unwrap_or_default(),
            );
            let node = match v["spec"]["nodeName"].as_str() {
                Some(n) => nodes
                    .iter()
                    .position(|x| x == n)
                    .with_context(|| format!("pod {key}: spec.nodeName {n} is not a lab node"))?,
                None => pods.len() % nodes.len(),
            };
            let pools = meta["annotations"]["cni.projectcalico.org/ipv4pools"]
                .as_str()
                .map(serde_json::from_str::<Vec<String>>)
                .transpose()
                .with_context(|| format!("pod {key}: the ipv4pools annotation is not a JSON list"))?
                .unwrap_or_default();
            let ports = v["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .filter_map(|p| {
                    p["containerPort"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                })
                .collect();
            pods.push(Workload {
                key,
                node,
                labels: meta["labels"].as_object().cloned().unwrap_or_default(),
                pools,
                ports,
            });
        }
    }
    if pods.is_empty() {
        bail!("no Pod in the manifests: nothing would run on the lab");
    }
    Ok((pods, rest))
}

/// The reference engine's verdicts for `port` over the stored endpoints.
fn reference(
    dir: &Path,
    manifests: &str,
    endpoints: &str,
    port: u16,
) -> Result<BTreeMap<(String, String), bool>> {
    let m = dir.join(format!("reference-{port}"));
    std::fs::create_dir_all(&m)?;
    std::fs::write(m.join("manifests.yaml"), manifests)?;
    std::fs::write(m.join("endpoints.yaml"), endpoints)?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "matrix",
            "--engine",
            "reference",
            "-o",
            "json",
            "--port",
            &port.to_string(),
            "-f",
        ])
        .arg(&m)
        .output()?;
    if !out.status.success() {
        bail!(
            "the reference matrix: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut cells = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let c: Value = serde_json::from_str(line)?;
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        cells.insert((s(&c["from"]), s(&c["to"])), c["allowed"] == true);
    }
    Ok(cells)
}

/// A lab brought up from manifests: its Pods running through CNI.
pub(crate) struct Running {
    /// The cluster.
    pub lab: Lab,
    /// The Pods of the manifests, as they run.
    pub workloads: Vec<Workload>,
    /// Everything but the Pods (applied to the datastore).
    pub manifests: String,
    /// Its scratch folder (removed with [`Running::finish`]).
    pub dir: PathBuf,
}

impl Running {
    /// Removes the cluster: pods (CNI DEL), agents, namespaces, etcd.
    pub fn finish(self) {
        drop(self.lab);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Brings up nodes `nodes` (a local etcd member when `etcd`, else the
/// embedded store), applies the manifests but their Pods, and runs the
/// Pods through CNI (round robin over the nodes unless `spec.nodeName`
/// says), each listening on its container ports and `extra_ports`.
/// Progress goes to stderr as numbered steps (`n` counts them).
pub(crate) fn bring_up(
    files: &[PathBuf],
    nodes: &[String],
    etcd: bool,
    first_port: u16,
    extra_ports: &[u16],
    n: &mut usize,
) -> Result<Running> {
    let (mut workloads, manifests) = split(files, nodes)?;
    for w in &mut workloads {
        w.ports.extend_from_slice(extra_ports);
        w.ports.sort_unstable();
        w.ports.dedup();
    }
    let dir = std::env::temp_dir().join(format!("palisade-lab-{}", std::process::id()));
    let exe = std::env::current_exe()?;
    let cni = exe.with_file_name("palisade-cni");
    if !cni.exists() {
        bail!(
            "{} is missing (build the palisade package: it holds both binaries)",
            cni.display()
        );
    }
    let lab = Lab::start(
        LabConfig {
            dir: dir.clone(),
            nodes: nodes.to_vec(),
            etcd,
            palisade: exe,
            cni,
            first_port,
            tag: "pl".into(),
            underlay_mtu: 1500,
        },
        &|s| eprintln!("     {s}"),
    );
    let mut lab = lab?;
    step(n, "cluster up: applying the policies, pools and namespaces");
    std::fs::write(dir.join("manifests.yaml"), &manifests)?;
    lab.palisade(&[
        "apply",
        "-f",
        &dir.join("manifests.yaml").display().to_string(),
    ])?;
    step(n, "waiting for every node to reach the others over VXLAN");
    lab.wait_overlay(0)?;
    for w in &workloads {
        let node = lab.nodes[w.node].name.clone();
        let pod = lab.add_pod(w.node, w.key.clone(), &w.labels, &w.pools, &w.ports)?;
        step(
            n,
            &format!(
                "pod {:<28} on {node}: {:<12} pools {:?}",
                w.key.to_string(),
                pod.addr,
                w.pools
            ),
        );
    }
    let busy: std::collections::BTreeSet<usize> = workloads.iter().map(|w| w.node).collect();
    step(n, "waiting for the routes to every node's blocks");
    lab.wait_overlay(busy.len() as u64)?;
    Ok(Running {
        lab,
        workloads,
        manifests,
        dir,
    })
}

/// Runs `palisade lab`.
pub fn run(args: LabArgs) -> Result<std::process::ExitCode> {
    let started = Instant::now();
    let mut n = 0;
    let etcd = args.datastore == crate::store_cmd::DatastoreKind::Etcd;
    let running = bring_up(&args.files, &args.nodes, etcd, args.first_port, &[], &mut n)?;
    let (lab, workloads, manifests, dir) = (
        &running.lab,
        &running.workloads,
        &running.manifests,
        &running.dir,
    );

    // The matrix, per port: real connections beside the reference engine.
    let endpoints = lab.palisade(&["get", "workloadendpoints", "-o", "yaml"])?;
    let mut ports: Vec<u16> = workloads.iter().flat_map(|w| w.ports.clone()).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut disagree = 0;
    let mut total = 0;
    for port in ports {
        step(
            &mut n,
            &format!(
                "TCP {port}: a real connection between every pair of pods, beside the reference engine"
            ),
        );
        let want = reference(dir, manifests, &endpoints, port)?;
        let pairs: Vec<(usize, usize)> = (0..lab.pods.len())
            .flat_map(|a| (0..lab.pods.len()).map(move |b| (a, b)))
            .filter(|(a, b)| a != b)
            .collect();
        let real: Vec<bool> = pairs
            .par_iter()
            .map(|(a, b)| lab.connects(*a, lab.pods[*b].addr, port, Duration::from_millis(600)))
            .collect();
        let names: Vec<String> = lab.pods.iter().map(|p| p.key.to_string()).collect();
        let width = names.iter().map(String::len).max().unwrap_or(4);
        println!(
            "\n{:>width$}  {}",
            "from \\ to",
            (0..names.len())
                .map(|i| format!("{:>3}", i + 1))
                .collect::<String>()
        );
        for (a, from) in names.iter().enumerate() {
            let mut row = format!("{from:>width$}  ");
            for b in 0..names.len() {
                if a == b {
                    row.push_str("  -");
                    continue;
                }
                let i = pairs.iter().position(|p| *p == (a, b)).unwrap_or(0);
                let expected = want.get(&(names[a].clone(), names[b].clone())).copied();
                total += 1;
                let mark = match (real[i], expected) {
                    (true, Some(true)) => "  ✓",
                    (false, Some(false)) => "  ·",
                    _ => {
                        disagree += 1;
                        "  !"
                    }
                };
                row.push_str(mark);
            }
            println!(
                "{row}   ({} on {})",
                a + 1,
                lab.nodes[lab.pods[a].node].name
            );
        }
        println!("✓ allowed  · denied  ! differs from the reference engine\n");
    }
    println!(
        "real connections agree with the reference engine: {}/{total}",
        total - disagree
    );

    step(
        &mut n,
        "what each node's kernel counted: new flows denied, by the rule that denied them",
    );
    for node in &lab.nodes {
        let (_, metrics) = http_get(node.metrics, "/metrics")?;
        let drops: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("palisade_policy_drops") && !l.ends_with(" 0"))
            .collect();
        println!("{}:", node.name);
        for d in &drops {
            println!("  {d}");
        }
        if drops.is_empty() {
            println!("  (none)");
        }
    }
    if let (Some(from), Some(to), Some(port)) =
        (&args.explain_from, &args.explain_to, args.explain_port)
    {
        step(
            &mut n,
            &format!("why: {from} -> {to} TCP {port}, across the cluster"),
        );
        explain(lab, dir, manifests, &endpoints, from, to, port)?;
    }
    step(&mut n, "the overlay on each node");
    for (i, node) in lab.nodes.iter().enumerate() {
        let s = lab.status(i)?;
        let o = &s["overlay"];
        println!(
            "{}: {} VNI 4096 MTU {} over {} (MTU {}); pods MTU {}; tunnel {}; {} routes; peers {}; natOutgoing {}",
            node.name,
            o["device"].as_str().unwrap_or("-"),
            o["deviceMtu"],
            o["underlay"].as_str().unwrap_or("-"),
            o["underlayMtu"],
            o["podMtu"],
            o["tunnel"].as_str().unwrap_or("-"),
            o["routes"],
            o["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!(
                    "{} via {}",
                    p["node"].as_str().unwrap_or(""),
                    p["underlay"].as_str().unwrap_or("")
                ))
                .collect::<Vec<_>>()
                .join(", "),
            o["natOutgoing"]
                .as_array()
                .filter(|a| !a.is_empty())
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_else(|| "(no pool)".into())
        );
    }
    step(&mut n, "metrics (Prometheus text) while the lab runs");
    for node in &lab.nodes {
        println!(
            "{}: http://{}/metrics  (status: palisade status --metrics-addr {})",
            node.name, node.metrics, node.metrics
        );
    }
    step(
        &mut n,
        "removing the cluster: pods (CNI DEL), agents, namespaces, etcd",
    );
    let ok = disagree == 0;
    running.finish();
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
