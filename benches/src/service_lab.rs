//! Services for the service reports: N ClusterIP Services of
//! [`ENDPOINTS`] endpoints each (the manifests and the node's
//! [`ServiceTable`] built from them), and a node that balances them with
//! real traffic ([`ServiceLab`]): a client pod and a server pod over veths
//! ([`palisade_testing::netns::Topology`]), every endpoint address an
//! address of the server pod, and one of four balancers on the node:
//! none (the client connects to the endpoints directly), Palisade's
//! service program on the host veths (and its socket hooks, which may
//! balance the client pod's TCP at `connect()` instead), or kube-proxy's
//! rules for the same Services in its iptables or nftables mode
//! ([`crate::kube_proxy`]).
//!
//! ```
//! use palisade_benches::service_lab::{ENDPOINTS, endpoint, table, vip};
//! let t = table(3).unwrap();
//! assert_eq!(t.services.len(), 3);
//! assert_eq!(t.services[0].cluster.len(), ENDPOINTS);
//! assert_eq!(vip(0).to_string(), "172.30.0.1");
//! assert_eq!(endpoint(1, 2).to_string(), "10.64.0.34");
//! ```

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result};
use palisade_services::topology::NodeTopology;
use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use palisade_testing::cgroup::TestCgroup;
use palisade_testing::netns::{Netns, Topology, ip_batch};
use policy_bpf::datapath::{Datapath, Hook, SocketNetns, current_netns_cookie};
use policy_bpf::lower::Capacity;
use policy_bpf::services::ServiceCapacity;
use policy_bpf_common::Statistic;
use policy_core::model::EndpointKey;
use serde_json::{Value, json};

use crate::dataplane::{CLIENT, SERVER};
use crate::kube_proxy::{iptables_full, kp_services, nft_full};
use crate::veth::{Connects, raise_conntrack_limit, run_in, tcp_connects};

/// Endpoints per Service.
pub const ENDPOINTS: usize = 10;
/// The Services' port.
pub const SERVICE_PORT: u16 = 80;
/// The endpoints' port.
pub const TARGET_PORT: u16 = 8080;
/// The cluster's pod addresses: the client's is one, so its connections
/// to a Service are not masqueraded (pod to Service), by any balancer.
pub const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// Every endpoint address ([`endpoint`]) of up to [`MAX_SERVICES`]
/// Services.
pub const ENDPOINT_RANGE: &str = "10.64.0.0/13";
/// The most Services whose endpoints fit [`ENDPOINT_RANGE`].
pub const MAX_SERVICES: usize = 1 << 14;

/// Service `i`'s ClusterIP (172.30.0.0/16).
pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Service `i`'s endpoint `e`: 10.64.0.0 + 32 i + e.
pub fn endpoint(i: usize, e: usize) -> Ipv4Addr {
    let n = (i * 32 + e) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n)
}

/// The manifests of `n` Services (`bench/svc<i>`, port 80/TCP named
/// `http`) with an EndpointSlice each: [`ENDPOINTS`] ready endpoints on
/// another node, target port 8080.
pub fn docs(n: usize) -> Vec<Value> {
    assert!(n <= MAX_SERVICES, "at most {MAX_SERVICES} Services");
    let mut out = Vec::with_capacity(2 * n);
    for i in 0..n {
        let name = format!("svc{i}");
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": vip(i).to_string(),
                     "ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]}}));
        let endpoints: Vec<Value> = (0..ENDPOINTS)
            .map(|e| {
                json!({"addresses": [endpoint(i, e).to_string()], "nodeName": "node-b",
                            "conditions": {"ready": true}})
            })
            .collect();
        out.push(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}]}),
        );
    }
    out
}

/// The node's proxy configuration (node `node-a`, [`CLUSTER_CIDR`]).
pub fn config() -> Result<ProxyConfig> {
    Ok(ProxyConfig {
        family: Family::V4,
        node: NodeTopology {
            name: "node-a".into(),
            zone: None,
            prefer_same_node: true,
        },
        node_ips: vec!["192.168.0.2".parse()?],
        cluster_cidrs: vec![CLUSTER_CIDR.parse()?],
        service_cidrs: vec!["172.30.0.0/16".parse()?],
        masquerade_all: false,
        node_port_addresses: vec![],
    })
}

