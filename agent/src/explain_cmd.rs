//! `palisade explain` (who decided a connection) and `palisade matrix`
//! (connectivity of every pod pair, with the deciding policy per cell).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use policy_core::conformance::{ConnectionSpec, Peer, enforcing_endpoint, flow_between};
use policy_core::flow::{DecidedBy, Decision, Verdict};
use policy_core::net::Protocol;
use policy_core::reference::{RuleOutcome, TierOutcome, Trace};
use policy_core::{Direction, EndpointKey, ReferenceEngine};
use serde_json::{Value, json};

use crate::load::load_cluster;
use crate::verify_cmd::{EngineKind, build_engine};
use policy_bpf::lower::Capacity;
use policy_bpf::netns_engine::{EventReport, NetnsEngine};
use policy_bpf_common::{Counter, REASON_POLICY};
use policy_core::EngineError;
use policy_core::conformance::{ProbeOutcome, evaluate_connection};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For programs.
    Json,
    /// A Markdown table (matrix only).
    Markdown,
}

/// What to ask about.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Client: namespace/pod, or ip:ADDRESS for a source outside the cluster.
    #[arg(long)]
    pub from: String,
    /// Server: namespace/pod or ip:ADDRESS.
    #[arg(long)]
    pub to: String,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Protocol name or number.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Source port (default: an ephemeral port).
    #[arg(long)]
    pub src_port: Option<u16>,
    /// ICMP type (with --protocol ICMP/ICMPv6).
    #[arg(long)]
    pub icmp_type: Option<u8>,
    /// ICMP code.
    #[arg(long)]
    pub icmp_code: Option<u8>,
}

pub fn decision_json(d: &Decision) -> Value {
    let by = match &d.decided_by {
        DecidedBy::Rule {
            tier,
            policy,
            rule,
            action,
        } => {
            json!({"kind": "rule", "tier": tier, "policy": policy.to_string(), "rule": rule, "action": action.to_string()})
        }
        DecidedBy::TierDefault { tier } => {
            json!({"kind": "endOfTier", "tier": tier, "action": "deny"})
        }
        DecidedBy::Profile {
            profile,
            rule,
            action,
        } => {
            json!({"kind": "profile", "profile": profile, "rule": rule, "action": action.to_string()})
        }
        DecidedBy::NoProfileMatch => json!({"kind": "noProfileMatch", "action": "deny"}),
    };
    json!({"verdict": d.verdict.to_string(), "decidedBy": by, "logged": d.logged})
}

fn trace_json(t: &Trace) -> Value {
    let rules = |rs: &[policy_core::reference::RuleTrace]| -> Vec<Value> {
        rs.iter()
            .map(|r| match &r.outcome {
                RuleOutcome::Matched => json!({"index": r.index, "action": r.action.to_string(), "matched": true}),
                RuleOutcome::NoMatch(why) => json!({"index": r.index, "action": r.action.to_string(), "matched": false, "why": why}),
            })
            .collect()
    };
    json!({
        "endpoint": t.endpoint.to_string(),
        "direction": t.direction.to_string(),
        "tiers": t.tiers.iter().map(|tt| json!({
            "tier": tt.tier,
            "policies": tt.policies.iter().map(|p| json!({
                "policy": p.policy.to_string(),
                "order": p.order,
                "rules": rules(&p.rules),
            })).collect::<Vec<_>>(),
            "outcome": match &tt.outcome {
                TierOutcome::Decided => json!("decided"),
                TierOutcome::Passed { policy, rule } => json!({"passed": {"policy": policy.to_string(), "rule": rule}}),
                TierOutcome::EndOfTier(d) => json!({"endOfTier": format!("{d:?}").to_lowercase()}),
            },
        })).collect::<Vec<_>>(),
        "profiles": t.profiles.iter().map(|p| json!({
            "profile": p.profile, "defined": p.defined, "rules": rules(&p.rules),
        })).collect::<Vec<_>>(),
        "decision": decision_json(&t.decision),
    })
}

