//! The node's own sockets: socket-time load balancing over the service
//! maps `palisade_service` reads, as Calico's and Cilium's eBPF modes do
//! it. `connect()` (cgroup/connect4, connect6) and each unconnected
//! datagram (cgroup/sendmsg4, sendmsg6) are pointed at a backend before
//! any packet exists, so their packets need no NAT. What the socket
//! addressed is kept by socket cookie, so replies' sources (cgroup/
//! recvmsg4, recvmsg6) and `getpeername()` (cgroup/getpeername4,
//! getpeername6) say the Service address, as they do behind kube-proxy's
//! DNAT. An IPv6 socket addressing an IPv4-mapped address (`::ffff:a.b.c.d`,
//! a dual-stack socket reaching IPv4) sends IPv4 packets, which kube-proxy's
//! IPv4 rules would translate: its hooks decide on the IPv4 Services.
//!
//! Only the network namespaces listed in `PALISADE_SOCK_NETNS` are
//! balanced: the node's, from its primary address, and pods', whose TCP
//! connections are pointed at a backend at `connect()` from the pod's
//! address (Calico's `bpfConnectTimeLoadBalancing: TCP`, the default of its
//! eBPF mode): their packets then go straight to the backend, as the TC
//! program would have rewritten them, and policy sees the same backend.
//! What the socket cannot do exactly as kube-proxy does is left to the TC
//! program: a pod's UDP (conntrack's per-flow backend), a connection that
//! is masqueraded (or hairpins back to the pod), refused or dropped.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval};
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;

use super::service::{
    Client, Maps, PALISADE_SVC_ADDRESSES, PALISADE_SVC_CONFIG, PALISADE_SVC_SOURCE_RANGES, TCP,
    now_seconds, pick,
};
use super::sock_peer::PALISADE_SOCK_PEER;
use super::*;

/// What each unconnected socket's datagrams addressed, by (cookie,
/// backend). An LRU: a socket's cookie is never reused, so entries of
/// closed sockets are only ever evicted.
#[map]
static PALISADE_SOCK_REVERSE: LruHashMap<SockReverseKey, SockReverseValue> =
    LruHashMap::pinned(65_536, 0);

/// The backend of each unconnected socket's UDP flow to a frontend, by
/// (cookie, frontend): its datagrams keep it while the flow lives, as
/// conntrack keeps one behind kube-proxy. An LRU: entries of closed
/// sockets age out; user space forgets flows whose backend a new table no
/// longer keeps.
#[map]
static PALISADE_SOCK_FLOWS: LruHashMap<SockReverseKey, SockFlowValue> =
    LruHashMap::pinned(65_536, 0);

/// The network namespaces whose sockets are balanced, by netns cookie:
/// the node's, written with the hooks, and pods', written as they are
/// networked. An LRU: a cookie is never reused, so the entry of a pod
/// whose removal was missed only ages out.
#[map]
static PALISADE_SOCK_NETNS: LruHashMap<u64, SockNetns> = LruHashMap::pinned(65_536, 0);

/// The service maps with the tries' keys on the stack, for the socket
/// hooks: they run in process context, where a softirq's TC program may
/// take this CPU's key memory in the middle of a lookup.
struct SockMaps;

impl ServiceMaps for SockMaps {
    #[inline(always)]
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue> {
        Maps.frontend(key)
    }

    #[inline(always)]
    fn config_flags(&self) -> u32 {
        Maps.config_flags()
    }

    #[inline(always)]
    fn primary(&self, family: u8) -> [u8; 16] {
        Maps.primary(family)
    }

    // Not inlined: each trie key lives in its own small frame, not in
    // the decision's.
    #[inline(never)]
    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        let key = Key::new(
            ADDR_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 },
            SvcAddrKey {
                family,
                pad: [0; 3],
                addr: *addr,
            },
        );
        PALISADE_SVC_ADDRESSES.get(&key).copied().unwrap_or(0)
    }

    #[inline(never)]
    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8 {
        let key = Key::new(
            RANGE_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 },
            SvcRangeKey {
                service: service.to_be_bytes(),
                family,
                pad: [0; 3],
                addr: *addr,
            },
        );
        PALISADE_SVC_SOURCE_RANGES.get(&key).copied().unwrap_or(0)
    }
}

/// `connect()` of the node's own sockets (cgroup/connect4 and connect6):
/// connect-time load balancing. A connection to a frontend is pointed at
/// its backend before it exists, so its packets need no NAT.
/// REJECT fails `connect()` with ECONNREFUSED, as kube-proxy's ICMP
/// would; DROP with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn palisade_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, FAMILY_V4, true)
}

