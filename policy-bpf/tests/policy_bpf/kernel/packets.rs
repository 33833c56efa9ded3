//! Packets the programs must refuse or handle specially: malformed headers,
//! fragments, protocols without ports.

use super::*;

#[test]
fn bad_packets_are_dropped_with_a_reason() {
    if !privileged() {
        return;
    }
    let mut l = example_loaded();
    // web -> api:8080 is allowed: the well-formed packet passes.
    let good = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
    assert!(l.run(Hook::ToPod, &good).0, "well-formed SYN to api:8080");

    let malformed = |l: &mut Loaded, name: &str, pkt: Vec<u8>| {
        let before = stat(l, Statistic::Malformed);
        let (passed, ev) = l.run(Hook::ToPod, &pkt);
        assert!(!passed, "{name}: passed");
        assert_eq!(
            ev.map(|e| e.reason),
            Some(EventReason::Malformed.code()),
            "{name}: event"
        );
        assert_eq!(
            stat(l, Statistic::Malformed),
            before + 1,
            "{name}: statistic"
        );
    };
    // The kernel refuses test runs of frames without a whole network
    // header, so truncation is tested past it.
    let mut wrong_version = good.clone();
    wrong_version[14] = 0x55;
    malformed(&mut l, "IPv4 frame with version 5", wrong_version);
    let mut short_total = good.clone();
    short_total[14 + 2..14 + 4].copy_from_slice(&10u16.to_be_bytes());
    malformed(&mut l, "total length below the header", short_total);
    // IHL below the minimum of 5 words.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    malformed(&mut l, "IHL 4", bad_ihl);
    // IHL pointing past the end of the packet.
    let mut long_ihl = good.clone();
    long_ihl[14] = 0x4f;
    long_ihl.truncate(14 + 20 + 8);
    malformed(&mut l, "IHL 15 in a short packet", long_ihl);
    // Transport headers cut short.
    malformed(&mut l, "truncated TCP", good[..14 + 20 + 10].to_vec());
    let udp = v4(
        "10.10.1.10",
        "10.10.2.10",
        17,
        &[0x9c, 0x40, 0x1f, 0x90, 0, 8],
    );
    malformed(&mut l, "truncated UDP", udp);
    let v6 = packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 6, &tcp_syn(1, 2));
    malformed(
        &mut l,
        "truncated TCP over IPv6",
        v6[..14 + 40 + 12].to_vec(),
    );
    let mut v6_version = v6.clone();
    v6_version[14] = 0x40;
    malformed(&mut l, "IPv6 frame with version 4", v6_version);
    // More extension headers than the program looks past.
    let mut chain = Vec::new();
    for _ in 0..5 {
        chain.extend_from_slice(&[0u8, 0, 0, 0, 0, 0, 0, 0]);
    }
    malformed(
        &mut l,
        "five hop-by-hop headers",
        packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 0, &chain),
    );
    // A hop-by-hop extension header that runs off the end.
    let mut hbh = vec![6u8, 8];
    hbh.extend_from_slice(&[0; 6]);
    let mut ext = packet::ip_packet(ip("fd00::1"), ip("fd00::2"), 0, &hbh);
    ext.truncate(ext.len() - 4);
    malformed(&mut l, "truncated extension header", ext);

    // Not IP at all (ARP): not policy's business, passed and counted.
    let mut arp = good[..14].to_vec();
    // ARP over Ethernet: a 28-byte body.
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    arp.extend_from_slice(&[0; 28]);
    let before = stat(&l, Statistic::NonIp);
    assert!(l.run(Hook::ToPod, &arp).0);
    assert_eq!(stat(&l, Statistic::NonIp), before + 1);

    // A source address that is not the pod's leaving its veth.
    let spoofed = v4("10.99.0.1", "10.10.2.10", 6, &tcp_syn(40000, 8080));
    let (passed, ev) = l.run(Hook::FromPod, &spoofed);
    assert!(!passed);
    assert_eq!(ev.map(|e| e.reason), Some(EventReason::Spoofed.code()));
}

