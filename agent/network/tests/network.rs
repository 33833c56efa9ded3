//! Pod wiring and the overlay against the kernel, in namespaces made for
//! each test (root; a skip CI turns into a failure).

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use palisade_network::NetError;
use palisade_network::netlink::{Netlink, in_netns};
use palisade_network::pod::{self, PodWiring, WireStep};
use palisade_testing::netns::{Netns, ip_batch};

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!("this test needs root and PALISADE_REQUIRE_PRIVILEGED is set");
    }
    eprintln!("skipped: needs root (network namespaces)");
    false
}

fn open(ns: &Netns) -> File {
    File::open(format!("/run/netns/{}", ns.name())).unwrap()
}

/// Everything in a namespace a wiring could leave: links other than
/// `lo`, and Palisade's routes.
fn leftovers(ns: &File) -> Vec<String> {
    in_netns(ns, || {
        let nl = Netlink::here().unwrap();
        let mut out: Vec<String> = nl
            .links()
            .unwrap()
            .into_iter()
            .filter(|l| l.name != "lo")
            .map(|l| format!("link {}", l.name))
            .collect();
        out.extend(
            nl.palisade_routes()
                .unwrap()
                .into_iter()
                .map(|r| format!("route {}", r.dst)),
        );
        out
    })
    .unwrap()
}

fn connects(from: &Netns, to: SocketAddr) -> bool {
    from.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
        .unwrap()
}

#[test]
fn a_wired_pod_is_reachable_and_a_failure_at_any_step_leaves_nothing() {
    if !privileged() {
        return;
    }
    let tag = std::process::id();
    let node = Netns::create(&format!("palnwn{tag}")).unwrap();
    let podns = Netns::create(&format!("palnwp{tag}")).unwrap();
    let (node_file, pod_file) = (open(&node), open(&podns));
    // The node's own address (a node always has one; the pod answers it
    // through its gateway).
    ip_batch(
        Some(node.name()),
        &[
            "link set lo up".into(),
            "addr add 192.168.200.1/32 dev lo".into(),
        ],
    )
    .unwrap();
    let addr: IpAddr = "10.10.0.5".parse().unwrap();
    let host = pod::host_ifname("default.web");
    let spec = PodWiring {
        host_ifname: &host,
        pod_ifname: "eth0",
        netns: &pod_file,
        addrs: &[addr],
        mtu: 1450,
    };

    // A failure injected before each step: an error, and nothing stays.
    for step in WireStep::ALL {
        let r = in_netns(&node_file, || {
            let nl = Netlink::here().unwrap();
            pod::wire(&nl, &spec, &mut |s| {
                if s == step {
                    Err(NetError::Injected(format!("{s:?}")))
                } else {
                    Ok(())
                }
            })
        })
        .unwrap();
        assert!(r.is_err(), "{step:?}");
        assert_eq!(
            leftovers(&node_file),
            Vec::<String>::new(),
            "node after {step:?}"
        );
        assert_eq!(
            leftovers(&pod_file),
            Vec::<String>::new(),
            "pod after {step:?}"
        );
    }

    // Wired: the node reaches the pod, the MTU is the one asked for.
    let wired = in_netns(&node_file, || {
        pod::wire(&Netlink::here().unwrap(), &spec, &mut |_| Ok(()))
    })
    .unwrap()
    .unwrap();
    assert_ne!(wired.pod_mac, pod::HOST_MAC);
    let listener = podns
        .run(|| TcpListener::bind((addr, 8080)).unwrap())
        .unwrap();
    if !connects(&node, SocketAddr::new(addr, 8080)) {
        for ns in [node.name(), podns.name()] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip -n {ns} -d link; ip -n {ns} addr; ip -n {ns} route; ip -n {ns} neigh"
                ))
                .output()
                .unwrap();
            eprintln!("{ns}:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        panic!("no connection");
    }
    drop(listener);
    let mtu = in_netns(&pod_file, || {
        Netlink::here().unwrap().link("eth0").unwrap().unwrap().mtu
    })
    .unwrap();
    assert_eq!(mtu, 1450);
    let problems = in_netns(&node_file, || {
        pod::check(&Netlink::here().unwrap(), &host, &pod_file, "eth0", &[addr])
    })
    .unwrap()
    .unwrap();
    assert!(problems.is_empty(), "{problems:?}");

    // Wiring again (an ADD retried) replaces it; unwiring twice is fine.
    in_netns(&node_file, || {
        let nl = Netlink::here().unwrap();
        let again = pod::wire(&nl, &spec, &mut |_| Ok(()));
        // The pod end of the first wiring went with its host end.
        assert!(again.is_ok(), "{again:?}");
        pod::unwire(&nl, &host, Some(&pod_file), "eth0").unwrap();
        pod::unwire(&nl, &host, Some(&pod_file), "eth0").unwrap();
        pod::unwire(&nl, &host, None, "eth0").unwrap();
    })
    .unwrap();
    assert_eq!(leftovers(&node_file), Vec::<String>::new());
    assert_eq!(leftovers(&pod_file), Vec::<String>::new());
}

