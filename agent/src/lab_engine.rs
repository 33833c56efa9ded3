//! The `lab` engine of `matrix` and `explain`: answers over a multi-node
//! cluster on this machine (`palisade lab`'s: network namespaces as nodes,
//! an agent each on a local etcd member, the VXLAN overlay, the manifests'
//! Pods added through CNI). A connection is a real TCP handshake between
//! two pods, on one node or across the overlay; what each node's kernel
//! counted for it says which rule dropped it.
//!
//! Pods get their addresses from IPAM (the pools their
//! `cni.projectcalico.org/ipv4pools` annotation names), so the other
//! engines' cluster comes from the lab ([`LabEngine::model`]): the
//! manifests without their Pods, and the workload endpoints CNI wrote.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use policy_core::connection::{Peer, ProbeOutcome};
use policy_core::flow::DecidedBy;
use policy_core::net::Protocol;
use policy_core::{Cluster, EndpointKey, Engine, EngineError, Flow};

use crate::lab_cmd::{Counted, Running, bring_up, counted, drop_counters};

/// The lab, running; removed on drop.
pub struct LabEngine {
    running: Option<Running>,
    pods: HashMap<EndpointKey, usize>,
}

impl LabEngine {
    /// Brings up two nodes with the manifests in `files`; every pod also
    /// listens on `ports`.
    pub fn start(files: &[PathBuf], ports: &[u16]) -> Result<LabEngine> {
        let nodes = ["node-a".to_string(), "node-b".to_string()];
        let mut n = 0;
        // Beside `palisade lab`'s ports (9201 on), so both can run at once.
        let running = bring_up(files, &nodes, true, 9211, ports, &mut n)?;
        let pods = running
            .lab
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.key.clone(), i))
            .collect();
        Ok(LabEngine {
            running: Some(running),
            pods,
        })
    }

    /// A folder holding the cluster as the lab runs it: the manifests but
    /// their Pods, and the workload endpoints (with the lab's addresses).
    pub fn model(&self) -> Result<PathBuf> {
        let r = self.running();
        let dir = r.dir.join("model");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("manifests.yaml"), &r.manifests)?;
        let endpoints = r
            .lab
            .palisade(&["get", "workloadendpoints", "-o", "yaml"])?;
        std::fs::write(dir.join("endpoints.yaml"), endpoints)?;
        Ok(dir)
    }

    fn running(&self) -> &Running {
        self.running.as_ref().expect("present until drop")
    }

    /// Nodes and pods, for the banner.
    pub fn describe(&self) -> String {
        let lab = &self.running().lab;
        format!(
            "{} pods on {} nodes ({}) over VXLAN, each node's agent enforcing",
            lab.pods.len(),
            lab.nodes.len(),
            lab.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// Where a pod runs and its lab address.
    pub fn placement(&self, key: &EndpointKey) -> Option<(String, std::net::IpAddr)> {
        let lab = &self.running().lab;
        let p = &lab.pods[*self.pods.get(key)?];
        Some((lab.nodes[p.node].name.clone(), p.addr))
    }

    fn pair(&self, from: &Peer, to: &Peer, flow: &Flow) -> Result<(usize, usize), EngineError> {
        let index =
            |p: &Peer| match p {
                Peer::Endpoint(k) => self.pods.get(k).copied().ok_or_else(|| {
                    EngineError::Unavailable(format!("{k} does not run on the lab"))
                }),
                Peer::Ip(ip) => Err(EngineError::Unavailable(format!(
                    "{ip}: the lab probes between its pods"
                ))),
            };
        let (a, b) = (index(from)?, index(to)?);
        if a == b {
            return Err(EngineError::Unavailable(
                "a pod talking to itself never leaves its namespace".into(),
            ));
        }
        if flow.protocol != Protocol::TCP {
            return Err(EngineError::Unavailable(format!(
                "the lab probes TCP, not {}",
                flow.protocol
            )));
        }
        let w = &self.running().workloads[b];
        if !w.ports.contains(&flow.dst_port) {
            return Err(EngineError::Unavailable(format!(
                "{} does not listen on {}",
                w.key, flow.dst_port
            )));
        }
        Ok((a, b))
    }

    /// A real connection and what each node's kernel counted meanwhile.
    pub fn probe(
        &self,
        from: &Peer,
        to: &Peer,
        flow: &Flow,
    ) -> Result<(bool, Vec<Counted>), EngineError> {
        let (a, b) = self.pair(from, to, flow)?;
        let lab = &self.running().lab;
        let unavailable = |e: anyhow::Error| EngineError::Unavailable(format!("{e:#}"));
        let before = drop_counters(lab).map_err(unavailable)?;
        let ok = lab.connects(a, lab.pods[b].addr, flow.dst_port, Duration::from_secs(1));
        // Drops reach the counters through each agent's telemetry pass.
        std::thread::sleep(Duration::from_millis(1500));
        let after = drop_counters(lab).map_err(unavailable)?;
        Ok((ok, counted(&before, &after)))
    }
}

/// The `palisade_policy_drops_total` labels a denying decision is counted
/// under (profiles' rules are not counted).
pub fn drop_labels(d: &DecidedBy) -> Option<String> {
    let (tier, policy, rule) = match d {
        DecidedBy::Rule {
            tier, policy, rule, ..
        } => (tier.clone(), policy.to_string(), rule.to_string()),
        DecidedBy::TierDefault { tier } => (tier.clone(), "tier-default".into(), String::new()),
        DecidedBy::NoProfileMatch => (String::new(), "no-profile-match".into(), String::new()),
        DecidedBy::Profile { .. } => return None,
    };
    Some(format!(r#"tier="{tier}",policy="{policy}",rule="{rule}""#))
}

impl Engine for LabEngine {
    fn name(&self) -> &'static str {
        "lab"
    }

    fn decide(
        &self,
        _endpoint: &EndpointKey,
        _direction: policy_core::Direction,
        _flow: &Flow,
    ) -> Result<policy_core::Decision, EngineError> {
        Err(EngineError::Unavailable(
            "the lab answers whole connections, not one direction".into(),
        ))
    }

    /// A real connection; no per-direction decisions (the kernels' counts
    /// are in [`LabEngine::probe`]).
    fn connection(
        &self,
        _cluster: &Cluster,
        from: &Peer,
        to: &Peer,
        flow: &Flow,
    ) -> Result<ProbeOutcome, EngineError> {
        let (a, b) = self.pair(from, to, flow)?;
        let lab = &self.running().lab;
        Ok(ProbeOutcome {
            allowed: lab.connects(
                a,
                lab.pods[b].addr,
                flow.dst_port,
                Duration::from_millis(600),
            ),
            egress: None,
            ingress: None,
        })
    }
}

impl Drop for LabEngine {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            eprintln!("removing the lab: pods (CNI DEL), agents, namespaces, etcd");
            r.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denying_decision_is_counted_under_its_tier_policy_and_rule() {
        assert_eq!(
            drop_labels(&DecidedBy::TierDefault {
                tier: "default".into()
            })
            .unwrap(),
            r#"tier="default",policy="tier-default",rule="""#
        );
        assert_eq!(
            drop_labels(&DecidedBy::NoProfileMatch).unwrap(),
            r#"tier="",policy="no-profile-match",rule="""#
        );
        let before = std::collections::BTreeMap::from([(("a".to_string(), "s".to_string()), 2)]);
        let after = std::collections::BTreeMap::from([
            (("a".to_string(), "s".to_string()), 3),
            (("b".to_string(), "s".to_string()), 0),
        ]);
        assert_eq!(
            counted(&before, &after),
            vec![("a".to_string(), "s".to_string(), 1)]
        );
    }
}