/// The node's service table for [`docs`]`(n)`.
pub fn table(n: usize) -> Result<ServiceTable> {
    let objects = Objects::from_documents(&docs(n))?;
    Ok(ServiceTable::build(
        config()?,
        &objects.service_ports(Family::V4)?,
    ))
}

/// What balances the Services on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    /// Nothing: no rules, no programs; the client connects to the
    /// endpoints' addresses (the baseline).
    Direct,
    /// Palisade's service program at the TC ingress of both host veths
    /// (no policy program: it applies both halves of the NAT), and its
    /// socket hooks on a cgroup of their own with the client's namespace
    /// listed, which balance the client's TCP at `connect()` when it
    /// joins that cgroup ([`Via::AtConnect`]).
    Palisade,
    /// kube-proxy's iptables-mode rules (`iptables-restore`).
    Iptables,
    /// kube-proxy's nftables-mode rules (`nft -f`).
    Nftables,
    /// No balancer: a program that only passes packets
    /// (`palisade_pass`) where Palisade's lab has its service program,
    /// and the client connects to the endpoints as in [`Balancer::Direct`]:
    /// what any per-packet TC design pays before doing anything.
    EmptyProgram,
    /// No balancer: the NAT-state floor (`palisade_nat_floor`) where
    /// Palisade's lab has its service program, and the client connects
    /// to the endpoints: every packet's tuple looked up in a NAT table
    /// sized as Palisade's, two entries recorded for each new connection,
    /// nothing translated. What any per-packet design that keeps
    /// conntrack's state pays before deciding or rewriting anything.
    NatFloor,
}

impl Balancer {
    /// Every balancer, the baseline first.
    pub const ALL: [Balancer; 6] = [
        Balancer::Direct,
        Balancer::Palisade,
        Balancer::Iptables,
        Balancer::Nftables,
        Balancer::EmptyProgram,
        Balancer::NatFloor,
    ];

    /// Whether the client connects to the endpoints (no Service on the
    /// node to balance).
    pub fn to_endpoints(self) -> bool {
        matches!(
            self,
            Balancer::Direct | Balancer::EmptyProgram | Balancer::NatFloor
        )
    }

    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Balancer::Direct => "direct",
            Balancer::Palisade => "palisade",
            Balancer::Iptables => "iptables",
            Balancer::Nftables => "nftables",
            Balancer::EmptyProgram => "empty-program",
            Balancer::NatFloor => "nat-floor",
        }
    }
}

/// Palisade's NAT entries: two per connection, room for every connection
/// a lab makes in a report (as the kernel's conntrack limit is raised for
/// the rule-based labs), so the LRU never evicts.
pub const NAT_ENTRIES: usize = 2_097_152;

/// Where the client's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// To the ClusterIPs, as the lab's balancer takes them (Palisade's:
    /// every packet translated by the service program, as the agent
    /// balances pods), or for [`Balancer::Direct`] to the endpoints.
    Balancer,
    /// Palisade's lab: to the ClusterIPs from inside the socket hooks'
    /// cgroup, so each connection is pointed at a backend at `connect()`
    /// and no packet is translated.
    AtConnect,
    /// To the endpoints' own addresses, past whatever the balancer has on
    /// the way.
    Endpoints,
}

/// Palisade's programs in place ([`ServiceLab::program_time`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgramTime {
    /// The service program's nanoseconds a run.
    pub ns_a_run: f64,
    /// Its runs a connection.
    pub runs_a_connection: f64,
    /// The `connect()` hook's nanoseconds a connection (0 where the client
    /// is outside its cgroup).
    pub connect_hook_ns: f64,
}

