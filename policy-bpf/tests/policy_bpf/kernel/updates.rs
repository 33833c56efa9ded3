//! Policy updates in the kernel: fast slots that move, failed and
//! overflowing updates that leave the old policy enforced.

use super::*;

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
    // Undone from what the lowering kept of the entries the plan writes
    // (as the controller does), not from a copy of the whole mirror.
    let undo = l.lowering.before_last_plan().clone();
    // Fail the first, a middle and the last write: each time everything
    // written is rolled back and the old policy decides every packet.
    for fail_at in [0, plan.len() / 2, plan.len() - 1] {
        let err = l.dp.write_with(&plan, &undo, |i| i == fail_at).unwrap_err();
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
