//! Pods the embedded and etcd stores hold, and the CNI plugin's endpoint
//! for them: one object, as in Calico's Kubernetes datastore. Pure.
//!
//! | write | stored as |
//! |---|---|
//! | a `k8s` WorkloadEndpoint whose Pod is stored (and that is not stored itself) | that Pod with the CNI plugin's annotations (`cni.projectcalico.org/podIP`, `podIPs`, `containerID`, and the endpoint's [`NETWORK_ANNOTATION`]) and `spec.nodeName` set to the endpoint's node when it had none |
//! | deleting that endpoint | the Pod without those annotations |
//!
//! The node's view reads an annotated Pod as the endpoint on the CNI
//! plugin's interface ([`endpoint_of_annotated_pod`]): the Pod's labels,
//! service account and named ports, the CNI plugin's addresses. Without
//! this, a Pod applied for its labels and the CNI plugin's endpoint for it
//! would be two objects for one pod, and the store refuses the second.

use policy_core::manifest::Loaded;
use policy_core::{Error, Errors, ObjectRef};
use serde_json::{Value, json};

use crate::kinds::{document_ref, kind_of_ref};
use crate::kubernetes::convert::{Conversion, Stored, convert};
use crate::kubernetes::write::{
    CONTAINER_ID, POD_IP, POD_IPS, cni_annotations, workload_endpoint_parts,
};
use crate::{Snapshot, StoredObject};

/// The network (conflist `name`) a workload endpoint was made for, on
/// the endpoint, or on the stored Pod that holds it: CNI GC removes the
/// attachments of its own network only.
pub const NETWORK_ANNOTATION: &str = "palisade.dev/network";

/// The CNI plugin's annotations on a Pod it put on the network.
const CNI_ANNOTATIONS: [&str; 4] = [POD_IP, POD_IPS, CONTAINER_ID, NETWORK_ANNOTATION];

fn stored_pod<'a>(state: &'a Snapshot, namespace: &str, name: &str) -> Option<&'a StoredObject> {
    let key = kind_of_ref("Pod")?.key(Some(namespace), name);
    state.objects.iter().find(|o| o.key == key)
}

/// `batch` with each `k8s` WorkloadEndpoint for a stored Pod turned into
/// that Pod, annotated. An endpoint for a Pod scheduled to another node is
/// an error naming the endpoint's `spec.node`.
pub(crate) fn endpoints_onto_pods(
    state: &Snapshot,
    batch: Vec<Loaded>,
) -> Result<Vec<Loaded>, Errors> {
    let mut errors = Errors::new();
    let mut out = Vec::with_capacity(batch.len());
    for loaded in batch {
        match pod_for_endpoint(state, &loaded) {
            None => out.push(loaded),
            Some(Ok(pod)) => out.push(pod),
            Some(Err(es)) => es.into_iter().for_each(|e| errors.push(e)),
        }
    }
    errors.or_ok(out)
}