/// One run of [`ServiceLab::connects`].
#[derive(Debug, Clone, Default)]
pub struct ServiceRun {
    /// The client's connections and the server's accepts.
    pub connects: Connects,
    /// Connections Palisade's service program translated (its
    /// `ServiceNat` statistic; 0 for the other balancers).
    pub translated: u64,
    /// Connections Palisade's socket hooks balanced at `connect()`.
    pub balanced_at_connect: u64,
    /// Connections Palisade translated without room to record them
    /// (`ServiceNatFull`; 0 in a fair run).
    pub nat_full: u64,
}

/// A node with a client pod, a server pod holding every endpoint address,
/// and one balancer for N Services.
#[derive(Debug)]
pub struct ServiceLab {
    balancer: Balancer,
    // Drop order: the datapath (and its hooks) before their cgroup, both
    // before the namespaces.
    datapath: Option<Datapath>,
    /// The cgroup of Palisade's socket hooks, which the client joins for
    /// [`Via::Balancer`].
    cgroup: Option<TestCgroup>,
    topo: Topology,
    /// Where the client connects, in turn: the ClusterIPs, or for
    /// [`Balancer::Direct`] the endpoints.
    targets: Vec<SocketAddr>,
    /// The endpoints in the order [`Balancer::Direct`] connects to them.
    endpoints_in_turn: Vec<SocketAddr>,
    /// Every endpoint.
    backends: HashSet<SocketAddr>,
    /// Connections made so far (Palisade's NAT must hold them all).
    made: std::cell::Cell<u64>,
}

fn key(s: &str) -> EndpointKey {
    s.parse().expect("endpoint key")
}

impl ServiceLab {
    /// Builds the namespaces and programs `table`'s Services with
    /// `balancer`. Loading kube-proxy's rules for 10k Services takes tens
    /// of seconds (iptables) to minutes (nftables).
    pub fn new(balancer: Balancer, table: &ServiceTable) -> Result<ServiceLab> {
        let pods = vec![
            (key("bench/client"), vec![CLIENT.parse()?]),
            (key("bench/server"), vec![SERVER.parse()?]),
        ];
        let topo = Topology::build(&pods)?;
        let server = topo.pod(&key("bench/server")).context("server")?;
        // Every endpoint is the server pod's (AnyIP), and the node routes
        // them to it; the client reaches the ClusterIPs by its default
        // route through the node.
        ip_batch(
            Some(server.ns.name()),
            &[format!("route add local {ENDPOINT_RANGE} dev lo")],
        )?;
        ip_batch(
            Some(topo.node().name()),
            &[format!(
                "route add {ENDPOINT_RANGE} via {SERVER} dev {}",
                server.host_if
            )],
        )?;
        let services = kp_services(table);
        let backends: HashSet<SocketAddr> = services
            .iter()
            .flat_map(|s| s.endpoints.iter().copied())
            .collect();
        // Round robin over the Services, then over their endpoints.
        let endpoints_in_turn: Vec<SocketAddr> = (0..ENDPOINTS)
            .flat_map(|e| services.iter().filter_map(move |s| s.endpoints.get(e)))
            .copied()
            .collect();
        let targets: Vec<SocketAddr> = match balancer {
            b if b.to_endpoints() => endpoints_in_turn.clone(),
            _ => services
                .iter()
                .map(|s| SocketAddr::new(s.cluster_ip, s.port))
                .collect(),
        };
        anyhow::ensure!(!targets.is_empty(), "no Services");
        let mut cgroup = None;
        let cap = Capacity {
            services: ServiceCapacity {
                nat: NAT_ENTRIES,
                ..ServiceCapacity::default()
            },
            ..Capacity::default()
        };
        let datapath = match balancer {
            Balancer::Direct => None,
            Balancer::Palisade => {
                let mut dp = Datapath::load_private(cap)?;
                dp.set_services(table)?;
                let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
                topo.node()
                    .run(|| ifaces.iter().try_for_each(|i| dp.attach_service(i)))??;
                // As the agent: the hooks on every process's cgroup (here
                // the one the client joins), the client's namespace listed.
                let hooks = TestCgroup::new("service-lab")?;
                dp.attach_socket_hooks(hooks.path())?;
                let client = topo.pod(&key("bench/client")).context("client")?;
                let netns = client.ns.run(current_netns_cookie)??;
                dp.set_socket_netns(
                    netns,
                    SocketNetns::Pod {
                        v4: Some(CLIENT.parse()?),
                        v6: None,
                    },
                )?;
                cgroup = Some(hooks);
                Some(dp)
            }
            Balancer::EmptyProgram | Balancer::NatFloor => {
                let floor = balancer == Balancer::NatFloor;
                // The floor's NAT table as large as Palisade's lab's.
                let mut dp =
                    Datapath::load_private(if floor { cap } else { Capacity::verification() })?;
                let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
                topo.node().run(|| {
                    ifaces.iter().try_for_each(|i| {
                        if floor {
                            dp.attach_nat_floor_as_service(i)
                        } else {
                            dp.attach_pass_through_as_service(i)
                        }
                    })
                })??;
                Some(dp)
            }
            Balancer::Iptables => {
                let rules = iptables_full(&services, CLUSTER_CIDR);
                run_in(topo.node(), "iptables-restore", &[], &rules)?;
                // The rules loaded nf_conntrack; now its limit exists.
                raise_conntrack_limit()?;
                None
            }
            Balancer::Nftables => {
                let rules = nft_full(&services, CLUSTER_CIDR);
                run_in(topo.node(), "nft", &["-f", "-"], &rules)?;
                raise_conntrack_limit()?;
                None
            }
        };
        Ok(ServiceLab {
            balancer,
            datapath,
            cgroup,
            topo,
            targets,
            endpoints_in_turn,
            backends,
            made: std::cell::Cell::new(0),
        })
    }

