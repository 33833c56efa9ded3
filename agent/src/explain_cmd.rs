//! `palisade explain`: who decided a connection, rule by rule.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use policy_core::connection::{ConnectionSpec, Peer, enforcing_endpoint, flow_between};
use policy_core::flow::{DecidedBy, Decision, Verdict};
use policy_core::net::Protocol;
use policy_core::reference::{RuleOutcome, TierOutcome, Trace};
use policy_core::{Direction, ReferenceEngine};
use serde_json::{Value, json};

use crate::load::load_cluster;
use crate::resolve::known_pod;
use crate::verify_cmd::{EngineKind, build_engine};
use palisade_testing::netns_engine::{EventReport, NetnsEngine};
use policy_bpf::lower::Capacity;
use policy_bpf_common::{Counter, EventReason};
use policy_core::EngineError;
use policy_core::connection::{ProbeOutcome, evaluate_connection};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For programs.
    Json,
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
            .map(|r| {
                let mut v = match &r.outcome {
                    RuleOutcome::Matched => json!({"index": r.index, "action": r.action.to_string(), "matched": true}),
                    RuleOutcome::NoMatch(why) => json!({"index": r.index, "action": r.action.to_string(), "matched": false, "why": why}),
                };
                if let Some(name) = &r.name {
                    v["name"] = json!(name);
                }
                v
            })
            .collect()
    };
    let mut decision = decision_json(&t.decision);
    if let Some(name) = t.decider_name() {
        decision["decidedBy"]["ruleName"] = json!(name);
    }
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
        "decision": decision,
    })
}

pub fn explain(
    files: &[PathBuf],
    args: &ConnectionArgs,
    format: Format,
    engine_kind: EngineKind,
) -> Result<bool> {
    // The lab runs first: the cluster is then what it runs (its addresses).
    let lab = (engine_kind == EngineKind::Lab)
        .then(|| crate::lab_engine::LabEngine::start(files, args.port.as_slice()))
        .transpose()?;
    let files = match &lab {
        Some(l) => vec![l.model()?],
        None => files.to_vec(),
    };
    let cluster = load_cluster(&files)?;
    let engine = ReferenceEngine::new(&cluster);
    let from: Peer = args
        .from
        .parse()
        .map_err(|e: String| anyhow!("--from: {e}"))?;
    let to: Peer = args.to.parse().map_err(|e: String| anyhow!("--to: {e}"))?;
    for (peer, flag) in [(&from, "--from"), (&to, "--to")] {
        if let Peer::Endpoint(k) = peer {
            known_pod(&cluster, k, flag)?;
        }
    }
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
        kind => Some(observe(lab.as_ref(), &cluster, kind, &from, &to, &flow)?),
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
                    "{verdict}: {} denied by {}{}",
                    t.direction,
                    t.decision.decided_by,
                    t.decider_name()
                        .map(|n| format!(", named {n:?}"))
                        .unwrap_or_default()
                )?,
                None => outln!("{verdict}")?,
            }
        }
    }
    if let Some(o) = &observed
        && let Some(lab) = &o.lab
    {
        lab.check(&traces, o.outcome.allowed)?;
    } else if let Some(o) = &observed {
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
    /// For `lab`: where the ends ran and what each node's kernel counted.
    lab: Option<LabObserved>,
}

/// A connection across the lab: each end's node and address, and the drop
/// counters that rose on each node meanwhile.
struct LabObserved {
    from: (String, std::net::IpAddr),
    to: (String, std::net::IpAddr),
    counted: Vec<crate::lab_cmd::Counted>,
}

impl LabObserved {
    /// The lab agrees with the reference when the connection went as the
    /// reference says and, when denied, the node of the denying end
    /// counted the drop under the rule the reference names.
    fn check(&self, traces: &[Trace], allowed: bool) -> Result<()> {
        let denied = traces.iter().find(|t| t.decision.verdict == Verdict::Deny);
        if allowed != denied.is_none() {
            anyhow::bail!(
                "the lab disagrees with the reference: the connection was {}",
                if allowed { "set up" } else { "blocked" }
            );
        }
        let Some(t) = denied else { return Ok(()) };
        let Some(labels) = crate::lab_engine::drop_labels(&t.decision.decided_by) else {
            return Ok(());
        };
        let node = match t.direction {
            Direction::Egress => &self.from.0,
            Direction::Ingress => &self.to.0,
        };
        if !self
            .counted
            .iter()
            .any(|(n, series, _)| n == node && series.contains(&labels))
        {
            anyhow::bail!(
                "the lab disagrees with the reference: {node}'s kernel counted no drop under {{{labels}}}"
            );
        }
        Ok(())
    }
}

impl Observed {
    fn print(&self) -> std::io::Result<()> {
        let verdict = if self.outcome.allowed {
            "connected"
        } else {
            "blocked"
        };
        outln!("{} engine: the connection was {verdict}", self.engine)?;
        if let Some(lab) = &self.lab {
            outln!(
                "  client on {} ({}), server on {} ({})",
                lab.from.0,
                lab.from.1,
                lab.to.0,
                lab.to.1
            )?;
            for (node, series, n) in &lab.counted {
                outln!("  {node}'s kernel counted: +{n} {series}")?;
            }
            if lab.counted.is_empty() {
                outln!("  no kernel counted a drop for it")?;
            }
        }
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
    lab: Option<&crate::lab_engine::LabEngine>,
    cluster: &policy_core::Cluster,
    kind: EngineKind,
    from: &Peer,
    to: &Peer,
    flow: &policy_core::Flow,
) -> Result<Observed> {
    if let Some(engine) = lab {
        let place = |p: &Peer| match p {
            Peer::Endpoint(k) => engine
                .placement(k)
                .with_context(|| format!("{k} does not run on the lab")),
            Peer::Ip(ip) => anyhow::bail!("{ip}: the lab probes between its pods"),
        };
        let lab = LabObserved {
            from: place(from)?,
            to: place(to)?,
            counted: Vec::new(),
        };
        let (allowed, counted) = engine.probe(from, to, flow)?;
        return Ok(Observed {
            engine: format!("lab ({})", engine.describe()),
            outcome: ProbeOutcome {
                allowed,
                egress: None,
                ingress: None,
            },
            events: Vec::new(),
            lab: Some(LabObserved { counted, ..lab }),
        });
    }
    if kind == EngineKind::Netns {
        // Namespaces for the two ends only, not for every pod of the cluster.
        // An address peer that is some pod's address is that pod.
        let ends: Vec<&policy_core::EndpointKey> = cluster
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
                let c = (r.event.reason == EventReason::Policy.code())
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
            lab: None,
        });
    }
    let engine = build_engine(kind, cluster)?;
    let outcome = evaluate_connection(&*engine, cluster, from, to, flow)?;
    Ok(Observed {
        engine: engine.name().to_string(),
        outcome,
        events: Vec::new(),
        lab: None,
    })
}
