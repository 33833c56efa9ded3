//! CNI and overlay report (`cargo xtask report cni`, root): on a two-node
//! lab (`palisade_testing::lab`: an agent per node, VXLAN, the shared
//! datastore on a local etcd member when installed), the latency of
//! `palisade-cni` ADD and DEL as a runtime sees it (exec to exit) for 100
//! pods in sequence and 20 at once; then cross-node TCP throughput (iperf3)
//! and new connections per second between two pods under Palisade's
//! policy, against the same two nodes wired by hand with a plain kernel
//! VXLAN device and routes and no policy, in the same run. Writes
//! `docs/cni-benchmark.md`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_testing::lab::{Lab, LabConfig, cni};
use palisade_testing::netns::{Netns, ip_batch};
use policy_core::model::EndpointKey;
use serde_json::{Value, json};

const CLUSTER: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: frontend}
spec: {cidr: 10.10.0.0/16, vxlanMode: Always}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec: {order: 2000, selector: all(), types: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: bench}
spec:
  podSelector: {matchLabels: {app: server}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 5201, protocol: TCP}, {port: 8080, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: bench}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: server}}}]
    ports: [{port: 5201, protocol: TCP}, {port: 8080, protocol: TCP}]
";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

struct Latency {
    case: String,
    add: Vec<f64>,
    del: Vec<f64>,
}

fn conf(name: &str, socket: &Path, app: &str) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": name, "type": "palisade-cni",
        "agent_socket": socket, "namespace": "bench", "labels": {"app": app},
        "ipam": {"type": "calico-ipam", "ipv4_pools": ["frontend"]},
    })
}

/// ADD then DEL of `n` pods on node 0, `parallel` at a time; milliseconds.
fn cni_latency(lab: &Lab, cni_bin: &Path, n: usize, parallel: usize, tag: &str) -> Result<Latency> {
    let socket = lab.nodes[0].socket.clone();
    let c = conf(&format!("bench-{tag}"), &socket, "filler");
    let pods: Vec<(Netns, EndpointKey, String)> = (0..n)
        .map(|i| {
            let ns = Netns::create(&format!("pb{tag}{i}x{}", std::process::id()))?;
            Ok((
                ns,
                EndpointKey::new("bench", format!("{tag}-{i}")),
                format!("{tag}-{i}"),
            ))
        })
        .collect::<Result<_, palisade_testing::netns::NetnsError>>()?;
    let mut add = Vec::new();
    let mut del = Vec::new();
    for verb in ["ADD", "DEL"] {
        for chunk in pods.chunks(parallel) {
            let times: Vec<Result<f64, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(ns, key, id)| {
                        let c = &c;
                        s.spawn(move || {
                            let t = Instant::now();
                            cni(cni_bin, verb, id, Some(ns.name()), key, c)?;
                            Ok(t.elapsed().as_secs_f64() * 1e3)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                    .collect()
            });
            for t in times {
                let t = t.map_err(|e| anyhow::anyhow!("CNI {verb}: {e}"))?;
                if verb == "ADD" {
                    add.push(t)
                } else {
                    del.push(t)
                }
            }
        }
        eprintln!("  {n} pods, {parallel} at a time: {verb} done");
    }
    Ok(Latency {
        case: if parallel == 1 {
            format!("{n} pods in sequence")
        } else {
            format!("{n} pods at once")
        },
        add: sorted(add),
        del: sorted(del),
    })
}

/// iperf3 from `client` to `server:5201` for `seconds`; Gbit/s received.
fn iperf(client: &str, server_ns: &str, server: IpAddr, seconds: u32) -> Result<f64> {
    let mut s = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args(["netns", "exec", client, "iperf3", "-J", "-p", "5201", "-t"])
        .arg(seconds.to_string())
        .arg("-c")
        .arg(server.to_string())
        .output()?;
    let _ = s.wait();
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stdout)))
}

/// New TCP connections per second from `client` to `to` over `seconds`
/// (connect, then close).
fn conn_rate(client: &Netns, to: SocketAddr, seconds: f64) -> Result<f64> {
    // Ports in TIME_WAIT are reused: thousands of connections a second
    // would run out of ephemeral ports otherwise.
    client.sysctl("ipv4/tcp_tw_reuse", "1")?;
    let n = client.run(|| {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed().as_secs_f64() < seconds {
            if TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok() {
                n += 1;
            }
        }
        n as f64 / t.elapsed().as_secs_f64()
    })?;
    Ok(n)
}

