//! The kernel's service program on crafted packets: a translated
//! connection round-trips (DNAT out, reverse NAT back) with checksums the
//! receiver accepts; a Service without endpoints answers ICMP port
//! unreachable; ClientIP affinity holds; endpoint churn never breaks a
//! connection whose backend stays and never sends one to a removed
//! backend; a table that does not fit changes nothing; pins of a build
//! before the address filter get theirs filled from their tables.

use std::net::{IpAddr, SocketAddr};

use palisade_services::topology::NodeTopology;
use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use policy_bpf::datapath::Datapath;
use policy_bpf::lower::Capacity;
use policy_bpf::services::ServiceCapacity;
use policy_bpf_common::SOCK_FLOW_REPLIED;
use serde_json::{Value, json};

use super::privileged;

pub(super) const CLIENT: &str = "10.0.1.9";
pub(super) const VIP: &str = "172.30.0.10";

pub(super) fn config() -> ProxyConfig {
    ProxyConfig {
        family: Family::V4,
        node: NodeTopology {
            name: "node-a".into(),
            zone: None,
            prefer_same_node: true,
        },
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
        masquerade_all: false,
        node_port_addresses: vec![],
    }
}

pub(super) fn service(name: &str, ip: &str, affinity: bool) -> Value {
    let mut spec = json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]});
    if affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 60}});
    }
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default"}, "spec": spec})
}

pub(super) fn slice(name: &str, endpoints: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{name}-1"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4",
           "endpoints": endpoints.iter().map(|a| json!({"addresses": [a], "nodeName": "node-b", "conditions": {"ready": true}})).collect::<Vec<_>>(),
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]})
}

pub(super) fn table(docs: &[Value]) -> ServiceTable {
    let objects = Objects::from_documents(docs).unwrap();
    ServiceTable::build(config(), &objects.service_ports(Family::V4).unwrap())
}

pub(super) fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    for c in bytes.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

pub(super) fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IPv4 TCP (flags) or UDP packet with valid checksums.
pub(super) fn packet(proto: u8, src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        unreachable!()
    };
    let mut l4 = if proto == 6 {
        let mut h = vec![0u8; 20];
        h[12] = 5 << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        h
    } else {
        let mut h = vec![0u8; 8];
        h[4..6].copy_from_slice(&12u16.to_be_bytes());
        h
    };
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(b"ping");
    let mut out = policy_bpf::packet::ip_packet(src.ip(), dst.ip(), proto, &l4);
    let ip = 14;
    let c = fold(sum16(&out[ip..ip + 20], 0));
    out[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let at = if proto == 6 {
        ip + 20 + 16
    } else {
        ip + 20 + 6
    };
    let c = transport_sum(&out, proto);
    out[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let _ = (s, d);
    out
}

/// The transport checksum a receiver computes over the packet as it is
/// (0 when the stored one is right, for a packet whose checksum is set).
fn transport_sum(p: &[u8], proto: u8) -> u16 {
    let len = p.len() - 34;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[26..34]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    fold(sum16(&p[34..], sum16(&pseudo, 0)))
}

fn checksums_hold(p: &[u8]) {
    assert_eq!(fold(sum16(&p[14..34], 0)), 0, "IPv4 header checksum");
    assert_eq!(transport_sum(p, p[23]), 0, "transport checksum");
}

fn addr(p: &[u8], at: usize) -> SocketAddr {
    let ip = IpAddr::from([p[at], p[at + 1], p[at + 2], p[at + 3]]);
    let port_at = if at == 26 { 34 } else { 36 };
    SocketAddr::new(ip, u16::from_be_bytes([p[port_at], p[port_at + 1]]))
}

pub(super) fn source(p: &[u8]) -> SocketAddr {
    addr(p, 26)
}

pub(super) fn destination(p: &[u8]) -> SocketAddr {
    addr(p, 30)
}

pub(super) fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The service program at the TC ingress of every pod's host veth.
pub(super) fn attach_service_on_pods(dp: &mut Datapath, topo: &palisade_testing::netns::Topology) {
    let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
    topo.node()
        .run(|| {
            for i in &ifaces {
                dp.attach_service(i).unwrap();
            }
        })
        .unwrap();
}

/// A pin directory of a test's own, removed however the test ends.
pub(super) struct Pins(pub(super) std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn load() -> Datapath {
    Datapath::load_private(Capacity::verification()).unwrap()
}

#[test]
fn a_connection_round_trips_through_a_cluster_ip_with_valid_checksums() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    let backends = ["10.0.2.5", "10.0.3.6"];
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &backends),
    ]))
    .unwrap();
    let client = sock(CLIENT, 40_001);
    let vip = sock(VIP, 80);
    for proto in [6u8, 17] {
        let port = if proto == 6 { 80 } else { 53 };
        let target = if proto == 6 { 8080 } else { 5353 };
        let vip = SocketAddr::new(vip.ip(), port);
        let (run, out) = dp
            .run_service(&packet(proto, client, vip, 0x02), 0)
            .unwrap();
        assert!(run.passed(), "return code {}", run.retval);
        let backend = destination(&out);
        assert!(
            backends.contains(&backend.ip().to_string().as_str()) && backend.port() == target,
            "{backend}"
        );
        assert_eq!(
            source(&out),
            client,
            "a pod's connection is not masqueraded"
        );
        checksums_hold(&out);
        // The connection's next packet: the same backend.
        let (_, again) = dp
            .run_service(&packet(proto, client, vip, 0x10), 0)
            .unwrap();
        assert_eq!(destination(&again), backend);
        checksums_hold(&again);
        // The reply, from the backend: back from the ClusterIP.
        let (run, back) = dp
            .run_service(&packet(proto, backend, client, 0x12), 0)
            .unwrap();
        assert!(run.passed());
        assert_eq!((source(&back), destination(&back)), (vip, client));
        checksums_hold(&back);
    }
    assert_eq!(
        dp.nat_entries().unwrap().len(),
        4,
        "two connections, two directions each"
    );
}