pub fn explain(
    files: &[PathBuf],
    args: &ConnectionArgs,
    format: Format,
    engine_kind: EngineKind,
) -> Result<bool> {
    let cluster = load_cluster(files)?;
    let engine = ReferenceEngine::new(&cluster);
    let from: Peer = args
        .from
        .parse()
        .map_err(|e: String| anyhow!("--from: {e}"))?;
    let to: Peer = args.to.parse().map_err(|e: String| anyhow!("--to: {e}"))?;
    let protocol = Protocol::parse(&args.protocol).map_err(|e| anyhow!("--protocol: {e}"))?;
    let icmp = match (args.icmp_type, args.icmp_code) {
        (None, None) => None,
        (t, c) => Some((t.unwrap_or(0), c.unwrap_or(0))),
    };
    let spec = ConnectionSpec {
        protocol,
        dst_port: args.port,
        src_port: args.src_port,
        icmp,
        ip_version: None,
    };
    let flow = flow_between(&cluster, &from, &to, spec, None, None).map_err(|e| anyhow!(e))?;
    let mut traces = Vec::new();
    if let Some(k) = enforcing_endpoint(&cluster, &from, true) {
        traces.push(engine.trace(&k, Direction::Egress, &flow)?);
    }
    if let Some(k) = enforcing_endpoint(&cluster, &to, false) {
        traces.push(engine.trace(&k, Direction::Ingress, &flow)?);
    }
    let mut allowed = traces.iter().all(|t| t.decision.verdict == Verdict::Allow);
    let observed = match engine_kind {
        EngineKind::Reference => None,
        kind => Some(observe(&cluster, kind, &from, &to, &flow)?),
    };
    if let Some(o) = &observed {
        allowed = o.outcome.allowed;
    }
    match format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "from": from.to_string(), "to": to.to_string(), "flow": flow.to_string(),
                "allowed": allowed,
                "evaluations": traces.iter().map(trace_json).collect::<Vec<_>>(),
                "observed": observed.as_ref().map(Observed::json),
            }))?
        )?,
        _ => {
            outln!("connection {from} -> {to}: {flow}")?;
            if traces.is_empty() {
                outln!("  neither end is a pod in the cluster: no policy applies")?;
            }
            for t in &traces {
                outln!()?;
                out!("{t}")?;
            }
            if let Some(o) = &observed {
                outln!()?;
                o.print()?;
            }
            outln!()?;
            let verdict = if allowed { "ALLOWED" } else { "DENIED" };
            match traces.iter().find(|t| t.decision.verdict == Verdict::Deny) {
                Some(t) => outln!(
                    "{verdict}: {} denied by {}",
                    t.direction,
                    t.decision.decided_by
                )?,
                None => outln!("{verdict}")?,
            }
        }
    }
    if let Some(o) = &observed {
        let reference = |d: Direction| {
            traces
                .iter()
                .find(|t| t.direction == d)
                .map(|t| t.decision.clone())
        };
        let egress_denied = o
            .outcome
            .egress
            .as_ref()
            .is_some_and(|d| d.verdict == Verdict::Deny);
        let agrees = o.outcome.egress == reference(Direction::Egress)
            && (o.outcome.ingress == reference(Direction::Ingress)
                || (o.outcome.ingress.is_none() && egress_denied));
        if !agrees {
            anyhow::bail!(
                "the {} engine disagrees with the reference: egress {:?}, ingress {:?}",
                o.engine,
                o.outcome.egress.as_ref().map(ToString::to_string),
                o.outcome.ingress.as_ref().map(ToString::to_string)
            );
        }
    }
    Ok(allowed)
}

/// What an engine other than the reference reported for the connection;
/// for `netns`, the kernel's own verdict events and rule counters.
struct Observed {
    engine: String,
    outcome: ProbeOutcome,
    events: Vec<(EventReport, Option<Counter>)>,
}

impl Observed {
    fn print(&self) -> std::io::Result<()> {
        let verdict = if self.outcome.allowed {
            "connected"
        } else {
            "blocked"
        };
        outln!("{} engine: the connection was {verdict}", self.engine)?;
        for (d, dir) in [
            (&self.outcome.egress, Direction::Egress),
            (&self.outcome.ingress, Direction::Ingress),
        ] {
            if let Some(d) = d {
                outln!("  {dir}: {d}")?;
            }
        }
        for (r, c) in &self.events {
            outln!(
                "  kernel event: {} {} at {} {}: {} by {}",
                if r.allowed() { "allow" } else { "drop" },
                r.tuple(),
                r.endpoint
                    .as_ref()
                    .map_or("?".to_string(), ToString::to_string),
                r.direction,
                if r.allowed() { "allowed" } else { "denied" },
                r.decided_by
            )?;
            if let Some(c) = c {
                outln!(
                    "    rule counter (all CPUs): {} packets, {} bytes",
                    c.packets,
                    c.bytes
                )?;
            }
        }
        Ok(())
    }

