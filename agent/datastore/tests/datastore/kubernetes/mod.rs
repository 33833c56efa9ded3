//! The Kubernetes datastore against a replaying API server ([`mock`]):
//! each test follows the store into a node's view and its controller (the
//! compiled programs of the maps engine) and checks what they then enforce.

mod fake;
mod ipam;
mod mock;

use std::time::{Duration, Instant};

use mock::{MockApi, list, status};
use palisade_controller::{Controller, MirrorDataplane};
use palisade_datastore::kubernetes::pod_interface;
use palisade_datastore::{
    Datastore, Follower, KubeClient, KubeOptions, KubeStore, KubeWatch, NodeView, Rejected,
    StoreChange,
};
use policy_core::connection::ConnectionSpec;
use policy_core::net::Protocol;
use serde_json::{Value, json};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const K8S_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const GLOBAL_POLICIES: &str = "/apis/crd.projectcalico.org/v1/globalnetworkpolicies";
const NODE: &str = "n1";

fn start(api: &MockApi) -> KubeStore {
    let api = api.clone();
    KubeStore::start(
        KubeClient::Custom(std::sync::Arc::new(move || api.client())),
        KubeOptions {
            backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            sync_timeout: Duration::from_secs(10),
            page: 2,
            ..KubeOptions::default()
        },
    )
    .unwrap()
}

/// A pod as the API server returns it (server-set fields included).
fn pod(namespace: &str, name: &str, app: &str, ip: &str, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "labels": {"app": app},
            "uid": format!("5b1c7a4e-0000-4000-8000-{:012}", ip.len()),
            "resourceVersion": version, "creationTimestamp": "2026-12-01T10:00:00Z",
            "generateName": format!("{app}-"),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-7d9f"),
                                 "uid": "0f0e0d0c-0000-4000-8000-000000000001", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-12-01T10:00:02Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}},
                               "subresource": "status"}]
        },
        "spec": {
            "nodeName": NODE, "serviceAccountName": "default", "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "containers": [{"name": "main", "image": "busybox:1.36", "imagePullPolicy": "IfNotPresent",
                            "ports": [{"name": "pg", "containerPort": 5432, "protocol": "TCP"}],
                            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {
            "phase": "Running", "hostIP": "192.0.2.11", "hostIPs": [{"ip": "192.0.2.11"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort",
            "startTime": "2026-12-01T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-12-01T10:00:02Z"}]
        }
    })
}

fn namespace(name: &str, labels: Value, version: &str) -> Value {
    let mut labels = labels;
    labels["kubernetes.io/metadata.name"] = json!(name);
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels, "resourceVersion": version,
                        "uid": "1d2c3b4a-0000-4000-8000-000000000002",
                        "creationTimestamp": "2026-12-01T09:00:00Z"},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// The default-deny GlobalNetworkPolicy as Calico's CRD stores it.
fn default_deny(version: &str) -> Value {
    json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
           "metadata": {"name": "default.default-deny", "resourceVersion": version, "generation": 1,
                        "uid": "9a8b7c6d-0000-4000-8000-000000000003",
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"tier": "default", "selector": "projectcalico.org/namespace != 'kube-system'",
                    "types": ["Ingress"]}})
}

/// A NetworkPolicy letting `from` (pods by app, optionally namespaces by
/// team) reach the db on 5432.
fn db_policy(name: &str, from: Value, version: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": version, "generation": 1,
                        "uid": "7e6f5a4b-0000-4000-8000-000000000004",
                        "creationTimestamp": "2026-12-01T10:05:00Z"},
           "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [from], "ports": [{"protocol": "TCP", "port": 5432}]}]}})
}

/// This node's view and controller, fed batch by batch.
struct Node {
    view: NodeView,
    controller: Controller<MirrorDataplane>,
    rejected: Vec<Rejected>,
}

