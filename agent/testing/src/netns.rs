//! One node built out of network namespaces: a `node` namespace holding the
//! host side of every pod's veth (where the TC programs attach), one
//! namespace per pod, and an `external` namespace for addresses outside the
//! cluster. Wiring follows Calico: every host veth has MAC
//! `ee:ee:ee:ee:ee:ee`, pods route everything through a link-local gateway
//! (169.254.1.1 / fe80::1) with a static neighbour entry, and the node has a
//! /32 or /128 route per pod address, so no ARP or NDP is needed.
//!
//! Everything is created with `ip` (iproute2) in batches and deleted on drop,
//! including after a failed setup. Sockets are opened inside a namespace by a
//! short-lived thread that joins it; the socket stays in that namespace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};
use policy_core::model::EndpointKey;

/// MAC address of every host-side veth (as Calico uses).
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// [`HOST_MAC`] as bytes.
pub const HOST_MAC_BYTES: [u8; 6] = [0xee; 6];
/// IPv4 gateway pods route through.
pub const GATEWAY_V4: &str = "169.254.1.1";
/// IPv6 gateway pods route through.
pub const GATEWAY_V6: &str = "fe80::1";
/// Preference of the external namespace's rules for its own connections
/// to a served address of its own: before the local table's, which moves
/// from 0 to [`LOCAL_RULE`].
const EXTERNAL_FRONTEND_RULE: u32 = 10;
/// Where the external namespace's local-table rule moves.
const LOCAL_RULE: u32 = 20;
/// Routing table of those connections: out to the node.
const EXTERNAL_FRONTEND_TABLE: u32 = 110;

/// Namespace and wiring failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// The arguments (and batch lines).
        args: String,
        /// What `ip` said.
        stderr: String,
    },
    /// A namespace could not be entered or configured.
    #[error("network namespace {ns}: {message}")]
    Namespace {
        /// Namespace name.
        ns: String,
        /// What happened.
        message: String,
    },
    /// The topology cannot represent an address.
    #[error("{0}")]
    Unusable(String),
}

/// Runs `ip` with batch lines on stdin, optionally inside a namespace.
pub fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), NetnsError> {
    ip_batch_family(netns, false, lines)
}

