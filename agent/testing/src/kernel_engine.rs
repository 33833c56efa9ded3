//! The `kernel` engine: the real TC programs, loaded into the kernel with the
//! lowered maps, run on crafted packets through `BPF_PROG_TEST_RUN`.
//!
//! Every endpoint is bound to the loopback interface (ifindex 1), which is
//! where test runs deliver packets; slots are keyed by address, so endpoints
//! stay apart. ([`KernelEngine::with_interfaces`] binds them elsewhere, for
//! runs on other devices: [`Datapath::run_on`].) Verdict events are sampled at 1 in 1 so every decision names
//! its rule, read back from the ring buffer.

use std::sync::Mutex;

use policy_bpf_common::*;
use policy_core::Cluster;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{Engine, EngineError};
use policy_core::flow::{Decision, Flow, Verdict};
use policy_core::model::{Direction, EndpointKey};

use policy_bpf::datapath::{Datapath, Hook};
use policy_bpf::lower::{Binding, Capacity, Lowering, WritePlan};
use policy_bpf::packet;

/// Loopback, where `BPF_PROG_TEST_RUN` delivers packets.
const TEST_IFINDEX: u32 = 1;

/// The kernel engine.
#[derive(Debug)]
pub struct KernelEngine {
    dp: Mutex<Datapath>,
    lowering: Lowering,
}

/// What one packet run decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketOutcome {
    /// Whether the packet passed.
    pub passed: bool,
    /// The verdict event it produced, if any.
    pub event: Option<Event>,
}

impl KernelEngine {
    /// Compiles, lowers and loads a cluster into a private datapath.
    pub fn new(cluster: &Cluster, cap: Capacity) -> Result<Self, EngineError> {
        Self::with_interfaces(cluster, cap, |_| TEST_IFINDEX)
    }

    /// [`KernelEngine::new`] with each endpoint bound to the interface
    /// `ifindex_of` names.
    pub fn with_interfaces(
        cluster: &Cluster,
        cap: Capacity,
        ifindex_of: impl Fn(&EndpointKey) -> u32,
    ) -> Result<Self, EngineError> {
        let (compiler, delta) = Compiler::from_cluster(cluster, CompileOptions::default())
            .map_err(|e| EngineError::InvalidCluster(e.to_string()))?;
        let mut dp = Datapath::load_private(cap).map_err(|e| match e {
            policy_bpf::datapath::DatapathError::Privileges(m) => EngineError::Unavailable(m),
            other => EngineError::Dataplane(other.to_string()),
        })?;
        dp.set_config(Config {
            allow_sample: 1,
            ..Config::default()
        })
        .map_err(|e| EngineError::Dataplane(e.to_string()))?;
        let mut lowering = Lowering::new(cap);
        let before = lowering.mirror().clone();
        let mut plan: WritePlan = lowering
            .lower(&delta)
            .map_err(|e| EngineError::Capacity(e.to_string()))?;
        for (i, ep) in compiler.cluster().endpoints().enumerate() {
            let p = lowering
                .bind(
                    &ep.key,
                    Some(Binding {
                        ifindex: ifindex_of(&ep.key),
                        zone: i as u32 + 1,
                    }),
                )
                .map_err(|e| EngineError::Dataplane(e.to_string()))?;
            plan.switch.extend(p.switch);
        }
        dp.write(&plan, &before)
            .map_err(|e| EngineError::Dataplane(e.to_string()))?;
        Ok(KernelEngine {
            dp: Mutex::new(dp),
            lowering,
        })
    }

    /// The lowering behind the maps.
    pub fn lowering(&self) -> &Lowering {
        &self.lowering
    }

    /// Runs one packet through a hook; conntrack is kept (for replies).
    pub fn run_packet(&self, hook: Hook, packet: &[u8]) -> Result<PacketOutcome, EngineError> {
        let mut dp = self
            .dp
            .lock()
            .map_err(|_| EngineError::Inconsistent("datapath lock poisoned".into()))?;
        dp.drain_events();
        let r = dp
            .run(hook, packet, 1)
            .map_err(|e| EngineError::Dataplane(e.to_string()))?;
        let event = dp.drain_events().into_iter().last();
        Ok(PacketOutcome {
            passed: r.passed(),
            event,
        })
    }

    /// Forgets all tracked connections.
    pub fn flush(&self) {
        if let Ok(dp) = self.dp.lock() {
            dp.flush_conntrack();
        }
    }

    /// Runs `f` with the datapath (statistics, counters, benchmarks).
    pub fn with_datapath<T>(&self, f: impl FnOnce(&mut Datapath) -> T) -> Result<T, EngineError> {
        let mut dp = self
            .dp
            .lock()
            .map_err(|_| EngineError::Inconsistent("datapath lock poisoned".into()))?;
        Ok(f(&mut dp))
    }

    fn decision(&self, o: &PacketOutcome) -> Result<Decision, EngineError> {
        let e = o.event.ok_or_else(|| {
            EngineError::Inconsistent("the program reported no verdict event".into())
        })?;
        decision_from_event(&self.lowering, &e, o.passed)
    }
}

/// The decision a verdict event reports, checked against whether the packet
/// actually passed.
pub fn decision_from_event(
    lowering: &Lowering,
    e: &Event,
    passed: bool,
) -> Result<Decision, EngineError> {
    if e.reason != EventReason::Policy.code() {
        return Err(EngineError::Dataplane(format!(
            "packet dropped before policy (reason {})",
            e.reason
        )));
    }
    let rule = lowering.rule(e.rule).ok_or_else(|| {
        EngineError::Inconsistent(format!("event names unknown rule index {}", e.rule))
    })?;
    if (e.allow == 1) != passed {
        return Err(EngineError::Inconsistent(
            "event verdict disagrees with the return code".into(),
        ));
    }
    Ok(Decision {
        verdict: if passed {
            Verdict::Allow
        } else {
            Verdict::Deny
        },
        decided_by: rule.decided_by(),
        logged: e.flags & EVENT_LOGGED != 0,
    })
}

impl Engine for KernelEngine {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError> {
        flow.validate().map_err(EngineError::InvalidFlow)?;
        if self.lowering.binding(endpoint).is_none() {
            return Err(EngineError::UnknownEndpoint(endpoint.clone()));
        }
        // A fresh decision: no connection may be remembered from earlier runs.
        self.flush();
        let hook = match direction {
            Direction::Egress => Hook::FromPod,
            Direction::Ingress => Hook::ToPod,
        };
        let o = self.run_packet(hook, &packet::build(flow))?;
        self.decision(&o)
    }
}
