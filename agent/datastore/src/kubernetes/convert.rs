//! API objects into the documents the other datastores hold, as Calico's
//! Kubernetes datastore converts them. Pure: JSON in, JSON out.
//!
//! | from the API | stored as |
//! |---|---|
//! | `crd.projectcalico.org/v1` kinds | the same kind in `projectcalico.org/v3`; a default-tier policy loses the `default.` its CRD name carries |
//! | Pod (scheduled, not host-networked, with addresses, not finished) | a `WorkloadEndpoint` named `<node>-k8s-<pod>-eth0`, on the interface Palisade's CNI plugin creates for it; addresses from the CNI plugin's `cni.projectcalico.org/podIPs` annotation, else the status |
//! | Pod that does not convert | the Pod itself, so the node's view reports it naming the field |
//! | Pod without a place on the network yet | nothing (an absent endpoint) |
//! | Node | a Calico `Node` from its annotations and addresses |
//! | Namespace, ServiceAccount, NetworkPolicy, Service, EndpointSlice | themselves |
//!
//! Metadata keeps name, namespace, labels and annotations (without
//! kubectl's last-applied copy); server-set fields and `status` go, except
//! a Service's status (its load-balancer addresses) and a Pod's addresses.

use serde_json::{Map, Value, json};

use policy_core::model::{LABEL_NAMESPACE, LABEL_ORCHESTRATOR, LABEL_SERVICE_ACCOUNT};

/// The interface Palisade's CNI plugin creates on the host for a pod.
pub fn pod_interface(namespace: &str, pod: &str) -> String {
    palisade_network::pod::host_ifname(&format!("{namespace}.{pod}"))
}

/// Calico's name for a workload endpoint: node, orchestrator, workload and
/// interface, each with `-` doubled, joined with `-`.
pub fn workload_endpoint_name(
    node: &str,
    orchestrator: &str,
    workload: &str,
    iface: &str,
) -> String {
    let escape = |s: &str| s.replace('-', "--");
    format!(
        "{}-{orchestrator}-{}-{}",
        escape(node),
        escape(workload),
        escape(iface)
    )
}

/// How objects of one API kind become stored documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Kubernetes kinds stored as they are.
    Same,
    /// Calico's CRDs: `projectcalico.org/v3`.
    Calico,
    /// Pods: workload endpoints.
    Pod,
    /// Nodes: Calico Nodes.
    Node,
}

/// What an API object is stored as.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// This document.
    Document(Value),
    /// Nothing: the object has no part in the dataplane (yet).
    Absent,
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Name, namespace, labels and annotations of `metadata`.
fn trimmed_metadata(metadata: &Value) -> Value {
    let mut out = Map::new();
    for field in ["name", "namespace", "labels", "annotations"] {
        if let Some(v) = metadata.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    if let Some(Value::Object(a)) = out.get_mut("annotations") {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            out.remove("annotations");
        }
    }
    Value::Object(out)
}

/// Converts one API object (as JSON: `apiVersion`, `kind`, `metadata`,
/// ...) by `conversion`.
pub fn convert(conversion: Conversion, object: &Value) -> Stored {
    match conversion {
        Conversion::Same => Stored::Document(same(object)),
        Conversion::Calico => Stored::Document(calico(object)),
        Conversion::Pod => pod(object),
        Conversion::Node => Stored::Document(node(object)),
    }
}

fn same(object: &Value) -> Value {
    let mut out = object.as_object().cloned().unwrap_or_default();
    out.insert("metadata".into(), trimmed_metadata(&object["metadata"]));
    match object["kind"].as_str() {
        // Its load-balancer addresses.
        Some("Service") => {}
        // Its addresses (a pod kept as a Pod is one that did not convert).
        Some("Pod") => {
            let status = &object["status"];
            let kept: Map<String, Value> = ["phase", "podIP", "podIPs"]
                .into_iter()
                .filter_map(|f| status.get(f).map(|v| (f.to_string(), v.clone())))
                .collect();
            out.insert("status".into(), Value::Object(kept));
        }
        _ => {
            out.remove("status");
        }
    }
    Value::Object(out)
}

