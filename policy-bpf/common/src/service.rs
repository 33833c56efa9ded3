//! Service load balancing as map entries, and the first-packet decision
//! over them: which frontend a packet hit, DROP/REJECT, which backend
//! range it may go to and whether it is masqueraded. The kernel program
//! and the user-space `maps` engine run this same function over the same
//! entries (the maps behind [`ServiceMaps`]).

/// Address family codes.
pub const FAMILY_V4: u8 = 4;
/// IPv6.
pub const FAMILY_V6: u8 = 6;

/// Frontend kinds.
pub const FRONTEND_CLUSTER_IP: u8 = 0;
/// An external IP of the Service.
pub const FRONTEND_EXTERNAL_IP: u8 = 1;
/// A LoadBalancer ingress IP.
pub const FRONTEND_LOAD_BALANCER: u8 = 2;
/// A NodePort on one of the node's NodePort addresses.
pub const FRONTEND_NODE_PORT: u8 = 3;

/// Service flag: some endpoint is usable somewhere (else REJECT).
pub const SVC_HAS_ANY: u16 = 1;
/// `internalTrafficPolicy: Local`.
pub const SVC_INTERNAL_LOCAL: u16 = 2;
/// `externalTrafficPolicy: Local`.
pub const SVC_EXTERNAL_LOCAL: u16 = 4;
/// `loadBalancerSourceRanges` is set.
pub const SVC_SOURCE_RANGES: u16 = 8;

/// Address flag: a pod address (inside the cluster CIDRs).
pub const ADDR_POD: u32 = 1;
/// Address flag: one of this node's own addresses (loopback included).
pub const ADDR_NODE_LOCAL: u32 = 2;
/// Address flag: inside the service CIDRs.
pub const ADDR_SERVICE_CIDR: u32 = 4;
/// Address flag: an active ClusterIP.
pub const ADDR_CLUSTER_IP: u32 = 8;

/// Source-range flag: inside `loadBalancerSourceRanges`.
pub const RANGE_ALLOWED: u8 = 1;
/// Source-range flag: one of the Service's own LB IPs (hairpin via the LB).
pub const RANGE_LB_IP: u8 = 2;

/// Config flag: masquerade all ClusterIP traffic.
pub const CONFIG_MASQUERADE_ALL: u32 = 1;
/// Config flag: an IPv4 local-traffic detector (cluster CIDRs) exists.
pub const CONFIG_DETECTOR_V4: u32 = 2;
/// Config flag: an IPv6 local-traffic detector exists.
pub const CONFIG_DETECTOR_V6: u32 = 4;
/// Config flag: some Service is programmed (only then do the policy
/// programs hand allowed packets on for reply translation).
pub const CONFIG_ENABLED: u32 = 8;
/// [`ServiceConfig::ranges`] holds every service range of the node (there
/// were at most [`SERVICE_RANGES`]): an address outside them that is not a
/// frontend's needs no address lookup.
pub const CONFIG_RANGES_KNOWN: u32 = 16;
/// Service ranges [`ServiceConfig`] holds.
pub const SERVICE_RANGES: usize = 4;

/// A service range (a `--service-cidr`) as the programs test it: an
/// address in map form, read as four native words, is in it when its
/// words masked equal `net`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceRange {
    pub net: [u32; 4],
    pub mask: [u32; 4],
    /// 0: an unused slot.
    pub family: u8,
    pub pad: [u8; 3],
}

impl ServiceRange {
    /// Whether the address `addr` (map form) of `family` is in the range.
    #[inline(always)]
    pub fn contains(&self, family: u8, addr: &[u8; 16]) -> bool {
        let word = |i: usize| {
            u32::from_ne_bytes([
                addr[4 * i],
                addr[4 * i + 1],
                addr[4 * i + 2],
                addr[4 * i + 3],
            ])
        };
        self.family == family
            && word(0) & self.mask[0] == self.net[0]
            && word(1) & self.mask[1] == self.net[1]
            && word(2) & self.mask[2] == self.net[2]
            && word(3) & self.mask[3] == self.net[3]
    }
}

