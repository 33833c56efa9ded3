//! Network vocabulary shared by the model and the engines: IP protocols,
//! port matches and CIDRs.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// An IP protocol number (the IPv4 protocol / IPv6 next-header field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Protocol(pub u8);

impl Protocol {
    /// ICMP for IPv4.
    pub const ICMP: Protocol = Protocol(1);
    /// TCP.
    pub const TCP: Protocol = Protocol(6);
    /// UDP.
    pub const UDP: Protocol = Protocol(17);
    /// ICMP for IPv6.
    pub const ICMPV6: Protocol = Protocol(58);
    /// SCTP.
    pub const SCTP: Protocol = Protocol(132);
    /// UDP-Lite.
    pub const UDPLITE: Protocol = Protocol(136);

    /// Parses a protocol name (`TCP`, `UDP`, `ICMP`, `ICMPv6`, `SCTP`, `UDPLite`,
    /// any case) or a number 1-255.
    pub fn parse(s: &str) -> Result<Protocol, NetValueError> {
        let named = match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::TCP),
            "udp" => Some(Protocol::UDP),
            "icmp" => Some(Protocol::ICMP),
            "icmpv6" => Some(Protocol::ICMPV6),
            "sctp" => Some(Protocol::SCTP),
            "udplite" => Some(Protocol::UDPLITE),
            _ => None,
        };
        if let Some(p) = named {
            return Ok(p);
        }
        match s.parse::<u16>() {
            Ok(n) => Protocol::from_number(i64::from(n)),
            Err(_) => Err(NetValueError::UnknownProtocol(s.to_string())),
        }
    }

    /// A protocol number 1-255.
    pub fn from_number(n: i64) -> Result<Protocol, NetValueError> {
        if (1..=255).contains(&n) {
            Ok(Protocol(n as u8))
        } else {
            Err(NetValueError::ProtocolOutOfRange(n))
        }
    }

    /// Protocols whose headers carry ports that rules can match.
    pub fn has_ports(self) -> bool {
        matches!(
            self,
            Protocol::TCP | Protocol::UDP | Protocol::SCTP | Protocol::UDPLITE
        )
    }

    /// ICMP or ICMPv6.
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::ICMP | Protocol::ICMPV6)
    }

    /// The conventional name, if it has one.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
            Protocol::ICMP => "ICMP",
            Protocol::ICMPV6 => "ICMPv6",
            Protocol::SCTP => "SCTP",
            Protocol::UDPLITE => "UDPLite",
            _ => return None,
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "{}", self.0),
        }
    }
}

/// IP version of an address or rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpVersion {
    /// IPv4
    V4,
    /// IPv6
    V6,
}

impl IpVersion {
    /// The version of an address.
    pub fn of(addr: &IpAddr) -> IpVersion {
        match addr {
            IpAddr::V4(_) => IpVersion::V4,
            IpAddr::V6(_) => IpVersion::V6,
        }
    }
    /// The version of a network.
    pub fn of_net(net: &IpNet) -> IpVersion {
        match net {
            IpNet::V4(_) => IpVersion::V4,
            IpNet::V6(_) => IpVersion::V6,
        }
    }
}

impl fmt::Display for IpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpVersion::V4 => "IPv4",
            IpVersion::V6 => "IPv6",
        })
    }
}

/// One entry of a rule's `ports`/`notPorts`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// An inclusive numeric range (a single port has `first == last`).
    Range {
        /// First port of the range.
        first: u16,
        /// Last port of the range (inclusive).
        last: u16,
    },
    /// A named port, resolved against the declared ports of the endpoint that
    /// owns the address on that side of the connection.
    Named(String),
}

/// A port number, 1 to 65535.
pub fn port_number(n: i64) -> Result<u16, NetValueError> {
    match u16::try_from(n) {
        Ok(port) if port >= 1 => Ok(port),
        _ => Err(NetValueError::PortOutOfRange { port: n, min: 1 }),
    }
}

impl PortMatch {
    /// Parses `80`, `"80"`, `"1000:2000"` or a port name.
    pub fn parse(s: &str) -> Result<PortMatch, NetValueError> {
        if let Some((a, b)) = s.split_once(':') {
            let first = parse_port_number(a, true)?;
            let last = parse_port_number(b, false)?;
            if first > last {
                return Err(NetValueError::ReversedPortRange(s.to_string()));
            }
            return Ok(PortMatch::Range { first, last });
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let p = parse_port_number(s, false)?;
            return Ok(PortMatch::Range { first: p, last: p });
        }
        validate_port_name(s)?;
        Ok(PortMatch::Named(s.to_string()))
    }

    /// A numeric port 1-65535.
    pub fn number(n: i64) -> Result<PortMatch, NetValueError> {
        let port = port_number(n)?;
        Ok(PortMatch::Range {
            first: port,
            last: port,
        })
    }

