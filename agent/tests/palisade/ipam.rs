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