impl Node {
    fn new(local_pods: &[(&str, &str)]) -> Self {
        let names: Vec<String> = local_pods
            .iter()
            .map(|(ns, p)| pod_interface(ns, p))
            .collect();
        let dataplane = MirrorDataplane::with_interfaces(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), 10 + i as u32, [2, 0, 0, 0, 0, i as u8])),
        );
        Self {
            view: NodeView::new(NODE),
            controller: Controller::new(Some(NODE.into()), dataplane),
            rejected: Vec::new(),
        }
    }

    fn take(&mut self, batch: &[StoreChange]) {
        let step = self.view.update(batch);
        self.controller.stage(step.changes).unwrap();
        self.controller.apply().unwrap();
        for iface in step.unbind {
            self.controller.detach(&iface).unwrap();
        }
        for (iface, key) in step.bind {
            self.controller.attach(&iface, Some(key)).unwrap();
        }
        self.rejected.extend(step.rejected);
    }

    /// Whether `from` (`ns/pod`) may open TCP to `to` on `port`; None when
    /// either is not an endpoint.
    fn allows(&self, from: &str, to: &str, port: u16) -> Option<bool> {
        let (src, _) = self.controller.peer(from, "src").ok()?;
        let (dst, _) = self.controller.peer(to, "dst").ok()?;
        let spec = ConnectionSpec {
            protocol: Protocol::TCP,
            dst_port: Some(port),
            src_port: None,
            icmp: None,
            ip_version: None,
        };
        Some(
            self.controller
                .check((&src, None), (&dst, None), spec)
                .unwrap()
                .allowed,
        )
    }

    /// Follows `watch` until `done` holds (10 s at most).
    fn until(&mut self, watch: &mut KubeWatch, what: &str, done: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            match watch.next(Some(Duration::from_millis(100))) {
                Ok(batch) => self.take(&batch),
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }
}

/// Lists the store into a fresh node and a watch after it.
fn listed(store: &KubeStore, node: &mut Node) -> KubeWatch {
    let snapshot = store.snapshot().unwrap();
    let puts: Vec<StoreChange> = snapshot.objects.into_iter().map(StoreChange::Put).collect();
    node.take(&puts);
    store.watch(snapshot.revision).unwrap()
}

fn shop(api: &MockApi, pods_version: &str) {
    api.on_list(
        NAMESPACES,
        200,
        list(
            "v1",
            "Namespace",
            "100",
            None,
            &[
                namespace("shop", json!({}), "10"),
                namespace("clients", json!({"team": "frontend"}), "11"),
            ],
        ),
    );
    // Pods come in pages of two: the store follows `continue`.
    api.on_list(
        PODS,
        200,
        list(
            "v1",
            "Pod",
            pods_version,
            Some("page-2"),
            &[
                pod("shop", "api-0", "api", "10.10.0.5", "20"),
                pod("shop", "db-0", "db", "10.10.0.6", "21"),
            ],
        ),
    );
    api.on_list(
        PODS,
        200,
        list(
            "v1",
            "Pod",
            pods_version,
            None,
            &[pod("clients", "web-0", "web", "10.10.0.7", "22")],
        ),
    );
    api.on_list(
        GLOBAL_POLICIES,
        200,
        list(
            "crd.projectcalico.org/v1",
            "GlobalNetworkPolicy",
            "100",
            None,
            &[default_deny("30")],
        ),
    );
    api.on_list(
        K8S_POLICIES,
        200,
        list(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "100",
            None,
            &[db_policy(
                "db-from-api",
                json!({"podSelector": {"matchLabels": {"app": "api"}}}),
                "40",
            )],
        ),
    );
}

