//! The etcd backend against real etcd on loopback: Calico's key layout,
//! validation as the embedded store validates, watches that resume and
//! that say when etcd compacted their history, client certificates, and a
//! member lost.

use std::time::Duration;

use palisade_datastore::{
    Datastore, EtcdConfig, EtcdStore, Follower, StoreChange, StoreError, kind_named,
};
use palisade_testing::etcd::{EtcdCluster, TlsFiles, installed};
use policy_core::ObjectRef;

use super::{GNP, an_endpoint_for_a_stored_pod_is_the_pod, zero_trust};

/// Whether etcd tests may run: etcd installed, or a skip CI turns into a
/// failure.
pub(super) fn etcd_available() -> bool {
    if installed() {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!(
            "etcd is not installed and PALISADE_REQUIRE_PRIVILEGED is set (cargo xtask test installs it)"
        );
    }
    eprintln!("skipped: etcd is not installed");
    false
}

/// The next changes, past progress reports (which carry none).
fn next_changes(watch: &mut palisade_datastore::EtcdWatch) -> Vec<StoreChange> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let changes = watch.next(Some(Duration::from_secs(1))).unwrap();
        if !changes.is_empty() || std::time::Instant::now() > deadline {
            return changes;
        }
    }
}

pub(super) fn config(cluster: &EtcdCluster) -> EtcdConfig {
    EtcdConfig {
        endpoints: cluster.endpoints(),
        ..EtcdConfig::default()
    }
}

#[test]
fn objects_live_under_calicos_keys_and_watches_follow_them() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let store = EtcdStore::connect(&config(&cluster)).unwrap();
    let applied = store.apply_sources(&zero_trust()).unwrap();
    assert!(applied.created.len() > 5, "{applied:?}");
    // Calico's etcdv3 layout, whole objects as JSON.
    let key = kind_named("networkpolicies")
        .unwrap()
        .key(Some("shop-backend"), "db-from-api");
    assert_eq!(
        key,
        "/calico/resources/v3/projectcalico.org/networkpolicies/shop-backend/db-from-api"
    );
    let raw = cluster
        .etcdctl(&[0], &["get", &key, "--print-value-only"])
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(raw.trim()).unwrap();
    assert_eq!(doc["spec"]["selector"], "app == 'db'");
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.revision, applied.revision);
    assert_eq!(snapshot.objects.len(), applied.created.len());

    // Applying the same again writes nothing; a rejected apply nothing.
    let again = store.apply_sources(&zero_trust()).unwrap();
    assert!(again.created.is_empty() && again.replaced.is_empty());
    let bad = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: b}\nspec: {selector: app = 'x'}\n";
    assert!(matches!(
        store.apply_text("bad.yaml", bad),
        Err(StoreError::Rejected(_))
    ));
    assert_eq!(cluster.revision().unwrap(), applied.revision);

    // A watch from the listing sees each write, in order.
    let mut watch = store.watch(snapshot.revision).unwrap();
    let w = store.apply_text("ntp.yaml", GNP).unwrap();
    let changes = next_changes(&mut watch);
    assert!(
        matches!(&changes[..], [StoreChange::Put(o)] if o.object.name == "allow-ntp" && o.revision == w.revision)
    );
    let d = store
        .delete(&[ObjectRef::new("GlobalNetworkPolicy", None, "allow-ntp")])
        .unwrap();
    let changes = next_changes(&mut watch);
    assert!(
        matches!(&changes[..], [StoreChange::Deleted { object, revision, .. }] if object.name == "allow-ntp" && *revision == d.revision)
    );
    assert_eq!(watch.revision(), d.revision);
    // A write by another tool, around validation, reaches the follower
    // as written (the node view reports it).
    cluster
        .etcdctl(
            &[0],
            &[
                "put",
                "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/raw",
                "not json",
            ],
        )
        .unwrap();
    let changes = next_changes(&mut watch);
    assert!(matches!(&changes[..], [StoreChange::Put(o)] if o.object.name == "raw"));
    // A watch from an older revision replays etcd's history.
    let mut replay = store.watch(applied.revision).unwrap();
    let mut since = Vec::new();
    while since.len() < 3 {
        let more = next_changes(&mut replay);
        assert!(!more.is_empty(), "{since:?}");
        since.extend(more);
    }
    assert_eq!(since.len(), 3, "{since:?}");

    // After a compaction, a watch from before it is told to list again.
    let now = cluster.revision().unwrap();
    cluster.compact(now).unwrap();
    let mut old = store.watch(applied.revision).unwrap();
    match old.next(Some(Duration::from_secs(5))) {
        Err(StoreError::Compacted { after, compacted }) => {
            assert_eq!((after, compacted), (applied.revision, now));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
}

#[test]
fn concurrent_writers_each_get_their_own_revision() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let cfg = config(&cluster);
    let revisions: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let store = EtcdStore::connect(&cfg).unwrap();
                    let text = GNP.replace("allow-ntp", &format!("p{i}"));
                    store.apply_text("p.yaml", &text).unwrap().revision
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = revisions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "{revisions:?}");
    let store = EtcdStore::connect(&cfg).unwrap();
    assert_eq!(store.snapshot().unwrap().objects.len(), 4);
}

