//! Kernel tests: the real programs, loaded into this kernel. They need root;
//! without it they skip, unless PALISADE_REQUIRE_PRIVILEGED is set (CI sets
//! it), where a skip would hide a broken datapath and so fails instead.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::Duration;

use palisade_testing::kernel_engine::KernelEngine;
use palisade_testing::maps_engine::MapsEngine;
use palisade_testing::netns::Topology;
use palisade_testing::netns_engine::NetnsEngine;
use palisade_testing::testgen::{Rng, flows, small_cluster};
use policy_bpf::datapath::{Datapath, Hook};
use policy_bpf::lower::{Binding, Capacity, LowerError, Lowering, WritePlan};
use policy_bpf::packet;
use policy_bpf_common::*;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{Peer, evaluate_connection};
use policy_core::flow::{Flow, Verdict};
use policy_core::manifest::parse_manifests;
use policy_core::model::{Direction, Endpoint, EndpointKey};
use policy_core::net::Protocol;
use policy_core::{Cluster, Engine, ReferenceEngine};
use proptest::prelude::*;

/// Whether kernel tests may run here (see the module comment).
fn privileged() -> bool {
    if policy_bpf::datapath::privileged() {
        return true;
    }
    if std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_some_and(|v| v != "0") {
        panic!(
            "this test needs root (BPF, network namespaces) and PALISADE_REQUIRE_PRIVILEGED is set"
        );
    }
    eprintln!("skipped: needs root (BPF, network namespaces)");
    false
}

fn example() -> Cluster {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/zero-trust");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        objects.extend(
            parse_manifests(&f.display().to_string(), &text)
                .unwrap()
                .into_iter()
                .map(|l| l.object),
        );
    }
    Cluster::from_objects(objects).unwrap()
}

fn key(s: &str) -> EndpointKey {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A datapath loaded with a cluster, every endpoint on loopback (where
/// test runs deliver packets), with its lowering.
struct Loaded {
    dp: Datapath,
    lowering: Lowering,
    compiler: Compiler,
}

impl Loaded {
    fn new(cluster: &Cluster, cap: Capacity) -> Result<Loaded, LowerError> {
        let (compiler, delta) = Compiler::from_cluster(cluster, CompileOptions::default()).unwrap();
        let mut dp = Datapath::load_private(cap).unwrap();
        dp.set_config(Config {
            allow_sample: 1,
            ..Config::default()
        })
        .unwrap();
        let mut lowering = Lowering::new(cap);
        let before = lowering.mirror().clone();
        let mut plan: WritePlan = lowering.lower(&delta)?;
        for (i, ep) in compiler.cluster().endpoints().enumerate() {
            let p = lowering.bind(
                &ep.key,
                Some(Binding {
                    ifindex: 1,
                    zone: i as u32 + 1,
                }),
            )?;
            plan.switch.extend(p.switch);
        }
        dp.write(&plan, &before).unwrap();
        Ok(Loaded {
            dp,
            lowering,
            compiler,
        })
    }

    /// One fresh packet through a hook: did it pass, and which event.
    fn run(&mut self, hook: Hook, pkt: &[u8]) -> (bool, Option<Event>) {
        self.dp.drain_events();
        let r = self.dp.run(hook, pkt, 1).unwrap();
        (r.passed(), self.dp.drain_events().into_iter().last())
    }

    fn verdict(&mut self, dir: Direction, flow: &Flow) -> bool {
        self.dp.flush_conntrack();
        let hook = match dir {
            Direction::Egress => Hook::FromPod,
            Direction::Ingress => Hook::ToPod,
        };
        self.run(hook, &packet::build(flow)).0
    }
}

/// Connections between every pod of the example on a few ports.
fn example_flows(cluster: &Cluster) -> Vec<(EndpointKey, Direction, Flow)> {
    let eps: Vec<&Endpoint> = cluster.endpoints().collect();
    let mut out = Vec::new();
    for a in &eps {
        for b in &eps {
            if a.key == b.key {
                continue;
            }
            for (proto, port) in [
                (Protocol::TCP, 8080),
                (Protocol::TCP, 5432),
                (Protocol::UDP, 53),
            ] {
                let f = Flow::ports(a.ips[0], b.ips[0], proto, 40000, port);
                out.push((a.key.clone(), Direction::Egress, f));
                out.push((b.key.clone(), Direction::Ingress, f));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(super::cases(24)))]

    /// compiled, maps and kernel decide every generated packet alike
    /// (IPv4 and IPv6; TCP, UDP, SCTP, UDP-Lite, ICMP, ICMPv6, GRE and
    /// a port-less protocol), and the kernel's verdict event names the
    /// rule the compiled engine names.
    #[test]
    fn kernel_agrees_with_compiled_and_maps(seed in any::<u64>()) {
        if !privileged() {
            return Ok(());
        }
        let g = small_cluster(seed);
        let cluster = Cluster::from_objects(g.objects).unwrap();
        let (compiled, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        let maps = MapsEngine::new(&cluster, Capacity::default()).unwrap();
        let kernel = KernelEngine::new(&cluster, Capacity::verification()).unwrap();
        let eps: Vec<Endpoint> = cluster.endpoints().cloned().collect();
        let mut r = Rng::new(seed ^ 0x6b65);
        for (ep, dir, flow) in flows(&mut r, &eps, &g.external, 150) {
            let want = compiled.decide(&ep, dir, &flow);
            prop_assert_eq!(&maps.decide(&ep, dir, &flow), &want, "maps: {} {} {}", ep, dir, flow);
            prop_assert_eq!(&kernel.decide(&ep, dir, &flow), &want, "kernel: {} {} {}", ep, dir, flow);
        }
    }
}

fn example_loaded() -> Loaded {
    Loaded::new(&example(), Capacity::verification()).unwrap()
}

/// Eth + IPv4 with the given header bytes patched, then `l4`.
fn v4(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    packet::ip_packet(ip(src), ip(dst), proto, l4)
}

fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = packet::SYN;
    h
}

fn stat(l: &Loaded, s: Statistic) -> u64 {
    l.dp.stats().unwrap()[s as usize]
}

/// Keeps the calling thread on `cpu` (test runs execute the program on
/// the caller's CPU).
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// The example plus a GlobalNetworkPolicy that allows everything first.
fn example_opened() -> Cluster {
    let mut objects = example().objects();
    let yaml = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: open-all}\n\
                spec: {order: 1, selector: all(), types: [Ingress, Egress], ingress: [{action: Allow}], egress: [{action: Allow}]}\n";
    objects.extend(
        parse_manifests("open.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|l| l.object),
    );
    Cluster::from_objects(objects).unwrap()
}

fn assert_enforces(l: &mut Loaded, cluster: &Cluster, what: &str) {
    let (c, _) = Compiler::from_cluster(cluster, CompileOptions::default()).unwrap();
    for (ep, dir, flow) in example_flows(cluster) {
        let want = c.decide(&ep, dir, &flow).unwrap().verdict == Verdict::Allow;
        assert_eq!(l.verdict(dir, &flow), want, "{what}: {ep} {dir} {flow}");
    }
}

mod conntrack;
mod netns;
mod node_sockets;
mod packets;
mod pod_sockets;
mod scale;
mod service_churn;
mod service_flows;
mod service_icmp;
mod services;
mod updates;
