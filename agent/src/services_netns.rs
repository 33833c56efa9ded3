//! The `netns` engine for service cases: real connections. Each case
//! becomes a node (namespaces: one per endpoint and pod source, one for
//! external sources) with `palisade_service` on every interface of the
//! node; each probe is connections from the source's namespace to the
//! frontend, answered by listeners on the endpoints: which backend took
//! each, and the address it saw (masquerade: not the client's). The
//! node's own probes are connections from the node namespace by this
//! process while it is in a cgroup of its own with the socket hooks
//! attached, as an agent attaches them to the node's processes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use palisade_services::case::{Outcome, Output};
use palisade_services::{Packet, Protocol, ProxyConfig, ServiceTable};
use palisade_testing::cgroup::TestCgroup;
use palisade_testing::netns::{Netns, Topology};
use policy_bpf::datapath::Datapath;
use policy_core::model::EndpointKey;

/// Where a probe's source lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A pod's namespace (by the local-traffic detector).
    Pod,
    /// The namespace of hosts outside the cluster.
    External,
    /// The node namespace: a process of the node, balanced by the socket
    /// hooks.
    Node,
    /// The external namespace, from an address the node serves: a load
    /// balancer's IP, which it SNATs the clients it forwards to (its
    /// own connections to that address leave for the node).
    ServedExternal,
}

/// Where a probe's source lives, or why real traffic cannot carry it.
fn source_kind(table: &ServiceTable, ip: &IpAddr) -> Result<Source, String> {
    if table.config.is_node_local(ip) {
        return Ok(Source::Node);
    }
    let pod = table.config.is_pod(ip);
    if table
        .frontends
        .keys()
        .any(|(frontend, _, _)| frontend == ip)
    {
        if pod {
            return Err(
                "the source is a pod address the node also serves: in the pod's namespace \
                 its connections to it would stay there"
                    .into(),
            );
        }
        return Ok(Source::ServedExternal);
    }
    Ok(if pod { Source::Pod } else { Source::External })
}

/// Why a probe cannot run on real traffic, if it cannot.
pub fn unsupported(table: &ServiceTable, packet: &Packet, want: &Outcome) -> Option<String> {
    if packet.protocol == Protocol::Sctp {
        return Some("this kernel has no SCTP".into());
    }
    if want.output == Output::Accept {
        return Some("ACCEPT is an iptables filter outcome".into());
    }
    if packet.protocol == Protocol::Udp && want.output == Output::Drop {
        return Some("a dropped UDP datagram and an unanswered one look alike".into());
    }
    source_kind(table, &packet.source).err()
}

/// A case's node, with listeners on every endpoint. The datapath is the
/// engine's, loaded once for every case (a load verifies every program);
/// [`ServiceNode::finish`] detaches it from this node's interfaces.
pub struct ServiceNode {
    topo: Topology,
    ifaces: Vec<String>,
    tcp: BTreeMap<SocketAddr, TcpListener>,
    udp: BTreeMap<SocketAddr, UdpSocket>,
    config: ProxyConfig,
    /// The cgroup the node's probes run in, its socket hooks attached;
    /// made when some probe starts on the node.
    node_cgroup: Option<TestCgroup>,
}