/// Slots of the tail-call table (`PALISADE_DELIVER`): local delivery.
pub const DELIVER_LOCAL: u32 = 0;
/// A packet policy allowed, for reply translation, then on its way.
pub const DELIVER_REPLY_NAT: u32 = 1;
/// A packet policy allowed for local delivery, for reply translation,
/// then handed over.
pub const DELIVER_REPLY_NAT_LOCAL: u32 = 2;
/// Entries of the tail-call table.
pub const DELIVER_SLOTS: u32 = 3;

/// Why a packet is dropped.
pub const DROP_SOURCE_RANGE: u8 = 1;
/// eTP=Local, no local endpoint.
pub const DROP_NO_LOCAL_ENDPOINT: u8 = 2;
/// iTP=Local, no local endpoint.
pub const DROP_NO_LOCAL_ENDPOINT_INTERNAL: u8 = 3;
/// Unallocated address in the service CIDRs.
pub const DROP_UNALLOCATED: u8 = 4;
/// Why a packet is rejected: no usable endpoint anywhere.
pub const REJECT_NO_ENDPOINTS: u8 = 1;
/// An active ClusterIP on a port or protocol the Service lacks.
pub const REJECT_UNKNOWN_PORT: u8 = 2;

/// A frontend: (address, port, protocol, family). IPv4 addresses fill the
/// first four bytes, the rest zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

/// What a frontend leads to: its Service port, whole. The port's values
/// sit in every frontend of it rather than in an array of their own, so
/// a new connection reads one entry before its backend, not two (each a
/// cache miss once Services outnumber the cache).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrontendValue {
    /// The Service port's number, the key of its source ranges and
    /// affinities.
    pub service: u32,
    /// A `FRONTEND_*` kind.
    pub kind: u8,
    pub pad: [u8; 3],
    /// The Service port's backends and flags.
    pub port: ServiceValue,
}

/// One Service port: its backend ranges in the backend array.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// First Cluster-policy backend.
    pub cluster_first: u32,
    /// First Local-policy backend.
    pub local_first: u32,
    pub cluster_count: u16,
    pub local_count: u16,
    /// `SVC_*` flags.
    pub flags: u16,
    pub pad: u16,
    /// `sessionAffinity: ClientIP` timeout; 0 for none.
    pub affinity_seconds: u32,
}

/// One backend (endpoint address and port).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub pad: u8,
}

/// The node's service configuration.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceConfig {
    /// Primary IPv4 address (checked against source ranges for the node's own traffic).
    pub primary_v4: [u8; 16],
    /// Primary IPv6 address.
    pub primary_v6: [u8; 16],
    /// `CONFIG_*` flags.
    pub flags: u32,
    pub pad: u32,
    /// The service ranges, when [`CONFIG_RANGES_KNOWN`].
    pub ranges: [ServiceRange; SERVICE_RANGES],
}

/// A new connection's first packet, as the service lookup reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServicePacket {
    pub family: u8,
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub protocol: u8,
    pub port: u16,
}

/// The lookups the decision makes (maps in the kernel, tables in user space).
pub trait ServiceMaps {
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue>;
    /// The configuration's `CONFIG_*` flags.
    fn config_flags(&self) -> u32;
    /// The node's primary address of a family (map form). Apart from
    /// the flags: a whole configuration copied costs the socket hooks
    /// stack they do not have.
    fn primary(&self, family: u8) -> [u8; 16];
    /// `ADDR_*` flags of an address (longest prefix, flags of covering prefixes included).
    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32;
    /// [`ServiceMaps::address_flags`] of a destination no frontend serves
    /// on its port, as far as the decision reads them (an active ClusterIP,
    /// a service range): maps that know the address can be neither (not a
    /// frontend's address, outside every range) skip the lookup.
    fn unserved_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        self.address_flags(family, addr)
    }
    /// `RANGE_*` flags of a source for a Service (longest prefix, as above).
    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8;
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceAction {
    /// DNAT to a backend of `count` starting at `first`.
    Forward {
        service: u32,
        kind: u8,
        first: u32,
        count: u16,
        /// The traffic policy masquerades (hairpin comes on top, per backend).
        masquerade: bool,
        affinity_seconds: u32,
    },
    /// A `DROP_*` reason.
    Drop(u8),
    /// A `REJECT_*` reason.
    Reject(u8),
    /// Not service traffic.
    Pass,
}

/// Decision verdicts of [`ServiceDecision`].
pub const DECISION_PASS: u8 = 0;
/// Drop.
pub const DECISION_DROP: u8 = 1;
/// Reject.
pub const DECISION_REJECT: u8 = 2;
/// Forward to a backend.
pub const DECISION_FORWARD: u8 = 3;