/// The baseline: the same two nodes and pods wired by hand, a plain
/// kernel VXLAN device and routes, no programs, no policy.
struct Baseline {
    _fabric: Netns,
    _nodes: Vec<Netns>,
    client: Netns,
    server: Netns,
    server_ip: IpAddr,
}

fn baseline() -> Result<Baseline> {
    let pid = std::process::id();
    let fabric = Netns::create(&format!("pbf{pid}"))?;
    ip_batch(
        Some(fabric.name()),
        &["link add br0 type bridge".into(), "link set br0 up".into()],
    )?;
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    let mac = |i: usize| format!("02:00:00:00:01:0{i}");
    for i in 0..2usize {
        let node = Netns::create(&format!("pbn{i}{pid}"))?;
        let pod = Netns::create(&format!("pbp{i}{pid}"))?;
        let (me, other) = (i + 1, 2 - i);
        ip_batch(
            Some(fabric.name()),
            &[
                format!(
                    "link add n{i} type veth peer name eth0 netns {}",
                    node.name()
                ),
                format!("link set n{i} master br0"),
                format!("link set n{i} up"),
            ],
        )?;
        ip_batch(
            Some(node.name()),
            &[
                "link set lo up".into(),
                format!("addr add 192.168.101.{me}/24 dev eth0"),
                "link set eth0 up".into(),
                format!(
                    "link add vxlan0 address {} mtu 1450 type vxlan id 4096 dstport 4789 local 192.168.101.{me} dev eth0 nolearning",
                    mac(me)
                ),
                format!("addr add 10.99.{me}.0/32 dev vxlan0"),
                "link set vxlan0 up".into(),
                format!(
                    "neigh add 10.99.{other}.0 lladdr {} dev vxlan0 nud permanent",
                    mac(other)
                ),
                format!("route add 10.99.{other}.0/24 via 10.99.{other}.0 dev vxlan0 onlink"),
                format!(
                    "link add cali{i} mtu 1450 address ee:ee:ee:ee:ee:ee type veth peer name eth0 netns {}",
                    pod.name()
                ),
                format!("link set cali{i} up"),
                format!("route add 10.99.{me}.10/32 dev cali{i}"),
            ],
        )?;
        let fdb = Command::new("bridge")
            .args([
                "-n",
                node.name(),
                "fdb",
                "append",
                &mac(other),
                "dev",
                "vxlan0",
            ])
            .arg("dst")
            .arg(format!("192.168.101.{other}"))
            .status()?;
        if !fdb.success() {
            bail!("bridge fdb append failed");
        }
        node.sysctl("ipv4/ip_forward", "1")?;
        node.sysctl(&format!("ipv4/conf/cali{i}/proxy_arp"), "1")?;
        ip_batch(
            Some(pod.name()),
            &[
                "link set lo up".into(),
                "link set eth0 mtu 1450 up".into(),
                format!("addr add 10.99.{me}.10/32 dev eth0"),
                "route add 169.254.1.1 dev eth0 scope link".into(),
                "neigh add 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent".into(),
                "route add default via 169.254.1.1 dev eth0".into(),
            ],
        )?;
        nodes.push(node);
        pods.push(pod);
    }
    let server = pods.pop().context("pods")?;
    let client = pods.pop().context("pods")?;
    Ok(Baseline {
        _fabric: fabric,
        _nodes: nodes,
        client,
        server,
        server_ip: "10.99.2.10".parse()?,
    })
}

