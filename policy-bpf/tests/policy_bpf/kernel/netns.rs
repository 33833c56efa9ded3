//! Real traffic between network namespaces: the netns engine against the
//! reference, local delivery like the node forwards, a restart that keeps
//! established connections.

use super::*;
use policy_bpf_common::map_names;

/// Real traffic: the netns engine answers every pod pair of the example
/// like the reference (TCP, UDP and ICMP).
#[test]
fn netns_matches_the_reference_on_the_example() {
    if !privileged() {
        return;
    }
    let cluster = example();
    let engine = NetnsEngine::new(&cluster, Capacity::default()).unwrap();
    let reference = ReferenceEngine::new(&cluster);
    let eps: Vec<&Endpoint> = cluster.endpoints().collect();
    let mut allowed = 0;
    for a in &eps {
        for b in &eps {
            if a.key == b.key {
                continue;
            }
            let flows = [
                Flow::ports(a.ips[0], b.ips[0], Protocol::TCP, 41000, 8080),
                Flow::ports(a.ips[0], b.ips[0], Protocol::UDP, 41000, 53),
                Flow {
                    src: a.ips[0],
                    dst: b.ips[0],
                    protocol: Protocol::ICMP,
                    src_port: 0,
                    dst_port: 0,
                    icmp: Some((8, 0)),
                },
            ];
            for f in flows {
                let (from, to) = (Peer::Endpoint(a.key.clone()), Peer::Endpoint(b.key.clone()));
                let got = evaluate_connection(&engine, &cluster, &from, &to, &f).unwrap();
                let want = evaluate_connection(&reference, &cluster, &from, &to, &f).unwrap();
                assert_eq!(got.allowed, want.allowed, "{from} -> {to} {f}");
                assert_eq!(got.egress, want.egress, "{from} -> {to} {f}");
                if got.allowed {
                    allowed += 1;
                    assert_eq!(got.ingress, want.ingress);
                }
            }
        }
    }
    // web -> api TCP, and every pod's DNS to coredns over UDP.
    assert!(allowed >= 5, "{allowed} allowed connections");
    // Those went straight from pod to pod, both policies judged on the
    // way (the ingress rules above came from those judgements).
    let delivered = engine
        .with_datapath(|dp| dp.stats().unwrap()[Statistic::Delivered as usize])
        .unwrap();
    assert!(delivered >= 2 * allowed, "{delivered} delivered packets");
}

/// The example as a node: a namespace per pod, the datapath programmed
/// with its policy, attached to every host veth, and every pod address
/// a local delivery target.
struct ExampleNode {
    topo: Topology,
    dp: Datapath,
    compiler: Compiler,
    bindings: Vec<(EndpointKey, Binding)>,
    /// Host-side interfaces, in pod order.
    ifaces: Vec<String>,
}

impl ExampleNode {
    fn up(mut dp: Datapath) -> ExampleNode {
        let cluster = example();
        let (compiler, delta) =
            Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        let pods: Vec<(EndpointKey, Vec<IpAddr>)> = cluster
            .endpoints()
            .map(|e| (e.key.clone(), e.ips.clone()))
            .collect();
        let topo = Topology::build(&pods).unwrap();
        let bindings: Vec<(EndpointKey, Binding)> = topo
            .pods()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let b = Binding {
                    ifindex: p.ifindex,
                    zone: i as u32 + 1,
                };
                (p.key.clone(), b)
            })
            .collect();
        let mut lowering = Lowering::new(Capacity::default());
        let before = lowering.mirror().clone();
        let mut plan = lowering.lower(&delta).unwrap();
        for (k, b) in &bindings {
            plan.switch
                .extend(lowering.bind(k, Some(*b)).unwrap().switch);
        }
        dp.write(&plan, &before).unwrap();
        let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
        topo.node()
            .run(|| ifaces.iter().try_for_each(|i| dp.attach(i)))
            .unwrap()
            .unwrap();
        for (ip, ep) in topo.local_endpoints() {
            dp.set_local_endpoint(ip, Some(ep)).unwrap();
        }
        ExampleNode {
            topo,
            dp,
            compiler,
            bindings,
            ifaces,
        }
    }
}