/// A [`ServiceAction`] with every field set, to keep in memory: the
/// kernel program stores it in its scratch, where an enum's unset
/// payload would be written from registers the verifier calls
/// uninitialised.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceDecision {
    pub service: u32,
    pub first: u32,
    pub affinity_seconds: u32,
    pub count: u16,
    /// A `DECISION_*` verdict.
    pub verdict: u8,
    pub masquerade: u8,
}

impl ServiceDecision {
    /// The decision of an action.
    #[inline(always)]
    pub fn of(action: ServiceAction) -> ServiceDecision {
        let verdict = |verdict| ServiceDecision {
            verdict,
            ..ServiceDecision::default()
        };
        match action {
            ServiceAction::Pass => verdict(DECISION_PASS),
            ServiceAction::Drop(_) => verdict(DECISION_DROP),
            ServiceAction::Reject(_) => verdict(DECISION_REJECT),
            ServiceAction::Forward {
                service,
                first,
                count,
                masquerade,
                affinity_seconds,
                ..
            } => ServiceDecision {
                service,
                first,
                affinity_seconds,
                count,
                verdict: DECISION_FORWARD,
                masquerade: u8::from(masquerade),
            },
        }
    }
}

/// Decides a connection's first packet.
// Inlined in the kernel: with an out-of-line copy shared by the two socket
// hooks, the object failed to load ("missing btf func_info" in the policy
// programs' subprograms).
#[cfg_attr(target_arch = "bpf", inline(always))]
pub fn service_decide<M: ServiceMaps>(p: &ServicePacket, maps: &M) -> ServiceAction {
    let key = FrontendKey {
        addr: p.destination,
        port: p.port,
        protocol: p.protocol,
        family: p.family,
    };
    let Some(fe) = maps.frontend(&key) else {
        let flags = maps.unserved_flags(p.family, &p.destination);
        if flags & ADDR_CLUSTER_IP != 0 {
            return ServiceAction::Reject(REJECT_UNKNOWN_PORT);
        }
        if flags & ADDR_SERVICE_CIDR != 0 {
            return ServiceAction::Drop(DROP_UNALLOCATED);
        }
        return ServiceAction::Pass;
    };
    let svc = fe.port;
    let config_flags = maps.config_flags();
    let source_flags = maps.address_flags(p.family, &p.source);
    let node_local = source_flags & ADDR_NODE_LOCAL != 0;
    if fe.kind == FRONTEND_LOAD_BALANCER && svc.flags & SVC_SOURCE_RANGES != 0 {
        // The node's own connections leave from its primary address.
        let checked = if node_local {
            maps.primary(p.family)
        } else {
            p.source
        };
        let in_range = maps.source_range(fe.service, p.family, &checked) & RANGE_ALLOWED != 0;
        let from_lb = maps.source_range(fe.service, p.family, &p.source) & RANGE_LB_IP != 0;
        if !in_range && !from_lb {
            return ServiceAction::Drop(DROP_SOURCE_RANGE);
        }
    }
    if svc.flags & SVC_HAS_ANY == 0 {
        return ServiceAction::Reject(REJECT_NO_ENDPOINTS);
    }
    let detector = config_flags
        & if p.family == FAMILY_V4 {
            CONFIG_DETECTOR_V4
        } else {
            CONFIG_DETECTOR_V6
        }
        != 0;
    let pod = detector && source_flags & ADDR_POD != 0;
    let cluster = (svc.cluster_first, svc.cluster_count);
    let local = (svc.local_first, svc.local_count);
    let ((first, count), masquerade) = if fe.kind == FRONTEND_CLUSTER_IP {
        let masq = config_flags & CONFIG_MASQUERADE_ALL != 0 || (detector && !pod);
        if svc.flags & SVC_INTERNAL_LOCAL != 0 {
            if local.1 == 0 {
                return ServiceAction::Drop(DROP_NO_LOCAL_ENDPOINT_INTERNAL);
            }
            (local, masq)
        } else {
            (cluster, masq)
        }
    } else if svc.flags & SVC_EXTERNAL_LOCAL == 0 {
        (cluster, true)
    } else if pod && cluster.1 > 0 {
        // Pods short-circuit to every endpoint, unmasqueraded.
        (cluster, false)
    } else if node_local && cluster.1 > 0 {
        (cluster, true)
    } else {
        if local.1 == 0 {
            return ServiceAction::Drop(DROP_NO_LOCAL_ENDPOINT);
        }
        (local, false)
    };
    ServiceAction::Forward {
        service: fe.service,
        kind: fe.kind,
        first,
        count,
        masquerade,
        affinity_seconds: svc.affinity_seconds,
    }
}

