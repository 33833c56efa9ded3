//! `palisade-cni` against a running agent on one node: pods get addresses
//! from their network's pool and are held to policy from their first
//! packet; with `--pod-connect-balancing tcp` their TCP to a Service is
//! balanced at `connect()` (no packet translated) and DEL unlists them;
//! DEL twice is fine; a failure at every step of ADD, a stopped agent and
//! bad configurations leave nothing behind.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use palisade_testing::netns::{Netns, ip_batch};
use serde_json::{Value, json};

use super::agent::{Agent, AgentSpec, store};
use super::{palisade, privileged, scratch};

/// The steps of an ADD a failure can be injected at, in order.
const ADD_STEPS: [&str; 9] = [
    "ipam",
    "veth",
    "host-end",
    "move",
    "pod-end",
    "pod-routes",
    "host-routes",
    "endpoint",
    "policy",
];

const CLUSTER: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: frontend}
spec: {cidr: 10.10.0.0/16, vxlanMode: Always}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: backend}
spec: {cidr: 10.20.0.0/16, vxlanMode: Always}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080, protocol: TCP}]
";

/// One network: its conflist entry (what a runtime pipes in).
fn netconf(name: &str, pool: &str, app: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "type": "palisade-cni",
        "agent_socket": socket,
        "namespace": "shop",
        "labels": {"app": app},
        "ipam": {"type": "calico-ipam", "ipv4_pools": [pool]},
    })
}

pub struct Call<'a> {
    pub command: &'a str,
    pub container: &'a str,
    pub netns: Option<&'a str>,
    pub args: &'a str,
}

/// Runs `palisade-cni`: exit status and stdout as JSON (or the text).
pub fn cni(call: &Call<'_>, conf: &Value) -> (bool, Value) {
    cni_raw(call, conf.to_string().as_bytes())
}

fn cni_raw(call: &Call<'_>, stdin: &[u8]) -> (bool, Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", call.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = call.netns {
        cmd.env("CNI_NETNS", format!("/run/netns/{ns}"));
    }
    let mut child = cmd.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (out.status.success(), value)
}

/// The links of a namespace other than `lo`.
fn links(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect()
}