    /// Whether this is a numeric port or range.
    pub fn is_numeric(&self) -> bool {
        matches!(self, PortMatch::Range { .. })
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortMatch::Range { first, last } if first == last => write!(f, "{first}"),
            PortMatch::Range { first, last } => write!(f, "{first}:{last}"),
            PortMatch::Named(n) => f.write_str(n),
        }
    }
}

/// Ports are 1-65535; a range may start at 0, as Calico's datapath accepts
/// (`0:80` appears in its own policy-program tests).
fn parse_port_number(s: &str, range_start: bool) -> Result<u16, NetValueError> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| NetValueError::NotAPortNumber(s.to_string()))?;
    let min = if range_start { 0 } else { 1 };
    if n < min || n > 65535 {
        return Err(NetValueError::PortOutOfRange {
            port: i64::from(n),
            min,
        });
    }
    Ok(n as u16)
}

/// Kubernetes' IANA_SVC_NAME rule for port names: 1-15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or doubled `-`.
pub fn validate_port_name(s: &str) -> Result<(), NetValueError> {
    let why = if s.is_empty() {
        Some("it is empty")
    } else if s.len() > 15 {
        Some("it is longer than 15 characters")
    } else if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it may only contain lower-case letters, digits and '-'")
    } else if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        Some("it must contain at least one letter")
    } else if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        Some("it may not start or end with '-' or contain '--'")
    } else {
        None
    };
    match why {
        Some(reason) => Err(NetValueError::BadPortName {
            name: s.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses a CIDR, or a bare address (as a /32 or /128), the way Calico's
/// `ParseCIDROrIP` does. Host bits are cleared.
pub fn parse_cidr_or_ip(s: &str) -> Result<IpNet, NetValueError> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(NetValueError::NotCidrOrIp(s.to_string()))
}

/// Parses a strict CIDR (prefix length required), as Kubernetes ipBlock wants.
pub fn parse_cidr(s: &str) -> Result<IpNet, NetValueError> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| NetValueError::NotCidr(s.to_string()))
}

/// A value that is not a protocol, a port, a port name or a CIDR; the
/// message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetValueError {
    /// Neither a protocol name nor a number.
    #[error(
        "unknown protocol {0:?}: expected TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number 1-255"
    )]
    UnknownProtocol(String),
    /// A protocol number outside 1-255.
    #[error("protocol number {0} is out of range 1-255")]
    ProtocolOutOfRange(i64),
    /// A port range whose first port is above its last.
    #[error("port range {0:?} is reversed: its first port is greater than its last")]
    ReversedPortRange(String),
    /// Not a number where a port number belongs.
    #[error("{0:?} is not a port number")]
    NotAPortNumber(String),
    /// A port outside `min`-65535.
    #[error("port {port} is out of range {min}-65535")]
    PortOutOfRange {
        /// The port given.
        port: i64,
        /// The smallest port allowed there (0 only as a range's start).
        min: u32,
    },
    /// A port name Kubernetes would refuse.
    #[error("{name:?} is not a valid port name: {reason}")]
    BadPortName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// Neither a CIDR nor an address.
    #[error("{0:?} is not a valid CIDR or IP address")]
    NotCidrOrIp(String),
    /// Not a CIDR with a prefix length.
    #[error("{0:?} is not a valid CIDR (expected address/prefix-length)")]
    NotCidr(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            PortMatch::parse("80").unwrap(),
            PortMatch::Range {
                first: 80,
                last: 80
            }
        );
        assert_eq!(
            PortMatch::parse("0:80").unwrap(),
            PortMatch::Range { first: 0, last: 80 }
        );
        assert!(PortMatch::parse("0").is_err());
        assert!(PortMatch::parse("65536").is_err());
        assert!(PortMatch::parse("90:80").is_err());
        assert!(PortMatch::parse("http").is_ok());
        assert!(PortMatch::parse("Http").is_err());
        assert!(PortMatch::parse("-http").is_err());
        assert!(PortMatch::number(0).is_err());
        assert!(PortMatch::number(65536).is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(Protocol::parse("tcp").unwrap(), Protocol::TCP);
        assert_eq!(Protocol::parse("ICMPv6").unwrap(), Protocol::ICMPV6);
        assert_eq!(Protocol::parse("253").unwrap(), Protocol(253));
        assert!(Protocol::parse("0").is_err());
        assert!(Protocol::parse("256").is_err());
        assert!(Protocol::parse("tcpx").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr_or_ip("192.168.242.213/24").unwrap().to_string(),
            "192.168.242.0/24"
        );
        assert_eq!(
            parse_cidr_or_ip("10.0.0.1").unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert!(parse_cidr_or_ip("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.1").is_err());
    }
}
