//! The agent serves a LoadBalancer Service's `healthCheckNodePort`
//! (`externalTrafficPolicy: Local`) as kube-proxy does: 200 while this
//! node runs a ready endpoint of it, 503 when it runs none, nothing once
//! the Service is gone; and kube-proxy's own `/healthz` and `/livez`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use palisade_testing::netns::Topology;
use policy_core::EndpointKey;

use super::agent::{Agent, http_get, store};
use super::{privileged, scratch};

/// A health check's answer: status, the endpoint-weight header, the body.
type Answer = (u16, Option<String>, String);

/// A GET of the health check in the node's namespace; None when nothing
/// answers.
fn probe(topo: &Topology, at: SocketAddr) -> Option<Answer> {
    topo.node()
        .run(|| -> Option<Answer> {
            let mut s = TcpStream::connect_timeout(&at, Duration::from_millis(500)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET /any/path HTTP/1.1\r\nHost: lb\r\n\r\n").ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            let (head, body) = r.split_once("\r\n\r\n")?;
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            let weight = head.lines().find_map(|l| {
                l.strip_prefix("X-Load-Balancing-Endpoint-Weight: ")
                    .map(String::from)
            });
            Some((status, weight, body.to_string()))
        })
        .unwrap()
}

fn slice(local_ready: bool) -> String {
    let conditions = if local_ready {
        "{ready: true}"
    } else {
        // Terminating, still serving: not counted, so load balancers drain
        // the node.
        "{ready: false, serving: true, terminating: true}"
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\n\
         endpoints: [{{addresses: [\"10.10.1.10\"], conditions: {conditions}, nodeName: node1}}, \
         {{addresses: [\"10.10.9.10\"], conditions: {{ready: true}}, nodeName: node2}}]\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    )
}

#[test]
fn the_agent_serves_health_check_node_ports_as_kube_proxy_does() {
    if !privileged() {
        return;
    }
    let dir = scratch("agent-health-checks");
    let state = dir.join("state");
    let topo = Topology::build(&[(
        EndpointKey::new("shop", "web"),
        vec!["10.10.1.10".parse().unwrap()],
    )])
    .unwrap();
    let objects = dir.join("objects.yaml");
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {type: LoadBalancer, clusterIP: 172.30.0.20, externalTrafficPolicy: Local, \
         healthCheckNodePort: 32000, ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]}\n";
    std::fs::write(&objects, format!("{service}---\n{}", slice(true))).unwrap();
    let revision = store(&state, &["apply", "-f", objects.to_str().unwrap()]).unwrap();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-agent-health-{}",
        std::process::id()
    ));
    let mut agent = Agent::start_with(
        topo.node().name(),
        "node1",
        &state,
        &pins,
        &dir.join("agent.log"),
        &[
            "--overlay",
            "none",
            "--service-cidr",
            "172.30.0.0/16",
            "--cluster-cidr",
            "10.10.0.0/16",
        ],
    );
    agent.wait_ready();
    agent.wait_revision(revision);
    let at: SocketAddr = "127.0.0.1:32000".parse().unwrap();
    let until = |what: &str, done: &dyn Fn(Option<Answer>) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = probe(&topo, at);
            if done(got.clone()) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}: {got:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // One ready endpoint here (the other is node2's): healthy.
    let (_, weight, body) = until("a local endpoint answers 200", &|g| {
        g.is_some_and(|(s, _, _)| s == 200)
    })
    .unwrap();
    assert_eq!(weight.as_deref(), Some("1"));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                           "localEndpoints": 1, "serviceProxyHealthy": true})
    );

    // kube-proxy's own health server, in the node's namespace: what cloud
    // load balancers probe for Services with externalTrafficPolicy Cluster.
    let healthz: SocketAddr = "127.0.0.1:10256".parse().unwrap();
    let get = |path: &str| topo.node().run(|| http_get(healthz, path)).unwrap();
    let (status, body) = get("/healthz").expect("the proxy health server answers");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeEligible"], true);
    assert_eq!(json["lastUpdated"], json["currentTime"], "{body}");
    assert!(
        json["currentTime"]
            .as_str()
            .unwrap()
            .ends_with(" +0000 UTC")
    );
    assert_eq!(get("/livez").map(|(s, _)| s), Some(200));
    assert_eq!(get("/readyz").map(|(s, _)| s), Some(404));
    // The autoscaler marks the node for deletion: /healthz drains it,
    // /livez stays.
    let node = dir.join("node.yaml");
    std::fs::write(
        &node,
        "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node1}\n\
         spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: \"1733529600\", effect: NoSchedule}]}\n",
    )
    .unwrap();
    let revision = store(&state, &["apply", "-f", node.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    let (status, body) = get("/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    assert_eq!(get("/livez").map(|(s, _)| s), Some(200));

    // The local endpoint terminates: 503, so the load balancer drains us.
    std::fs::write(&objects, slice(false)).unwrap();
    let revision = store(&state, &["apply", "-f", objects.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    let (_, weight, body) = until("no local ready endpoint answers 503", &|g| {
        g.is_some_and(|(s, _, _)| s == 503)
    })
    .unwrap();
    assert_eq!(weight.as_deref(), Some("0"));
    assert!(body.contains("\"localEndpoints\": 0"), "{body}");

    // The Service goes: its port closes.
    let revision = store(&state, &["delete", "services", "web", "-n", "shop"]).unwrap();
    agent.wait_revision(revision);
    until("the deleted Service's port closes", &|g| g.is_none());
    agent.kill();
}
