//! Calico's WorkloadEndpoint (what its CNI plugin records for a pod's
//! interface) into the model: the same endpoint a Pod would give, plus the
//! node and the host-side interface an agent attaches to.

use super::*;
use crate::api::WorkloadEndpointSpec;

/// Labels Calico adds to a WorkloadEndpoint's own; the cluster adds them
/// again from the namespace, orchestrator and service account.
const CALICO_SET: [&str; 3] = [LABEL_NAMESPACE, LABEL_ORCHESTRATOR, LABEL_SERVICE_ACCOUNT];

pub(super) fn workload_endpoint(
    obj: &CalicoObject<WorkloadEndpointSpec>,
) -> Result<Endpoint, Errors> {
    let spec = &obj.spec;
    let wep_name = object_name(&obj.metadata, NameRule::Subdomain)?;
    let namespace = namespace_of(&obj.metadata)?;
    let mut labels = labels_of(&obj.metadata, "metadata.labels")?;
    labels.retain(|k, _| !CALICO_SET.contains(&k.as_str()));
    let mut errors = Errors::new();
    // Policies name pods: a Kubernetes endpoint is keyed by its pod.
    let name = match (
        spec.orchestrator.as_str(),
        spec.pod.as_str(),
        spec.workload.as_str(),
    ) {
        ("k8s", "", _) => {
            errors.push(Error::invalid(
                "spec.pod",
                "a k8s WorkloadEndpoint names its pod",
            ));
            String::new()
        }
        ("k8s", pod, _) => pod.to_string(),
        (_, "", "") => wep_name,
        (_, "", workload) => workload.to_string(),
        (_, pod, _) => pod.to_string(),
    };
    if spec.node.is_empty() {
        errors.push(Error::invalid(
            "spec.node",
            "the node the endpoint is on is required",
        ));
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for (i, n) in spec.ip_networks.iter().enumerate() {
        let f = format!("spec.ipNetworks[{i}]");
        match parse_cidr_or_ip(n) {
            Ok(net) if net.prefix_len() == net.max_prefix_len() => {
                if !ips.contains(&net.addr()) {
                    ips.push(net.addr());
                }
            }
            Ok(_) => errors.push(Error::invalid(
                f,
                format!("{n:?} is not a single address (/32 or /128): a workload's addresses are its own"),
            )),
            Err(m) => errors.push(Error::invalid(f, m)),
        }
    }
    if !spec.ip_nats.is_empty() {
        errors.push(
            Error::new(ErrorKind::Unsupported("ipNATs (floating IPs)".into())).at("spec.ipNATs"),
        );
    }
    if !spec.allow_spoofed_source_prefixes.is_empty() {
        errors.push(
            Error::new(ErrorKind::Unsupported(
                "allowSpoofedSourcePrefixes (the datapath drops sources not the endpoint's own)"
                    .into(),
            ))
            .at("spec.allowSpoofedSourcePrefixes"),
        );
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        let protocol = match &p.protocol {
            None => Ok(Protocol::TCP),
            Some(NumOrString::Str(s)) => Protocol::parse(s),
            Some(NumOrString::Num(n)) => Protocol::parse(&n.to_string()),
        };
        let protocol = match protocol {
            Ok(proto) if proto.has_ports() => proto,
            Ok(proto) => {
                errors.push(Error::invalid(
                    format!("{f}.protocol"),
                    format!("{proto} has no ports"),
                ));
                continue;
            }
            Err(m) => {
                errors.push(Error::invalid(format!("{f}.protocol"), m));
                continue;
            }
        };
        if p.port == 0 {
            errors.push(Error::invalid(
                format!("{f}.port"),
                "a port number from 1 to 65535 is required",
            ));
            continue;
        }
        if let Err(m) = crate::net::validate_port_name(&p.name) {
            errors.push(Error::invalid(format!("{f}.name"), m));
            continue;
        }
        ports.push(DeclaredPort {
            name: p.name.clone(),
            port: p.port,
            protocol,
        });
    }
    let service_account = if spec.service_account_name.is_empty() {
        None
    } else {
        Some(spec.service_account_name.clone())
    };
    errors.or_ok(Endpoint {
        key: EndpointKey::new(namespace, name),
        labels,
        ips,
        ports,
        service_account,
        node: Some(spec.node.clone()),
        profiles: Some(spec.profiles.clone()),
        orchestrator: if spec.orchestrator.is_empty() {
            "k8s".into()
        } else {
            spec.orchestrator.clone()
        },
        interface: (!spec.interface_name.is_empty()).then(|| spec.interface_name.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// As Calico's CNI plugin writes one (Calico's WorkloadEndpoint
    /// reference example, with a hex container id).
    fn wep() -> serde_json::Value {
        json!({
            "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {
                "name": "node1-k8s-my--nginx--b1337a-eth0", "namespace": "default",
                "labels": {"app": "frontend", "projectcalico.org/namespace": "default",
                           "projectcalico.org/orchestrator": "k8s"}
            },
            "spec": {
                "node": "node1", "orchestrator": "k8s", "containerID": "6f1c2b0e9d4a",
                "pod": "my-nginx-b1337a", "endpoint": "eth0", "interfaceName": "cali0ef24ba",
                "mac": "ca:fe:1d:52:bb:e9", "ipNetworks": ["192.168.0.1/32", "fd00::1/128"],
                "profiles": ["kns.default", "ksa.default.default"],
                "ports": [
                    {"name": "some-port", "port": 1234, "protocol": "TCP"},
                    {"name": "another-port", "port": 5432, "protocol": "UDP"}
                ]
            }
        })
    }

    #[test]
    fn a_cni_written_endpoint_is_its_pod_with_node_and_interface() {
        let Object::Endpoint(ep) = convert_document_all(&wep()).unwrap() else {
            panic!("not an endpoint");
        };
        assert_eq!(ep.key, EndpointKey::new("default", "my-nginx-b1337a"));
        assert_eq!(
            ep.labels.len(),
            1,
            "Calico's own labels are added back by the cluster"
        );
        assert_eq!(ep.ips.len(), 2);
        assert_eq!(ep.node.as_deref(), Some("node1"));
        assert_eq!(ep.interface.as_deref(), Some("cali0ef24ba"));
        assert_eq!(ep.profiles.as_ref().map(Vec::len), Some(2));
        assert_eq!(ep.ports.len(), 2);
        assert_eq!(ep.ports[1].protocol, Protocol::UDP);
    }

    #[test]
    fn bad_endpoints_name_every_field() {
        let mut doc = wep();
        doc["spec"]["ipNetworks"] = json!(["192.168.0.0/24"]);
        doc["spec"]["pod"] = json!("");
        doc["spec"]["ports"][0]["protocol"] = json!("ICMP");
        let errors = convert_document_all(&doc).unwrap_err().into_vec();
        let fields: Vec<&str> = errors.iter().filter_map(|e| e.field.as_deref()).collect();
        assert_eq!(
            fields,
            ["spec.pod", "spec.ipNetworks[0]", "spec.ports[0].protocol"]
        );
        let mut doc = wep();
        doc["spec"]["interfaceNmae"] = json!("cali0");
        let e = convert_document_all(&doc).unwrap_err().into_vec();
        assert!(
            e[0].to_string().contains("did you mean `interfaceName`?"),
            "{}",
            e[0]
        );
    }
}
