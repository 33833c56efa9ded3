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

/// A datapath balancing one Service (`api` at [`VIP`], TCP 80 and UDP 53)
/// over `backends`.
pub(super) fn load_api(backends: &[&str]) -> Datapath {
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", backends),
    ]))
    .unwrap();
    dp
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

/// The service benchmarks' second floor (`palisade_nat_floor`) does what
/// their report says it does: a new connection's two entries recorded
/// (its way there and its way back), the rest of the connection meeting
/// them, every packet passed as it came, nothing decided (a ClusterIP's
/// packets are not translated).
#[test]
fn the_nat_floor_records_each_new_connection_and_rewrites_nothing() {
    if !privileged() {
        return;
    }
    let dp = load_api(&["10.0.2.5"]);
    let recorded =
        |dp: &Datapath| dp.stats().unwrap()[policy_bpf_common::Statistic::ServiceNat as usize];
    let (client, server) = (sock(CLIENT, 40_000), sock("10.0.2.5", 8080));
    let connection = [
        packet(6, client, server, 0x02),
        packet(6, server, client, 0x12),
        packet(6, client, server, 0x10),
        packet(6, client, server, 0x04),
    ];
    for p in &connection {
        let (r, out) = dp.run_nat_floor(p).unwrap();
        assert!(r.passed(), "{r:?}");
        assert_eq!(&out, p, "the packet passes as it came");
    }
    let mut keys: Vec<(SocketAddr, SocketAddr)> = dp
        .nat_entries()
        .unwrap()
        .iter()
        .map(|(k, _)| {
            let at = |a: [u8; 16], port: u16| {
                SocketAddr::new(IpAddr::from([a[0], a[1], a[2], a[3]]), port)
            };
            (at(k.src, k.src_port), at(k.dst, k.dst_port))
        })
        .collect();
    keys.sort();
    assert_eq!(keys, vec![(client, server), (server, client)]);
    assert_eq!(recorded(&dp), 1, "one connection recorded");

    // A packet no entry covers that opens nothing records nothing; a
    // connection to the ClusterIP is recorded as it came, not translated.
    let stray = packet(6, sock(CLIENT, 40_001), server, 0x10);
    dp.run_nat_floor(&stray).unwrap();
    assert_eq!(dp.nat_entries().unwrap().len(), 2);
    let to_vip = packet(6, sock(CLIENT, 40_002), sock(VIP, 80), 0x02);
    let (r, out) = dp.run_nat_floor(&to_vip).unwrap();
    assert!(
        r.passed() && out == to_vip,
        "nothing decided, nothing rewritten"
    );
    assert_eq!((dp.nat_entries().unwrap().len(), recorded(&dp)), (4, 2));
}