impl ServiceNode {
    /// Builds the node for `table` and the probes' sources, with `dp`
    /// programmed with `table` and attached to its interfaces.
    /// `untouched`: where probes the program should leave alone go (a
    /// listener waits there, so that they show they arrived unchanged).
    pub fn build(
        dp: &mut Datapath,
        table: &ServiceTable,
        sources: &[IpAddr],
        untouched: &[SocketAddr],
    ) -> Result<ServiceNode, String> {
        let backends: BTreeSet<SocketAddr> = table
            .services
            .iter()
            .flat_map(|b| b.cluster.iter().chain(b.local.iter()).copied())
            .collect();
        let mut ips: BTreeSet<IpAddr> = backends.iter().map(SocketAddr::ip).collect();
        let mut external = BTreeSet::new();
        let mut node_ips = BTreeSet::new();
        for s in sources {
            match source_kind(table, s) {
                Ok(Source::Pod) => {
                    ips.insert(*s);
                }
                Ok(Source::External) if !ips.contains(s) => {
                    external.insert((*s, false));
                }
                Ok(Source::ServedExternal) if !ips.contains(s) => {
                    external.insert((*s, true));
                }
                Ok(Source::Node) => {
                    node_ips.insert(*s);
                }
                _ => {}
            }
        }
        let pods: Vec<(EndpointKey, Vec<IpAddr>)> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let key: EndpointKey = format!("services/pod-{i}")
                    .parse()
                    .map_err(|e| format!("{e:?}"))?;
                Ok((key, vec![*ip]))
            })
            .collect::<Result<_, String>>()?;
        let mut topo = Topology::build(&pods).map_err(|e| e.to_string())?;
        for (ip, served) in external {
            if served {
                topo.add_external_frontend(ip)
            } else {
                topo.add_external(ip)
            }
            .map_err(|e| e.to_string())?;
        }
        // Where untouched probes go: the node's own addresses are the
        // node's, pods' their pods'; anything else (a ClusterIP on a port
        // it does not serve, say) an address of the external namespace,
        // whose own connections to it still leave for the node.
        let mut node_addresses = node_ips.clone();
        for at in untouched {
            let ip = at.ip();
            if table.config.is_node_local(&ip) || ip.is_loopback() {
                node_addresses.insert(ip);
            } else if topo.owner(&ip).is_err() {
                topo.add_external_frontend(ip).map_err(|e| e.to_string())?;
            }
        }
        // The node's own addresses, for its probes to start from and its
        // untouched probes to reach.
        let lines: Vec<String> = node_addresses
            .iter()
            .filter(|ip| !ip.is_loopback())
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("addr add {ip}/32 dev lo"),
                IpAddr::V6(_) => format!("addr add {ip}/128 dev lo nodad"),
            })
            .collect();
        palisade_testing::netns::ip_batch(Some(topo.node().name()), &lines)
            .map_err(|e| e.to_string())?;
        dp.set_services(table).map_err(|e| e.to_string())?;
        let mut ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
        ifaces.push("ext".into());
        topo.node()
            .run(|| {
                ifaces.iter().try_for_each(|i| {
                    // A link pinned for a name an earlier case used would
                    // be re-adopted, on an interface gone with its node.
                    dp.detach(i)?;
                    dp.attach_service(i)
                })
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // As the agent settles every interface it attaches: a packet the
        // program masqueraded at ingress carries a node address, a martian
        // to the routing that follows otherwise.
        for i in &ifaces {
            topo.node()
                .sysctl(&format!("ipv4/conf/{i}/accept_local"), "1")
                .map_err(|e| e.to_string())?;
        }
        let node_cgroup = if node_ips.is_empty() {
            None
        } else {
            let cgroup = TestCgroup::new("services-netns").map_err(|e| format!("cgroup: {e}"))?;
            dp.attach_socket_hooks(cgroup.path())
                .map_err(|e| format!("socket hooks: {e}"))?;
            // The node is a namespace of its own: its probes' sockets are
            // the node's.
            let node_netns = topo
                .node()
                .run(policy_bpf::datapath::current_netns_cookie)
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("the node's netns cookie: {e}"))?;
            dp.set_socket_netns(node_netns, policy_bpf::datapath::SocketNetns::Node)
                .map_err(|e| format!("socket hooks: {e}"))?;
            Some(cgroup)
        };
        let mut node = ServiceNode {
            topo,
            ifaces,
            tcp: BTreeMap::new(),
            udp: BTreeMap::new(),
            config: table.config.clone(),
            node_cgroup,
        };
        for b in backends.into_iter().chain(untouched.iter().copied()) {
            if node.tcp.contains_key(&b) {
                continue;
            }
            let ns = if node.config.is_node_local(&b.ip()) || b.ip().is_loopback() {
                node.topo.node()
            } else {
                let Ok(owner) = node.topo.owner(&b.ip()) else {
                    continue;
                };
                node.topo.netns(owner)
            };
            let tcp = ns
                .run(|| TcpListener::bind(b))
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("listening on {b}: {e}"))?;
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            let udp = ns
                .run(|| UdpSocket::bind(b))
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("listening on udp {b}: {e}"))?;
            udp.set_nonblocking(true).map_err(|e| e.to_string())?;
            node.tcp.insert(b, tcp);
            node.udp.insert(b, udp);
        }
        Ok(node)
    }

    /// One probe: connections until every expected backend answered (or
    /// enough that one never will), or the first that fails.
    pub fn probe(
        &self,
        dp: &mut Datapath,
        packet: &Packet,
        want: &Outcome,
    ) -> Result<(Outcome, String), String> {
        let from_node = self.config.is_node_local(&packet.source);
        let ns = if from_node {
            self.topo.node()
        } else {
            let owner = self
                .topo
                .owner(&packet.source)
                .map_err(|e| format!("source: {e}"))?;
            self.topo.netns(owner)
        };
        let dst = SocketAddr::new(packet.destination, packet.port);
        let tries = match &want.output {
            Output::Endpoints(e) => 16 + 16 * e.len(),
            _ => 1,
        };
        let mut seen = BTreeSet::new();
        let mut masq = false;
        let mut node_address_seen = true;
        for attempt in 0..tries {
            dp.flush_services_state().map_err(|e| e.to_string())?;
            let once = || match packet.protocol {
                Protocol::Udp => self.udp_once(ns, packet.source, dst, attempt),
                _ => self.tcp_once(ns, packet.source, dst),
            };
            let answer = match (&self.node_cgroup, from_node) {
                (Some(cgroup), true) => cgroup
                    .run_inside(once)
                    .map_err(|e| format!("joining the probe cgroup: {e}"))??,
                _ => once()?,
            };
            match answer {
                // It arrived where it was sent: the program left it alone
                // (from its own source; a masqueraded one is no pass).
                Answer::Backend(b, from) if b == dst => {
                    let masq = from != packet.source;
                    let output = if masq {
                        Output::Endpoints([b].into())
                    } else {
                        Output::Pass
                    };
                    return Ok((
                        Outcome { output, masq },
                        format!("{dst} took it from {from}"),
                    ));
                }
                Answer::Backend(b, from) => {
                    seen.insert(b);
                    masq |= from != packet.source;
                    node_address_seen &= self.config.is_node_local(&from);
                }
                Answer::Refused => return Ok((outcome(Output::Reject), "refused".into())),
                Answer::Silent => return Ok((outcome(Output::Drop), "no answer".into())),
            }
            if let Output::Endpoints(e) = &want.output
                && seen == *e
            {
                break;
            }
        }
        let why = format!("{} backends answered", seen.len());
        // A node's connection reaches the backend from a node address
        // whether kube-proxy masquerades it (to the address routing
        // picks) or not: what shows is that the backend saw one.
        let masq = if from_node {
            want.masq == node_address_seen
        } else {
            masq
        };
        Ok((
            Outcome {
                output: Output::Endpoints(seen),
                masq,
            },
            why,
        ))
    }

    /// Detaches the datapath from this node's interfaces (their pinned
    /// links would outlive the namespaces).
    pub fn finish(self, dp: &mut Datapath) {
        let _ = self
            .topo
            .node()
            .run(|| self.ifaces.iter().for_each(|i| drop(dp.detach(i))));
        if let Some(cgroup) = &self.node_cgroup {
            let _ = dp.detach_socket_hooks(cgroup.path());
        }
    }

    fn tcp_once(&self, ns: &Netns, source: IpAddr, dst: SocketAddr) -> Result<Answer, String> {
        let connected = ns
            .run(|| {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(dst),
                    socket2::Type::STREAM,
                    None,
                )?;
                // From the probe's address (its namespace may hold others).
                socket.bind(&SocketAddr::new(source, 0).into())?;
                socket.connect_timeout(&dst.into(), Duration::from_millis(400))?;
                Ok::<TcpStream, std::io::Error>(socket.into())
            })
            .map_err(|e| e.to_string())?;
        let _client = match connected {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(Answer::Refused),
            // EPERM: the socket hooks refuse what the TC program drops.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::PermissionDenied
                ) =>
            {
                return Ok(Answer::Silent);
            }
            Err(e) => return Err(format!("connecting to {dst}: {e}")),
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            for (b, l) in &self.tcp {
                if let Ok((_, from)) = l.accept() {
                    return Ok(Answer::Backend(*b, from.ip()));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("connected to {dst}, but no endpoint accepted"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn udp_once(
        &self,
        ns: &Netns,
        source: IpAddr,
        dst: SocketAddr,
        attempt: usize,
    ) -> Result<Answer, String> {
        let client = ns
            .run(|| UdpSocket::bind(SocketAddr::new(source, 0)))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // The node's socket hooks answer at connect(): ECONNREFUSED for
        // a rejection, EPERM for a drop.
        match client
            .connect(dst)
            .and_then(|()| client.send(format!("probe {attempt}").as_bytes()))
        {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(Answer::Refused),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(Answer::Silent),
            Err(e) => return Err(format!("sending to {dst}: {e}")),
        }
        client
            .set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut buf = [0u8; 64];
        loop {
            for (b, s) in &self.udp {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    return Ok(Answer::Backend(*b, from.ip()));
                }
            }
            // An ICMP port unreachable shows as a refused receive.
            if let Err(e) = client.recv(&mut buf)
                && e.kind() == ErrorKind::ConnectionRefused
            {
                return Ok(Answer::Refused);
            }
            if Instant::now() > deadline {
                return Ok(Answer::Silent);
            }
        }
    }
}

enum Answer {
    /// This backend took it and saw this source.
    Backend(SocketAddr, IpAddr),
    /// ICMP port unreachable came back.
    Refused,
    /// Nothing came back.
    Silent,
}

fn outcome(output: Output) -> Outcome {
    Outcome {
        output,
        masq: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_services::topology::NodeTopology;
    use palisade_services::{Family, Objects};
    use serde_json::json;

    /// One LoadBalancer Service: ClusterIP 172.30.0.41, ingress IPs
    /// 1.2.3.4 and (a pod address, as a misconfigured one) 10.0.0.9.
    fn table() -> ServiceTable {
        let docs = [
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "lb", "namespace": "ns"},
                "spec": {"type": "LoadBalancer", "clusterIP": "172.30.0.41",
                         "ports": [{"port": 80, "protocol": "TCP", "nodePort": 3001}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "10.0.0.9"}]}}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "lb-1", "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": "lb"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.180.0.1"], "conditions": {}}],
                "ports": [{"port": 80, "protocol": "TCP"}]}),
        ];
        let config = ProxyConfig {
            family: Family::V4,
            node: NodeTopology {
                name: "node-a".into(),
                zone: None,
                prefer_same_node: false,
            },
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
            masquerade_all: false,
            node_port_addresses: vec![],
        };
        let objects = Objects::from_documents(&docs).unwrap();
        ServiceTable::build(config, &objects.service_ports(Family::V4).unwrap())
    }

    #[test]
    fn a_source_is_placed_where_real_traffic_can_come_from() {
        let t = table();
        let kind = |ip: &str| source_kind(&t, &ip.parse().unwrap());
        assert_eq!(kind("192.168.0.2"), Ok(Source::Node));
        assert_eq!(kind("10.0.0.2"), Ok(Source::Pod));
        assert_eq!(kind("203.0.113.2"), Ok(Source::External));
        // The load balancer's own IP, as it SNATs its clients.
        assert_eq!(kind("1.2.3.4"), Ok(Source::ServedExternal));
        // A pod's namespace would keep its connections to itself.
        assert!(kind("10.0.0.9").is_err());
    }
}