fn pod_for_endpoint(state: &Snapshot, loaded: &Loaded) -> Option<Result<Loaded, Errors>> {
    let document = loaded.document.as_ref()?;
    if document["kind"] != "WorkloadEndpoint" || document["spec"]["orchestrator"] != "k8s" {
        return None;
    }
    let (info, object) = document_ref(document)?;
    // An endpoint already stored as itself stays so.
    let own_key = info.key(object.namespace.as_deref(), &object.name);
    if state.objects.iter().any(|o| o.key == own_key) {
        return None;
    }
    let spec = &document["spec"];
    let namespace = object.namespace.as_deref().unwrap_or("default");
    let pod_name = spec["pod"].as_str()?;
    let stored = stored_pod(state, namespace, pod_name)?;
    let fail = |field: &str, message: String| {
        Some(Err(Errors::from(
            Error::invalid(field, message)
                .on(loaded.object.object_ref())
                .from_origin(loaded.origin.clone()),
        )))
    };
    let mut pod = stored.document.clone();
    let node = spec["node"].as_str().unwrap_or_default();
    match pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        Some(scheduled) if scheduled != node => {
            return fail(
                "spec.node",
                format!(
                    "{node:?}, but Pod {namespace}/{pod_name} is scheduled to node {scheduled:?}"
                ),
            );
        }
        Some(_) => {}
        None => pod["spec"]["nodeName"] = json!(node),
    }
    if !pod["metadata"]["annotations"].is_object() {
        pod["metadata"]["annotations"] = json!({});
    }
    if let (Some(annotations), Value::Object(cni)) = (
        pod["metadata"]["annotations"].as_object_mut(),
        cni_annotations(spec),
    ) {
        annotations.extend(cni);
        if let Some(network) = document["metadata"]["annotations"].get(NETWORK_ANNOTATION) {
            annotations.insert(NETWORK_ANNOTATION.into(), network.clone());
        }
    }
    let object = match policy_core::convert::convert_document_all(&pod) {
        Ok(o) => o,
        Err(es) => return Some(Err(es)),
    };
    Some(Ok(Loaded {
        origin: loaded.origin.clone(),
        object,
        document: Some(pod),
    }))
}

/// Deleting `object`, a `k8s` WorkloadEndpoint that is not stored: the
/// stored Pod it lives on, without the CNI plugin's annotations (none if
/// no stored Pod carries them).
pub(crate) fn pod_releasing_endpoint(state: &Snapshot, object: &ObjectRef) -> Option<StoredObject> {
    if object.kind != "WorkloadEndpoint" {
        return None;
    }
    let [_, orchestrator, pod, _] = workload_endpoint_parts(&object.name)?;
    if orchestrator != "k8s" {
        return None;
    }
    let namespace = object.namespace.as_deref().unwrap_or("default");
    let stored = stored_pod(state, namespace, &pod)?;
    let annotations = stored.document["metadata"]["annotations"].as_object()?;
    if !CNI_ANNOTATIONS.iter().any(|k| annotations.contains_key(*k)) {
        return None;
    }
    let mut document = stored.document.clone();
    let annotations = document["metadata"]["annotations"].as_object_mut()?;
    for k in CNI_ANNOTATIONS {
        annotations.remove(k);
    }
    Some(StoredObject {
        document,
        ..stored.clone()
    })
}

