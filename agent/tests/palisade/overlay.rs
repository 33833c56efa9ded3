//! Two nodes (network namespaces on one underlay bridge, MTU 1500), an
//! agent each, pods added by `palisade-cni`: pods on different nodes reach
//! each other over `vxlan.calico` exactly as policy allows, with MTU 1450
//! end to end; a node leaving and coming back changes exactly its entries;
//! an agent restarted over stale entries sweeps them without breaking an
//! open connection; the underlay's MTU going to 1400 takes the device to
//! 1350.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use palisade_testing::netns::{Netns, ip_batch};
use serde_json::{Value, json};

use super::lab::{Lab, Node, ip, wait_for};
use super::{privileged, scratch};

const CLUSTER: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: frontend}
spec: {cidr: 10.10.0.0/16, vxlanMode: Always}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: backend}
spec: {cidr: 10.20.0.0/16, vxlanMode: Always}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080, protocol: TCP}]
";

/// Adds pod `name` (namespace `shop`, label app=`app`) on `node` in the
/// namespace `pod` through `palisade-cni`, from `pool`; its address.
pub fn add(node: &Node, pod: &Netns, name: &str, net: &str, pool: &str, app: &str) -> IpAddr {
    let conf = json!({
        "cniVersion": "1.0.0", "name": net, "type": "palisade-cni",
        "agent_socket": node.socket, "namespace": "shop", "labels": {"app": app},
        "ipam": {"type": "calico-ipam", "ipv4_pools": [pool]},
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade-cni"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("{name}{}", std::process::id()))
        .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("K8S_POD_NAME={name}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{v}");
    v["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok())
        .unwrap()
}

/// A DF ping of `payload` bytes from `from` to `to` gets its answer.
fn df_ping(from: &Netns, to: IpAddr, payload: usize) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            from.name(),
            "ping",
            "-M",
            "do",
            "-c",
            "1",
            "-W",
            "1",
            "-s",
        ])
        .arg(payload.to_string())
        .arg(to.to_string())
        .output()
        .unwrap()
        .status
        .success()
}