/// A client port used through the ClusterIP (TCP or UDP: `protocol`),
/// then (that flow over, its entries left in the LRU) straight to the
/// backend, then through the ClusterIP again, from `client`;
/// `masquerade`: the node address the backend sees through the
/// ClusterIP (None: the client's). The direct flow keeps its addresses
/// both ways, and the last is translated both ways again (kube-proxy's
/// conntrack starts a new entry for each new SYN, and for a datagram no
/// entry matches). Returns the backend.
fn reuse_a_client_port(
    dp: &Datapath,
    protocol: u8,
    client: SocketAddr,
    masquerade: Option<IpAddr>,
) -> SocketAddr {
    // TCP: SYN, then SYN-ACK; UDP: a datagram each way.
    let (vip, target, open, answer) = match protocol {
        6 => (sock(VIP, 80), sock("10.0.2.5", 8080), 0x02, 0x12),
        _ => (sock(VIP, 53), sock("10.0.2.5", 5353), 0, 0),
    };
    let through_vip = || {
        let (_, out) = dp
            .run_service(&packet(protocol, client, vip, open), 0)
            .unwrap();
        let seen = source(&out);
        assert_eq!(
            seen.ip(),
            masquerade.unwrap_or(client.ip()),
            "{client}: source"
        );
        (seen, destination(&out))
    };
    let (_, backend) = through_vip();
    assert_eq!(backend, target);
    let (run, out) = dp
        .run_service(&packet(protocol, client, backend, open), 0)
        .unwrap();
    assert!(run.passed());
    assert_eq!(
        (source(&out), destination(&out)),
        (client, backend),
        "{client}: a direct flow keeps its addresses"
    );
    let (_, back) = dp
        .run_service(&packet(protocol, backend, client, answer), 0)
        .unwrap();
    assert_eq!(
        (source(&back), destination(&back)),
        (backend, client),
        "{client}: a direct flow's reply keeps the backend's address"
    );
    let (seen, to) = through_vip();
    assert_eq!(to, backend);
    let (_, back) = dp
        .run_service(&packet(protocol, backend, seen, answer), 0)
        .unwrap();
    assert_eq!(
        (source(&back), destination(&back)),
        (vip, client),
        "{client}: the reply comes from the ClusterIP again"
    );
    backend
}

