//! `palisade agent --datastore kubernetes` as a node runs it: the agent in
//! the node's namespace, its kubeconfig pointing at an HTTP stand-in of the
//! API server in that namespace (lists and chunked watch streams the test
//! feeds; no API server can run on these machines), pods wired with the
//! interface names the CNI plugin gives them, real connections between
//! them.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_datastore::kubernetes::pod_interface;
use palisade_testing::netns::Topology;
use policy_core::EndpointKey;
use serde_json::{Value, json};

use super::agent::{Agent, AgentSpec, connect, echo, serve};
use super::kube_api::{Request, accept_each, chunk, kubeconfig, listen_in, respond, start_stream};
use super::{privileged, scratch};

/// What a watch stream is sent.
enum Frame {
    Line(Value),
    /// Half of this line, then the connection closes.
    Break(Value),
}

#[derive(Default)]
struct Routes {
    lists: HashMap<String, Value>,
    /// Watches of a path answered 500 before any stream is served.
    refusals: HashMap<String, usize>,
    watches: HashMap<String, VecDeque<Receiver<Frame>>>,
    requests: Vec<String>,
}

/// The stand-in: lists by path, watch streams fed by the test; unknown
/// paths list empty and watch quietly.
struct ApiServer {
    addr: SocketAddr,
    routes: Arc<Mutex<Routes>>,
    stop: Arc<AtomicBool>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl ApiServer {
    /// Listens on loopback inside network namespace `netns`.
    fn start(netns: &str) -> ApiServer {
        let listener = listen_in(netns);
        let server = ApiServer {
            addr: listener.local_addr().unwrap(),
            routes: Arc::default(),
            stop: Arc::default(),
        };
        let routes = server.routes.clone();
        accept_each(listener, server.stop.clone(), move |conn, stop| {
            let _ = serve_connection(conn, &routes, stop);
        });
        server
    }

    fn list(&self, path: &str, kind: &str, version: &str, items: Vec<Value>) {
        self.routes.lock().unwrap().lists.insert(
            path.into(),
            json!({"kind": format!("{kind}List"), "apiVersion": "v1",
                   "metadata": {"resourceVersion": version}, "items": items}),
        );
    }

    /// The next watch of `path` streams what is sent here.
    fn watch(&self, path: &str) -> Sender<Frame> {
        let (tx, rx) = channel();
        self.routes
            .lock()
            .unwrap()
            .watches
            .entry(path.into())
            .or_default()
            .push_back(rx);
        tx
    }

    /// The next `n` watches of `path` are answered 500.
    fn refuse_watches(&self, path: &str, n: usize) {
        self.routes.lock().unwrap().refusals.insert(path.into(), n);
    }

    fn requests(&self) -> Vec<String> {
        self.routes.lock().unwrap().requests.clone()
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> PathBuf {
        kubeconfig(self.addr, dir)
    }
}

fn serve_connection(
    conn: TcpStream,
    routes: &Mutex<Routes>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(request) = Request::read(&mut reader)? {
        let (method, target) = (request.method.clone(), request.target.clone());
        let (path, _) = request.split();
        let watching = request.watching();
        let refused = {
            let mut r = routes.lock().unwrap();
            r.requests.push(format!("{method} {target}"));
            match r.refusals.get_mut(path) {
                Some(n) if watching && *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if refused {
            // 500, not 429: kube's client retries 429/503/504 itself.
            let text =
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500})
                .to_string();
            write!(
                out,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
            out.flush()?;
            continue;
        }
        let feed = {
            let mut r = routes.lock().unwrap();
            if watching {
                Some(r.watches.get_mut(path).and_then(VecDeque::pop_front))
            } else {
                None
            }
        };
        if let Some(feed) = feed {
            start_stream(&mut out)?;
            // Unscripted watches stay open and quiet.
            let Some(feed) = feed else {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return Ok(());
            };
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match feed.recv_timeout(Duration::from_millis(50)) {
                    Ok(Frame::Line(v)) => chunk(&mut out, format!("{v}\n").as_bytes())?,
                    Ok(Frame::Break(v)) => {
                        let text = v.to_string();
                        // A chunk that promises the whole line, half of it,
                        // and the connection gone.
                        write!(out, "{:x}\r\n", text.len() + 1)?;
                        out.write_all(&text.as_bytes()[..text.len() / 2])?;
                        out.flush()?;
                        return out.shutdown(std::net::Shutdown::Both);
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        out.write_all(b"0\r\n\r\n")?;
                        return out.flush();
                    }
                }
            }
        }
        let answer = if method == "GET" {
            let r = routes.lock().unwrap();
            r.lists.get(path).cloned().unwrap_or_else(|| {
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
            })
        } else {
            let name = path.rsplit('/').next().unwrap_or_default();
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        };
        respond(&mut out, 200, &answer)?;
    }
    Ok(())
}

fn pod(namespace: &str, name: &str, app: &str, ip: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": {"app": app},
                        "resourceVersion": version, "uid": format!("uid-{name}")},
           "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "busybox",
                    "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

fn event(kind: &str, object: Value) -> Frame {
    Frame::Line(json!({"type": kind, "object": object}))
}

/// The agent on the Kubernetes datastore: what the API lists is enforced;
/// a relabelled pod and a deleted policy change what connects; a watch
/// broken mid-event makes the agent unready until it resumes from the last
/// version seen, and the event after the resume is enforced.
#[test]
fn the_agent_enforces_what_the_kubernetes_api_says() {
    if !privileged() {
        return;
    }
    let dir = scratch("agent-kubernetes");
    let pods: Vec<(EndpointKey, Vec<std::net::IpAddr>)> = [
        ("clients", "web-0", "10.10.1.10"),
        ("shop", "api-0", "10.10.2.10"),
        ("shop", "db-0", "10.10.2.20"),
    ]
    .into_iter()
    .map(|(ns, name, ip)| (EndpointKey::new(ns, name), vec![ip.parse().unwrap()]))
    .collect();
    let topo = Topology::build_named(&pods, |_, k| pod_interface(&k.namespace, &k.name)).unwrap();
    let [web, api, db] = [0, 1, 2].map(|i| &topo.pods()[i]);
    let db_addr: SocketAddr = "10.10.2.20:8080".parse().unwrap();
    serve(db, db_addr);

    let server = ApiServer::start(topo.node().name());
    server.list("/api/v1/namespaces", "Namespace", "100", vec![
        json!({"metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}}),
        json!({"metadata": {"name": "clients", "labels": {"kubernetes.io/metadata.name": "clients"}}}),
    ]);
    server.list(
        "/api/v1/pods",
        "Pod",
        "100",
        vec![
            pod("clients", "web-0", "web", "10.10.1.10", "10"),
            pod("shop", "api-0", "api", "10.10.2.10", "11"),
            pod("shop", "db-0", "db", "10.10.2.20", "12"),
        ],
    );
    server.list(
        "/apis/crd.projectcalico.org/v1/globalnetworkpolicies",
        "GlobalNetworkPolicy",
        "100",
        vec![json!({"metadata": {"name": "default.default-deny"},
               "spec": {"tier": "default", "selector": "all()", "types": ["Ingress"]}})],
    );
    let allow_api = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-api", "namespace": "shop", "resourceVersion": "20"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                              "ports": [{"protocol": "TCP", "port": 8080}]}]}});
    server.list(
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
        "100",
        vec![allow_api.clone()],
    );
    let pods_first = server.watch("/api/v1/pods");
    let pods_second = server.watch("/api/v1/pods");
    let policies = server.watch("/apis/networking.k8s.io/v1/networkpolicies");

    let agent = kube_agent(
        topo.node().name(),
        &server.kubeconfig(&dir),
        &dir,
        9091,
        &[],
    );
    let mut open = connect(api, db_addr).expect("api -> db:8080 is allowed");
    assert!(echo(&mut open));
    assert!(connect(web, db_addr).is_none(), "web -> db is denied");

    // A pod relabelled: no longer the policy's source.
    pods_first
        .send(event(
            "MODIFIED",
            pod("shop", "api-0", "batch", "10.10.2.10", "101"),
        ))
        .unwrap();
    wait_until("api-0 relabelled is denied", || {
        connect(api, db_addr).is_none()
    });

    // The watch breaks halfway through an event and the API fails the next
    // watches: not ready until the store resumes, from the last version
    // seen; then the event after the resume is enforced.
    server.refuse_watches("/api/v1/pods", 3);
    pods_first
        .send(Frame::Line(
            json!({"type": "BOOKMARK", "object": {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"resourceVersion": "150"}}}),
        ))
        .unwrap();
    pods_first
        .send(Frame::Break(json!({"type": "MODIFIED",
        "object": pod("shop", "api-0", "api", "10.10.2.10", "151")})))
        .unwrap();
    agent.wait_not_ready();
    agent.wait_ready();
    let resumed: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"))
        .collect();
    assert_eq!(
        resumed.len(),
        5,
        "one watch, three failed, one resumed: {resumed:?}"
    );
    assert!(
        resumed[1..]
            .iter()
            .all(|r| r.contains("resourceVersion=150")),
        "resumed from the bookmark: {resumed:?}"
    );
    let listings = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert_eq!(listings, 1, "no second listing");
    pods_second
        .send(event(
            "MODIFIED",
            pod("shop", "api-0", "api", "10.10.2.10", "151"),
        ))
        .unwrap();
    wait_until("api-0 labelled api again is allowed", || {
        connect(api, db_addr).is_some()
    });

    // The policy deleted: default deny again.
    policies.send(event("DELETED", allow_api)).unwrap();
    wait_until("the policy's deletion is enforced", || {
        connect(api, db_addr).is_none()
    });
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent in node namespace `netns` (node `node-a`) on the Kubernetes
/// datastore of `kubeconfig`, serving its metrics on `port`, with `extra`.
fn kube_agent(
    netns: &str,
    kubeconfig: &std::path::Path,
    dir: &std::path::Path,
    port: u16,
    extra: &[&str],
) -> Agent {
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-kube{port}-{}",
        std::process::id()
    ));
    let metrics = format!("127.0.0.1:{port}");
    let args = [
        "--node",
        "node-a",
        "--datastore",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--pin-path",
        pins.to_str().unwrap(),
        "--metrics-addr",
        &metrics,
        "--overlay",
        "none",
        "--ipam-metrics-seconds",
        "1",
    ];
    let agent = Agent::spawn_spec(AgentSpec {
        nsenter: Some(netns.to_string()),
        args: args.iter().chain(extra).map(|a| a.to_string()).collect(),
        metrics: metrics.parse().unwrap(),
        pins,
        log: dir.join("agent.log"),
        env: Vec::new(),
    });
    agent.wait_ready();
    agent
}

fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The DaemonSet's flow on one node with the stateful stand-in of the API:
/// pods scheduled there get addresses from the IPPool custom resource
/// through Calico's IPAM resources, the CNI plugin's addresses reach the
/// agent as the pods' annotations (before any kubelet would report them),
/// and the NetworkPolicy holds from the first packet; DEL gives the address
/// back and takes the annotations off.
#[test]
fn pods_networked_by_the_cni_plugin_on_the_kubernetes_datastore() {
    use super::cni::{Call, address, cni, connects};
    use super::kube_api::KubeApi;
    use palisade_testing::netns::Netns;

    if !privileged() {
        return;
    }
    let dir = scratch("cni-kubernetes");
    let topo = Topology::build(&[]).unwrap();
    let node_ns = topo.node().name().to_string();
    let pod = |name: &str, app: &str| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}, "uid": format!("uid-{name}")},
               "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "busybox"}]},
               "status": {"phase": "Pending"}})
    };
    let api = KubeApi::start(
        &node_ns,
        vec![
            (
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}}),
            ),
            (
                "/api/v1/nodes",
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]}}),
            ),
            (
                "/apis/crd.projectcalico.org/v1/ippools",
                json!({"apiVersion": "crd.projectcalico.org/v1",
            "kind": "IPPool", "metadata": {"name": "frontend"},
            "spec": {"cidr": "10.10.0.0/16", "blockSize": 26, "vxlanMode": "Never", "ipipMode": "Never"}}),
            ),
            (
                "/apis/networking.k8s.io/v1/networkpolicies",
                json!({"apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy", "metadata": {"name": "api-from-web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"protocol": "TCP", "port": 8080}]}]}}),
            ),
            ("/api/v1/pods", pod("web-0", "web")),
            ("/api/v1/pods", pod("api-0", "api")),
            ("/api/v1/pods", pod("other-0", "other")),
        ],
    );
    let socket = dir.join("cni.sock");
    let agent = kube_agent(
        &node_ns,
        &api.kubeconfig(&dir),
        &dir,
        9094,
        &[
            "--cni-socket",
            socket.to_str().unwrap(),
            "--cni-attach-timeout-seconds",
            "10",
        ],
    );

    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "palisade-cni",
                      "agent_socket": socket, "ipam": {"type": "calico-ipam"}});
    let mut netns = Vec::new();
    let mut addrs = Vec::new();
    for (i, name) in ["web-0", "api-0", "other-0"].iter().enumerate() {
        let ns = Netns::create(&format!("pal{}-kpod{i}", std::process::id())).unwrap();
        let args = format!("K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}");
        let (ok, result) = cni(
            &Call {
                command: "ADD",
                container: &format!("c{i}"),
                netns: Some(ns.name()),
                args: &args,
            },
            &conf,
        );
        assert!(
            ok,
            "ADD {name}: {result}\n{}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        let ip = address(&result);
        assert!(ip.to_string().starts_with("10.10."), "{name}: {ip}");
        addrs.push(ip);
        netns.push(ns);
    }
    // The addresses are Calico's IPAM resources and the pods' annotations.
    let blocks = api.objects("/apis/crd.projectcalico.org/v1/ipamblocks");
    assert_eq!(blocks.len(), 1, "one block for the node: {blocks:?}");
    assert_eq!(blocks[0]["spec"]["affinity"], "host:node-a");
    assert_eq!(
        api.objects("/apis/crd.projectcalico.org/v1/blockaffinities")
            .len(),
        1
    );
    assert_eq!(
        api.objects("/apis/crd.projectcalico.org/v1/ipamhandles")
            .len(),
        3
    );
    let annotated: Vec<String> = api
        .objects("/api/v1/pods")
        .iter()
        .map(|p| {
            p["metadata"]["annotations"]["cni.projectcalico.org/podIPs"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        annotated.iter().all(|a| a.ends_with("/32")),
        "{annotated:?}"
    );

    // The policy holds: web reaches api, other does not.
    let api_addr = SocketAddr::new(addrs[1], 8080);
    let listener = netns[1]
        .run(|| std::net::TcpListener::bind(api_addr).unwrap())
        .unwrap();
    std::thread::spawn(move || for _ in listener.incoming() {});
    assert!(connects(&netns[0], api_addr), "web -> api:8080 is allowed");
    assert!(!connects(&netns[2], api_addr), "other -> api is denied");

    // DEL: the address goes back, the annotations come off.
    let (ok, result) = cni(
        &Call {
            command: "DEL",
            container: "c1",
            netns: Some(netns[1].name()),
            args: "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=api-0",
        },
        &conf,
    );
    assert!(ok, "DEL: {result}");
    assert_eq!(
        api.objects("/apis/crd.projectcalico.org/v1/ipamhandles")
            .len(),
        2
    );
    let api_pod = api
        .objects("/api/v1/pods")
        .into_iter()
        .find(|p| p["metadata"]["name"] == "api-0")
        .unwrap();
    assert!(
        api_pod["metadata"]["annotations"]
            .get("cni.projectcalico.org/podIPs")
            .is_none(),
        "{api_pod}"
    );
    let writes: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| !r.starts_with("GET"))
        .collect();
    assert!(
        writes.iter().all(|w| w.contains("crd.projectcalico.org")
            || w.starts_with("PATCH /api/v1/namespaces/shop/pods/")),
        "only IPAM resources and pods' annotations are written: {writes:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
