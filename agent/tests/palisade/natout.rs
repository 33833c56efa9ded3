//! IP pools' `natOutgoing` on two nodes and a host outside the cluster
//! (on the underlay, with no route to any pool): what each destination
//! sees as the source, as Calico's rules decide it; a pool flipped by
//! `palisade apply` takes effect; a table removed by hand comes back; no
//! masquerading pool, no table.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_testing::netns::{Netns, ip_batch};

use super::lab::{Lab, on_store, wait_for};
use super::overlay::add;
use super::{privileged, scratch};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 250);

fn pools(frontend_nat: bool, backend_nat: bool) -> String {
    format!(
        "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {{name: frontend}}
spec: {{cidr: 10.10.0.0/16, vxlanMode: Always, natOutgoing: {frontend_nat}}}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {{name: backend}}
spec: {{cidr: 10.20.0.0/16, vxlanMode: Always, natOutgoing: {backend_nat}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
"
    )
}

/// A TCP listener in `ns` on `addr`; accepting is non-blocking.
fn listen(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let l = ns.run(|| TcpListener::bind(addr).unwrap()).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// The source address `l` sees when `from` connects to it.
fn tcp_peer(from: &Netns, l: &TcpListener) -> Option<IpAddr> {
    tcp_peer_via(from, l.local_addr().unwrap(), l)
}

/// The source address `l` sees when `from` connects to `to` (a service
/// address leading to it).
fn tcp_peer_via(from: &Netns, to: SocketAddr, l: &TcpListener) -> Option<IpAddr> {
    tcp_peer_socket(from, to, l).map(|p| p.ip())
}

/// The source address and port `l` sees when `from` connects to `to`.
fn tcp_peer_socket(from: &Netns, to: SocketAddr, l: &TcpListener) -> Option<SocketAddr> {
    let _client = from
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match l.accept() {
            Ok((_, peer)) => return Some(peer),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return None,
        }
    }
}

/// The source address `sock` sees for a datagram `from` sends it.
fn udp_peer(from: &Netns, sock: &UdpSocket) -> Option<IpAddr> {
    let to = sock.local_addr().unwrap();
    from.run(|| {
        UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(b"natOutgoing?", to)
            .unwrap()
    })
    .unwrap();
    let mut buf = [0u8; 64];
    sock.recv_from(&mut buf).ok().map(|(_, peer)| peer.ip())
}

fn nat_status(lab: &Lab, node: usize) -> Vec<String> {
    lab.nodes[node]
        .agent
        .status()
        .and_then(|s| serde_json::from_value(s["overlay"]["natOutgoing"].clone()).ok())
        .unwrap_or_default()
}

/// A host on the lab's underlay at [`OUTSIDE`], in a namespace `name`.
fn outside_host(lab: &Lab, name: &str) -> Netns {
    let outside = Netns::create(name).unwrap();
    ip_batch(
        Some(lab.fabric.name()),
        &[
            format!(
                "link add out type veth peer name eth0 netns {}",
                outside.name()
            ),
            "link set out master br0".into(),
            "link set out up".into(),
        ],
    )
    .unwrap();
    ip_batch(
        Some(outside.name()),
        &[
            "link set lo up".into(),
            format!("addr add {OUTSIDE}/24 dev eth0"),
            "link set eth0 up".into(),
        ],
    )
    .unwrap();
    outside
}

fn has_table(ns: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "list", "table", "inet", "palisade",
        ])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn nat_outgoing_masquerades_pods_leaving_the_pools_as_calico_does() {
    if !privileged() {
        return;
    }
    let dir = scratch("natout");
    let tag = std::process::id();
    let lab = Lab::start("no", 9140, &dir, &["node-a", "node-b"], &pools(true, false));
    // A host on the underlay outside the cluster: no route to any pool.
    let outside = outside_host(&lab, &format!("palnoo{tag}"));
    let pods: Vec<Netns> = (0..3)
        .map(|i| Netns::create(&format!("palnop{i}{tag}")).unwrap())
        .collect();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let web = add(a, &pods[0], "web", "frontend", "frontend", "web");
    let plain = add(a, &pods[1], "plain", "backend", "backend", "plain");
    let api = add(b, &pods[2], "api", "backend", "backend", "api");
    wait_for("node-a's natOutgoing table", 30, || {
        nat_status(&lab, 0) == ["10.10.0.0/16"] && has_table(a.ns.name())
    });
    wait_for("node-a's route to node-b's block", 30, || {
        super::lab::ip(a.ns.name(), "route show dev vxlan.calico").contains("10.20.")
    });

    let out_tcp = listen(&outside, (OUTSIDE, 9000).into());
    let out_udp = outside
        .run(|| UdpSocket::bind((OUTSIDE, 9001)).unwrap())
        .unwrap();
    out_udp
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let api_tcp = listen(&pods[2], (api, 8080).into());
    let node_b_tcp = listen(&b.ns, (NODE_B, 9002).into());
    let node_a_tcp = listen(&a.ns, (NODE_A, 9003).into());
    let node_a = IpAddr::V4(NODE_A);

    // A natOutgoing pod leaving the cluster: the outside host sees node-a
    // (and answers it: the connection is set up with no route to pods).
    assert_eq!(tcp_peer(&pods[0], &out_tcp), Some(node_a), "web -> outside");
    // A pod of a plain pool keeps its address.
    assert_eq!(
        udp_peer(&pods[1], &out_udp),
        Some(plain),
        "plain -> outside"
    );
    // Pods in any pool see the pod's own address, across the overlay too.
    assert_eq!(tcp_peer(&pods[0], &api_tcp), Some(web), "web -> api");
    // Another node's host address is outside the pools: masqueraded.
    assert_eq!(
        tcp_peer(&pods[0], &node_b_tcp),
        Some(node_a),
        "web -> node-b"
    );
    // This node's own address: never (the packet does not leave).
    assert_eq!(tcp_peer(&pods[0], &node_a_tcp), Some(web), "web -> node-a");

    // Felix's settings: IPPoolsAndHostIPs spares other nodes' addresses,
    // natPortRange bounds the masqueraded source ports.
    let felix = dir.join("felix.yaml");
    std::fs::write(
        &felix,
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\n\
         spec: {natOutgoingExclusions: IPPoolsAndHostIPs, natPortRange: '40000:40100', ipipMTU: 1400}\n",
    )
    .unwrap();
    on_store(&lab.store, &["apply", "-f", felix.to_str().unwrap()]);
    wait_for("node-b spared from the masquerade", 30, || {
        tcp_peer(&pods[0], &node_b_tcp) == Some(web)
    });
    for _ in 0..5 {
        let seen = tcp_peer_socket(&pods[0], out_tcp.local_addr().unwrap(), &out_tcp).unwrap();
        assert_eq!(seen.ip(), node_a, "web -> outside, still masqueraded");
        assert!(
            (40000..=40100).contains(&seen.port()),
            "source port {} outside natPortRange",
            seen.port()
        );
    }
    // A node's own configuration wins field by field: node-a back to
    // IPPoolsOnly, the port range still the default's.
    std::fs::write(
        &felix,
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: node.node-a}\n\
         spec: {natOutgoingExclusions: IPPoolsOnly}\n",
    )
    .unwrap();
    on_store(&lab.store, &["apply", "-f", felix.to_str().unwrap()]);
    wait_for("node-b masqueraded again from node-a", 30, || {
        tcp_peer(&pods[0], &node_b_tcp) == Some(node_a)
    });
    let seen = tcp_peer_socket(&pods[0], out_tcp.local_addr().unwrap(), &out_tcp).unwrap();
    assert!((40000..=40100).contains(&seen.port()), "{seen}");
    // A bad setting is refused by the store, naming the field.
    std::fs::write(
        &felix,
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\n\
         spec: {natPortRange: '65000:100'}\n",
    )
    .unwrap();
    let refused = super::palisade()
        .args(["apply", "-f", felix.to_str().unwrap()])
        .args(lab.store.iter())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("spec.natPortRange"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // A table removed by hand comes back (read back every few seconds).
    assert!(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                a.ns.name(),
                "nft",
                "delete",
                "table",
                "inet",
                "palisade"
            ])
            .status()
            .unwrap()
            .success()
    );
    wait_for("the natOutgoing table rewritten", 30, || {
        has_table(a.ns.name())
    });
    assert_eq!(
        tcp_peer(&pods[0], &out_tcp),
        Some(node_a),
        "after the rewrite"
    );

    // The backend pool turns natOutgoing on: new flows of its pods are
    // masqueraded; then no pool masquerades and the tables go.
    let file = dir.join("pools.yaml");
    std::fs::write(&file, pools(true, true)).unwrap();
    on_store(&lab.store, &["apply", "-f", file.to_str().unwrap()]);
    wait_for("backend masqueraded on node-a", 30, || {
        nat_status(&lab, 0) == ["10.10.0.0/16", "10.20.0.0/16"]
    });
    assert_eq!(
        udp_peer(&pods[1], &out_udp),
        Some(node_a),
        "plain, now natOutgoing"
    );
    std::fs::write(&file, pools(false, false)).unwrap();
    on_store(&lab.store, &["apply", "-f", file.to_str().unwrap()]);
    wait_for("no natOutgoing table on either node", 30, || {
        !has_table(a.ns.name()) && !has_table(b.ns.name())
    });
    assert_eq!(
        udp_peer(&pods[1], &out_udp),
        Some(plain),
        "no pool masquerades"
    );
    assert_eq!(
        tcp_peer(&pods[0], &api_tcp),
        Some(web),
        "pods still reach pods"
    );
    drop(lab);
}