/// [`palisade_connect4`] for IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn palisade_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, FAMILY_V6, true)
}

/// Each datagram of an unconnected UDP socket (cgroup/sendmsg4 and
/// sendmsg6): balanced as `connect()` is, once per flow (the socket and
/// the frontend): its later datagrams keep the backend while the flow
/// lives (`PALISADE_SOCK_FLOWS`), as conntrack keeps a flow's.
#[cgroup_sock_addr(sendmsg4)]
pub fn palisade_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, FAMILY_V4, false)
}

/// [`palisade_sendmsg4`] for IPv6 sockets.
#[cgroup_sock_addr(sendmsg6)]
pub fn palisade_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, FAMILY_V6, false)
}

/// A received datagram's source (cgroup/recvmsg4 and recvmsg6): a
/// backend this socket addressed as a frontend is reported as that
/// frontend, so a client that checks who answered (a DNS resolver)
/// accepts the reply.
#[cgroup_sock_addr(recvmsg4)]
pub fn palisade_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_V4)
}

/// [`palisade_recvmsg4`] for IPv6 sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn palisade_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_V6)
}

/// `getpeername()` (cgroup/getpeername4 and getpeername6): a socket
/// connected through a frontend names the frontend as its peer.
#[cgroup_sock_addr(getpeername4)]
pub fn palisade_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_V4)
}

/// [`palisade_getpeername4`] for IPv6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn palisade_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, FAMILY_V6)
}

/// The call goes on, with the address as it is now (recvmsg and
/// getpeername hooks must return it).
const SOCK_ALLOW: i32 = 1;
/// The call is refused.
const SOCK_REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The address and port in the context (the destination of connect and
/// sendmsg, the peer of recvmsg and getpeername), as 16 map bytes and the
/// port in network order. The context allows only 4-byte accesses to
/// these fields: one volatile read per word.
#[inline(always)]
fn sock_address(sa: *mut bpf_sock_addr, family: u8) -> ([u8; 16], u16) {
    let mut out = [0u8; 16];
    // SAFETY: the kernel's context of this run; its address fields are
    // readable in every sock_addr hook, word by word.
    let port = unsafe {
        if family == FAMILY_V4 {
            let w = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            out[..4].copy_from_slice(&w.to_ne_bytes());
        } else {
            for i in 0..4 {
                let w = core::ptr::read_volatile(&raw const (*sa).user_ip6[i]);
                out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
        core::ptr::read_volatile(&raw const (*sa).user_port)
    };
    // `user_port` holds the port in network order in its low bytes.
    (out, port as u16)
}

/// Writes `addr` and `port` (network order) into the context.
#[inline(always)]
fn set_sock_address(sa: *mut bpf_sock_addr, family: u8, addr: &[u8; 16], port: u16) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    // SAFETY: connect, sendmsg, recvmsg and getpeername hooks may write
    // the address and port, word by word.
    unsafe {
        if family == FAMILY_V4 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, word(0));
        } else {
            for i in 0..4 {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], word(i * 4));
            }
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(port));
    }
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a helper sock_addr programs may call with their context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Points a socket's connection (`connect`) or datagram at a backend
/// when it addresses a frontend, and records what it addressed.
///
/// Three frames, so that each fits the 512 bytes the verifier allows a
/// call chain: this one (the reverse entry), then [`decide`] (the
/// service lookup) and [`pick_backend`] (ClientIP affinity and the pick),
/// never live together. One instance of each per family: the other
/// family's paths fall away, as they do inlined.
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value the entry would be copied again onto a full stack"
)]
#[inline(always)]
fn translate(ctx: &SockAddrContext, family: u8, connect: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: a helper sock_addr programs may call with their context.
    let netns = unsafe { bpf_get_netns_cookie(sa.cast()) };
    // SAFETY: the entry is only read, in place, during this run (RCU).
    let Some(ns) = (unsafe { PALISADE_SOCK_NETNS.get(&netns) }) else {
        return SOCK_ALLOW;
    };
    if ns.kind == SOCK_NETNS_POD {
        // SAFETY: as in `sock_address`.
        let protocol = unsafe { core::ptr::read_volatile(&raw const (*sa).protocol) };
        if !connect || protocol != u32::from(TCP) {
            return SOCK_ALLOW;
        }
    } else if ns.kind != SOCK_NETNS_NODE {
        return SOCK_ALLOW;
    }
    // The key: (this socket, the backend); the value: the frontend.
    let mut entry = (SockReverseKey::default(), SockReverseValue::default());
    let mut forward = Forward::default();
    let mut index = 0;
    let verdict = if family == FAMILY_V4 {
        decide::<FAMILY_V4>(sa, ns, &mut entry.1, &mut forward)
    } else {
        decide::<FAMILY_V6>(sa, ns, &mut entry.1, &mut forward)
    };
    if verdict != FORWARD {
        return verdict;
    }
    // An IPv4-mapped frontend has IPv4 backends.
    let backends = if forward.mapped { FAMILY_V4 } else { family };
    // An unconnected socket's datagram: its flow's backend, while it lives.
    let cookie = if connect { 0 } else { socket_cookie(ctx) };
    let picked = if !connect && flow_backend(cookie, backends, &entry.1, &mut entry.0) {
        PICKED_BACKEND
    } else {
        let picked = if backends == FAMILY_V4 {
            pick_backend::<FAMILY_V4>(ns, &forward, &mut entry.0, &mut index)
        } else {
            pick_backend::<FAMILY_V6>(ns, &forward, &mut entry.0, &mut index)
        };
        if !connect && picked == PICKED_BACKEND {
            record_flow(cookie, &entry.1, &entry.0);
        }
        picked
    };
    if picked == PICKED_NONE {
        return SOCK_ALLOW;
    }
    // The pod itself: the socket stays addressed to the frontend, the TC
    // program masquerades the hairpin and takes this pick (the backend's
    // index, in the storage) rather than picking again.
    let hairpin = picked == PICKED_SELF;
    // Best effort: without the entry the backend's own address is
    // reported, as a direct connection's would be.
    if connect {
        let mut peer = SockPeer {
            backend: entry.0.addr,
            backend_port: entry.0.port,
            family: entry.0.family,
            flags: if hairpin { SOCK_PEER_HAIRPIN } else { 0 },
            frontend: if hairpin {
                SockReverseValue {
                    service: index,
                    ..entry.1
                }
            } else {
                entry.1
            },
        };
        // SAFETY: the context's socket, which the helper takes; the
        // storage it returns is this socket's, written whole here.
        unsafe {
            let p = PALISADE_SOCK_PEER.get(ctx, Some(&mut peer));
            if !p.is_null() {
                *p = peer;
            }
        }
    } else if !hairpin {
        entry.0.cookie = cookie;
        let _ = PALISADE_SOCK_REVERSE.insert(&entry.0, &entry.1, 0);
    }
    if hairpin {
        return SOCK_ALLOW;
    }
    if forward.mapped {
        set_sock_address(sa, family, &v4_mapped(&entry.0.addr), entry.0.port);
    } else {
        set_sock_address(sa, family, &entry.0.addr, entry.0.port);
    }
    stat(Statistic::ServiceTranslated);
    SOCK_ALLOW
}

