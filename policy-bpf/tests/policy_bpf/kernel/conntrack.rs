//! The conntrack table in the kernel: its clock, the sweep, concurrent
//! packets and sweeps, a full table, the log of new connections, old pins.

use super::*;
use policy_bpf_common::map_names;

#[test]
fn the_conntrack_clock_is_the_kernels_jiffies_at_a_measured_rate() {
    if !privileged() {
        return;
    }
    let l = example_loaded();
    let hz = l.dp.ticks_per_s().unwrap();
    assert!((24..=10_000).contains(&hz), "implausible tick rate {hz}");
    let (j0, t0) = l.dp.kernel_clock().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (j1, t1) = l.dp.kernel_clock().unwrap();
    let (ticks, ns) = (j1 - j0, t1 - t0);
    assert!(ns >= 150_000_000, "coarse clock advanced {ns} ns in 200 ms");
    // Both clocks move in the same tick updates: the rate holds to
    // within a tick or two at each end.
    let expected = ns as f64 * f64::from(hz) / 1e9;
    assert!(
        (ticks as f64 - expected).abs() <= 2.0,
        "{ticks} ticks in {ns} ns at {hz} Hz (expected {expected:.1})"
    );
    // The programs read their configuration's rate.
    assert_eq!(l.dp.config().unwrap().ticks_per_s, hz);
}

#[test]
fn the_sweep_expires_idle_connections_only() {
    if !privileged() {
        return;
    }
    let mut l = example_loaded();
    l.dp.set_config(Config {
        other_s: 1,
        ..Config::default()
    })
    .unwrap();
    l.dp.flush_conntrack();
    // An allowed TCP connection (long timeout) and an allowed DNS query
    // (UDP, one second).
    let tcp = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
    assert!(l.run(Hook::ToPod, &tcp).0, "web -> api:8080");
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&40001u16.to_be_bytes());
    udp[2..4].copy_from_slice(&53u16.to_be_bytes());
    udp[5] = 8;
    let dns = v4("10.10.1.10", "10.10.0.53", 17, &udp);
    assert!(l.run(Hook::FromPod, &dns).0, "web -> DNS");
    assert_eq!(l.dp.conntrack_len(), 2);
    assert_eq!(l.dp.expire_conntrack().unwrap(), 0, "nothing is idle yet");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        l.dp.expire_conntrack().unwrap(),
        1,
        "the idle UDP flow goes"
    );
    assert_eq!(l.dp.conntrack_len(), 1, "the TCP connection stays");
}

/// Two CPUs run both sides of the same connections into a small table
/// while a third sweeps and flushes it: ways are claimed, joined,
/// reused and freed concurrently. Whatever interleaving happens, a
/// denied flow never passes, an allowed one always does, and every
/// entry left is a whole one.
#[test]
fn concurrent_packets_and_sweeps_keep_verdicts_exact() {
    if !privileged() {
        return;
    }
    let cap = Capacity {
        conntrack: 16,
        ..Capacity::default()
    };
    let mut l = Loaded::new(&example(), cap).unwrap();
    l.dp.set_config(Config {
        other_s: 0,
        ..Config::default()
    })
    .unwrap();
    let dp = &l.dp;
    let done = std::sync::atomic::AtomicBool::new(false);
    // Sweeps so far: runners go on past their 1,000 rounds until the
    // sweeper has run alongside (on a loaded machine it may start late).
    let swept = std::sync::atomic::AtomicU32::new(0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        let runners: Vec<_> = (0..2)
            .map(|t| {
                let (done, swept) = (&done, &swept);
                s.spawn(move || {
                    // Stops the sweeper however this runner ends.
                    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    let _done = Done(done);
                    pin_to_cpu(t % cpus);
                    for i in 0..200_000u32 {
                        if i >= 1000 && swept.load(std::sync::atomic::Ordering::Relaxed) > 32 {
                            break;
                        }
                        let sport = 40000 + ((i * 7 + t as u32) % 96) as u16;
                        let allowed = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
                        let reply = v4("10.10.2.10", "10.10.1.10", 6, &{
                            let mut h = tcp_syn(8080, sport);
                            h[13] = 0x12; // SYN-ACK
                            h
                        });
                        let denied = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 9999));
                        let mut udp = vec![0u8; 8];
                        udp[0..2].copy_from_slice(&sport.to_be_bytes());
                        udp[2..4].copy_from_slice(&53u16.to_be_bytes());
                        udp[5] = 8;
                        let dns = v4("10.10.1.10", "10.10.0.53", 17, &udp);
                        let run = |hook, pkt: &[u8]| dp.run(hook, pkt, 1).unwrap().passed();
                        assert!(run(Hook::FromPod, &allowed), "web egress to api:8080");
                        assert!(run(Hook::ToPod, &allowed), "api ingress from web");
                        // Passes on the entry, or meets api's egress
                        // policy (which denies it) when the sweeper
                        // flushed in between: either is right here.
                        run(Hook::FromPod, &reply);
                        assert!(run(Hook::FromPod, &dns), "web -> DNS");
                        assert!(!run(Hook::ToPod, &denied), "web -> api:9999 stays denied");
                    }
                })
            })
            .collect();
        let sweeper = s.spawn(|| {
            let (mut sweeps, mut freed) = (0u32, 0usize);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                freed += dp.expire_conntrack().unwrap();
                sweeps += 1;
                swept.store(sweeps, std::sync::atomic::Ordering::Relaxed);
                if sweeps % 16 == 0 {
                    freed += dp.flush_conntrack();
                }
            }
            (sweeps, freed)
        });
        for r in runners {
            r.join().unwrap();
        }
        let (sweeps, freed) = sweeper.join().unwrap();
        let stats = dp.stats().unwrap();
        eprintln!(
            "{sweeps} sweeps and flushes freed {freed}; established {}, full {}, contended {}",
            stats[Statistic::Established as usize],
            stats[Statistic::CtFull as usize],
            stats[Statistic::CtContended as usize]
        );
        assert!(sweeps > 10 && freed > 0, "the sweeper ran alongside");
        assert!(stats[Statistic::Established as usize] > 0);
    });
    let (entries, v6) = dp.conntrack_entries();
    assert!(v6.is_empty());
    for e in &entries {
        let v = e.value;
        assert!(matches!(e.key.protocol, 6 | 17), "{e:?}");
        let (client, server) = if e.key.port_a >= 40000 {
            (e.key.port_a, e.key.port_b)
        } else {
            (e.key.port_b, e.key.port_a)
        };
        assert!((40000..40096).contains(&client), "{e:?}");
        assert!([8080, 53].contains(&server), "{e:?}");
        assert_ne!(v.flags & (CT_APPROVED_A | CT_APPROVED_B), 0, "{e:?}");
        assert!(v.created <= v.last_seen, "{e:?}");
    }
}

