//! Integration tests of policy-bpf: the lowering and the maps engine against
//! the compiled engine, whole and incrementally; capacity errors; and, where
//! the machine allows, the kernel and netns engines.

use policy_bpf::lower::{Binding, Capacity, LowerError, Lowering, MapWrite, Mirror};
use policy_bpf::maps_engine::MapsEngine;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::model::Endpoint;
use policy_core::testgen::{Rng, flows, random_change, small_cluster};
use policy_core::{Change, Cluster, Engine};
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("PALISADE_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Binds every endpoint of the compiler to a synthetic interface.
fn bind_all(l: &mut Lowering, c: &Compiler) {
    for (i, ep) in c.cluster().endpoints().enumerate() {
        if l.binding(&ep.key).is_none() {
            l.bind(
                &ep.key,
                Some(Binding {
                    ifindex: 1000 + i as u32,
                    zone: 1 + i as u32,
                }),
            )
            .unwrap();
        }
    }
}

fn agree(compiled: &Compiler, maps: &MapsEngine, seed: u64, n: usize) -> Result<(), TestCaseError> {
    let eps: Vec<Endpoint> = compiled.cluster().endpoints().cloned().collect();
    let external = small_cluster(0).external;
    let mut r = Rng::new(seed);
    for (ep, dir, flow) in flows(&mut r, &eps, &external, n) {
        prop_assert_eq!(
            maps.decide(&ep, dir, &flow),
            compiled.decide(&ep, dir, &flow),
            "{} {} {}",
            ep,
            dir,
            flow
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(800)))]

    /// The maps engine (the lowered contents) answers like the compiled engine.
    #[test]
    fn maps_agree_with_compiled(seed in any::<u64>()) {
        let g = small_cluster(seed);
        let cluster = Cluster::from_objects(g.objects).unwrap();
        let (compiled, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        let maps = MapsEngine::new(&cluster, Capacity::default()).unwrap();
        agree(&compiled, &maps, seed, 150)?;
    }

    /// Lowering deltas one batch at a time keeps the maps equal, in effect, to
    /// the compiled state after every batch.
    #[test]
    fn incremental_lowering_agrees(seed in any::<u64>()) {
        let g = small_cluster(seed);
        let mut c = Compiler::new(CompileOptions::default());
        let mut l = Lowering::new(Capacity::default());
        let d = c.apply(g.objects.into_iter().map(Change::Upsert).collect()).unwrap();
        l.lower(&d).unwrap();
        bind_all(&mut l, &c);
        let mut r = Rng::new(seed ^ 0x10e5);
        for step in 0..10 {
            let current = c.cluster().objects();
            let batch: Vec<Change> = (0..1 + r.below(3)).map(|i| random_change(&mut r, &current, step * 4 + i)).collect();
            if let Ok(d) = c.apply(batch) {
                l.lower(&d).unwrap();
                bind_all(&mut l, &c);
            }
            let maps = MapsEngine::from_lowering(l.clone());
            agree(&c, &maps, seed ^ step as u64, 40)?;
        }
    }
}

#[test]
fn overflow_is_an_error_and_changes_nothing() {
    let g = small_cluster(3);
    let cluster = Cluster::from_objects(g.objects).unwrap();
    let (_, delta) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
    for (cap, map) in [
        (
            Capacity {
                nodes: 4,
                ..Capacity::default()
            },
            "nodes",
        ),
        (
            Capacity {
                identities: 1,
                ..Capacity::default()
            },
            "identities",
        ),
        (
            Capacity {
                rules: 1,
                ..Capacity::default()
            },
            "rules",
        ),
        (
            Capacity {
                lpm4: 2,
                ..Capacity::default()
            },
            "lpm4",
        ),
    ] {
        let mut l = Lowering::new(cap);
        let before = format!("{:?}", l.mirror());
        match l.lower(&delta) {
            Err(LowerError::Overflow { map: m, .. }) => assert_eq!(m, map),
            other => panic!("expected overflow of {map}, got {other:?}"),
        }
        assert_eq!(format!("{:?}", l.mirror()), before);
    }
}

/// A generated cluster with `n` more peer sets in front of its own: a tier
/// ordered first whose policies test `n` selectors no pod matches (Pass,
/// then the tier passes on), so the generated policies' selectors, which
/// do match, get membership bits `n` and up.
fn with_peer_sets(seed: u64, n: usize) -> (Cluster, Vec<std::net::IpAddr>) {
    let g = small_cluster(seed);
    let rules: Vec<String> = (0..n)
        .map(|k| format!(r#"{{"action": "Pass", "source": {{"selector": "has(wide{k})"}}}}"#))
        .collect();
    // At most 1,000 rules a policy (the manifest limit is 1,024), as in
    // issue 16's five policies of 1,000 rules.
    let policies: Vec<String> = rules
        .chunks(1_000)
        .enumerate()
        .map(|(i, rules)| {
            format!(
                r#"{{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                 "metadata": {{"name": "aaa-wide.wide{i}"}},
                 "spec": {{"tier": "aaa-wide", "order": {i}, "selector": "all()", "types": ["Ingress"],
                           "ingress": [{}]}}}}"#,
                rules.join(", ")
            )
        })
        .collect();
    let text = format!(
        r#"{{"apiVersion": "v1", "kind": "List", "items": [
        {{"apiVersion": "projectcalico.org/v3", "kind": "Tier",
         "metadata": {{"name": "aaa-wide"}}, "spec": {{"order": 0, "defaultAction": "Pass"}}}},
        {}]}}"#,
        policies.join(", ")
    );
    let mut objects: Vec<_> = policy_core::manifest::parse_manifests("wide.json", &text)
        .unwrap()
        .into_iter()
        .map(|l| l.object)
        .collect();
    objects.extend(g.objects);
    (Cluster::from_objects(objects).unwrap(), g.external)
}

