//! The `netns` engine: real traffic between network namespaces through the
//! TC programs attached with TCX to each pod's host veth.
//!
//! A probe is a real connection attempt: a TCP handshake between sockets, a
//! UDP datagram and its reply, an ICMP message (echo requests are answered by
//! the destination kernel), or a raw IP packet for any other protocol. A
//! connection counts as allowed only when the server side received it;
//! denied means it never arrived. The verdict events the programs emit name
//! the deciding rule per direction, and they must agree with what the
//! sockets saw, or the probe fails.
//!
//! SCTP probes use real SCTP sockets (an association handshake) where the
//! kernel has SCTP; where it does not, they are unavailable with that reason
//! (the kernel engine still runs them on crafted SCTP packets). Addresses
//! that real unicast traffic cannot use (multicast, loopback, link-local)
//! make a probe unavailable, reported with the reason.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use policy_bpf_common::*;
use policy_core::Cluster;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{Engine, EngineError};
use policy_core::connection::{Peer, ProbeOutcome};
use policy_core::flow::{Decision, Flow, Verdict};
use policy_core::model::{Direction, EndpointKey};
use policy_core::net::Protocol;
use socket2::{Domain, Socket, Type};

use crate::kernel_engine::decision_from_event;
use crate::netns::{NetnsError, Owner, Topology};
use policy_bpf::datapath::{Datapath, DatapathError};
use policy_bpf::lower::{Binding, Capacity, Lowering, WritePlan};

/// How long a packet may take to arrive before the probe gives up (only
/// reached when neither delivery nor a drop event is seen).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// After a drop event, how long to keep watching the sockets: a delivery in
/// this window would mean the program reported a drop it did not make.
const DROP_GRACE: Duration = Duration::from_millis(20);
const POLL: Duration = Duration::from_micros(200);

/// The engine: a topology, the loaded datapath and its lowering.
#[derive(Debug)]
pub struct NetnsEngine {
    inner: Mutex<Inner>,
}

struct Inner {
    // Drop order: the datapath (links, pins) before the namespaces.
    dp: Datapath,
    topo: Topology,
    lowering: Lowering,
    next_id: u16,
    listener: Option<EventListener>,
    last_events: Vec<Event>,
}

/// Called with every verdict event as the programs report it.
pub type EventListener = Box<dyn FnMut(&EventReport) + Send>;

/// A verdict event, resolved to names.
#[derive(Debug, Clone)]
pub struct EventReport {
    /// The raw record.
    pub event: Event,
    /// The pod whose veth reported it.
    pub endpoint: Option<EndpointKey>,
    /// The pod's policy direction.
    pub direction: Direction,
    /// The rule that decided, or why the packet was dropped before policy.
    pub decided_by: String,
}

impl EventReport {
    /// Whether the packet was allowed.
    pub fn allowed(&self) -> bool {
        self.event.allow == 1
    }

    /// The packet's five-tuple, for humans.
    pub fn tuple(&self) -> String {
        let e = &self.event;
        let addr = |b: &[u8; 16]| -> IpAddr {
            if e.family == AddressFamily::V4.code() {
                IpAddr::from([b[0], b[1], b[2], b[3]])
            } else {
                IpAddr::from(*b)
            }
        };
        let proto = Protocol(e.protocol);
        if proto.has_ports() {
            format!(
                "{proto} {} -> {}",
                SocketAddr::new(addr(&e.src), e.src_port),
                SocketAddr::new(addr(&e.dst), e.dst_port)
            )
        } else {
            format!("{proto} {} -> {}", addr(&e.src), addr(&e.dst))
        }
    }
}

