//! Service health checks, kube-proxy's service health server: a
//! LoadBalancer Service with `externalTrafficPolicy: Local` has a
//! `healthCheckNodePort`, where every node answers HTTP with how many of
//! the Service's endpoints it runs. Cloud load balancers probe it and send
//! traffic only to nodes answering 200, since such a Service's traffic
//! goes only to local endpoints. What each node serves is decided here;
//! the agent listens.
//!
//! ```
//! use palisade_services::health::{HealthCheck, answer, health_checks};
//! use palisade_services::{Family, Objects};
//! use serde_json::json;
//!
//! let docs = [
//!     json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
//!            "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.10",
//!                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
//!                     "ports": [{"port": 80, "nodePort": 30080}]}}),
//!     json!({"kind": "EndpointSlice", "metadata": {"name": "web-1", "namespace": "shop",
//!            "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
//!            "endpoints": [{"addresses": ["10.10.0.5"], "nodeName": "node-a"}],
//!            "ports": [{"port": 8080}]}),
//! ];
//! let ports = Objects::from_documents(&docs).unwrap().service_ports(Family::V4).unwrap();
//! let checks = health_checks(&ports, "node-a");
//! assert_eq!(checks[0].port, 32000);
//! assert_eq!(checks[0].local_endpoints, 1);
//! let (status, body) = answer(&checks[0].namespace, &checks[0].name, 1, true);
//! assert_eq!(status, 200);
//! assert!(body.contains("\"localEndpoints\": 1"));
//! // Another node runs none of them: the load balancer should skip it.
//! assert_eq!(health_checks(&ports, "node-b")[0].local_endpoints, 0);
//! assert_eq!(answer("shop", "web", 0, true).0, 503);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::ServicePort;

/// One Service's health check on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// The Service's `healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints on this node, each address once across the
    /// Service's ports and families (kube-proxy counts addresses: an
    /// endpoint serving 80 and 443 is one).
    pub local_endpoints: usize,
}

/// The health checks this node serves: one per Service with a
/// `healthCheckNodePort` (a LoadBalancer with `externalTrafficPolicy:
/// Local`; [`crate::Objects`] keeps it for no other), from the ports of
/// every family. A terminating endpoint is not counted, even while it
/// still serves: the check fails on a node left with only those, so load
/// balancers drain it.
pub fn health_checks(ports: &[ServicePort], node: &str) -> Vec<HealthCheck> {
    let mut by_service: BTreeMap<(&str, &str), (u16, BTreeSet<IpAddr>)> = BTreeMap::new();
    for p in ports {
        let Some(port) = p.health_check_node_port else {
            continue;
        };
        let (_, local) = by_service
            .entry((p.name.namespace.as_str(), p.name.service.as_str()))
            .or_insert((port, BTreeSet::new()));
        local.extend(
            p.endpoints
                .iter()
                .filter(|e| e.ready && e.is_on(node))
                .map(|e| e.addr.ip()),
        );
    }
    by_service
        .into_iter()
        .map(|((namespace, name), (port, local))| HealthCheck {
            namespace: namespace.to_string(),
            name: name.to_string(),
            port,
            local_endpoints: local.len(),
        })
        .collect()
}

/// The HTTP status and JSON body a probe of a Service's health check gets,
/// as kube-proxy writes them: 200 while the node runs one of its endpoints
/// and its proxy is healthy, else 503.
pub fn answer(
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> (u16, String) {
    let status = if local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(namespace),
        quote(name)
    );
    (status, body)
}

/// What kube-proxy's own health server (`--healthz-bind-address`, port
/// 10256) answers on `path` at `now` (seconds and nanoseconds since the
/// epoch): `/healthz` (cloud load balancers probe it for Services with
/// `externalTrafficPolicy: Cluster`) is 200 while the proxy is healthy and
/// the node eligible, `/livez` while the proxy is healthy; anything else
/// is Go's 404. `last_updated` is when the proxy last wrote its rules; a
/// healthy answer reports `now` for it, as kube-proxy does.
pub fn proxy_health_answer(
    path: &str,
    healthy: bool,
    node_eligible: bool,
    last_updated: (u64, u32),
    now: (u64, u32),
) -> (u16, String) {
    let current = go_time(now);
    let updated = go_time(last_updated);
    match path {
        "/healthz" => {
            let ok = healthy && node_eligible;
            let updated = if ok { current.clone() } else { updated };
            (
                if ok { 200 } else { 503 },
                format!(
                    "{{\"lastUpdated\": \"{updated}\",\"currentTime\": \"{current}\", \"nodeEligible\": {node_eligible}}}"
                ),
            )
        }
        "/livez" => {
            let updated = if healthy { current.clone() } else { updated };
            (
                if healthy { 200 } else { 503 },
                format!("{{\"lastUpdated\": \"{updated}\",\"currentTime\": \"{current}\"}}"),
            )
        }
        _ => (404, "404 page not found\n".to_string()),
    }
}

/// Whether a Node (its stored document) should still get load balancers'
/// traffic, as kube-proxy's `/healthz` judges it: not when it is being
/// deleted, nor when the cluster autoscaler tainted it for deletion.
pub fn node_eligible(node: &serde_json::Value) -> bool {
    let deleting = !node["metadata"]["deletionTimestamp"].is_null();
    let to_be_deleted = node["spec"]["taints"].as_array().is_some_and(|t| {
        t.iter()
            .any(|t| t["key"] == "ToBeDeletedByClusterAutoscaler")
    });
    !deleting && !to_be_deleted
}