#[test]
fn client_certificates_are_required_and_accepted() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = TlsFiles::generate(&dir.path().join("pki")).unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, Some(tls.clone())).unwrap();
    let with_cert = EtcdConfig {
        endpoints: cluster.endpoints(),
        ca_file: Some(tls.ca.clone()),
        cert_file: Some(tls.client_cert.clone()),
        key_file: Some(tls.client_key.clone()),
    };
    let store = EtcdStore::connect(&with_cert).unwrap();
    store.apply_text("ntp.yaml", GNP).unwrap();
    assert_eq!(store.snapshot().unwrap().objects.len(), 1);
    // Without a client certificate the server refuses.
    let without = EtcdConfig {
        cert_file: None,
        key_file: None,
        ..with_cert.clone()
    };
    let refused = EtcdStore::connect(&without).and_then(|s| s.snapshot());
    assert!(refused.is_err(), "{refused:?}");
    // Half a certificate is a configuration error, said as such.
    let half = EtcdConfig {
        key_file: None,
        ..with_cert
    };
    let e = EtcdStore::connect(&half).unwrap_err().to_string();
    assert!(e.contains("--etcd-key-file"), "{e}");
}

#[test]
fn a_three_member_cluster_keeps_serving_with_a_member_killed() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(&dir.path().join("etcd"), 3, None).unwrap();
    let store = EtcdStore::connect(&config(&cluster)).unwrap();
    let first = store.apply_text("ntp.yaml", GNP).unwrap();
    let mut watch = store.watch(first.revision).unwrap();
    cluster.kill(0);
    // Writes and the watch go on through the other members; a watch whose
    // connection went with the member is resumed from its revision.
    let w = store
        .apply_text("p.yaml", &GNP.replace("allow-ntp", "after-kill"))
        .unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !seen
        .iter()
        .any(|c: &StoreChange| c.revision() == w.revision)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no event after the kill"
        );
        match watch.next(Some(Duration::from_secs(2))) {
            Ok(c) => seen.extend(c),
            Err(StoreError::Unavailable(_)) => {
                // The new watch may still go to the killed member and fail
                // at once: then try again (until the deadline).
                match store.watch(watch.revision()) {
                    Ok(resumed) => watch = resumed,
                    Err(StoreError::Unavailable(_)) => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    cluster.restart(0).unwrap();
    assert_eq!(store.snapshot().unwrap().objects.len(), 2);
}

/// More objects than one etcd transaction takes (128) and one listing page
/// holds (500): written in several transactions, listed in pages, all of
/// them at one revision.
#[test]
fn a_large_apply_is_written_in_transactions_and_listed_in_pages() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let store = EtcdStore::connect(&config(&cluster)).unwrap();
    let docs: Vec<String> = (0..1200)
        .map(|i| GNP.replace("allow-ntp", &format!("p{i}")))
        .collect();
    let w = store.apply_text("many.yaml", &docs.join("---\n")).unwrap();
    assert_eq!(w.created.len(), 1200);
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.objects.len(), 1200);
    assert_eq!(snapshot.revision, w.revision);
    let again = store.apply_text("many.yaml", &docs.join("---\n")).unwrap();
    assert_eq!(again.unchanged.len(), 1200);
}

#[test]
fn an_endpoint_for_a_pod_in_etcd_is_the_pod() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let store = EtcdStore::connect(&config(&cluster)).unwrap();
    an_endpoint_for_a_stored_pod_is_the_pod(&store);
}