fn report(topo: &Topology, lowering: &Lowering, e: &Event) -> EventReport {
    let endpoint = topo
        .pods()
        .iter()
        .find(|p| p.ifindex == e.ifindex)
        .map(|p| p.key.clone());
    let decided_by = match EventReason::from_code(e.reason) {
        Some(EventReason::Policy) => lowering
            .rule(e.rule)
            .map(|r| r.decided_by().to_string())
            .unwrap_or_else(|| format!("unknown rule {}", e.rule)),
        Some(EventReason::Malformed) => "malformed packet".into(),
        Some(EventReason::Fragment) => "fragment of an unknown datagram".into(),
        Some(EventReason::Spoofed) => "source address not the pod's".into(),
        Some(EventReason::Walk) => "decision walk failed".into(),
        Some(EventReason::Established) | None => format!("reason {}", e.reason),
    };
    EventReport {
        event: *e,
        endpoint,
        direction: if e.direction == HookDirection::Egress.code() {
            Direction::Egress
        } else {
            Direction::Ingress
        },
        decided_by,
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("pods", &self.topo.pods().len())
            .finish()
    }
}

fn other(e: impl std::fmt::Display) -> EngineError {
    EngineError::Dataplane(e.to_string())
}

fn from_dp(e: DatapathError) -> EngineError {
    match e {
        DatapathError::Privileges(m) => EngineError::Unavailable(m),
        e => other(e),
    }
}

fn from_netns(e: NetnsError) -> EngineError {
    match e {
        NetnsError::Unusable(m) => EngineError::Unavailable(m),
        e => other(e),
    }
}

/// What the sockets saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivery {
    /// The server received the connection's first packet.
    delivered: bool,
    /// The reply made it back (TCP handshake completed, UDP or echo reply
    /// received); `None` when the protocol has no reply.
    replied: Option<bool>,
    /// One line for humans.
    detail: String,
}

/// Verdict events gathered while a probe runs.
struct Watch {
    events: Vec<Event>,
}

impl Watch {
    fn poll(&mut self, dp: &mut Datapath) {
        self.events.extend(dp.drain_events());
    }

    fn matching(&self, flow: &Flow, ifindex: u32, direction: u8) -> Option<&Event> {
        self.events
            .iter()
            .find(|e| e.ifindex == ifindex && e.direction == direction && event_is(e, flow))
    }

    fn dropped(&self, flow: &Flow) -> bool {
        self.events
            .iter()
            .any(|e| e.allow == 0 && event_is(e, flow))
    }
}

