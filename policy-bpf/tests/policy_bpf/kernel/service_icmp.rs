//! ICMP errors about flows through a Service are translated as conntrack
//! translates a flow's RELATED packets behind kube-proxy: the quoted
//! packet back to what its sender sent, the error readdressed as the
//! flow's reply would be (a backend's own error from the frontend, a
//! router's from the router), so that the client's socket, connected to
//! the frontend, sees its port unreachable or its path MTU.

use std::net::{IpAddr, SocketAddr};

use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use serde_json::json;

use super::privileged;
use super::services::{config, fold, load, packet, service, slice, sock, sum16, table};

const VIP: &str = "172.30.0.10";

/// An ICMP error (`kind`, `code`) from `from` to `to` quoting the IP
/// packet `quoted` (Ethernet header included, cut to what an error
/// quotes), with valid checksums.
fn icmp_error(from: &str, to: &str, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let (from, to): (IpAddr, IpAddr) = (from.parse().unwrap(), to.parse().unwrap());
    let v4 = from.is_ipv4();
    let quote = if v4 {
        &quoted[14..14 + 28]
    } else {
        &quoted[14..14 + 48]
    };
    let mut body = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    body.extend_from_slice(quote);
    let mut p = policy_bpf::packet::ip_packet(from, to, if v4 { 1 } else { 58 }, &body);
    if v4 {
        let c = fold(sum16(&p[14..34], 0));
        p[24..26].copy_from_slice(&c.to_be_bytes());
        let c = fold(sum16(&p[34..], 0));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    } else {
        let c = icmpv6_sum(&p);
        p[56..58].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// ICMPv6's checksum over the packet as it is (0 when it holds).
fn icmpv6_sum(p: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[22..54]);
    pseudo.extend_from_slice(&((p.len() - 54) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    fold(sum16(&p[54..], sum16(&pseudo, 0)))
}

/// An ICMP error as read back: outer source and destination, the quoted
/// packet's source and destination (with ports); every checksum checked.
fn read(p: &[u8]) -> (IpAddr, IpAddr, SocketAddr, SocketAddr) {
    let v4 = p[12..14] == [0x08, 0x00];
    let (outer, inner) = if v4 { (14, 42) } else { (14, 62) };
    let ip = |at: usize| -> IpAddr {
        if v4 {
            IpAddr::from(<[u8; 4]>::try_from(&p[at..at + 4]).unwrap())
        } else {
            IpAddr::from(<[u8; 16]>::try_from(&p[at..at + 16]).unwrap())
        }
    };
    let (src_at, dst_at, header) = if v4 { (12, 16, 20) } else { (8, 24, 40) };
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    let l4 = inner + header;
    if v4 {
        assert_eq!(
            fold(sum16(&p[outer..outer + 20], 0)),
            0,
            "IPv4 header checksum"
        );
        assert_eq!(
            fold(sum16(&p[inner..inner + 20], 0)),
            0,
            "quoted header checksum"
        );
        assert_eq!(fold(sum16(&p[34..], 0)), 0, "ICMP checksum");
    } else {
        assert_eq!(icmpv6_sum(p), 0, "ICMPv6 checksum");
    }
    (
        ip(outer + src_at),
        ip(outer + dst_at),
        SocketAddr::new(ip(inner + src_at), port(l4)),
        SocketAddr::new(ip(inner + dst_at), port(l4 + 2)),
    )
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn icmp_errors_about_flows_through_a_service_are_translated() {
    if !privileged() {
        return;
    }
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
    let (vip, backend) = (sock(VIP, 53), sock("10.0.2.5", 5353));

    // A backend's port unreachable about a client's datagram: from the
    // Service, about the datagram as the client sent it.
    let client = sock("10.0.1.9", 40_500);
    let (_, sent) = dp.run_service(&packet(17, client, vip, 0), 0).unwrap();
    let error = icmp_error("10.0.2.5", "10.0.1.9", 3, 3, &sent);
    let (_, out) = dp.run_service(&error, 0).unwrap();
    assert_eq!(read(&out), (addr(VIP), addr("10.0.1.9"), client, vip));
    // The same met only after policy (a backend on another node).
    let (_, out) = dp.run_reply_nat(&error).unwrap();
    assert_eq!(read(&out), (addr(VIP), addr("10.0.1.9"), client, vip));

    // A router's "fragmentation needed" about a TCP segment keeps the
    // router's address.
    let tcp = sock("10.0.1.9", 40_501);
    let (_, syn) = dp
        .run_service(&packet(6, tcp, sock(VIP, 80), 0x02), 0)
        .unwrap();
    let error = icmp_error("10.0.9.1", "10.0.1.9", 3, 4, &syn);
    let (_, out) = dp.run_service(&error, 0).unwrap();
    assert_eq!(
        read(&out),
        (addr("10.0.9.1"), addr("10.0.1.9"), tcp, sock(VIP, 80))
    );

    // Masqueraded (a client outside the cluster): the error to the
    // node's port goes to the client, about its own datagram.
    let outside = sock("192.168.5.9", 40_502);
    let (_, sent) = dp.run_service(&packet(17, outside, vip, 0), 0).unwrap();
    let node = super::services::source(&sent);
    assert_ne!(node, outside);
    let error = icmp_error("10.0.2.5", &node.ip().to_string(), 3, 3, &sent);
    let (_, out) = dp.run_service(&error, 0).unwrap();
    assert_eq!(read(&out), (addr(VIP), addr("192.168.5.9"), outside, vip));

    // The client's own error about a reply it did not want goes to the
    // backend, about the reply as the backend sent it.
    let (_, reply) = dp.run_service(&packet(17, backend, client, 0), 0).unwrap();
    assert_eq!(super::services::source(&reply), vip);
    let error = icmp_error("10.0.1.9", VIP, 3, 3, &reply);
    let (_, out) = dp.run_service(&error, 0).unwrap();
    assert_eq!(
        read(&out),
        (addr("10.0.1.9"), addr("10.0.2.5"), backend, client)
    );

    // An error about no translated flow is left as it is.
    let stranger = packet(17, sock("10.0.1.9", 40_999), backend, 0);
    let error = icmp_error("10.0.2.5", "10.0.1.9", 3, 3, &stranger);
    let (_, out) = dp.run_service(&error, 0).unwrap();
    assert_eq!(out, error);
}

#[test]
fn icmpv6_errors_about_flows_through_a_service_are_translated() {
    if !privileged() {
        return;
    }
    let objects = Objects::from_documents(&[
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "api6", "namespace": "default"},
               "spec": {"clusterIP": "fd30::10", "ipFamilies": ["IPv6"],
                        "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "api6-1", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "api6"}},
               "addressType": "IPv6",
               "endpoints": [{"addresses": ["fd10::5"], "conditions": {"ready": true}}],
               "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"}]}),
    ])
    .unwrap();
    let v6 = ProxyConfig {
        family: Family::V6,
        node_ips: vec!["fd00::2".parse().unwrap()],
        cluster_cidrs: vec!["fd10::/64".parse().unwrap()],
        service_cidrs: vec!["fd30::/112".parse().unwrap()],
        ..config()
    };
    let mut dp = load();
    dp.set_services(&ServiceTable::build(
        v6,
        &objects.service_ports(Family::V6).unwrap(),
    ))
    .unwrap();
    let (client, vip) = (sock("fd10::9", 40_600), sock("fd30::10", 53));
    let datagram = {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&client.port().to_be_bytes());
        l4[2..4].copy_from_slice(&vip.port().to_be_bytes());
        l4[4..6].copy_from_slice(&8u16.to_be_bytes());
        policy_bpf::packet::ip_packet(client.ip(), vip.ip(), 17, &l4)
    };
    let (_, sent) = dp.run_service(&datagram, 0).unwrap();
    let backend: std::net::Ipv6Addr = "fd10::5".parse().unwrap();
    assert_eq!(sent[38..54], backend.octets(), "translated to the backend");
    // Packet too big from a router, port unreachable from the backend.
    for (from, kind, code, source) in [("fd10::1", 2, 0, "fd10::1"), ("fd10::5", 1, 4, "fd30::10")]
    {
        let error = icmp_error(from, "fd10::9", kind, code, &sent);
        let (_, out) = dp.run_service(&error, 0).unwrap();
        assert_eq!(
            read(&out),
            (addr(source), addr("fd10::9"), client, vip),
            "{from}"
        );
    }
}