/// A closed connection's NAT entries stay in the LRU: a new connection
/// from its client port straight to its backend, or from the backend's
/// port to the client's, is not taken for it.
#[test]
fn a_reused_client_port_is_not_taken_for_a_closed_connection() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
    let client = sock(CLIENT, 40_010);
    // UDP has no opening: a datagram no entry covers is a new flow, as
    // conntrack takes it.
    reuse_a_client_port(&dp, 17, sock(CLIENT, 40_011), None);
    let backend = reuse_a_client_port(&dp, 6, client, None);
    // That one ends too; the backend opens a connection from its port
    // to the client's: not answered for the ClusterIP.
    let (_, out) = dp
        .run_service(&packet(6, backend, client, 0x02), 0)
        .unwrap();
    assert_eq!(
        (source(&out), destination(&out)),
        (backend, client),
        "the backend's own connection keeps its address"
    );
}

/// The same for a masqueraded connection (a client outside the cluster
/// CIDR): its SNAT entry is keyed by the client's port to the backend,
/// and its reply entry by the backend to that port; neither takes the
/// direct connection, whether or not the client is itself a backend (of
/// another Service: the address filter then lets its packets look their
/// tuple up).
#[test]
fn a_reused_client_port_is_not_taken_for_a_closed_masqueraded_connection() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
        service("db", "172.30.0.20", false),
        slice("db", &["192.168.5.10"]),
    ]))
    .unwrap();
    let node: IpAddr = "192.168.0.2".parse().unwrap();
    for protocol in [6, 17] {
        reuse_a_client_port(&dp, protocol, sock("192.168.5.9", 40_020), Some(node));
        reuse_a_client_port(&dp, protocol, sock("192.168.5.10", 40_021), Some(node));
    }
}

#[test]
fn a_service_without_endpoints_answers_icmp_port_unreachable() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    dp.set_services(&table(&[service("api", VIP, false), slice("api", &[])]))
        .unwrap();
    let sent = packet(17, sock(CLIENT, 40_002), sock(VIP, 53), 0);
    let (run, out) = dp.run_service(&sent, 0).unwrap();
    assert_eq!(run.retval, 7, "redirected back to the sender");
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 8);
    assert_eq!(out[23], 1, "ICMP");
    assert_eq!((out[34], out[35]), (3, 3), "port unreachable");
    assert_eq!(&out[26..30], &sent[30..34], "from the Service address");
    assert_eq!(&out[30..34], &sent[26..30], "to the client");
    assert_eq!(
        &out[42..70],
        &sent[14..42],
        "quoting the datagram's headers"
    );
    assert_eq!(fold(sum16(&out[14..34], 0)), 0, "IPv4 header checksum");
    assert_eq!(fold(sum16(&out[34..], 0)), 0, "ICMP checksum");
    // A ClusterIP's unknown port is rejected the same way (kube-proxy).
    let (run, _) = dp
        .run_service(&packet(6, sock(CLIENT, 40_003), sock(VIP, 81), 0x02), 0)
        .unwrap();
    assert_eq!(run.retval, 7);
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    let backends = ["10.0.2.5", "10.0.3.6", "10.0.4.7", "10.0.5.8"];
    dp.set_services(&table(&[
        service("api", VIP, true),
        slice("api", &backends),
    ]))
    .unwrap();
    let chosen: std::collections::BTreeSet<SocketAddr> = (0..32)
        .map(|i| {
            let (_, out) = dp
                .run_service(&packet(6, sock(CLIENT, 41_000 + i), sock(VIP, 80), 0x02), 0)
                .unwrap();
            destination(&out)
        })
        .collect();
    assert_eq!(chosen.len(), 1, "one backend for the client: {chosen:?}");
    // Another client is not bound by it.
    let others: std::collections::BTreeSet<SocketAddr> = (0..32)
        .map(|i| {
            let client = sock(&format!("10.0.9.{}", i + 1), 41_000);
            let (_, out) = dp
                .run_service(&packet(6, client, sock(VIP, 80), 0x02), 0)
                .unwrap();
            destination(&out)
        })
        .collect();
    assert!(
        others.len() > 1,
        "32 clients all on one backend: {others:?}"
    );
}

