//! The `maps` engine: answers from exactly the lowered map contents, with the
//! same walk function the kernel program runs.

use policy_bpf_common::*;
use policy_core::Cluster;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{Engine, EngineError};
use policy_core::flow::{Decision, Flow, Verdict};
use policy_core::model::{Direction, EndpointKey};

use policy_bpf::lower::{Binding, Capacity, Lowering};

/// A compiled cluster lowered into map contents, answered from the mirror.
#[derive(Debug)]
pub struct MapsEngine {
    lowering: Lowering,
}

/// Interface numbers given to endpoints when no real interface exists.
pub const SYNTHETIC_IFINDEX_BASE: u32 = 1000;

impl MapsEngine {
    /// Compiles and lowers a cluster, binding every endpoint to a synthetic
    /// interface.
    pub fn new(cluster: &Cluster, cap: Capacity) -> Result<Self, EngineError> {
        let (compiler, delta) = Compiler::from_cluster(cluster, CompileOptions::default())
            .map_err(|e| EngineError::InvalidCluster(e.to_string()))?;
        let mut lowering = Lowering::new(cap);
        lowering
            .lower(&delta)
            .map_err(|e| EngineError::Capacity(e.to_string()))?;
        for (i, ep) in compiler.cluster().endpoints().enumerate() {
            let n = i as u32 + 1;
            lowering
                .bind(
                    &ep.key,
                    Some(Binding {
                        ifindex: SYNTHETIC_IFINDEX_BASE + n,
                        zone: n,
                    }),
                )
                .map_err(|e| EngineError::Capacity(e.to_string()))?;
        }
        Ok(MapsEngine { lowering })
    }

    /// Wraps an existing lowering.
    pub fn from_lowering(lowering: Lowering) -> Self {
        MapsEngine { lowering }
    }

    /// The lowering.
    pub fn lowering(&self) -> &Lowering {
        &self.lowering
    }
}

/// The parser's view of a flow (what the kernel would have parsed).
pub fn parsed_of(flow: &Flow) -> Parsed {
    let (family, src, dst) = match (flow.src, flow.dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let mut a = [0u8; 16];
            let mut b = [0u8; 16];
            a[..4].copy_from_slice(&s.octets());
            b[..4].copy_from_slice(&d.octets());
            (AddressFamily::V4.code(), a, b)
        }
        (s, d) => {
            let v6 = |ip: std::net::IpAddr| match ip {
                std::net::IpAddr::V6(a) => a.octets(),
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            (AddressFamily::V6.code(), v6(s), v6(d))
        }
    };
    let (icmp_type, icmp_code) = flow.icmp.unwrap_or((0, 0));
    Parsed {
        family,
        protocol: flow.protocol.0,
        src,
        dst,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        icmp_type,
        icmp_code,
        tcp_flags: TCP_SYN,
        fragment: false,
        later_fragment: false,
        frag_id: 0,
        pad: 0,
    }
}

impl Engine for MapsEngine {
    fn name(&self) -> &'static str {
        "maps"
    }

    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError> {
        flow.validate().map_err(EngineError::InvalidFlow)?;
        let binding = self
            .lowering
            .binding(endpoint)
            .ok_or_else(|| EngineError::UnknownEndpoint(endpoint.clone()))?;
        let p = parsed_of(flow);
        let (dir, local, peer) = match direction {
            Direction::Egress => (HookDirection::Egress.code(), p.src, flow.dst),
            Direction::Ingress => (HookDirection::Ingress.code(), p.dst, flow.src),
        };
        let m = self.lowering.mirror();
        let key = SlotKey {
            ifindex: binding.ifindex,
            direction: dir,
            family: p.family,
            pad: [0; 2],
            addr: local,
        };
        let slot = m
            .slots
            .get(&key)
            .ok_or_else(|| EngineError::NotAnAddressOf {
                endpoint: endpoint.clone(),
                addr: match direction {
                    Direction::Egress => flow.src,
                    Direction::Ingress => flow.dst,
                },
            })?;
        let class = m.classify(&peer);
        let cap = self.lowering.capacity().nodes;
        let v = walk(
            slot.root,
            &features(&p, dir),
            // Array maps read unwritten entries as zeroes, and nothing past the end.
            |i| (i < cap).then(|| m.nodes.get(&i).copied().unwrap_or_default()),
            // The kernel's membership test over the mirrored words.
            |b| m.peer_bit(class.identity, class.class, b),
        )
        .map_err(|e| EngineError::Inconsistent(format!("walk failed: {e:?}")))?;
        let rule = self.lowering.rule(v.rule).ok_or_else(|| {
            EngineError::Inconsistent(format!("leaf names unknown rule index {}", v.rule))
        })?;
        Ok(Decision {
            verdict: if v.allow {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            decided_by: rule.decided_by(),
            logged: v.logged,
        })
    }
}
