//! The node's own processes through the socket hooks (connect-time and
//! sendmsg-time load balancing): a process of the node's namespace in a
//! cgroup with the hooks attached reaches ClusterIPs as a pod would.

use std::net::SocketAddr;

use palisade_services::{Family, Objects, ProxyConfig, ServiceTable};
use policy_bpf_common::SOCK_FLOW_REPLIED;
use serde_json::json;

use super::privileged;
use super::services::{VIP, config, load, service, slice, table};

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
    let probe = |what: &str| -> String {
        let out = run_socket_probe(&cgroup, topo.node().name(), what);
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
    // Unconnected datagrams to a Service address, 24 sockets: the
    // backends that answered, every reply from that address.
    let udp_backends = |to: &str| -> std::collections::BTreeSet<String> {
        (0..24)
            .map(|_| {
                let got = probe(&format!("udp {to}:53"));
                let (name, from) = got
                    .split_once(" from ")
                    .unwrap_or_else(|| panic!("unconnected UDP to {to}: {got}"));
                assert_eq!(
                    from,
                    format!("{to}:53"),
                    "the reply's source is the Service address"
                );
                name.to_string()
            })
            .collect()
    };
    assert_eq!(
        udp_backends(VIP),
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
    assert_eq!(
        udp_backends(&mapped),
        ["api-a", "api-b"].map(String::from).into()
    );
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

/// Runs [`socket_probe_child`] (this binary again) with probe `what`, in
/// `cgroup` and namespace `ns`: its sockets are the ones the hooks there
/// see.
pub(super) fn run_socket_probe(
    cgroup: &palisade_testing::cgroup::TestCgroup,
    ns: &str,
    what: &str,
) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    cgroup
        .bash_in(
            ns,
            &format!(
                "PALISADE_SOCKET_PROBE='{what}' exec {} --exact \
                 kernel::node_sockets::socket_probe_child --ignored --nocapture",
                exe.display()
            ),
        )
        .unwrap()
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
    use aya::maps::{HashMap, MapData};
    use policy_bpf_common::{SockFlowValue, SockReverseKey};

    let cookie = policy_bpf::datapath::socket_cookie(s)?;
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