#[test]
fn a_table_that_does_not_fit_names_the_map_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let mut dp = Datapath::load_private(Capacity {
        services: ServiceCapacity {
            backends: 4,
            ..ServiceCapacity::verification()
        },
        ..Capacity::verification()
    })
    .unwrap();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
    let before = dp.services().cloned();
    let err = dp
        .set_services(&table(&[
            service("api", VIP, false),
            slice("api", &["10.0.2.5", "10.0.3.6", "10.0.4.7"]),
        ]))
        .unwrap_err();
    assert!(err.to_string().contains("PALISADE_SVC_BACKENDS"), "{err}");
    assert_eq!(dp.services().cloned(), before);
    let (_, out) = dp
        .run_service(&packet(6, sock(CLIENT, 44_000), sock(VIP, 80), 0x02), 0)
        .unwrap();
    assert_eq!(
        destination(&out),
        sock("10.0.2.5", 8080),
        "the old table is in force"
    );
}

/// Real TCP connections between pod namespaces through a ClusterIP:
/// `palisade_service` on the host veths' ingress translates the SYN to a
/// backend, the node routes it there, the reply is translated back, and
/// the kernel's TCP on both ends accepts every segment (checksums and
/// addresses right). The backend sees the client pod's own address.
#[test]
fn real_connections_reach_a_backend_through_a_cluster_ip_and_back() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use palisade_testing::netns::Topology;

    if !privileged() {
        return;
    }
    let topo = Topology::build(&[
        (super::key("default/client"), vec![super::ip(CLIENT)]),
        (super::key("default/api-a"), vec![super::ip("10.0.2.5")]),
        (super::key("default/api-b"), vec![super::ip("10.0.3.6")]),
    ])
    .unwrap();
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5", "10.0.3.6"]),
    ]))
    .unwrap();
    attach_service_on_pods(&mut dp, &topo);
    let listeners: Vec<(String, TcpListener)> = ["default/api-a", "default/api-b"]
        .iter()
        .map(|k| {
            let pod = topo.pod(&super::key(k)).unwrap();
            let at = SocketAddr::new(pod.ips[0], 8080);
            let l = pod.ns.run(|| TcpListener::bind(at)).unwrap().unwrap();
            l.set_nonblocking(true).unwrap();
            (k.to_string(), l)
        })
        .collect();
    let client_pod = topo.pod(&super::key("default/client")).unwrap();
    let mut reached = std::collections::BTreeSet::new();
    for attempt in 0..24 {
        let mut client = client_pod
            .ns
            .run(|| TcpStream::connect_timeout(&sock(VIP, 80), Duration::from_secs(2)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {attempt} through the ClusterIP: {e}"));
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(client.peer_addr().unwrap(), sock(VIP, 80));
        // The backend that took it, and the address it saw.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let (backend, mut server, seen) = loop {
            if let Some(found) = listeners
                .iter()
                .find_map(|(name, l)| l.accept().ok().map(|(s, peer)| (name.clone(), s, peer)))
            {
                break found;
            }
            assert!(std::time::Instant::now() < deadline, "no backend accepted");
            std::thread::sleep(Duration::from_millis(5));
        };
        server.set_nonblocking(false).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(
            seen.ip(),
            super::ip(CLIENT),
            "a pod's connection is not masqueraded"
        );
        client.write_all(b"ping!").unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"pong!").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong!");
        reached.insert(backend);
    }
    assert_eq!(
        reached.len(),
        2,
        "both backends took connections: {reached:?}"
    );
    let stats = dp.stats().unwrap();
    assert!(stats[policy_bpf_common::Statistic::ServiceNat as usize] >= 24);
}