#[test]
fn a_listed_cluster_is_enforced_and_follows_relabels_policies_and_namespace_deletes() {
    let api = MockApi::default();
    shop(&api, "100");
    let pods = api.on_watch(PODS);
    let policies = api.on_watch(K8S_POLICIES);
    let namespaces = api.on_watch(NAMESPACES);
    let store = start(&api);
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    let mut watch = listed(&store, &mut node);

    assert_eq!(
        node.view.bindings().len(),
        3,
        "the local pods are bound: {:?}",
        node.view.bindings()
    );
    assert_eq!(node.allows("shop/api-0", "shop/db-0", 5432), Some(true));
    assert_eq!(
        node.allows("clients/web-0", "shop/db-0", 5432),
        Some(false),
        "default deny"
    );
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(PODS) && r.contains("continue=page-2")),
        "the second page was asked for: {requests:?}"
    );
    let watched = api.wait_for(|r| r.starts_with(PODS) && r.contains("watch=true"));
    assert!(
        watched.contains("resourceVersion=100") && watched.contains("allowWatchBookmarks=true"),
        "the watch starts at the listing's version, with bookmarks: {watched}"
    );

    // A pod relabelled: it no longer matches the policy's source.
    pods.event("MODIFIED", {
        let mut p = pod("shop", "api-0", "batch", "10.10.0.5", "101");
        p["metadata"]["labels"]["app"] = json!("batch");
        p
    });
    node.until(&mut watch, "the relabel", |n| {
        n.allows("shop/api-0", "shop/db-0", 5432) == Some(false)
    });

    // A policy added and removed.
    let from_team = db_policy(
        "db-from-frontend",
        json!({"namespaceSelector": {"matchLabels": {"team": "frontend"}}}),
        "102",
    );
    policies.event("ADDED", from_team.clone());
    node.until(&mut watch, "the new policy", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(true)
    });
    policies.event("DELETED", from_team.clone());
    node.until(&mut watch, "the policy's removal", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(false)
    });
    policies.event("ADDED", from_team);
    node.until(&mut watch, "the policy again", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(true)
    });

    // The namespace deleted: its labels stop matching before its pods go.
    namespaces.event(
        "DELETED",
        namespace("clients", json!({"team": "frontend"}), "104"),
    );
    node.until(&mut watch, "the namespace's deletion", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(false)
    });
    pods.event(
        "DELETED",
        pod("clients", "web-0", "web", "10.10.0.7", "105"),
    );
    node.until(&mut watch, "the pod's deletion", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432).is_none()
    });
    assert!(node.rejected.is_empty(), "{:?}", node.rejected);
}

#[test]
fn admin_network_policies_from_the_api_decide_before_namespace_policies() {
    const ADMIN: &str = "/apis/policy.networking.k8s.io/v1alpha1/adminnetworkpolicies";
    let api = MockApi::default();
    shop(&api, "100");
    let guard = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
        "metadata": {"name": "db-guard", "resourceVersion": "50", "uid": "u-anp",
                     "generation": 1, "creationTimestamp": "2026-12-01T10:00:00Z"},
        "spec": {"priority": 5,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
                 "ingress": [{"name": "no-api", "action": "Deny",
                              "from": [{"pods": {"namespaceSelector": {},
                                                 "podSelector": {"matchLabels": {"app": "api"}}}}]}]}});
    api.on_list(
        ADMIN,
        200,
        list(
            "policy.networking.k8s.io/v1alpha1",
            "AdminNetworkPolicy",
            "100",
            None,
            std::slice::from_ref(&guard),
        ),
    );
    let admin = api.on_watch(ADMIN);
    let store = start(&api);
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    let mut watch = listed(&store, &mut node);
    // The namespace policy allows api -> db; the admin tier denies it first.
    assert_eq!(node.allows("shop/api-0", "shop/db-0", 5432), Some(false));
    // Deleted: the namespace policy decides again.
    admin.event("DELETED", guard);
    node.until(&mut watch, "the admin policy's removal", |n| {
        n.allows("shop/api-0", "shop/db-0", 5432) == Some(true)
    });
    // The baseline and ClusterNetworkPolicy kinds are not served here (no
    // CRDs): the store is in sync without them.
    assert!(node.rejected.is_empty(), "{:?}", node.rejected);
}