#[test]
fn a_vxlan_device_takes_neighbours_fdb_entries_and_onlink_routes() {
    use palisade_network::netlink::{Neighbour, Route};
    use palisade_network::overlay::{self, DEVICE};
    use palisade_network::vxlan;
    if !privileged() {
        return;
    }
    let node = Netns::create(&format!("palnwv{}", std::process::id())).unwrap();
    ip_batch(
        Some(node.name()),
        &[
            "link set lo up".into(),
            "link add eth0 type veth peer name eth0p".into(),
            "link set eth0p up".into(),
            "link set eth0 up".into(),
            "addr add 192.168.100.1/24 dev eth0".into(),
        ],
    )
    .unwrap();
    let file = open(&node);
    in_netns(&file, || {
        let nl = Netlink::here().unwrap();
        let underlay = vxlan::detect_underlay(&nl, None).unwrap();
        assert_eq!(underlay.link.name, "eth0");
        let tunnel = "10.10.0.1".parse().unwrap();
        let mac = overlay::device_mac("a");
        let dev = vxlan::ensure_device(&nl, &underlay, tunnel, mac, 1450).unwrap();
        // Idempotent: the same device again.
        assert_eq!(
            vxlan::ensure_device(&nl, &underlay, tunnel, mac, 1450).unwrap(),
            dev
        );
        let link = nl.link(DEVICE).unwrap().unwrap();
        assert_eq!((link.mtu, link.mac.as_slice()), (1450, &mac[..]));
        let peer = Neighbour {
            dev,
            ip: "10.10.0.65".parse().unwrap(),
            mac: overlay::device_mac("b"),
        };
        let vtep = Neighbour {
            dev,
            ip: "192.168.100.2".parse().unwrap(),
            mac: peer.mac,
        };
        nl.replace_neighbour(&peer).unwrap();
        nl.replace_fdb(&vtep).unwrap();
        let route = Route {
            dst: "10.10.0.64/26".parse().unwrap(),
            via: Some(peer.ip),
            dev: Some(dev),
            scope_link: false,
            onlink: true,
            blackhole: false,
        };
        nl.replace_route(&route).unwrap();
        let have = vxlan::observe(&nl, dev).unwrap();
        assert_eq!(
            have.neighbours.into_iter().collect::<Vec<_>>(),
            vec![peer.clone()]
        );
        assert_eq!(have.fdb.into_iter().collect::<Vec<_>>(), vec![vtep.clone()]);
        assert_eq!(
            have.routes.into_iter().collect::<Vec<_>>(),
            vec![route.clone()]
        );
        nl.delete_route(&route).unwrap();
        nl.delete_neighbour(&peer, false).unwrap();
        nl.delete_neighbour(&vtep, true).unwrap();
        let have = vxlan::observe(&nl, dev).unwrap();
        assert!(have.routes.is_empty() && have.neighbours.is_empty() && have.fdb.is_empty());
    })
    .unwrap();
}

/// The natOutgoing table as nft takes it and lists it back: every shape
/// the plan can have (host exclusion, a port range, an SNAT address) is
/// read back as the plan that wrote it, so the agent's periodic
/// comparison does not rewrite a table that is right.
#[test]
fn every_nat_outgoing_plan_round_trips_through_nft() {
    use palisade_network::natout::{NatSettings, PoolNat, plan_with};
    use palisade_network::nft;

    if !privileged() {
        return;
    }
    let ns = Netns::create(&format!("palnft{}", std::process::id())).unwrap();
    let pools = [
        PoolNat {
            cidr: "10.10.0.0/16".parse().unwrap(),
            nat_outgoing: true,
            load_balancer_only: false,
        },
        PoolNat {
            cidr: "fd00:10::/48".parse().unwrap(),
            nat_outgoing: true,
            load_balancer_only: false,
        },
    ];
    let hosts: Vec<IpAddr> = ["192.168.100.2", "192.168.100.3", "fd00::2"]
        .iter()
        .map(|h| h.parse().unwrap())
        .collect();
    let mut cases = Vec::new();
    for exclude_hosts in [None, Some(true)] {
        for port_range in [None, Some((40000, 40100)), Some((50000, 50000))] {
            for address in [None, Some("192.168.100.9".parse().unwrap())] {
                cases.push(NatSettings {
                    exclude_hosts,
                    port_range,
                    address,
                });
            }
        }
    }
    let file = open(&ns);
    for settings in cases {
        let want = plan_with(&pools, &settings, &hosts);
        let got = in_netns(&file, || {
            nft::apply(&want)?;
            nft::read()
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{settings:?}: {e}"));
        assert_eq!(got, Some(want), "{settings:?}");
    }
}
