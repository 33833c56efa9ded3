//! `palisade services`: a node's service table from Service and
//! EndpointSlice manifests — every frontend with its traffic policies and
//! the backends each traffic class reaches, the service maps' fill — and,
//! with `--probe`, what happens to one new connection, answered by the
//! model and by the lowered maps side by side.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::agent::services::ProxyArgs;
use anyhow::{Context, Result, bail};
use palisade_services::case::outcome;
use palisade_services::{Family, FrontendKind, Objects, Packet, Protocol, ServiceTable};
use policy_bpf::services::{ServiceCapacity, lower_services, service_packet};
use policy_bpf_common::{ServiceAction, service_decide};
use serde_json::Value;

#[derive(clap::Args)]
pub struct ServicesArgs {
    /// Manifest files or folders (Services and EndpointSlices; other kinds are ignored).
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// The node the table is for (endpoints on it are local).
    #[arg(long, default_value = "node-a")]
    node: String,
    /// The node's addresses; the first of each family is its primary.
    #[arg(long = "node-ip", value_delimiter = ',')]
    node_ips: Vec<IpAddr>,
    #[command(flatten)]
    proxy: ProxyArgs,
    /// One new connection to decide: SOURCE,DESTINATION:PORT[/TCP|UDP|SCTP].
    #[arg(long)]
    probe: Option<String>,
}

fn documents(files: &[PathBuf]) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for f in crate::load::collect_files(files, &["yaml", "yml", "json"])? {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.display().to_string();
        let split = policy_core::manifest::split_documents(&name, &text)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for d in split {
            match d.value.get("items").and_then(Value::as_array) {
                Some(items) => docs.extend(items.iter().cloned()),
                None => docs.push(d.value),
            }
        }
    }
    Ok(docs)
}

fn parse_probe(s: &str) -> Result<Packet> {
    let (src, rest) = s
        .split_once(',')
        .context("--probe: expected SOURCE,DESTINATION:PORT[/PROTO]")?;
    let (dst, proto) = match rest.split_once('/') {
        Some((d, p)) => (d, p),
        None => (rest, "TCP"),
    };
    let (host, port) = dst
        .rsplit_once(':')
        .context("--probe: the destination needs a port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Packet {
        source: src
            .parse()
            .with_context(|| format!("--probe: source {src:?}"))?,
        destination: host
            .parse()
            .with_context(|| format!("--probe: destination {host:?}"))?,
        protocol: Protocol::parse(Some(&proto.to_ascii_uppercase()))
            .with_context(|| format!("--probe: protocol {proto:?}"))?,
        port: port
            .parse()
            .with_context(|| format!("--probe: port {port:?}"))?,
    })
}

fn list(v: &[std::net::SocketAddr]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s: Vec<String> = v.iter().map(ToString::to_string).collect();
    if s.len() > 4 {
        let more = s.len() - 3;
        s.truncate(3);
        s.push(format!("+{more}"));
    }
    s.join(" ")
}

