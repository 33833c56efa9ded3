//! The services control-plane report: programming N Services with 10
//! endpoints each from scratch, and one endpoint change, with Palisade
//! (Services and EndpointSlices read, the node's table built, lowered to
//! the service maps' entries and, for a change, diffed against what the
//! maps hold) next to kube-proxy's rules for the same Services loaded by
//! `iptables-restore` and `nft -f` into a fresh network namespace, in the
//! same run. Writes `docs/services-control-plane.md` and `.svg`.
//!
//! ```text
//! cargo xtask report services                    # 100, 1k and 10k Services
//! cargo xtask report services -- --sizes 100,1000
//! ```
//!
//! Not measured yet: writing the entries into kernel maps (the kernel
//! program does not carry the service maps yet); the Palisade numbers are
//! user-space work only, and say so.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_benches::chart::{Series, line_chart};
use palisade_benches::kube_proxy::{
    iptables_change, iptables_full, kp_services, nft_change, nft_full,
};
use palisade_services::topology::NodeTopology;
use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use policy_bpf::services::{ServiceCapacity, ServiceEntries, lower_services};
use serde_json::{Value, json};

const ENDPOINTS: usize = 10;
const CLUSTER_CIDR: &str = "10.0.0.0/8";
const NETNS: &str = "palisade-svc-report";

fn service_docs(n: usize) -> Vec<Value> {
    let mut docs = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("svc{i}");
        let ns = format!("ns{}", i % 50);
        let node_port = i % 4 == 0 && i < 2700;
        let mut port = json!({"name": "http", "port": 80, "protocol": "TCP"});
        if node_port {
            port["nodePort"] = json!(30000 + i / 4);
        }
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"type": if node_port { "NodePort" } else { "ClusterIP" },
                     "clusterIP": format!("172.30.{}.{}", i / 250, i % 250 + 1), "ports": [port]}}));
        docs.push(slice(i, &ns, &name, 0));
    }
    docs
}