fn addr_bytes(ip: &IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

fn event_is(e: &Event, flow: &Flow) -> bool {
    if e.src != addr_bytes(&flow.src)
        || e.dst != addr_bytes(&flow.dst)
        || e.protocol != flow.protocol.0
    {
        return false;
    }
    match flow.icmp {
        Some((t, c)) => e.src_port == (u16::from(t) << 8) | u16::from(c),
        None if flow.protocol.has_ports() => {
            e.src_port == flow.src_port && e.dst_port == flow.dst_port
        }
        None => true,
    }
}

impl NetnsEngine {
    /// Builds a namespace per endpoint, loads the programs into a private
    /// datapath, attaches them to every host veth and writes the compiled
    /// policy.
    pub fn new(cluster: &Cluster, cap: Capacity) -> Result<Self, EngineError> {
        Self::with_pods(cluster, cap, |_| true)
    }

    /// As [`NetnsEngine::new`], with namespaces only for the endpoints
    /// `wanted` keeps: one question about two pods of thousands needs two
    /// namespaces, not thousands. The policy is still compiled from the whole
    /// cluster, so the kept pods see every peer's identity.
    pub fn with_pods(
        cluster: &Cluster,
        cap: Capacity,
        wanted: impl Fn(&EndpointKey) -> bool,
    ) -> Result<Self, EngineError> {
        if !policy_bpf::datapath::privileged() {
            return Err(EngineError::Unavailable(
                "network namespaces and BPF need root".into(),
            ));
        }
        let (compiler, delta) =
            Compiler::from_cluster(cluster, CompileOptions::default()).map_err(other)?;
        let pods: Vec<(EndpointKey, Vec<IpAddr>)> = compiler
            .cluster()
            .endpoints()
            .filter(|e| wanted(&e.key))
            .map(|e| (e.key.clone(), e.ips.clone()))
            .collect();
        let topo = Topology::build(&pods).map_err(from_netns)?;
        let mut dp = Datapath::load_private(cap).map_err(from_dp)?;
        dp.set_config(Config {
            allow_sample: 1,
            ..Config::default()
        })
        .map_err(from_dp)?;
        let mut lowering = Lowering::new(cap);
        let before = lowering.mirror().clone();
        let mut plan: WritePlan = lowering.lower(&delta).map_err(other)?;
        for (i, pod) in topo.pods().iter().enumerate() {
            let p = lowering
                .bind(
                    &pod.key,
                    Some(Binding {
                        ifindex: pod.ifindex,
                        zone: i as u32 + 1,
                    }),
                )
                .map_err(other)?;
            plan.switch.extend(p.switch);
        }
        dp.write(&plan, &before).map_err(from_dp)?;
        let ifaces: Vec<String> = topo.pods().iter().map(|p| p.host_if.clone()).collect();
        topo.node()
            .run(|| -> Result<(), DatapathError> {
                for i in &ifaces {
                    dp.attach(i)?;
                }
                Ok(())
            })
            .map_err(from_netns)?
            .map_err(from_dp)?;
        // Pods reach each other the way a CNI would set them up to: straight
        // into the receiver once both policies allow.
        for (ip, ep) in topo.local_endpoints() {
            dp.set_local_endpoint(ip, Some(ep)).map_err(from_dp)?;
        }
        Ok(NetnsEngine {
            inner: Mutex::new(Inner {
                dp,
                topo,
                lowering,
                next_id: 1,
                listener: None,
                last_events: Vec::new(),
            }),
        })
    }

    /// Runs `f` with the datapath (counters, statistics, events).
    pub fn with_datapath<T>(&self, f: impl FnOnce(&mut Datapath) -> T) -> Result<T, EngineError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| other("engine lock poisoned"))?;
        Ok(f(&mut inner.dp))
    }

    /// How many pods (namespaces) the engine runs.
    pub fn pods(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.topo.pods().len())
    }

    /// Reports every verdict event to `l` as it is read (drops as they
    /// happen, and allows: this engine samples every allowed new flow).
    pub fn set_listener(&self, l: EventListener) -> Result<(), EngineError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| other("engine lock poisoned"))?;
        inner.listener = Some(l);
        Ok(())
    }

    /// The verdict events of the last probe, resolved to names.
    pub fn last_events(&self) -> Result<Vec<EventReport>, EngineError> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| other("engine lock poisoned"))?;
        Ok(inner
            .last_events
            .iter()
            .map(|e| report(&inner.topo, &inner.lowering, e))
            .collect())
    }

    /// Sends a connection's first packet for real and reports what each
    /// enforcing end decided and whether the connection succeeded.
    pub fn probe(&self, from: &Peer, to: &Peer, flow: &Flow) -> Result<ProbeOutcome, EngineError> {
        flow.validate().map_err(EngineError::InvalidFlow)?;
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| other("engine lock poisoned"))?;
        inner.probe(from, to, flow)
    }
}

impl Inner {
    /// Which namespace sends (or receives) for a peer, adding external
    /// addresses on first use.
    fn place(&mut self, peer: &Peer, ip: IpAddr) -> Result<Owner, EngineError> {
        match peer {
            Peer::Endpoint(k) => {
                let pod = self
                    .topo
                    .pod(k)
                    .ok_or_else(|| EngineError::UnknownEndpoint(k.clone()))?;
                let owner = self.topo.owner(&ip).map_err(from_netns)?;
                match owner {
                    Owner::Pod(i) if self.topo.pods()[i].key == pod.key => Ok(owner),
                    _ => Err(EngineError::Unavailable(format!(
                        "{ip} is not an address of {k}"
                    ))),
                }
            }
            Peer::Ip(_) => {
                self.topo.add_external(ip).map_err(from_netns)?;
                Ok(Owner::External)
            }
        }
    }