/// Whether `palisade ipam check` finds exactly `n` addresses in use and
/// nothing wrong (no address without its pod); its output otherwise.
fn ipam_clean(state: &Path, n: usize) -> Result<(), String> {
    let out = palisade()
        .args(["ipam", "check", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let want = format!("{n} allocated addresses");
    if text.contains(&want) && text.contains("\n0 findings") {
        Ok(())
    } else {
        Err(text)
    }
}

fn endpoints(state: &Path) -> String {
    let out = palisade()
        .args(["get", "workloadendpoints", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok())
        .unwrap()
}

/// An agent for node namespace `node_ns`, with its CNI socket in `dir`
/// and its pins named after `dir` (bpffs is shared by the tests running
/// at once; each removes its own pins when it ends).
fn agent(node_ns: &str, state: &Path, dir: &Path, extra: &[&str]) -> Agent {
    let socket = dir.join("cni.sock");
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-{}",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let mut args: Vec<String> = [
        "--node",
        "node-a",
        "--state-dir",
        state.to_str().unwrap(),
        "--pin-path",
        pins.to_str().unwrap(),
        "--metrics-addr",
        "127.0.0.1:9093",
        "--cni-socket",
        socket.to_str().unwrap(),
        "--cni-attach-timeout-seconds",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let a = Agent::spawn_spec(AgentSpec {
        nsenter: Some(node_ns.to_string()),
        args,
        metrics: "127.0.0.1:9093".parse().unwrap(),
        pins,
        log: dir.join("agent.log"),
        env: Vec::new(),
    });
    a.wait_ready();
    a
}

pub fn address(result: &Value) -> IpAddr {
    let a = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("{result}"));
    a.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn pods_get_their_pools_addresses_and_policy_and_failures_leave_nothing() {
    if !privileged() {
        return;
    }
    let dir = scratch("cni");
    let state: PathBuf = dir.join("state");
    let tag = std::process::id();
    let node = Netns::create(&format!("palcn{tag}")).unwrap();
    ip_batch(
        Some(node.name()),
        &[
            "link set lo up".into(),
            "addr add 192.168.200.1/32 dev lo".into(),
        ],
    )
    .unwrap();
    std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    store(
        &state,
        &["apply", "-f", dir.join("cluster.yaml").to_str().unwrap()],
    )
    .unwrap();
    let socket = dir.join("cni.sock");
    let frontend = |app| netconf("frontend", "frontend", app, &socket);
    let backend = netconf("backend", "backend", "api", &socket);

    // Pods' TCP to Services balanced at connect(): the socket hooks on a
    // cgroup of this test, which the pods' processes below join.
    let cgroup = palisade_testing::cgroup::TestCgroup::new("cni-connect").unwrap();
    let mut a = agent(
        node.name(),
        &state,
        &dir,
        &[
            "--connect-hooks-cgroup",
            cgroup.path().to_str().unwrap(),
            "--pod-connect-balancing",
            "tcp",
            "--service-cidr",
            "172.30.0.0/16",
        ],
    );
    let pods: Vec<Netns> = (0..3)
        .map(|i| Netns::create(&format!("palcp{i}{tag}")).unwrap())
        .collect();
    let add = |i: usize, name: &str, conf: &Value| {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAME={name}");
        cni(
            &Call {
                command: "ADD",
                container: &format!("c{i}{tag}"),
                netns: Some(pods[i].name()),
                args: &args,
            },
            conf,
        )
    };
    let (ok, web) = add(0, "web", &frontend("web"));
    assert!(ok, "{web}");
    let (ok, api) = add(1, "api", &backend);
    assert!(ok, "{api}");
    let (ok, other) = add(2, "other", &frontend("other"));
    assert!(ok, "{other}");
    let (web_ip, api_ip, other_ip) = (address(&web), address(&api), address(&other));
    let listed = endpoints(&state);
    assert!(
        listed.contains("node--a-k8s-web-eth0") && listed.contains("node--a-k8s-api-eth0"),
        "{listed}"
    );
    assert!(web_ip.to_string().starts_with("10.10."), "{web}");
    assert!(api_ip.to_string().starts_with("10.20."), "{api}");
    assert!(other_ip.to_string().starts_with("10.10."), "{other}");
    assert_eq!(web["interfaces"][1]["mtu"], 1450, "{web}");
    assert_eq!(
        web["routes"][0],
        json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
    );

    // Policy from the first packet: web reaches api on 8080, other does not.
    let listener = pods[1]
        .run(|| TcpListener::bind((api_ip, 8080)).unwrap())
        .unwrap();
    assert!(connects(&pods[0], SocketAddr::new(api_ip, 8080)));
    assert!(!connects(&pods[2], SocketAddr::new(api_ip, 8080)));

    // A Service in front of api: web's connection from the hooks' cgroup
    // is pointed at api in connect(), so no packet is translated.
    let metric = |a: &Agent, name: &str| -> f64 {
        let (_, text) = a.get("/metrics").unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("3 pods listed for connect()", &|| {
        metric(&a, "palisade_pods_balanced_at_connect") == 3.0
    });
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
         spec: {{clusterIP: 172.30.0.10, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
         addressType: IPv4\nendpoints: [{{addresses: [\"{api_ip}\"], conditions: {{ready: true}}}}]\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
    );
    std::fs::write(dir.join("service.yaml"), service).unwrap();
    store(
        &state,
        &["apply", "-f", dir.join("service.yaml").to_str().unwrap()],
    )
    .unwrap();
    // Connected before the table is in the maps, web's SYN would pass the
    // hook untouched and its retransmission be translated per packet.
    wait_for("the Service in the maps", &|| {
        metric(&a, "palisade_services") == 1.0
    });
    let through_service = || {
        cgroup
            .bash_in(pods[0].name(), "exec 3<>/dev/tcp/172.30.0.10/80")
            .unwrap()
            .status
            .success()
    };
    wait_for("web reaches api through its ClusterIP", &through_service);
    // The metrics of the writer's next pass count it (the hook counts the
    // connection translated); by then a NAT entry would be counted too.
    wait_for("the connection counted", &|| {
        metric(
            &a,
            "palisade_datapath_packets_total{statistic=\"ServiceTranslated\"}",
        ) >= 1.0
    });
    assert_eq!(
        metric(
            &a,
            "palisade_datapath_packets_total{statistic=\"ServiceNat\"}"
        ),
        0.0,
        "balanced at connect(): no packet translated"
    );
    assert_eq!(
        metric(&a, "palisade_service_nat_entries"),
        0.0,
        "balanced at connect(): no NAT entry"
    );
    drop(listener);

    // CHECK agrees; DEL twice is fine and leaves nothing of web.
    let web_call = |command| Call {
        command,
        container: Box::leak(format!("c0{tag}").into_boxed_str()),
        netns: Some(pods[0].name()),
        args: "K8S_POD_NAME=web",
    };
    let (ok, out) = cni(&web_call("CHECK"), &frontend("web"));
    assert!(ok, "{out}");
    let before = links(node.name()).len();
    for _ in 0..2 {
        let (ok, out) = cni(&web_call("DEL"), &frontend("web"));
        assert!(ok, "{out}");
    }
    assert_eq!(links(node.name()).len(), before - 1);
    wait_for("web no longer listed after DEL", &|| {
        metric(&a, "palisade_pods_balanced_at_connect") == 2.0
    });
    assert!(links(pods[0].name()).is_empty());
    assert!(!endpoints(&state).contains("web"), "{}", endpoints(&state));
    let (ok, out) = cni(&web_call("CHECK"), &frontend("web"));
    assert!(!ok && out["code"] == 999, "{out}");
    ipam_clean(&state, 2).unwrap();

    // A failure injected at every step of ADD: a CNI error naming it,
    // and nothing left behind (links, addresses, endpoints).
    let node_links = links(node.name());
    for step in ADD_STEPS {
        a.kill();
        a = agent(node.name(), &state, &dir, &["--cni-fail-at", step]);
        let (ok, out) = add(0, "web", &frontend("web"));
        assert!(!ok, "{step}: {out}");
        assert_eq!(out["code"], 999, "{step}: {out}");
        assert!(
            out["msg"].as_str().unwrap_or("").contains(step)
                || out["details"].as_str().unwrap_or("").contains(step),
            "{step}: {out}"
        );
        assert_eq!(links(node.name()), node_links, "{step}: node links");
        assert!(links(pods[0].name()).is_empty(), "{step}: pod links");
        assert!(!endpoints(&state).contains("web"), "{step}");
        ipam_clean(&state, 2).unwrap_or_else(|e| panic!("{step}: {e}"));
    }

    // The agent down: ADD says try again later and leaks nothing.
    a.kill();
    let (ok, out) = add(0, "web", &frontend("web"));
    assert!(!ok && out["code"] == 11, "{out}");
    assert!(
        out["msg"].as_str().unwrap().contains("not reachable"),
        "{out}"
    );
    assert_eq!(links(node.name()), node_links);
    ipam_clean(&state, 2).unwrap();

    // Bad input: clear errors with the spec's codes, before any work.
    let call = Call {
        command: "ADD",
        container: "c9",
        netns: Some(pods[0].name()),
        args: "",
    };
    let (ok, out) = cni_raw(&call, b"{not json");
    assert!(!ok && out["code"] == 6, "{out}");
    let (ok, out) = cni_raw(&call, br#"{"cniVersion":"1.0.0","type":"palisade-cni"}"#);
    assert!(
        !ok && out["code"] == 7 && out["msg"].as_str().unwrap().contains("name"),
        "{out}"
    );
    let (ok, out) = cni_raw(
        &call,
        br#"{"cniVersion":"0.1.0","name":"n","type":"palisade-cni"}"#,
    );
    assert!(!ok && out["code"] == 1, "{out}");
    let no_netns = Call {
        netns: None,
        ..call
    };
    let (ok, out) = cni(&no_netns, &frontend("web"));
    assert!(
        !ok && out["code"] == 4 && out["msg"] == "CNI_NETNS is not set",
        "{out}"
    );
    let (ok, out) = cni_raw(
        &Call {
            command: "VERSION",
            container: "",
            netns: None,
            args: "",
        },
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(
        ok && out["supportedVersions"].to_string().contains("1.1.0"),
        "{out}"
    );
}

/// A Pod stored in the embedded store (applied for its labels, as one
/// would for a podman container) and the CNI plugin's endpoint for it are
/// one object, as in Calico's Kubernetes datastore: ADD annotates the Pod
/// (its addresses, container, node) instead of writing a second endpoint;
/// the Pod's labels decide its policy and its `ipv4pools` annotation its
/// pool, over the conflist's; DEL takes the annotations off. A Pod
/// scheduled to another node is refused, naming the field, leaving nothing.
#[test]
fn a_stored_pod_is_the_cni_plugins_endpoint_with_its_labels_and_pool() {
    if !privileged() {
        return;
    }
    let dir = scratch("cni-pod");
    let state: PathBuf = dir.join("state");
    let tag = std::process::id();
    let node = Netns::create(&format!("palsn{tag}")).unwrap();
    ip_batch(
        Some(node.name()),
        &[
            "link set lo up".into(),
            "addr add 192.168.200.1/32 dev lo".into(),
        ],
    )
    .unwrap();
    let pods_yaml = "\
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: shop
  labels: {app: api}
  annotations: {cni.projectcalico.org/ipv4pools: '[\"backend\"]'}
spec: {containers: [{name: db, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: shop, labels: {app: api}}
spec: {nodeName: node-b, containers: [{name: far, image: busybox}]}
";
    std::fs::write(
        dir.join("cluster.yaml"),
        format!("{CLUSTER}---\n{pods_yaml}"),
    )
    .unwrap();
    store(
        &state,
        &["apply", "-f", dir.join("cluster.yaml").to_str().unwrap()],
    )
    .unwrap();
    let socket = dir.join("cni.sock");
    // Every pod's conflist says frontend and its own app label: the stored
    // Pod's say otherwise. Kubernetes policy mode: pod annotations count,
    // as with Calico's plugin.
    let conf = |app| {
        let mut c = netconf("frontend", "frontend", app, &socket);
        c["policy"] = json!({"type": "k8s"});
        c
    };
    let _a = agent(node.name(), &state, &dir, &[]);
    let pods: Vec<Netns> = (0..4)
        .map(|i| Netns::create(&format!("palsp{i}{tag}")).unwrap())
        .collect();
    let call = |i: usize, command: &'static str, name: &str| Call {
        command,
        container: Box::leak(format!("s{i}{tag}").into_boxed_str()),
        netns: Some(Box::leak(pods[i].name().to_string().into_boxed_str())),
        args: Box::leak(format!("K8S_POD_NAME={name}").into_boxed_str()),
    };
    let (ok, db) = cni(&call(0, "ADD", "db"), &conf("web"));
    assert!(ok, "{db}");
    let (ok, web) = cni(&call(1, "ADD", "web"), &conf("web"));
    assert!(ok, "{web}");
    let (ok, other) = cni(&call(2, "ADD", "other"), &conf("other"));
    assert!(ok, "{other}");
    let db_ip = address(&db);
    assert!(
        db_ip.to_string().starts_with("10.20."),
        "the Pod's ipv4pools annotation chose backend: {db}"
    );
    let listed = endpoints(&state);
    assert!(
        !listed.contains("-db-"),
        "no second object for db: {listed}"
    );
    let get_pod = |name: &str| -> Value {
        let out = palisade()
            .args([
                "get",
                "pods",
                name,
                "-n",
                "shop",
                "-o",
                "json",
                "--state-dir",
            ])
            .arg(&state)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        if v.is_array() { v[0].clone() } else { v }
    };
    let stored = get_pod("db");
    assert_eq!(stored["spec"]["nodeName"], "node-a", "{stored}");
    assert_eq!(
        stored["metadata"]["annotations"]["cni.projectcalico.org/podIPs"],
        format!("{db_ip}/32"),
        "{stored}"
    );
    // The Pod's labels (app=api) decide: web reaches db on 8080, other
    // does not, whatever db's conflist said.
    let listener = pods[0]
        .run(|| TcpListener::bind((db_ip, 8080)).unwrap())
        .unwrap();
    assert!(connects(&pods[1], SocketAddr::new(db_ip, 8080)));
    assert!(!connects(&pods[2], SocketAddr::new(db_ip, 8080)));
    drop(listener);

    // A late DEL of an older sandbox of db (another container ID) leaves
    // the running one's endpoint and interface alone.
    let node_links = links(node.name());
    let stale = Call {
        container: "an-older-sandbox",
        ..call(0, "DEL", "db")
    };
    let (ok, out) = cni(&stale, &conf("web"));
    assert!(ok, "{out}");
    assert!(
        !get_pod("db")["metadata"]["annotations"]["cni.projectcalico.org/podIPs"].is_null(),
        "an older sandbox's DEL cleared the running one's endpoint"
    );
    assert_eq!(links(node.name()), node_links, "nor its interface");

    // DEL: the annotations go, the Pod stays, nothing of db is left.
    let node_links = links(node.name());
    let (ok, out) = cni(&call(0, "DEL", "db"), &conf("web"));
    assert!(ok, "{out}");
    let stored = get_pod("db");
    assert!(
        stored["metadata"]["annotations"]["cni.projectcalico.org/podIPs"].is_null(),
        "{stored}"
    );
    assert_eq!(links(node.name()).len(), node_links.len() - 1);
    ipam_clean(&state, 2).unwrap();

    // GC: the runtime holds web's and other's attachments only; db,
    // added again, is collected off its Pod, web's endpoint stays.
    let (ok, db) = cni(&call(0, "ADD", "db"), &conf("web"));
    assert!(ok, "{db}");
    assert!(!get_pod("db")["metadata"]["annotations"]["palisade.dev/network"].is_null());
    let node_links = links(node.name());
    let mut gc = conf("web");
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": format!("s1{tag}"), "ifname": "eth0"},
        {"containerID": format!("s2{tag}"), "ifname": "eth0"},
    ]);
    let (ok, out) = cni(
        &Call {
            command: "GC",
            container: "",
            netns: None,
            args: "",
        },
        &gc,
    );
    assert!(ok, "{out}");
    assert!(
        get_pod("db")["metadata"]["annotations"]["cni.projectcalico.org/podIPs"].is_null(),
        "GC clears the Pod-held attachment"
    );
    assert_eq!(links(node.name()).len(), node_links.len() - 1);
    assert!(
        endpoints(&state).contains("-web-"),
        "GC keeps web's endpoint"
    );
    ipam_clean(&state, 2).unwrap();

    // A Pod scheduled to another node: refused by name, nothing left.
    let node_links = links(node.name());
    let (ok, out) = cni(&call(3, "ADD", "far"), &conf("web"));
    assert!(!ok, "{out}");
    let text = out.to_string();
    assert!(
        text.contains("spec.node") && text.contains("node-b"),
        "{out}"
    );
    assert_eq!(links(node.name()), node_links);
    assert!(links(pods[3].name()).is_empty());
    ipam_clean(&state, 2).unwrap();
}