/// The overlay entries of a node: routes via vxlan.calico, its FDB and
/// its permanent neighbours.
fn overlay_entries(ns: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let lines = |t: String| -> Vec<String> {
        t.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    (
        lines(ip(ns, "route show dev vxlan.calico")),
        lines(
            Command::new("bridge")
                .args(["-n", ns, "fdb", "show", "dev", "vxlan.calico"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default(),
        )
        .into_iter()
        .filter(|l| l.contains(" dst "))
        .collect(),
        lines(ip(ns, "neigh show dev vxlan.calico nud permanent")),
    )
}

#[test]
fn pods_on_two_nodes_talk_over_vxlan_as_policy_says_and_the_overlay_reconciles() {
    if !privileged() {
        return;
    }
    let dir = scratch("overlay");
    let tag = std::process::id();
    let mut lab = Lab::start("ov", 9110, &dir, &["node-a", "node-b"], CLUSTER);
    let state = lab.state.clone();
    for n in &lab.nodes {
        let link = ip(n.ns.name(), "-d link show vxlan.calico");
        assert!(
            link.contains("mtu 1450")
                && link.contains("vxlan id 4096")
                && link.contains("dstport 4789")
                && link.contains("nolearning"),
            "{link}"
        );
    }
    let nodes = &mut lab.nodes;

    // Pods: web and other on node-a, api on node-b.
    let pods: Vec<Netns> = (0..3)
        .map(|i| Netns::create(&format!("palovp{i}{tag}")).unwrap())
        .collect();
    let web = add(&nodes[0], &pods[0], "web", "frontend", "frontend", "web");
    let other = add(
        &nodes[0], &pods[1], "other", "frontend", "frontend", "other",
    );
    let api = add(&nodes[1], &pods[2], "api", "backend", "backend", "api");
    assert!(web.to_string().starts_with("10.10.") && other.to_string().starts_with("10.10."));
    assert!(api.to_string().starts_with("10.20."));
    // node-a routes node-b's block over VXLAN, blackholes its own.
    wait_for("node-a's route to node-b's block", 30, || {
        ip(nodes[0].ns.name(), "route show dev vxlan.calico").contains("10.20.")
    });
    assert!(ip(nodes[0].ns.name(), "route show type blackhole").contains("10.10."));

    let listener = pods[2]
        .run(|| TcpListener::bind((api, 8080)).unwrap())
        .unwrap();
    assert!(
        connects(&pods[0], SocketAddr::new(api, 8080)),
        "web -> api across nodes"
    );
    assert!(
        !connects(&pods[1], SocketAddr::new(api, 8080)),
        "other -> api is denied"
    );

    // MTU 1450 end to end: 1422 bytes of ICMP payload fit, 1423 do not.
    // (policy allows web -> api only on TCP 8080; ICMP from web to api is
    // denied, so the MTU check goes api -> web, which web's ingress allows:
    // web has no ingress policy.)
    assert!(
        df_ping(&pods[2], web, 1422),
        "a 1450-byte DF packet crosses the overlay"
    );
    assert!(
        !df_ping(&pods[2], web, 1423),
        "a 1451-byte DF packet does not"
    );

    // A connection open across the restart below.
    let mut client = pods[0]
        .run(|| {
            TcpStream::connect_timeout(&SocketAddr::new(api, 8080), Duration::from_secs(2)).unwrap()
        })
        .unwrap();
    // The backlog also holds the checks' closed connections.
    let mine = client.local_addr().unwrap();
    let mut server = loop {
        let (s, peer) = listener.accept().unwrap();
        if peer == mine {
            break s;
        }
    };

    // node-b leaves: node-a drops exactly its entries; it comes back.
    let before = overlay_entries(nodes[0].ns.name());
    assert_eq!((before.1.len(), before.2.len()), (1, 1), "{before:?}");
    nodes[1].agent.kill();
    let out = super::palisade()
        .args(["delete", "nodes", "node-b", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("node-a to forget node-b", 30, || {
        overlay_entries(nodes[0].ns.name()) == (vec![], vec![], vec![])
    });
    nodes[1].agent.restart();
    nodes[1].agent.wait_ready();
    wait_for("node-a to learn node-b again", 30, || {
        overlay_entries(nodes[0].ns.name()) == before
    });

    // node-a's agent restarts over stale entries: they go, the rest stays,
    // and the open connection carries on.
    nodes[0].agent.kill();
    let mac = "02:00:00:00:00:99";
    ip_batch(
        Some(nodes[0].ns.name()),
        &[
            "route add 10.99.0.0/26 via 10.99.0.0 dev vxlan.calico onlink proto 80".into(),
            "neigh add 10.99.0.0 lladdr 02:00:00:00:00:99 dev vxlan.calico nud permanent".into(),
        ],
    )
    .unwrap();
    let fdb = Command::new("bridge")
        .args([
            "-n",
            nodes[0].ns.name(),
            "fdb",
            "append",
            mac,
            "dev",
            "vxlan.calico",
            "dst",
            "192.168.100.99",
        ])
        .status()
        .unwrap();
    assert!(fdb.success());
    nodes[0].agent.restart();
    nodes[0].agent.wait_ready();
    wait_for("the stale entries to go", 30, || {
        overlay_entries(nodes[0].ns.name()) == before
    });
    client.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");

    // The underlay's MTU drops to 1400: the device follows to 1350, and
    // so do new pods.
    ip_batch(Some(nodes[0].ns.name()), &["link set eth0 mtu 1400".into()]).unwrap();
    wait_for("vxlan.calico at MTU 1350", 30, || {
        ip(nodes[0].ns.name(), "link show vxlan.calico").contains("mtu 1350")
    });
    wait_for("the status to say so", 30, || {
        nodes[0]
            .agent
            .status()
            .is_some_and(|s| s["overlay"]["podMtu"] == 1350)
    });
    let late = Netns::create(&format!("palovp9{tag}")).unwrap();
    add(&nodes[0], &late, "late", "frontend", "frontend", "web");
    assert!(ip(late.name(), "link show eth0").contains("mtu 1350"));
    drop(listener);
}

/// `palisade lab` (what `cargo xtask demo` runs): the example cluster's
/// real matrix agrees with the reference engine on every cell, and the
/// lab leaves nothing behind.
/// `palisade lab` runs, one at a time: each test checks that no lab
/// namespace (`pl…`) is left after its own.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_lab_runs_the_example_cluster_and_agrees_with_the_reference_engine() {
    if !privileged() {
        return;
    }
    let _one_lab = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let out = super::palisade()
        .args([
            "lab",
            "-f",
            "examples/cluster",
            "--datastore",
            "embedded",
            "--first-port",
            "9130",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("agree with the reference engine: 36/36"),
        "{stdout}"
    );
    assert!(
        stdout.contains("vxlan.calico VNI 4096 MTU 1450"),
        "{stdout}"
    );
    assert!(stderr.contains("removing the cluster"), "{stderr}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&netns.stdout).to_string();
    // The lab's namespaces (pl…; the tests' are pal…) are gone.
    assert!(!left.lines().any(|l| l.starts_with("pl")), "{left}");
}

/// `matrix` and `explain` with `--engine lab` answer from real connections
/// over two nodes; explain checks the lab against the reference (the
/// connection's fate, and which node's kernel counted the drop under which
/// rule) and fails when they differ.
#[test]
fn matrix_and_explain_answer_over_a_two_node_lab() {
    if !privileged() {
        return;
    }
    let _one_lab = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let run = |args: &[&str]| {
        let out = super::palisade().args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&[
        "matrix",
        "-f",
        "examples/cluster",
        "--engine",
        "lab",
        "--port",
        "8080",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0), "{text}");
    let allowed: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|c| c["allowed"] == true)
        .map(|c| {
            (
                c["from"].as_str().unwrap().into(),
                c["to"].as_str().unwrap().into(),
            )
        })
        .collect();
    // The example's policy: only the web front end reaches the API on 8080.
    assert_eq!(
        allowed,
        [("frontend/web".to_string(), "backend/api".to_string())],
        "{text}"
    );
    assert!(text.contains("4 pods on 2 nodes"), "{text}");

    let explain = |port: &str| {
        run(&[
            "explain",
            "-f",
            "examples/cluster",
            "--engine",
            "lab",
            "--from",
            "frontend/web",
            "--to",
            "backend/api",
            "--port",
            port,
        ])
    };
    // Denied on egress at node-a (web's node) by the default tier's end:
    // exit status 1 (denied), not 2 (the lab disagreeing with the reference).
    let (code, text) = explain("9090");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(r#"kernel counted: +1 palisade_policy_drops_total{tier="default",policy="tier-default",rule=""}"#)
            && text.contains("the connection was blocked")
            && text.contains("DENIED"),
        "{text}"
    );
    let (code, text) = explain("8080");
    assert!(
        code == Some(0) && text.contains("the connection was connected"),
        "{text}"
    );
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&netns.stdout).to_string();
    assert!(!left.lines().any(|l| l.starts_with("pl")), "{left}");
}