/// The key of socket `cookie`'s flow to `frontend` (backends of `family`).
#[inline(always)]
fn flow_key(cookie: u64, family: u8, frontend: &SockReverseValue) -> SockReverseKey {
    SockReverseKey {
        cookie,
        addr: frontend.addr,
        port: frontend.port,
        family,
        pad: [0; 5],
    }
}

/// The backend of socket `cookie`'s UDP flow to `frontend`, into
/// `backend`, when the flow lives (a datagram either way within
/// conntrack's UDP timeout); its clock moves on. False for a new flow.
#[inline(never)]
fn flow_backend(
    cookie: u64,
    family: u8,
    frontend: &SockReverseValue,
    backend: &mut SockReverseKey,
) -> bool {
    let Some(flow) = PALISADE_SOCK_FLOWS.get_ptr_mut(flow_key(cookie, family, frontend)) else {
        return false;
    };
    // SAFETY: a map value stays valid for the rest of this run (RCU);
    // concurrent datagrams of the socket write the same values.
    let flow = unsafe { &mut *flow };
    let now = now_seconds();
    let replied = flow.flags & SOCK_FLOW_REPLIED != 0;
    if flow.family != family || now.saturating_sub(flow.seen) > udp_flow_timeout(replied) {
        return false;
    }
    if flow.seen != now {
        flow.seen = now;
    }
    backend.addr = flow.backend;
    backend.port = flow.backend_port;
    backend.family = family;
    true
}

/// Records socket `cookie`'s new UDP flow to `frontend`, to `backend`.
#[inline(never)]
fn record_flow(cookie: u64, frontend: &SockReverseValue, backend: &SockReverseKey) {
    let flow = SockFlowValue {
        backend: backend.addr,
        backend_port: backend.port,
        family: backend.family,
        flags: 0,
        seen: now_seconds(),
    };
    let key = flow_key(cookie, backend.family, frontend);
    let _ = PALISADE_SOCK_FLOWS.insert(key, flow, 0);
}