    fn json(&self) -> Value {
        json!({
            "engine": self.engine,
            "allowed": self.outcome.allowed,
            "egress": self.outcome.egress.as_ref().map(decision_json),
            "ingress": self.outcome.ingress.as_ref().map(decision_json),
            "events": self.events.iter().map(|(r, c)| json!({
                "allowed": r.allowed(),
                "tuple": r.tuple(),
                "endpoint": r.endpoint.as_ref().map(ToString::to_string),
                "direction": r.direction.to_string(),
                "decidedBy": r.decided_by,
                "ruleIndex": r.event.rule,
                "counter": c.map(|c| json!({"packets": c.packets, "bytes": c.bytes})),
            })).collect::<Vec<_>>(),
        })
    }
}

fn observe(
    cluster: &policy_core::Cluster,
    kind: EngineKind,
    from: &Peer,
    to: &Peer,
    flow: &policy_core::Flow,
) -> Result<Observed> {
    if kind == EngineKind::Netns {
        // Namespaces for the two ends only, not for every pod of the cluster.
        // An address peer that is some pod's address is that pod.
        let ends: Vec<&EndpointKey> = cluster
            .endpoints()
            .filter(|e| {
                [from, to].into_iter().any(|p| match p {
                    Peer::Endpoint(k) => *k == e.key,
                    Peer::Ip(ip) => e.ips.contains(ip),
                })
            })
            .map(|e| &e.key)
            .collect();
        let engine = NetnsEngine::with_pods(cluster, Capacity::default(), |k| ends.contains(&k))?;
        let outcome = engine.probe(from, to, flow)?;
        let events = engine.last_events()?;
        let events = events
            .into_iter()
            .map(|r| {
                let c = (r.event.reason == REASON_POLICY)
                    .then(|| engine.with_datapath(|dp| dp.counter(r.event.rule).ok()))
                    .transpose()?
                    .flatten();
                Ok((r, c))
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        return Ok(Observed {
            engine: format!(
                "netns ({} of {} pods in namespaces)",
                engine.pods(),
                cluster.endpoints().count()
            ),
            outcome,
            events,
        });
    }
    let engine = build_engine(kind, cluster)?;
    let outcome = evaluate_connection(&*engine, cluster, from, to, flow)?;
    Ok(Observed {
        engine: engine.name().to_string(),
        outcome,
        events: Vec::new(),
    })
}

/// The cell of a matrix: whether the connection succeeds, and the decision
/// that explains it (the denying one, or the server's ingress allow).
struct Cell {
    allowed: bool,
    deciding: Option<(Direction, Decision)>,
}

pub fn matrix(
    files: &[PathBuf],
    port: u16,
    protocol: &str,
    format: Format,
    engine_kind: EngineKind,
) -> Result<()> {
    let cluster = load_cluster(files)?;
    let engine: Box<dyn policy_core::Engine + '_> = if engine_kind == EngineKind::Netns {
        let e = NetnsEngine::new(&cluster, Capacity::default())?;
        eprintln!(
            "{} pods are network namespaces on one node; the TC programs are attached to their host veths",
            e.pods()
        );
        // Drops are printed the moment the kernel reports them.
        e.set_listener(Box::new(|r: &EventReport| {
            if !r.allowed() {
                eprintln!(
                    "  drop  {} at {} {} by {}",
                    r.tuple(),
                    r.endpoint
                        .as_ref()
                        .map_or("?".to_string(), ToString::to_string),
                    r.direction,
                    r.decided_by
                );
            }
        }))?;
        Box::new(e)
    } else {
        build_engine(engine_kind, &cluster)?
    };
    let protocol = Protocol::parse(protocol).map_err(|e| anyhow!("--protocol: {e}"))?;
    let pods: Vec<EndpointKey> = cluster
        .endpoints()
        .filter(|e| !e.ips.is_empty())
        .map(|e| e.key.clone())
        .collect();
    let spec = ConnectionSpec {
        protocol,
        dst_port: protocol.has_ports().then_some(port),
        src_port: None,
        icmp: None,
        ip_version: None,
    };
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for (i, a) in pods.iter().enumerate() {
        for (j, b) in pods.iter().enumerate() {
            let (from, to) = (Peer::Endpoint(a.clone()), Peer::Endpoint(b.clone()));
            let flow = match flow_between(&cluster, &from, &to, spec, None, None) {
                Ok(f) => f,
                Err(_) => continue,
            };
            let out = match evaluate_connection(&*engine, &cluster, &from, &to, &flow) {
                Ok(o) => o,
                Err(EngineError::Unavailable(why)) => {
                    // A pod talking to itself never leaves its namespace.
                    if i != j {
                        eprintln!("  {from} -> {to}: not run: {why}");
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let deciding = match (&out.egress, &out.ingress) {
                (Some(e), _) if e.verdict == Verdict::Deny => Some((Direction::Egress, e.clone())),
                (_, Some(i)) if i.verdict == Verdict::Deny => Some((Direction::Ingress, i.clone())),
                (_, Some(i)) => Some((Direction::Ingress, i.clone())),
                (Some(e), None) => Some((Direction::Egress, e.clone())),
                (None, None) => None,
            };
            cells.insert(
                (i, j),
                Cell {
                    allowed: out.allowed,
                    deciding,
                },
            );
        }
    }
    // Legend: one letter per distinct decider.
    let mut legend: Vec<String> = Vec::new();
    let mut code = |d: &Option<(Direction, Decision)>| -> String {
        let Some((dir, dec)) = d else {
            return String::new();
        };
        let text = format!("{dir} {} by {}", dec.verdict, dec.decided_by);
        let idx = legend.iter().position(|l| *l == text).unwrap_or_else(|| {
            legend.push(text);
            legend.len() - 1
        });
        letter(idx)
    };
    let cell_text: BTreeMap<(usize, usize), String> = cells
        .iter()
        .map(|(k, c)| {
            let mark = if c.allowed { "✓" } else { "✗" };
            ((*k), format!("{mark}{}", code(&c.deciding)))
        })
        .collect();
    let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
    match format {
        Format::Json => {
            let rows: Vec<Value> = cells
                .iter()
                .map(|((i, j), c)| {
                    json!({
                        "from": names[*i], "to": names[*j], "allowed": c.allowed,
                        "deciding": c.deciding.as_ref().map(|(d, dec)| json!({"direction": d.to_string(), "decision": decision_json(dec)})),
                    })
                })
                .collect();
            outln!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"port": port, "protocol": protocol.to_string(), "cells": rows})
                )?
            )?;
        }
        Format::Markdown => {
            outln!("| from \\ to | {} |", names.join(" | "))?;
            outln!("|---|{}", "---|".repeat(names.len()))?;
            for (i, n) in names.iter().enumerate() {
                let row: Vec<String> = (0..names.len())
                    .map(|j| cell_text.get(&(i, j)).cloned().unwrap_or_default())
                    .collect();
                outln!("| {n} | {} |", row.join(" | "))?;
            }
            outln!()?;
            for (i, l) in legend.iter().enumerate() {
                outln!("- **{}**: {l}", letter(i))?;
            }
        }
        Format::Text => {
            outln!(
                "connectivity for {protocol}/{port} by the {} engine (rows: client, columns: server; ✓ allowed, ✗ denied)",
                engine.name()
            )?;
            let labels: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("[{}] {n}", i + 1))
                .collect();
            let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
            let cw = cell_text
                .values()
                .map(|c| c.chars().count())
                .chain((1..=names.len()).map(|j| format!("[{j}]").len()))
                .max()
                .unwrap_or(3);
            let pad = |s: &str, width: usize| {
                format!("{}{s}", " ".repeat(width.saturating_sub(s.chars().count())))
            };
            let header: Vec<String> = (1..=names.len())
                .map(|j| pad(&format!("[{j}]"), cw))
                .collect();
            outln!("{} {}", " ".repeat(w), header.join(" "))?;
            for (i, l) in labels.iter().enumerate() {
                let row: Vec<String> = (0..names.len())
                    .map(|j| {
                        pad(
                            cell_text.get(&(i, j)).map(String::as_str).unwrap_or("-"),
                            cw,
                        )
                    })
                    .collect();
                outln!("{l}{} {}", " ".repeat(w - l.chars().count()), row.join(" "))?;
            }
            outln!()?;
            for (i, l) in legend.iter().enumerate() {
                outln!("  {} = {l}", letter(i))?;
            }
        }
    }
    Ok(())
}

fn letter(i: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if i < 26 {
        (alphabet[i] as char).to_string()
    } else {
        format!(
            "{}{}",
            alphabet[i / 26 - 1] as char,
            alphabet[i % 26] as char
        )
    }
}
