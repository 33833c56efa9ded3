//! A cluster on one machine: nodes as network namespaces on an underlay
//! bridge, a `palisade agent` per node (in the host namespace, working in
//! its node's through `--netns`, so every agent's /metrics is on this
//! host's loopback), a shared datastore (a local etcd member, or the
//! embedded store), and pods added through `palisade-cni` as a runtime
//! would. The demo, the CNI benchmark and `palisade lab` drive it.
//!
//! ```text
//!  host: etcd 127.0.0.1:N   agent node-a :9201   agent node-b :9202
//!          │                    │ --netns             │ --netns
//!  ┌───────┴─ underlay bridge (palXf) 192.168.100.0/24, MTU 1500 ─┐
//!  node-a (.1) vxlan.calico ── cali… ── pod        node-b (.2) ...
//! ```
//!
//! Everything is removed on drop (pods deleted through CNI, agents
//! stopped, pins, namespaces, etcd), also after a failed start.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use policy_core::model::EndpointKey;
use serde_json::{Value, json};

use crate::etcd::EtcdCluster;
use crate::netns::{Netns, ip_batch};

/// Lab failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A step failed.
    #[error("{step}: {message}")]
    Step {
        /// What was being done.
        step: String,
        /// What happened.
        message: String,
    },
}

fn fail(step: impl Into<String>, e: impl std::fmt::Display) -> LabError {
    LabError::Step {
        step: step.into(),
        message: e.to_string(),
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Scratch folder (state, logs, sockets); created, left for reading.
    pub dir: PathBuf,
    /// Node names.
    pub nodes: Vec<String>,
    /// A local etcd member for the datastore (else the embedded store).
    pub etcd: bool,
    /// The `palisade` binary.
    pub palisade: PathBuf,
    /// The `palisade-cni` binary.
    pub cni: PathBuf,
    /// Node `i`'s agent serves /metrics on 127.0.0.1:`first_port + i`.
    pub first_port: u16,
    /// Namespace name prefix (short: names are limited to 15 bytes with
    /// the process id).
    pub tag: String,
    /// The underlay's MTU.
    pub underlay_mtu: u32,
}

/// A node: its namespace and agent.
#[derive(Debug)]
pub struct LabNode {
    /// Its name.
    pub name: String,
    /// Its network namespace.
    pub ns: Netns,
    /// Where its agent serves /metrics and /status.
    pub metrics: SocketAddr,
    /// Its agent's CNI socket.
    pub socket: PathBuf,
    /// Its agent's log.
    pub log: PathBuf,
    pins: PathBuf,
    child: Option<Child>,
}

/// A pod added through CNI.
#[derive(Debug)]
pub struct LabPod {
    /// Namespace and name.
    pub key: EndpointKey,
    /// The node it runs on (index).
    pub node: usize,
    /// Its network namespace.
    pub ns: Netns,
    /// Its address.
    pub addr: IpAddr,
    /// The CNI container ID.
    pub container: String,
    conf: Value,
}

/// The running lab.
#[derive(Debug)]
pub struct Lab {
    /// The nodes.
    pub nodes: Vec<LabNode>,
    /// The pods.
    pub pods: Vec<LabPod>,
    cfg: LabConfig,
    etcd: Option<EtcdCluster>,
    fabric: Option<Netns>,
}

/// A GET on an agent's HTTP endpoint: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), LabError> {
    let step = format!("GET {addr}{path}");
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| fail(&step, e))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(&step, e))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| fail(&step, e))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| fail(&step, e))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail(&step, "no header end"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| fail(&step, "no status code"))?;
    Ok((code, body.to_string()))
}

