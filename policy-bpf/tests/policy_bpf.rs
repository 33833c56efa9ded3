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
