//! The embedded datastore: whole batches or nothing, validation as the CLI
//! validates, torn writes survived, corruption reported, concurrent writers
//! serialised.

use std::path::PathBuf;

mod etcd;
mod ipam;
mod kubernetes;

use palisade_datastore::{Datastore, EmbeddedStore, Follower, StoreChange, StoreError, kind_named};
use policy_core::ObjectRef;

fn zero_trust() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/zero-trust");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

pub(crate) fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("state")).unwrap();
    (dir, store)
}

fn log_bytes(store: &EmbeddedStore) -> Vec<u8> {
    std::fs::read(store.log_path()).unwrap()
}

const GNP: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n\
                   metadata: {name: allow-ntp}\n\
                   spec: {selector: all(), types: [Egress], egress: [{action: Allow, protocol: UDP, destination: {ports: [123]}}]}\n";

#[test]
fn an_apply_is_one_revision_and_applying_it_again_changes_nothing() {
    let (_d, store) = store();
    let first = store.apply_sources(&zero_trust()).unwrap();
    assert_eq!(first.revision, 1);
    assert!(first.created.len() > 10, "{first:?}");
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.objects.len(), first.created.len());
    assert!(snapshot.objects.iter().all(|o| o.revision == 1));
    let again = store.apply_sources(&zero_trust()).unwrap();
    assert_eq!(again.revision, 1, "nothing new was written");
    assert_eq!(again.unchanged.len(), first.created.len());
    assert_eq!(store.changes_since(1).unwrap(), vec![]);

    let next = store.apply_text("ntp.yaml", GNP).unwrap();
    assert_eq!((next.revision, next.created.len()), (2, 1));
    let changes = store.changes_since(1).unwrap();
    assert_eq!(changes.len(), 1);
    assert!(matches!(&changes[0], StoreChange::Put(o)
        if o.key == "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/allow-ntp"));
}

#[test]
fn a_rejected_apply_changes_nothing_and_says_where() {
    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let before = log_bytes(&store);
    // A good object next to a bad one: neither is written.
    let bad = format!(
        "{GNP}---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
         metadata: {{name: p, namespace: shop-backend}}\n\
         spec: {{tier: nosuch, selector: app == 'api'}}\n"
    );
    let e = store.apply_text("bad.yaml", &bad).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, StoreError::Rejected(_)), "{e:?}");
    assert!(text.contains("tier \"nosuch\" does not exist"), "{text}");
    assert!(text.contains("bad.yaml"), "the document is named: {text}");
    assert_eq!(log_bytes(&store), before);

    for (name, doc) in [
        (
            "selector",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {selector: app = 'x'}\n",
        ),
        (
            "field",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: {selecter: all()}\n",
        ),
        (
            "kind",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: a}\n",
        ),
    ] {
        let e = store.apply_text("x.yaml", doc).unwrap_err();
        assert!(matches!(e, StoreError::Rejected(_)), "{name}: {e:?}");
        assert_eq!(log_bytes(&store), before, "{name}");
    }

    let twice = format!("{GNP}---\n{GNP}");
    let e = store.apply_text("twice.yaml", &twice).unwrap_err();
    assert!(e.to_string().contains("earlier in this apply"), "{e}");
    assert_eq!(log_bytes(&store), before);
}