/// Real sockets: a pod's UDP socket connected to the ClusterIP learns
/// that the backend has no such port (ECONNREFUSED) from the backend's
/// own port unreachable, as behind kube-proxy; without the translation
/// the error quotes the backend's address, no socket matches it, and the
/// client waits out its timeout.
#[test]
fn a_connected_udp_socket_is_refused_through_the_cluster_ip() {
    use std::net::UdpSocket;
    use std::time::Duration;

    use palisade_testing::netns::Topology;

    if !privileged() {
        return;
    }
    let topo = Topology::build(&[
        (super::key("default/client"), vec![super::ip("10.0.1.9")]),
        (super::key("default/api-a"), vec![super::ip("10.0.2.5")]),
    ])
    .unwrap();
    let mut dp = load();
    dp.set_services(&table(&[
        service("api", VIP, false),
        slice("api", &["10.0.2.5"]),
    ]))
    .unwrap();
    super::services::attach_service_on_pods(&mut dp, &topo);
    let client_pod = topo.pod(&super::key("default/client")).unwrap();
    // Nothing listens on the backend's 5353.
    let socket = client_pod
        .ns
        .run(|| UdpSocket::bind("10.0.1.9:0"))
        .unwrap()
        .unwrap();
    socket.connect(sock(VIP, 53)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket.send(b"query").unwrap();
    let mut buf = [0u8; 16];
    let err = socket.recv(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the backend's port unreachable reaches the socket: {err}"
    );
}