/// A stored Pod the CNI plugin annotated, as the workload endpoint on its
/// interface (as the Kubernetes datastore reads such a Pod); `None` for any
/// other document, and for a Pod not on the network (finished, host
/// networked, no node), which stays a plain Pod.
pub fn endpoint_of_annotated_pod(document: &Value) -> Option<Value> {
    if document["kind"] != "Pod" || document["metadata"]["annotations"][POD_IPS].is_null() {
        return None;
    }
    match convert(Conversion::Pod, document) {
        Stored::Document(d) => Some(d),
        Stored::Absent => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredObject;
    use policy_core::manifest::parse_source_keeping_documents;

    fn pod(node: Option<&str>) -> Value {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db", "namespace": "shop", "labels": {"app": "db"}},
            "spec": {"serviceAccountName": "store",
                     "containers": [{"name": "c", "image": "x",
                                     "ports": [{"name": "sql", "containerPort": 5432}]}]}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        p
    }

    fn state(documents: &[Value]) -> Snapshot {
        Snapshot {
            revision: 7,
            objects: documents
                .iter()
                .map(|d| {
                    let (info, object) = document_ref(d).unwrap();
                    StoredObject {
                        key: info.key(object.namespace.as_deref(), &object.name),
                        object,
                        revision: 7,
                        document: d.clone(),
                    }
                })
                .collect(),
        }
    }

    /// The CNI plugin's endpoint for shop/db on node-a.
    fn endpoint() -> Vec<Loaded> {
        let wep = json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": "node--a-k8s-db-eth0", "namespace": "shop",
                         "labels": {"from": "conflist"},
                         "annotations": {"palisade.dev/network": "frontend"}},
            "spec": {"orchestrator": "k8s", "node": "node-a", "pod": "db", "endpoint": "eth0",
                     "containerID": "c0ffee", "interfaceName": "cali123",
                     "ipNetworks": ["10.10.0.5/32"], "profiles": ["kns.shop"]}});
        parse_source_keeping_documents("cni", &wep.to_string())
            .unwrap()
            .objects
    }

    #[test]
    fn an_endpoint_for_a_stored_pod_annotates_the_pod() {
        let out = endpoints_onto_pods(&state(&[pod(None)]), endpoint()).unwrap();
        let doc = out[0].document.as_ref().unwrap();
        assert_eq!(doc["kind"], "Pod");
        assert_eq!(doc["spec"]["nodeName"], "node-a");
        assert_eq!(doc["metadata"]["annotations"][POD_IPS], "10.10.0.5/32");
        assert_eq!(doc["metadata"]["annotations"][CONTAINER_ID], "c0ffee");
        assert_eq!(
            doc["metadata"]["annotations"][NETWORK_ANNOTATION],
            "frontend"
        );
        assert_eq!(out[0].object.object_ref().to_string(), "Pod shop/db");
        // Read back: the endpoint on the CNI plugin's interface, with the
        // Pod's labels (not the conflist's) and its named port.
        let wep = endpoint_of_annotated_pod(doc).unwrap();
        assert_eq!(wep["spec"]["node"], "node-a");
        assert_eq!(
            wep["spec"]["interfaceName"],
            crate::kubernetes::convert::pod_interface("shop", "db")
        );
        assert_eq!(wep["spec"]["ipNetworks"], json!(["10.10.0.5/32"]));
        assert_eq!(wep["metadata"]["labels"]["app"], "db");
        assert!(wep["metadata"]["labels"]["from"].is_null());
        assert_eq!(wep["spec"]["ports"][0]["name"], "sql");
    }

    #[test]
    fn without_a_stored_pod_or_with_the_endpoint_stored_nothing_changes() {
        let out = endpoints_onto_pods(&state(&[]), endpoint()).unwrap();
        assert_eq!(
            out[0].document.as_ref().unwrap()["kind"],
            "WorkloadEndpoint"
        );
        let stored_wep = endpoint()[0].document.clone().unwrap();
        let out = endpoints_onto_pods(&state(&[pod(None), stored_wep]), endpoint()).unwrap();
        assert_eq!(
            out[0].document.as_ref().unwrap()["kind"],
            "WorkloadEndpoint"
        );
    }

    #[test]
    fn a_pod_scheduled_elsewhere_refuses_the_endpoint_naming_the_node() {
        let e = endpoints_onto_pods(&state(&[pod(Some("node-b"))]), endpoint()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("spec.node"), "{text}");
        assert!(text.contains("node-b"), "{text}");
    }

    #[test]
    fn deleting_the_endpoint_takes_the_annotations_off() {
        let annotated = endpoints_onto_pods(&state(&[pod(None)]), endpoint()).unwrap()[0]
            .document
            .clone()
            .unwrap();
        let s = state(&[annotated]);
        let wep = ObjectRef::new("WorkloadEndpoint", Some("shop"), "node--a-k8s-db-eth0");
        let released = pod_releasing_endpoint(&s, &wep).unwrap();
        assert_eq!(released.key, s.objects[0].key);
        let annotations = &released.document["metadata"]["annotations"];
        assert!(CNI_ANNOTATIONS.iter().all(|k| annotations[*k].is_null()));
        assert_eq!(endpoint_of_annotated_pod(&released.document), None);
        // A Pod without them: nothing to release.
        assert!(pod_releasing_endpoint(&state(&[pod(None)]), &wep).is_none());
    }
}
