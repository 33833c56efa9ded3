//! podman (Debian's 4.3, CNI network backend) as a real container runtime
//! on two nodes: one conflist per network names its namespace, labels and
//! pool (podman passes only `K8S_POD_NAME` in `CNI_ARGS`); containers get
//! addresses from their pool, and the matrix of real connections between
//! them, across nodes and on one node, is the reference engine's for the
//! same policies and endpoints; inside them the MTU is 1450, to the byte.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use super::lab::{Lab, wait_for};
use super::{palisade, privileged, scratch};

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
kind: IPPool
metadata: {name: ci}
spec: {cidr: 10.30.0.0/16, vxlanMode: Always}
";

/// Zero trust: everything denied unless a namespace policy allows it
/// (ICMP aside, for the MTU check; the matrix is TCP).
const POLICY: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {tier: frontend}}
---
apiVersion: v1
kind: Namespace
metadata: {name: backend, labels: {tier: backend}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ci, labels: {tier: ci}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec: {order: 2000, selector: all(), types: [Ingress, Egress]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-icmp}
spec:
  order: 100
  selector: all()
  types: [Ingress, Egress]
  ingress: [{action: Allow, protocol: ICMP}]
  egress: [{action: Allow, protocol: ICMP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-api, namespace: frontend}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {tier: backend}}, podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: backend}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {tier: frontend}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080, protocol: TCP}]
";

/// podman installed (the test tooling installs it).
fn podman_available() -> bool {
    if Command::new("podman").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!("podman is not installed and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("skipped: podman is not installed");
    false
}

/// One node's podman: its own storage, run directory and CNI
/// configuration, run inside the node's network namespace.
struct Podman {
    dir: PathBuf,
    node_ns: String,
}

impl Podman {
    fn new(
        dir: &Path,
        node_ns: &str,
        socket: &Path,
        networks: &[(&str, &str, &str, &str)],
    ) -> Podman {
        let dir = dir.join(format!("podman-{node_ns}"));
        let (bin, netd) = (dir.join("cni-bin"), dir.join("net.d"));
        for d in [&bin, &netd] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_palisade-cni"), bin.join("palisade-cni"))
            .unwrap();
        for (name, namespace, app, pool) in networks {
            let conflist = json!({
                "cniVersion": "1.0.0",
                "name": name,
                "plugins": [{
                    "type": "palisade-cni",
                    "agent_socket": socket,
                    "namespace": namespace,
                    "labels": {"app": app},
                    "ipam": {"type": "calico-ipam", "ipv4_pools": [pool]},
                }],
            });
            std::fs::write(netd.join(format!("{name}.conflist")), conflist.to_string()).unwrap();
        }
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                // Limits runc may set without CAP_SYS_RESOURCE (podman's
                // defaults and `--ulimit host` exceed this sandbox's hard ones).
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/cni-bin\"]\n\
                 network_config_dir = \"{d}/net.d\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\nevents_logfile_path = \"{d}/events.log\"\n\
                 static_dir = \"{d}/libpod\"\ntmp_dir = \"{d}/tmp\"\nvolume_path = \"{d}/volumes\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/run\"\n"
            ),
        )
        .unwrap();
        Podman {
            dir,
            node_ns: node_ns.to_string(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers go (their DEL releases their addresses), then storage.
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["system", "reset", "--force"]);
    }
}

/// A busybox root filesystem as a tarball (`podman import` makes the image).
fn busybox_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("busybox.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(ok.success());
    tar
}

/// A container's network namespace and address.
fn sandbox(p: &Podman, name: &str) -> (String, IpAddr) {
    let key = p.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.SandboxKey}}",
        name,
    ]);
    let out = Command::new("ip")
        .args(["netns", "exec"])
        .arg(Path::new(&key).file_name().unwrap())
        .args(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("{name} has no address: {text}"));
    (key, addr.split('/').next().unwrap().parse().unwrap())
}

