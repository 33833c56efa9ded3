//! `palisade agent` as a node runs it: a process in the node's network
//! namespace, fed by the embedded store, enforcing for real connections
//! between pods (namespaces and veths built here, WorkloadEndpoints written
//! as Calico's CNI plugin writes them), through restarts and faults.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_controller::{STALL_ENV, STALL_MESSAGE};
use palisade_testing::netns::{PodNet, Topology};
use policy_core::EndpointKey;

use super::{palisade, privileged, repo, scratch};

/// How an agent is started and reached.
pub struct AgentSpec {
    /// Run the whole agent inside this namespace (nsenter), as on a node.
    pub nsenter: Option<String>,
    /// Its flags after `agent`.
    pub args: Vec<String>,
    /// Where it serves /metrics and /status.
    pub metrics: SocketAddr,
    /// Its pin directory (removed on drop).
    pub pins: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

/// A running agent; killed (not stopped) on drop, and its pins removed.
pub struct Agent {
    child: Option<Child>,
    spec: AgentSpec,
}

/// Runs `f` on a thread inside network namespace `ns` (a name under
/// /run/netns), or here with `None`.
fn in_netns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    let Some(ns) = ns else { return f() };
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

impl Agent {
    /// An agent inside node namespace `netns` on the embedded store.
    pub fn start(netns: &str, node: &str, state: &Path, pins: &Path, log: &Path) -> Agent {
        Agent::start_with(netns, node, state, pins, log, &[])
    }