/// Key of the address trie: the family word, then the address; a prefix
/// of `n` bits is `ADDR_KEY_BITS + n` bits of key.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvcAddrKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Bits of [`SvcAddrKey`] before the address.
pub const ADDR_KEY_BITS: u32 = 32;

/// Key of the source-range trie: the Service (big-endian), the family
/// word, then the address; a prefix of `n` bits is `RANGE_KEY_BITS + n`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvcRangeKey {
    pub service: [u8; 4],
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Bits of [`SvcRangeKey`] before the address.
pub const RANGE_KEY_BITS: u32 = 64;

/// The address filter (`PALISADE_SVC_FILTER`): a bit per hashed address
/// in two halves, [`FILTER_FRONTENDS`] (every frontend address) and
/// [`FILTER_BACKENDS`] (every backend address). A NAT entry names a
/// frontend as the destination of its forward key and a backend in its
/// other keys, so a packet whose addresses have no bit set in the half
/// they would need cannot have an entry or a frontend: the program
/// skips those hash lookups (cold buckets of large tables) for the
/// traffic that is not balanced. Bits are only ever set while the pins
/// live (a removed backend may still have connections, whose replies
/// need their entries found); a stale or colliding bit only costs the
/// lookups it would have saved.
pub const ADDR_FILTER_BITS_LOG2: u32 = 21;
/// The frontends' half of the filter.
pub const FILTER_FRONTENDS: u32 = 0;
/// The backends' half of the filter.
pub const FILTER_BACKENDS: u32 = 1;
/// Words of the filter (both halves).
pub const ADDR_FILTER_WORDS: u32 = 2 << (ADDR_FILTER_BITS_LOG2 - 6);

/// The word and bit of an address in one half of the filter: the
/// address folded to 32 bits (big-endian words, so the varying low
/// octets of nearby addresses stay low), mixed (murmur3's finaliser),
/// its top bits taken.
#[inline(always)]
pub fn addr_filter_bit(half: u32, family: u8, addr: &[u8; 16]) -> (u32, u64) {
    let word = |i: usize| {
        u32::from_be_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ])
    };
    let mut x = if family == FAMILY_V4 {
        word(0)
    } else {
        word(0)
            ^ word(1).rotate_left(8)
            ^ word(2).rotate_left(16)
            ^ word(3).rotate_left(24)
            ^ 0x9e37_79b9
    };
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    let bit = (half << ADDR_FILTER_BITS_LOG2) | (x >> (32 - ADDR_FILTER_BITS_LOG2));
    (bit >> 6, 1u64 << (bit & 63))
}

/// A connection's addresses as one direction of it is seen on the wire.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct NatTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub pad: u16,
}

impl NatTuple {
    /// The tuple of this packet once `v` rewrote it.
    #[inline(always)]
    pub fn rewritten(&self, v: &NatValue) -> NatTuple {
        NatTuple {
            src: v.src,
            dst: v.dst,
            src_port: v.src_port,
            dst_port: v.dst_port,
            protocol: self.protocol,
            family: self.family,
            pad: 0,
        }
    }

    /// The other direction's tuple.
    #[inline(always)]
    pub fn reversed(&self) -> NatTuple {
        NatTuple {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
            family: self.family,
            pad: 0,
        }
    }
}

/// A NAT entry's rewrite: a packet whose tuple is the key leaves with
/// these addresses and ports. A translated connection has two entries,
/// four when masqueraded: on the way out, DNAT (client → frontend
/// becomes client → backend) before policy and SNAT (client → backend
/// becomes node → backend) after it; on the way back, the SNAT undone
/// (backend → node becomes backend → client) before policy and the
/// frontend restored (backend → client becomes frontend → client) after.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatValue {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// `NAT_*` flags.
    pub flags: u32,
    /// The backend index the connection went to (original direction).
    pub backend: u32,
    /// The second of the kernel's coarse monotonic clock when a packet
    /// last met this entry (0: not yet known, as in entries pinned by an
    /// earlier build). UDP: every packet before policy; the sweep ends
    /// flows idle for conntrack's UDP timeouts ([`udp_flow_timeout`]).
    /// TCP: from the entry's first FIN or RST on (0 while open); the
    /// sweep ends connections closed for [`tcp_closed_timeout`].
    pub seen: u32,
}

