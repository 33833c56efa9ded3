//! `palisade verify` for the service corpus (kube-proxy's packet-flow and
//! endpoint-selection tests): each probe is one new connection, answered
//! by the engine asked for.

use std::path::Path;

use anyhow::Result;
use palisade_services::case::{Case, Outcome, Output, check_selection, outcome};
use palisade_services::{Packet, ServiceTable};
use std::net::SocketAddr;

use policy_bpf::datapath::Datapath;
use policy_bpf::lower::Capacity;
use policy_bpf::services::{
    ServiceCapacity, ServiceEntries, addr_from, lower_services, service_packet,
};
use policy_bpf_common::{NAT_MASQUERADE, NAT_REPLY, ServiceAction, service_decide};
use policy_core::flow::Flow;
use policy_core::net::Protocol as CoreProtocol;
use serde_json::Value;

use crate::Tally;

pub use palisade_services::case::is_case;

/// Which engine answers the probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEngine {
    /// The semantic model (`palisade_services`).
    Reference,
    /// The service lookup over the lowered map entries.
    Maps,
    /// The kernel's service program on crafted packets
    /// (`BPF_PROG_TEST_RUN`): what it did to each.
    Kernel,
    /// Real connections through the service program between namespaces.
    Netns,
    /// An engine without service load balancing yet: every probe is
    /// skipped with this name.
    Unsupported(String),
}

/// Runs one case file on `engine`.
pub fn run_file(
    path: &Path,
    doc: &Value,
    engine: ServiceEngine,
    kernel: &mut Option<Datapath>,
    verbose: bool,
) -> Result<Tally> {
    let name = path.display().to_string();
    let mut tally = Tally::default();
    let case = match Case::from_json(&name, doc).and_then(|c| c.table().map(|t| (c, t))) {
        Ok(c) => c,
        Err(e) => {
            outln!("FAIL {name}: case does not load: {e}")?;
            tally.failed += 1;
            return Ok(tally);
        }
    };
    let (case, table) = case;
    // The maps engine answers from the lowered map entries.
    let entries = match engine {
        ServiceEngine::Maps => match lower_services(&table, &ServiceCapacity::default()) {
            Ok(e) => Some(e),
            Err(e) => {
                outln!("FAIL {name}: service maps: {e}")?;
                tally.failed += 1;
                return Ok(tally);
            }
        },
        _ => None,
    };
    if matches!(engine, ServiceEngine::Kernel | ServiceEngine::Netns) {
        if kernel.is_none() {
            *kernel = Some(Datapath::load_private(Capacity::verification())?);
        }
        if let Some(dp) = kernel.as_mut()
            && let Err(e) = dp.set_services(&table)
        {
            outln!("FAIL {name}: service maps: {e}")?;
            tally.failed += 1;
            return Ok(tally);
        }
    }
    let mut netns = None;
    if engine == ServiceEngine::Netns {
        let sources: Vec<std::net::IpAddr> = case
            .probes
            .iter()
            .filter_map(|p| p.packet().ok().map(|k| k.source))
            .collect();
        let Some(dp) = kernel.as_mut() else {
            anyhow::bail!("the datapath is loaded above");
        };
        // Where probes that pass the service program untouched are sent:
        // a listener there shows they arrived as they left.
        let untouched: Vec<SocketAddr> = case
            .probes
            .iter()
            .filter(|p| p.expected().is_ok_and(|w| w.output == Output::Pass))
            .filter_map(|p| p.packet().ok())
            .map(|k| SocketAddr::new(k.destination, k.port))
            .collect();
        match crate::services_netns::ServiceNode::build(dp, &table, &sources, &untouched) {
            Ok(n) => netns = Some(n),
            Err(e) => {
                outln!("FAIL {name}: the case's node: {e}")?;
                tally.failed += 1;
                return Ok(tally);
            }
        }
    }
    let skip = |tally: &mut Tally, what: &str, why: String| -> Result<()> {
        tally.skipped += 1;
        *tally.skip_reasons.entry(why.clone()).or_insert(0) += 1;
        if verbose {
            outln!("skip {name} {what}: {why}")?;
        }
        Ok(())
    };
    let unsupported = match &engine {
        ServiceEngine::Unsupported(name) => Some(format!(
            "service load balancing is not on the {name} engine yet (issue 21); reference, maps and kernel only"
        )),
        _ => None,
    };
    for probe in &case.probes {
        if let Some(why) = probe.skip_reason(&case).or_else(|| unsupported.clone()) {
            skip(&mut tally, &probe.name, why)?;
            continue;
        }
        if let Some(why) = netns.as_ref().and_then(|_| {
            let packet = probe.packet().ok()?;
            let want = probe.expected().ok()?;
            crate::services_netns::unsupported(&table, &packet, &want)
        }) {
            skip(&mut tally, &probe.name, why)?;
            continue;
        }
        let result = probe.packet().and_then(|packet| {
            let want = probe.expected()?;
            if let (Some(node), Some(dp)) = (netns.as_ref(), kernel.as_mut()) {
                let (got, why) = node.probe(dp, &packet, &want)?;
                return if got == want {
                    Ok(())
                } else {
                    Err(format!("got {got} ({why}), want {want}"))
                };
            }
            let (got, why) = match kernel.as_mut() {
                Some(dp) if engine == ServiceEngine::Kernel => kernel_answer(dp, &packet, &want)?,
                _ => answer(&table, entries.as_ref(), &packet),
            };
            if got == want {
                Ok(())
            } else {
                Err(format!("got {got} ({why}), want {want}"))
            }
        });
        record(&mut tally, &name, &probe.name, result, verbose)?;
    }
    if let (Some(node), Some(dp)) = (netns, kernel.as_mut()) {
        node.finish(dp);
    }
    for check in &case.selection_checks {
        if let Some(why) = unsupported.clone() {
            skip(&mut tally, &check.name, why)?;
            continue;
        }
        record(
            &mut tally,
            &name,
            &check.name,
            check_selection(&case, check),
            verbose,
        )?;
    }
    Ok(tally)
}