/// Local delivery is forwarding: a packet with no hop left is the
/// node's to answer (ICMP time exceeded), not delivered; with hops left
/// it arrives one hop less.
#[test]
fn local_delivery_forwards_like_the_node() {
    use std::net::UdpSocket;
    if !privileged() {
        return;
    }
    let ExampleNode {
        topo,
        mut dp,
        ifaces,
        ..
    } = ExampleNode::up(Datapath::load_private(Capacity::default()).unwrap());
    let web = topo.pod(&key("shop-frontend/web")).unwrap();
    let dns = topo.pod(&key("kube-system/coredns")).unwrap();
    let server = dns
        .ns
        .run(|| UdpSocket::bind("10.10.0.53:53"))
        .unwrap()
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Report each datagram's TTL.
    nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::Ipv4RecvTtl, &true).unwrap();
    let client = web
        .ns
        .run(|| UdpSocket::bind("10.10.1.10:0"))
        .unwrap()
        .unwrap();
    let delivered = |dp: &Datapath| dp.stats().unwrap()[Statistic::Delivered as usize];
    for (ttl, arrives) in [(1u32, false), (5, true)] {
        client.set_ttl(ttl).unwrap();
        let before = delivered(&dp);
        client.send_to(b"query", "10.10.0.53:53").unwrap();
        let got = recv_ttl(&server);
        if arrives {
            assert_eq!(got, Some(ttl as u8 - 1), "TTL {ttl}: one hop less");
            assert_eq!(delivered(&dp), before + 1, "TTL {ttl}: delivered locally");
        } else {
            assert_eq!(got, None, "TTL {ttl} must not arrive");
            assert_eq!(delivered(&dp), before, "TTL {ttl}: left to the node");
        }
    }
    // The first datagram recorded both sides' approvals in one entry:
    // the next one of the flow is established on both.
    let stats = |dp: &Datapath| dp.stats().unwrap();
    let before = stats(&dp);
    client.send_to(b"query", "10.10.0.53:53").unwrap();
    assert_eq!(recv_ttl(&server), Some(4));
    let after = stats(&dp);
    let grew = |s: Statistic| after[s as usize] - before[s as usize];
    assert_eq!(
        (
            grew(Statistic::NewFlows),
            grew(Statistic::Established),
            grew(Statistic::Delivered)
        ),
        (0, 2, 1),
        "new flows, established, delivered"
    );
    // Without its entry, the pod is reached through the node as before.
    dp.set_local_endpoint(ip("10.10.0.53"), None).unwrap();
    let before = delivered(&dp);
    client.send_to(b"query", "10.10.0.53:53").unwrap();
    assert_eq!(recv_ttl(&server), Some(4), "routed by the node");
    assert_eq!(delivered(&dp), before);
    for i in &ifaces {
        topo.node().run(|| dp.detach(i)).unwrap().unwrap();
    }
}

/// Real sockets under default deny: web's UDP socket connected to
/// coredns on a port nothing listens on learns it at once
/// (ECONNREFUSED): coredns's port unreachable is about a flow both
/// sides' policies allowed, so it passes with it (conntrack's RELATED),
/// where neither policy allows ICMP between them. An error about a flow
/// never allowed stays dropped: web's socket to api's UDP port (denied)
/// only times out.
#[test]
fn icmp_errors_about_allowed_flows_reach_the_socket_under_default_deny() {
    use std::net::UdpSocket;
    if !privileged() {
        return;
    }
    let ExampleNode {
        topo,
        mut dp,
        ifaces,
        ..
    } = ExampleNode::up(Datapath::load_private(Capacity::default()).unwrap());
    let web = topo.pod(&key("shop-frontend/web")).unwrap();
    let refused = |to: &str| -> std::io::ErrorKind {
        let s = web
            .ns
            .run(|| UdpSocket::bind("10.10.1.10:0"))
            .unwrap()
            .unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.send(b"query").unwrap();
        s.recv(&mut [0u8; 16]).unwrap_err().kind()
    };
    // Nothing listens on coredns's port 53 here.
    assert_eq!(
        refused("10.10.0.53:53"),
        std::io::ErrorKind::ConnectionRefused,
        "the port unreachable reaches web"
    );
    assert_eq!(
        refused("10.10.2.10:53"),
        std::io::ErrorKind::WouldBlock,
        "web -> api:53 is denied: nothing comes back"
    );
    for i in &ifaces {
        topo.node().run(|| dp.detach(i)).unwrap().unwrap();
    }
}

/// One datagram's TTL (from IP_RECVTTL), or None on timeout.
fn recv_ttl(s: &std::net::UdpSocket) -> Option<u8> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!(i32);
    let msg =
        recvmsg::<SockaddrStorage>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
            .ok()?;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::Ipv4Ttl(ttl) = c {
            return Some(ttl as u8);
        }
    }
    panic!("no TTL reported with the datagram");
}

