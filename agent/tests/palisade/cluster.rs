//! Three agents as three nodes on one 3-member etcd cluster on loopback:
//! each node a network namespace with its own pods and pin path, the nodes
//! joined by a fabric bridge, the agents fed by etcd. A policy applied once
//! is enforced by every node for real connections; a pod's labels changed
//! on one node change what another allows from it; etcd members die and
//! the whole cluster stops and comes back.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use palisade_testing::etcd::{EtcdCluster, installed};
use palisade_testing::netns::{Netns, Topology, ip_batch};
use policy_core::EndpointKey;

use super::agent::{Agent, AgentSpec, connect, serve, workload_endpoint};
use super::{palisade, privileged, repo, scratch};

pub(super) fn etcd_available() -> bool {
    if installed() {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!("etcd is not installed and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("skipped: etcd is not installed");
    false
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `palisade` against etcd; the revision it wrote.
fn palisade_on_etcd(endpoints: &str, args: &[&str]) -> u64 {
    let out = palisade()
        .args(args)
        .args(["--datastore", "etcd", "--etcd-endpoints", endpoints])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("revision "))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {stdout}"))
}

/// Joins the nodes' namespaces on a bridge (192.168.100.<i+1>) and routes
/// every pod address of each node from the others.
fn fabric(topos: &[Topology]) -> Netns {
    let fab = Netns::create(&format!("palfab{}", std::process::id())).unwrap();
    let mut lines = vec![
        "link set lo up".to_string(),
        "link add br0 type bridge".to_string(),
        "link set br0 up".to_string(),
    ];
    for (i, t) in topos.iter().enumerate() {
        lines.push(format!(
            "link add n{i} type veth peer name fab0 netns {}",
            t.node().name()
        ));
        lines.push(format!("link set n{i} master br0"));
        lines.push(format!("link set n{i} up"));
    }
    ip_batch(Some(fab.name()), &lines).unwrap();
    for (i, t) in topos.iter().enumerate() {
        let mut lines = vec![
            format!("addr add 192.168.100.{}/24 dev fab0", i + 1),
            "link set fab0 up".to_string(),
        ];
        for (j, other) in topos.iter().enumerate().filter(|(j, _)| *j != i) {
            for p in other.pods() {
                for ip in &p.ips {
                    lines.push(format!("route add {ip}/32 via 192.168.100.{}", j + 1));
                }
            }
        }
        ip_batch(Some(t.node().name()), &lines).unwrap();
    }
    fab
}

fn pod(ns: &str, name: &str, ip: &str) -> Vec<(EndpointKey, Vec<std::net::IpAddr>)> {
    vec![(EndpointKey::new(ns, name), vec![ip.parse().unwrap()])]
}

const DELETE_API_FROM_WEB: &[&str] = &[
    "delete",
    "networkpolicies",
    "api-from-web",
    "-n",
    "shop-backend",
];

const ALLOW: &str = "\
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: frontend-egress, namespace: shop-frontend}
spec: {order: 400, selector: all(), types: [Egress], egress: [{action: Allow}]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: shop-backend}
spec:
  order: 400
  selector: app == 'api'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    source: {namespaceSelector: tier == 'frontend', selector: app == 'web'}
    destination: {ports: [8080]}
";

#[test]
fn three_agents_on_etcd_enforce_one_policy_through_member_loss_and_an_outage() {
    if !privileged() || !etcd_available() {
        return;
    }
    let dir = scratch("agents-etcd");
    let mut etcd = EtcdCluster::start(&dir.join("etcd"), 3, None).unwrap();
    let endpoints = etcd.endpoints().join(",");
    let topos: Vec<Topology> = [
        pod("shop-frontend", "web", "10.21.1.10"),
        pod("shop-backend", "api", "10.21.2.10"),
        pod("analytics", "reporting", "10.21.3.10"),
    ]
    .iter()
    .map(|p| Topology::build(p).unwrap())
    .collect();
    let _fabric = fabric(&topos);
    let (web, api, reporting) = (
        &topos[0].pods()[0],
        &topos[1].pods()[0],
        &topos[2].pods()[0],
    );
    let api_addr: SocketAddr = "10.21.2.10:8080".parse().unwrap();
    serve(api, api_addr);

    let weps = dir.join("weps.yaml");
    let write_weps = |web_labels: &str| {
        let docs = [
            workload_endpoint("node0", web, web_labels, ""),
            workload_endpoint("node1", api, "app: api", ""),
            workload_endpoint("node2", reporting, "app: reporting", ""),
        ];
        std::fs::write(&weps, docs.join("---\n")).unwrap();
    };
    write_weps("app: web");
    let example = repo().join("examples/zero-trust");
    let ns = example.join("00-namespaces.yaml");
    let deny = example.join("20-default-deny.yaml");
    let rev = palisade_on_etcd(&endpoints, &["apply", "-f", p(&ns), p(&deny), p(&weps)]);

    let agents: Vec<Agent> = topos
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let metrics = free_addr();
            let pins = PathBuf::from(format!(
                "/sys/fs/bpf/palisade-test-cluster-{}-{i}",
                std::process::id()
            ));
            let args = [
                "--node".to_string(),
                format!("node{i}"),
                "--datastore".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                endpoints.clone(),
                "--netns".into(),
                t.node().name().to_string(),
                "--pin-path".into(),
                pins.display().to_string(),
                "--metrics-addr".into(),
                metrics.to_string(),
            ];
            Agent::spawn_spec(AgentSpec {
                nsenter: None,
                args: args.to_vec(),
                metrics,
                pins,
                log: dir.join(format!("agent{i}.log")),
                env: Vec::new(),
            })
        })
        .collect();
    let all_at = |rev: u64| {
        for a in &agents {
            a.wait_ready();
            a.wait_revision(rev);
        }
    };
    all_at(rev);
    for (i, a) in agents.iter().enumerate() {
        let status = a.status().unwrap();
        assert_eq!(
            status["endpoints"].as_array().unwrap().len(),
            1,
            "node{i}: {status}"
        );
        assert_eq!(status["knownEndpoints"], 3, "node{i}: {status}");
    }
    assert!(
        connect(web, api_addr).is_none(),
        "default deny across nodes"
    );

    // One apply, enforced by both ends' nodes.
    let allow = dir.join("allow.yaml");
    std::fs::write(&allow, ALLOW).unwrap();
    all_at(palisade_on_etcd(&endpoints, &["apply", "-f", p(&allow)]));
    assert!(
        connect(web, api_addr).is_some(),
        "web (node0) -> api (node1)"
    );
    assert!(
        connect(reporting, api_addr).is_none(),
        "reporting (node2) -> api"
    );

    // web's labels change on node0: node1 stops allowing it.
    write_weps("app: web-old");
    all_at(palisade_on_etcd(&endpoints, &["apply", "-f", p(&weps)]));
    assert!(
        connect(web, api_addr).is_none(),
        "relabelled web is denied at node1"
    );
    write_weps("app: web");
    all_at(palisade_on_etcd(&endpoints, &["apply", "-f", p(&weps)]));
    assert!(connect(web, api_addr).is_some(), "allowed again");

    // Removal, enforced everywhere.
    all_at(palisade_on_etcd(&endpoints, DELETE_API_FROM_WEB));
    assert!(connect(web, api_addr).is_none(), "denied after the delete");

    // A member dies: the agents keep following through the others.
    etcd.kill(0);
    let others = etcd.endpoints()[1..].join(",");
    all_at(palisade_on_etcd(&others, &["apply", "-f", p(&allow)]));
    assert!(
        connect(web, api_addr).is_some(),
        "applied with a member down"
    );
    etcd.restart(0).unwrap();

    // etcd stops entirely: not ready, still enforcing; back after restart.
    etcd.stop_all();
    for a in &agents {
        a.wait_not_ready();
    }
    assert!(
        connect(web, api_addr).is_some(),
        "the last state is enforced"
    );
    assert!(connect(reporting, api_addr).is_none(), "denials too");
    etcd.restart_all().unwrap();
    all_at(palisade_on_etcd(&endpoints, DELETE_API_FROM_WEB));
    assert!(connect(web, api_addr).is_none(), "changes after the outage");
    for mut a in agents {
        assert_eq!(a.stop(), Some(0));
    }
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An agent against an etcd that demands client certificates: the flags
/// (and `palisade apply`'s) carry the CA and the client pair; an agent
/// without them is never ready.
#[test]
fn an_agent_follows_etcd_with_client_certificates() {
    if !privileged() || !etcd_available() {
        return;
    }
    let dir = scratch("agent-etcd-tls");
    let tls = palisade_testing::etcd::TlsFiles::generate(&dir.join("pki")).unwrap();
    let etcd = EtcdCluster::start(&dir.join("etcd"), 1, Some(tls.clone())).unwrap();
    let endpoints = etcd.endpoints().join(",");
    let tls_args = [
        "--etcd-ca-cert-file".to_string(),
        p(&tls.ca).to_string(),
        "--etcd-cert-file".into(),
        p(&tls.client_cert).to_string(),
        "--etcd-key-file".into(),
        p(&tls.client_key).to_string(),
    ];
    let deny = repo().join("examples/zero-trust/20-default-deny.yaml");
    let out = palisade()
        .args([
            "apply",
            "-f",
            p(&deny),
            "--datastore",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
        ])
        .args(&tls_args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = |name: &str, with_certs: bool| {
        let metrics = free_addr();
        let mut args = vec![
            "--node".to_string(),
            name.into(),
            "--datastore".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            endpoints.clone(),
            "--pin-path".into(),
            format!(
                "/sys/fs/bpf/palisade-test-tls-{}-{name}",
                std::process::id()
            ),
            "--metrics-addr".into(),
            metrics.to_string(),
        ];
        if with_certs {
            args.extend(tls_args.iter().cloned());
        } else {
            // The CA alone: the server is trusted, but it wants a client.
            args.extend(tls_args[..2].iter().cloned());
        }
        Agent::spawn_spec(AgentSpec {
            nsenter: None,
            pins: PathBuf::from(&args[7]),
            args,
            metrics,
            log: dir.join(format!("{name}.log")),
            env: Vec::new(),
        })
    };
    let with = start("with-certs", true);
    let without = start("without-certs", false);
    with.wait_ready();
    let status = with.status().unwrap();
    assert_eq!(status["policies"], 2, "{status}");
    let s = without.status().unwrap();
    assert_eq!(s["ready"], false, "{s}");
    assert!(
        without.get("/readyz").is_some_and(|(code, _)| code == 503),
        "no client certificate, never ready"
    );
    drop((with, without, etcd));
    let _ = std::fs::remove_dir_all(&dir);
}