#[test]
fn a_full_conntrack_table_is_counted_and_policy_still_decides() {
    if !privileged() {
        return;
    }
    let cap = Capacity {
        conntrack: 4,
        ..Capacity::default()
    };
    let mut l = Loaded::new(&example(), cap).unwrap();
    // Two sets of four ways: both are every connection's choices.
    assert_eq!(policy_bpf::conntrack::ways_for(4).unwrap(), 8);
    let crowded: Vec<u16> = (40000..40016).collect();
    for &sport in &crowded[..12] {
        let syn = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
        assert!(l.run(Hook::ToPod, &syn).0, "allowed flow {sport} passes");
    }
    assert_eq!(l.dp.conntrack_len(), 8);
    assert_eq!(
        stat(&l, Statistic::CtFull),
        4,
        "four flows found the table full"
    );
    // Once those connections have expired, new ones take their ways
    // without waiting for the sweep.
    l.dp.set_config(Config {
        tcp_established_s: 0,
        ..Config::default()
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(25));
    let later = &crowded[12..16];
    for &sport in later {
        let syn = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
        assert!(l.run(Hook::ToPod, &syn).0, "allowed flow {sport} passes");
    }
    assert_eq!(stat(&l, Statistic::CtFull), 4, "expired ways were reused");
    assert_eq!(l.dp.conntrack_len(), 8);
    let (v4_entries, _) = l.dp.conntrack_entries();
    let reused = v4_entries
        .iter()
        .filter(|e| later.contains(&e.key.port_a))
        .count();
    assert_eq!(reused, 4, "the new connections are in the table");
    // Denied flows are still denied.
    let denied = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40100, 9999));
    assert!(!l.run(Hook::ToPod, &denied).0, "web -> api:9999 is denied");
}

