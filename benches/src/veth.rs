//! Real traffic through veth pairs between network namespaces, enforced
//! three ways on the node: not at all (the baseline), by iptables rules laid
//! out the way Calico's iptables mode lays them out, and by Palisade's TC
//! programs. Same topology, same policy set ([`crate::dataplane`]), same
//! traffic.
//!
//! Calico's iptables layout, as reproduced here: `FORWARD` jumps to
//! `cali-FORWARD`, which accepts `ESTABLISHED,RELATED` first and drops
//! `INVALID`; traffic to a workload jumps to its `cali-tw-<iface>` chain,
//! which clears the accept mark and, per policy in order, jumps to the
//! policy's `cali-pi-<policy>` chain while no verdict is set, then returns
//! when a rule accepted; each policy rule is one iptables rule matching
//! protocol, ports and an ipset of the selector's members, setting the
//! accept mark; the end of the tier drops. Selectors become ipsets
//! (`hash:net`), one per distinct selector.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_testing::netns::{Netns, Topology};
use policy_bpf::datapath::{Datapath, Hook};
use policy_bpf::lower::{Binding, Capacity, Lowering};
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::model::EndpointKey;
use socket2::{Domain, Protocol, Socket, Type};

use crate::dataplane::{
    CLIENT, PEER_GROUPS, SERVER, TCP_PORT, UDP_PORT, UDP_PORTS, cluster, peer_ip,
};

/// Who enforces policy on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nobody: plain forwarding.
    Baseline,
    /// iptables rules and ipsets in the node namespace.
    Iptables,
    /// Palisade's TC programs on the host veths, with local delivery (the
    /// client's datagrams go straight into the server pod once both
    /// policies allow; `policy_bpf_common::LocalEndpoint`).
    Palisade,
    /// Palisade's TC programs without local delivery: the node forwards,
    /// and the server's interface judges on the way out.
    PalisadeForwarded,
    /// A program that passes every packet, where Palisade's go: the cost
    /// of the TC hooks themselves, the floor under any TC datapath.
    PassThrough,
}

impl Mode {
    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "no policy",
            Mode::Iptables => "iptables",
            Mode::Palisade => "palisade",
            Mode::PalisadeForwarded => "palisade, node forwarding",
            Mode::PassThrough => "pass-through",
        }
    }
}

/// A node with a client and a server pod and one enforcement mode.
#[derive(Debug)]
pub struct Lab {
    mode: Mode,
    // Drop order: the datapath before the namespaces.
    datapath: Option<Datapath>,
    topo: Topology,
    /// The next UDP flow (source and destination port pair) to send: runs
    /// continue where the last stopped, so no datagram of a lab's life
    /// reuses a tracked flow (Palisade would pass it as established).
    next_udp_flow: std::cell::Cell<u32>,
}