/// A datagram from the backend of socket `cookie`'s flow to `frontend`:
/// the flow has seen a reply (conntrack's 120 s) and its clock moves on.
#[inline(never)]
fn flow_replied(cookie: u64, family: u8, frontend: &SockReverseValue) {
    let Some(flow) = PALISADE_SOCK_FLOWS.get_ptr_mut(flow_key(cookie, family, frontend)) else {
        return;
    };
    // SAFETY: as in `flow_backend`.
    let flow = unsafe { &mut *flow };
    let now = now_seconds();
    if flow.seen != now {
        flow.seen = now;
    }
    if flow.flags & SOCK_FLOW_REPLIED == 0 {
        flow.flags |= SOCK_FLOW_REPLIED;
    }
}

/// [`decide`]'s verdict for a frontend with backends.
const FORWARD: i32 = 2;

/// A frontend's backends, as [`decide`] found them.
#[derive(Default)]
struct Forward {
    service: u32,
    first: u32,
    count: u16,
    affinity_seconds: u32,
    /// An IPv6 socket addressed an IPv4-mapped frontend: the backend is
    /// IPv4 and goes back mapped.
    mapped: bool,
}

/// Turns an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) into the IPv4
/// address it holds, in the maps' form (first four bytes); false, and
/// `addr` unchanged, for any other address.
#[inline(always)]
fn unmap_v4(addr: &mut [u8; 16]) -> bool {
    if addr[..10] != [0; 10] || addr[10] != 0xff || addr[11] != 0xff {
        return false;
    }
    addr.copy_within(12..16, 0);
    addr[4..].fill(0);
    true
}

/// An IPv4 address in the maps' form as an IPv4-mapped IPv6 address.
#[inline(always)]
fn v4_mapped(addr: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[10] = 0xff;
    out[11] = 0xff;
    out[12..].copy_from_slice(&addr[..4]);
    out
}

/// The service decision for the address a socket of namespace `ns`
/// addresses: FORWARD (the frontend in `frontend`, its backends in
/// `forward`), or the hook's return code. A pod's connection that is not
/// simply forwarded (masqueraded, refused, dropped) is left to the TC
/// program, which does it on the wire as kube-proxy does.
#[inline(never)]
fn decide<const FAMILY: u8>(
    sa: *mut bpf_sock_addr,
    ns: &SockNetns,
    frontend: &mut SockReverseValue,
    forward: &mut Forward,
) -> i32 {
    // SAFETY: as in `sock_address`.
    let protocol = unsafe { core::ptr::read_volatile(&raw const (*sa).protocol) };
    // Read in place: a copy of the whole configuration costs stack.
    let Some(config) = PALISADE_SVC_CONFIG.get(0) else {
        return SOCK_ALLOW;
    };
    if config.flags & CONFIG_ENABLED == 0 {
        return SOCK_ALLOW;
    }
    let (destination, port) = sock_address(sa, FAMILY);
    let Some(source) = client_source::<FAMILY>(ns, config) else {
        return SOCK_ALLOW;
    };
    let mut packet = ServicePacket {
        family: FAMILY,
        source,
        destination,
        protocol: protocol as u8,
        port: u16::from_be(port),
    };
    // In place: another copy of the addresses would not fit the stack.
    let mapped = FAMILY == FAMILY_V6 && unmap_v4(&mut packet.destination);
    if mapped {
        let Some(source) = client_source::<FAMILY_V4>(ns, config) else {
            return SOCK_ALLOW;
        };
        packet.family = FAMILY_V4;
        packet.source = source;
    }
    let pod = ns.kind == SOCK_NETNS_POD;
    match service_decide(&packet, &SockMaps) {
        ServiceAction::Forward { masquerade, .. } if pod && masquerade => SOCK_ALLOW,
        ServiceAction::Forward {
            service,
            first,
            count,
            affinity_seconds,
            ..
        } => {
            *forward = Forward {
                service,
                first,
                count,
                affinity_seconds,
                mapped,
            };
            frontend.addr = packet.destination;
            frontend.port = port;
            frontend.service = service;
            FORWARD
        }
        ServiceAction::Reject(_) | ServiceAction::Drop(_) if pod => SOCK_ALLOW,
        ServiceAction::Reject(_) => {
            // SAFETY: a helper cgroup programs may call; the error
            // `connect()` or `sendmsg()` returns instead of EPERM.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            stat(Statistic::ServiceReject);
            SOCK_REFUSE
        }
        ServiceAction::Drop(_) => {
            stat(Statistic::ServiceDrop);
            SOCK_REFUSE
        }
        ServiceAction::Pass => SOCK_ALLOW,
    }
}