    /// The balancer.
    pub fn balancer(&self) -> Balancer {
        self.balancer
    }

    /// The names of the lab's namespaces (to check they are gone after).
    pub fn namespaces(&self) -> Vec<String> {
        let mut names = vec![self.topo.node().name().to_string()];
        names.extend(self.topo.pods().iter().map(|p| p.ns.name().to_string()));
        names
    }

    fn ns(&self, k: &str) -> &Netns {
        &self.topo.pod(&key(k)).expect("pod").ns
    }

    fn stat(&self, s: Statistic) -> Result<u64> {
        match &self.datapath {
            Some(dp) => Ok(dp.stats()?[s as usize]),
            None => Ok(0),
        }
    }

    /// TCP connections for `secs` seconds from the client to the targets
    /// in turn (each opened and reset), checked: the server accepted them
    /// all, from the client's own address, at endpoint addresses (so each
    /// really went through the balancer to a backend); Palisade recorded
    /// every translation (or, [`Via::AtConnect`], balanced every
    /// connection at `connect()` and translated no packet).
    pub fn connects(&self, secs: f64) -> Result<ServiceRun> {
        self.connects_via(Via::Balancer, secs)
    }

    /// As [`ServiceLab::connects`], to the endpoints' own addresses (as
    /// [`Balancer::Direct`] does), past whatever the balancer has on the
    /// way: in Palisade's lab, what its program costs traffic it does not
    /// translate.
    pub fn connects_to_endpoints(&self, secs: f64) -> Result<ServiceRun> {
        self.connects_via(Via::Endpoints, secs)
    }

    /// The service program in place, from the kernel's run-time
    /// statistics (enabled for this run only: they add two clock reads a
    /// run, so the rates are measured without them) during `secs` of
    /// connections `via`: nanoseconds a run and runs a connection of the
    /// service program, and the `connect()` hook's nanoseconds a
    /// connection; None outside Palisade's lab.
    pub fn program_time(&self, via: Via, secs: f64) -> Result<Option<ProgramTime>> {
        let Some(dp) = &self.datapath else {
            return Ok(None);
        };
        let stats = Datapath::enable_run_time_stats()?;
        let (t0, n0) = dp.program_stats(Hook::Service)?;
        let (h0, _) = dp.socket_program_stats("palisade_connect4")?;
        let run = self.connects_via(via, secs)?;
        let (t1, n1) = dp.program_stats(Hook::Service)?;
        let (h1, _) = dp.socket_program_stats("palisade_connect4")?;
        drop(stats);
        let runs = n1.saturating_sub(n0).max(1);
        let connections = run.connects.connected.max(1) as f64;
        Ok(Some(ProgramTime {
            ns_a_run: t1.saturating_sub(t0).as_nanos() as f64 / runs as f64,
            runs_a_connection: runs as f64 / connections,
            connect_hook_ns: h1.saturating_sub(h0).as_nanos() as f64 / connections,
        }))
    }