/// Runs `program args` inside `ns` with `stdin` as its input (rules for
/// `iptables-restore`, `ipset restore`, `nft -f -`); fails with what it said.
pub fn run_in(ns: &Netns, program: &str, args: &[&str], stdin: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The ipsets (`ipset restore` input) and rules (`iptables-restore` input)
/// of the benchmark policy set with `n` policies, protecting the server
/// behind host interface `server_if`.
pub fn iptables_rules(n: usize, server_if: &str) -> (String, String) {
    let mut sets = String::new();
    let set = |name: &str, ip: &str, sets: &mut String| {
        sets.push_str(&format!(
            "create {name} hash:net family inet\nadd {name} {ip}\n"
        ));
    };
    for g in 0..PEER_GROUPS {
        set(&format!("cali40s:g{g}"), &peer_ip(g).to_string(), &mut sets);
    }
    set("cali40s:client", CLIENT, &mut sets);

    let mut chains = vec![
        ":cali-FORWARD - [0:0]".to_string(),
        format!(":cali-tw-{server_if} - [0:0]"),
    ];
    let mut rules = vec![
        "-A FORWARD -j cali-FORWARD".to_string(),
        "-A cali-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        "-A cali-FORWARD -m conntrack --ctstate INVALID -j DROP".into(),
        format!("-A cali-FORWARD -o {server_if} -j cali-tw-{server_if}"),
        "-A cali-FORWARD -m mark --mark 0x10000/0x10000 -j ACCEPT".into(),
        format!("-A cali-tw-{server_if} -j MARK --set-xmark 0x0/0x30000"),
    ];
    let mut policy = |name: String, body: Vec<String>, rules: &mut Vec<String>| {
        chains.push(format!(":cali-pi-{name} - [0:0]"));
        rules.push(format!(
            "-A cali-tw-{server_if} -m mark --mark 0x0/0x20000 -j cali-pi-{name}"
        ));
        rules.push(format!(
            "-A cali-tw-{server_if} -m mark --mark 0x10000/0x10000 -j RETURN"
        ));
        for r in body {
            rules.push(format!(
                "-A cali-pi-{name} {r} -j MARK --set-xmark 0x10000/0x10000"
            ));
            rules.push(format!(
                "-A cali-pi-{name} -m mark --mark 0x10000/0x10000 -j RETURN"
            ));
        }
    };
    for i in 0..n.saturating_sub(1) {
        policy(
            format!("p{i}"),
            vec![format!(
                "-p tcp -m set --match-set cali40s:g{} src -m multiport --dports {}",
                i % PEER_GROUPS,
                10000 + i % 50000
            )],
            &mut rules,
        );
    }
    policy(
        "allow-client".into(),
        vec![
            format!(
                "-p tcp -m set --match-set cali40s:client src -m multiport --dports {TCP_PORT}"
            ),
            format!(
                "-p udp -m set --match-set cali40s:client src -m multiport --dports {UDP_PORT}:{}",
                UDP_PORT + UDP_PORTS - 1
            ),
        ],
        &mut rules,
    );
    // End of tier: nothing allowed it.
    rules.push(format!(
        "-A cali-tw-{server_if} -m mark --mark 0x0/0x10000 -j DROP"
    ));
    let mut text =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for c in chains {
        text.push_str(&c);
        text.push('\n');
    }
    for r in rules {
        text.push_str(&r);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    (sets, text)
}

fn key(s: &str) -> EndpointKey {
    s.parse().expect("endpoint key")
}

impl Lab {
    /// Builds the namespaces and installs `mode` with `n` policies.
    pub fn new(mode: Mode, n: usize) -> Result<Lab> {
        let pods = vec![
            (key("bench/client"), vec![CLIENT.parse()?]),
            (key("bench/server"), vec![SERVER.parse()?]),
        ];
        let topo = Topology::build(&pods)?;
        let server_if = topo
            .pod(&key("bench/server"))
            .context("server")?
            .host_if
            .clone();
        let datapath = match mode {
            Mode::Baseline => None,
            Mode::Iptables => {
                let (sets, rules) = iptables_rules(n, &server_if);
                run_in(topo.node(), "ipset", &["restore"], &sets)?;
                run_in(topo.node(), "iptables-restore", &[], &rules)?;
                // The rules loaded nf_conntrack; now its limit exists.
                raise_conntrack_limit()?;
                None
            }
            Mode::PassThrough => {
                let mut dp = Datapath::load_private(Capacity::default())?;
                let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
                topo.node()
                    .run(|| ifaces.iter().try_for_each(|i| dp.attach_pass_through(i)))??;
                Some(dp)
            }
            Mode::Palisade | Mode::PalisadeForwarded => {
                let (compiler, delta) =
                    Compiler::from_cluster(&cluster(n), CompileOptions::default())?;
                // Room for every flow of a run, like the iptables lab's
                // raised nf_conntrack_max (an entry per local endpoint).
                let cap = Capacity {
                    conntrack: CONNTRACK_ENTRIES,
                    ..Capacity::default()
                };
                let mut dp = Datapath::load_private(cap)?;
                let mut lowering = Lowering::new(cap);
                let before = lowering.mirror().clone();
                let mut plan = lowering.lower(&delta)?;
                for (i, p) in topo.pods().iter().enumerate() {
                    let b = Binding {
                        ifindex: p.ifindex,
                        zone: i as u32 + 1,
                    };
                    plan.switch.extend(lowering.bind(&p.key, Some(b))?.switch);
                }
                dp.write(&plan, &before)?;
                let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
                topo.node()
                    .run(|| ifaces.iter().try_for_each(|i| dp.attach(i)))??;
                if mode == Mode::Palisade {
                    for (ip, ep) in topo.local_endpoints() {
                        dp.set_local_endpoint(ip, Some(ep))?;
                    }
                }
                drop(compiler);
                Some(dp)
            }
        };
        Ok(Lab {
            mode,
            datapath,
            topo,
            next_udp_flow: std::cell::Cell::new(0),
        })
    }

    /// Allowed connections that found Palisade's conntrack full (0 in a
    /// fair run: the table holds every flow, as the iptables lab's does).
    pub fn conntrack_full(&self) -> Result<u64> {
        match &self.datapath {
            Some(dp) => Ok(dp.stats()?[policy_bpf_common::Statistic::CtFull as usize]),
            None => Ok(0),
        }
    }

    fn ns(&self, k: &str) -> &Netns {
        &self.topo.pod(&key(k)).expect("pod").ns
    }

    /// Nanoseconds per run of the programs attached in this lab during
    /// `secs` of UDP new flows, from the kernel's run-time statistics
    /// (enabled for this run only: they add two clock reads a run, so the
    /// rates are measured without them): (from the pod, to the pod), the
    /// pass-through program's average for both in its lab; None without
    /// programs. With local delivery the receiver's judgement runs in a
    /// program `palisade_from_pod` tail-calls, whose time the kernel
    /// counts in the caller's, and `palisade_to_pod` does not run for
    /// datagrams from the client.
    pub fn udp_program_times(&self, secs: f64) -> Result<Option<(f64, f64)>> {
        let Some(dp) = &self.datapath else {
            return Ok(None);
        };
        let hooks = match self.mode {
            Mode::PassThrough => [Hook::PassThrough, Hook::PassThrough],
            _ => [Hook::FromPod, Hook::ToPod],
        };
        let stats = Datapath::enable_run_time_stats()?;
        let before = [dp.program_stats(hooks[0])?, dp.program_stats(hooks[1])?];
        self.udp_new_flows(secs)?;
        let after = [dp.program_stats(hooks[0])?, dp.program_stats(hooks[1])?];
        drop(stats);
        let per_run = |i: usize| {
            let runs = after[i].1.saturating_sub(before[i].1).max(1);
            after[i].0.saturating_sub(before[i].0).as_nanos() as f64 / runs as f64
        };
        Ok(Some((per_run(0), per_run(1))))
    }

    /// UDP datagrams per second delivered to the server when every datagram
    /// is a new flow (source port and destination port change each time).
    pub fn udp_new_flows(&self, secs: f64) -> Result<f64> {
        let server = self.ns("bench/server");
        // Bound so datagrams are delivered (or overflow a socket buffer),
        // never answered with port-unreachable.
        let sockets: Vec<UdpSocket> = (0..UDP_PORTS)
            .map(|i| {
                server
                    .run(|| UdpSocket::bind((SERVER, UDP_PORT + i)))
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from))
            })
            .collect::<Result<_>>()?;
        let raw = self
            .ns("bench/client")
            .run(|| -> std::io::Result<Socket> {
                let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::new(CLIENT.parse().expect("ip"), 0).into())?;
                Ok(s)
            })??;
        let dst: socket2::SockAddr = SocketAddr::new(SERVER.parse()?, 0).into();
        let before = udp_arrived(server)?;
        let start = Instant::now();
        // Flow k is destination port k % UDP_PORTS from source port
        // 1024 + k / UDP_PORTS: UDP_FLOWS distinct flows, more than a lab
        // sends in a report's rounds (so every datagram is a new flow).
        let mut flow = self.next_udp_flow.get();
        let mut tried = 0u64;
        let mut msg = [0u8; 8 + 18];
        let len = msg.len() as u16;
        msg[4..6].copy_from_slice(&len.to_be_bytes());
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            for _ in 0..256 {
                let sport = 1024 + (flow / u32::from(UDP_PORTS)) as u16;
                let dport = UDP_PORT + (flow % u32::from(UDP_PORTS)) as u16;
                msg[0..2].copy_from_slice(&sport.to_be_bytes());
                msg[2..4].copy_from_slice(&dport.to_be_bytes());
                flow = (flow + 1) % UDP_FLOWS;
                tried += 1;
                if raw.send_to(&msg, &dst).is_ok() {
                    sent += 1;
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let first = self.next_udp_flow.get();
        anyhow::ensure!(
            u64::from(first) + tried < u64::from(UDP_FLOWS),
            "UDP flows ran out ({first} + {tried} of {UDP_FLOWS}): later datagrams \
             would reuse tracked flows"
        );
        self.next_udp_flow.set(flow);
        std::thread::sleep(Duration::from_millis(50));
        // The kernel counts a datagram as delivered when it is read: drain.
        let mut buf = [0u8; 64];
        for s in &sockets {
            s.set_nonblocking(true)?;
            while s.recv(&mut buf).is_ok() {}
        }
        let arrived = udp_arrived(server)? - before;
        // Overload drops (a full backlog) are part of what is measured; a
        // policy that drops the traffic is a broken benchmark.
        anyhow::ensure!(
            arrived * 2 >= sent,
            "only {arrived} of {sent} datagrams arrived: the policy or the topology drops them"
        );
        if arrived * 10 < sent * 9 {
            eprintln!(
                "  note: {} of {sent} datagrams lost under load",
                sent - arrived
            );
        }
        Ok(arrived as f64 / elapsed)
    }

    /// TCP connections per second, each opened and reset (a new flow each).
    pub fn tcp_connect_rate(&self, secs: f64) -> Result<f64> {
        let server = SocketAddr::new(SERVER.parse()?, TCP_PORT);
        let run = tcp_connects(
            self.ns("bench/client"),
            self.ns("bench/server"),
            server,
            &[server],
            CLIENT.parse()?,
            secs,
        )
        .context("the policy must allow the client")?;
        Ok(run.rate())
    }

    /// Bytes per second of one established TCP stream.
    pub fn bulk(&self, secs: f64) -> Result<f64> {
        let listener = self
            .ns("bench/server")
            .run(|| TcpListener::bind((SERVER, TCP_PORT)))??;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut c, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 18];
            let mut total = 0u64;
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        });
        let mut client = self.ns("bench/client").run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::new(SERVER.parse().expect("ip"), TCP_PORT),
                Duration::from_secs(2),
            )
        })??;
        let buf = vec![7u8; 1 << 18];
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            client.write_all(&buf)?;
        }
        drop(client);
        let total = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        Ok(total as f64 / start.elapsed().as_secs_f64())
    }
}