fn listen(ns: &Netns, ip: IpAddr, port: u16) -> Result<()> {
    let l = ns.run(|| TcpListener::bind((ip, port)))??;
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let bin = std::env::var("PALISADE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/palisade")
        });
    let cni_bin = bin.with_file_name("palisade-cni");
    if !bin.exists() || !cni_bin.exists() {
        bail!(
            "{} and palisade-cni are needed (cargo build --release -p palisade)",
            bin.display()
        );
    }
    let etcd = palisade_testing::etcd::installed();
    let dir = std::env::temp_dir().join(format!("palisade-cni-report-{}", std::process::id()));
    eprintln!(
        "two-node lab ({})",
        if etcd { "etcd" } else { "embedded store" }
    );
    let mut lab = Lab::start(
        LabConfig {
            dir: dir.clone(),
            nodes: vec!["node-a".into(), "node-b".into()],
            etcd,
            palisade: bin.clone(),
            cni: cni_bin.clone(),
            first_port: 9301,
            tag: "pr".into(),
            underlay_mtu: 1500,
        },
        &|s| eprintln!("  {s}"),
    )?;
    std::fs::write(dir.join("cluster.yaml"), CLUSTER)?;
    lab.palisade(&[
        "apply",
        "-f",
        &dir.join("cluster.yaml").display().to_string(),
    ])?;
    lab.wait_overlay(0)?;

    eprintln!("CNI latency");
    let mut latencies = Vec::new();
    // A warm-up pod: the first ADD claims the node's block.
    latencies.push(cni_latency(&lab, &cni_bin, 1, 1, "w")?);
    latencies.clear();
    latencies.push(cni_latency(&lab, &cni_bin, 100, 1, "s")?);
    latencies.push(cni_latency(&lab, &cni_bin, 20, 20, "c")?);

    eprintln!("cross-node traffic under Palisade's policy");
    let labels = |app: &str| {
        let mut m = serde_json::Map::new();
        m.insert("app".into(), json!(app));
        m
    };
    let pool = ["frontend".to_string()];
    let client = lab
        .add_pod(
            0,
            EndpointKey::new("bench", "client"),
            &labels("client"),
            &pool,
            &[],
        )?
        .ns
        .name()
        .to_string();
    let server_ip = lab
        .add_pod(
            1,
            EndpointKey::new("bench", "server"),
            &labels("server"),
            &pool,
            &[8080],
        )?
        .addr;
    let server_ns = lab.pods[1].ns.name().to_string();
    lab.wait_overlay(2)?;
    let base = baseline()?;
    listen(&base.server, base.server_ip, 8080)?;
    let (mut p_tput, mut b_tput, mut p_conn, mut b_conn) = (vec![], vec![], vec![], vec![]);
    for round in 0..3 {
        eprintln!(
            "  round {}: iperf3 and connect loops, Palisade then plain VXLAN",
            round + 1
        );
        p_tput.push(iperf(&client, &server_ns, server_ip, 4)?);
        b_tput.push(iperf(
            base.client.name(),
            base.server.name(),
            base.server_ip,
            4,
        )?);
        p_conn.push(conn_rate(
            &lab.pods[0].ns,
            SocketAddr::new(server_ip, 8080),
            2.0,
        )?);
        b_conn.push(conn_rate(
            &base.client,
            SocketAddr::new(base.server_ip, 8080),
            2.0,
        )?);
    }
    let (pt, bt, pc, bc) = (
        median(p_tput),
        median(b_tput),
        median(p_conn),
        median(b_conn),
    );
    drop(base);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);

    let mut md = String::new();
    writeln!(md, "# CNI and overlay benchmark\n")?;
    writeln!(
        md,
        "`cargo xtask report cni` on this machine ({} cores): two nodes as network namespaces on one bridge (MTU 1500), an agent each, {} as the datastore. Latency is what a runtime sees: `palisade-cni` exec to exit, which includes the agent's IPAM, the veth, the workload endpoint and the wait until the pod's policy is in the kernel.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if etcd {
            "a local etcd member"
        } else {
            "the embedded store"
        }
    )?;
    writeln!(md, "## CNI ADD and DEL\n")?;
    writeln!(md, "| case | ADD p50 | ADD p99 | DEL p50 | DEL p99 |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for l in &latencies {
        writeln!(
            md,
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            l.case,
            percentile(&l.add, 0.5),
            percentile(&l.add, 0.99),
            percentile(&l.del, 0.5),
            percentile(&l.del, 0.99)
        )?;
    }
    writeln!(
        md,
        "\n## Cross-node traffic: Palisade against plain VXLAN\n"
    )?;
    writeln!(
        md,
        "The same two nodes; the baseline wires the pods by hand (the same veth and routes, a kernel VXLAN device with static neighbour and FDB entries) with no programs and no policy. Medians of 3 alternating rounds. Goal: at least 0.9 of the baseline.\n"
    )?;
    writeln!(
        md,
        "| measure | Palisade (policy on) | plain VXLAN | ratio |"
    )?;
    writeln!(md, "|---|---:|---:|---:|")?;
    writeln!(
        md,
        "| TCP throughput (iperf3, 4 s) | {pt:.2} Gbit/s | {bt:.2} Gbit/s | {:.2} |",
        pt / bt
    )?;
    writeln!(
        md,
        "| new connections (connect, close) | {pc:.0}/s | {bc:.0}/s | {:.2} |",
        pc / bc
    )?;
    writeln!(
        md,
        "\nReading it: every new connection is judged by the sender's egress and the receiver's ingress programs (one on each node) and recorded in conntrack; established packets cost a conntrack lookup on each side. Both sides of the lab share this machine's cores with iperf3 and the kernel's VXLAN work, so the absolute numbers are this machine's, the ratios the point."
    )?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cni-benchmark.md");
    std::fs::write(&out, &md)?;
    print!("{md}");
    eprintln!("wrote {}", out.display());
    Ok(())
}
