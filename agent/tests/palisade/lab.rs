//! A lab of nodes on one machine for the tests that need several: network
//! namespaces on an underlay bridge (MTU 1500), one agent each on a shared
//! datastore (embedded, or etcd), each with its CNI socket and the VXLAN
//! overlay.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_testing::netns::{Netns, ip_batch};

use super::agent::{Agent, AgentSpec};
use super::palisade;

/// `ip -n NS ARGS`' output.
pub fn ip(ns: &str, args: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ip -n {ns} {args}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Polls `done` every 100 ms; panics after `timeout_s`.
pub fn wait_for(what: &str, timeout_s: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One node of the lab.
pub struct Node {
    pub ns: Netns,
    pub name: String,
    pub agent: Agent,
    /// Its agent's CNI socket.
    pub socket: PathBuf,
}

/// The lab: the underlay, the nodes, the datastore.
pub struct Lab {
    pub nodes: Vec<Node>,
    /// The embedded datastore's folder (unused on etcd).
    pub state: PathBuf,
    /// The flags naming the datastore, for `palisade` commands.
    pub store: Vec<String>,
    /// The underlay's namespace (its bridge is `br0`).
    pub fabric: Netns,
}

/// Runs `palisade ARGS STORE`; its stdout, or a panic with what it said.
pub fn on_store(store: &[String], args: &[&str]) -> String {
    let out = palisade().args(args).args(store).output().unwrap();
    assert!(
        out.status.success(),
        "palisade {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn agent(
    ns: &str,
    name: &str,
    port: u16,
    store: &[String],
    dir: &Path,
    extra: &[String],
) -> (Agent, PathBuf) {
    let socket = dir.join(format!("cni-{name}.sock"));
    let metrics = format!("127.0.0.1:{port}");
    // Tests run in parallel in one process: the namespace names them apart.
    let pins = format!("/sys/fs/bpf/palisade-test-lab-{ns}");
    let mut args: Vec<String> = [
        "--node",
        name,
        "--pin-path",
        &pins,
        "--metrics-addr",
        &metrics,
        "--cni-socket",
        socket.to_str().unwrap(),
        "--overlay",
        "vxlan",
        "--overlay-millis",
        "200",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(store.iter().cloned());
    args.extend(extra.iter().cloned());
    // An etcd cluster listens on the host's loopback, which a node's
    // namespace cannot reach: that agent runs in the host namespace and
    // works in its node's through --netns, as `palisade lab` runs them.
    let on_host = store.iter().any(|a| a == "etcd");
    if on_host {
        args.extend(["--netns".to_string(), ns.to_string()]);
    }
    let a = Agent::spawn_spec(AgentSpec {
        nsenter: (!on_host).then(|| ns.to_string()),
        args,
        metrics: metrics.parse().unwrap(),
        pins: pins.into(),
        log: dir.join(format!("agent-{name}.log")),
        env: Vec::new(),
    });
    a.wait_ready();
    (a, socket)
}

impl Lab {
    /// `names.len()` nodes (192.168.100.1, .2, ...) whose agents share
    /// the embedded datastore in `dir`, seeded with `manifests`, serving
    /// /metrics from `first_port` on (tests running at once need their
    /// own); returns once every node sees every other's tunnel.
    pub fn start(tag: &str, first_port: u16, dir: &Path, names: &[&str], manifests: &str) -> Lab {
        let state = dir.join("state");
        let store = vec!["--state-dir".to_string(), state.display().to_string()];
        Lab::start_on(tag, first_port, dir, names, manifests, store)
    }

    /// As [`Lab::start`], each agent also taking `agent_args`.
    pub fn start_with(
        tag: &str,
        first_port: u16,
        dir: &Path,
        names: &[&str],
        manifests: &str,
        agent_args: &[&str],
    ) -> Lab {
        let state = dir.join("state");
        let store = vec!["--state-dir".to_string(), state.display().to_string()];
        let extra: Vec<String> = agent_args.iter().map(|a| a.to_string()).collect();
        Lab::build(tag, first_port, dir, names, manifests, store, &extra)
    }

    /// As [`Lab::start`], on the datastore `store` names (`palisade`'s
    /// flags, e.g. `--datastore etcd --etcd-endpoints URL`).
    pub fn start_on(
        tag: &str,
        first_port: u16,
        dir: &Path,
        names: &[&str],
        manifests: &str,
        store: Vec<String>,
    ) -> Lab {
        Lab::build(tag, first_port, dir, names, manifests, store, &[])
    }

    fn build(
        tag: &str,
        first_port: u16,
        dir: &Path,
        names: &[&str],
        manifests: &str,
        store: Vec<String>,
        agent_args: &[String],
    ) -> Lab {
        let state = dir.join("state");
        let pid = std::process::id();
        std::fs::write(dir.join("cluster.yaml"), manifests).unwrap();
        on_store(
            &store,
            &["apply", "-f", dir.join("cluster.yaml").to_str().unwrap()],
        );
        let fabric = Netns::create(&format!("pal{tag}f{pid}")).unwrap();
        ip_batch(
            Some(fabric.name()),
            &["link add br0 type bridge".into(), "link set br0 up".into()],
        )
        .unwrap();
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = Netns::create(&format!("pal{tag}{i}{pid}")).unwrap();
            ip_batch(
                Some(fabric.name()),
                &[
                    format!("link add n{i} type veth peer name eth0 netns {}", ns.name()),
                    format!("link set n{i} master br0"),
                    format!("link set n{i} up"),
                ],
            )
            .unwrap();
            ip_batch(
                Some(ns.name()),
                &[
                    "link set lo up".into(),
                    format!("addr add 192.168.100.{}/24 dev eth0", i + 1),
                    "link set eth0 up".into(),
                ],
            )
            .unwrap();
            let (agent, socket) = agent(
                ns.name(),
                name,
                first_port + i as u16,
                &store,
                dir,
                agent_args,
            );
            nodes.push(Node {
                ns,
                name: name.to_string(),
                agent,
                socket,
            });
        }
        let others = names.len() - 1;
        for n in &nodes {
            wait_for(&format!("{}'s overlay", n.name), 30, || {
                n.agent.status().is_some_and(|s| {
                    s["overlay"]["nodes"]
                        .as_array()
                        .is_some_and(|a| a.len() == others && a.iter().all(|n| n["tunnel"] != ""))
                })
            });
        }
        Lab {
            nodes,
            state,
            store,
            fabric,
        }
    }
}
