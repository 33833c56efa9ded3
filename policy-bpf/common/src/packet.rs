//! The packet parser both sides run: Ethernet, IPv4/IPv6 with extension
//! headers, TCP/UDP/SCTP ports, ICMP, and the features a program reads.

use crate::codes::{AddressFamily, HookDirection};
use crate::program::PacketFeatures;

/// Byte access to a packet; the kernel program reads the skb, user space a
/// slice. The parser asks for values, not byte buffers: the kernel program
/// assembles them in registers straight from the packet, where a buffer
/// would cost a store and a slower, unforwardable reload per field.
pub trait PacketBytes {
    /// Fills `dst` from `offset`; false if the packet is too short.
    fn read(&self, offset: usize, dst: &mut [u8]) -> bool;

    /// The byte at `offset`.
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        let mut b = [0u8; 1];
        self.read(offset, &mut b).then_some(b[0])
    }

    /// The big-endian 16-bit value at `offset`.
    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        let mut b = [0u8; 2];
        self.read(offset, &mut b).then(|| u16::from_be_bytes(b))
    }

    /// The big-endian 32-bit value at `offset`.
    #[inline(always)]
    fn be32(&self, offset: usize) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b).then(|| u32::from_be_bytes(b))
    }

    /// Copies an address from `offset` into the start of `dst`: one 4-byte
    /// word (IPv4) when `words` is 1, else four (IPv6).
    #[inline(always)]
    fn addr(&self, offset: usize, dst: &mut [u8; 16], words: usize) -> bool {
        let n = if words == 1 { 4 } else { 16 };
        self.read(offset, &mut dst[..n])
    }
}

impl PacketBytes for &[u8] {
    fn read(&self, offset: usize, dst: &mut [u8]) -> bool {
        let Some(end) = offset.checked_add(dst.len()) else {
            return false;
        };
        match self.get(offset..end) {
            Some(s) => {
                dst.copy_from_slice(s);
                true
            }
            None => false,
        }
    }
}

/// What the parser found in a packet. Eight-byte aligned so clearing it is
/// six word stores in the kernel program rather than a byte-loop memset.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Datagram identification (fragments).
    pub frag_id: u32,
    /// Source port (0 without ports; ICMP echo: identifier).
    pub src_port: u16,
    /// Destination port (0 without ports; ICMP echo: identifier).
    pub dst_port: u16,
    /// An [`AddressFamily`](crate::AddressFamily) code.
    pub family: u8,
    /// IP protocol (IPv6: after extension headers).
    pub protocol: u8,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// Part of a fragmented datagram.
    pub fragment: bool,
    /// A fragment other than the first (no transport header).
    pub later_fragment: bool,
    /// Reserved.
    pub pad: u8,
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not IPv4 or IPv6 (ARP, ...): not subject to IP policy.
    NotIp,
    /// A header is cut short or inconsistent.
    Malformed,
}

/// TCP FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