#[test]
fn a_watch_broken_mid_event_resumes_from_the_last_version_seen() {
    let api = MockApi::default();
    shop(&api, "100");
    let first = api.on_watch(PODS);
    let second = api.on_watch(PODS);
    let store = start(&api);
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    let mut watch = listed(&store, &mut node);

    // A bookmark moves the version on; then the stream breaks halfway
    // through an event that never arrives whole.
    first.bookmark("v1", "Pod", "150");
    first.break_mid_event(pod("shop", "api-0", "batch", "10.10.0.5", "151"));
    let lost = watch.next(Some(Duration::from_secs(10)));
    assert!(lost.is_err(), "the follower hears of the loss: {lost:?}");
    assert_eq!(
        node.allows("shop/api-0", "shop/db-0", 5432),
        Some(true),
        "the last state holds"
    );

    // The store resumes from the bookmark's version, not from the listing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watch = loop {
        match store.watch(watch.revision()) {
            Ok(w) => break w,
            Err(e) => {
                assert!(Instant::now() < deadline, "never in sync again: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let resumed: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(PODS) && r.contains("watch=true"))
        .collect();
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert!(resumed[1].contains("resourceVersion=150"), "{resumed:?}");
    assert_eq!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with(PODS) && !r.contains("watch=true"))
            .count(),
        2,
        "no second listing (two pages once)"
    );
    second.event(
        "MODIFIED",
        pod("shop", "api-0", "batch", "10.10.0.5", "151"),
    );
    node.until(&mut watch, "the event after the resume", |n| {
        n.allows("shop/api-0", "shop/db-0", 5432) == Some(false)
    });
}

#[test]
fn a_410_lists_again_and_leaves_exactly_the_listed_state() {
    let api = MockApi::default();
    shop(&api, "100");
    let first = api.on_watch(K8S_POLICIES);
    // The second listing: the old policy gone, another in its place.
    api.on_list(
        K8S_POLICIES,
        200,
        list(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            "300",
            None,
            &[db_policy(
                "db-from-frontend",
                json!({"namespaceSelector": {"matchLabels": {"team": "frontend"}}}),
                "290",
            )],
        ),
    );
    let second = api.on_watch(K8S_POLICIES);
    let store = start(&api);
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    let mut watch = listed(&store, &mut node);
    assert_eq!(node.allows("shop/api-0", "shop/db-0", 5432), Some(true));

    first.error(410, "Expired", "too old resource version: 100 (250)");
    // The follower hears of the loss, then the listing as one batch.
    let lost = watch.next(Some(Duration::from_secs(10)));
    assert!(
        matches!(&lost, Err(e) if e.to_string().contains("410"))
            || lost.as_ref().is_ok_and(|b| !b.is_empty()),
        "{lost:?}"
    );
    if let Ok(batch) = lost {
        node.take(&batch);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watch = loop {
        match store.watch(watch.revision()) {
            Ok(w) => break w,
            Err(e) => {
                assert!(Instant::now() < deadline, "never in sync again: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    node.until(&mut watch, "the re-listed state", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(true)
            && n.allows("shop/api-0", "shop/db-0", 5432) == Some(false)
    });
    let policies: Vec<String> = store
        .snapshot()
        .unwrap()
        .objects
        .iter()
        .filter(|o| o.object.kind == "KubernetesNetworkPolicy")
        .map(|o| o.object.name.clone())
        .collect();
    assert_eq!(
        policies,
        ["db-from-frontend"],
        "exactly the listed policies"
    );
    let rewatched = api.wait_for(|r| {
        r.starts_with(K8S_POLICIES)
            && r.contains("watch=true")
            && !r.contains("resourceVersion=100")
    });
    assert!(
        rewatched.contains("resourceVersion=300"),
        "watching from the new listing: {rewatched}"
    );
    second.event("DELETED", db_policy("db-from-frontend", json!({}), "301"));
    node.until(&mut watch, "the delete after the re-list", |n| {
        n.allows("clients/web-0", "shop/db-0", 5432) == Some(false)
    });
}

#[test]
fn forbidden_and_throttled_lists_keep_the_store_out_of_sync_until_they_pass() {
    let api = MockApi::default();
    // The namespaces are refused twice, then throttled, then listed.
    let refused = status(
        403,
        "Forbidden",
        "namespaces is forbidden: User \"system:serviceaccount:kube-system:palisade\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope",
    );
    api.on_list(NAMESPACES, 403, refused.clone());
    api.on_list(NAMESPACES, 403, refused);
    api.on_list(
        NAMESPACES,
        429,
        status(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
        ),
    );
    shop(&api, "100");
    let store = start(&api);
    // While refused, the store says which kind and why, and lists nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        let sync = store.sync();
        if let Some(palisade_datastore::kubernetes::KindSync::Failed(why)) = sync.get("namespaces")
        {
            break why.clone();
        }
        assert!(Instant::now() < deadline, "{sync:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        why.contains("403") && why.contains("list and watch on namespaces"),
        "{why}"
    );
    // Nothing can follow it meanwhile: no partial cluster is enforced.
    assert!(store.watch(0).is_err());
    // Then it passes: the listing arrives, every kind is in sync, and the
    // node enforces the whole cluster.
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    listed(&store, &mut node);
    assert_eq!(node.allows("shop/api-0", "shop/db-0", 5432), Some(true));
    assert_eq!(node.allows("clients/web-0", "shop/db-0", 5432), Some(false));
    let asked = api
        .requests()
        .iter()
        .filter(|r| r.starts_with(NAMESPACES) && !r.contains("watch"))
        .count();
    // kube's client retries a 429 itself: the store saw the 403s only.
    assert_eq!(asked, 4, "two refusals, one throttle, one listing");
}

#[test]
fn malformed_objects_are_reported_and_skipped_while_the_rest_is_enforced() {
    let api = MockApi::default();
    shop(&api, "100");
    let mut bad_pod = pod("shop", "cache-0", "cache", "10.10.0.300", "23");
    bad_pod["metadata"]["labels"]["app"] = json!("cache");
    let broken = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "default.broken", "resourceVersion": "31"},
        "spec": {"selector": "app = 'db'", "types": ["Ingress"]}});
    let pods = api.on_watch(PODS);
    let policies = api.on_watch(GLOBAL_POLICIES);
    let store = start(&api);
    let mut node = Node::new(&[("shop", "api-0"), ("shop", "db-0"), ("clients", "web-0")]);
    let mut watch = listed(&store, &mut node);
    assert_eq!(node.allows("shop/api-0", "shop/db-0", 5432), Some(true));

    pods.event("ADDED", bad_pod);
    policies.event("ADDED", broken);
    node.until(&mut watch, "both reports", |n| n.rejected.len() == 2);
    let report: Vec<&str> = node.rejected.iter().map(|r| r.errors.as_str()).collect();
    assert!(
        report
            .iter()
            .any(|e| e.contains("status.podIPs[0].ip") && e.contains("cache-0")),
        "{report:?}"
    );
    assert!(
        report.iter().any(|e| e.contains("spec.selector")),
        "{report:?}"
    );
    assert_eq!(
        node.allows("shop/api-0", "shop/db-0", 5432),
        Some(true),
        "everything else holds"
    );
    assert_eq!(node.allows("clients/web-0", "shop/db-0", 5432), Some(false));
}

/// What the CNI plugin and the overlay write become annotations, as with
/// Calico's Kubernetes backend; anything else is refused before a request.
#[test]
fn an_endpoint_and_a_node_are_written_as_annotations_and_the_rest_is_refused() {
    let api = MockApi::default();
    // A writer's store lists nothing.
    let store = {
        let api = api.clone();
        KubeStore::new(
            KubeClient::Custom(std::sync::Arc::new(move || api.client())),
            KubeOptions::default(),
        )
    };
    let endpoint = json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": "n1-k8s-web--0-eth0", "namespace": "shop"},
        "spec": {"orchestrator": "k8s", "node": NODE, "pod": "web-0", "endpoint": "eth0",
                 "containerID": "c0ffee", "interfaceName": pod_interface("shop", "web-0"),
                 "ipNetworks": ["10.10.0.9/32"]}});
    store
        .apply_text("palisade-cni", &endpoint.to_string())
        .unwrap();
    let node = json!({"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": NODE},
        "spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}, "ipv4VXLANTunnelAddr": "10.10.0.1",
                 "vxlanTunnelMACAddr": "66:00:00:00:00:01"}});
    store
        .apply_text("palisade-agent", &node.to_string())
        .unwrap();
    store
        .delete(&[policy_core::ObjectRef::new(
            "WorkloadEndpoint",
            Some("shop"),
            "n1-k8s-web--0-eth0",
        )])
        .unwrap();
    let bodies = api.bodies();
    assert_eq!(bodies[0].0, "PATCH /api/v1/namespaces/shop/pods/web-0");
    assert_eq!(
        bodies[0].1["metadata"]["annotations"],
        json!({"cni.projectcalico.org/podIP": "10.10.0.9/32", "cni.projectcalico.org/podIPs": "10.10.0.9/32",
               "cni.projectcalico.org/containerID": "c0ffee"})
    );
    assert_eq!(bodies[1].0, "PATCH /api/v1/nodes/n1");
    assert_eq!(
        bodies[1].1["metadata"]["annotations"]["projectcalico.org/IPv4VXLANTunnelAddr"],
        "10.10.0.1"
    );
    assert_eq!(
        bodies[2].1["metadata"]["annotations"]["cni.projectcalico.org/podIPs"],
        Value::Null
    );

    let e = store
        .apply_text(
            "x.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
        )
        .unwrap_err();
    assert!(e.to_string().contains("kubectl apply"), "{e}");
    assert_eq!(api.bodies().len(), 3, "nothing was sent");
    assert!(
        api.requests().iter().all(|r| r.starts_with("PATCH ")),
        "a writer's store lists nothing: {:?}",
        api.requests()
    );
}