pub fn run(args: &ServicesArgs) -> Result<()> {
    let docs = documents(&args.files)?;
    let objects = Objects::from_documents(&docs)?;
    if objects.services.is_empty() {
        bail!(
            "no Service in {}",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let probe = args.probe.as_deref().map(parse_probe).transpose()?;
    for family in [Family::V4, Family::V6] {
        let ports = objects.service_ports(family)?;
        if ports.is_empty() {
            continue;
        }
        let config = args
            .proxy
            .config(family, &args.node, args.node_ips.clone(), Vec::new());
        let table = ServiceTable::build(config, &ports);
        outln!(
            "{} services on {}",
            if family == Family::V4 { "IPv4" } else { "IPv6" },
            args.node
        )?;
        outln!(
            "{:<28} {:<5} {:<34} {:<22} {:<40} {}",
            "SERVICE PORT",
            "PROTO",
            "FRONTENDS",
            "POLICY",
            "CLUSTER BACKENDS",
            "LOCAL BACKENDS"
        )?;
        let mut fronts: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut keys: Vec<_> = table.frontends.iter().collect();
        keys.sort_by_key(|((ip, _, port), (kind, _))| (*kind, *ip, *port));
        for ((ip, _, port), (kind, idx)) in keys {
            let what = match kind {
                FrontendKind::ClusterIp => "cluster",
                FrontendKind::ExternalIp => "external",
                FrontendKind::LoadBalancer => "lb",
                FrontendKind::NodePort => "nodeport",
            };
            let addr = if ip.is_ipv6() {
                format!("[{ip}]")
            } else {
                ip.to_string()
            };
            fronts
                .entry(*idx)
                .or_default()
                .push(format!("{what} {addr}:{port}"));
        }
        let node_port_ips: Vec<String> = table
            .node_port_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        let node_port_ips = if node_port_ips.is_empty() {
            "(no node address)".to_string()
        } else {
            node_port_ips.join("|")
        };
        for ((_, port), idx) in &table.node_ports {
            fronts
                .entry(*idx)
                .or_default()
                .push(format!("nodeport {node_port_ips}:{port}"));
        }
        for (i, b) in table.services.iter().enumerate() {
            let mut policy = Vec::new();
            if b.internal_local {
                policy.push("iTP=Local");
            }
            if b.external_local {
                policy.push("eTP=Local");
            }
            if b.affinity_seconds.is_some() {
                policy.push("ClientIP");
            }
            if !b.source_ranges.is_empty() {
                policy.push("ranges");
            }
            if !b.has_any {
                policy.push("REJECT");
            }
            let f = fronts.remove(&i).unwrap_or_default();
            let local = if b.internal_local || b.external_local {
                list(&b.local)
            } else {
                "-".into()
            };
            outln!(
                "{:<28} {:<5} {:<34} {:<22} {:<40} {}",
                b.name.to_string(),
                b.protocol.to_string(),
                f.first().cloned().unwrap_or_else(|| "-".into()),
                if policy.is_empty() {
                    "-".to_string()
                } else {
                    policy.join(",")
                },
                list(&b.cluster),
                local
            )?;
            for more in f.iter().skip(1) {
                outln!("{:<28} {:<5} {}", "", "", more)?;
            }
        }
        let capacity = ServiceCapacity::default();
        let fill = match lower_services(&table, &capacity) {
            Ok(e) => format!(
                "frontends {}/{} ({} Service ports), backends {}/{}, address classes {}/{}, source ranges {}/{}",
                e.frontends.len(),
                capacity.frontends,
                e.services.len(),
                e.backends.len(),
                capacity.backends,
                e.addresses.len(),
                capacity.addresses,
                e.source_ranges.len(),
                capacity.source_ranges
            ),
            Err(e) => format!("does not fit: {e}"),
        };
        outln!("maps: {fill}")?;
        if let Some(p) = probe.filter(|p| family.holds(&p.destination)) {
            let model = table.decide(&p);
            let got = outcome(&model, p.source);
            outln!(
                "\nprobe {} -> {}:{}/{}",
                p.source,
                p.destination,
                p.port,
                p.protocol
            )?;
            outln!("  model: {model}")?;
            outln!("  as the corpus writes it: {got}")?;
            if let Ok(entries) = lower_services(&table, &capacity) {
                let action = service_decide(
                    &service_packet(p.source, p.destination, p.protocol, p.port),
                    &entries,
                );
                let text = match action {
                    ServiceAction::Forward {
                        first,
                        count,
                        masquerade,
                        ..
                    } => format!(
                        "forward to one of {} (masquerade {masquerade})",
                        list(&entries.backends_of(first, count))
                    ),
                    other => format!("{other:?}"),
                };
                outln!("  maps:  {text}")?;
            }
        }
        outln!()?;
    }
    Ok(())
}
