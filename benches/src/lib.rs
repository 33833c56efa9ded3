//! Shared helpers for Palisade's benchmarks: the generated clusters, the
//! changes the incremental benchmarks apply, and a live-heap counter.
//!
//! ```
//! use palisade_benches::cluster;
//! let c = cluster(200, 20);
//! assert!(c.endpoints().count() >= 200);
//! ```

pub mod chart;
pub mod dataplane;
pub mod kube_proxy;
pub mod memory;
pub mod packet_cost;
pub mod service_lab;
pub mod veth;

use palisade_testing::testgen::{Rng, Scale, scale_cluster};
use policy_core::convert::Object;
use policy_core::model::{Endpoint, EndpointKey, Policy};
use policy_core::net::PortMatch;
use policy_core::{Change, Cluster};

/// Seed for every generated cluster, so runs are comparable.
pub const SEED: u64 = 0x9a1_15ade;

/// Pods per node in generated clusters: the node-local view compiles 200 endpoints.
pub const PODS_PER_NODE: usize = 200;

/// The objects of the generated cluster of a given size.
pub fn objects(pods: usize, policies: usize) -> Vec<Object> {
    scale_cluster(
        Scale {
            pods,
            policies,
            pods_per_node: PODS_PER_NODE,
        },
        SEED,
    )
}

/// The generated cluster of a given size.
pub fn cluster(pods: usize, policies: usize) -> Cluster {
    let mut c = Cluster::new();
    c.apply(
        objects(pods, policies)
            .into_iter()
            .map(Change::Upsert)
            .collect(),
    )
    .expect("generated cluster is valid");
    c
}

/// The kinds of single change the incremental benchmarks measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new pod joins an existing deployment.
    PodAdd,
    /// An existing pod's `version` label flips.
    LabelChange,
    /// An existing Kubernetes NetworkPolicy's port changes.
    PolicyChange,
}

impl ChangeKind {
    /// All kinds.
    pub const ALL: [ChangeKind; 3] = [
        ChangeKind::PodAdd,
        ChangeKind::LabelChange,
        ChangeKind::PolicyChange,
    ];

    /// Label for tables.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::PodAdd => "pod add",
            ChangeKind::LabelChange => "pod label change",
            ChangeKind::PolicyChange => "policy change",
        }
    }
}

/// A random change of `kind` against `cluster`. `step` makes new names unique.
pub fn change(kind: ChangeKind, cluster: &Cluster, r: &mut Rng, step: usize) -> Change {
    let endpoints: Vec<&Endpoint> = cluster.endpoints().collect();
    match kind {
        ChangeKind::PodAdd => {
            let mut e = (*r.pick(&endpoints)).clone();
            e.key = EndpointKey::new(e.key.namespace.clone(), format!("new-{step}"));
            e.ips = vec![
                format!(
                    "10.{}.{}.{}",
                    200 + step / 62_500 % 50,
                    step / 250 % 250,
                    step % 250 + 1
                )
                .parse()
                .expect("ip"),
            ];
            Change::Upsert(Object::Endpoint(e))
        }
        ChangeKind::LabelChange => {
            let mut e = (*r.pick(&endpoints)).clone();
            let v = if e.labels.get("version").map(String::as_str) == Some("v0") {
                "v1"
            } else {
                "v0"
            };
            e.labels.insert("version".into(), v.into());
            Change::Upsert(Object::Endpoint(e))
        }
        ChangeKind::PolicyChange => {
            let policies: Vec<&Policy> = cluster
                .policies()
                .filter(|p| p.id.kind == policy_core::model::PolicyKind::KubernetesNetworkPolicy)
                .collect();
            let mut p = (*r.pick(&policies)).clone();
            // Move the first rule's port somewhere else, or add a rule.
            let port = 1000 + (step % 5000) as u16;
            let rules = if p.ingress.is_empty() && !p.egress.is_empty() {
                &mut p.egress
            } else {
                &mut p.ingress
            };
            if rules.is_empty() {
                rules.push(policy_core::model::Rule::any(
                    policy_core::model::Action::Allow,
                ));
            }
            let rule = &mut rules[0];
            rule.destination.ports = vec![PortMatch::Range {
                first: port,
                last: port,
            }];
            rule.protocol = Some(policy_core::net::Protocol::TCP);
            Change::Upsert(Object::Policy(p))
        }
    }
}

/// Counts heap allocations; the report binary installs it as the global
/// allocator to measure compiled memory.
pub use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

/// Writes a report's page and chart as `docs/<stem>.md` and `.svg`.
pub fn write_docs(stem: &str, md: &str, svg: &str) -> std::io::Result<()> {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::write(docs.join(format!("{stem}.md")), md)?;
    std::fs::write(docs.join(format!("{stem}.svg")), svg)?;
    eprintln!("wrote docs/{stem}.md and .svg");
    Ok(())
}

/// What `tool --version` prints (empty when it cannot run).
pub fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `--sizes N,N,...` from a report's arguments, or `default`.
pub fn sizes_arg(args: &[String], default: &[usize]) -> anyhow::Result<Vec<usize>> {
    match args.iter().position(|a| a == "--sizes") {
        Some(i) => {
            let list = args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("--sizes N,N,..."))?;
            Ok(list.split(',').map(str::parse).collect::<Result<_, _>>()?)
        }
        None => Ok(default.to_vec()),
    }
}