/// Processes of the node reach a ClusterIP through socket-time load
/// balancing: `connect()` (cgroup/connect4, 6) goes straight to a
/// backend, no packet is translated, every backend is used, and a
/// Service without endpoints fails `connect()` with ECONNREFUSED; an
/// unconnected UDP socket's datagrams (sendmsg4, 6) reach the backends
/// and their replies come from the Service address (recvmsg4, 6), as a
/// DNS resolver requires; `getpeername()` names the Service address.
#[test]
fn node_processes_reach_a_cluster_ip_through_the_socket_hooks() {
    use std::io::Write;
    use std::net::{TcpListener, UdpSocket};
    use std::process::Command;

    use palisade_testing::netns::Topology;

    if !privileged() {
        return;
    }
    let topo = Topology::build(&[
        (super::key("default/api-a"), vec![super::ip("10.0.2.5")]),
        (super::key("default/api-b"), vec![super::ip("10.0.3.6")]),
        (super::key("default/api-c"), vec![super::ip("fd10::5")]),
        // Backs no Service: a flow's recorded backend moved here shows
        // whether a datagram kept the flow.
        (super::key("default/stray"), vec![super::ip("10.0.4.7")]),
    ])
    .unwrap();
    for (k, name) in [
        ("default/api-a", "api-a"),
        ("default/api-b", "api-b"),
        ("default/api-c", "api-c"),
        ("default/stray", "stray"),
    ] {
        let pod = topo.pod(&super::key(k)).unwrap();
        let at = SocketAddr::new(pod.ips[0], 8080);
        let l = pod.ns.run(|| TcpListener::bind(at)).unwrap().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(name.as_bytes());
            }
        });
        // A UDP server answering each datagram with its name.
        let at = SocketAddr::new(pod.ips[0], 5353);
        let u = pod.ns.run(|| UdpSocket::bind(at)).unwrap().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(name.as_bytes(), from);
            }
        });
    }
    // The node's addresses (the configs'), for the kernel to choose as source.
    for addr in ["192.168.0.2/32", "fd00::2/128"] {
        let added = Command::new("ip")
            .args(["-n", topo.node().name(), "addr", "add", addr, "dev", "lo"])
            .status()
            .unwrap();
        assert!(added.success());
    }
    // An IPv6 Service next to the IPv4 ones: one table per family.
    let v6_objects = Objects::from_documents(&[
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api6", "namespace": "default"},
               "spec": {"clusterIP": "fd30::10", "ipFamilies": ["IPv6"],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                  {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "api6-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "api6"}},
               "addressType": "IPv6",
               "endpoints": [{"addresses": ["fd10::5"], "conditions": {"ready": true}}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                         {"name": "dns", "port": 5353, "protocol": "UDP"}]}),
    ])
    .unwrap();
    let v6_config = ProxyConfig {
        family: Family::V6,
        node_ips: vec!["fd00::2".parse().unwrap()],
        cluster_cidrs: vec!["fd10::/64".parse().unwrap()],
        service_cidrs: vec!["fd30::/112".parse().unwrap()],
        ..config()
    };
    let v6 = ServiceTable::build(v6_config, &v6_objects.service_ports(Family::V6).unwrap());
    let mut dp = load();
    dp.set_service_tables(&[
        table(&[
            service("api", VIP, false),
            slice("api", &["10.0.2.5", "10.0.3.6"]),
            service("idle", "172.30.0.11", false),
            slice("idle", &[]),
        ]),
        v6.clone(),
    ])
    .unwrap();
    let cgroup = palisade_testing::cgroup::TestCgroup::new("connect").unwrap();
    dp.attach_socket_hooks(cgroup.path()).unwrap();
    // The node is a namespace of its own here: its sockets are the node's.
    let node_netns = topo
        .node()
        .run(policy_bpf::datapath::current_netns_cookie)
        .unwrap()
        .unwrap();
    dp.set_socket_netns(node_netns, policy_bpf::datapath::SocketNetns::Node)
        .unwrap();
    // A shell of the node joins the cgroup, then connects.
    let connect = |to: &str| {
        let out = cgroup
            .bash_in(
                topo.node().name(),
                &format!("exec 3<>/dev/tcp/{to}/80 && cat <&3"),
            )
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (ok, out, err) = connect(VIP);
        assert!(ok, "through the ClusterIP: {err}");
        reached.insert(out);
    }
    assert_eq!(
        reached,
        ["api-a", "api-b"].map(String::from).into(),
        "every backend takes connections"
    );
    assert!(
        dp.nat_entries().unwrap().is_empty(),
        "connect-time balancing translates no packet"
    );
    let (ok, _, err) = connect("172.30.0.11");
    assert!(!ok && err.contains("Connection refused"), "{err}");
    let (ok, out, err) = connect("fd30::10");
    assert!(
        ok && out == "api-c",
        "through the IPv6 ClusterIP: {out:?} {err}"
    );

    // A process of the node runs `socket_probe_child` (this binary
    // again) in the cgroup: its sockets are the ones the hooks see.
    let exe = std::env::current_exe().unwrap();
    let probe = |what: &str| -> String {
        let out = cgroup
            .bash_in(
                topo.node().name(),
                &format!(
                    "PALISADE_SOCKET_PROBE='{what}' exec {} --exact \
                     kernel::services::socket_probe_child --ignored --nocapture",
                    exe.display()
                ),
            )
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("probe: "))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no answer: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string()
    };
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let got = probe(&format!("udp {VIP}:53"));
        let (name, from) = got
            .split_once(" from ")
            .unwrap_or_else(|| panic!("unconnected UDP to the ClusterIP: {got}"));
        assert_eq!(
            from,
            format!("{VIP}:53"),
            "the reply's source is the Service address"
        );
        reached.insert(name.to_string());
    }
    assert_eq!(
        reached,
        ["api-a", "api-b"].map(String::from).into(),
        "every backend takes datagrams"
    );
    assert_eq!(probe("udp [fd30::10]:53"), "api-c from [fd30::10]:53");
    let refused = probe("udp 172.30.0.11:53");
    assert!(refused.contains("os error 111"), "{refused}");
    assert_eq!(probe(&format!("tcp {VIP}:80")), format!("peer {VIP}:80"));
    assert_eq!(probe("tcp [fd30::10]:80"), "peer [fd30::10]:80");
    // A dual-stack IPv6 socket reaching the IPv4 Service by its
    // IPv4-mapped address: balanced over the IPv4 backends, and told the
    // mapped Service address back.
    let mapped = format!("[::ffff:{VIP}]");
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let got = probe(&format!("udp {mapped}:53"));
        let (name, from) = got
            .split_once(" from ")
            .unwrap_or_else(|| panic!("unconnected UDP to the mapped ClusterIP: {got}"));
        assert_eq!(from, format!("{mapped}:53"));
        reached.insert(name.to_string());
    }
    assert_eq!(reached, ["api-a", "api-b"].map(String::from).into());
    assert_eq!(
        probe(&format!("tcp {mapped}:80")),
        format!("peer {mapped}:80")
    );
    assert!(
        probe("udp [::ffff:172.30.0.11]:53").contains("os error 111"),
        "a mapped Service without endpoints is refused too"
    );
    // One socket's datagrams to the Service are one flow, as conntrack
    // keeps them behind kube-proxy: one backend while it lives.
    for _ in 0..3 {
        let got = probe(&format!("udp-flow {VIP}:53"));
        let names: std::collections::BTreeSet<&str> = got.split(',').collect();
        assert_eq!(names.len(), 1, "one socket's datagrams: {got}");
    }
    assert!(
        dp.nat_entries().unwrap().is_empty(),
        "socket-time balancing translates no packet"
    );
    let mut backend_b = [0u8; 16];
    backend_b[..4].copy_from_slice(&[10, 0, 3, 6]);
    let flows = dp.socket_flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|(_, v)| v.flags & SOCK_FLOW_REPLIED != 0 && v.backend == backend_b),
        "replies mark the flows: {flows:?}"
    );
    // api-b leaves the Service: the flows to it go, the others stay.
    dp.set_service_tables(&[
        table(&[
            service("api", VIP, false),
            slice("api", &["10.0.2.5"]),
            service("idle", "172.30.0.11", false),
            slice("idle", &[]),
        ]),
        v6,
    ])
    .unwrap();
    let flows = dp.socket_flows().unwrap();
    assert!(!flows.is_empty() && flows.iter().all(|(_, v)| v.backend != backend_b));
    // A flow idle past conntrack's UDP timeout is over at its next
    // datagram: 30 s unreplied, 120 s once replied. The probe moves its
    // flow's backend to `stray` and its clock back: a kept flow's next
    // datagram reaches `stray`, a new flow a backend of the Service.
    let pin = dp
        .pin_dir()
        .join(policy_bpf_common::map_names::SOCK_FLOWS)
        .display()
        .to_string();
    for (idle, replied, kept) in [
        (25, 0, true),
        (31, 0, false),
        (115, 1, true),
        (121, 1, false),
    ] {
        let got = probe(&format!(
            "udp-aged {VIP}:53 {idle} {replied} 10.0.4.7 {pin}"
        ));
        let (first, next) = got
            .split_once(',')
            .unwrap_or_else(|| panic!("aged flow: {got}"));
        assert_eq!(first, "api-a", "the flow's first datagram");
        let expected = if kept { "stray" } else { "api-a" };
        assert_eq!(
            next,
            expected,
            "idle {idle} s, replied {replied}: the flow {}",
            if kept { "lives" } else { "is over" }
        );
    }
    let attached = policy_bpf::datapath::cgroup_socket_hooks(cgroup.path()).unwrap();
    assert!(
        attached.iter().all(|(_, ids)| ids.len() == 1),
        "one program on each socket hook: {attached:?}"
    );
    assert_eq!(attached.len(), policy_bpf::datapath::SOCKET_PROGRAMS.len());
    dp.detach_socket_hooks(cgroup.path()).unwrap();
    assert_eq!(
        policy_bpf::datapath::attached_socket_hooks(cgroup.path()).unwrap(),
        0
    );
}

