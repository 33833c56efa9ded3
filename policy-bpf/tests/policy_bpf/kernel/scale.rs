//! Scale in the kernel: thousands of peer sets, strides that grow, more
//! interfaces than the direct table holds, programs walked to their depth limit.

use super::*;

/// More than 2,048 and about 10k peer sets: the kernel decides every
/// generated case like the compiled and maps engines (one word read
/// per membership test at any stride).
#[test]
fn kernel_agrees_with_thousands_of_peer_sets() {
    if !privileged() {
        return;
    }
    crate::with_big_stack(kernel_with_thousands_of_peer_sets);
}

fn kernel_with_thousands_of_peer_sets() {
    // Seeds with bits past n, as in `thousands_of_peer_sets`.
    for (seed, n) in [(33, 2_100), (33, 10_000)] {
        let (cluster, external) = crate::with_peer_sets(seed, n);
        let (compiled, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
        assert!(crate::uses_bits_past(&compiled, n as u32));
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
    let (wide, external) = crate::with_peer_sets(33, 3_000);
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
    let delta = l.compiler.apply(crate::late_policy()).unwrap();
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
    let delta = l.compiler.apply(crate::late_policy()).unwrap();
    let before = l.lowering.mirror().clone();
    let plan = l.lowering.lower(&delta).unwrap();
    assert!(l.lowering.stride() > stride);
    l.dp.write(&plan, &before).unwrap();
    let late = Cluster::from_objects(l.compiler.cluster().objects()).unwrap();
    check(&mut l, &late, "after the new layout");
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
    assert_eq!(stat(&l, Statistic::Unmanaged), 0);
    assert!(l.dp.read_mirror().interfaces.contains_key(&1), "read back");
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