#[test]
fn deletes_must_name_stored_objects_and_keep_the_cluster_valid() {
    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    store
        .apply_text(
            "tier.yaml",
            "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n---\n\
             apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: security.block}\n\
             spec: {tier: security, selector: all(), types: [Ingress]}\n",
        )
        .unwrap();
    let before = log_bytes(&store);
    let tier = ObjectRef::new("Tier", None, "security");
    let e = store.delete(std::slice::from_ref(&tier)).unwrap_err();
    assert!(
        matches!(e, StoreError::Rejected(_)),
        "a tier in use stays: {e:?}"
    );
    let missing = ObjectRef::new("GlobalNetworkPolicy", None, "nosuch");
    assert!(matches!(
        store.delete(std::slice::from_ref(&missing)),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(log_bytes(&store), before);

    let policy = ObjectRef::new("GlobalNetworkPolicy", None, "security.block");
    let written = store.delete(&[policy.clone(), tier]).unwrap();
    assert_eq!(written.revision, 3);
    let changes = store.changes_since(2).unwrap();
    assert_eq!(changes.len(), 2);
    assert!(matches!(&changes[0], StoreChange::Deleted { object, .. } if *object == policy));
    assert!(
        store
            .snapshot()
            .unwrap()
            .objects
            .iter()
            .all(|o| o.object.kind != "Tier")
    );
}

#[test]
fn a_torn_last_write_is_ignored_and_cut_and_corruption_is_reported() {
    let (_d, store) = store();
    store.apply_text("ntp.yaml", GNP).unwrap();
    let good = log_bytes(&store);
    // A crash in the middle of the next append.
    let mut torn = good.clone();
    torn.extend_from_slice(br#"{"put":{"key":"/calico/resou"#);
    std::fs::write(store.log_path(), &torn).unwrap();
    assert_eq!(store.snapshot().unwrap().revision, 1);
    let written = store.apply_sources(&zero_trust()).unwrap();
    assert_eq!(written.revision, 2);
    let log = log_bytes(&store);
    assert!(log.starts_with(&good) && log.ends_with(b"\n"));
    assert_eq!(
        store.changes_since(0).unwrap().len(),
        1 + written.created.len()
    );

    // A damaged line in the middle is never skipped.
    let mut damaged = String::from_utf8(log).unwrap();
    damaged.replace_range(0..1, "[");
    std::fs::write(store.log_path(), damaged).unwrap();
    let e = store.snapshot().unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { line: 1, .. }), "{e:?}");
    assert!(store.apply_text("ntp.yaml", GNP).is_err());
}

#[test]
fn concurrent_writers_get_one_revision_each() {
    let (_d, store) = store();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..15 {
                    let doc = format!(
                        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n\
                         metadata: {{name: w{w}-{i}, labels: {{writer: w{w}}}}}\nspec: {{nets: [10.{w}.{i}.0/24]}}\n"
                    );
                    // A second handle on the same directory, as a CLI next to the agent.
                    let own = EmbeddedStore::open(store.dir()).unwrap();
                    own.apply_text("set.yaml", &doc).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let changes = store.changes_since(0).unwrap();
    let mut revisions: Vec<u64> = changes.iter().map(StoreChange::revision).collect();
    revisions.dedup();
    assert_eq!(revisions, (1..=30).collect::<Vec<_>>());
    assert_eq!(store.snapshot().unwrap().objects.len(), 30);
}

#[test]
fn kinds_are_named_as_calicoctl_names_them() {
    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let gnp = kind_named("globalnetworkpolicies").unwrap();
    let stored: Vec<String> = store
        .snapshot()
        .unwrap()
        .objects
        .into_iter()
        .filter(|o| o.object.kind == gnp.kind)
        .map(|o| o.object.name)
        .collect();
    assert!(!stored.is_empty());
}

#[test]
fn a_watch_wakes_on_each_written_batch_and_only_then() {
    use palisade_datastore::Watch;
    use std::time::Duration;
    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let mut watch = Watch::new(store.clone(), 0).unwrap();
    // What was there before the watch: at once.
    let first = watch.next(None).unwrap();
    assert_eq!(watch.revision(), 1);
    assert!(first.len() > 10);
    // Nothing new: the time runs out with nothing.
    assert_eq!(watch.next(Some(Duration::from_millis(20))).unwrap(), vec![]);
    // A writer in another thread (as `palisade apply` next to the agent):
    // with no timeout, only the log's inotify event can wake the watch.
    let dir = store.dir().to_path_buf();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let other = EmbeddedStore::open(&dir).unwrap();
        other.apply_text("ntp.yaml", GNP).unwrap();
        other
            .delete(&[ObjectRef::new("GlobalNetworkPolicy", None, "allow-ntp")])
            .unwrap();
    });
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(watch.next(None).unwrap());
    }
    writer.join().unwrap();
    assert!(matches!(&seen[0], StoreChange::Put(o) if o.revision == 2));
    assert!(matches!(&seen[1], StoreChange::Deleted { revision: 3, .. }));
    assert_eq!(watch.revision(), 3);
}

