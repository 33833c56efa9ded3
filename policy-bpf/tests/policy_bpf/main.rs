//! Integration tests of policy-bpf: the lowering and the maps engine against
//! the compiled engine, whole and incrementally; capacity errors; and, where
//! the machine allows, the kernel and netns engines.

use palisade_testing::maps_engine::MapsEngine;
use palisade_testing::testgen::{Rng, flows, random_change, small_cluster};
use policy_bpf::lower::{Binding, Capacity, LowerError, Lowering, MapWrite, Mirror};
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::model::Endpoint;
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

/// Whether `part` (what the lowering kept for undoing `plan`) holds what
/// `full` held at every entry the plan writes, and every slot.
fn undo_view_matches(full: &Mirror, part: &Mirror, plan: &policy_bpf::lower::WritePlan) -> bool {
    full.slots == part.slots
        && full.interfaces == part.interfaces
        && plan.iter().all(|w| match w {
            MapWrite::Node(i, _) => full.nodes.get(i) == part.nodes.get(i),
            MapWrite::Slot(..) | MapWrite::Interface(..) | MapWrite::ResetCounter(_) => true,
            MapWrite::Lpm4(l, a, _) => full.lpm4.get(&(*l, *a)) == part.lpm4.get(&(*l, *a)),
            MapWrite::Lpm6(l, a, _) => full.lpm6.get(&(*l, *a)) == part.lpm6.get(&(*l, *a)),
            MapWrite::Identity(i, ..) => full.identities.get(i) == part.identities.get(i),
            MapWrite::Class(i, ..) => full.classes.get(i) == part.classes.get(i),
            MapWrite::Layouts(..) => full.layouts == part.layouts,
            // A write this check does not know: it cannot vouch for it.
            _ => false,
        })
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
            let full_before = l.mirror().clone();
            if let Ok(d) = c.apply(batch) {
                let plan = l.lower(&d).unwrap();
                prop_assert!(undo_view_matches(&full_before, l.before_last_plan(), &plan));
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

#[test]
fn dangling_references_are_refused_and_change_nothing() {
    let g = small_cluster(3);
    let cluster = Cluster::from_objects(g.objects).unwrap();
    let (_, delta) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
    let mut l = Lowering::new(Capacity::default());
    l.lower(&delta).unwrap();
    let before = format!("{:?}", l.mirror());
    let unknown_class = policy_core::compile::Delta {
        prefixes: [("10.99.0.0/16".parse().unwrap(), Some(9_999))].into(),
        ..Default::default()
    };
    let unknown_host_class = policy_core::compile::Delta {
        hosts: [(
            "10.99.0.1".parse().unwrap(),
            Some(policy_core::compile::HostEntry {
                identity: 1,
                class: 9_999,
            }),
        )]
        .into(),
        ..Default::default()
    };
    let mut unknown_rule = delta.clone();
    unknown_rule.rules.clear();
    let mut l_fresh = Lowering::new(Capacity::default());
    match l_fresh.lower(&unknown_rule) {
        Err(LowerError::Inconsistent(m)) => assert!(m.contains("rule id"), "{m}"),
        other => panic!("a program naming unknown rules was accepted: {other:?}"),
    }
    for (name, d) in [("class", unknown_class), ("host class", unknown_host_class)] {
        match l.lower(&d) {
            Err(LowerError::Inconsistent(m)) => assert!(m.contains("address class 9999"), "{m}"),
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
        assert_eq!(format!("{:?}", l.mirror()), before, "{name}");
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
    // Seeds whose generated cluster has selectors compiled after the wide
    // ones (bits past n); the generator's draws decide which seeds do.
    for (seed, n) in [(33, 2_100), (33, 10_000)] {
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
                    if n.op != policy_bpf_common::NodeOp::Leaf.code() {
                        stack.push(n.then);
                        stack.push(n.otherwise);
                    }
                }
            }
        }
    }
}

mod kernel;
mod services;