fn calico(object: &Value) -> Value {
    let mut out = object.as_object().cloned().unwrap_or_default();
    out.insert("apiVersion".into(), json!("projectcalico.org/v3"));
    let mut metadata = trimmed_metadata(&object["metadata"]);
    let policy = matches!(
        object["kind"].as_str(),
        Some(
            "NetworkPolicy"
                | "GlobalNetworkPolicy"
                | "StagedNetworkPolicy"
                | "StagedGlobalNetworkPolicy"
        )
    );
    let tier = object["spec"]["tier"].as_str().unwrap_or("default");
    if policy
        && tier == "default"
        && let Some(name) = metadata["name"].as_str()
        && let Some(bare) = name.strip_prefix("default.")
    {
        metadata["name"] = json!(bare);
    }
    out.insert("metadata".into(), metadata);
    out.remove("status");
    Value::Object(out)
}

/// Calico's rule for pods on the network: scheduled, pod-networked, with an
/// address, not finished.
fn pod(object: &Value) -> Stored {
    let spec = &object["spec"];
    let status = &object["status"];
    let node = spec["nodeName"].as_str().unwrap_or_default();
    let finished = matches!(status["phase"].as_str(), Some("Succeeded" | "Failed"));
    // The CNI plugin's annotation first (it is there before the kubelet
    // reports the pod's addresses), then the pod's status.
    let annotated: Vec<&str> = object["metadata"]["annotations"][super::write::POD_IPS]
        .as_str()
        .map(|s| {
            s.split(',')
                .map(|n| n.trim().split('/').next().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    let reported: Vec<&str> = status["podIPs"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["ip"].as_str()).collect())
        .unwrap_or_default();
    let ips: Vec<&str> = if !annotated.is_empty() {
        annotated
    } else if !reported.is_empty() {
        reported
    } else {
        status["podIP"].as_str().into_iter().collect()
    };
    if node.is_empty() || spec["hostNetwork"] == true || finished || ips.is_empty() {
        return Stored::Absent;
    }
    // The model's own Pod conversion checks every field a workload endpoint
    // takes from the pod; a pod it refuses is kept as it is so the node's
    // view reports it by the pod's own fields.
    let mut document = same(object);
    document["status"]["podIPs"] =
        json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
    document["status"]["podIP"] = json!(ips[0]);
    if policy_core::convert::convert_document_all(&document).is_err() {
        return Stored::Document(document);
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let account = spec["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let mut labels = object["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    labels.insert(LABEL_NAMESPACE.into(), json!(namespace));
    labels.insert(LABEL_ORCHESTRATOR.into(), json!("k8s"));
    labels.insert(LABEL_SERVICE_ACCOUNT.into(), json!(account));
    let nets: Vec<String> = ips
        .iter()
        .map(|ip| {
            if ip.contains(':') {
                format!("{ip}/128")
            } else {
                format!("{ip}/32")
            }
        })
        .collect();
    let ports: Vec<Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter(|p| p["name"].as_str().is_some_and(|n| !n.is_empty()))
        .map(|p| {
            json!({"name": p["name"], "port": p["containerPort"],
                   "protocol": p["protocol"].as_str().unwrap_or("TCP")})
        })
        .collect();
    Stored::Document(json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "WorkloadEndpoint",
        "metadata": {
            "name": workload_endpoint_name(node, "k8s", name, "eth0"),
            "namespace": namespace,
            "labels": labels,
        },
        "spec": {
            "orchestrator": "k8s",
            "node": node,
            "pod": name,
            "endpoint": "eth0",
            "interfaceName": pod_interface(namespace, name),
            "ipNetworks": nets,
            "profiles": [format!("kns.{namespace}"), format!("ksa.{namespace}.{account}")],
            "serviceAccountName": account,
            "ports": ports,
        },
    }))
}

/// Calico's Node from a Kubernetes Node: the addresses and tunnel settings
/// calico-node writes in its annotations, and the Node's own addresses.
fn node(object: &Value) -> Value {
    let annotations = &object["metadata"]["annotations"];
    let note = |k: &str| annotations[k].as_str().filter(|s| !s.is_empty());
    let mut spec = Map::new();
    let mut bgp = Map::new();
    if let Some(a) = note("projectcalico.org/IPv4Address") {
        bgp.insert("ipv4Address".into(), json!(a));
    }
    if let Some(a) = note("projectcalico.org/IPv6Address") {
        bgp.insert("ipv6Address".into(), json!(a));
    }
    if !bgp.is_empty() {
        spec.insert("bgp".into(), Value::Object(bgp));
    }
    for (annotation, field) in [
        (
            "projectcalico.org/IPv4VXLANTunnelAddr",
            "ipv4VXLANTunnelAddr",
        ),
        ("projectcalico.org/VXLANTunnelMACAddr", "vxlanTunnelMACAddr"),
        (
            "projectcalico.org/IPv6VXLANTunnelAddr",
            "ipv6VXLANTunnelAddr",
        ),
        (
            "projectcalico.org/VXLANTunnelMACAddrV6",
            "vxlanTunnelMACAddrV6",
        ),
    ] {
        if let Some(v) = note(annotation) {
            spec.insert(field.into(), json!(v));
        }
    }
    let addresses: Vec<Value> = object["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| matches!(a["type"].as_str(), Some("InternalIP" | "ExternalIP")))
        .map(|a| json!({"address": a["address"], "type": a["type"]}))
        .collect();
    if !addresses.is_empty() {
        spec.insert("addresses".into(), Value::Array(addresses));
    }
    // What kube-proxy's /healthz reads: a Node being deleted, or tainted
    // for deletion by the cluster autoscaler, is no longer eligible.
    if let Some(taints) = object["spec"]["taints"]
        .as_array()
        .filter(|t| !t.is_empty())
    {
        spec.insert("taints".into(), Value::Array(taints.clone()));
    }
    let mut metadata = trimmed_metadata(&object["metadata"]);
    if let Value::Object(m) = &mut metadata {
        m.remove("annotations");
        if let Some(t) = object["metadata"]
            .get("deletionTimestamp")
            .filter(|t| !t.is_null())
        {
            m.insert("deletionTimestamp".into(), t.clone());
        }
    }
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Node",
        "metadata": metadata,
        "spec": spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(ips: &[&str]) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                         "uid": "u", "resourceVersion": "7", "managedFields": [{}]},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                     "containers": [{"name": "c", "image": "i",
                        "ports": [{"name": "http", "containerPort": 8080},
                                  {"containerPort": 9000, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": ips.first(),
                       "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
        })
    }

    #[test]
    fn a_running_pod_is_the_workload_endpoint_calico_derives() {
        let Stored::Document(wep) = convert(Conversion::Pod, &pod_json(&["10.10.0.5", "fd00::5"]))
        else {
            panic!("absent")
        };
        assert_eq!(wep["kind"], "WorkloadEndpoint");
        assert_eq!(wep["metadata"]["name"], "node--a-k8s-web--0-eth0");
        assert_eq!(
            wep["metadata"]["labels"]["projectcalico.org/serviceaccount"],
            "web"
        );
        assert_eq!(
            wep["spec"]["ipNetworks"],
            json!(["10.10.0.5/32", "fd00::5/128"])
        );
        assert_eq!(
            wep["spec"]["interfaceName"],
            json!(pod_interface("shop", "web-0"))
        );
        assert_eq!(
            wep["spec"]["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        let endpoint = policy_core::convert::convert_document_all(&wep).unwrap();
        assert_eq!(endpoint.object_ref().name, "web-0");
    }

    #[test]
    fn the_cni_plugins_annotation_gives_the_addresses_before_the_status_does() {
        let mut p = pod_json(&[]);
        p["metadata"]["annotations"] =
            json!({"cni.projectcalico.org/podIPs": "10.10.0.9/32,fd00::9/128"});
        let Stored::Document(wep) = convert(Conversion::Pod, &p) else {
            panic!("absent")
        };
        assert_eq!(
            wep["spec"]["ipNetworks"],
            json!(["10.10.0.9/32", "fd00::9/128"])
        );
    }

    #[test]
    fn pods_off_the_network_are_absent_and_bad_ones_stay_pods() {
        assert_eq!(convert(Conversion::Pod, &pod_json(&[])), Stored::Absent);
        let mut host = pod_json(&["10.0.0.1"]);
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(convert(Conversion::Pod, &host), Stored::Absent);
        let mut done = pod_json(&["10.10.0.5"]);
        done["status"]["phase"] = json!("Succeeded");
        assert_eq!(convert(Conversion::Pod, &done), Stored::Absent);

        let Stored::Document(bad) = convert(Conversion::Pod, &pod_json(&["10.10.0.300"])) else {
            panic!("absent")
        };
        assert_eq!(bad["kind"], "Pod");
        assert!(bad["metadata"].get("managedFields").is_none());
        let e = policy_core::convert::convert_document_all(&bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("status.podIPs[0].ip"), "{e}");
    }

    #[test]
    fn calico_crds_become_v3_and_default_tier_names_lose_their_prefix() {
        let crd = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "default.deny", "resourceVersion": "3",
                         "annotations": {LAST_APPLIED: "{}"}},
            "spec": {"selector": "all()"}});
        let Stored::Document(d) = convert(Conversion::Calico, &crd) else {
            panic!()
        };
        assert_eq!(
            d,
            json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "deny"}, "spec": {"selector": "all()"}})
        );
        let tiered = json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "security.block", "namespace": "a"},
            "spec": {"tier": "security", "selector": "all()"}});
        let Stored::Document(d) = convert(Conversion::Calico, &tiered) else {
            panic!()
        };
        assert_eq!(d["metadata"]["name"], "security.block");
    }

    #[test]
    fn a_node_carries_calicos_annotations_into_its_spec() {
        let node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"zone": "z1"}, "annotations": {
                "projectcalico.org/IPv4Address": "192.0.2.10/24",
                "projectcalico.org/IPv4VXLANTunnelAddr": "10.10.0.1",
                "projectcalico.org/VXLANTunnelMACAddr": "66:00:00:00:00:01"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                     {"type": "Hostname", "address": "node-a"}]}});
        let Stored::Document(d) = convert(Conversion::Node, &node) else {
            panic!()
        };
        assert_eq!(d["apiVersion"], "projectcalico.org/v3");
        assert_eq!(
            d["metadata"],
            json!({"name": "node-a", "labels": {"zone": "z1"}})
        );
        assert_eq!(d["spec"]["bgp"]["ipv4Address"], "192.0.2.10/24");
        assert_eq!(d["spec"]["ipv4VXLANTunnelAddr"], "10.10.0.1");
        assert_eq!(
            d["spec"]["addresses"],
            json!([{"address": "192.0.2.10", "type": "InternalIP"}])
        );
        assert!(d["spec"].get("taints").is_none());
    }

    #[test]
    fn a_node_keeps_what_says_it_is_going() {
        let taint = json!({"key": "ToBeDeletedByClusterAutoscaler", "value": "1733529600", "effect": "NoSchedule"});
        let node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "deletionTimestamp": "2026-12-07T00:00:00Z"},
            "spec": {"taints": [taint]}});
        let Stored::Document(d) = convert(Conversion::Node, &node) else {
            panic!()
        };
        assert_eq!(d["metadata"]["deletionTimestamp"], "2026-12-07T00:00:00Z");
        assert_eq!(d["spec"]["taints"], json!([taint]));
    }
}