/// A UTC time as Go prints a `time.Time` (`2006-01-02 15:04:05.999999999
/// +0000 UTC`, trailing zeros of the fraction dropped).
fn go_time((secs, nanos): (u64, u32)) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut fraction = String::new();
    if nanos > 0 {
        fraction = format!(".{nanos:09}");
        while fraction.ends_with('0') {
            fraction.pop();
        }
    }
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{fraction} +0000 UTC",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Family, Objects};
    use serde_json::json;

    fn ports(endpoints: serde_json::Value, etp: &str, kind: &str) -> Vec<ServicePort> {
        let docs = [
            json!({"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
                   "spec": {"type": kind, "clusterIP": "172.30.0.10", "clusterIPs": ["172.30.0.10", "fd00:30::10"],
                            "ipFamilies": ["IPv4", "IPv6"],
                            "externalTrafficPolicy": etp, "healthCheckNodePort": 32000,
                            "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                                      {"name": "https", "port": 443, "nodePort": 30443}]}}),
            json!({"kind": "EndpointSlice", "metadata": {"name": "web-4", "namespace": "shop",
                   "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
                   "endpoints": endpoints,
                   "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]}),
            json!({"kind": "EndpointSlice", "metadata": {"name": "web-6", "namespace": "shop",
                   "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv6",
                   "endpoints": [{"addresses": ["fd00:10::5"], "nodeName": "node-a"}],
                   "ports": [{"name": "http", "port": 8080}]}),
        ];
        let objects = Objects::from_documents(&docs).unwrap();
        let mut all = objects.service_ports(Family::V4).unwrap();
        all.extend(objects.service_ports(Family::V6).unwrap());
        all
    }

    #[test]
    fn local_ready_addresses_are_counted_once_across_ports_and_families() {
        let p = ports(
            json!([
                {"addresses": ["10.10.0.5"], "nodeName": "node-a"},
                {"addresses": ["10.10.0.6"], "nodeName": "node-a", "conditions": {"ready": false}},
                {"addresses": ["10.10.0.7"], "nodeName": "node-a",
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.10.0.8"], "nodeName": "node-b"},
            ]),
            "Local",
            "LoadBalancer",
        );
        let checks = health_checks(&p, "node-a");
        assert_eq!(
            checks,
            vec![HealthCheck {
                namespace: "shop".into(),
                name: "web".into(),
                port: 32000,
                // 10.10.0.5 (two ports) and fd00:10::5; not the unready
                // one, nor the terminating one that still serves.
                local_endpoints: 2,
            }]
        );
        assert_eq!(health_checks(&p, "node-b")[0].local_endpoints, 1);
        assert_eq!(health_checks(&p, "node-c")[0].local_endpoints, 0);
    }

    #[test]
    fn only_local_load_balancers_have_one() {
        let endpoints = json!([{"addresses": ["10.10.0.5"], "nodeName": "node-a"}]);
        assert!(
            health_checks(
                &ports(endpoints.clone(), "Cluster", "LoadBalancer"),
                "node-a"
            )
            .is_empty()
        );
        assert!(health_checks(&ports(endpoints, "Local", "NodePort"), "node-a").is_empty());
    }

    #[test]
    fn the_answer_is_kube_proxys() {
        let (status, body) = answer("shop", "web", 2, true);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["localEndpoints"], 2);
        // No endpoint here, or a proxy that is not keeping up: 503.
        assert_eq!(answer("shop", "web", 0, true).0, 503);
        let (status, body) = answer("shop", "web", 2, false);
        assert_eq!(status, 503);
        assert!(body.contains("\"serviceProxyHealthy\": false"));
    }

    #[test]
    fn the_proxy_health_server_answers_as_kube_proxys() {
        let now = (1_796_601_600, 250_000_000); // 2026-12-07 00:00:00.25 UTC
        let before = (1_796_601_500, 0);
        let (status, body) = proxy_health_answer("/healthz", true, true, before, now);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2026-12-07 00:00:00.25 +0000 UTC\",\"currentTime\": \"2026-12-07 00:00:00.25 +0000 UTC\", \"nodeEligible\": true}"
        );
        // Unhealthy: the last write's time, 503 on both.
        let (status, body) = proxy_health_answer("/healthz", false, true, before, now);
        assert_eq!(status, 503);
        assert!(
            body.contains("\"lastUpdated\": \"2026-12-06 23:58:20 +0000 UTC\""),
            "{body}"
        );
        assert_eq!(
            proxy_health_answer("/livez", false, true, before, now).0,
            503
        );
        // A node being drained: /healthz fails (with the last write's
        // time), /livez does not.
        let (status, body) = proxy_health_answer("/healthz", true, false, before, now);
        assert_eq!(status, 503);
        assert!(
            body.contains("\"lastUpdated\": \"2026-12-06 23:58:20 +0000 UTC\""),
            "{body}"
        );
        let (status, body) = proxy_health_answer("/livez", true, false, before, now);
        assert_eq!(status, 200);
        assert!(!body.contains("nodeEligible"));
        assert_eq!(
            proxy_health_answer("/metrics", true, true, before, now).0,
            404
        );
        // Leap day and the epoch.
        assert_eq!(go_time((951_782_400, 0)), "2000-02-29 00:00:00 +0000 UTC");
        assert_eq!(go_time((0, 1)), "1970-01-01 00:00:00.000000001 +0000 UTC");
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_it_is_not_eligible() {
        assert!(node_eligible(
            &json!({"kind": "Node", "metadata": {"name": "n1"}})
        ));
        assert!(!node_eligible(&json!({"metadata": {"name": "n1",
            "deletionTimestamp": "2026-12-07T00:00:00Z"}})));
        assert!(!node_eligible(
            &json!({"metadata": {"name": "n1"}, "spec": {"taints": [
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733529600", "effect": "NoSchedule"}]}})
        ));
        // Unschedulable alone (cordoned) stays eligible, as in kube-proxy.
        assert!(node_eligible(
            &json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true,
            "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}})
        ));
    }
}