/// Runs `f` on a thread with a large stack: compiling thousands of rules
/// recurses deeper than a test thread's 2 MiB allow in a debug build.
fn with_big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// A policy whose selector is new and matches pods: added after
/// [`with_peer_sets`]' policies, it takes a bit past all of theirs.
fn late_policy() -> Vec<Change> {
    let text = r#"{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "late"},
        "spec": {"order": 1, "selector": "all()", "types": ["Ingress"],
                 "ingress": [{"action": "Allow", "source": {"selector": "has(app) && !has(wide0)"}}]}}"#;
    policy_core::manifest::parse_manifests("late.json", text)
        .unwrap()
        .into_iter()
        .map(|l| Change::Upsert(l.object))
        .collect()
}

/// Whether the compiled state tests and sets membership bits past `bit`
/// (so a test over it exercises rows wider than the old fixed bitsets).
fn uses_bits_past(c: &Compiler, bit: u32) -> bool {
    use policy_core::compile::Test;
    let tested = c.programs().any(|(_, p)| {
        p.nodes
            .iter()
            .any(|n| matches!(n.test, Test::Bit(b) if b >= bit))
    });
    let set = c.identity_bits().any(|(_, b)| b.iter().any(|b| b >= bit));
    tested && set
}

/// More peer sets than the 2,048 bits the datapath once had room for, and
/// about 10k: the lowering lays rows out at the stride they need and the
/// maps engine decides every generated case like the compiled engine.
#[test]
fn thousands_of_peer_sets_lower_and_agree() {
    with_big_stack(thousands_of_peer_sets);
}

fn thousands_of_peer_sets() {
    for (seed, n) in [(31, 2_100), (32, 10_000)] {
        let (cluster, external) = with_peer_sets(seed, n);
        let (compiled, delta) =
            Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        assert!(compiled.bit_width() > n, "{n} membership bits");
        assert!(uses_bits_past(&compiled, n as u32), "bits past {n} in use");
        let mut l = Lowering::new(Capacity::default());
        l.lower(&delta).unwrap();
        assert!(l.stride() as usize * 64 > n, "stride {}", l.stride());
        bind_all(&mut l, &compiled);
        let maps = MapsEngine::from_lowering(l);
        let eps: Vec<Endpoint> = cluster.endpoints().cloned().collect();
        let mut r = Rng::new(seed);
        for (ep, dir, flow) in flows(&mut r, &eps, &external, 300) {
            assert_eq!(
                maps.decide(&ep, dir, &flow),
                compiled.decide(&ep, dir, &flow),
                "{n} peer sets: {ep} {dir} {flow}"
            );
        }
    }
}

/// Growing past the stride incrementally lays every row out again in the
/// other half of the maps, switched before anything reaches a new bit; the
/// maps engine agrees after every step, and the old layout is left alone
/// until the switch.
#[test]
fn a_growing_stride_is_laid_out_again_and_agrees() {
    let (wide, external) = with_peer_sets(23, 3_000);
    let g = small_cluster(23);
    let mut c = Compiler::new(CompileOptions::default());
    let mut l = Lowering::new(Capacity::default());
    let d = c
        .apply(g.objects.into_iter().map(Change::Upsert).collect())
        .unwrap();
    l.lower(&d).unwrap();
    bind_all(&mut l, &c);
    let (stride, layouts) = (l.stride(), l.mirror().layouts);
    let current = c.cluster().objects();
    let added: Vec<Change> = wide
        .objects()
        .into_iter()
        .filter(|o| !current.contains(o))
        .map(Change::Upsert)
        .collect();
    // The wide policies' selectors match no pod: their bits are taken,
    // but no row or program holds them yet.
    let d = c.apply(added).unwrap();
    l.lower(&d).unwrap();
    let d = c.apply(late_policy()).unwrap();
    let plan = l.lower(&d).unwrap();
    assert!(l.stride() > stride, "the stride grew");
    // The switch to the new layouts comes first, and nothing before it
    // writes a row in the layout that is live.
    assert!(matches!(plan.switch.first(), Some(MapWrite::Layouts(..))));
    for w in &plan.prepare {
        if let MapWrite::Identity(_, layout, _) = w {
            assert_ne!(*layout, layouts.0);
        }
        if let MapWrite::Class(_, layout, _) = w {
            assert_ne!(*layout, layouts.1);
        }
    }
    let maps = MapsEngine::from_lowering(l.clone());
    let eps: Vec<Endpoint> = c.cluster().endpoints().cloned().collect();
    let mut r = Rng::new(23);
    for (ep, dir, flow) in flows(&mut r, &eps, &external, 300) {
        assert_eq!(
            maps.decide(&ep, dir, &flow),
            c.decide(&ep, dir, &flow),
            "{ep} {dir} {flow}"
        );
    }
}

/// Rows that do not fit half their map at the stride the peer sets need
/// are refused before anything is written, with the limit and the count.
#[test]
fn membership_rows_past_capacity_are_refused_and_change_nothing() {
    let (cluster, _) = with_peer_sets(24, 2_100);
    let (_, delta) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
    let mut l = Lowering::new(Capacity {
        identity_words: 64,
        ..Capacity::default()
    });
    let before = format!("{:?}", l.mirror());
    match l.lower(&delta) {
        Err(
            e @ LowerError::MembershipOverflow {
                map: "identity rows",
                capacity: 32,
                ..
            },
        ) => {
            let LowerError::MembershipOverflow {
                needed,
                stride,
                bits,
                ..
            } = &e
            else {
                unreachable!()
            };
            assert!(*needed > 32 && *stride >= 33 && *bits > 2_100, "{e}");
            assert!(e.to_string().contains("identity rows need"), "{e}");
        }
        other => panic!("expected identity rows to overflow, got {other:?}"),
    }
    assert_eq!(format!("{:?}", l.mirror()), before);
    // The check alone (what `palisade compile` runs) says the same.
    assert!(matches!(
        l.check_capacity(&delta),
        Err(LowerError::MembershipOverflow { .. })
    ));
}