/// The address a socket of namespace `ns` connects from, for the
/// decision: the kernel has not chosen a node socket's source yet, so
/// the node's primary address stands for it (the address the backend
/// will see); a pod's is its own. None for a pod without one of this
/// family.
#[inline(always)]
fn client_source<const FAMILY: u8>(ns: &SockNetns, config: &ServiceConfig) -> Option<[u8; 16]> {
    match (ns.kind, FAMILY) {
        (SOCK_NETNS_POD, FAMILY_V4) => (ns.families & SOCK_NETNS_HAS_V4 != 0).then_some(ns.v4),
        (SOCK_NETNS_POD, _) => (ns.families & SOCK_NETNS_HAS_V6 != 0).then_some(ns.v6),
        (_, FAMILY_V4) => Some(config.primary_v4),
        _ => Some(config.primary_v6),
    }
}

/// [`pick_backend`]'s outcomes: no backend of this family, a backend to
/// point the socket at, or the pod itself.
const PICKED_NONE: u8 = 0;
const PICKED_BACKEND: u8 = 1;
const PICKED_SELF: u8 = 2;

/// The backend of `forward` for the client of namespace `ns` (ClientIP
/// affinity first), into `backend` (address and port in network order)
/// and its index into `index`. [`PICKED_SELF`] when a pod would reach
/// itself (a hairpin, which kube-proxy masquerades: the TC program's,
/// told the pick through the socket's storage).
#[inline(never)]
fn pick_backend<const FAMILY: u8>(
    ns: &SockNetns,
    forward: &Forward,
    backend: &mut SockReverseKey,
    index: &mut u32,
) -> u8 {
    let Some(config) = PALISADE_SVC_CONFIG.get(0) else {
        return PICKED_NONE;
    };
    let Some(addr) = client_source::<FAMILY>(ns, config) else {
        return PICKED_NONE;
    };
    let mut affinity = AffinityKey::default();
    let mut picked = AffinityValue::default();
    let client = Client {
        family: FAMILY,
        addr,
    };
    pick(
        &mut affinity,
        &mut picked,
        forward.service,
        &client,
        forward.first,
        forward.count,
        forward.affinity_seconds,
    );
    if picked.value.family != FAMILY {
        return PICKED_NONE;
    }
    backend.addr = picked.value.addr;
    backend.port = picked.value.port.to_be();
    backend.family = FAMILY;
    *index = picked.backend;
    if ns.kind == SOCK_NETNS_POD && picked.value.addr == addr {
        return PICKED_SELF;
    }
    PICKED_BACKEND
}

/// Reports a backend this socket addressed through a frontend as the
/// frontend.
#[inline(always)]
fn restore(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa = ctx.sock_addr;
    let (addr, port) = sock_address(sa, family);
    let mut key = SockReverseKey {
        cookie: socket_cookie(ctx),
        addr,
        port,
        family,
        pad: [0; 5],
    };
    // An IPv4 backend of an IPv6 socket was recorded in IPv4 form.
    let mapped = family == FAMILY_V6 && unmap_v4(&mut key.addr);
    if mapped {
        key.family = FAMILY_V4;
    }
    // A connected socket's peer first, then an unconnected one's datagrams.
    // SAFETY: the context's socket; its storage is copied out at once.
    let peer = unsafe { PALISADE_SOCK_PEER.get(ctx, None).as_ref() }
        .copied()
        .filter(|p| {
            p.flags & SOCK_PEER_HAIRPIN == 0
                && p.backend == key.addr
                && p.backend_port == key.port
                && p.family == key.family
        })
        .map(|p| p.frontend);
    let frontend = peer.or_else(|| {
        // SAFETY: the entry is copied out at once.
        let datagram = unsafe { PALISADE_SOCK_REVERSE.get(key) }.copied();
        if let Some(frontend) = &datagram {
            flow_replied(key.cookie, key.family, frontend);
        }
        datagram
    });
    if let Some(frontend) = frontend {
        if mapped {
            set_sock_address(sa, family, &v4_mapped(&frontend.addr), frontend.port);
        } else {
            set_sock_address(sa, family, &frontend.addr, frontend.port);
        }
    }
    SOCK_ALLOW
}