/// A restarted agent re-adopts the pinned maps and links: an established
/// connection keeps flowing while the agent is down and after it is back,
/// and policy still decides new connections.
#[test]
fn restart_keeps_established_connections() {
    if !privileged() {
        return;
    }
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/palisade-test-restart-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&pin);
    let cap = Capacity::default();

    // First agent: load, program, attach.
    let ExampleNode {
        topo,
        dp,
        compiler,
        bindings,
        ifaces,
    } = ExampleNode::up(Datapath::load(&pin, cap).unwrap());
    assert_eq!(dp.local4_disagreements().unwrap(), Vec::<String>::new());

    // web -> api:8080 is allowed: connect and exchange data.
    let web = topo.pod(&key("shop-frontend/web")).unwrap();
    let api = topo.pod(&key("shop-backend/api")).unwrap();
    let analytics = topo.pod(&key("analytics/reporting")).unwrap();
    let listener = api
        .ns
        .run(|| TcpListener::bind("10.10.2.10:8080"))
        .unwrap()
        .unwrap();
    let mut client = web
        .ns
        .run(|| {
            TcpStream::connect_timeout(&"10.10.2.10:8080".parse().unwrap(), Duration::from_secs(2))
        })
        .unwrap()
        .expect("web -> api:8080 is allowed");
    let (mut server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let exchange = |client: &mut TcpStream, server: &mut TcpStream, what: &str| {
        let mut buf = [0u8; 5];
        client.write_all(b"ping!").unwrap();
        server
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: request lost: {e}"));
        server.write_all(b"pong!").unwrap();
        client
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: reply lost: {e}"));
        assert_eq!(&buf, b"pong!");
    };
    let delivered = |dp: &Datapath| dp.stats().unwrap()[Statistic::Delivered as usize];
    let before = delivered(&dp);
    exchange(&mut client, &mut server, "before the restart");
    assert!(
        delivered(&dp) >= before + 2,
        "request and reply went straight into the other pod"
    );
    let denied = |what: &str| {
        let r = analytics.ns.run(|| {
            TcpStream::connect_timeout(
                &"10.10.2.10:8080".parse().unwrap(),
                Duration::from_millis(300),
            )
        });
        assert!(
            r.unwrap().is_err(),
            "{what}: analytics -> api:8080 must stay denied"
        );
    };
    denied("before the restart");

    // The agent goes away: maps and links stay pinned, traffic flows
    // (local delivery too: its jump table is pinned).
    let before = delivered(&dp);
    drop(dp);
    exchange(&mut client, &mut server, "while the agent is down");
    denied("while the agent is down");

    // A new agent: re-adopt the pins, swap in its programs, rewrite the
    // policy around what is live. Its pins lack the IPv4 fast slots, as
    // those of a build before them do: it fills them from the slots.
    std::fs::remove_file(pin.join(map_names::LOCAL4)).unwrap();
    let mut dp = Datapath::load(&pin, cap).unwrap();
    assert!(
        delivered(&dp) >= before + 2,
        "local delivery went on while the agent was down"
    );
    assert_eq!(dp.local4_disagreements().unwrap(), Vec::<String>::new());
    assert!(
        dp.conntrack_len() > 0,
        "conntrack survived in the pinned map"
    );
    let adopted = dp.adopt_links().unwrap();
    assert_eq!(adopted.len(), 2 * ifaces.len(), "{adopted:?}");
    let current = dp.read_mirror();
    let in_use = dp.read_in_use();
    let (mut lowering, plan) =
        Lowering::restart(cap, &compiler, &bindings, &current, &in_use).unwrap();
    dp.write(&plan, &current).unwrap();
    assert_eq!(dp.local4_disagreements().unwrap(), Vec::<String>::new());
    lowering.release_reserved();
    let established_before = dp.stats().unwrap()[Statistic::Established as usize];
    let delivered_before = delivered(&dp);
    exchange(&mut client, &mut server, "after the restart");
    assert!(
        dp.stats().unwrap()[Statistic::Established as usize] > established_before,
        "the connection went through conntrack in the new programs"
    );
    assert!(
        delivered(&dp) >= delivered_before + 2,
        "the new programs deliver locally"
    );
    denied("after the restart");
    // A new allowed connection is decided by the rewritten policy.
    let again = web.ns.run(|| {
        TcpStream::connect_timeout(&"10.10.2.10:8080".parse().unwrap(), Duration::from_secs(2))
    });
    assert!(
        again.unwrap().is_ok(),
        "new web -> api:8080 after the restart"
    );

    for i in &ifaces {
        topo.node().run(|| dp.detach(i)).unwrap().unwrap();
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(&pin);
}

/// The example node with `service` (named `api`, backed by
/// shop-backend/api at 10.10.2.10:8080) on every interface, and a
/// listener on that backend.
fn example_with_service(service: serde_json::Value) -> (ExampleNode, TcpListener) {
    use super::services::{slice, table};
    let mut node = ExampleNode::up(Datapath::load_private(Capacity::verification()).unwrap());
    node.dp
        .set_services(&table(&[service, slice("api", &["10.10.2.10"])]))
        .unwrap();
    let (dp, ifaces) = (&mut node.dp, &node.ifaces);
    node.topo
        .node()
        .run(|| ifaces.iter().try_for_each(|i| dp.attach_service(i)))
        .unwrap()
        .unwrap();
    let listener = node
        .topo
        .pod(&key("shop-backend/api"))
        .unwrap()
        .ns
        .run(|| TcpListener::bind("10.10.2.10:8080"))
        .unwrap()
        .unwrap();
    (node, listener)
}

/// Policy after NAT, Calico's way, with real connections: on the example
/// node with its zero-trust policy, a Service whose backend is `api`.
/// `web` (allowed to api:8080) reaches it through the ClusterIP and gets
/// its replies (judged by policy as the connection to the backend, then
/// translated back, local delivery included); `analytics` (denied) does
/// not get through the ClusterIP either.
#[test]
fn policy_judges_the_backend_of_a_cluster_ip_connection() {
    if !privileged() {
        return;
    }
    use super::services::{service, sock};
    let (ExampleNode { topo, dp, .. }, listener) =
        example_with_service(service("api", "172.30.0.10", false));
    let web = topo.pod(&key("shop-frontend/web")).unwrap();
    let analytics = topo.pod(&key("analytics/reporting")).unwrap();
    let vip = sock("172.30.0.10", 80);
    let mut client = web
        .ns
        .run(|| TcpStream::connect_timeout(&vip, Duration::from_secs(2)))
        .unwrap()
        .expect("web -> api through the ClusterIP is allowed");
    let (mut server, seen) = listener.accept().unwrap();
    assert_eq!(seen.ip(), web.ips[0], "the backend sees the client pod");
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let mut buf = [0u8; 5];
    client.write_all(b"ping!").unwrap();
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"pong!").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong!");
    assert_eq!(client.peer_addr().unwrap(), vip);
    let r = analytics
        .ns
        .run(|| TcpStream::connect_timeout(&vip, Duration::from_millis(300)));
    assert!(
        r.unwrap().is_err(),
        "analytics -> api:8080 is denied, through the ClusterIP too"
    );
    let stats = dp.stats().unwrap();
    assert!(
        stats[Statistic::ServiceTranslated as usize] >= 2,
        "replies translated back"
    );
}