/// kube-proxy's `--masquerade-all` with the backend on another node: the
/// connection to the ClusterIP is set up, and the backend sees the
/// client's node (the source rewritten to a node address before the
/// packet is routed must not be taken for a martian). The same for a
/// host outside the cluster reaching the NodePort on node-a's
/// `--service-interface`.
#[test]
fn a_masqueraded_service_connection_reaches_a_backend_on_another_node() {
    if !privileged() {
        return;
    }
    let dir = scratch("svc-masq");
    let tag = std::process::id();
    let lab = Lab::start_with(
        "sm",
        9145,
        &dir,
        &["node-a", "node-b"],
        &pools(false, false),
        &["--masquerade-all", "--service-interface", "eth0"],
    );
    let pods: Vec<Netns> = (0..2)
        .map(|i| Netns::create(&format!("palsmp{i}{tag}")).unwrap())
        .collect();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let web = add(a, &pods[0], "web", "frontend", "frontend", "web");
    let api = add(b, &pods[1], "api", "backend", "backend", "api");
    let file = dir.join("service.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{type: NodePort, clusterIP: 172.30.0.10, ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [{api}]}}]\n\
             ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
        ),
    )
    .unwrap();
    on_store(&lab.store, &["apply", "-f", file.to_str().unwrap()]);
    wait_for("node-a's service table", 30, || {
        a.agent
            .status()
            .is_some_and(|s| s["services"]["backends"].as_u64() >= Some(1))
    });
    wait_for("node-a's route to node-b's block", 30, || {
        super::lab::ip(a.ns.name(), "route show dev vxlan.calico").contains("10.20.")
    });
    let api_tcp = listen(&pods[1], (api, 8080).into());
    // Straight to the pod: its own address.
    assert_eq!(tcp_peer(&pods[0], &api_tcp), Some(web), "web -> api");
    // Through the ClusterIP, masqueraded: node-a's address.
    assert_eq!(
        tcp_peer_via(
            &pods[0],
            (Ipv4Addr::new(172, 30, 0, 10), 80).into(),
            &api_tcp
        ),
        Some(IpAddr::V4(NODE_A)),
        "web -> 172.30.0.10:80 (api on node-b), masqueraded"
    );
    // A host on the underlay, to node-a's NodePort: eth0 carries the
    // service program, which masquerades at its ingress.
    let outside = outside_host(&lab, &format!("palsmo{tag}"));
    assert_eq!(
        tcp_peer_via(&outside, (NODE_A, 30080).into(), &api_tcp),
        Some(IpAddr::V4(NODE_A)),
        "outside -> node-a:30080 (api on node-b), masqueraded"
    );
    drop(lab);
}
