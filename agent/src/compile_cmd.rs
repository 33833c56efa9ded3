//! `palisade compile`: statistics and decision structures of the compiled state.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use palisade_controller::{Controller, MirrorDataplane};
use policy_core::EndpointKey;
use policy_core::compile::{CompileOptions, Compiler, Next, Program, ProgramId, Test};
use serde_json::{Value, json};

use crate::load::load_cluster;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompileFormat {
    /// Statistics and a line per program.
    Summary,
    /// Everything the lowering writes, as data.
    Json,
    /// Graphviz pictures of the decision programs.
    Dot,
}

fn test_label(c: &Compiler, t: Test) -> String {
    match t {
        Test::Less(f, v) => format!("{f:?} < {v}"),
        Test::Bit(b) => match c.bit_meaning(b) {
            Some(k) => format!("peer in {k}"),
            None => format!("bit {b}"),
        },
    }
}

fn program_json(c: &Compiler, p: &Program) -> Value {
    let next = |n: Next| match n {
        Next::Node(i) => json!({"node": i}),
        Next::Leaf(i) => json!({"leaf": i}),
    };
    json!({
        "root": next(p.root),
        "depth": p.depth(),
        "nodes": p.nodes.iter().map(|n| json!({
            "test": test_label(c, n.test),
            "then": next(n.then),
            "else": next(n.otherwise),
        })).collect::<Vec<_>>(),
        "leaves": p.leaves.iter().map(|l| json!({
            "verdict": l.verdict.to_string(),
            "rule": l.rule,
            "decidedBy": c.rule(l.rule).map(|r| r.to_string()),
            "logged": l.logged,
        })).collect::<Vec<_>>(),
    })
}