/// One probe on the reference model, or on the map entries when given.
fn answer(
    table: &ServiceTable,
    entries: Option<&ServiceEntries>,
    packet: &Packet,
) -> (Outcome, String) {
    let Some(entries) = entries else {
        let verdict = table.decide(packet);
        return (outcome(&verdict, packet.source), verdict.to_string());
    };
    let action = service_decide(
        &service_packet(
            packet.source,
            packet.destination,
            packet.protocol,
            packet.port,
        ),
        entries,
    );
    let got = match action {
        ServiceAction::Forward {
            first,
            count,
            masquerade,
            ..
        } => {
            let backends = entries.backends_of(first, count);
            Outcome {
                masq: masquerade || backends.iter().any(|b| b.ip() == packet.source),
                output: Output::Endpoints(backends.into_iter().collect()),
            }
        }
        ServiceAction::Drop(_) => Outcome {
            output: Output::Drop,
            masq: false,
        },
        ServiceAction::Reject(_) => Outcome {
            output: Output::Reject,
            masq: false,
        },
        ServiceAction::Pass => Outcome {
            output: Output::Pass,
            masq: false,
        },
    };
    (got, format!("{action:?}"))
}

/// Source ports of a probe's trials: each is a new connection, and the
/// program picks a backend at random, so a probe runs until it has seen
/// every backend upstream expects (or enough trials to say it never will).
fn trials(want: &Outcome) -> u16 {
    match &want.output {
        Output::Endpoints(e) => 64 + 32 * e.len() as u16,
        _ => 1,
    }
}