/// NAT entry flag: a reply-side entry (reply or SNAT undone) that carried
/// a packet: the flow has seen a reply (conntrack's `SEEN_REPLY`).
pub const NAT_REPLIED: u32 = 8;

/// Seconds a UDP flow lives without packets, as the kernel's conntrack
/// keeps it (`nf_conntrack_udp_timeout` and `_stream`): 30 unreplied,
/// 120 once it has seen a reply.
pub const fn udp_flow_timeout(replied: bool) -> u32 {
    if replied { 120 } else { 30 }
}

/// NAT entry flag (TCP): a FIN met this entry, so its direction of the
/// connection is closed (conntrack's `CLOSE_INIT` for that direction).
pub const NAT_FIN: u32 = 16;
/// NAT entry flag (TCP): an RST met this entry: the connection is over
/// (conntrack's `CLOSE` state). Sequence numbers are not checked.
pub const NAT_RST: u32 = 32;

/// Seconds the kernel's conntrack keeps a TCP connection after its last
/// packet once it has ended: 10 after a reset (`CLOSE`,
/// `nf_conntrack_tcp_timeout_close`), 120 after FINs both ways
/// (`TIME_WAIT`, `nf_conntrack_tcp_timeout_time_wait`).
pub const fn tcp_closed_timeout(reset: bool) -> u32 {
    if reset { 10 } else { 120 }
}

/// Whether a TCP connection whose original-direction entries carry
/// `original` flags and reply-direction entries `reply` flags has ended
/// as conntrack ends one: reset either way (`CLOSE`), or FINs both ways
/// (`TIME_WAIT`). Its entries then time out by [`tcp_closed_timeout`].
pub const fn tcp_closed(original: u32, reply: u32) -> bool {
    (original | reply) & NAT_RST != 0 || (original & reply & NAT_FIN) != 0
}

/// Whether a flow is over as the kernel's conntrack ends one, at second
/// `now`: a UDP flow idle past [`udp_flow_timeout`], a TCP connection
/// [`tcp_closed`] and idle past [`tcp_closed_timeout`]. `original` and
/// `reply` are the flags of its original- and reply-direction entries,
/// `last` the latest clock among them. The agent's sweep and the
/// program (a packet arriving before the sweep) judge by it.
pub const fn flow_over(protocol: u8, original: u32, reply: u32, last: u32, now: u32) -> bool {
    let idle = now.saturating_sub(last);
    let flags = original | reply;
    match protocol {
        17 => idle > udp_flow_timeout(flags & NAT_REPLIED != 0),
        6 => tcp_closed(original, reply) && idle > tcp_closed_timeout(flags & NAT_RST != 0),
        _ => false,
    }
}

/// Whether a SYN from the client on such a connection's tuple opens a
/// new connection (balanced afresh), as conntrack kills an entry in
/// `CLOSE` or `TIME_WAIT` for it when a FIN was seen either way or the
/// client itself reset it; a connection the backend reset without a FIN
/// keeps the SYN (conntrack passes it on the old entry, then resyncs).
pub const fn tcp_reopens(original: u32, reply: u32) -> bool {
    tcp_closed(original, reply) && ((original | reply) & NAT_FIN != 0 || original & NAT_RST != 0)
}

/// NAT entry flag: the reply direction.
pub const NAT_REPLY: u32 = 1;
/// NAT entry flag: the connection is masqueraded.
pub const NAT_MASQUERADE: u32 = 2;
/// NAT entry flag: applied after policy (SNAT on the way out, the
/// frontend restored on the way back); the others before it. Policy
/// sees the client and the backend, as Calico's does.
pub const NAT_AFTER_POLICY: u32 = 4;

/// Key of the ClientIP affinity table: (service, client).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityKey {
    pub service: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub client: [u8; 16],
}

