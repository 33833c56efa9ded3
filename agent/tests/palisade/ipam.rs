//! Calico IPAM through the `palisade` binary: the upstream corpus on every
//! store (etcd started and stopped here), and the CLI on what it leaves.

use palisade_testing::etcd::EtcdCluster;

use super::cluster::etcd_available;
use super::{palisade, repo, scratch};

/// `palisade verify` on the vendored IPAM corpus against `store`; its
/// closing line.
fn verify_corpus(store: &[&str]) -> String {
    let out = palisade()
        .args(["verify"])
        .args(store)
        .arg(repo().join("conformance/ipam"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or("").to_string()
}

#[test]
fn the_ipam_corpus_passes_on_memory_and_embedded_stores() {
    for store in ["memory", "embedded"] {
        let last = verify_corpus(&["--store", store]);
        assert!(last.ends_with(" 0 failed, 0 skipped"), "{store}: {last}");
    }
}

#[test]
fn the_ipam_corpus_passes_on_etcd() {
    if !etcd_available() {
        return;
    }
    let dir = scratch("ipam-etcd");
    let cluster = EtcdCluster::start(&dir, 1, None).unwrap();
    let last = verify_corpus(&["--store", "etcd", "--etcd-endpoints", &cluster.endpoint(0)]);
    assert!(last.ends_with(" 0 failed, 0 skipped"), "{last}");
}

fn run(args: &[&str]) -> (bool, String) {
    let out = palisade().args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn ipam_cli_shows_checks_and_collects_what_pods_left_behind() {
    let dir = scratch("ipam-cli");
    let state = dir.join("state");
    let s = state.to_str().unwrap();
    std::fs::write(
        dir.join("pools.yaml"),
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: frontend}\n\
         spec: {cidr: 10.10.0.0/16, vxlanMode: Always, natOutgoing: true}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: ci}\n\
         spec: {cidr: 10.30.0.0/29, blockSize: 29}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-a}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
         metadata: {name: node--a-k8s-web--3-eth0, namespace: shop}\n\
         spec: {node: node-a, orchestrator: k8s, pod: web-3, endpoint: eth0, \
         interfaceName: cali3, ipNetworks: [10.10.9.9/32], profiles: [kns.shop]}\n",
    )
    .unwrap();
    let pools = dir.join("pools.yaml");
    let (ok, out) = run(&["apply", "-f", pools.to_str().unwrap(), "--state-dir", s]);
    assert!(ok, "{out}");
    // web-1 is a Pod, web-3 a WorkloadEndpoint (the pod it names), web-2
    // is nothing.
    for pod in ["web-1", "web-2", "web-3"] {
        let handle = format!("k8s-pod-network.{pod}");
        let owner = format!("shop/{pod}");
        let (ok, out) = run(&[
            "ipam",
            "assign",
            "--node",
            "node-a",
            "--handle",
            &handle,
            "--pod",
            &owner,
            "--pool",
            "10.10.0.0/16",
            "--state-dir",
            s,
        ]);
        assert!(ok, "{out}");
    }
    let (ok, out) = run(&["ipam", "show", "--show-blocks", "--state-dir", s]);
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("frontend") && l.contains("65536") && l.contains(" 3 ")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("node-a") && l.trim_end().ends_with('3')),
        "{out}"
    );

    // web-2 has no pod: check names its address and fails; gc frees it.
    let (ok, out) = run(&["ipam", "check", "--state-dir", s]);
    assert!(
        !ok && out.contains("handle k8s-pod-network.web-2") && out.contains("1 findings"),
        "{out}"
    );
    let (ok, out) = run(&["ipam", "gc", "--grace-seconds", "0", "--state-dir", s]);
    assert!(ok && out.contains("released 1 leaked"), "{out}");
    let (ok, out) = run(&["ipam", "check", "--state-dir", s]);
    assert!(
        ok && out.contains("0 findings") && out.contains("2 allocated"),
        "{out}"
    );

    // A full pool says which pools and which node.
    let (ok, out) = run(&[
        "ipam",
        "assign",
        "--node",
        "node-a",
        "--handle",
        "big",
        "--ipv4",
        "9",
        "--pool",
        "10.30.0.0/29",
        "--state-dir",
        s,
    ]);
    assert!(
        !ok && out.contains("No IPs available in pools: [10.30.0.0/29]")
            && out.contains("node node-a"),
        "{out}"
    );
    // An unknown node is refused by name.
    let (ok, out) = run(&[
        "ipam",
        "assign",
        "--node",
        "node-x",
        "--handle",
        "h",
        "--state-dir",
        s,
    ]);
    assert!(!ok && out.contains("node node-x does not exist"), "{out}");
}