    fn probe(&mut self, from: &Peer, to: &Peer, flow: &Flow) -> Result<ProbeOutcome, EngineError> {
        let src = self.place(from, flow.src)?;
        let dst = self.place(to, flow.dst)?;
        if src == dst {
            return Err(EngineError::Unavailable(
                "both ends in one namespace: traffic would not leave it".into(),
            ));
        }
        if flow.protocol.has_ports() && (flow.src_port == 0 || flow.dst_port == 0) {
            return Err(EngineError::Unavailable(
                "port 0 cannot be used by real sockets".into(),
            ));
        }
        if flow.protocol == Protocol::SCTP {
            sctp_supported().map_err(EngineError::Unavailable)?;
        }
        // A fresh decision: no connection may be remembered from earlier probes.
        self.dp.flush_conntrack();
        self.dp.drain_events();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut watch = Watch { events: Vec::new() };
        let Inner {
            dp,
            topo,
            lowering,
            listener,
            ..
        } = self;
        let mut pump = |w: &mut Watch| {
            let seen = w.events.len();
            w.poll(dp);
            if let Some(l) = listener.as_mut() {
                for e in &w.events[seen..] {
                    l(&report(topo, lowering, e));
                }
            }
        };
        let delivery = {
            let src_ns = topo.netns(src);
            let dst_ns = topo.netns(dst);
            let mut observe = |w: &mut Watch| {
                pump(w);
                w.dropped(flow)
            };
            match flow.protocol {
                Protocol::TCP | Protocol::SCTP => {
                    stream(src_ns, dst_ns, flow, &mut watch, &mut observe)
                }
                Protocol::UDP => udp(src_ns, dst_ns, flow, &mut watch, &mut observe),
                _ => raw(src_ns, dst_ns, flow, id, &mut watch, &mut observe),
            }
        }
        .map_err(|e| other(format!("{} -> {} ({flow}): {e}", from, to)))?;
        pump(&mut watch);
        self.last_events = watch.events.clone();

        let decide = |owner: Owner, direction: u8| -> Result<Option<Decision>, EngineError> {
            let Owner::Pod(i) = owner else {
                return Ok(None);
            };
            let ifindex = self.topo.pods()[i].ifindex;
            match watch.matching(flow, ifindex, direction) {
                Some(e) => decision_from_event(&self.lowering, e, e.allow == 1).map(Some),
                None => Ok(None),
            }
        };
        let egress = decide(src, HookDirection::Egress.code())?;
        let ingress = decide(dst, HookDirection::Ingress.code())?;
        let allows = |d: &Option<Decision>| d.as_ref().is_none_or(|d| d.verdict == Verdict::Allow);
        // Every enforcing end the packet reached must have reported.
        if matches!(src, Owner::Pod(_)) && egress.is_none() {
            return Err(other(format!(
                "no egress verdict event at {from} for {flow} ({})",
                delivery.detail
            )));
        }
        let reached_ingress = allows(&egress);
        if matches!(dst, Owner::Pod(_)) && reached_ingress && ingress.is_none() {
            return Err(other(format!(
                "no ingress verdict event at {to} for {flow} ({})",
                delivery.detail
            )));
        }
        let policy_allows = allows(&egress) && allows(&ingress);
        if policy_allows != delivery.delivered {
            return Err(other(format!(
                "verdict events say {} but the traffic was {}: {}",
                if policy_allows { "allowed" } else { "denied" },
                if delivery.delivered {
                    "delivered"
                } else {
                    "not delivered"
                },
                delivery.detail
            )));
        }
        if delivery.delivered && delivery.replied == Some(false) {
            return Err(other(format!(
                "the connection was allowed but its reply was dropped: {}",
                delivery.detail
            )));
        }
        Ok(ProbeOutcome {
            allowed: delivery.delivered,
            egress,
            ingress,
        })
    }
}

fn domain(ip: &IpAddr) -> Domain {
    match ip {
        IpAddr::V4(_) => Domain::IPV4,
        IpAddr::V6(_) => Domain::IPV6,
    }
}

type Io<T> = Result<T, String>;