/// The child side of the socket-hook test above, which re-runs this
/// binary inside its cgroup and the node's namespace: one probe from
/// `PALISADE_SOCKET_PROBE` (`udp ADDR`: an unconnected datagram and
/// its reply; `tcp ADDR`: a connection and its peer's name), answered on
/// a line starting `probe: `. Without the variable it does nothing.
#[test]
#[ignore = "run by node_processes_reach_a_cluster_ip_through_the_socket_hooks"]
fn socket_probe_child() {
    use std::net::{TcpStream, UdpSocket};
    use std::time::Duration;

    let Ok(probe) = std::env::var("PALISADE_SOCKET_PROBE") else {
        return;
    };
    let mut words = probe.split_whitespace();
    let (Some(kind), Some(to)) = (words.next(), words.next()) else {
        panic!("`udp ADDR` or `tcp ADDR`");
    };
    let to: SocketAddr = to.parse().expect("a socket address");
    let answer = match kind {
        "udp" => (|| -> std::io::Result<String> {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(any)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"who", to)?;
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(format!(
                "{} from {from}",
                String::from_utf8_lossy(&buf[..n])
            ))
        })(),
        "udp-flow" => (|| -> std::io::Result<String> {
            // Six datagrams of one unconnected socket, each answered.
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut names = Vec::new();
            for _ in 0..6 {
                s.send_to(b"who", to)?;
                let mut buf = [0u8; 64];
                let (n, _) = s.recv_from(&mut buf)?;
                names.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Ok(names.join(","))
        })(),
        "udp-aged" => (|| -> std::io::Result<String> {
            // `udp-aged ADDR IDLE REPLIED STRAY PIN`: a datagram and its
            // reply; then this socket's flow is made IDLE seconds old,
            // replied or not, its backend STRAY (same port), in the
            // pinned flow map PIN; then a second datagram.
            let rest: Vec<&str> = words.collect();
            let [idle, replied, stray, pin] = rest[..] else {
                panic!("udp-aged ADDR IDLE REPLIED STRAY PIN: {rest:?}");
            };
            let idle: u32 = idle.parse().expect("seconds");
            let stray: std::net::Ipv4Addr = stray.parse().expect("an IPv4 address");
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 64];
            s.send_to(b"who", to)?;
            let (n, _) = s.recv_from(&mut buf)?;
            let first = String::from_utf8_lossy(&buf[..n]).into_owned();
            age_socket_flow(&s, pin, idle, replied == "1", stray)?;
            s.send_to(b"who", to)?;
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(format!("{first},{}", String::from_utf8_lossy(&buf[..n])))
        })(),
        "tcp" => TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .and_then(|s| s.peer_addr())
            .map(|p| format!("peer {p}")),
        other => panic!("unknown probe {other}"),
    };
    match answer {
        Ok(a) => println!("probe: {a}"),
        Err(e) => println!("probe: error {e}"),
    }
}