    /// [`Agent::start`] with `extra` flags.
    pub fn start_with(
        netns: &str,
        node: &str,
        state: &Path,
        pins: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Agent {
        let args = [
            "--node",
            node,
            "--state-dir",
            state.to_str().unwrap(),
            "--pin-path",
            pins.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:9091",
            "--conntrack-sweep-seconds",
            "2",
            "--ipam-metrics-seconds",
            "1",
            "--ipam-gc-seconds",
            "1",
            "--ipam-gc-grace-seconds",
            "0",
        ];
        Agent::spawn_spec(AgentSpec {
            nsenter: Some(netns.to_string()),
            args: args.iter().chain(extra).map(|a| a.to_string()).collect(),
            metrics: "127.0.0.1:9091".parse().unwrap(),
            pins: pins.to_path_buf(),
            log: log.to_path_buf(),
            env: Vec::new(),
        })
    }

    pub fn spawn_spec(spec: AgentSpec) -> Agent {
        let mut agent = Agent { child: None, spec };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .unwrap();
        // nsenter, not `ip netns exec`: that one also gives the process a
        // mount namespace of its own, whose bpffs pins die with it.
        let mut cmd = match &self.spec.nsenter {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg(env!("CARGO_BIN_EXE_palisade"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_palisade")),
        };
        // Each agent its own CNI socket (several run at once in tests).
        let mut args = self.spec.args.clone();
        if !args.iter().any(|a| a == "--cni-socket") {
            args.push("--cni-socket".into());
            args.push(
                self.spec
                    .log
                    .with_extension("cni.sock")
                    .display()
                    .to_string(),
            );
        }
        let child = cmd
            .arg("agent")
            .args(&args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// A GET to the agent's HTTP endpoint: status code and body.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.spec.metrics;
        in_netns(self.spec.nsenter.as_deref(), || http_get(addr, path))
    }

    /// Waits for /readyz to answer 200.
    pub fn wait_ready(&self) {
        self.wait("ready", |a| a.get("/readyz").is_some_and(|(c, _)| c == 200));
    }

    /// Waits for /readyz to answer 503.
    pub fn wait_not_ready(&self) {
        self.wait("not ready", |a| {
            a.get("/readyz").is_some_and(|(c, _)| c == 503)
        });
    }

    /// Waits until the agent has applied `revision`.
    pub fn wait_revision(&self, revision: u64) {
        self.wait(&format!("revision {revision}"), |a| {
            a.status()
                .is_some_and(|s| s["revision"].as_u64() >= Some(revision))
        });
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = self.get("/status")?;
        (code == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    pub fn wait_for(&self, what: &str, done: impl Fn(&Agent) -> bool) {
        self.wait(what, done)
    }

    fn wait(&self, what: &str, done: impl Fn(&Agent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(self) {
            if Instant::now() > deadline {
                panic!(
                    "agent not {what} after 60 s; status {:?}\nlog:\n{}",
                    self.get("/status"),
                    std::fs::read_to_string(&self.spec.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap().code()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs the next start with `env` (replacing earlier extra variables).
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.spec.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Waits until the log, past byte `from`, holds `text`.
    pub fn wait_log(&self, from: u64, text: &str) {
        self.wait(&format!("logging {text:?}"), |a| {
            std::fs::read(&a.spec.log)
                .map(|b| String::from_utf8_lossy(&b[(from as usize).min(b.len())..]).contains(text))
                .unwrap_or(false)
        });
    }

    /// The log's length now.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.spec.log).map_or(0, |m| m.len())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // The pinned links go with their pins (nothing else holds them).
        let _ = std::fs::remove_dir_all(&self.spec.pins);
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_string(),
    ))
}

/// An echo server on `addr` inside the pod's namespace.
pub fn serve(pod: &PodNet, addr: SocketAddr) {
    let listener = pod.ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A new connection from `pod` to `to`, if the policy lets it through.
pub fn connect(pod: &PodNet, to: SocketAddr) -> Option<TcpStream> {
    let s = pod
        .ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)))
        .unwrap()
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    Some(s)
}

/// A round trip over an open connection.
pub fn echo(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// A WorkloadEndpoint as Calico's CNI plugin records a pod it networked.
pub fn workload_endpoint(node: &str, pod: &PodNet, labels: &str, ports: &str) -> String {
    let EndpointKey { namespace, name } = &pod.key;
    let ips: Vec<String> = pod.ips.iter().map(|ip| format!("{ip}/32")).collect();
    format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\n\
         metadata: {{name: {node}-k8s-{name}-eth0, namespace: {namespace}, labels: {{{labels}}}}}\n\
         spec: {{node: {node}, orchestrator: k8s, pod: {name}, endpoint: eth0, interfaceName: {}, \
         ipNetworks: [{}], profiles: [kns.{namespace}], ports: [{ports}]}}\n",
        pod.host_if,
        ips.join(", ")
    )
}

/// Runs `palisade` on the embedded store; the revision it wrote, or the
/// error output.
pub fn store(state: &Path, args: &[&str]) -> Result<u64, String> {
    let out = palisade()
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("revision "))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {stdout}")))
}

fn pods() -> Vec<(EndpointKey, Vec<std::net::IpAddr>)> {
    [
        ("shop-frontend", "web", "10.10.1.10"),
        ("shop-backend", "api", "10.10.2.10"),
        ("analytics", "reporting", "10.10.3.10"),
    ]
    .into_iter()
    .map(|(ns, name, ip)| (EndpointKey::new(ns, name), vec![ip.parse().unwrap()]))
    .collect()
}

/// The zero-trust example on the embedded store, then one change at a
/// time, each enforced for real connections; a rejected apply and an
/// invalid record change nothing; SIGKILL in the middle of a batch and a
/// restart keep an open connection and end at the store's state; SIGTERM
/// exits 0 with the programs still enforcing.
#[test]
fn the_agent_enforces_the_embedded_store_through_changes_faults_and_restarts() {
    if !privileged() {
        return;
    }
    let dir = scratch("agent-embedded");
    let state = dir.join("state");
    let topo = Topology::build(&pods()).unwrap();
    let [web, api, reporting] = [0, 1, 2].map(|i| &topo.pods()[i]);
    let api_addr: SocketAddr = "10.10.2.10:8080".parse().unwrap();
    serve(api, api_addr);
    let http = "{name: http, port: 8080, protocol: TCP}";
    let weps = dir.join("weps.yaml");
    let write_weps = |reporting_labels: &str| {
        let docs = [
            workload_endpoint("node1", web, "app: web", ""),
            workload_endpoint("node1", api, "app: api", http),
            workload_endpoint("node1", reporting, reporting_labels, ""),
        ];
        std::fs::write(&weps, docs.join("---\n")).unwrap();
    };
    write_weps("app: reporting");
    let example = repo().join("examples/zero-trust");
    let mut files: Vec<String> = ["00-namespaces.yaml", "20-default-deny.yaml", "30-shop.yaml"]
        .iter()
        .map(|f| example.join(f).display().to_string())
        .collect();
    files.push(weps.display().to_string());
    let mut apply_args = vec!["apply", "-f"];
    apply_args.extend(files.iter().map(String::as_str));
    let revision = store(&state, &apply_args).unwrap();

    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-agent-{}",
        std::process::id()
    ));
    let log = dir.join("agent.log");
    let mut agent = Agent::start(topo.node().name(), "node1", &state, &pins, &log);
    agent.wait_ready();
    agent.wait_revision(revision);
    let status = agent.status().unwrap();
    assert_eq!(status["endpoints"].as_array().unwrap().len(), 3, "{status}");
    let mut open = connect(web, api_addr).expect("web -> api:8080 is allowed");
    assert!(echo(&mut open));
    assert!(
        connect(reporting, api_addr).is_none(),
        "reporting -> api is denied"
    );

    // One change: analytics may call the API.
    let allow = dir.join("allow-analytics.yaml");
    std::fs::write(
        &allow,
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
         metadata: {name: api-from-analytics, namespace: shop-backend}\n\
         spec: {order: 400, selector: app == 'api', types: [Ingress], ingress: [{action: Allow, protocol: TCP, \
         source: {namespaceSelector: team == 'data', selector: app == 'reporting'}, destination: {ports: [8080]}}]}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n\
         metadata: {name: reporting-to-api, namespace: analytics}\n\
         spec: {order: 400, selector: app == 'reporting', types: [Egress], egress: [{action: Allow, protocol: TCP, \
         destination: {namespaceSelector: tier == 'backend', selector: app == 'api', ports: [8080]}}]}\n",
    )
    .unwrap();
    let revision = store(&state, &["apply", "-f", allow.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    assert!(
        connect(reporting, api_addr).is_some(),
        "allowed after the apply"
    );

    // A label change on the pod takes it out of the rule.
    write_weps("app: batch");
    let revision = store(&state, &["apply", "-f", weps.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    assert!(
        connect(reporting, api_addr).is_none(),
        "denied once relabelled"
    );
    write_weps("app: reporting");
    let revision = store(&state, &["apply", "-f", weps.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    assert!(connect(reporting, api_addr).is_some(), "allowed again");

    // Removal, enforced.
    let revision = store(
        &state,
        &[
            "delete",
            "networkpolicies",
            "api-from-analytics",
            "-n",
            "shop-backend",
        ],
    )
    .unwrap();
    agent.wait_revision(revision);
    assert!(
        connect(reporting, api_addr).is_none(),
        "denied after the delete"
    );
    assert!(connect(web, api_addr).is_some(), "web -> api untouched");

    // A rejected apply writes nothing and changes nothing.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: open-all}\n\
         spec: {order: 1, selector: all(), ingress: [{action: Allow}], egress: [{action: Allow}]}\n\
         ---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: broken}\n\
         spec: {selector: app = 'x'}\n",
    )
    .unwrap();
    let err = store(&state, &["apply", "-f", bad.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("broken") && err.contains("selector"), "{err}");
    assert!(
        connect(reporting, api_addr).is_none(),
        "open-all was not applied either"
    );

    // An invalid object arriving from the datastore (written by another
    // tool, around validation): reported, skipped, the rest enforced.
    let log_path = state.join("changes.jsonl");
    let bad_gnp = serde_json::json!({"put": {
        "key": "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/sneaky",
        "ref": {"kind": "GlobalNetworkPolicy", "namespace": null, "name": "sneaky"},
        "revision": revision + 1,
        "document": {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": "sneaky"},
                     "spec": {"order": 1, "selector": "all(", "ingress": [{"action": "Allow"}]}}}});
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .unwrap();
    writeln!(f, "{bad_gnp}").unwrap();
    drop(f);
    agent.wait_revision(revision + 1);
    let status = agent.status().unwrap();
    let rejected = status["rejected"].to_string();
    assert!(
        rejected.contains("sneaky") && rejected.contains("selector"),
        "{status}"
    );
    assert!(connect(reporting, api_addr).is_none(), "still denied");
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(metrics.contains("palisade_rejected_objects 1"), "{metrics}");

    // Pool headroom: a pool applied and an address assigned show in the
    // agent's IPAM gauges.
    let pool = dir.join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: frontend}\n\
         spec: {cidr: 10.10.0.0/16, vxlanMode: Always, natOutgoing: true}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-a}\n",
    )
    .unwrap();
    store(&state, &["apply", "-f", pool.to_str().unwrap()]).unwrap();
    let out = palisade()
        .args([
            "ipam",
            "assign",
            "--node",
            "node-a",
            "--handle",
            "h1",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An address whose pod does not exist: the agent's collection frees it
    // (this agent collects, with no grace period); h1 names no owner and
    // stays.
    let out = palisade()
        .args(["ipam", "assign", "--node", "node-a", "--handle", "ghost"])
        .args(["--pod", "shop-frontend/ghost", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = [
        "palisade_ipam_gc_released_total 1",
        "palisade_ipam_pool_addresses{pool=\"frontend\",state=\"in_use\"} 1",
        "palisade_ipam_pool_addresses{pool=\"frontend\",state=\"size\"} 65536",
        "palisade_ipam_pool_addresses{pool=\"frontend\",state=\"free\"} 65535",
        "palisade_ipam_pool_blocks{pool=\"frontend\"} 1",
        "palisade_ipam_node_blocks{node=\"node-a\"} 1",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, metrics) = agent.get("/metrics").unwrap();
        if want.iter().all(|w| metrics.contains(w)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // It is no obstacle to repairing it.
    let revision = store(&state, &["delete", "globalnetworkpolicies", "sneaky"]).unwrap();
    agent.wait_revision(revision);
    assert_eq!(agent.status().unwrap()["rejected"], serde_json::json!([]));

    // SIGKILL in the middle of a batch, then a restart: the open connection
    // lives through it, and the end state is the store's. The agent runs
    // with the dataplane's fault injection: every plan write stops between
    // the entries it prepares and the switch to them, and the agent is
    // killed there, with the batch half in the maps.
    assert_eq!(agent.stop(), Some(0));
    agent.set_env(&[(STALL_ENV, "1500")]);
    agent.restart();
    agent.wait_ready();
    let bulk = dir.join("bulk.yaml");
    let policies: Vec<String> = (0..150)
        .map(|i| {
            format!(
                "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: bulk-{i}}}\n\
                 spec: {{order: {}, selector: app == 'api', types: [Ingress], ingress: [{{action: Allow, protocol: TCP, \
                 source: {{nets: [192.168.{i}.0/24]}}, destination: {{ports: [{}]}}}}]}}\n",
                300 + i,
                9000 + i
            )
        })
        .collect();
    std::fs::write(&bulk, policies.join("---\n")).unwrap();
    let policies_before = agent.status().unwrap()["policies"].as_u64().unwrap();
    let log_at = agent.log_len();
    let revision = store(
        &state,
        &[
            "apply",
            "-f",
            allow.to_str().unwrap(),
            bulk.to_str().unwrap(),
        ],
    )
    .unwrap();
    agent.wait_log(log_at, STALL_MESSAGE);
    agent.kill();
    agent.set_env(&[]);
    assert!(
        echo(&mut open),
        "the open connection while the agent is down"
    );
    assert!(
        connect(web, api_addr).is_some(),
        "the pinned programs go on"
    );
    agent.restart();
    agent.wait_ready();
    agent.wait_revision(revision);
    let status = agent.status().unwrap();
    assert_eq!(status["adopted"], true, "{status}");
    assert_eq!(
        status["policies"].as_u64(),
        Some(policies_before + 151),
        "{status}"
    );
    assert!(echo(&mut open), "the open connection after the restart");
    assert!(
        connect(reporting, api_addr).is_some(),
        "the store's state after the restart"
    );

    // SIGTERM: exit 0, and the programs stay attached and enforcing.
    assert_eq!(agent.stop(), Some(0));
    assert!(echo(&mut open));
    store(
        &state,
        &[
            "delete",
            "networkpolicies",
            "reporting-to-api",
            "-n",
            "analytics",
        ],
    )
    .unwrap();
    assert!(
        connect(reporting, api_addr).is_some(),
        "with the agent stopped, the last state it wrote is enforced"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server that answers each connection with its name, then closes.
fn serve_name(pod: &PodNet, addr: SocketAddr, name: &'static str) {
    let listener = pod.ns.run(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(name.as_bytes());
        }
    });
}

/// Which server answered a new connection from `pod` to `to`, or the error.
fn who(pod: &PodNet, to: SocketAddr) -> Result<String, std::io::ErrorKind> {
    let mut s = pod
        .ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_millis(700)))
        .unwrap()
        .map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.kind())?;
    Ok(out)
}

/// The agent as kube-proxy's replacement: Services and EndpointSlices from
/// the embedded store become ClusterIP load balancing in the pods' TC
/// hooks; an endpoint taken out of the slice gets no new connection, a
/// Service with no endpoint is refused at once (ICMP port unreachable),
/// and the service metrics count it all.
#[test]
fn the_agent_load_balances_services_from_the_store() {
    if !privileged() {
        return;
    }
    let dir = scratch("agent-services");
    let state = dir.join("state");
    let pods: Vec<(EndpointKey, Vec<std::net::IpAddr>)> = [
        ("shop-frontend", "web", "10.10.1.10"),
        ("shop-backend", "api-1", "10.10.2.10"),
        ("shop-backend", "api-2", "10.10.2.11"),
    ]
    .into_iter()
    .map(|(ns, name, ip)| (EndpointKey::new(ns, name), vec![ip.parse().unwrap()]))
    .collect();
    let topo = Topology::build(&pods).unwrap();
    let [web, api1, api2] = [0, 1, 2].map(|i| &topo.pods()[i]);
    serve_name(api1, "10.10.2.10:8080".parse().unwrap(), "api-1");
    serve_name(api2, "10.10.2.11:8080".parse().unwrap(), "api-2");
    let slice = |addrs: &[&str]| {
        let endpoints: Vec<String> = addrs
            .iter()
            .map(|a| {
                format!("{{addresses: [\"{a}\"], conditions: {{ready: true}}, nodeName: node1}}")
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: api-1, namespace: shop-backend, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nendpoints: [{}]\nports: [{{name: http, port: 8080, protocol: TCP}}]\n",
            endpoints.join(", ")
        )
    };
    let objects = dir.join("objects.yaml");
    let docs = [
        workload_endpoint("node1", web, "app: web", ""),
        workload_endpoint("node1", api1, "app: api", ""),
        workload_endpoint("node1", api2, "app: api", ""),
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop-backend}\n\
         spec: {clusterIP: 172.30.0.10, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]}\n"
            .to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: idle, namespace: shop-backend}\n\
         spec: {clusterIP: 172.30.0.11, ports: [{name: http, port: 80, protocol: TCP}]}\n"
            .to_string(),
        slice(&["10.10.2.10", "10.10.2.11"]),
    ];
    std::fs::write(&objects, docs.join("---\n")).unwrap();
    let example = repo().join("examples/zero-trust/00-namespaces.yaml");
    let revision = store(
        &state,
        &[
            "apply",
            "-f",
            example.to_str().unwrap(),
            "-f",
            objects.to_str().unwrap(),
        ],
    )
    .unwrap();
    // A Service the model cannot read is refused at apply, naming the field.
    let bad = dir.join("bad-service.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop-backend}\n\
         spec: {clusterIP: 172.30.0.12, ports: [{port: eighty}]}\n",
    )
    .unwrap();
    let err = store(&state, &["apply", "-f", bad.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("bad") && err.contains("port"), "{err}");

    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-agent-services-{}",
        std::process::id()
    ));
    let log = dir.join("agent.log");
    // The node's own processes, in a cgroup of this test: connect-time
    // balancing. The node gets an address for them to connect from.
    let cgroup = palisade_testing::cgroup::TestCgroup::new("agent-connect").unwrap();
    let added = Command::new("ip")
        .args([
            "-n",
            topo.node().name(),
            "addr",
            "add",
            "192.168.0.2/32",
            "dev",
            "lo",
        ])
        .status()
        .unwrap();
    assert!(added.success());
    let mut agent = Agent::start_with(
        topo.node().name(),
        "node1",
        &state,
        &pins,
        &log,
        &[
            "--connect-hooks-cgroup",
            cgroup.path().to_str().unwrap(),
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
    let vip: SocketAddr = "172.30.0.10:80".parse().unwrap();
    // The table is written after the batch; wait for the first answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while who(web, vip).is_err() {
        assert!(Instant::now() < deadline, "no answer through the ClusterIP");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent settles the host side of what it attaches, whoever wired
    // it (these veths were made without accept_local, as an older plugin
    // made them): masqueraded service traffic needs it.
    for pod in [web, api1, api2] {
        let path = format!("/proc/sys/net/ipv4/conf/{}/accept_local", pod.host_if);
        let value = topo.node().run(|| std::fs::read_to_string(&path)).unwrap();
        assert_eq!(value.unwrap().trim(), "1", "{}", pod.host_if);
    }
    let seen: std::collections::BTreeSet<String> =
        (0..40).filter_map(|_| who(web, vip).ok()).collect();
    assert_eq!(
        seen,
        ["api-1", "api-2"].map(String::from).into(),
        "both endpoints answer through the ClusterIP"
    );
    // The node's own process reaches it too (connect-time balancing), once
    // the hooks are attached (after the service table: they load then).
    agent.wait_log(0, "socket-time service balancing attached");
    let out = cgroup
        .bash_in(
            topo.node().name(),
            "exec 3<>/dev/tcp/172.30.0.10/80 && cat <&3",
        )
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer == "api-1" || answer == "api-2",
        "a node process through the ClusterIP: {answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The socket hooks' links are pinned: the node's processes stay
    // balanced while the agent is down, and a restarted agent replaces
    // them (one set attached, not two).
    let node_answer = || {
        let out = cgroup
            .bash_in(
                topo.node().name(),
                "exec 3<>/dev/tcp/172.30.0.10/80 && cat <&3",
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Counted on this test's cgroup: other tests attach theirs meanwhile.
    let hooks = policy_bpf::datapath::SOCKET_PROGRAMS.len();
    assert_eq!(
        policy_bpf::datapath::attached_socket_hooks(cgroup.path()).unwrap(),
        hooks
    );
    agent.kill();
    let answer = node_answer();
    assert!(
        answer == "api-1" || answer == "api-2",
        "a node process through the ClusterIP with the agent down: {answer:?}"
    );
    assert_eq!(
        policy_bpf::datapath::attached_socket_hooks(cgroup.path()).unwrap(),
        hooks
    );
    let from = agent.log_len();
    agent.restart();
    agent.wait_ready();
    agent.wait_log(from, "socket-time service balancing attached");
    assert_eq!(
        policy_bpf::datapath::attached_socket_hooks(cgroup.path()).unwrap(),
        hooks,
        "the restarted agent's hooks replace the earlier ones"
    );
    let answer = node_answer();
    assert!(
        answer == "api-1" || answer == "api-2",
        "a node process through the ClusterIP after the restart: {answer:?}"
    );

    // A Service with no endpoint: refused at once, not timed out.
    assert_eq!(
        who(web, "172.30.0.11:80".parse().unwrap()),
        Err(std::io::ErrorKind::ConnectionRefused)
    );

    // api-2 leaves the slice: no new connection reaches it.
    std::fs::write(&objects, slice(&["10.10.2.10"])).unwrap();
    let revision = store(&state, &["apply", "-f", objects.to_str().unwrap()]).unwrap();
    agent.wait_revision(revision);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers: Vec<String> = (0..20).filter_map(|_| who(web, vip).ok()).collect();
        if answers.len() == 20 && answers.iter().all(|a| a == "api-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "api-2 still reached after it left the slice: {answers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let (_, metrics) = agent.get("/metrics").unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{metrics}"))
    };
    assert_eq!(value("palisade_services"), 2.0, "{metrics}");
    assert!(value("palisade_service_backends") >= 1.0, "{metrics}");
    assert!(value("palisade_service_nat_entries") > 0.0, "{metrics}");
    assert!(
        metrics.contains("palisade_map_entries{map=\"svc_frontends\"} 2"),
        "{metrics}"
    );
    // The address filter has the ClusterIP's bit and the backends'.
    assert!(
        value("palisade_map_entries{map=\"svc_filter\"}") >= 2.0,
        "{metrics}"
    );
    assert!(metrics.contains("statistic=\"ServiceReject\""), "{metrics}");
    let status = agent.status().unwrap();
    assert_eq!(status["services"]["ports"], 2, "{status}");
    assert!(
        status["services"]["natEntries"].as_u64() > Some(0),
        "{status}"
    );

    // kube-proxy's rules appear on the node (nftables mode, then
    // iptables mode's chain): the status and the metric say so; gone,
    // they clear.
    let nft = |args: &str| {
        let ok = Command::new("ip")
            .args(["netns", "exec", topo.node().name(), "nft"])
            .args(args.split(' '))
            .status()
            .unwrap()
            .success();
        assert!(ok, "nft {args}");
    };
    nft("add table ip kube-proxy");
    nft("add chain ip kube-proxy services");
    nft("add table ip nat");
    nft("add chain ip nat KUBE-SERVICES");
    agent.wait_for("reporting kube-proxy", |a| {
        a.status()
            .is_some_and(|s| s["kubeProxy"].as_array().is_some_and(|k| k.len() == 2))
    });
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        metrics.contains("palisade_kube_proxy_tables 2"),
        "{metrics}"
    );
    nft("delete table ip kube-proxy");
    nft("delete table ip nat");
    agent.wait_for("kube-proxy cleared", |a| {
        a.status()
            .is_some_and(|s| s["kubeProxy"].as_array().is_some_and(Vec::is_empty))
    });

    // Another balancer's programs join the agent's on the hooks' cgroup
    // (a second datapath of its own here): reported by hook, then cleared
    // once they go.
    let mut other = policy_bpf::datapath::Datapath::load_private(Default::default()).unwrap();
    other.attach_socket_hooks(cgroup.path()).unwrap();
    agent.wait_for("reporting the other socket balancer", |a| {
        a.status().is_some_and(|s| {
            s["foreignSocketHooks"]
                .as_array()
                .is_some_and(|k| k.len() == policy_bpf::datapath::SOCKET_PROGRAMS.len())
        })
    });
    let status = agent.status().unwrap();
    assert!(
        status["foreignSocketHooks"][0].as_str().is_some_and(|h| h
            .starts_with("connect4: program ")
            && h.ends_with("(palisade_connec)")),
        "{status}"
    );
    let (_, metrics) = agent.get("/metrics").unwrap();
    assert!(
        metrics.contains("palisade_foreign_socket_hooks 8"),
        "{metrics}"
    );
    other.detach_socket_hooks(cgroup.path()).unwrap();
    drop(other);
    agent.wait_for("the other socket balancer cleared", |a| {
        a.status().is_some_and(|s| {
            s["foreignSocketHooks"]
                .as_array()
                .is_some_and(Vec::is_empty)
        })
    });
    assert_eq!(
        policy_bpf::datapath::attached_socket_hooks(cgroup.path()).unwrap(),
        policy_bpf::datapath::SOCKET_PROGRAMS.len()
    );
}