#[test]
fn workload_endpoints_are_stored_under_their_own_name_and_deleted_as_their_pod() {
    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let wep = "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
               metadata: {name: node1-k8s-cache-eth0, namespace: shop-backend, labels: {app: cache}}\n\
               spec: {node: node1, orchestrator: k8s, pod: cache, endpoint: eth0, interfaceName: cali1234,\n\
                      ipNetworks: [10.10.2.30/32], profiles: [kns.shop-backend]}\n";
    let written = store.apply_text("wep.yaml", wep).unwrap();
    assert_eq!(
        written.created,
        vec![ObjectRef::new(
            "WorkloadEndpoint",
            Some("shop-backend"),
            "node1-k8s-cache-eth0"
        )]
    );
    let snapshot = store.snapshot().unwrap();
    let stored = snapshot
        .objects
        .iter()
        .find(|o| o.object.kind == "WorkloadEndpoint")
        .unwrap();
    assert_eq!(
        stored.key,
        "/calico/resources/v3/projectcalico.org/workloadendpoints/shop-backend/node1-k8s-cache-eth0"
    );
    // The same pod twice (a Pod and its endpoint) is refused.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: cache, namespace: shop-backend}\nstatus: {podIP: 10.10.2.31}\n";
    assert!(matches!(
        store.apply_text("pod.yaml", pod),
        Err(StoreError::Rejected(_))
    ));
    let gone = store.delete(std::slice::from_ref(&stored.object)).unwrap();
    assert_eq!(gone.deleted.len(), 1);
    assert!(
        store.apply_text("pod.yaml", pod).is_ok(),
        "the pod's place is free again"
    );
}

/// The CNI plugin's endpoint for a stored Pod is that Pod, annotated
/// (one object, as in Calico's Kubernetes datastore), and deleting the
/// endpoint takes the annotations off. Every backend that stores Pods.
pub(crate) fn an_endpoint_for_a_stored_pod_is_the_pod(store: &dyn Datastore) {
    store.apply_sources(&zero_trust()).unwrap();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: cache, namespace: shop-backend, labels: {app: cache}}\n\
               spec: {containers: [{name: c, image: x}]}\n";
    store.apply_text("pod.yaml", pod).unwrap();
    let wep = "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
               metadata: {name: node1-k8s-cache-eth0, namespace: shop-backend}\n\
               spec: {node: node1, orchestrator: k8s, pod: cache, endpoint: eth0, containerID: c1,\n\
                      interfaceName: cali1234, ipNetworks: [10.10.2.30/32], profiles: [kns.shop-backend]}\n";
    let written = store.apply_text("wep.yaml", wep).unwrap();
    assert_eq!(
        written.replaced,
        vec![ObjectRef::new("Pod", Some("shop-backend"), "cache")],
        "{written:?}"
    );
    let snapshot = store.snapshot().unwrap();
    assert!(
        !snapshot
            .objects
            .iter()
            .any(|o| o.object.kind == "WorkloadEndpoint"),
        "no second object for the pod"
    );
    let stored = snapshot
        .objects
        .iter()
        .find(|o| o.object.kind == "Pod" && o.object.name == "cache")
        .unwrap();
    assert_eq!(stored.document["spec"]["nodeName"], "node1");
    let annotations = &stored.document["metadata"]["annotations"];
    assert_eq!(annotations["cni.projectcalico.org/podIPs"], "10.10.2.30/32");
    assert_eq!(annotations["cni.projectcalico.org/containerID"], "c1");
    // The endpoint, deleted by its own name: the Pod stays, unannotated.
    let gone = store
        .delete(&[ObjectRef::new(
            "WorkloadEndpoint",
            Some("shop-backend"),
            "node1-k8s-cache-eth0",
        )])
        .unwrap();
    assert!(gone.revision > written.revision);
    let snapshot = store.snapshot().unwrap();
    let stored = snapshot
        .objects
        .iter()
        .find(|o| o.object.kind == "Pod" && o.object.name == "cache")
        .unwrap();
    assert!(stored.document["metadata"]["annotations"]["cni.projectcalico.org/podIPs"].is_null());
}

#[test]
fn an_endpoint_for_a_pod_in_the_embedded_store_is_the_pod() {
    let (_d, store) = store();
    an_endpoint_for_a_stored_pod_is_the_pod(&store);
}