/// A pod the CNI plugin annotated is an endpoint at once, before the
/// kubelet reports its addresses.
#[test]
fn a_pod_annotated_by_the_cni_plugin_is_enforced_before_its_status_says_so() {
    let api = MockApi::default();
    shop(&api, "100");
    let pods = api.on_watch(PODS);
    let store = start(&api);
    let mut node = Node::new(&[
        ("shop", "api-0"),
        ("shop", "db-0"),
        ("clients", "web-0"),
        ("shop", "api-1"),
    ]);
    let mut watch = listed(&store, &mut node);
    let mut fresh = pod("shop", "api-1", "api", "10.10.0.8", "110");
    fresh["status"] = json!({"phase": "Pending"});
    pods.event("ADDED", fresh.clone());
    fresh["metadata"]["annotations"] = json!({"cni.projectcalico.org/podIPs": "10.10.0.8/32",
        "cni.projectcalico.org/podIP": "10.10.0.8/32", "cni.projectcalico.org/containerID": "c0ffee"});
    fresh["metadata"]["resourceVersion"] = json!("111");
    pods.event("MODIFIED", fresh);
    node.until(&mut watch, "the annotated pod", |n| {
        n.allows("shop/api-1", "shop/db-0", 5432) == Some(true)
    });
    assert!(
        node.view
            .bindings()
            .contains_key(&pod_interface("shop", "api-1"))
    );
}