/// A client's backend and when a connection last chose it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AffinityValue {
    /// When the last new connection of the client used the entry (ns, monotonic).
    pub used_ns: u64,
    /// The backend index.
    pub backend: u32,
    pub pad: u32,
    /// The backend itself: an entry whose index now names another backend
    /// (the Service's endpoints changed) is not followed.
    pub value: BackendValue,
}

/// Key of the socket hooks' reverse table: a node socket (by its
/// cookie) and the backend its datagrams or connection were sent to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockReverseKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Network order, as the socket hooks see it.
    pub port: u16,
    pub family: u8,
    pub pad: [u8; 5],
}

/// The frontend a node socket addressed, which `recvmsg()` and
/// `getpeername()` report in place of the backend.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockReverseValue {
    pub addr: [u8; 16],
    /// Network order.
    pub port: u16,
    pub pad: [u8; 2],
    /// The Service port's index, for state cleanup and metrics.
    pub service: u32,
}

/// Where an unconnected node socket's datagrams to a frontend go (key: a
/// [`SockReverseKey`] naming the frontend): the flow conntrack would
/// hold for the socket's port and the frontend, so its datagrams keep
/// one backend while it lives, as behind kube-proxy's DNAT.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockFlowValue {
    pub backend: [u8; 16],
    /// Network order.
    pub backend_port: u16,
    pub family: u8,
    /// [`SOCK_FLOW_REPLIED`] once a datagram came back.
    pub flags: u8,
    /// The second of the kernel's coarse monotonic clock of its last
    /// datagram either way; the flow is over once idle past
    /// [`udp_flow_timeout`].
    pub seen: u32,
}

/// [`SockFlowValue`] flag: the backend answered (conntrack's `SEEN_REPLY`).
pub const SOCK_FLOW_REPLIED: u8 = 1;

/// What a connected socket addressed, kept with the socket (its storage
/// goes with it): the backend it was pointed at and the frontend it asked
/// for, which `getpeername()` and `recvmsg()` report.
///
/// With [`SOCK_PEER_HAIRPIN`] the socket was left addressing the frontend:
/// the `connect()` hook picked the pod itself, a hairpin only the TC
/// program can masquerade, and `frontend.service` holds that backend's
/// index so the TC program takes the same pick (picking again would
/// reach the pod with probability p² instead of p).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockPeer {
    pub backend: [u8; 16],
    /// Network order.
    pub backend_port: u16,
    pub family: u8,
    /// [`SOCK_PEER_HAIRPIN`] or 0 (0 in entries written before the flag).
    pub flags: u8,
    pub frontend: SockReverseValue,
}

/// [`SockPeer::flags`]: the hook picked the pod itself and left the
/// connection to the TC program.
pub const SOCK_PEER_HAIRPIN: u8 = 1;

impl SockPeer {
    /// The backend index a hairpin entry holds for the TC program, when
    /// the entry is one and was made for a connection to `frontend`
    /// (address, port in network order) of `family`.
    pub fn hairpin_backend(&self, family: u8, frontend: &[u8; 16], port_be: u16) -> Option<u32> {
        (self.flags & SOCK_PEER_HAIRPIN != 0
            && self.family == family
            && self.frontend.addr == *frontend
            && self.frontend.port == port_be)
            .then_some(self.frontend.service)
    }
}

/// A network namespace of the node's own sockets (its processes connect
/// from the node's addresses).
pub const SOCK_NETNS_NODE: u8 = 1;
/// A pod's network namespace: its TCP connections are balanced at
/// `connect()` (Calico's `bpfConnectTimeLoadBalancing: TCP`), from the
/// pod's address.
pub const SOCK_NETNS_POD: u8 = 2;
/// [`SockNetns::families`]: the pod has an IPv4 address.
pub const SOCK_NETNS_HAS_V4: u8 = 1;
/// [`SockNetns::families`]: the pod has an IPv6 address.
pub const SOCK_NETNS_HAS_V6: u8 = 2;

/// Whose sockets a network namespace holds, by its cookie: the socket
/// hooks balance only the namespaces listed.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockNetns {
    /// `SOCK_NETNS_NODE` or `SOCK_NETNS_POD`.
    pub kind: u8,
    /// `SOCK_NETNS_HAS_*`: which of a pod's addresses are set.
    pub families: u8,
    pub pad: [u8; 2],
    /// A pod's IPv4 address, in the maps' form (first four bytes).
    pub v4: [u8; 16],
    /// A pod's IPv6 address.
    pub v6: [u8; 16],
}