/// Parses Ethernet, IPv4/IPv6 (with extension headers and fragments) and the
/// transport header into `out`, which must start all zero (fields the packet
/// does not carry stay zero; the kernel program clears it with word stores,
/// cheaper than the byte loop a field-by-field clear compiles to). Every
/// read is bounds-checked; anything short or inconsistent is
/// [`ParseError::Malformed`]. Reads are small so the kernel program's stack
/// stays within the BPF limit.
#[inline(always)]
pub fn parse_into<P: PacketBytes>(p: &P, out: &mut Parsed) -> Result<(), ParseError> {
    use ParseError::Malformed;
    let ethertype = p.be16(12).ok_or(Malformed)?;
    let mut l4: usize;
    match ethertype {
        0x0800 => {
            // version/IHL, TOS, total length, id, flags/fragment offset.
            let version_ihl = p.byte(14).ok_or(Malformed)?;
            // The fixed header must be there (the first 8 bytes, then the rest).
            let total = p.be16(16).ok_or(Malformed)? as usize;
            let id = p.be16(18).ok_or(Malformed)?;
            let frag = p.be16(20).ok_or(Malformed)?;
            if version_ihl >> 4 != 4 {
                return Err(Malformed);
            }
            let ihl = (version_ihl & 0x0f) as usize * 4;
            if ihl < 20 || total < ihl {
                return Err(Malformed);
            }
            out.frag_id = u32::from(id);
            let more = frag & 0x2000 != 0;
            let offset = frag & 0x1fff;
            out.fragment = more || offset != 0;
            out.later_fragment = offset != 0;
            let proto = p.byte(14 + 9).ok_or(Malformed)?;
            if !p.addr(14 + 12, &mut out.src, 1) || !p.addr(14 + 16, &mut out.dst, 1) {
                return Err(Malformed);
            }
            out.family = AddressFamily::V4.code();
            out.protocol = proto;
            // The whole header must be there.
            p.byte(14 + ihl - 1).ok_or(Malformed)?;
            l4 = 14 + ihl;
        }
        0x86DD => {
            let version = p.byte(14).ok_or(Malformed)?;
            let mut next = p.byte(20).ok_or(Malformed)?;
            // The first 8 bytes of the fixed header must be there.
            p.byte(21).ok_or(Malformed)?;
            if version >> 4 != 6 {
                return Err(Malformed);
            }
            if !p.addr(22, &mut out.src, 4) || !p.addr(38, &mut out.dst, 4) {
                return Err(Malformed);
            }
            out.family = AddressFamily::V6.code();
            l4 = 54;
            // Skip up to four extension headers; a fragment header is recorded.
            let mut i = 0;
            while i < 4 {
                match next {
                    0 | 43 | 60 => {
                        let h = p.be16(l4).ok_or(Malformed)?;
                        next = (h >> 8) as u8;
                        l4 += ((h & 0xff) as usize + 1) * 8;
                    }
                    51 => {
                        let h = p.be16(l4).ok_or(Malformed)?;
                        next = (h >> 8) as u8;
                        l4 += ((h & 0xff) as usize + 2) * 4;
                    }
                    44 => {
                        next = p.byte(l4).ok_or(Malformed)?;
                        let off = p.be16(l4 + 2).ok_or(Malformed)?;
                        out.frag_id = p.be32(l4 + 4).ok_or(Malformed)?;
                        out.fragment = true;
                        out.later_fragment = off >> 3 != 0;
                        l4 += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            if matches!(next, 0 | 43 | 60 | 51 | 44) {
                // Too many extension headers to look past.
                return Err(Malformed);
            }
            out.protocol = next;
        }
        _ => return Err(ParseError::NotIp),
    }
    if out.later_fragment {
        return Ok(());
    }
    let proto = out.protocol;
    if has_ports(proto) {
        // TCP 20, UDP/UDP-Lite 8, SCTP 12 bytes of header at least.
        let min = match proto {
            6 => 20,
            132 => 12,
            _ => 8,
        };
        let src_port = p.be16(l4).ok_or(Malformed)?;
        let dst_port = p.be16(l4 + 2).ok_or(Malformed)?;
        p.byte(l4 + 7).ok_or(Malformed)?;
        p.byte(l4 + min - 1).ok_or(Malformed)?;
        out.src_port = src_port;
        out.dst_port = dst_port;
        if proto == 6 {
            let h = p.be16(l4 + 12).ok_or(Malformed)?;
            if (h >> 12) < 5 {
                return Err(Malformed);
            }
            out.tcp_flags = h as u8;
        }
    } else if proto == 1 || proto == 58 {
        let h = p.be16(l4).ok_or(Malformed)?;
        let id = p.be16(l4 + 4).ok_or(Malformed)?;
        p.byte(l4 + 7).ok_or(Malformed)?;
        let (icmp_type, icmp_code) = ((h >> 8) as u8, h as u8);
        out.icmp_type = icmp_type;
        out.icmp_code = icmp_code;
        // Echo request/reply: the identifier plays the port's part for conntrack.
        let echo = if proto == 1 {
            icmp_type == 8 || icmp_type == 0
        } else {
            icmp_type == 128 || icmp_type == 129
        };
        if echo {
            out.src_port = id;
            out.dst_port = id;
        }
    }
    Ok(())
}

/// [`parse_into`] returning the result by value (user space).
pub fn parse<P: PacketBytes>(p: &P) -> Result<Parsed, ParseError> {
    let mut out = Parsed::default();
    parse_into(p, &mut out).map(|()| out)
}

/// Whether a parsed packet is an ICMP error, which quotes the packet it
/// is about: destination unreachable, time exceeded, parameter problem
/// (ICMPv6: and packet too big).
#[inline(always)]
pub fn is_icmp_error(p: &Parsed) -> bool {
    match p.protocol {
        1 => matches!(p.icmp_type, 3 | 11 | 12),
        58 => matches!(p.icmp_type, 1..=4),
        _ => false,
    }
}

/// The TCP, UDP or SCTP packet an ICMP error `outer` quotes, as `quote`
/// (addresses, protocol, ports; the error's family): the connection it is
/// RELATED to, as conntrack says. False for any other packet, and for an
/// error behind IPv4 options' or IPv6 extension headers' worth of outer
/// header it does not look past.
#[inline(always)]
pub fn parse_quote<P: PacketBytes>(p: &P, outer: &Parsed, quote: &mut Parsed) -> bool {
    if !is_icmp_error(outer) || outer.fragment {
        return false;
    }
    let v4 = outer.protocol == 1;
    let icmp = if v4 {
        let Some(version_ihl) = p.byte(14) else {
            return false;
        };
        14 + usize::from(version_ihl & 0x0f) * 4
    } else {
        if p.byte(20) != Some(58) {
            return false;
        }
        54
    };
    let inner = icmp + 8;
    let (protocol, ports, ok) = if v4 {
        let Some(version_ihl) = p.byte(inner) else {
            return false;
        };
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < 20 {
            return false;
        }
        let ok = p.addr(inner + 12, &mut quote.src, 1) && p.addr(inner + 16, &mut quote.dst, 1);
        (p.byte(inner + 9), inner + ihl, ok)
    } else {
        let ok = p.addr(inner + 8, &mut quote.src, 4) && p.addr(inner + 24, &mut quote.dst, 4);
        (p.byte(inner + 6), inner + 40, ok)
    };
    let Some(protocol) = protocol.filter(|p| matches!(p, 6 | 17 | 132)) else {
        return false;
    };
    let (Some(src_port), Some(dst_port)) = (p.be16(ports), p.be16(ports + 2)) else {
        return false;
    };
    quote.family = outer.family;
    quote.protocol = protocol;
    quote.src_port = src_port;
    quote.dst_port = dst_port;
    ok
}

/// ICMPv6 link-local control (MLD 130-132 and 143, NDP 133-137), which the
/// programs pass without policy as Calico does: without it IPv6 breaks on
/// the link.
#[inline(always)]
pub fn is_link_control(p: &Parsed) -> bool {
    p.protocol == 58
        && !p.later_fragment
        && ((130..=137).contains(&p.icmp_type) || p.icmp_type == 143)
}

/// Whether an ICMP type is an echo reply (allowed as the reply of a tracked echo).
pub fn is_echo_reply(protocol: u8, icmp_type: u8) -> bool {
    (protocol == 1 && icmp_type == 0) || (protocol == 58 && icmp_type == 129)
}

/// Policy features of a parsed packet for one direction.
#[inline(always)]
pub fn features(p: &Parsed, direction: u8) -> PacketFeatures {
    let ports = has_ports(p.protocol);
    let (local, peer) = if direction == HookDirection::Egress.code() {
        (p.src_port, p.dst_port)
    } else {
        (p.dst_port, p.src_port)
    };
    let icmp = p.protocol == 1 || p.protocol == 58;
    PacketFeatures {
        protocol: u32::from(p.protocol),
        local_port: if ports { u32::from(local) } else { 0 },
        peer_port: if ports { u32::from(peer) } else { 0 },
        icmp_type: if icmp { u32::from(p.icmp_type) } else { 0 },
        icmp_code: if icmp { u32::from(p.icmp_code) } else { 0 },
    }
}

#[cfg(test)]
mod quote_tests {
    extern crate std;

    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// An IPv4 ICMP error (`kind`) from 10.0.9.1 to 10.0.1.9 quoting a
    /// UDP datagram 10.0.1.9:40000 → 10.0.2.5:5353.
    fn error_v4(kind: u8, inner_protocol: u8) -> Vec<u8> {
        let mut p = vec![0u8; 14];
        p[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 9, 1, 10, 0, 1, 9,
        ];
        p.append(&mut ip);
        p.extend_from_slice(&[kind, 3, 0, 0, 0, 0, 0, 0]);
        let mut inner = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, inner_protocol, 0, 0];
        inner.extend_from_slice(&[10, 0, 1, 9, 10, 0, 2, 5]);
        p.append(&mut inner);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&5353u16.to_be_bytes());
        p.extend_from_slice(&[0, 8, 0, 0]);
        p
    }

    #[test]
    fn an_icmp_error_quotes_the_connection_it_is_about() {
        let bytes = error_v4(3, 17);
        let outer = parse(&bytes.as_slice()).unwrap();
        assert!(is_icmp_error(&outer));
        let mut quote = Parsed::default();
        assert!(parse_quote(&bytes.as_slice(), &outer, &mut quote));
        assert_eq!(
            (quote.protocol, quote.src_port, quote.dst_port),
            (17, 40000, 5353)
        );
        assert_eq!(
            (&quote.src[..4], &quote.dst[..4]),
            (&[10, 0, 1, 9][..], &[10, 0, 2, 5][..])
        );
        assert_eq!(quote.family, outer.family);

        // An echo request is no error; a quoted ICMP packet is no connection
        // with ports; a cut quote is nothing.
        let echo = error_v4(8, 17);
        assert!(!parse_quote(
            &echo.as_slice(),
            &parse(&echo.as_slice()).unwrap(),
            &mut quote
        ));
        let icmp = error_v4(3, 1);
        assert!(!parse_quote(
            &icmp.as_slice(),
            &parse(&icmp.as_slice()).unwrap(),
            &mut quote
        ));
        let cut = &bytes[..bytes.len() - 6];
        assert!(!parse_quote(&cut, &parse(&cut).unwrap(), &mut quote));
    }
}