fn io<T>(what: &str, r: std::io::Result<T>) -> Io<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Opens a socket inside a namespace.
fn open(
    ns: &crate::netns::Netns,
    f: impl FnOnce() -> std::io::Result<Socket> + Send,
    what: &str,
) -> Io<Socket> {
    match ns.run(f) {
        Ok(r) => io(what, r),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits until `done` reports an outcome, a drop for the flow is seen (then
/// a short grace), or the timeout passes.
fn wait(
    watch: &mut Watch,
    observe: &mut dyn FnMut(&mut Watch) -> bool,
    mut done: impl FnMut() -> Io<Option<bool>>,
) -> Io<(bool, &'static str)> {
    let start = Instant::now();
    let mut dropped_at: Option<Instant> = None;
    loop {
        if let Some(ok) = done()? {
            return Ok((ok, "completed"));
        }
        if dropped_at.is_none() && observe(watch) {
            dropped_at = Some(Instant::now());
        }
        if let Some(t) = dropped_at
            && t.elapsed() > DROP_GRACE
        {
            return Ok((false, "dropped (drop event, nothing arrived)"));
        }
        if start.elapsed() > DELIVERY_TIMEOUT {
            return Ok((false, "timed out without a drop event"));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether this kernel can open SCTP sockets (many kernels build SCTP as a
/// module, or not at all).
fn sctp_supported() -> Result<(), String> {
    static SUPPORT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    SUPPORT
        .get_or_init(|| {
            Socket::new(
                Domain::IPV4,
                Type::STREAM,
                Some(socket2::Protocol::from(132)),
            )
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "this kernel has no SCTP (socket(IPPROTO_SCTP): {e}); \
                         the kernel engine covers SCTP with crafted packets"
                )
            })
        })
        .clone()
}

/// A connection-oriented probe (TCP, or SCTP where the kernel has it): the
/// server must accept and the client must see the handshake complete.
fn stream(
    src_ns: &crate::netns::Netns,
    dst_ns: &crate::netns::Netns,
    flow: &Flow,
    watch: &mut Watch,
    observe: &mut dyn FnMut(&mut Watch) -> bool,
) -> Io<Delivery> {
    let dst = SocketAddr::new(flow.dst, flow.dst_port);
    let src = SocketAddr::new(flow.src, flow.src_port);
    let proto = socket2::Protocol::from(i32::from(flow.protocol.0));
    let name = if flow.protocol == Protocol::SCTP {
        "SCTP"
    } else {
        "TCP"
    };
    let server = open(
        dst_ns,
        || {
            let s = Socket::new(domain(&flow.dst), Type::STREAM, Some(proto))?;
            s.set_reuse_address(true)?;
            s.bind(&dst.into())?;
            s.listen(16)?;
            s.set_nonblocking(true)?;
            Ok(s)
        },
        "listener",
    )?;
    let client = open(
        src_ns,
        || {
            let s = Socket::new(domain(&flow.src), Type::STREAM, Some(proto))?;
            s.set_reuse_address(true)?;
            // Closing resets the connection: no TIME_WAIT to block the
            // same four-tuple in the next probe.
            s.set_linger(Some(Duration::ZERO))?;
            s.bind(&src.into())?;
            s.set_nonblocking(true)?;
            match s.connect(&dst.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            Ok(s)
        },
        "client",
    )?;
    let mut accepted = false;
    let mut connected = false;
    // The server's end stays open until the client has seen the handshake.
    let mut conns = Vec::new();
    let (ok, how) = wait(watch, observe, || {
        if !accepted {
            match server.accept() {
                Ok((conn, _)) => {
                    io("SO_LINGER", conn.set_linger(Some(Duration::ZERO)))?;
                    conns.push(conn);
                    accepted = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
        if !connected {
            if let Some(e) = io("SO_ERROR", client.take_error())? {
                return Err(format!("connect: {e}"));
            }
            connected = client.peer_addr().is_ok();
        }
        Ok((accepted && connected).then_some(true))
    })?;
    let detail = format!(
        "{name} {src} -> {dst}: {how}; server {} the connection, client {}",
        if accepted { "accepted" } else { "never saw" },
        if connected {
            "connected"
        } else {
            "did not connect"
        }
    );
    Ok(Delivery {
        delivered: ok || accepted,
        replied: Some(connected),
        detail,
    })
}

fn udp(
    src_ns: &crate::netns::Netns,
    dst_ns: &crate::netns::Netns,
    flow: &Flow,
    watch: &mut Watch,
    observe: &mut dyn FnMut(&mut Watch) -> bool,
) -> Io<Delivery> {
    let dst = SocketAddr::new(flow.dst, flow.dst_port);
    let src = SocketAddr::new(flow.src, flow.src_port);
    let bound = |a: SocketAddr| {
        move || {
            let s = Socket::new(domain(&a.ip()), Type::DGRAM, Some(socket2::Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.bind(&a.into())?;
            s.set_nonblocking(true)?;
            Ok(s)
        }
    };
    let server = UdpSocket::from(open(dst_ns, bound(dst), "UDP server")?);
    let client = UdpSocket::from(open(src_ns, bound(src), "UDP client")?);
    let nonce = *b"palisade-probe-1";
    io("UDP send", client.send_to(&nonce, dst))?;
    let mut received = false;
    let mut replied = false;
    let mut buf = [0u8; 64];
    let (ok, how) = wait(watch, observe, || {
        if !received {
            match server.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if buf[..n] == nonce && from == src {
                        received = true;
                        io("UDP reply", server.send_to(b"pong", src))?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("UDP receive: {e}")),
            }
        }
        if received && !replied {
            match client.recv_from(&mut buf) {
                Ok((_, from)) => replied = from == dst,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("UDP reply receive: {e}")),
            }
        }
        Ok((received && replied).then_some(true))
    })?;
    Ok(Delivery {
        delivered: ok || received,
        replied: Some(replied),
        detail: format!(
            "UDP {src} -> {dst}: {how}; server {} the datagram, client {} the reply",
            if received { "received" } else { "never saw" },
            if replied { "got" } else { "did not get" }
        ),
    })
}

/// ICMPv4 checksum (the kernel computes ICMPv6 checksums itself).
fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The message a raw probe carries: ICMP with type/code, id and a nonce;
/// port-carrying protocols (UDP-Lite) start with the ports; others carry the
/// nonce alone.
fn raw_payload(flow: &Flow, id: u16, nonce: &[u8; 8]) -> Vec<u8> {
    let p = flow.protocol.0;
    if let Some((t, c)) = flow.icmp {
        let mut m = vec![t, c, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(nonce);
        if p == 1 {
            let sum = checksum(&m);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        return m;
    }
    let mut m = Vec::new();
    if flow.protocol.has_ports() {
        m.extend_from_slice(&flow.src_port.to_be_bytes());
        m.extend_from_slice(&flow.dst_port.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
    }
    m.extend_from_slice(nonce);
    m
}

fn raw(
    src_ns: &crate::netns::Netns,
    dst_ns: &crate::netns::Netns,
    flow: &Flow,
    id: u16,
    watch: &mut Watch,
    observe: &mut dyn FnMut(&mut Watch) -> bool,
) -> Io<Delivery> {
    let proto = socket2::Protocol::from(i32::from(flow.protocol.0));
    let v4 = flow.dst.is_ipv4();
    let raw_socket = |bind: IpAddr| {
        move || {
            let s = Socket::new(domain(&bind), Type::RAW, Some(proto))?;
            s.bind(&SocketAddr::new(bind, 0).into())?;
            s.set_nonblocking(true)?;
            Ok(s)
        }
    };
    // std's datagram socket is only a safe recvfrom/sendto over the raw fd.
    let server = UdpSocket::from(open(dst_ns, raw_socket(flow.dst), "raw receiver")?);
    let client = UdpSocket::from(open(src_ns, raw_socket(flow.src), "raw sender")?);
    let nonce = (u64::from(id) | 0x7061_6c69_0000_0000).to_be_bytes();
    let msg = raw_payload(flow, id, &nonce);
    let echo = matches!(flow.icmp, Some((8, 0)) | Some((128, 0)));
    io(
        "raw send",
        client.send_to(&msg, SocketAddr::new(flow.dst, 0)),
    )?;
    let mut received = false;
    let mut replied = false;
    let mut buf = [0u8; 2048];
    // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
    let body = |bytes: &[u8]| -> Vec<u8> {
        if v4 && !bytes.is_empty() {
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            bytes.get(ihl..).map(|b| b.to_vec()).unwrap_or_default()
        } else {
            bytes.to_vec()
        }
    };
    let (ok, how) = wait(watch, observe, || {
        loop {
            match server.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if from.ip() == flow.src && body(&buf[..n]).ends_with(&nonce) {
                        received = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("raw receive: {e}")),
            }
        }
        if echo {
            loop {
                match client.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let b = body(&buf[..n]);
                        let reply_type = if v4 { 0 } else { 129 };
                        if from.ip() == flow.dst
                            && b.first() == Some(&reply_type)
                            && b.ends_with(&nonce)
                        {
                            replied = true;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("raw receive (reply): {e}")),
                }
            }
        }
        Ok((received && (!echo || replied)).then_some(true))
    })?;
    Ok(Delivery {
        delivered: ok || received,
        replied: echo.then_some(replied),
        detail: format!(
            "protocol {} {} -> {}: {how}; receiver {} it{}",
            flow.protocol,
            flow.src,
            flow.dst,
            if received { "got" } else { "never saw" },
            if echo {
                if replied {
                    ", echo reply returned"
                } else {
                    ", no echo reply"
                }
            } else {
                ""
            }
        ),
    })
}

impl Engine for NetnsEngine {
    fn name(&self) -> &'static str {
        "netns"
    }

    /// One direction alone: the probe runs for real, and the event of that
    /// direction answers. An ingress decision behind a client whose egress
    /// dropped the packet cannot be observed.
    fn decide(
        &self,
        endpoint: &EndpointKey,
        direction: Direction,
        flow: &Flow,
    ) -> Result<Decision, EngineError> {
        let (from, to) = {
            let inner = self
                .inner
                .lock()
                .map_err(|_| other("engine lock poisoned"))?;
            let peer_of = |ip: IpAddr| match inner.topo.owner(&ip) {
                Ok(Owner::Pod(i)) => Peer::Endpoint(inner.topo.pods()[i].key.clone()),
                _ => Peer::Ip(ip),
            };
            match direction {
                Direction::Egress => (Peer::Endpoint(endpoint.clone()), peer_of(flow.dst)),
                Direction::Ingress => (peer_of(flow.src), Peer::Endpoint(endpoint.clone())),
            }
        };
        let o = self.probe(&from, &to, flow)?;
        let d = match direction {
            Direction::Egress => o.egress,
            Direction::Ingress => o.ingress,
        };
        d.ok_or_else(|| {
            EngineError::Unavailable(format!(
                "{endpoint}'s {direction:?} decision is not observable: the client's egress dropped the packet first"
            ))
        })
    }

    fn connection(
        &self,
        _cluster: &Cluster,
        from: &Peer,
        to: &Peer,
        flow: &Flow,
    ) -> Result<ProbeOutcome, EngineError> {
        self.probe(from, to, flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_checksum_matches_rfc1071_example() {
        // RFC 1071 section 3's example words sum to 0xddf2; the checksum is its complement.
        let b = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&b), !0xddf2);
    }

    #[test]
    fn port_protocol_payload_starts_with_ports() {
        let flow = Flow::ports(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            Protocol(136),
            40000,
            9000,
        );
        let m = raw_payload(&flow, 7, &[1; 8]);
        assert_eq!(&m[0..4], &[0x9c, 0x40, 0x23, 0x28]);
        assert!(m.ends_with(&[1; 8]));
    }
}