/// Per-CPU working memory of the service program.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceScratch {
    pub packet: ServicePacket,
    pub tuple: NatTuple,
    pub forward: NatValue,
    pub reply_key: NatTuple,
    pub reply: NatValue,
    /// A masqueraded connection's SNAT (after policy).
    pub snat_key: NatTuple,
    pub snat: NatValue,
    /// Its reverse (before policy).
    pub unsnat_key: NatTuple,
    pub unsnat: NatValue,
    /// The tuple after a first rewrite (for the second, where no policy
    /// program runs between them).
    pub next: NatTuple,
    pub affinity: AffinityKey,
    pub chosen: AffinityValue,
    /// The decision on a new connection, for the translation.
    pub decision: ServiceDecision,
    /// The node's address of the packet's family (masquerade source).
    pub node: [u8; 16],
    /// The Ethernet addresses of a packet being answered.
    pub macs: [u8; 12],
    /// An ICMP error being built.
    pub icmp: IcmpScratch,
}

/// An ICMP error being built: the checksum's pseudo-header (IPv6), the
/// message (ICMP header, then the quoted IP header and 8 bytes of
/// transport header) and the new IP header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpScratch {
    pub pseudo: [u8; 40],
    pub message: [u8; 72],
    pub header: [u8; 40],
}

impl IcmpScratch {
    /// All zero.
    pub const ZERO: IcmpScratch = IcmpScratch {
        pseudo: [0; 40],
        message: [0; 72],
        header: [0; 40],
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_halves_are_apart_and_spread_nearby_addresses() {
        let v4 = |i: u32| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&(0x0a40_0000 + i).to_be_bytes());
            a
        };
        let half = ADDR_FILTER_WORDS / 2;
        // Which words of the frontends' half were hit (no_std: a bitset).
        let mut seen = [0u64; (ADDR_FILTER_WORDS / 2 / 64) as usize];
        for i in 0..4096 {
            let (w, bit) = addr_filter_bit(FILTER_FRONTENDS, FAMILY_V4, &v4(i));
            let (b, _) = addr_filter_bit(FILTER_BACKENDS, FAMILY_V4, &v4(i));
            assert!(w < half && (half..ADDR_FILTER_WORDS).contains(&b));
            assert_eq!(bit.count_ones(), 1);
            seen[(w / 64) as usize] |= 1 << (w % 64);
        }
        // 4,096 consecutive addresses over 32,768 words: nearly all apart.
        let words: u32 = seen.iter().map(|w| w.count_ones()).sum();
        assert!(words > 3800, "{words} words");
        // The family takes part: an IPv6 address with the same leading
        // bytes lands elsewhere.
        assert_ne!(
            addr_filter_bit(FILTER_FRONTENDS, FAMILY_V4, &v4(7)),
            addr_filter_bit(FILTER_FRONTENDS, FAMILY_V6, &v4(7))
        );
    }

    #[test]
    fn a_hairpin_pick_is_followed_only_for_the_frontend_it_was_made_for() {
        let vip = {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[172, 30, 0, 13]);
            a
        };
        let peer = SockPeer {
            backend: [9; 16],
            backend_port: 8080u16.to_be(),
            family: FAMILY_V4,
            flags: SOCK_PEER_HAIRPIN,
            frontend: SockReverseValue {
                addr: vip,
                port: 80u16.to_be(),
                pad: [0; 2],
                service: 41,
            },
        };
        assert_eq!(
            peer.hairpin_backend(FAMILY_V4, &vip, 80u16.to_be()),
            Some(41)
        );
        assert_eq!(peer.hairpin_backend(FAMILY_V4, &vip, 443u16.to_be()), None);
        assert_eq!(peer.hairpin_backend(FAMILY_V6, &vip, 80u16.to_be()), None);
        assert_eq!(
            peer.hairpin_backend(FAMILY_V4, &[0; 16], 80u16.to_be()),
            None
        );
        // A connected socket's peer (written before the flag, or since)
        // is no hairpin.
        let connected = SockPeer { flags: 0, ..peer };
        assert_eq!(
            connected.hairpin_backend(FAMILY_V4, &vip, 80u16.to_be()),
            None
        );
    }
}