/// As [`ip_batch`], with `ip -6` when `v6` (a batch line cannot say it;
/// `rule` lines take the family from it).
fn ip_batch_family(netns: Option<&str>, v6: bool, lines: &[String]) -> Result<(), NetnsError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(n) = netns {
        cmd.args(["-n", n]);
    }
    if v6 {
        cmd.arg("-6");
    }
    cmd.args(["-b", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let describe = || {
        format!(
            "{}-b - <<< {}",
            netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
            lines.join("; ")
        )
    };
    let mut child = cmd.spawn().map_err(|e| NetnsError::Ip {
        args: describe(),
        stderr: format!("cannot run ip: {e}"),
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        let text = lines.join("\n") + "\n";
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| NetnsError::Ip {
                args: describe(),
                stderr: e.to_string(),
            })?;
    }
    let out = child.wait_with_output().map_err(|e| NetnsError::Ip {
        args: describe(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NetnsError::Ip {
            args: describe(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// Creates a namespace (an existing one of the same name is replaced).
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        let _ = ip_batch(None, &[format!("netns del {name}")]);
        ip_batch(None, &[format!("netns add {name}")])?;
        let file = File::open(format!("/run/netns/{name}")).map_err(|e| NetnsError::Namespace {
            ns: name.to_string(),
            message: e.to_string(),
        })?;
        Ok(Netns {
            name: name.to_string(),
            file,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it opens
    /// and interfaces it looks up belong to the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Namespace {
                    ns: self.name.clone(),
                    message: format!("setns: {e}"),
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Namespace {
                ns: self.name.clone(),
                message: "a thread inside the namespace panicked".into(),
            })?
        })
    }

    /// Moves the calling thread into this namespace for the rest of its
    /// life (for a process whose main thread only works there: [`Netns::run`]
    /// is the scoped form).
    pub fn enter(&self) -> Result<(), NetnsError> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Namespace {
            ns: self.name.clone(),
            message: format!("setns: {e}"),
        })
    }

    /// Sets a sysctl under /proc/sys/net as seen from this namespace.
    pub fn sysctl(&self, path: &str, value: &str) -> Result<(), NetnsError> {
        let full = format!("/proc/sys/net/{path}");
        self.run(|| std::fs::write(&full, value))?
            .map_err(|e| NetnsError::Namespace {
                ns: self.name.clone(),
                message: format!("{full} = {value}: {e}"),
            })
    }

    /// The index of an interface in this namespace.
    pub fn ifindex(&self, iface: &str) -> Result<u32, NetnsError> {
        self.run(|| nix::net::if_::if_nametoindex(iface))?
            .map_err(|e| NetnsError::Namespace {
                ns: self.name.clone(),
                message: format!("interface {iface}: {e}"),
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip_batch(None, &[format!("netns del {}", self.name)]);
    }
}

/// Whether real unicast traffic can use an address (multicast, loopback,
/// link-local, unspecified and broadcast addresses cannot be a pod's).
pub fn routable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local()
                || a.octets()[0] == 0)
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

/// A locally administered MAC: kind `kind`, number `i`.
fn mac_bytes(kind: u8, i: usize) -> [u8; 6] {
    [0x02, 0x50, kind, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn mac(kind: u8, i: usize) -> String {
    let b = mac_bytes(kind, i);
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

/// Where an address lives in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A pod (index into [`Topology::pods`]).
    Pod(usize),
    /// The external namespace.
    External,
}

/// A pod's namespace and its host-side interface.
#[derive(Debug)]
pub struct PodNet {
    /// The endpoint.
    pub key: EndpointKey,
    /// Its namespace.
    pub ns: Netns,
    /// Host-side veth name (in the node namespace).
    pub host_if: String,
    /// Host-side veth index.
    pub ifindex: u32,
    /// Addresses configured on the pod's eth0.
    pub ips: Vec<IpAddr>,
    /// MAC of the pod's eth0.
    pub mac: [u8; 6],
}

impl PodNet {
    /// The pod as a local delivery target (see
    /// [`policy_bpf::datapath::Datapath::set_local_endpoint`]).
    pub fn local_endpoint(&self) -> policy_bpf_common::LocalEndpoint {
        policy_bpf_common::LocalEndpoint {
            ifindex: self.ifindex,
            pod_mac: self.mac,
            host_mac: HOST_MAC_BYTES,
        }
    }
}

/// A node with pods, built from namespaces.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: pods and the external namespace go first,
    // then the node (whose deletion removes the host veths).
    pods: Vec<PodNet>,
    external: Netns,
    external_ips: HashSet<IpAddr>,
    /// The families (IPv6: true) whose external rules were moved for
    /// [`Topology::add_external_frontend`].
    external_frontend_rules: HashSet<bool>,
    owners: HashMap<IpAddr, Owner>,
    by_key: BTreeMap<EndpointKey, usize>,
    unusable: HashMap<IpAddr, String>,
    node: Netns,
}

static TOPOLOGIES: AtomicU32 = AtomicU32::new(0);

impl Topology {
    /// Every pod address with its pod as a local delivery target, as a CNI
    /// would register them.
    pub fn local_endpoints(&self) -> Vec<(IpAddr, policy_bpf_common::LocalEndpoint)> {
        self.pods
            .iter()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.local_endpoint())))
            .collect()
    }

    /// Builds the node, a namespace per pod (with its addresses) and the
    /// external namespace. Addresses that real traffic cannot use, or that
    /// two pods claim, are left out and reported by [`Topology::owner`].
    pub fn build(pods: &[(EndpointKey, Vec<IpAddr>)]) -> Result<Topology, NetnsError> {
        Self::build_named(pods, |i, _| format!("p{i}"))
    }

    /// [`Topology::build`] with each pod's host-side interface named by
    /// `host_name(index, key)` (as a CNI plugin names it).
    pub fn build_named(
        pods: &[(EndpointKey, Vec<IpAddr>)],
        host_name: impl Fn(usize, &EndpointKey) -> String,
    ) -> Result<Topology, NetnsError> {
        let n = TOPOLOGIES.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pal{}-{n}", std::process::id());
        let node = Netns::create(&format!("{prefix}-node"))?;
        let external = Netns::create(&format!("{prefix}-ext"))?;
        let mut topo = Topology {
            pods: Vec::new(),
            external,
            external_ips: HashSet::new(),
            external_frontend_rules: HashSet::new(),
            owners: HashMap::new(),
            by_key: BTreeMap::new(),
            unusable: HashMap::new(),
            node,
        };
        for (path, value) in [
            ("ipv4/ip_forward", "1"),
            ("ipv6/conf/all/forwarding", "1"),
            ("ipv4/conf/all/rp_filter", "0"),
            ("ipv4/conf/default/rp_filter", "0"),
        ] {
            topo.node.sysctl(path, value)?;
        }
        let mut claims: HashMap<IpAddr, usize> = HashMap::new();
        for (_, ips) in pods {
            for ip in ips {
                *claims.entry(*ip).or_insert(0) += 1;
            }
        }
        let mut node_lines = vec!["link set lo up".to_string()];
        node_lines.push(format!(
            "link add ext address {HOST_MAC} type veth peer name eth0 netns {} address {}",
            topo.external.name(),
            mac(0xff, 0)
        ));
        node_lines.push("link set ext up".into());
        let mut pod_lines = Vec::new();
        for (i, (key, ips)) in pods.iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-p{i}"))?;
            let host_if = host_name(i, key);
            let pod_mac = mac(0, i);
            node_lines.push(format!(
                "link add {host_if} address {HOST_MAC} type veth peer name eth0 netns {} address {pod_mac}",
                ns.name()
            ));
            node_lines.push(format!("link set {host_if} up"));
            let mut usable = Vec::new();
            for ip in ips {
                if !routable(ip) {
                    topo.unusable
                        .insert(*ip, format!("{ip} cannot carry unicast traffic"));
                } else if claims[ip] > 1 {
                    topo.unusable
                        .insert(*ip, format!("{ip} belongs to more than one pod"));
                } else {
                    usable.push(*ip);
                    topo.owners.insert(*ip, Owner::Pod(i));
                    node_lines.push(format!("route add {} dev {host_if}", host_prefix(ip)));
                    node_lines.push(format!(
                        "neigh add {ip} lladdr {pod_mac} dev {host_if} nud permanent"
                    ));
                }
            }
            pod_lines.push((ns.name().to_string(), Self::pod_wiring(&usable)));
            topo.by_key.insert(key.clone(), i);
            topo.pods.push(PodNet {
                key: key.clone(),
                ns,
                host_if,
                ifindex: 0,
                ips: usable,
                mac: mac_bytes(0, i),
            });
        }
        ip_batch(Some(topo.node.name()), &node_lines)?;
        ip_batch(Some(topo.external.name()), &Self::pod_wiring(&[]))?;
        for (ns, lines) in &pod_lines {
            ip_batch(Some(ns), lines)?;
        }
        for i in 0..topo.pods.len() {
            let idx = topo.node.ifindex(&topo.pods[i].host_if)?;
            topo.pods[i].ifindex = idx;
        }
        Ok(topo)
    }

    fn pod_wiring(ips: &[IpAddr]) -> Vec<String> {
        let mut l = vec!["link set lo up".to_string(), "link set eth0 up".to_string()];
        for ip in ips {
            // No duplicate address detection: addresses are usable at once.
            l.push(match ip {
                IpAddr::V4(_) => format!("addr add {} dev eth0", host_prefix(ip)),
                IpAddr::V6(_) => format!("addr add {} dev eth0 nodad", host_prefix(ip)),
            });
        }
        l.push(format!("route add {GATEWAY_V4}/32 dev eth0 scope link"));
        l.push(format!("route add default via {GATEWAY_V4} dev eth0"));
        l.push(format!(
            "neigh add {GATEWAY_V4} lladdr {HOST_MAC} dev eth0 nud permanent"
        ));
        l.push(format!("route add ::/0 via {GATEWAY_V6} dev eth0"));
        l.push(format!(
            "neigh add {GATEWAY_V6} lladdr {HOST_MAC} dev eth0 nud permanent"
        ));
        l
    }

    /// Makes `ip` an address of the external namespace (routed from the node).
    pub fn add_external(&mut self, ip: IpAddr) -> Result<(), NetnsError> {
        if self.external_ips.contains(&ip) {
            return Ok(());
        }
        if let Some(why) = self.unusable.get(&ip) {
            return Err(NetnsError::Unusable(why.clone()));
        }
        if !routable(&ip) {
            return Err(NetnsError::Unusable(format!(
                "{ip} cannot carry unicast traffic"
            )));
        }
        if let Some(Owner::Pod(i)) = self.owners.get(&ip) {
            return Err(NetnsError::Unusable(format!(
                "{ip} is pod {}'s address, not an external one",
                self.pods[*i].key
            )));
        }
        let ext_mac = mac(0xff, 0);
        ip_batch(
            Some(self.external.name()),
            &[match ip {
                IpAddr::V4(_) => format!("addr add {} dev eth0", host_prefix(&ip)),
                IpAddr::V6(_) => format!("addr add {} dev eth0 nodad", host_prefix(&ip)),
            }],
        )?;
        ip_batch(
            Some(self.node.name()),
            &[
                format!("route add {} dev ext", host_prefix(&ip)),
                format!("neigh add {ip} lladdr {ext_mac} dev ext nud permanent"),
            ],
        )?;
        self.external_ips.insert(ip);
        self.owners.insert(ip, Owner::External);
        Ok(())
    }

    /// Makes `ip` an external address that is also one the node serves
    /// (a load balancer's IP, which it SNATs the clients it forwards to):
    /// the external namespace's own connections to `ip` leave for the
    /// node instead of being delivered locally, and the answers, from
    /// `ip` to `ip`, are taken in. Others' connections to `ip` still go
    /// to the node (its route for `ip` only carries the answers back).
    pub fn add_external_frontend(&mut self, ip: IpAddr) -> Result<(), NetnsError> {
        self.add_external(ip)?;
        // A rule before the local table's (moved after it), for locally
        // sent packets only (`iif lo`): arriving ones, from the node, are
        // delivered.
        let (v6, all, gateway) = match ip {
            IpAddr::V4(_) => (false, "0.0.0.0/0", GATEWAY_V4),
            IpAddr::V6(_) => (true, "::/0", GATEWAY_V6),
        };
        let table = EXTERNAL_FRONTEND_TABLE;
        let mut lines = Vec::new();
        if !self.external_frontend_rules.contains(&v6) {
            lines.push(format!("rule add pref {LOCAL_RULE} lookup local"));
            lines.push("rule del pref 0 lookup local".to_string());
            lines.push(format!(
                "route add {all} via {gateway} dev eth0 table {table}"
            ));
        }
        lines.push(format!(
            "rule add to {} iif lo pref {EXTERNAL_FRONTEND_RULE} lookup {table}",
            host_prefix(&ip)
        ));
        ip_batch_family(Some(self.external.name()), v6, &lines)?;
        self.external_frontend_rules.insert(v6);
        // The answers carry a source address of this namespace.
        self.external.sysctl("ipv4/conf/eth0/accept_local", "1")
    }

    /// Who holds an address, or why no one can.
    pub fn owner(&self, ip: &IpAddr) -> Result<Owner, NetnsError> {
        if let Some(why) = self.unusable.get(ip) {
            return Err(NetnsError::Unusable(why.clone()));
        }
        self.owners
            .get(ip)
            .copied()
            .ok_or_else(|| NetnsError::Unusable(format!("no namespace holds {ip}")))
    }

    /// The namespace of an owner.
    pub fn netns(&self, owner: Owner) -> &Netns {
        match owner {
            Owner::Pod(i) => &self.pods[i].ns,
            Owner::External => &self.external,
        }
    }

    /// The node namespace (host veths, where programs attach).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The pods.
    pub fn pods(&self) -> &[PodNet] {
        &self.pods
    }

    /// A pod by endpoint key.
    pub fn pod(&self, key: &EndpointKey) -> Option<&PodNet> {
        self.by_key.get(key).map(|i| &self.pods[*i])
    }
}