/// One probe on the kernel's service program: each trial a fresh
/// connection, its packet's fate read back from the program.
fn kernel_answer(
    dp: &mut Datapath,
    packet: &Packet,
    want: &Outcome,
) -> std::result::Result<(Outcome, String), String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut masq = false;
    for i in 0..trials(want) {
        dp.flush_services_state().map_err(|e| e.to_string())?;
        let flow = Flow {
            src: packet.source,
            dst: packet.destination,
            protocol: CoreProtocol(packet.protocol.number()),
            src_port: 40_000 + i,
            dst_port: packet.port,
            icmp: None,
        };
        let sent = policy_bpf::packet::build(&flow);
        let (run, out) = dp.run_service(&sent, 0).map_err(|e| e.to_string())?;
        let fate = fate(&flow, run.retval, &out)?;
        match fate {
            Fate::Translated(to, masqueraded) => {
                seen.insert(to);
                // The node's own connections keep their address when
                // masqueraded: the connection's NAT entry says it.
                let marked = dp
                    .nat_entries()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .any(|(k, v)| {
                        k.src_port == flow.src_port
                            && v.flags & NAT_REPLY == 0
                            && v.flags & NAT_MASQUERADE != 0
                    });
                masq |= masqueraded || marked;
            }
            other => {
                let output = match other {
                    Fate::Dropped => Output::Drop,
                    Fate::Rejected => Output::Reject,
                    _ => Output::Pass,
                };
                return Ok((
                    Outcome {
                        output,
                        masq: false,
                    },
                    format!("kernel: {other:?}"),
                ));
            }
        }
        if let Output::Endpoints(e) = &want.output
            && seen == *e
        {
            break;
        }
    }
    let why = format!("kernel: translated to {} backends", seen.len());
    Ok((
        Outcome {
            output: Output::Endpoints(seen),
            masq,
        },
        why,
    ))
}

/// What the service program did to a packet.
#[derive(Debug)]
enum Fate {
    /// Passed unchanged.
    Untouched,
    Dropped,
    /// Answered with ICMP port unreachable to the sender.
    Rejected,
    /// Sent on to this backend; masqueraded or not.
    Translated(SocketAddr, bool),
}

fn fate(flow: &Flow, retval: i32, out: &[u8]) -> std::result::Result<Fate, String> {
    const SHOT: i32 = 2;
    const REDIRECT: i32 = 7;
    if retval == SHOT {
        return Ok(Fate::Dropped);
    }
    let p = policy_bpf_common::parse(&out).map_err(|e| format!("output does not parse: {e:?}"))?;
    let src = addr_from(p.family, &p.src);
    let dst = addr_from(p.family, &p.dst);
    if retval == REDIRECT {
        let unreachable = matches!(
            (p.protocol, p.icmp_type, p.icmp_code),
            (1, 3, 3) | (58, 1, 4)
        );
        return if unreachable && src == flow.dst && dst == flow.src {
            Ok(Fate::Rejected)
        } else {
            Err(format!(
                "redirected a packet that is not ICMP unreachable to the sender: protocol {} type {} from {src} to {dst}",
                p.protocol, p.icmp_type
            ))
        };
    }
    if retval != -1 && retval != 0 {
        return Err(format!("unexpected return code {retval}"));
    }
    if src == flow.src && dst == flow.dst && p.dst_port == flow.dst_port {
        return Ok(Fate::Untouched);
    }
    Ok(Fate::Translated(
        SocketAddr::new(dst, p.dst_port),
        src != flow.src,
    ))
}

fn record(
    tally: &mut Tally,
    file: &str,
    what: &str,
    result: std::result::Result<(), String>,
    verbose: bool,
) -> Result<()> {
    match result {
        Ok(()) => {
            tally.passed += 1;
            if verbose {
                outln!("ok   {file} {what}")?;
            }
        }
        Err(why) => {
            tally.failed += 1;
            outln!("FAIL {file} {what}: {why}")?;
        }
    }
    Ok(())
}