/// IPv4 fragments of one datagram: `offset` in 8-byte units.
fn fragment(src: &str, dst: &str, id: u16, offset: u16, more: bool, l4: &[u8]) -> Vec<u8> {
    let mut p = v4(src, dst, 6, l4);
    p[14 + 4..14 + 6].copy_from_slice(&id.to_be_bytes());
    let flags = if more { 0x2000 } else { 0 } | offset;
    p[14 + 6..14 + 8].copy_from_slice(&flags.to_be_bytes());
    p
}

#[test]
fn fragments_follow_their_first_fragment() {
    if !privileged() {
        return;
    }
    let mut l = example_loaded();
    // Allowed datagram (web -> api:8080): the first fragment carries the
    // ports and is decided; later fragments of it pass.
    let first = fragment(
        "10.10.1.10",
        "10.10.2.10",
        77,
        0,
        true,
        &tcp_syn(40000, 8080),
    );
    assert!(l.run(Hook::ToPod, &first).0);
    let later = fragment("10.10.1.10", "10.10.2.10", 77, 3, false, &[0; 16]);
    assert!(
        l.run(Hook::ToPod, &later).0,
        "later fragment of an allowed datagram"
    );
    // Denied datagram (analytics -> api:8080): its later fragments are dropped too.
    let first = fragment(
        "10.10.3.10",
        "10.10.2.10",
        78,
        0,
        true,
        &tcp_syn(40000, 8080),
    );
    let (passed, ev) = l.run(Hook::ToPod, &first);
    assert!(!passed);
    assert_eq!(ev.map(|e| e.reason), Some(EventReason::Policy.code()));
    let later = fragment("10.10.3.10", "10.10.2.10", 78, 3, false, &[0; 16]);
    let (passed, ev) = l.run(Hook::ToPod, &later);
    assert!(!passed, "later fragment of a denied datagram");
    assert_eq!(ev.map(|e| e.reason), Some(EventReason::Fragment.code()));
    // A later fragment whose first fragment was never seen: no ports to
    // decide on, so it is dropped.
    let orphan = fragment("10.10.1.10", "10.10.2.10", 999, 5, false, &[0; 16]);
    let (passed, ev) = l.run(Hook::ToPod, &orphan);
    assert!(!passed);
    assert_eq!(ev.map(|e| e.reason), Some(EventReason::Fragment.code()));
    // A first fragment too short to hold the TCP ports is malformed.
    let tiny = fragment("10.10.1.10", "10.10.2.10", 79, 0, true, &[0x9c, 0x40, 0x1f]);
    let (passed, ev) = l.run(Hook::ToPod, &tiny);
    assert!(!passed);
    assert_eq!(ev.map(|e| e.reason), Some(EventReason::Malformed.code()));
}

#[test]
fn unknown_protocols_are_decided_by_policy() {
    if !privileged() {
        return;
    }
    let mut l = example_loaded();
    // The example allows only TCP 8080 into api: protocol 99 from web is
    // denied by the default-deny tier end, protocol 99 is carried
    // without ports and decided like any other.
    for proto in [99u8, 47, 253] {
        let p = v4("10.10.1.10", "10.10.2.10", proto, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let (passed, ev) = l.run(Hook::ToPod, &p);
        let ev = ev.expect("a verdict event");
        assert!(!passed, "protocol {proto}");
        assert_eq!(ev.reason, EventReason::Policy.code());
        assert_eq!(ev.protocol, proto);
        let flow = Flow {
            src: ip("10.10.1.10"),
            dst: ip("10.10.2.10"),
            protocol: Protocol(proto),
            src_port: 0,
            dst_port: 0,
            icmp: None,
        };
        let want = l
            .compiler
            .decide(&key("shop-backend/api"), Direction::Ingress, &flow)
            .unwrap();
        assert_eq!(want.verdict, Verdict::Deny);
        assert_eq!(
            l.lowering.rule(ev.rule).unwrap().decided_by(),
            want.decided_by
        );
    }
}