/// What one run of [`tcp_connects`] did.
#[derive(Debug, Clone, Default)]
pub struct Connects {
    /// Connections the client opened (its handshake completed).
    pub connected: u64,
    /// Connections the server accepted (waited for up to 2 s after the
    /// client stopped).
    pub accepted: u64,
    /// Accepted connections whose peer was not the client's address (a
    /// masquerade where none should be).
    pub foreign_peers: u64,
    /// The server's side of every 256th accepted connection: the address
    /// the connection really reached.
    pub reached: Vec<SocketAddr>,
    /// Seconds the client spent connecting.
    pub secs: f64,
}

impl Connects {
    /// Connections per second.
    pub fn rate(&self) -> f64 {
        self.connected as f64 / self.secs
    }

    /// Fails unless the server accepted (nearly) every connection the
    /// client opened, each from the client's own address.
    pub fn check(&self) -> Result<()> {
        anyhow::ensure!(
            self.connected > 0 && self.accepted * 1000 >= self.connected * 999,
            "the client opened {} connections but the server accepted {}",
            self.connected,
            self.accepted
        );
        anyhow::ensure!(
            self.foreign_peers == 0,
            "{} connections reached the server from another address than the client's",
            self.foreign_peers
        );
        Ok(())
    }
}

/// Opens TCP connections from `client` to `dsts` in turn for `secs`
/// seconds, each reset at once (`SO_LINGER` 0: no TIME_WAIT, a new flow
/// each), accepted in `server` by one listener bound to `listen` (a
/// 4096-deep accept queue and an acceptor thread counting). Sockets are
/// made in the client namespace in batches of 64 (a thread per batch)
/// and connected from the calling thread. `client_ip` is the address the
/// server should see.
pub fn tcp_connects(
    client: &Netns,
    server: &Netns,
    listen: SocketAddr,
    dsts: &[SocketAddr],
    client_ip: IpAddr,
    secs: f64,
) -> Result<Connects> {
    anyhow::ensure!(!dsts.is_empty(), "no destinations");
    // A deep accept queue: under load the acceptor may lag, and a full
    // queue would drop SYNs (a one-second retransmit, not policy).
    let listener: TcpListener = server
        .run(|| -> std::io::Result<Socket> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&listen.into())?;
            s.listen(4096)?;
            Ok(s)
        })??
        .into();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let acceptor = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let (mut foreign, mut reached) = (0u64, Vec::new());
            loop {
                let got = listener.accept();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok((conn, peer)) = got {
                    let k = accepted.fetch_add(1, Ordering::Relaxed);
                    if peer.ip() != client_ip {
                        foreign += 1;
                    }
                    if k % 256 == 0
                        && let Ok(at) = conn.local_addr()
                    {
                        reached.push(at);
                    }
                }
            }
            (foreign, reached)
        })
    };
    let start = Instant::now();
    let mut done = 0u64;
    let mut next = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        let batch: Vec<Socket> = client.run(|| {
            (0..64)
                .map(|_| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))
                .collect::<std::io::Result<Vec<_>>>()
        })??;
        for s in batch {
            let dst = dsts[next];
            next = (next + 1) % dsts.len();
            s.set_linger(Some(Duration::ZERO))?;
            s.connect_timeout(&dst.into(), Duration::from_secs(5))
                .with_context(|| format!("connecting to {dst}"))?;
            done += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(2);
    while accepted.load(Ordering::Relaxed) < done && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let accepted = accepted.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    // One more connection, from the server's own namespace, wakes the
    // acceptor so it sees the stop flag.
    let mut wake_at = listen;
    if wake_at.ip().is_unspecified() {
        wake_at.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let wake = server.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))??;
    wake.set_linger(Some(Duration::ZERO))?;
    let _ = wake.connect_timeout(&wake_at.into(), Duration::from_secs(5));
    let (foreign_peers, reached) = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))?;
    Ok(Connects {
        connected: done,
        accepted,
        foreign_peers,
        reached,
        secs: elapsed,
    })
}