/// Polls `done` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(fail(what, format!("not within {} s", timeout.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl Lab {
    /// Builds the lab; `progress` hears each step.
    pub fn start(cfg: LabConfig, progress: &dyn Fn(&str)) -> Result<Lab, LabError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| fail("creating the lab folder", e))?;
        let mut lab = Lab {
            nodes: Vec::new(),
            pods: Vec::new(),
            cfg,
            etcd: None,
            fabric: None,
        };
        let pid = std::process::id();
        if lab.cfg.etcd {
            progress("starting a local etcd member (the shared datastore)");
            lab.etcd = Some(
                EtcdCluster::start(&lab.cfg.dir.join("etcd"), 1, None)
                    .map_err(|e| fail("starting etcd", e))?,
            );
        }
        progress("creating the underlay: a bridge, MTU 1500");
        let fabric =
            Netns::create(&format!("{}f{pid}", lab.cfg.tag)).map_err(|e| fail("underlay", e))?;
        ip_batch(
            Some(fabric.name()),
            &["link add br0 type bridge".into(), "link set br0 up".into()],
        )
        .map_err(|e| fail("underlay", e))?;
        let fabric_name = fabric.name().to_string();
        lab.fabric = Some(fabric);
        for i in 0..lab.cfg.nodes.len() {
            let name = lab.cfg.nodes[i].clone();
            progress(&format!(
                "node {name}: namespace, underlay address 192.168.100.{}, agent",
                i + 1
            ));
            let ns =
                Netns::create(&format!("{}{i}{pid}", lab.cfg.tag)).map_err(|e| fail(&name, e))?;
            let mtu = lab.cfg.underlay_mtu;
            ip_batch(
                Some(&fabric_name),
                &[
                    format!(
                        "link add n{i} mtu {mtu} type veth peer name eth0 netns {}",
                        ns.name()
                    ),
                    format!("link set n{i} master br0"),
                    format!("link set n{i} up"),
                ],
            )
            .map_err(|e| fail(&name, e))?;
            ip_batch(
                Some(ns.name()),
                &[
                    "link set lo up".into(),
                    format!("addr add 192.168.100.{}/24 dev eth0", i + 1),
                    "link set eth0 up".into(),
                ],
            )
            .map_err(|e| fail(&name, e))?;
            let node = lab.spawn_agent(i, name, ns)?;
            lab.nodes.push(node);
        }
        for n in &lab.nodes {
            wait_until(
                &format!("agent {} ready", n.name),
                Duration::from_secs(60),
                || http_get(n.metrics, "/readyz").is_ok_and(|(c, _)| c == 200),
            )
            .map_err(|e| fail(format!("{e}; log {}", n.log.display()), ""))?;
        }
        Ok(lab)
    }

    /// The datastore flags every `palisade` command of this lab takes.
    pub fn store_args(&self) -> Vec<String> {
        match &self.etcd {
            Some(e) => vec![
                "--datastore".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                e.endpoint(0),
            ],
            None => vec![
                "--state-dir".into(),
                self.cfg.dir.join("state").display().to_string(),
            ],
        }
    }

    fn spawn_agent(&self, i: usize, name: String, ns: Netns) -> Result<LabNode, LabError> {
        let port = self.cfg.first_port + i as u16;
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let socket = self.cfg.dir.join(format!("cni-{name}.sock"));
        let log = self.cfg.dir.join(format!("agent-{name}.log"));
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-lab-{}-{name}",
            std::process::id()
        ));
        let logfile = std::fs::File::create(&log).map_err(|e| fail(&name, e))?;
        let child = Command::new(&self.cfg.palisade)
            .arg("agent")
            .args(["--node", &name, "--netns", ns.name()])
            .arg("--pin-path")
            .arg(&pins)
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--cni-socket")
            .arg(&socket)
            .args(["--overlay-millis", "250", "--ipam-metrics-seconds", "2"])
            .args(self.store_args())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .map_err(|e| fail(format!("starting the agent of {name}"), e))?;
        Ok(LabNode {
            name,
            ns,
            metrics,
            socket,
            log,
            pins,
            child: Some(child),
        })
    }

    /// `palisade ARGS` against the lab's datastore; its stdout.
    pub fn palisade(&self, args: &[&str]) -> Result<String, LabError> {
        let out = Command::new(&self.cfg.palisade)
            .args(args)
            .args(self.store_args())
            .output()
            .map_err(|e| fail(format!("palisade {}", args.join(" ")), e))?;
        if !out.status.success() {
            return Err(fail(
                format!("palisade {}", args.join(" ")),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// A node's agent status (its JSON).
    pub fn status(&self, node: usize) -> Result<Value, LabError> {
        let (_, body) = http_get(self.nodes[node].metrics, "/status")?;
        serde_json::from_str(&body).map_err(|e| fail("status", e))
    }

    /// Waits until every node reaches every other's tunnel and routes at
    /// least `routes` overlay routes.
    pub fn wait_overlay(&self, routes: u64) -> Result<(), LabError> {
        let others = self.nodes.len() as u64 - 1;
        for i in 0..self.nodes.len() {
            wait_until(
                &format!("the overlay of {}", self.nodes[i].name),
                Duration::from_secs(60),
                || {
                    self.status(i).is_ok_and(|s| {
                        let o = &s["overlay"];
                        o["nodes"].as_array().is_some_and(|a| {
                            a.len() as u64 == others && a.iter().all(|n| n["tunnel"] != "")
                        }) && o["routes"].as_u64() >= Some(routes)
                    })
                },
            )?;
        }
        Ok(())
    }

    /// Adds pod `key` on node `node` through CNI with these labels and
    /// pools; it listens on `ports` (TCP, accepting and closing).
    pub fn add_pod(
        &mut self,
        node: usize,
        key: EndpointKey,
        labels: &serde_json::Map<String, Value>,
        pools: &[String],
        ports: &[u16],
    ) -> Result<&LabPod, LabError> {
        let step = format!("pod {key}");
        let n = self.pods.len();
        let ns = Netns::create(&format!("{}p{n}x{}", self.cfg.tag, std::process::id()))
            .map_err(|e| fail(&step, e))?;
        let container = format!("{}-{}-{n}", key.namespace, key.name);
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("lab-{}", key.namespace),
            "type": "palisade-cni",
            "agent_socket": self.nodes[node].socket,
            "namespace": key.namespace,
            "labels": labels,
            "ipam": {"type": "calico-ipam", "ipv4_pools": pools},
        });
        let result = cni(
            &self.cfg.cni,
            "ADD",
            &container,
            Some(ns.name()),
            &key,
            &conf,
        )
        .map_err(|e| fail(&step, e))?;
        let addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| fail(&step, format!("no address in {result}")))?;
        for port in ports {
            let listener = ns
                .run(|| TcpListener::bind((addr, *port)))
                .map_err(|e| fail(&step, e))?
                .map_err(|e| fail(&step, e))?;
            std::thread::spawn(move || {
                for c in listener.incoming() {
                    drop(c);
                }
            });
        }
        self.pods.push(LabPod {
            key,
            node,
            ns,
            addr,
            container,
            conf,
        });
        Ok(&self.pods[n])
    }

    /// Whether a TCP connection from pod `from` to `to:port` is set up
    /// within `timeout`.
    pub fn connects(&self, from: usize, to: IpAddr, port: u16, timeout: Duration) -> bool {
        self.pods[from]
            .ns
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout).is_ok())
            .unwrap_or(false)
    }
}

/// Runs `palisade-cni` as a runtime would; its result JSON, or its error.
pub fn cni(
    bin: &Path,
    command: &str,
    container: &str,
    netns: Option<&str>,
    key: &EndpointKey,
    conf: &Value,
) -> Result<Value, String> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                key.namespace, key.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", format!("/run/netns/{ns}"));
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(text);
    }
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.pods.drain(..) {
            let _ = cni(
                &self.cfg.cni,
                "DEL",
                &p.container,
                Some(p.ns.name()),
                &p.key,
                &p.conf,
            );
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&n.pins);
        }
        // Namespaces, then etcd, go with their fields.
        self.nodes.clear();
        self.fabric = None;
        self.etcd = None;
    }
}
