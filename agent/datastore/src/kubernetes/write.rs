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
            let nets: Vec<&str> = spec["ipNetworks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            Ok(ApiWrite::Pod {
                namespace,
                name: pod,
                patch: json!({"metadata": {"annotations": {
                    POD_IP: nets.first(),
                    POD_IPS: nets.join(","),
                    CONTAINER_ID: spec["containerID"],
                }}}),
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

/// The API write that deletes `object`.
pub(crate) fn delete_for(object: &ObjectRef) -> Result<ApiWrite, StoreError> {
    // A WorkloadEndpoint of a pod is deleted as its pod (see NodeView).
    if matches!(object.kind.as_str(), "Pod" | "WorkloadEndpoint") {
        return Ok(ApiWrite::Pod {
            namespace: object.namespace.clone().unwrap_or_else(|| "default".into()),
            name: object.name.clone(),
            patch: json!({"metadata": {"annotations": {POD_IP: null, POD_IPS: null, CONTAINER_ID: null}}}),
        });
    }
    Err(refused(&format!("deleting {object}")))
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