/// UDP datagrams that reached the UDP layer in a namespace (delivered, or
/// dropped for a full socket buffer).
fn udp_arrived(ns: &Netns) -> Result<u64> {
    let text = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (
        lines.next().context("Udp header")?,
        lines.next().context("Udp values")?,
    );
    let get = |field: &str| -> Result<u64> {
        let i = names
            .split_whitespace()
            .position(|n| n == field)
            .with_context(|| format!("no {field}"))?;
        Ok(values.split_whitespace().nth(i).context("value")?.parse()?)
    };
    Ok(get("InDatagrams")? + get("RcvbufErrors")?)
}

/// Conntrack entries of both labs.
pub const CONNTRACK_ENTRIES: u32 = 4_194_304;

/// Distinct UDP flows a lab can send (source ports 1024-65535 times the
/// UDP_PORTS destination ports).
pub const UDP_FLOWS: u32 = (65536 - 1024) * UDP_PORTS as u32;

/// Lets the node's conntrack table hold every flow of a run (iptables mode
/// tracks each new flow in the kernel's table, whose default size would
/// start dropping first).
pub fn raise_conntrack_limit() -> Result<()> {
    std::fs::write(
        "/proc/sys/net/netfilter/nf_conntrack_max",
        CONNTRACK_ENTRIES.to_string(),
    )
    .context("raising net.netfilter.nf_conntrack_max")
}

/// Address of the server (for messages).
pub fn server() -> IpAddr {
    SERVER.parse().expect("ip")
}