/// Makes socket `s`'s UDP flows in the pinned map `pin` `idle` seconds
/// old, replied or not, with their backend moved to `stray`.
fn age_socket_flow(
    s: &std::net::UdpSocket,
    pin: &str,
    idle: u32,
    replied: bool,
    stray: std::net::Ipv4Addr,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;

    use aya::maps::{HashMap, MapData};
    use policy_bpf_common::{SockFlowValue, SockReverseKey};

    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into `cookie`, whose size `len` says.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let data = MapData::from_pin(pin).map_err(std::io::Error::other)?;
    let mut flows: HashMap<MapData, SockReverseKey, SockFlowValue> =
        HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(std::io::Error::other)?;
    let mine: Vec<(SockReverseKey, SockFlowValue)> = flows
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.cookie == cookie)
        .collect();
    assert_eq!(mine.len(), 1, "one flow for the socket");
    for (k, mut v) in mine {
        v.seen = v.seen.saturating_sub(idle).max(1);
        v.flags = if replied { SOCK_FLOW_REPLIED } else { 0 };
        v.backend = [0; 16];
        v.backend[..4].copy_from_slice(&stray.octets());
        flows.insert(k, v, 0).map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// Pins of a build whose service configuration record was shorter (40
/// bytes, before the service ranges): the new load replaces it with its
/// own, carrying the primary addresses and flags over, so the programs
/// load and connections through the ClusterIP are translated before the
/// next table write.
#[test]
fn a_shorter_pinned_service_configuration_is_replaced_and_carried_over() {
    use aya::maps::{Array, MapData};
    use policy_bpf_common::map_names::SVC_CONFIG;

    if !privileged() {
        return;
    }
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-config-pins-{}",
        std::process::id()
    ));
    let _pins = Pins(dir.clone());
    let written = {
        let mut dp = Datapath::load(&dir, Capacity::verification()).unwrap();
        dp.set_services(&table(&[
            service("api", VIP, false),
            slice("api", &["10.0.2.5"]),
        ]))
        .unwrap();
        dp.services().unwrap().config
    };
    // As the earlier build pinned it: two addresses, the flags, padding.
    let mut old = [0u8; 40];
    old[..16].copy_from_slice(&written.primary_v4);
    old[16..32].copy_from_slice(&written.primary_v6);
    old[32..36].copy_from_slice(&written.flags.to_ne_bytes());
    std::fs::remove_file(dir.join(SVC_CONFIG)).unwrap();
    let mut short: Array<MapData, [u8; 40]> = Array::create(1, 0).unwrap();
    short.set(0, old, 0).unwrap();
    short.pin(dir.join(SVC_CONFIG)).unwrap();

    let dp = Datapath::load(&dir, Capacity::verification()).unwrap();
    let (_, out) = dp
        .run_service(&packet(6, sock(CLIENT, 40_778), sock(VIP, 80), 0x02), 0)
        .unwrap();
    assert_eq!(
        destination(&out),
        sock("10.0.2.5", 8080),
        "translated with the carried configuration"
    );
    let info = aya::maps::MapInfo::from_pin(dir.join(SVC_CONFIG)).unwrap();
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<policy_bpf_common::ServiceConfig>()
    );
    drop(dp);
}