/// New connections go to the log while its next entries are free;
/// once every log entry holds a live connection they go to their
/// way's home, counted, and are tracked all the same; entries freed by
/// the sweep serve the log again.
#[test]
fn new_connections_fill_the_log_then_their_homes() {
    if !privileged() {
        return;
    }
    // 128 ways and a log of 32 entries, taken as one run.
    let cap = Capacity {
        conntrack: 64,
        ..Capacity::default()
    };
    assert_eq!(policy_bpf::conntrack::ways_for(64).unwrap(), 128);
    let mut l = Loaded::new(&example(), cap).unwrap();
    // The log runs are per CPU: one CPU takes them in order.
    pin_to_cpu(0);
    let syn = |sport: u16| v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(sport, 8080));
    let ack = |sport: u16| {
        let mut h = tcp_syn(sport, 8080);
        h[13] = 0x10;
        v4("10.10.1.10", "10.10.2.10", 6, &h)
    };
    let open = |l: &mut Loaded, ports: std::ops::Range<u16>| {
        for sport in ports {
            assert!(l.run(Hook::ToPod, &syn(sport)).0, "allowed flow {sport}");
        }
    };
    open(&mut l, 40000..40032);
    assert_eq!(l.dp.conntrack_len(), 32);
    assert_eq!(l.dp.conntrack_logged(), 32, "the log took them all");
    assert_eq!(stat(&l, Statistic::CtHome), 0);
    open(&mut l, 40032..40040);
    assert_eq!(stat(&l, Statistic::CtFull), 0);
    assert_eq!(l.dp.conntrack_len(), 40);
    assert_eq!(l.dp.conntrack_logged(), 32, "no live entry was overwritten");
    assert_eq!(stat(&l, Statistic::CtHome), 8, "the rest went home");
    // Every one of them is tracked, in the log or at home.
    let established = stat(&l, Statistic::Established);
    for sport in 40000..40040 {
        assert!(l.run(Hook::ToPod, &ack(sport)).0, "established {sport}");
    }
    assert_eq!(stat(&l, Statistic::Established) - established, 40);
    let (entries, _) = l.dp.conntrack_entries();
    let mut ports: Vec<u16> = entries
        .iter()
        .map(|e| e.key.port_a.max(e.key.port_b))
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (40000..40040).collect::<Vec<_>>(), "whole entries");
    // Swept, the log's entries are free again.
    l.dp.set_config(Config {
        tcp_established_s: 0,
        ..Config::default()
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(25));
    assert_eq!(l.dp.expire_conntrack().unwrap(), 40);
    l.dp.set_config(Config::default()).unwrap();
    open(&mut l, 41000..41032);
    assert_eq!(l.dp.conntrack_logged(), 32);
    assert_eq!(stat(&l, Statistic::CtHome), 8, "none went home");
}

/// Pins of an earlier conntrack layout cannot be re-adopted: the load
/// refuses them and names them, before creating anything.
#[test]
fn pins_of_an_earlier_conntrack_layout_are_refused_by_name() {
    if !privileged() {
        return;
    }
    for (pinned, named) in [
        (&["PALISADE_CT4"][..], "PALISADE_CT4"),
        // The service array of builds whose frontends were 8 bytes.
        (&["PALISADE_SVC_SERVICES"][..], "PALISADE_SVC_SERVICES"),
        // Ways pinned without their tag lines: the state words were in
        // the ways then.
        (&[map_names::CONN4][..], map_names::CONN4),
        // Ways and tag lines pinned without a log head: each
        // connection was in its way's entry then.
        (&[map_names::CONN4, map_names::CTTAG4][..], map_names::CONN4),
    ] {
        let dir = std::env::temp_dir().join(format!("palisade-old-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in pinned {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let err = Datapath::load(&dir, Capacity::verification())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("earlier Palisade") && err.contains(named),
            "{pinned:?}: {err}"
        );
        assert!(!dir.join("links").exists(), "nothing was created");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An ICMP error (`kind`, `code`) from `from` to `to` quoting `quoted`'s
/// IPv4 header and first 8 transport bytes.
fn icmp_error(from: &str, to: &str, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut body = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    body.extend_from_slice(&quoted[14..14 + 28]);
    v4(from, to, 1, &body)
}

/// ICMP errors about a connection an endpoint approved pass with it, as
/// conntrack's RELATED packets do (Calico accepts them with ESTABLISHED):
/// under default deny a router's "fragmentation needed" about web's
/// segment reaches web, and api's port unreachable about it leaves api;
/// an error about a connection never approved stays denied.
#[test]
fn icmp_errors_about_an_approved_connection_pass_under_default_deny() {
    if !privileged() {
        return;
    }
    let mut l = example_loaded();
    l.dp.flush_conntrack();
    let syn = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40000, 8080));
    let frag_needed = icmp_error("10.10.9.1", "10.10.1.10", 3, 4, &syn);
    let refused = icmp_error("10.10.2.10", "10.10.1.10", 3, 3, &syn);
    assert!(
        !l.run(Hook::ToPod, &frag_needed).0,
        "no connection yet: web's ingress denies it"
    );
    assert!(!l.run(Hook::FromPod, &refused).0, "nor api's egress");
    assert!(l.run(Hook::FromPod, &syn).0, "web -> api:8080");
    assert!(l.run(Hook::ToPod, &syn).0, "api takes it");
    assert!(l.run(Hook::ToPod, &frag_needed).0, "RELATED: to web");
    assert!(l.run(Hook::FromPod, &refused).0, "RELATED: from api");
    let other = v4("10.10.1.10", "10.10.2.10", 6, &tcp_syn(40001, 8080));
    let unrelated = icmp_error("10.10.9.1", "10.10.1.10", 3, 4, &other);
    assert!(
        !l.run(Hook::ToPod, &unrelated).0,
        "about a connection never made: denied"
    );
}

/// How much of the verifier's budget (1,000,000 instructions) each TC
/// program takes, printed for the record; a program past 95% is one
/// change away from being refused at load.
#[test]
fn every_program_leaves_the_verifier_room() {
    if !privileged() {
        return;
    }
    let l = example_loaded();
    for (name, insns) in l.dp.verified_instructions().unwrap() {
        eprintln!("{name}: {insns} instructions verified");
        assert!(insns < 950_000, "{name}: {insns} of 1,000,000");
    }
}