/// `(group, resource, verb)` of an API request the store made.
fn call_of(request: &str) -> (String, String, String) {
    let (method, request) = request.split_once(' ').unwrap_or(("GET", request));
    let (path, query) = request.split_once('?').unwrap_or((request, ""));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, resource) = match parts.as_slice() {
        ["api", _version, resource] | ["api", _version, resource, _] => ("", *resource),
        ["api", _version, "namespaces", _, resource, _] => ("", *resource),
        ["apis", group, _version, resource] => (*group, *resource),
        other => panic!("an unexpected path: {other:?}"),
    };
    let verb = match method {
        "PATCH" => "patch",
        _ if query.split('&').any(|p| p == "watch=true") => "watch",
        _ => "list",
    };
    (group.into(), resource.into(), verb.into())
}

fn deployed(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// The ClusterRole grants exactly the calls the stores make (the watches
/// seen by the replaying server, IPAM's by the stand-in running corpus
/// scenarios), and the CRDs define exactly the Calico kinds they read and
/// write, with the scope the datastore gives them.
#[test]
fn the_deployed_rbac_and_crds_match_what_the_store_reads() {
    use std::collections::BTreeSet;
    let api = MockApi::default();
    let store = start(&api);
    store.snapshot().unwrap();
    // The two writes an agent makes.
    store
        .apply_text("palisade-cni", &json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": "n1-k8s-web--0-eth0", "namespace": "shop"},
            "spec": {"orchestrator": "k8s", "node": NODE, "pod": "web-0", "ipNetworks": ["10.10.0.9/32"]}}).to_string())
        .unwrap();
    store
        .apply_text(
            "palisade-agent",
            &json!({"apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": NODE}, "spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}})
            .to_string(),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let calls = loop {
        let calls: BTreeSet<(String, String, String)> =
            api.requests().iter().map(|r| call_of(r)).collect();
        if calls.iter().filter(|c| c.2 == "watch").count()
            == palisade_datastore::kubernetes::API_KINDS.len()
        {
            break calls;
        }
        assert!(
            Instant::now() < deadline,
            "not every kind is watched: {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };

    // The IPAM store may make each of its verbs on each of its resources
    // (its keys are generic): those are what it needs. The corpus run on
    // the stand-in shows it makes no other call, and each verb somewhere.
    use palisade_datastore::ipam::kubernetes::{IPAM_RESOURCES, IPAM_VERBS};
    let fake = fake::FakeApi::default();
    ipam::run_scenarios_on(&fake, usize::MAX);
    let ipam_calls: BTreeSet<(String, String, String)> = fake.calls().into_iter().collect();
    let ipam_needs: BTreeSet<(String, String, String)> = IPAM_RESOURCES
        .iter()
        .flat_map(|(plural, _)| {
            IPAM_VERBS.iter().map(move |verb| {
                (
                    "crd.projectcalico.org".to_string(),
                    plural.to_string(),
                    verb.to_string(),
                )
            })
        })
        .collect();
    assert!(
        ipam_calls.is_subset(&ipam_needs),
        "{:?}",
        ipam_calls.difference(&ipam_needs)
    );
    for verb in IPAM_VERBS {
        assert!(
            ipam_calls.iter().any(|c| c.2 == verb),
            "IPAM never calls {verb}"
        );
    }
    let mut calls = calls;
    calls.extend(ipam_needs);

    let docs = deployed("rbac.yaml");
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    granted.insert((
                        group.as_str().unwrap().to_string(),
                        resource.as_str().unwrap().to_string(),
                        verb.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    assert_eq!(
        granted.difference(&calls).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "granted but never called"
    );
    assert_eq!(
        calls.difference(&granted).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "called but not granted"
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .unwrap();
    let account = docs.iter().find(|d| d["kind"] == "ServiceAccount").unwrap();
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    // The admission policy that keeps its patches to its own node names
    // the same account, and is bound.
    let account_user = format!(
        "system:serviceaccount:{}:{}",
        account["metadata"]["namespace"].as_str().unwrap(),
        account["metadata"]["name"].as_str().unwrap()
    );
    let own = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .unwrap();
    assert!(
        own["spec"]["matchConditions"][0]["expression"]
            .as_str()
            .unwrap()
            .contains(&account_user)
    );
    let patched: BTreeSet<String> = granted
        .iter()
        .filter(|g| g.2 == "patch")
        .map(|g| g.1.clone())
        .collect();
    let guarded: BTreeSet<String> =
        own["spec"]["matchConstraints"]["resourceRules"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
    assert_eq!(
        patched, guarded,
        "every patch it may make is held to its own node"
    );
    let bound = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicyBinding")
        .unwrap();
    assert_eq!(bound["spec"]["policyName"], own["metadata"]["name"]);

    let crds = deployed("crds.yaml");
    let mut read: BTreeSet<(String, String, bool)> = palisade_datastore::kubernetes::API_KINDS
        .iter()
        .filter(|k| k.group == "crd.projectcalico.org")
        .map(|k| {
            let namespaced = palisade_datastore::kind_named(k.stored_as)
                .unwrap()
                .namespaced;
            (k.plural.to_string(), k.kind.to_string(), namespaced)
        })
        .collect();
    for (plural, kind) in palisade_datastore::ipam::kubernetes::IPAM_RESOURCES {
        read.insert((plural.to_string(), kind.to_string(), false));
    }
    let defined: BTreeSet<(String, String, bool)> = crds
        .iter()
        .map(|c| {
            assert_eq!(c["spec"]["group"], "crd.projectcalico.org");
            assert_eq!(c["spec"]["versions"][0]["name"], "v1");
            (
                c["spec"]["names"]["plural"].as_str().unwrap().to_string(),
                c["spec"]["names"]["kind"].as_str().unwrap().to_string(),
                c["spec"]["scope"] == "Namespaced",
            )
        })
        .collect();
    assert_eq!(defined, read);
}
