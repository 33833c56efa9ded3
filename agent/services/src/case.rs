//! Cases of the service corpus (`conformance/services`, schema in its
//! README): a node, a proxy configuration, Services and EndpointSlices,
//! and probes (one new connection each) or endpoint-selection checks. Any
//! engine that can answer "what happens to this packet" runs them here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::decide::{Packet, Verdict};
use crate::objects::{Family, Objects, Protocol, parse_ip};
use crate::table::{ProxyConfig, ServiceTable};
use crate::topology::{NodeTopology, categorize};

/// Whether a JSON document is a service case.
pub fn is_case(doc: &Value) -> bool {
    doc.get("objects").is_some() && doc.get("config").is_some() && doc.get("node").is_some()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeDoc {
    name: String,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDoc {
    #[serde(default)]
    ip_family: Option<String>,
    #[serde(default, rename = "clusterCIDRs")]
    cluster_cidrs: Vec<String>,
    #[serde(default, rename = "serviceCIDRs")]
    service_cidrs: Vec<String>,
    #[serde(default)]
    masquerade_all: bool,
    #[serde(default)]
    node_port_addresses: Vec<String>,
    #[serde(default)]
    feature_gates: BTreeMap<String, bool>,
}

/// One probe: a new connection and what upstream says happens to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub name: String,
    #[serde(rename = "sourceIP")]
    pub source_ip: String,
    pub protocol: String,
    #[serde(rename = "destIP")]
    pub dest_ip: String,
    pub dest_port: u16,
    pub expect: ProbeExpect,
    #[serde(default)]
    pub implementation_specific: bool,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProbeExpect {
    pub output: String,
    pub masq: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectionCheck {
    pub name: String,
    pub service_port: String,
    pub expect: SelectionExpect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SelectionExpect {
    pub cluster_endpoints: Option<Vec<String>>,
    pub local_endpoints: Option<Vec<String>>,
    pub all_endpoints: Option<Vec<String>>,
    pub has_any_endpoints: bool,
}

/// A loaded case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    /// From the nftables proxier's tests (the semantics Palisade follows).
    pub nftables: bool,
    pub config: ProxyConfig,
    pub objects: Objects,
    pub probes: Vec<Probe>,
    pub selection_checks: Vec<SelectionCheck>,
}

/// An answer in the corpus's terms: `output` and `masq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Endpoint set, or `DROP`, `REJECT`, `ACCEPT`, or empty (pass).
    pub output: Output,
    pub masq: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Endpoints(BTreeSet<SocketAddr>),
    Drop,
    Reject,
    Accept,
    Pass,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.output {
            Output::Endpoints(e) => {
                let v: Vec<String> = e.iter().map(SocketAddr::to_string).collect();
                write!(f, "{:?}", v.join(", "))?
            }
            Output::Drop => f.write_str("DROP")?,
            Output::Reject => f.write_str("REJECT")?,
            Output::Accept => f.write_str("ACCEPT")?,
            Output::Pass => f.write_str("\"\"")?,
        }
        write!(f, " masq={}", self.masq)
    }
}

fn field<T>(what: &str, v: Option<T>) -> Result<T, String> {
    v.ok_or_else(|| format!("{what} does not parse"))
}

/// Parses an expected output (`"IP:port, ..."`, `DROP`, `REJECT`, `ACCEPT`, `""`).
pub fn parse_output(s: &str) -> Result<Output, String> {
    Ok(match s.trim() {
        "" => Output::Pass,
        "DROP" => Output::Drop,
        "REJECT" => Output::Reject,
        "ACCEPT" => Output::Accept,
        list => Output::Endpoints(
            list.split(',')
                .map(|e| field(&format!("endpoint {e:?}"), e.trim().parse().ok()))
                .collect::<Result<_, _>>()?,
        ),
    })
}

impl Case {
    /// Loads a case document.
    pub fn from_json(name: &str, doc: &Value) -> Result<Case, String> {
        let node: NodeDoc =
            serde_json::from_value(doc["node"].clone()).map_err(|e| format!("node: {e}"))?;
        let config: ConfigDoc =
            serde_json::from_value(doc["config"].clone()).map_err(|e| format!("config: {e}"))?;
        let family = match config.ip_family.as_deref() {
            None | Some("IPv4") => Family::V4,
            Some("IPv6") => Family::V6,
            Some(other) => return Err(format!("config.ipFamily: {other:?}")),
        };
        let nets = |list: &[String], what: &str| -> Result<Vec<IpNet>, String> {
            list.iter()
                .map(|s| field(&format!("{what} {s:?}"), s.trim().parse().ok()))
                .collect()
        };
        let node_ips = node
            .ips
            .iter()
            .map(|s| field(&format!("node.ips {s:?}"), parse_ip(s)))
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let gate = config
            .feature_gates
            .get("PreferSameTrafficDistribution")
            .copied()
            .unwrap_or(true);
        let proxy = ProxyConfig {
            family,
            node: NodeTopology::new(&node.name, &node.labels, gate),
            node_ips,
            cluster_cidrs: nets(&config.cluster_cidrs, "config.clusterCIDRs")?,
            service_cidrs: nets(&config.service_cidrs, "config.serviceCIDRs")?,
            masquerade_all: config.masquerade_all,
            node_port_addresses: nets(&config.node_port_addresses, "config.nodePortAddresses")?,
        };
        let docs = doc["objects"].as_array().cloned().unwrap_or_default();
        let objects = Objects::from_documents(&docs).map_err(|e| e.to_string())?;
        let probes =
            serde_json::from_value(doc.get("probes").cloned().unwrap_or(Value::Array(vec![])))
                .map_err(|e| format!("probes: {e}"))?;
        let selection_checks = serde_json::from_value(
            doc.get("selectionChecks")
                .cloned()
                .unwrap_or(Value::Array(vec![])),
        )
        .map_err(|e| format!("selectionChecks: {e}"))?;
        let path = doc["source"]["path"].as_str().unwrap_or("");
        Ok(Case {
            name: name.to_string(),
            nftables: path.contains("/nftables/"),
            config: proxy,
            objects,
            probes,
            selection_checks,
        })
    }

    /// The reference engine's table for this case.
    pub fn table(&self) -> Result<ServiceTable, String> {
        let ports = self
            .objects
            .service_ports(self.config.family)
            .map_err(|e| e.to_string())?;
        Ok(ServiceTable::build(self.config.clone(), &ports))
    }
}

impl Probe {
    /// The probe's packet.
    pub fn packet(&self) -> Result<Packet, String> {
        Ok(Packet {
            source: field("sourceIP", parse_ip(&self.source_ip))?,
            destination: field("destIP", parse_ip(&self.dest_ip))?,
            protocol: field("protocol", Protocol::parse(Some(&self.protocol)))?,
            port: self.dest_port,
        })
    }

    pub fn expected(&self) -> Result<Outcome, String> {
        Ok(Outcome {
            output: parse_output(&self.expect.output)?,
            masq: self.expect.masq,
        })
    }

    /// Why this probe is not run under nftables semantics, if it is not.
    pub fn skip_reason(&self, case: &Case) -> Option<String> {
        (self.implementation_specific && !case.nftables).then(|| {
            "implementation-specific to the iptables proxier (Palisade follows the nftables one)".to_string()
        })
    }
}

/// A verdict in the corpus's terms: the candidate set, and masquerade when
/// the policy masquerades or the client is among its own candidates
/// (hairpin).
pub fn outcome(verdict: &Verdict, source: IpAddr) -> Outcome {
    match verdict {
        Verdict::Forward { backends, .. } => Outcome {
            output: Output::Endpoints(backends.iter().copied().collect()),
            masq: backends.iter().any(|b| verdict.masquerades_to(source, *b)),
        },
        Verdict::Drop(_) => Outcome {
            output: Output::Drop,
            masq: false,
        },
        Verdict::Reject(_) => Outcome {
            output: Output::Reject,
            masq: false,
        },
        Verdict::Pass => Outcome {
            output: Output::Pass,
            masq: false,
        },
    }
}

/// Runs one selection check on the reference model; `Err` says what differs.
pub fn check_selection(case: &Case, check: &SelectionCheck) -> Result<(), String> {
    let ports = case
        .objects
        .service_ports(case.config.family)
        .map_err(|e| e.to_string())?;
    let port = ports
        .iter()
        .find(|p| p.name.to_string() == check.service_port)
        .ok_or_else(|| format!("no Service port {}", check.service_port))?;
    let got = categorize(port, &case.config.node);
    let set = |v: &Option<Vec<crate::objects::Endpoint>>| -> BTreeSet<String> {
        v.iter().flatten().map(|e| e.addr.to_string()).collect()
    };
    let want =
        |v: &Option<Vec<String>>| -> BTreeSet<String> { v.iter().flatten().cloned().collect() };
    let all: BTreeSet<String> = got.all.iter().map(|e| e.addr.to_string()).collect();
    let mut diffs = Vec::new();
    for (what, g, w) in [
        (
            "clusterEndpoints",
            set(&got.cluster),
            want(&check.expect.cluster_endpoints),
        ),
        (
            "localEndpoints",
            set(&got.local),
            want(&check.expect.local_endpoints),
        ),
        ("allEndpoints", all, want(&check.expect.all_endpoints)),
    ] {
        if g != w {
            diffs.push(format!("{what}: got {g:?}, want {w:?}"));
        }
    }
    if got.has_any != check.expect.has_any_endpoints {
        diffs.push(format!(
            "hasAnyEndpoints: got {}, want {}",
            got.has_any, check.expect.has_any_endpoints
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}