fn connects(netns: &str, to: SocketAddr) -> bool {
    let file = std::fs::File::open(netns).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpStream::connect_timeout(&to, Duration::from_millis(700)).is_ok()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn podman_containers_on_two_nodes_follow_the_reference_matrix() {
    if !privileged() || !podman_available() {
        return;
    }
    let dir = scratch("podman");
    let lab = Lab::start("pm", 9120, &dir, &["node-a", "node-b"], CLUSTER);
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let out = palisade()
        .args(["apply", "-f"])
        .arg(dir.join("policy.yaml"))
        .arg("--state-dir")
        .arg(&lab.state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let networks = [
        ("frontend-web", "frontend", "web", "frontend"),
        ("backend-api", "backend", "api", "backend"),
        ("ci-runner", "ci", "runner", "ci"),
    ];
    let tar = busybox_tar(&dir);
    let podmen: Vec<Podman> = lab
        .nodes
        .iter()
        .map(|n| {
            let p = Podman::new(&dir, n.ns.name(), &n.socket, &networks);
            p.ok(&["import", tar.to_str().unwrap(), "localhost/busybox:lab"]);
            p
        })
        .collect();
    // (container, node, network): web and a runner on node-a, api and
    // another web on node-b.
    let containers = [
        ("web-a", 0, "frontend-web"),
        ("runner-a", 0, "ci-runner"),
        ("api-b", 1, "backend-api"),
        ("web-b", 1, "frontend-web"),
    ];
    let mut where_: BTreeMap<&str, (String, IpAddr)> = BTreeMap::new();
    for (name, node, net) in containers {
        podmen[node].ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "--ulimit",
            "host",
            "localhost/busybox:lab",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ]);
        where_.insert(name, sandbox(&podmen[node], name));
    }
    // Addresses from each network's pool.
    for (name, _, net) in containers {
        let want = match net {
            "frontend-web" => "10.10.",
            "backend-api" => "10.20.",
            _ => "10.30.",
        };
        assert!(
            where_[name].1.to_string().starts_with(want),
            "{name}: {:?}",
            where_[name]
        );
    }
    // Every node routes every other node's blocks before connections start.
    for n in &lab.nodes {
        wait_for("the overlay routes", 30, || {
            n.agent
                .status()
                .is_some_and(|s| s["overlay"]["routes"].as_u64() >= Some(3))
        });
    }

    // The reference engine's matrix for the stored policies and endpoints.
    let endpoints = palisade()
        .args(["get", "workloadendpoints", "-o", "yaml", "--state-dir"])
        .arg(&lab.state)
        .output()
        .unwrap();
    assert!(
        endpoints.status.success(),
        "{}",
        String::from_utf8_lossy(&endpoints.stderr)
    );
    let m = dir.join("matrix");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("policy.yaml"), POLICY).unwrap();
    std::fs::write(m.join("endpoints.yaml"), &endpoints.stdout).unwrap();
    let out = palisade()
        .args([
            "matrix",
            "--engine",
            "reference",
            "--port",
            "8080",
            "-o",
            "json",
            "-f",
        ])
        .arg(&m)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reference: BTreeMap<(String, String), bool> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let cell: Value = serde_json::from_str(line).unwrap();
        let pod = |v: &Value| {
            v.as_str()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        };
        reference.insert(
            (pod(&cell["from"]), pod(&cell["to"])),
            cell["allowed"] == true,
        );
    }

    // The real matrix: a TCP connection from every container to every other.
    let mut real = BTreeMap::new();
    let mut table = String::new();
    for (from, (ns, _)) in &where_ {
        for (to, (_, ip)) in &where_ {
            if from == to {
                continue;
            }
            let ok = connects(ns, SocketAddr::new(*ip, 8080));
            table.push_str(&format!(
                "{from:>9} -> {to:<9} {}\n",
                if ok { "allowed" } else { "denied" }
            ));
            real.insert((from.to_string(), to.to_string()), ok);
        }
    }
    let expected: BTreeMap<_, _> = real
        .keys()
        .map(|k| {
            (
                k.clone(),
                reference
                    .get(k)
                    .copied()
                    .unwrap_or_else(|| panic!("{k:?} not in {reference:?}")),
            )
        })
        .collect();
    assert_eq!(real, expected, "real connections:\n{table}");
    // And the policy allows something, across nodes: web-a -> api-b.
    assert!(real[&("web-a".to_string(), "api-b".to_string())], "{table}");
    assert!(
        !real[&("runner-a".to_string(), "api-b".to_string())],
        "{table}"
    );

    // MTU 1450 inside the containers, across the overlay: the largest DF
    // ping that fits (1422 bytes of payload) passes, one byte more fails.
    let (web_sandbox, _) = &where_["web-a"];
    let (_, api_b) = where_["api-b"];
    let in_sandbox = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec"])
            .arg(Path::new(web_sandbox).file_name().unwrap())
            .args(args)
            .output()
            .unwrap()
    };
    let mtu = in_sandbox(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1450");
    let df_ping = |payload: usize| {
        let size = payload.to_string();
        let to = api_b.to_string();
        in_sandbox(&["ping", "-M", "do", "-c", "1", "-W", "2", "-s", &size, &to])
            .status
            .success()
    };
    assert!(df_ping(1422), "a 1450-byte DF packet from web-a to api-b");
    assert!(!df_ping(1423), "a 1451-byte DF packet does not fit");

    // Removing containers releases their addresses (CNI DEL).
    for (name, node, _) in containers {
        podmen[node].ok(&["rm", "--force", "--time", "0", name]);
    }
    let out = palisade()
        .args(["ipam", "check", "--state-dir"])
        .arg(&lab.state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Only the two nodes' tunnel addresses remain.
    assert!(
        text.contains("2 allocated addresses") && text.contains("\n0 findings"),
        "{text}"
    );
}
