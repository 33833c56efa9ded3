//! Random Services and EndpointSlices for the service dataplane's tests.

use super::*;

/// Random Services and their EndpointSlices as Kubernetes documents, for
/// the service dataplane's tests: every Service type, both traffic
/// policies, source ranges, session affinity, ready/serving/terminating
/// endpoints on this node (`node-a`) and others, topology hints, named
/// ports, and addresses of both families. Deterministic in the generator.
pub fn service_documents(r: &mut Rng, services: usize) -> Vec<Value> {
    let mut docs = Vec::new();
    for i in 0..services {
        let v6 = r.chance(20);
        let ns = *r.pick(NAMESPACES);
        let name = format!("svc{i}");
        let kind = *r.pick(&["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"]);
        let cluster_ip = if v6 {
            format!("fd00:96::{:x}", i + 1)
        } else {
            format!("172.30.{}.{}", i / 250, i % 250 + 1)
        };
        let mut ports = Vec::new();
        let mut slice_ports = Vec::new();
        for p in 0..1 + r.below(2) {
            let proto = *r.pick(&["TCP", "TCP", "UDP", "SCTP"]);
            let mut port = json!({"name": format!("p{p}"), "port": 80 + p, "protocol": proto});
            if kind != "ClusterIP" {
                port["nodePort"] = json!(30000 + i * 2 + p);
            }
            ports.push(port);
            slice_ports.push(json!({"name": format!("p{p}"), "port": 8080 + p, "protocol": proto}));
        }
        let mut spec = json!({"type": kind, "clusterIP": cluster_ip, "ports": ports});
        if r.chance(25) {
            spec["externalIPs"] = json!([if v6 { "2001:db8::99" } else { "192.168.99.11" }]);
        }
        if kind != "ClusterIP" && r.chance(40) {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        if r.chance(25) {
            spec["internalTrafficPolicy"] = json!("Local");
        }
        if r.chance(20) {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        let mut status = json!({});
        if kind == "LoadBalancer" {
            let lb = if v6 {
                "2001:db8:5::1".to_string()
            } else {
                format!("5.6.{}.{}", i / 250, i % 250 + 1)
            };
            status = json!({"loadBalancer": {"ingress": [{"ip": lb}]}});
            if r.chance(50) {
                spec["loadBalancerSourceRanges"] = json!(if v6 {
                    vec!["2600::/16"]
                } else {
                    vec!["203.0.113.0/25", "192.168.0.0/24"]
                });
            }
        }
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": name, "namespace": ns}, "spec": spec, "status": status}));
        if r.chance(10) {
            continue; // no slice at all
        }
        let mut endpoints = Vec::new();
        for e in 0..r.below(5) {
            let addr = if v6 {
                format!("fd00:10::{:x}:{:x}", i + 1, e + 1)
            } else {
                format!("10.{}.{}.{}", i / 250, i % 250, e + 1)
            };
            let (ready, serving, terminating) = *r.pick(&[
                (true, true, false),
                (true, true, false),
                (false, true, true),
                (false, false, true),
                (false, false, false),
            ]);
            let mut ep = json!({"addresses": [addr],
                                "conditions": {"ready": ready, "serving": serving, "terminating": terminating}});
            if r.chance(50) {
                ep["nodeName"] = json!(*r.pick(&["node-a", "node-b"]));
            }
            if r.chance(20) {
                ep["hints"] = json!({"forZones": [{"name": r.pick(&["zone-a", "zone-b"])}]});
            }
            endpoints.push(ep);
        }
        docs.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                         "metadata": {"name": format!("{name}-1"), "namespace": ns,
                                      "labels": {"kubernetes.io/service-name": name}},
                         "addressType": if v6 { "IPv6" } else { "IPv4" },
                         "endpoints": endpoints, "ports": slice_ports}),
        );
    }
    docs
}