/// The agent's pipeline without a kernel: a store, a watch, this node's
/// view, and the node controller on its in-memory dataplane. A policy
/// applied with `palisade apply` decides connections at once; a bad
/// object written around the validation is skipped while the rest holds.
#[test]
fn a_node_view_feeds_the_controller_change_by_change() {
    use palisade_controller::{Controller, MirrorDataplane};
    use palisade_datastore::{NodeView, Watch};
    use policy_core::connection::ConnectionSpec;
    use policy_core::net::Protocol;

    let (_d, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let endpoints = "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
        metadata: {name: n1-k8s-cache-eth0, namespace: shop-backend, labels: {app: cache}}\n\
        spec: {node: n1, orchestrator: k8s, pod: cache, interfaceName: cali1, ipNetworks: [10.10.2.30/32], profiles: [kns.shop-backend]}\n";
    store.apply_text("weps.yaml", endpoints).unwrap();

    let mut watch = Watch::new(store.clone(), 0).unwrap();
    let mut view = NodeView::new("n1");
    let dataplane = MirrorDataplane::with_interfaces([("cali1", 11, [2, 0, 0, 0, 0, 11])]);
    let mut controller = Controller::new(Some("n1".into()), dataplane);
    let follow =
        |watch: &mut Watch, controller: &mut Controller<MirrorDataplane>, view: &mut NodeView| {
            let step = view.update(&watch.next(None).unwrap());
            controller.stage(step.changes).unwrap();
            controller.apply().unwrap();
            for (iface, key) in step.bind {
                controller.attach(&iface, Some(key)).unwrap();
            }
            step.rejected
        };
    assert!(follow(&mut watch, &mut controller, &mut view).is_empty());
    assert_eq!(view.bindings().len(), 1);

    let api_to_cache = |c: &Controller<MirrorDataplane>| {
        let (api, _) = c.peer("shop-backend/api", "src").unwrap();
        let (cache, _) = c.peer("shop-backend/cache", "dst").unwrap();
        let spec = ConnectionSpec {
            protocol: Protocol::TCP,
            dst_port: Some(6379),
            src_port: None,
            icmp: None,
            ip_version: None,
        };
        c.check((&api, None), (&cache, None), spec).unwrap().allowed
    };
    assert!(!api_to_cache(&controller), "default deny");
    store
        .apply_text(
            "cache.yaml",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
             metadata: {name: cache-from-api, namespace: shop-backend}\n\
             spec: {order: 10, selector: app == 'cache', types: [Ingress], ingress: [{action: Allow, protocol: TCP, source: {selector: app == 'api'}, destination: {ports: [6379]}}]}\n",
        )
        .unwrap();
    // The allow needs the api pod's egress too.
    store
        .apply_text(
            "api.yaml",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
             metadata: {name: api-to-cache, namespace: shop-backend}\n\
             spec: {order: 10, selector: app == 'api', types: [Egress], egress: [{action: Allow, protocol: TCP, destination: {selector: app == 'cache', ports: [6379]}}]}\n",
        )
        .unwrap();
    while watch.revision() < 4 {
        assert!(follow(&mut watch, &mut controller, &mut view).is_empty());
    }
    assert!(api_to_cache(&controller));

    // Another tool writes a broken version straight into the log (around
    // the store's validation): skipped, the last good one stays in force.
    let mut log = std::fs::read_to_string(store.log_path()).unwrap();
    let broken = log
        .lines()
        .find(|l| l.contains("cache-from-api"))
        .unwrap()
        .replace("app == 'cache'", "app = 'cache'")
        .replace("\"revision\":3", "\"revision\":5");
    log.push_str(&broken);
    log.push('\n');
    std::fs::write(store.log_path(), log).unwrap();
    let rejected = follow(&mut watch, &mut controller, &mut view);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].errors.contains("spec.selector"),
        "{}",
        rejected[0].errors
    );
    assert!(
        api_to_cache(&controller),
        "the last good version still decides"
    );
}

/// A record another tool wrote around validation (an unparsable selector)
/// is left out of every check, as agents leave it out: it blocks neither
/// other applies nor its own repair or deletion.
#[test]
fn an_unreadable_stored_object_blocks_neither_other_writes_nor_its_repair() {
    let (_dir, store) = store();
    store.apply_sources(&zero_trust()).unwrap();
    let bad = serde_json::json!({"put": {
        "key": "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/sneaky",
        "ref": {"kind": "GlobalNetworkPolicy", "namespace": null, "name": "sneaky"},
        "revision": 2,
        "document": {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": "sneaky"}, "spec": {"selector": "all("}}}});
    let mut log = log_bytes(&store);
    log.extend(format!("{bad}\n").bytes());
    std::fs::write(store.log_path(), log).unwrap();
    let gnp = |name: &str, selector: &str| {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec: {{selector: \"{selector}\"}}\n"
        )
    };
    let w = store
        .apply_text("other.yaml", &gnp("other", "all()"))
        .unwrap();
    assert_eq!(w.revision, 3);
    let w = store
        .apply_text("fix.yaml", &gnp("sneaky", "all()"))
        .unwrap();
    assert_eq!(w.replaced.len(), 1);
    let w = store
        .delete(&[ObjectRef::new("GlobalNetworkPolicy", None, "sneaky")])
        .unwrap();
    assert_eq!(w.deleted.len(), 1);
}