#[test]
fn writes_come_in_safe_order() {
    // Every slot written in the switch phase points at nodes written in the
    // prepare phase (or earlier), never at nodes written later.
    let g = small_cluster(11);
    let cluster = Cluster::from_objects(g.objects).unwrap();
    let (mut c, d) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
    let mut l = Lowering::new(Capacity::default());
    l.lower(&d).unwrap();
    bind_all(&mut l, &c);
    let mut r = Rng::new(5);
    for step in 0..30 {
        let current = c.cluster().objects();
        let Ok(d) = c.apply(vec![random_change(&mut r, &current, step)]) else {
            continue;
        };
        let before: Mirror = l.mirror().clone();
        let plan = l.lower(&d).unwrap();
        let mut m = before.clone();
        for w in &plan.prepare {
            m.apply(w);
        }
        for w in &plan.switch {
            if let MapWrite::Slot(_, Some(v)) = w {
                // Walk everything reachable from the new root in the prepared state.
                let mut stack = vec![v.root];
                let mut seen = std::collections::HashSet::new();
                while let Some(i) = stack.pop() {
                    if !seen.insert(i) {
                        continue;
                    }
                    let n = m
                        .nodes
                        .get(&i)
                        .copied()
                        .expect("node written before the switch");
                    if n.op != policy_bpf_common::OP_LEAF {
                        stack.push(n.then);
                        stack.push(n.otherwise);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel tests: the real programs, loaded into this kernel. They need root;
// without it they skip, unless PALISADE_REQUIRE_PRIVILEGED is set (CI sets
// it), where a skip would hide a broken datapath and so fails instead.
// ---------------------------------------------------------------------------

mod kernel {
    use std::io::{Read, Write};
    use std::net::{IpAddr, TcpListener, TcpStream};
    use std::time::Duration;

    use policy_bpf::datapath::{Datapath, Hook};
    use policy_bpf::kernel_engine::KernelEngine;
    use policy_bpf::lower::{Binding, Capacity, LowerError, Lowering, WritePlan};
    use policy_bpf::maps_engine::MapsEngine;
    use policy_bpf::netns::Topology;
    use policy_bpf::netns_engine::NetnsEngine;
    use policy_bpf::packet;
    use policy_bpf_common::*;
    use policy_core::compile::{CompileOptions, Compiler};
    use policy_core::connection::{Peer, evaluate_connection};
    use policy_core::flow::{Flow, Verdict};
    use policy_core::manifest::parse_manifests;
    use policy_core::model::{Direction, Endpoint, EndpointKey};
    use policy_core::net::Protocol;
    use policy_core::testgen::{Rng, flows, small_cluster};
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
            let (compiler, delta) =
                Compiler::from_cluster(cluster, CompileOptions::default()).unwrap();
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

    /// More than 2,048 and about 10k peer sets: the kernel decides every
    /// generated case like the compiled and maps engines (one word read
    /// per membership test at any stride).
    #[test]
    fn kernel_agrees_with_thousands_of_peer_sets() {
        if !privileged() {
            return;
        }
        super::with_big_stack(kernel_with_thousands_of_peer_sets);
    }

    fn kernel_with_thousands_of_peer_sets() {
        for (seed, n) in [(31, 2_100), (32, 10_000)] {
            let (cluster, external) = super::with_peer_sets(seed, n);
            let (compiled, _) =
                Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
            assert!(super::uses_bits_past(&compiled, n as u32));
            let maps = MapsEngine::new(&cluster, Capacity::default()).unwrap();
            let kernel = KernelEngine::new(&cluster, Capacity::verification()).unwrap();
            let eps: Vec<Endpoint> = cluster.endpoints().cloned().collect();
            let mut r = Rng::new(seed);
            for (ep, dir, flow) in flows(&mut r, &eps, &external, 200) {
                let want = compiled.decide(&ep, dir, &flow);
                assert_eq!(
                    maps.decide(&ep, dir, &flow),
                    want,
                    "maps, {n}: {ep} {dir} {flow}"
                );
                assert_eq!(
                    kernel.decide(&ep, dir, &flow),
                    want,
                    "kernel, {n}: {ep} {dir} {flow}"
                );
            }
        }
    }

    /// A stride that grows under a loaded datapath: the rows are written in
    /// the other half of the maps and the layouts switched with the rest of
    /// the plan; the kernel then decides like the compiled engine. Rows
    /// that would not fit are refused before anything is written, and the
    /// old policy stays enforced.
    #[test]
    fn a_growing_stride_is_switched_in_the_kernel() {
        if !privileged() {
            return;
        }
        let (wide, external) = super::with_peer_sets(33, 3_000);
        let small = Cluster::from_objects(small_cluster(33).objects).unwrap();
        let added = |c: &Compiler| -> Vec<policy_core::Change> {
            let current = c.cluster().objects();
            wide.objects()
                .into_iter()
                .filter(|o| !current.contains(o))
                .map(policy_core::Change::Upsert)
                .collect()
        };
        let check = |l: &mut Loaded, cluster: &Cluster, what: &str| {
            let (c, _) = Compiler::from_cluster(cluster, CompileOptions::default()).unwrap();
            let eps: Vec<Endpoint> = cluster.endpoints().cloned().collect();
            let mut r = Rng::new(33);
            for (ep, dir, flow) in flows(&mut r, &eps, &external, 150) {
                // Loaded binds every endpoint to loopback: only flows from
                // an endpoint's own address reach its slot.
                let want = c.decide(&ep, dir, &flow).unwrap().verdict == Verdict::Allow;
                assert_eq!(l.verdict(dir, &flow), want, "{what}: {ep} {dir} {flow}");
            }
        };
        // Too few words for the wider rows.
        let tight = Capacity {
            identity_words: 256,
            ..Capacity::verification()
        };
        let mut l = Loaded::new(&small, tight).unwrap();
        // The wide policies' selectors match no pod: their bits are
        // taken, but no row or program holds them yet.
        let delta = l.compiler.apply(added(&l.compiler)).unwrap();
        let before = l.lowering.mirror().clone();
        let plan = l.lowering.lower(&delta).unwrap();
        l.dp.write(&plan, &before).unwrap();
        let delta = l.compiler.apply(super::late_policy()).unwrap();
        let before = format!("{:?}", l.lowering.mirror());
        match l.lowering.lower(&delta) {
            Err(LowerError::MembershipOverflow {
                map: "identity rows",
                ..
            }) => {}
            other => panic!("expected identity rows to overflow, got {other:?}"),
        }
        assert_eq!(format!("{:?}", l.lowering.mirror()), before);
        // The wide policies are enforced, as before the refused update.
        check(&mut l, &wide, "after the refused update");
        // Room enough: the new layout is written and switched to.
        let mut l = Loaded::new(&small, Capacity::verification()).unwrap();
        let stride = l.lowering.stride();
        let delta = l.compiler.apply(added(&l.compiler)).unwrap();
        let before = l.lowering.mirror().clone();
        let plan = l.lowering.lower(&delta).unwrap();
        l.dp.write(&plan, &before).unwrap();
        let delta = l.compiler.apply(super::late_policy()).unwrap();
        let before = l.lowering.mirror().clone();
        let plan = l.lowering.lower(&delta).unwrap();
        assert!(l.lowering.stride() > stride);
        l.dp.write(&plan, &before).unwrap();
        let late = Cluster::from_objects(l.compiler.cluster().objects()).unwrap();
        check(&mut l, &late, "after the new layout");
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

    fn stat(l: &Loaded, i: u32) -> u64 {
        l.dp.stats().unwrap()[i as usize]
    }

    #[test]
    fn bad_packets_are_dropped_with_a_reason() {
        if !privileged() {
            return;
        }
        let mut l = example_loaded();
        // web -> api:8080 is allowed: the well-formed packet passes.
        let good = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
        assert!(l.run(Hook::ToPod, &good).0, "well-formed SYN to api:8080");

        let malformed = |l: &mut Loaded, name: &str, pkt: Vec<u8>| {
            let before = stat(l, STAT_MALFORMED);
            let (passed, ev) = l.run(Hook::ToPod, &pkt);
            assert!(!passed, "{name}: passed");
            assert_eq!(
                ev.map(|e| e.reason),
                Some(REASON_MALFORMED),
                "{name}: event"
            );
            assert_eq!(stat(l, STAT_MALFORMED), before + 1, "{name}: statistic");
        };
        // The kernel refuses test runs of frames without a whole network
        // header, so truncation is tested past it.
        let mut wrong_version = good.clone();
        wrong_version[14] = 0x55;
        malformed(&mut l, "IPv4 frame with version 5", wrong_version);
        let mut short_total = good.clone();
        short_total[14 + 2..14 + 4].copy_from_slice(&10u16.to_be_bytes());
        malformed(&mut l, "total length below the header", short_total);
        // IHL below the minimum of 5 words.
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x44;
        malformed(&mut l, "IHL 4", bad_ihl);
        // IHL pointing past the end of the packet.
        let mut long_ihl = good.clone();
        long_ihl[14] = 0x4f;
        long_ihl.truncate(14 + 20 + 8);
        malformed(&mut l, "IHL 15 in a short packet", long_ihl);
        // Transport headers cut short.
        malformed(&mut l, "truncated TCP", good[..14 + 20 + 10].to_vec());
        let udp = v4(
            "10.10.1.10",
            "10.10.2.10",
            17,
            &[0x9c, 0x40, 0x1f, 0x90, 0, 8],
        );
        malformed(&mut l, "truncated UDP", udp);
        let v6 = packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 6, &tcp_syn(1, 2));
        malformed(
            &mut l,
            "truncated TCP over IPv6",
            v6[..14 + 40 + 12].to_vec(),
        );
        let mut v6_version = v6.clone();
        v6_version[14] = 0x40;
        malformed(&mut l, "IPv6 frame with version 4", v6_version);
        // More extension headers than the program looks past.
        let mut chain = Vec::new();
        for _ in 0..5 {
            chain.extend_from_slice(&[0u8, 0, 0, 0, 0, 0, 0, 0]);
        }
        malformed(
            &mut l,
            "five hop-by-hop headers",
            packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 0, &chain),
        );
        // A hop-by-hop extension header that runs off the end.
        let mut hbh = vec![6u8, 8];
        hbh.extend_from_slice(&[0; 6]);
        let mut ext = packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 0, &hbh);
        ext.truncate(ext.len() - 4);
        malformed(&mut l, "truncated extension header", ext);

        // Not IP at all (ARP): not policy's business, passed and counted.
        let mut arp = good[..14].to_vec();
        // ARP over Ethernet: a 28-byte body.
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        arp.extend_from_slice(&[0; 28]);
        let before = stat(&l, STAT_NON_IP);
        assert!(l.run(Hook::ToPod, &arp).0);
        assert_eq!(stat(&l, STAT_NON_IP), before + 1);

        // A source address that is not the pod's leaving its veth.
        let spoofed = v4("10.99.0.1", "10.10.2.10", 6, &tcp_syn(40000, 8080));
        let (passed, ev) = l.run(Hook::FromPod, &spoofed);
        assert!(!passed);
        assert_eq!(ev.map(|e| e.reason), Some(REASON_SPOOFED));
    }

    /// IPv4 fragments of one datagram: `offset` in 8-byte units.
    fn fragment(src: &str, dst: &str, id: u16, offset: u16, more: bool, l4: &[u8]) -> Vec<u8> {
        let mut p = v4(src, dst, 6, l4);
        p[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
        let flags = if more { 0x2000 } else { 0 } | offset;
        p[14 + 6..14 + 8].copy_from_slice(&flags.to_be_bytes());
        p
    }

    #[test]
    fn fragments_follow_their_first_fragment() {
        if !privileged() {
            return;
        }
        let mut l = example_loaded();
        // Allowed datagram (web -> api:8080): the first fragment carries the
        // ports and is decided; later fragments of it pass.
        let first = fragment(
            "10.10.1.10",
            "10.10.2.10",
            77,
            0,
            true,
            &tcp_syn(40000, 8080),
        );
        assert!(l.run(Hook::ToPod, &first).0);
        let later = fragment("10.10.1.10", "10.10.2.10", 77, 3, false, &[0; 16]);
        assert!(
            l.run(Hook::ToPod, &later).0,
            "later fragment of an allowed datagram"
        );
        // Denied datagram (analytics -> api:8080): its later fragments are dropped too.
        let first = fragment(
            "10.10.3.10",
            "10.10.2.10",
            78,
            0,
            true,
            &tcp_syn(40000, 8080),
        );
        let (passed, ev) = l.run(Hook::ToPod, &first);
        assert!(!passed);
        assert_eq!(ev.map(|e| e.reason), Some(REASON_POLICY));
        let later = fragment("10.10.3.10", "10.10.2.10", 78, 3, false, &[0; 16]);
        let (passed, ev) = l.run(Hook::ToPod, &later);
        assert!(!passed, "later fragment of a denied datagram");
        assert_eq!(ev.map(|e| e.reason), Some(REASON_FRAGMENT));
        // A later fragment whose first fragment was never seen: no ports to
        // decide on, so it is dropped.
        let orphan = fragment("10.10.1.10", "10.10.2.10", 999, 5, false, &[0; 16]);
        let (passed, ev) = l.run(Hook::ToPod, &orphan);
        assert!(!passed);
        assert_eq!(ev.map(|e| e.reason), Some(REASON_FRAGMENT));
        // A first fragment too short to hold the TCP ports is malformed.
        let tiny = fragment("10.10.1.10", "10.10.2.10", 79, 0, true, &[0x9c, 0x40, 0x1f]);
        let (passed, ev) = l.run(Hook::ToPod, &tiny);
        assert!(!passed);
        assert_eq!(ev.map(|e| e.reason), Some(REASON_MALFORMED));
    }

    #[test]
    fn unknown_protocols_are_decided_by_policy() {
        if !privileged() {
            return;
        }
        let mut l = example_loaded();
        // The example allows only TCP 8080 into api: protocol 99 from web is
        // denied by the default-deny tier end, protocol 99 is carried
        // without ports and decided like any other.
        for proto in [99u8, 47, 253] {
            let p = v4("10.10.1.10", "10.10.2.10", proto, &[1, 2, 3, 4, 5, 6, 7, 8]);
            let (passed, ev) = l.run(Hook::ToPod, &p);
            let ev = ev.expect("a verdict event");
            assert!(!passed, "protocol {proto}");
            assert_eq!(ev.reason, REASON_POLICY);
            assert_eq!(ev.protocol, proto);
            let flow = Flow {
                src: ip("10.10.1.10"),
                dst: ip("10.10.2.10"),
                protocol: Protocol(proto),
                src_port: 0,
                dst_port: 0,
                icmp: None,
            };
            let want = l
                .compiler
                .decide(&key("shop-backend/api"), Direction::Ingress, &flow)
                .unwrap();
            assert_eq!(want.verdict, Verdict::Deny);
            assert_eq!(
                l.lowering.rule(ev.rule).unwrap().decided_by(),
                want.decided_by
            );
        }
    }

    #[test]
    fn the_conntrack_clock_is_the_kernels_jiffies_at_a_measured_rate() {
        if !privileged() {
            return;
        }
        let l = example_loaded();
        let hz = l.dp.ticks_per_s().unwrap();
        assert!((24..=10_000).contains(&hz), "implausible tick rate {hz}");
        let (j0, t0) = l.dp.kernel_clock().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (j1, t1) = l.dp.kernel_clock().unwrap();
        let (ticks, ns) = (j1 - j0, t1 - t0);
        assert!(ns >= 150_000_000, "coarse clock advanced {ns} ns in 200 ms");
        // Both clocks move in the same tick updates: the rate holds to
        // within a tick or two at each end.
        let expected = ns as f64 * f64::from(hz) / 1e9;
        assert!(
            (ticks as f64 - expected).abs() <= 2.0,
            "{ticks} ticks in {ns} ns at {hz} Hz (expected {expected:.1})"
        );
        // The programs read their configuration's rate.
        assert_eq!(l.dp.config().unwrap().ticks_per_s, hz);
    }

    #[test]
    fn the_sweep_expires_idle_connections_only() {
        if !privileged() {
            return;
        }
        let mut l = example_loaded();
        l.dp.set_config(Config {
            other_s: 1,
            ..Config::default()
        })
        .unwrap();
        l.dp.flush_conntrack();
        // An allowed TCP connection (long timeout) and an allowed DNS query
        // (UDP, one second).
        let tcp = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
        assert!(l.run(Hook::ToPod, &tcp).0, "web -> api:8080");
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&40001u16.to_be_bytes());
        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
        udp[5] = 8;
        let dns = v4("10.10.1.10", "10.10.0.53", 17, &udp);
        assert!(l.run(Hook::FromPod, &dns).0, "web -> DNS");
        assert_eq!(l.dp.conntrack_len(), 2);
        assert_eq!(l.dp.expire_conntrack().unwrap(), 0, "nothing is idle yet");
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(
            l.dp.expire_conntrack().unwrap(),
            1,
            "the idle UDP flow goes"
        );
        assert_eq!(l.dp.conntrack_len(), 1, "the TCP connection stays");
    }

    /// Keeps the calling thread on `cpu` (test runs execute the program on
    /// the caller's CPU).
    fn pin_to_cpu(cpu: usize) {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    }

    /// Two CPUs run both sides of the same connections into a small table
    /// while a third sweeps and flushes it: ways are claimed, joined,
    /// reused and freed concurrently. Whatever interleaving happens, a
    /// denied flow never passes, an allowed one always does, and every
    /// entry left is a whole one.
    #[test]
    fn concurrent_packets_and_sweeps_keep_verdicts_exact() {
        if !privileged() {
            return;
        }
        let cap = Capacity {
            conntrack: 16,
            ..Capacity::default()
        };
        let mut l = Loaded::new(&example(), cap).unwrap();
        l.dp.set_config(Config {
            other_s: 0,
            ..Config::default()
        })
        .unwrap();
        let dp = &l.dp;
        let done = std::sync::atomic::AtomicBool::new(false);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|s| {
            let runners: Vec<_> = (0..2)
                .map(|t| {
                    let done = &done;
                    s.spawn(move || {
                        // Stops the sweeper however this runner ends.
                        struct Done<'a>(&'a std::sync::atomic::AtomicBool);
                        impl Drop for Done<'_> {
                            fn drop(&mut self) {
                                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        let _done = Done(done);
                        pin_to_cpu(t % cpus);
                        for i in 0..1000u16 {
                            let sport = 40000 + (i * 7 + t as u16) % 96;
                            let allowed = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
                            let reply = v4("10.10.2.10", "10.10.1.10", 6, &{
                                let mut h = tcp_syn(8080, sport);
                                h[13] = 0x12; // SYN-ACK
                                h
                            });
                            let denied = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 9999));
                            let mut udp = vec![0u8; 8];
                            udp[0..2].copy_from_slice(&sport.to_be_bytes());
                            udp[2..4].copy_from_slice(&53u16.to_be_bytes());
                            udp[5] = 8;
                            let dns = v4("10.10.1.10", "10.10.0.53", 17, &udp);
                            let run = |hook, pkt: &[u8]| dp.run(hook, pkt, 1).unwrap().passed();
                            assert!(run(Hook::FromPod, &allowed), "web egress to api:8080");
                            assert!(run(Hook::ToPod, &allowed), "api ingress from web");
                            // Passes on the entry, or meets api's egress
                            // policy (which denies it) when the sweeper
                            // flushed in between: either is right here.
                            run(Hook::FromPod, &reply);
                            assert!(run(Hook::FromPod, &dns), "web -> DNS");
                            assert!(!run(Hook::ToPod, &denied), "web -> api:9999 stays denied");
                        }
                    })
                })
                .collect();
            let sweeper = s.spawn(|| {
                let (mut sweeps, mut freed) = (0u32, 0usize);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    freed += dp.expire_conntrack().unwrap();
                    sweeps += 1;
                    if sweeps % 16 == 0 {
                        freed += dp.flush_conntrack();
                    }
                }
                (sweeps, freed)
            });
            for r in runners {
                r.join().unwrap();
            }
            let (sweeps, freed) = sweeper.join().unwrap();
            let stats = dp.stats().unwrap();
            eprintln!(
                "{sweeps} sweeps and flushes freed {freed}; established {}, full {}, contended {}",
                stats[STAT_ESTABLISHED as usize],
                stats[STAT_CT_FULL as usize],
                stats[STAT_CT_CONTENDED as usize]
            );
            assert!(sweeps > 10 && freed > 0, "the sweeper ran alongside");
            assert!(stats[STAT_ESTABLISHED as usize] > 0);
        });
        let (entries, v6) = dp.conntrack_entries();
        assert!(v6.is_empty());
        for e in &entries {
            let v = e.value;
            assert!(matches!(e.key.protocol, 6 | 17), "{e:?}");
            let (client, server) = if e.key.port_a >= 40000 {
                (e.key.port_a, e.key.port_b)
            } else {
                (e.key.port_b, e.key.port_a)
            };
            assert!((40000..40096).contains(&client), "{e:?}");
            assert!([8080, 53].contains(&server), "{e:?}");
            assert_ne!(v.flags & (CT_APPROVED_A | CT_APPROVED_B), 0, "{e:?}");
            assert!(v.created <= v.last_seen, "{e:?}");
        }
    }

    #[test]
    fn interfaces_past_the_direct_table_are_still_enforced() {
        if !privileged() {
            return;
        }
        // Only ifindex 0 fits the direct table: loopback (1) goes to the hash.
        let cap = Capacity {
            interface_index: 1,
            ..Capacity::default()
        };
        let mut l = Loaded::new(&example(), cap).unwrap();
        let allowed = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
        assert!(l.run(Hook::ToPod, &allowed).0, "web -> api:8080");
        let denied = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40001, 9999));
        assert!(!l.run(Hook::ToPod, &denied).0, "web -> api:9999 is denied");
        assert_eq!(stat(&l, STAT_UNMANAGED), 0);
        assert!(l.dp.read_mirror().interfaces.contains_key(&1), "read back");
    }

    #[test]
    fn a_full_conntrack_table_is_counted_and_policy_still_decides() {
        if !privileged() {
            return;
        }
        let cap = Capacity {
            conntrack: 4,
            ..Capacity::default()
        };
        let mut l = Loaded::new(&example(), cap).unwrap();
        // Two sets of four ways: both are every connection's choices.
        assert_eq!(policy_bpf::conntrack::ways_for(4).unwrap(), 8);
        let crowded: Vec<u16> = (40000..40016).collect();
        for &sport in &crowded[..12] {
            let syn = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
            assert!(l.run(Hook::ToPod, &syn).0, "allowed flow {sport} passes");
        }
        assert_eq!(l.dp.conntrack_len(), 8);
        assert_eq!(stat(&l, STAT_CT_FULL), 4, "four flows found the table full");
        // Once those connections have expired, new ones take their ways
        // without waiting for the sweep.
        l.dp.set_config(Config {
            tcp_established_s: 0,
            ..Config::default()
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(25));
        let later = &crowded[12..16];
        for &sport in later {
            let syn = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
            assert!(l.run(Hook::ToPod, &syn).0, "allowed flow {sport} passes");
        }
        assert_eq!(stat(&l, STAT_CT_FULL), 4, "expired ways were reused");
        assert_eq!(l.dp.conntrack_len(), 8);
        let (v4_entries, _) = l.dp.conntrack_entries();
        let reused = v4_entries
            .iter()
            .filter(|e| later.contains(&e.key.port_a))
            .count();
        assert_eq!(reused, 4, "the new connections are in the table");
        // Denied flows are still denied.
        let denied = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40100, 9999));
        assert!(!l.run(Hook::ToPod, &denied).0, "web -> api:9999 is denied");
    }

    /// New connections go to the log while its next entries are free;
    /// once every log entry holds a live connection they go to their
    /// way's home, counted, and are tracked all the same; entries freed by
    /// the sweep serve the log again.
    #[test]
    fn new_connections_fill_the_log_then_their_homes() {
        if !privileged() {
            return;
        }
        // 128 ways and a log of 32 entries, taken as one run.
        let cap = Capacity {
            conntrack: 64,
            ..Capacity::default()
        };
        assert_eq!(policy_bpf::conntrack::ways_for(64).unwrap(), 128);
        let mut l = Loaded::new(&example(), cap).unwrap();
        // The log runs are per CPU: one CPU takes them in order.
        pin_to_cpu(0);
        let syn = |sport: u16| v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
        let ack = |sport: u16| {
            let mut h = tcp_syn(sport, 8080);
            h[13] = 0x10;
            v4("10.10.1.10", "10.10.2.10", 6, &h)
        };
        let open = |l: &mut Loaded, ports: std::ops::Range<u16>| {
            for sport in ports {
                assert!(l.run(Hook::ToPod, &syn(sport)).0, "allowed flow {sport}");
            }
        };
        open(&mut l, 40000..40032);
        assert_eq!(l.dp.conntrack_len(), 32);
        assert_eq!(l.dp.conntrack_logged(), 32, "the log took them all");
        assert_eq!(stat(&l, STAT_CT_HOME), 0);
        open(&mut l, 40032..40040);
        assert_eq!(stat(&l, STAT_CT_FULL), 0);
        assert_eq!(l.dp.conntrack_len(), 40);
        assert_eq!(l.dp.conntrack_logged(), 32, "no live entry was overwritten");
        assert_eq!(stat(&l, STAT_CT_HOME), 8, "the rest went home");
        // Every one of them is tracked, in the log or at home.
        let established = stat(&l, STAT_ESTABLISHED);
        for sport in 40000..40040 {
            assert!(l.run(Hook::ToPod, &ack(sport)).0, "established {sport}");
        }
        assert_eq!(stat(&l, STAT_ESTABLISHED) - established, 40);
        let (entries, _) = l.dp.conntrack_entries();
        let mut ports: Vec<u16> = entries
            .iter()
            .map(|e| e.key.port_a.max(e.key.port_b))
            .collect();
        ports.sort_unstable();
        assert_eq!(ports, (40000..40040).collect::<Vec<_>>(), "whole entries");
        // Swept, the log's entries are free again.
        l.dp.set_config(Config {
            tcp_established_s: 0,
            ..Config::default()
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(25));
        assert_eq!(l.dp.expire_conntrack().unwrap(), 40);
        l.dp.set_config(Config::default()).unwrap();
        open(&mut l, 41000..41032);
        assert_eq!(l.dp.conntrack_logged(), 32);
        assert_eq!(stat(&l, STAT_CT_HOME), 8, "none went home");
    }

    /// Pins of an earlier conntrack layout cannot be re-adopted: the load
    /// refuses them and names them, before creating anything.
    #[test]
    fn pins_of_an_earlier_conntrack_layout_are_refused_by_name() {
        if !privileged() {
            return;
        }
        for (pinned, named) in [
            (&["PALISADE_CT4"][..], "PALISADE_CT4"),
            // Ways pinned without their tag lines: the state words were in
            // the ways then.
            (&["PALISADE_CONN4"][..], "PALISADE_CONN4"),
            // Ways and tag lines pinned without a log head: each
            // connection was in its way's entry then.
            (&["PALISADE_CONN4", "PALISADE_CTTAG4"][..], "PALISADE_CONN4"),
        ] {
            let dir =
                std::env::temp_dir().join(format!("palisade-old-pins-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for name in pinned {
                std::fs::write(dir.join(name), b"").unwrap();
            }
            let err = Datapath::load(&dir, Capacity::verification())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("earlier Palisade") && err.contains(named),
                "{pinned:?}: {err}"
            );
            assert!(!dir.join("links").exists(), "nothing was created");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// Every endpoint of the kernel engine shares loopback, so each
    /// direction has many IPv4 slots and one fast word: unbinding them one
    /// by one (the word's own among them) must leave the word on one that
    /// is still there, until none is.
    #[test]
    fn fast_slots_move_to_another_address_when_theirs_goes() {
        if !privileged() {
            return;
        }
        let mut l = example_loaded();
        let keys: Vec<EndpointKey> = l
            .compiler
            .cluster()
            .endpoints()
            .map(|e| e.key.clone())
            .collect();
        assert!(keys.len() > 2);
        for k in &keys {
            let before = l.lowering.mirror().clone();
            let plan = l.lowering.bind(k, None).unwrap();
            l.dp.write(&plan, &before).unwrap();
            assert_eq!(
                l.dp.local4_disagreements().unwrap(),
                Vec::<String>::new(),
                "after unbinding {k}"
            );
        }
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

    #[test]
    fn a_failed_update_leaves_the_old_policy_enforced() {
        if !privileged() {
            return;
        }
        let old = example();
        let new = example_opened();
        let mut l = example_loaded();
        assert_enforces(&mut l, &old, "initial");
        let changes: Vec<policy_core::Change> = new
            .objects()
            .into_iter()
            .filter(|o| !old.objects().contains(o))
            .map(policy_core::Change::Upsert)
            .collect();
        let delta = l.compiler.apply(changes).unwrap();
        let saved = l.lowering.clone();
        let before = l.lowering.mirror().clone();
        let plan = l.lowering.lower(&delta).unwrap();
        assert!(plan.len() > 3);
        // Fail the first, a middle and the last write: each time everything
        // written is rolled back and the old policy decides every packet.
        for fail_at in [0, plan.len() / 2, plan.len() - 1] {
            let err =
                l.dp.write_with(&plan, &before, |i| i == fail_at)
                    .unwrap_err();
            assert!(err.to_string().contains("injected"), "{err}");
            let kernel = l.dp.read_mirror();
            assert_eq!(
                kernel.slots, before.slots,
                "slots after failing at {fail_at}"
            );
            assert_eq!(kernel.lpm4, before.lpm4);
            assert_eq!(kernel.lpm6, before.lpm6);
            assert_enforces(&mut l, &old, &format!("after a failure at write {fail_at}"));
            assert_eq!(l.dp.local4_disagreements().unwrap(), Vec::<String>::new());
        }
        l.lowering = saved;
        let plan = l.lowering.lower(&delta).unwrap();
        l.dp.write(&plan, &before).unwrap();
        assert_enforces(&mut l, &new, "after the update");
        assert_eq!(l.dp.local4_disagreements().unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_overflowing_update_is_refused_and_changes_nothing() {
        if !privileged() {
            return;
        }
        let old = example();
        // Capacity for exactly what the example needs, no more.
        let needed = Loaded::new(&old, Capacity::default())
            .unwrap()
            .lowering
            .mirror()
            .nodes
            .len() as u32;
        let cap = Capacity {
            nodes: needed,
            ..Capacity::default()
        };
        let mut l = Loaded::new(&old, cap).unwrap();
        let changes: Vec<policy_core::Change> = example_opened()
            .objects()
            .into_iter()
            .filter(|o| !old.objects().contains(o))
            .map(policy_core::Change::Upsert)
            .collect();
        let delta = l.compiler.apply(changes).unwrap();
        let before = format!("{:?}", l.lowering.mirror());
        match l.lowering.lower(&delta) {
            Err(e @ LowerError::Overflow { map: "nodes", .. }) => {
                assert!(e.to_string().contains("raise it"), "{e}");
            }
            other => panic!("expected a nodes overflow, got {other:?}"),
        }
        assert_eq!(format!("{:?}", l.lowering.mirror()), before);
        assert_enforces(&mut l, &old, "after the refused update");
        // Loading into maps too small fails up front with the map named.
        match Loaded::new(
            &old,
            Capacity {
                nodes: 2,
                ..Capacity::default()
            },
        ) {
            Err(LowerError::Overflow {
                map: "nodes",
                needed: n,
                capacity: 2,
            }) => assert!(n > 2),
            other => panic!("expected a nodes overflow, got {:?}", other.err()),
        }
    }

    /// A program deeper than the inline part of the kernel walk (one peer
    /// test per policy, 120 policies) is finished by the bpf_loop part and
    /// decides like the compiled engine, for every peer.
    #[test]
    fn deep_programs_walk_to_the_end() {
        if !privileged() {
            return;
        }
        let mut y = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n---\n\
            apiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: d, labels: {app: server}}\nstatus: {podIP: 10.5.0.1}\n",
        );
        let groups = 120;
        for g in 0..groups {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c{g}, namespace: d, labels: {{g: g{g}}}}}\nstatus: {{podIP: 10.5.1.{}}}\n",
                g + 1
            ));
            // Odd groups are denied, even ones allowed, each by its own policy.
            let action = if g % 2 == 0 { "Allow" } else { "Deny" };
            y.push_str(&format!(
                "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p{g}, namespace: d}}\n\
                 spec: {{order: {g}, selector: app == 'server', types: [Ingress], ingress: [{{action: {action}, source: {{selector: g == 'g{g}'}}}}]}}\n"
            ));
        }
        let objects = parse_manifests("deep.yaml", &y)
            .unwrap()
            .into_iter()
            .map(|l| l.object);
        let cluster = Cluster::from_objects(objects).unwrap();
        let (compiled, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        assert!(
            compiled.stats().max_depth > 64,
            "the test needs a deep program, got depth {}",
            compiled.stats().max_depth
        );
        let kernel = KernelEngine::new(&cluster, Capacity::verification()).unwrap();
        let server = key("d/server");
        let mut seen_allow = 0;
        for g in 0..groups {
            let f = Flow::ports(
                ip(&format!("10.5.1.{}", g + 1)),
                ip("10.5.0.1"),
                Protocol::TCP,
                40000,
                80,
            );
            let want = compiled.decide(&server, Direction::Ingress, &f).unwrap();
            assert_eq!(
                kernel.decide(&server, Direction::Ingress, &f).unwrap(),
                want,
                "group {g}"
            );
            if want.verdict == Verdict::Allow {
                seen_allow += 1;
            }
        }
        assert_eq!(seen_allow, groups / 2);
    }

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
            .with_datapath(|dp| dp.stats().unwrap()[STAT_DELIVERED as usize])
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
        nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::Ipv4RecvTtl, &true)
            .unwrap();
        let client = web
            .ns
            .run(|| UdpSocket::bind("10.10.1.10:0"))
            .unwrap()
            .unwrap();
        let delivered = |dp: &Datapath| dp.stats().unwrap()[STAT_DELIVERED as usize];
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
        let grew = |i: u32| after[i as usize] - before[i as usize];
        assert_eq!(
            (
                grew(STAT_NEW_FLOWS),
                grew(STAT_ESTABLISHED),
                grew(STAT_DELIVERED)
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

    /// One datagram's TTL (from IP_RECVTTL), or None on timeout.
    fn recv_ttl(s: &std::net::UdpSocket) -> Option<u8> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 64];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(i32);
        let msg = recvmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
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
                TcpStream::connect_timeout(
                    &"10.10.2.10:8080".parse().unwrap(),
                    Duration::from_secs(2),
                )
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
        let delivered = |dp: &Datapath| dp.stats().unwrap()[STAT_DELIVERED as usize];
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
        std::fs::remove_file(pin.join("PALISADE_LOCAL4")).unwrap();
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
        let established_before = dp.stats().unwrap()[STAT_ESTABLISHED as usize];
        let delivered_before = delivered(&dp);
        exchange(&mut client, &mut server, "after the restart");
        assert!(
            dp.stats().unwrap()[STAT_ESTABLISHED as usize] > established_before,
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
}