    /// TCP connections for `secs` seconds `via` one way, checked as
    /// [`ServiceLab::connects`] says.
    pub fn connects_via(&self, via: Via, secs: f64) -> Result<ServiceRun> {
        let palisade = self.balancer == Balancer::Palisade;
        anyhow::ensure!(
            via != Via::AtConnect || palisade,
            "only Palisade's lab balances per packet and at connect()"
        );
        let targets = if via == Via::Endpoints {
            &self.endpoints_in_turn
        } else {
            &self.targets
        };
        let to_services = via != Via::Endpoints && !self.balancer.to_endpoints();
        let (translated, nat_full, at_connect) = (
            self.stat(Statistic::ServiceNat)?,
            self.stat(Statistic::ServiceNatFull)?,
            self.stat(Statistic::ServiceTranslated)?,
        );
        let connect = || {
            tcp_connects(
                self.ns("bench/client"),
                self.ns("bench/server"),
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), TARGET_PORT),
                targets,
                IpAddr::V4(CLIENT.parse()?),
                secs,
            )
        };
        let connects = match (&self.cgroup, via) {
            // The whole process joins the cgroup for the run: the client's
            // sockets are the hooks' to balance.
            (Some(cgroup), Via::AtConnect) => cgroup.run_inside(connect)??,
            _ => connect()?,
        };
        let translated = self.stat(Statistic::ServiceNat)? - translated;
        let run = ServiceRun {
            translated,
            // The socket hooks count each connection they balance as
            // translated; the service program each packet it rewrites.
            balanced_at_connect: if via == Via::AtConnect {
                self.stat(Statistic::ServiceTranslated)? - at_connect
            } else {
                0
            },
            nat_full: self.stat(Statistic::ServiceNatFull)? - nat_full,
            connects,
        };
        let name = self.balancer.name();
        run.connects.check().context(name)?;
        if let Some(stray) = run
            .connects
            .reached
            .iter()
            .find(|a| !self.backends.contains(a))
        {
            anyhow::bail!("{name}: a connection reached {stray}, not an endpoint");
        }
        if palisade && !to_services {
            anyhow::ensure!(
                run.translated == 0,
                "palisade: connections to the endpoints were translated"
            );
        }
        if via == Via::AtConnect {
            anyhow::ensure!(
                run.translated == 0 && run.balanced_at_connect >= run.connects.connected,
                "palisade: {} of {} connections balanced at connect(), {} translated per packet",
                run.balanced_at_connect,
                run.connects.connected,
                run.translated
            );
        }
        if self.balancer == Balancer::NatFloor {
            self.made.set(self.made.get() + run.connects.connected);
            anyhow::ensure!(
                run.nat_full == 0
                    && self.made.get() * 2 <= NAT_ENTRIES as u64
                    && run.translated > 0,
                "nat-floor: {} connections recorded, {} not (the table full), {} made of room for {}",
                run.translated,
                run.nat_full,
                self.made.get(),
                NAT_ENTRIES / 2
            );
        }
        if palisade && via == Via::Balancer {
            self.made.set(self.made.get() + run.connects.connected);
            anyhow::ensure!(
                run.nat_full == 0 && self.made.get() * 2 <= NAT_ENTRIES as u64,
                "palisade: the NAT table filled ({} connections not recorded, {} made of room for {})",
                run.nat_full,
                self.made.get(),
                NAT_ENTRIES / 2
            );
            anyhow::ensure!(
                run.translated > 0,
                "palisade: the service program translated no connection"
            );
        }
        Ok(run)
    }
}
