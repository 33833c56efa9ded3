//! The two writes an agent makes on the Kubernetes datastore, as Calico's
//! Kubernetes backend makes them: a workload endpoint the CNI plugin
//! records becomes annotations on its pod (the pod's addresses before the
//! kubelet reports them), and this node's Node object becomes annotations
//! on the Kubernetes Node (its addresses and VXLAN tunnel). Everything else
//! is written with kubectl.
//!
//! | document | request | annotations |
//! |---|---|---|
//! | WorkloadEndpoint (orchestrator `k8s`) | merge patch of `pods/<name>` | `cni.projectcalico.org/podIP`, `podIPs`, `containerID` |
//! | WorkloadEndpoint deleted | the same, set to null | (removed) |
//! | Node | merge patch of `nodes/<name>` | `projectcalico.org/IPv4Address`, `IPv4VXLANTunnelAddr`, `VXLANTunnelMACAddr` (null when absent) |

use kube::api::{Api, Patch, PatchParams};
use policy_core::ObjectRef;
use serde_json::{Value, json};

use crate::StoreError;

/// The pod annotation with the CNI plugin's addresses (CIDRs, comma-separated).
pub const POD_IPS: &str = "cni.projectcalico.org/podIPs";
/// The pod annotation with the first of them.
pub const POD_IP: &str = "cni.projectcalico.org/podIP";
/// The pod annotation with the container the addresses are for.
pub const CONTAINER_ID: &str = "cni.projectcalico.org/containerID";

/// A write the store knows how to make.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ApiWrite {
    /// Merge-patch a pod.
    Pod {
        namespace: String,
        name: String,
        patch: Value,
    },
    /// Merge-patch a node.
    Node { name: String, patch: Value },
}

fn refused(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "{what}: the Kubernetes datastore is written through the API server (kubectl apply); \
         Palisade writes only a pod's addresses and its own Node's annotations"
    ))
}

/// The annotations Calico's CNI plugin puts on a Pod for the workload
/// endpoint `spec` (a WorkloadEndpoint's): its addresses and container.
pub(crate) fn cni_annotations(spec: &Value) -> Value {
    let nets: Vec<&str> = spec["ipNetworks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    json!({
        POD_IP: nets.first(),
        POD_IPS: nets.join(","),
        CONTAINER_ID: spec["containerID"],
    })
}

/// The API write a stored document stands for.
pub(crate) fn write_for(document: &Value) -> Result<ApiWrite, StoreError> {
    let kind = document["kind"].as_str().unwrap_or_default();
    let name = document["metadata"]["name"].as_str().unwrap_or_default();
    let spec = &document["spec"];
    match kind {
        "WorkloadEndpoint" if spec["orchestrator"] == "k8s" => {
            let pod = spec["pod"].as_str().unwrap_or_default().to_string();
            let namespace = document["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            if pod.is_empty() {
                return Err(refused(&format!(
                    "WorkloadEndpoint {namespace}/{name} names no pod"
                )));
            }
            Ok(ApiWrite::Pod {
                namespace,
                name: pod,
                patch: json!({"metadata": {"annotations": cni_annotations(spec)}}),
            })
        }
        "Node" => {
            let note = |v: &Value| v.as_str().map(|s| json!(s)).unwrap_or(Value::Null);
            Ok(ApiWrite::Node {
                name: name.to_string(),
                patch: json!({"metadata": {"annotations": {
                    "projectcalico.org/IPv4Address": note(&spec["bgp"]["ipv4Address"]),
                    "projectcalico.org/IPv4VXLANTunnelAddr": note(&spec["ipv4VXLANTunnelAddr"]),
                    "projectcalico.org/VXLANTunnelMACAddr": note(&spec["vxlanTunnelMACAddr"]),
                }}}),
            })
        }
        _ => Err(refused(&format!("{kind} {name}"))),
    }
}

/// The parts of a Calico workload endpoint name (`node-k8s-pod-eth0`, each
/// part's `-` doubled): node, orchestrator, workload, interface.
pub fn workload_endpoint_parts(name: &str) -> Option<[String; 4]> {
    let mut parts = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' if chars.peek() == Some(&'-') => {
                chars.next();
                parts.last_mut()?.push('-');
            }
            '-' => parts.push(String::new()),
            c => parts.last_mut()?.push(c),
        }
    }
    parts.try_into().ok()
}

/// The API write that deletes `object`: a pod's workload endpoint (named as
/// Calico names it, or as its pod) loses the CNI plugin's annotations.
pub(crate) fn delete_for(object: &ObjectRef) -> Result<ApiWrite, StoreError> {
    let pod = match object.kind.as_str() {
        "Pod" => Some(object.name.clone()),
        "WorkloadEndpoint" => workload_endpoint_parts(&object.name)
            .filter(|[_, orchestrator, _, _]| orchestrator == "k8s")
            .map(|[_, _, pod, _]| pod),
        _ => None,
    };
    match pod {
        Some(name) => Ok(ApiWrite::Pod {
            namespace: object.namespace.clone().unwrap_or_else(|| "default".into()),
            name,
            patch: json!({"metadata": {"annotations": {POD_IP: null, POD_IPS: null, CONTAINER_ID: null}}}),
        }),
        None => Err(refused(&format!("deleting {object}"))),
    }
}

/// Makes one write.
pub(crate) async fn make(client: &kube::Client, write: &ApiWrite) -> Result<(), StoreError> {
    let params = PatchParams::default();
    let (what, result) = match write {
        ApiWrite::Pod {
            namespace,
            name,
            patch,
        } => {
            let api: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(client.clone(), namespace);
            (
                format!("pod {namespace}/{name}"),
                api.patch(name, &params, &Patch::Merge(patch))
                    .await
                    .map(|_| ()),
            )
        }
        ApiWrite::Node { name, patch } => {
            let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
            (
                format!("node {name}"),
                api.patch(name, &params, &Patch::Merge(patch))
                    .await
                    .map(|_| ()),
            )
        }
    };
    result.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 404 => StoreError::NotFound(match write {
            ApiWrite::Pod {
                namespace, name, ..
            } => ObjectRef::new("Pod", Some(namespace), name.as_str()),
            ApiWrite::Node { name, .. } => ObjectRef::new("Node", None, name.as_str()),
        }),
        _ => StoreError::Unavailable(format!("Kubernetes API: patching {what}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_endpoint_names_split_back_into_their_parts() {
        let name = crate::kubernetes::workload_endpoint_name("node-a", "k8s", "api-0", "eth0");
        assert_eq!(name, "node--a-k8s-api--0-eth0");
        assert_eq!(
            workload_endpoint_parts(&name).unwrap(),
            ["node-a", "k8s", "api-0", "eth0"].map(String::from)
        );
        assert_eq!(
            workload_endpoint_parts("a---k8s-b-eth0").unwrap(),
            ["a-", "k8s", "b", "eth0"].map(String::from)
        );
        assert!(workload_endpoint_parts("just-three-parts").is_none());
        let w = delete_for(&ObjectRef::new("WorkloadEndpoint", Some("shop"), name)).unwrap();
        assert!(matches!(w, ApiWrite::Pod { name, .. } if name == "api-0"));
    }
}
