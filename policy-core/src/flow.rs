//! The question every engine answers: a flow, and who decided its fate.

use std::fmt;
use std::net::IpAddr;

use crate::model::{Action, PolicyId};
use crate::net::{IpVersion, Protocol};

/// The first packet of a connection as policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol.
    pub protocol: Protocol,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
    /// ICMP type and code, for ICMP/ICMPv6.
    pub icmp: Option<(u8, u8)>,
}

impl Flow {
    /// A TCP/UDP/SCTP flow.
    pub fn ports(
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        src_port: u16,
        dst_port: u16,
    ) -> Flow {
        Flow {
            src,
            dst,
            protocol,
            src_port,
            dst_port,
            icmp: None,
        }
    }

    /// IP version of the flow (that of its source address).
    pub fn ip_version(&self) -> IpVersion {
        IpVersion::of(&self.src)
    }

    /// Checks the flow is well-formed: one address family, ports only on
    /// protocols that have them, ICMP type/code only on ICMP.
    pub fn validate(&self) -> Result<(), FlowError> {
        if IpVersion::of(&self.src) != IpVersion::of(&self.dst) {
            return Err(FlowError::MixedVersions {
                src: self.src,
                dst: self.dst,
            });
        }
        if !self.protocol.has_ports() && (self.src_port != 0 || self.dst_port != 0) {
            return Err(FlowError::PortsWithoutPorts(self.protocol));
        }
        if self.icmp.is_some() && !self.protocol.is_icmp() && self.protocol != Protocol(1) {
            return Err(FlowError::IcmpWithoutIcmp(self.protocol));
        }
        Ok(())
    }
}

/// Why a flow is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// Source and destination of different IP versions.
    #[error("source {src} and destination {dst} are of different IP versions")]
    MixedVersions {
        /// Source address.
        src: IpAddr,
        /// Destination address.
        dst: IpAddr,
    },
    /// Ports on a protocol that has none.
    #[error("protocol {0} has no ports")]
    PortsWithoutPorts(Protocol),
    /// ICMP type/code on a protocol that is not ICMP.
    #[error("ICMP type/code given for protocol {0}")]
    IcmpWithoutIcmp(Protocol),
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = |ip: &IpAddr, port: u16| match (ip, self.protocol.has_ports()) {
            (IpAddr::V6(a), true) => format!("[{a}]:{port}"),
            (a, true) => format!("{a}:{port}"),
            (a, false) => a.to_string(),
        };
        write!(
            f,
            "{} {} -> {}",
            self.protocol,
            addr(&self.src, self.src_port),
            addr(&self.dst, self.dst_port)
        )?;
        if let Some((t, c)) = self.icmp {
            write!(f, " type {t} code {c}")?;
        }
        Ok(())
    }
}

/// Allowed or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The packet may pass.
    Allow,
    /// The packet is dropped.
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// What produced a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DecidedBy {
    /// An Allow or Deny rule of a policy.
    Rule {
        /// Tier of the policy.
        tier: String,
        /// The policy.
        policy: PolicyId,
        /// Index of the rule in the policy's rules for the direction.
        rule: usize,
        /// The rule's action (Allow or Deny).
        action: Action,
    },
    /// The end of a tier whose policies did not decide (default action Deny).
    TierDefault {
        /// The tier.
        tier: String,
    },
    /// A rule of a profile (Pass in a profile counts as deny).
    Profile {
        /// Profile name.
        profile: String,
        /// Rule index.
        rule: usize,
        /// The rule's action.
        action: Action,
    },
    /// No tier decided and no profile rule allowed the packet.
    NoProfileMatch,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecidedBy::Rule {
                tier,
                policy,
                rule,
                action,
            } => write!(f, "tier {tier}, {policy}, rule {rule} ({action})"),
            DecidedBy::TierDefault { tier } => write!(f, "tier {tier}, end of tier (deny)"),
            DecidedBy::Profile {
                profile,
                rule,
                action,
            } => write!(f, "profile {profile}, rule {rule} ({action})"),
            DecidedBy::NoProfileMatch => f.write_str("no profile allowed it (deny)"),
        }
    }
}

/// A verdict with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Who decided.
    pub decided_by: DecidedBy,
    /// Whether a Log rule matched before the decision.
    pub logged: bool,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} by {}", self.verdict, self.decided_by)?;
        if self.logged {
            f.write_str(" [logged]")?;
        }
        Ok(())
    }
}
