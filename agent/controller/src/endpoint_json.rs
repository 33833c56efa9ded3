//! Endpoints as JSON: the format in which an embedder (a CNI plugin, the
//! C ABI) describes a pod, parsed strictly and validated like a manifest's
//! Pod, with errors naming the field.
//!
//! ```
//! let ep = palisade_controller::parse_endpoint(
//!     r#"{"namespace":"shop","name":"web","labels":{"app":"web"},"ips":["10.0.0.1"]}"#,
//! ).unwrap();
//! assert_eq!(ep.key.to_string(), "shop/web");
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_core::model::{DeclaredPort, Endpoint};
use policy_core::net::{PortMatch, Protocol};
use policy_core::{EndpointKey, Error, ErrorKind, ObjectRef};
use serde::Deserialize;

/// The endpoint JSON (the C ABI's `palisade_upsert_endpoint`, and the
/// CNI plugin's view of a pod).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointSpec {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    profiles: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    #[serde(default)]
    name: String,
    port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

/// Parses and validates the endpoint JSON.
pub fn parse_endpoint(json: &str) -> Result<Endpoint, Error> {
    let spec: EndpointSpec = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_str(json),
    )
    .map_err(|e| {
        let path = e.path().to_string();
        let err = Error::new(ErrorKind::Syntax {
            format: "JSON",
            message: e.into_inner().to_string(),
        });
        if path == "." { err } else { err.at(path) }
    })?;
    let object = ObjectRef::new("Pod", Some(&spec.namespace), spec.name.clone());
    let on = |e: Error| e.on(object.clone());
    for (field, v) in [("namespace", &spec.namespace), ("name", &spec.name)] {
        if v.is_empty() || v.len() > 253 || v.contains('/') || v.chars().any(char::is_whitespace) {
            return Err(on(Error::invalid(
                field,
                format!("{v:?} is not a valid {field}: 1-253 characters without '/' or spaces"),
            )));
        }
    }
    let labels = policy_core::convert::check_labels(&spec.labels, "labels").map_err(on)?;
    let mut ips = Vec::new();
    for (i, ip) in spec.ips.iter().enumerate() {
        let ip: IpAddr = ip.parse().map_err(|_| {
            on(Error::invalid(
                format!("ips[{i}]"),
                format!("{ip:?} is not an IP address"),
            ))
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = format!("ports[{i}]");
        let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))
            .map_err(|m| on(Error::invalid(format!("{f}.protocol"), m)))?;
        if !protocol.has_ports() {
            return Err(on(Error::invalid(
                format!("{f}.protocol"),
                format!("{protocol} has no ports"),
            )));
        }
        let port = match PortMatch::number(p.port) {
            Ok(PortMatch::Range { first, .. }) => first,
            Ok(_) => {
                return Err(on(Error::invalid(format!("{f}.port"), "not a port number")));
            }
            Err(m) => return Err(on(Error::invalid(format!("{f}.port"), m))),
        };
        if !p.name.is_empty() {
            policy_core::net::validate_port_name(&p.name)
                .map_err(|m| on(Error::invalid(format!("{f}.name"), m)))?;
        }
        ports.push(DeclaredPort {
            name: p.name.clone(),
            port,
            protocol,
        });
    }
    Ok(Endpoint {
        key: EndpointKey::new(spec.namespace, spec.name),
        labels,
        ips,
        ports,
        service_account: Some(
            spec.service_account
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        ),
        node: spec.node.filter(|n| !n.is_empty()),
        profiles: spec.profiles,
        orchestrator: "k8s".into(),
        interface: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_errors_name_the_field() {
        let e = parse_endpoint(r#"{"namespace":"a","name":"b","ips":["10.0.0.1","nope"]}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ips[1]"), "{e}");
        assert_eq!(e.object.as_ref().unwrap().name, "b");
        let e = parse_endpoint(r#"{"namespace":"a","name":"b","colour":1}"#).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
        let e =
            parse_endpoint(r#"{"namespace":"a","name":"b","ports":[{"port":70000}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ports[0].port"), "{e}");
    }

    #[test]
    fn defaults_fill_in_what_kubernetes_would() {
        let ep = parse_endpoint(r#"{"namespace":"a","name":"b","ports":[{"port":80}]}"#).unwrap();
        assert_eq!(ep.service_account.as_deref(), Some("default"));
        assert_eq!(ep.ports[0].protocol, Protocol::TCP);
        assert_eq!(ep.node, None);
    }
}