fn dot(c: &Compiler, pid: ProgramId, p: &Program, users: &[String], out: &mut String) {
    use std::fmt::Write;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = writeln!(out, "  subgraph cluster_p{pid} {{");
    let _ = writeln!(
        out,
        "    label=\"program {pid}: {}\";",
        esc(&users.join(", "))
    );
    let id = |n: Next| match n {
        Next::Node(i) => format!("p{pid}n{i}"),
        Next::Leaf(i) => format!("p{pid}l{i}"),
    };
    for (i, n) in p.nodes.iter().enumerate() {
        let me = id(Next::Node(i as u32));
        let _ = writeln!(
            out,
            "    {me} [shape=box, label=\"{}\"];",
            esc(&test_label(c, n.test))
        );
        let _ = writeln!(out, "    {me} -> {} [label=\"yes\"];", id(n.then));
        let _ = writeln!(
            out,
            "    {me} -> {} [label=\"no\", style=dashed];",
            id(n.otherwise)
        );
    }
    for (i, l) in p.leaves.iter().enumerate() {
        let color = if l.verdict == policy_core::Verdict::Allow {
            "palegreen"
        } else {
            "lightpink"
        };
        let by = c.rule(l.rule).map(|r| r.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "    {} [shape=ellipse, style=filled, fillcolor={color}, label=\"{}\\n{}{}\"];",
            id(Next::Leaf(i as u32)),
            l.verdict,
            esc(&by),
            if l.logged { "\\n[logged]" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "    start_p{pid} [shape=point];\n    start_p{pid} -> {};\n  }}",
        id(p.root)
    );
}

/// Slots listed under each program in the summary.
const SLOTS_SHOWN: usize = 4;

pub fn compile(
    files: &[PathBuf],
    node: Option<String>,
    endpoint: Option<&str>,
    format: CompileFormat,
) -> Result<()> {
    let cluster = load_cluster(files)?;
    crate::lint_cmd::warn(&cluster);
    let started = std::time::Instant::now();
    let (c, _) = Compiler::from_cluster(&cluster, CompileOptions { node: node.clone() })?;
    let elapsed = started.elapsed();
    let only: Option<EndpointKey> = endpoint
        .map(|e| e.parse().map_err(|m: String| anyhow!("--endpoint: {m}")))
        .transpose()?;
    if let Some(k) = &only {
        crate::resolve::known_pod(&cluster, k, "--endpoint")?;
    }
    // Which slots use each program.
    let mut users: BTreeMap<ProgramId, Vec<String>> = BTreeMap::new();
    for (slot, pid) in c.slots() {
        if only.as_ref().is_some_and(|o| *o != slot.endpoint) {
            continue;
        }
        users.entry(*pid).or_default().push(format!(
            "{} {} {}",
            slot.endpoint, slot.addr, slot.direction
        ));
    }
    for v in users.values_mut() {
        v.sort();
    }
    let programs: BTreeMap<ProgramId, &Program> = c
        .programs()
        .filter(|(pid, _)| users.contains_key(pid))
        .map(|(pid, p)| (*pid, p.as_ref()))
        .collect();
    let s = c.stats();
    match format {
        CompileFormat::Summary => {
            outln!(
                "compiled in {:.1} ms{}",
                elapsed.as_secs_f64() * 1e3,
                node.as_ref()
                    .map(|n| format!(" (node {n})"))
                    .unwrap_or_default()
            )?;
            let rows = [
                ("endpoints", s.endpoints),
                ("local endpoints", s.local_endpoints),
                ("identities", s.identities),
                ("selectors", s.selectors),
                ("policy sets", s.policy_sets),
                ("peer sets", s.peer_sets),
                ("membership row width (bits)", s.membership_bits),
                ("address classes", s.address_classes),
                ("peer classes", s.peer_classes),
                ("programs", s.programs),
                ("program nodes + leaves", s.program_nodes),
                ("deepest program walk", s.max_depth),
                ("LPM entries", s.lpm_entries),
                ("rule ids", s.rule_ids),
                ("map entries the lowering writes", s.lowered_entries),
            ];
            for (k, v) in rows {
                outln!("  {k:<34} {v:>8}")?;
            }
            outln!()?;
            // One line per program, its users beneath: a program shared by
            // every pod of a namespace would otherwise be one enormous line.
            for (pid, p) in &programs {
                let used = &users[pid];
                outln!(
                    "program {pid}: {} nodes, {} leaves, depth {}; used by {} slot{}",
                    p.nodes.len(),
                    p.leaves.len(),
                    p.depth(),
                    used.len(),
                    if used.len() == 1 { "" } else { "s" }
                )?;
                for u in used.iter().take(SLOTS_SHOWN) {
                    outln!("    {u}")?;
                }
                if used.len() > SLOTS_SHOWN {
                    outln!(
                        "    ... and {} more (all of them: -o json, or --endpoint)",
                        used.len() - SLOTS_SHOWN
                    )?;
                }
            }
        }
        CompileFormat::Json => {
            let v = json!({
                "stats": {
                    "endpoints": s.endpoints, "localEndpoints": s.local_endpoints, "identities": s.identities,
                    "selectors": s.selectors, "policySets": s.policy_sets, "peerSets": s.peer_sets, "membershipBits": s.membership_bits,
                    "addressClasses": s.address_classes, "peerClasses": s.peer_classes, "programs": s.programs,
                    "programNodes": s.program_nodes, "maxDepth": s.max_depth, "lpmEntries": s.lpm_entries,
                    "ruleIds": s.rule_ids, "loweredEntries": s.lowered_entries,
                },
                "programs": programs.iter().map(|(pid, p)| (pid.to_string(), program_json(&c, p))).collect::<serde_json::Map<_, _>>(),
                "slots": c.slots().filter(|(slot, _)| only.as_ref().is_none_or(|o| *o == slot.endpoint))
                    .map(|(slot, pid)| json!({"endpoint": slot.endpoint.to_string(), "ip": slot.addr.to_string(), "direction": slot.direction.to_string(), "program": pid}))
                    .collect::<Vec<_>>(),
                "bits": (0..c.bit_width() as u32).filter_map(|b| c.bit_meaning(b).map(|k| (b.to_string(), json!(k.to_string())))).collect::<serde_json::Map<_, _>>(),
                "identities": c.identity_bits().map(|(id, b)| (id.to_string(), json!(b.iter().collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
                "classes": c.classes().map(|(id, b)| (id.to_string(), json!(b.iter().collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
                "prefixes": c.prefixes().map(|(n, cl)| (n.to_string(), json!(cl))).collect::<serde_json::Map<_, _>>(),
                "hosts": c.hosts().map(|(ip, h)| (ip.to_string(), json!({"identity": h.identity, "class": h.class}))).collect::<serde_json::Map<_, _>>(),
                "rules": c.rule_ids().map(|(id, r)| (id.to_string(), json!(r.to_string()))).collect::<serde_json::Map<_, _>>(),
            });
            outln!("{}", serde_json::to_string_pretty(&v)?)?;
        }
        CompileFormat::Dot => {
            let mut out = String::from(
                "digraph palisade {\n  rankdir=TB;\n  node [fontname=\"Helvetica\", fontsize=10];\n",
            );
            for (pid, p) in &programs {
                dot(&c, *pid, p, &users[pid], &mut out);
            }
            out.push_str("}\n");
            out!("{out}")?;
        }
    }
    // What the node controller would refuse: the whole state lowered to map
    // entries (default capacities) on an in-memory dataplane, so a policy
    // set that compiles but cannot be enforced fails here too.
    Controller::from_compiler(c, node, MirrorDataplane::default())
        .map_err(|e| anyhow!("the datapath would refuse this policy set: {e}"))?;
    Ok(())
}
