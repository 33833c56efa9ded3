//! Crafted packets for `BPF_PROG_TEST_RUN`: Ethernet, IPv4/IPv6, and a TCP,
//! UDP, SCTP or ICMP header (or none, for port-less protocols). Checksums are
//! not computed: policy never reads them.

use std::net::IpAddr;

use policy_core::flow::Flow;

/// TCP flags for crafted segments.
pub const SYN: u8 = 0x02;
/// ACK.
pub const ACK: u8 = 0x10;
/// FIN.
pub const FIN: u8 = 0x01;
/// RST.
pub const RST: u8 = 0x04;

/// The first packet of `flow` (a SYN for TCP, an echo request for ICMP echo).
pub fn build(flow: &Flow) -> Vec<u8> {
    build_with(flow, SYN, 0)
}

/// A packet of `flow` with the given TCP flags and padding payload.
pub fn build_with(flow: &Flow, tcp_flags: u8, payload: usize) -> Vec<u8> {
    let proto = flow.protocol.0;
    let l4: Vec<u8> = match proto {
        6 => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&flow.src_port.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dst_port.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        17 | 136 => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&flow.src_port.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dst_port.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
            h
        }
        132 => {
            let mut h = vec![0u8; 12];
            h[0..2].copy_from_slice(&flow.src_port.to_be_bytes());
            h[2..4].copy_from_slice(&flow.dst_port.to_be_bytes());
            h
        }
        1 | 58 => {
            let (t, c) = flow.icmp.unwrap_or((8, 0));
            let mut h = vec![0u8; 8];
            h[0] = t;
            h[1] = c;
            h[4..6].copy_from_slice(&0x5a5au16.to_be_bytes());
            h
        }
        _ => Vec::new(),
    };
    let mut body = l4;
    body.resize(body.len() + payload, 0xab);
    ip_packet(flow.src, flow.dst, proto, &body)
}

/// Wraps a transport payload in Ethernet and IP headers.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            p.extend_from_slice(&ip);
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            p.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&v6(s));
            ip[24..40].copy_from_slice(&v6(d));
            p.extend_from_slice(&ip);
        }
    }
    p.extend_from_slice(body);
    p
}

/// The reply of a flow: addresses and ports swapped; ICMP echo becomes a reply.
pub fn reply(flow: &Flow) -> Flow {
    let icmp = flow.icmp.map(|(t, c)| match (flow.protocol.0, t) {
        (1, 8) => (0, c),
        (58, 128) => (129, c),
        other => (other.1, c),
    });
    Flow {
        src: flow.dst,
        dst: flow.src,
        protocol: flow.protocol,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        icmp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_bpf_common::parse;
    use policy_core::net::Protocol;

    #[test]
    fn crafted_packets_parse_back() {
        for (proto, src, dst) in [
            (Protocol::TCP, "10.0.0.1", "10.0.0.2"),
            (Protocol::UDP, "fd00::1", "fd00::2"),
            (Protocol::SCTP, "10.0.0.1", "10.0.0.2"),
            (Protocol(253), "fd00::1", "fd00::2"),
        ] {
            let f = Flow {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                protocol: proto,
                src_port: if proto.has_ports() { 1234 } else { 0 },
                dst_port: if proto.has_ports() { 80 } else { 0 },
                icmp: None,
            };
            let pkt = build(&f);
            let p = parse(&&pkt[..]).unwrap();
            assert_eq!(p.protocol, proto.0);
            assert_eq!((p.src_port, p.dst_port), (f.src_port, f.dst_port));
        }
    }
}