/// Service `i`'s slice: endpoints at 10.0.0.0 + 32i + host; `generation`
/// moves its last endpoint.
fn slice(i: usize, ns: &str, name: &str, generation: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|e| {
            let host = if e == ENDPOINTS - 1 {
                10 + generation % 20
            } else {
                e + 1
            };
            let addr = std::net::Ipv4Addr::from(0x0A00_0000u32 + ((i as u32) << 5) + host as u32);
            json!({"addresses": [addr.to_string()],
                   "nodeName": if e % 2 == 0 { "node-a" } else { "node-b" }})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{name}-1"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn config() -> ProxyConfig {
    ProxyConfig {
        family: Family::V4,
        node: NodeTopology {
            name: "node-a".into(),
            ..Default::default()
        },
        node_ips: vec!["192.168.0.2".parse().expect("ip")],
        cluster_cidrs: vec![CLUSTER_CIDR.parse().expect("cidr")],
        service_cidrs: vec!["172.30.0.0/16".parse().expect("cidr")],
        masquerade_all: false,
        node_port_addresses: vec![],
    }
}

/// Everything Palisade does to program the Services from their objects.
fn program(objects: &Objects) -> Result<(ServiceTable, ServiceEntries)> {
    let table = ServiceTable::build(config(), &objects.service_ports(Family::V4)?);
    let entries = lower_services(&table, &ServiceCapacity::default())?;
    Ok((table, entries))
}

/// Entries that differ (what a change writes or deletes).
fn diff(a: &ServiceEntries, b: &ServiceEntries) -> usize {
    let fronts = a
        .frontends
        .iter()
        .filter(|(k, v)| b.frontends.get(k) != Some(v))
        .count()
        + b.frontends
            .keys()
            .filter(|k| !a.frontends.contains_key(k))
            .count();
    let svcs = a
        .services
        .iter()
        .zip(&b.services)
        .filter(|(x, y)| x != y)
        .count()
        + a.services.len().abs_diff(b.services.len());
    let backs = a
        .backends
        .iter()
        .zip(&b.backends)
        .filter(|(x, y)| x != y)
        .count()
        + a.backends.len().abs_diff(b.backends.len());
    fronts + svcs + backs
}

fn sh(args: &[&str], stdin: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", args.join(" ")))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// A fresh namespace per full load, removed on drop.
struct Netns;

impl Netns {
    fn fresh() -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", NETNS])
            .status()?
            .success();
        if !ok {
            bail!("ip netns add {NETNS} failed (run as root)");
        }
        Ok(Netns)
    }

    fn run(&self, tool: &[&str], input: &str) -> Result<Duration> {
        let mut args = vec!["ip", "netns", "exec", NETNS];
        args.extend_from_slice(tool);
        sh(&args, input)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1000.0
}

struct Row {
    services: usize,
    rules_iptables: usize,
    palisade_full: f64,
    iptables_full: f64,
    nft_full: f64,
    palisade_change: (f64, f64, f64),
    iptables_change: (f64, f64),
    nft_change: (f64, f64),
}

fn measure(n: usize, full_runs: usize, changes: usize) -> Result<Row> {
    let docs = service_docs(n);
    // From scratch: objects read, table built, entries lowered.
    let mut palisade = Vec::new();
    let mut state = None;
    for _ in 0..full_runs {
        let t = Instant::now();
        let objects = Objects::from_documents(&docs)?;
        let (table, entries) = program(&objects)?;
        palisade.push(t.elapsed());
        state = Some((objects, table, entries));
    }
    let (mut objects, table, mut entries) = state.context("no run")?;
    let kp = kp_services(&table);
    let ipt = iptables_full(&kp, CLUSTER_CIDR);
    let nft = nft_full(&kp, CLUSTER_CIDR);
    let mut ipt_full = Vec::new();
    let mut nft_full_t = Vec::new();
    for _ in 0..full_runs {
        let ns = Netns::fresh()?;
        ipt_full.push(ns.run(&["iptables-restore"], &ipt)?);
        drop(ns);
        let ns = Netns::fresh()?;
        nft_full_t.push(ns.run(&["nft", "-f", "-"], &nft)?);
    }
    // One endpoint change at a time, on a node holding all the Services.
    let ns = Netns::fresh()?;
    ns.run(&["iptables-restore"], &ipt)?;
    ns.run(&["nft", "-f", "-"], &nft)?;
    let (mut p_change, mut i_change, mut n_change, mut written) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut kp_now = kp.clone();
    for c in 0..changes {
        let i = (c * 7919) % n;
        let name = format!("svc{i}");
        let ns_name = format!("ns{}", i % 50);
        let new_slice = slice(i, &ns_name, &name, c + 1);
        let t = Instant::now();
        let updated: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(new_slice)?;
        if let Some(s) = objects.slices.iter_mut().find(|s| {
            s.metadata.name.as_deref() == Some(&format!("{name}-1"))
                && s.metadata.namespace.as_deref() == Some(&ns_name)
        }) {
            *s = updated;
        }
        let (table2, entries2) = program(&objects)?;
        written += diff(&entries, &entries2);
        p_change.push(t.elapsed());
        entries = entries2;
        let kp2 = kp_services(&table2);
        let idx = kp_now
            .iter()
            .position(|s| s.name == format!("{ns_name}/{name}:http"))
            .context("service")?;
        i_change.push(ns.run(
            &["iptables-restore", "--noflush"],
            &iptables_change(&kp_now[idx], &kp2[idx], CLUSTER_CIDR),
        )?);
        n_change.push(ns.run(
            &["nft", "-f", "-"],
            &nft_change(&kp_now[idx], &kp2[idx], CLUSTER_CIDR),
        )?);
        kp_now = kp2;
    }
    drop(ns);
    Ok(Row {
        services: n,
        rules_iptables: ipt.lines().filter(|l| l.starts_with("-A")).count(),
        palisade_full: pct(&mut palisade, 0.5),
        iptables_full: pct(&mut ipt_full, 0.5),
        nft_full: pct(&mut nft_full_t, 0.5),
        palisade_change: (
            pct(&mut p_change, 0.5),
            pct(&mut p_change, 0.99),
            written as f64 / changes.max(1) as f64,
        ),
        iptables_change: (pct(&mut i_change, 0.5), pct(&mut i_change, 0.99)),
        nft_change: (pct(&mut n_change, 0.5), pct(&mut n_change, 0.99)),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes = palisade_benches::sizes_arg(&args, &[100, 1_000, 10_000])?;
    let mut rows = Vec::new();
    for n in &sizes {
        eprintln!("services report: {n} Services x {ENDPOINTS} endpoints ...");
        let row = measure(*n, 5, 30)?;
        eprintln!(
            "  from scratch: Palisade {:.1} ms, iptables-restore {:.1} ms, nft -f {:.1} ms",
            row.palisade_full, row.iptables_full, row.nft_full
        );
        rows.push(row);
    }
    let version = palisade_benches::tool_version;
    let versions = format!("Tools: {}; {}.\n\n", version("iptables"), version("nft"));
    let mut md = String::from(
        "# Services: the control plane against kube-proxy's rules\n\n\
         `cargo xtask report services` (benches/src/bin/services-report.rs). Each size: N Services \
         (ClusterIP, a quarter also NodePort up to 675), 10 endpoints each; median of 5 loads from scratch, \
         p50/p99 of 30 single-endpoint changes. Palisade: the Services and EndpointSlices read, the \
         node's table built (kube-proxy's endpoint categorisation), lowered to the service maps' entries, \
         and for a change diffed against the entries held. **User-space work only: the kernel program \
         does not carry the service maps yet, so map writes are not in these numbers.** kube-proxy: the \
         same Services' rules as its iptables and nftables proxiers write them (full sync; partial sync \
         of the changed Service), loaded by `iptables-restore` (iptables-nft) and `nft -f` into a fresh \
         network namespace, in the same run.\n\n\
         ## From scratch (ms, median)\n\n\
         | Services | endpoints | iptables rules | Palisade | iptables-restore | nft -f | Palisade / iptables | Palisade / nft |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.services,
            r.services * ENDPOINTS,
            r.rules_iptables,
            r.palisade_full,
            r.iptables_full,
            r.nft_full,
            r.palisade_full / r.iptables_full,
            r.palisade_full / r.nft_full
        );
    }
    md.push_str(&format!("\n{versions}"));
    md.push_str(
        "\n## One endpoint change (ms, p50 / p99)\n\n\
         | Services | Palisade | entries written (mean) | iptables-restore --noflush | nft -f | Palisade / nft (p50) |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.2} / {:.2} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} |",
            r.services,
            r.palisade_change.0,
            r.palisade_change.1,
            r.palisade_change.2,
            r.iptables_change.0,
            r.iptables_change.1,
            r.nft_change.0,
            r.nft_change.1,
            r.palisade_change.0 / r.nft_change.0
        );
    }
    md.push_str(
        "\nA change rebuilds the whole table and lowering (no incremental lowering yet): its cost grows \
         with the number of Services, while the entries it writes stay a handful.\n\n\
         ![from scratch](services-control-plane.svg)\n",
    );
    let series = [
        (
            "Palisade (user space)",
            "#1f77b4",
            false,
            rows.iter()
                .map(|r| (r.services as f64, r.palisade_full))
                .collect::<Vec<_>>(),
        ),
        (
            "iptables-restore",
            "#d62728",
            false,
            rows.iter()
                .map(|r| (r.services as f64, r.iptables_full))
                .collect(),
        ),
        (
            "nft -f",
            "#2ca02c",
            true,
            rows.iter()
                .map(|r| (r.services as f64, r.nft_full))
                .collect(),
        ),
    ]
    .into_iter()
    .map(|(name, color, dashed, points)| Series {
        name: name.into(),
        color,
        dashed,
        points,
    })
    .collect::<Vec<_>>();
    let y_max = rows
        .iter()
        .flat_map(|r| [r.palisade_full, r.iptables_full, r.nft_full])
        .fold(0.0, f64::max)
        * 1.1;
    let svg = line_chart(
        "Programming Services from scratch",
        "Services (10 endpoints each)",
        "ms",
        &series,
        y_max,
        None,
    );
    palisade_benches::write_docs("services-control-plane", &md, &svg)?;
    Ok(())
}