/// Pins of a build before the address filter: the new load creates the
/// filter empty beside tables and connections in force, and fills it from
/// the pinned frontends and backends before its programs run, so an
/// established connection's replies still find their entry.
#[test]
fn a_filter_new_to_adopted_pins_is_filled_from_their_tables() {
    if !privileged() {
        return;
    }
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-filter-pins-{}",
        std::process::id()
    ));
    let _pins = Pins(dir.clone());
    let backends = ["10.0.2.5", "10.0.3.6"];
    let client = sock(CLIENT, 40_777);
    let backend = {
        let mut dp = Datapath::load(&dir, Capacity::verification()).unwrap();
        dp.set_services(&table(&[
            service("api", VIP, false),
            slice("api", &backends),
        ]))
        .unwrap();
        let (_, out) = dp
            .run_service(&packet(6, client, sock(VIP, 80), 0x02), 0)
            .unwrap();
        destination(&out)
    };
    // As an earlier build left them: no filter pinned.
    std::fs::remove_file(dir.join(policy_bpf_common::map_names::SVC_FILTER)).unwrap();
    let dp = Datapath::load(&dir, Capacity::verification()).unwrap();
    // The ClusterIP's bit and both backends' (no table written yet).
    assert!(
        dp.service_filter_bits() >= 3,
        "{} bits",
        dp.service_filter_bits()
    );
    let (_, back) = dp
        .run_service(&packet(6, backend, client, 0x12), 0)
        .unwrap();
    assert_eq!(
        (source(&back), destination(&back)),
        (sock(VIP, 80), client),
        "the reply kept the backend's address"
    );
    drop(dp);
}