/// A masqueraded connection (a pod to a NodePort, `externalTrafficPolicy:
/// Cluster`): policy judges client and backend, the SNAT to the node's
/// address comes after it (before it, the client's own hook would see a
/// source that is not the pod's), and the reply has it undone before
/// policy and the frontend restored after.
#[test]
fn masqueraded_connections_are_judged_before_their_snat() {
    if !privileged() {
        return;
    }
    use super::services::sock;
    let node_port = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "172.30.0.10",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}});
    // The datapath bound for the test's length: dropped, it would detach.
    let (ExampleNode { topo, dp: _dp, .. }, listener) = example_with_service(node_port);
    let web = topo.pod(&key("shop-frontend/web")).unwrap();
    let analytics = topo.pod(&key("analytics/reporting")).unwrap();
    let frontend = sock("192.168.0.2", 30080);
    let mut client = web
        .ns
        .run(|| TcpStream::connect_timeout(&frontend, Duration::from_secs(2)))
        .unwrap()
        .expect("web -> api through the NodePort is allowed");
    let (mut server, seen) = listener.accept().unwrap();
    assert_eq!(
        seen.ip(),
        ip("192.168.0.2"),
        "masqueraded to the node's address"
    );
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    }
    let mut buf = [0u8; 5];
    client.write_all(b"ping!").unwrap();
    server.read_exact(&mut buf).unwrap();
    server.write_all(b"pong!").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong!");
    let r = analytics
        .ns
        .run(|| TcpStream::connect_timeout(&frontend, Duration::from_millis(300)));
    assert!(
        r.unwrap().is_err(),
        "analytics -> api:8080 is denied through the NodePort too"
    );
}
