//! Names of the pinned maps, spelled once for user space. The kernel
//! program declares each as a `static` of the same name (aya names a map
//! after its static); `policy-bpf` checks at build-test time that the
//! compiled object defines exactly [`ALL`] plus the unpinned scratch maps.

/// Decision program nodes.
pub const NODES: &str = "PALISADE_NODES";
/// Program roots by (interface, direction, address).
pub const SLOTS: &str = "PALISADE_SLOTS";
/// Managed interfaces by ifindex, direct table.
pub const IFACES: &str = "PALISADE_IFACES";
/// Managed interfaces past the direct table.
pub const MANAGED: &str = "PALISADE_MANAGED";
/// One IPv4 slot per interface and direction.
pub const LOCAL4: &str = "PALISADE_LOCAL4";
/// IPv4 peer classes by prefix.
pub const LPM4: &str = "PALISADE_LPM4";
/// IPv6 peer classes by prefix.
pub const LPM6: &str = "PALISADE_LPM6";
/// Identity membership rows.
pub const IDWORDS: &str = "PALISADE_IDWORDS";
/// Address-class membership rows.
pub const CLASSWORDS: &str = "PALISADE_CLASSWORDS";
/// Where the membership rows are.
pub const LAYOUT: &str = "PALISADE_LAYOUT";
/// IPv4 conntrack entries.
pub const CONN4: &str = "PALISADE_CONN4";
/// State words of the IPv4 ways.
pub const CTTAG4: &str = "PALISADE_CTTAG4";
/// IPv6 conntrack entries.
pub const CONN6: &str = "PALISADE_CONN6";
/// State words of the IPv6 ways.
pub const CTTAG6: &str = "PALISADE_CTTAG6";
/// Conntrack log heads.
pub const CTHEAD: &str = "PALISADE_CTHEAD";
/// Owners of the IPv4 log entries.
pub const CTOWN4: &str = "PALISADE_CTOWN4";
/// Owners of the IPv6 log entries.
pub const CTOWN6: &str = "PALISADE_CTOWN6";
/// First-fragment verdicts.
pub const FRAGS: &str = "PALISADE_FRAGS";
/// Per-rule counters.
pub const COUNTERS: &str = "PALISADE_COUNTERS";
/// Datapath statistics (see [`crate::Statistic`]).
pub const STATS: &str = "PALISADE_STATS";
/// Verdict events.
pub const EVENTS: &str = "PALISADE_EVENTS";
/// Datapath configuration.
pub const CONFIG: &str = "PALISADE_CONFIG";
/// Local endpoints by address.
pub const ENDPOINTS: &str = "PALISADE_ENDPOINTS";
/// Tail-call table of local delivery.
pub const DELIVER: &str = "PALISADE_DELIVER";
/// Per-CPU working memory (not pinned).
pub const SCRATCH: &str = "PALISADE_SCRATCH";

/// Service frontends (ClusterIP, external, LB IP, NodePort per address).
pub const SVC_FRONTENDS: &str = "PALISADE_SVC_FRONTENDS";
/// Service backends.
pub const SVC_BACKENDS: &str = "PALISADE_SVC_BACKENDS";
/// Address classes of the service lookup (pod, node, service range, ClusterIP).
pub const SVC_ADDRESSES: &str = "PALISADE_SVC_ADDRESSES";
/// `loadBalancerSourceRanges` by Service.
pub const SVC_SOURCE_RANGES: &str = "PALISADE_SVC_SOURCE_RANGES";
/// The node's service configuration.
pub const SVC_CONFIG: &str = "PALISADE_SVC_CONFIG";
/// NAT state of translated connections, both directions.
pub const SVC_NAT: &str = "PALISADE_SVC_NAT";
/// The address filter: which addresses may be a frontend or a backend
/// (see [`crate::ADDR_FILTER_BITS_LOG2`]).
pub const SVC_FILTER: &str = "PALISADE_SVC_FILTER";
/// ClientIP session affinity.
pub const SVC_AFFINITY: &str = "PALISADE_SVC_AFFINITY";
/// The socket hooks' reverse table: which frontend a node socket
/// addressed, for `recvmsg()` and `getpeername()`.
pub const SOCK_REVERSE: &str = "PALISADE_SOCK_REVERSE";
/// The socket hooks' UDP flows: which backend an unconnected node
/// socket's datagrams to a frontend go to, while the flow lives.
pub const SOCK_FLOWS: &str = "PALISADE_SOCK_FLOWS";
/// The network namespaces whose sockets the socket hooks balance: the
/// node's, and pods' with their addresses.
pub const SOCK_NETNS: &str = "PALISADE_SOCK_NETNS";
/// What each connected socket the hooks balanced addressed, in the
/// socket's own storage (pinned, so a restarted agent's hooks read it).
pub const SOCK_PEER: &str = "PALISADE_SOCK_PEER";
/// The service program's per-CPU working memory (not pinned).
pub const SVC_SCRATCH: &str = "PALISADE_SVC_SCRATCH";
/// The service program's per-CPU lookup keys (not pinned).
pub const SVC_KEYS: &str = "PALISADE_SVC_KEYS";

/// Every map the program pins.
pub const ALL: &[&str] = &[
    NODES,
    SLOTS,
    IFACES,
    MANAGED,
    LOCAL4,
    LPM4,
    LPM6,
    IDWORDS,
    CLASSWORDS,
    LAYOUT,
    CONN4,
    CTTAG4,
    CONN6,
    CTTAG6,
    CTHEAD,
    CTOWN4,
    CTOWN6,
    FRAGS,
    COUNTERS,
    STATS,
    EVENTS,
    CONFIG,
    ENDPOINTS,
    DELIVER,
    SVC_FRONTENDS,
    SVC_BACKENDS,
    SVC_ADDRESSES,
    SVC_SOURCE_RANGES,
    SVC_CONFIG,
    SVC_NAT,
    SVC_AFFINITY,
    SVC_FILTER,
    SOCK_REVERSE,
    SOCK_FLOWS,
    SOCK_NETNS,
    SOCK_PEER,
];

/// Names earlier builds pinned with layouts this build cannot adopt:
/// hashed conntrack tables (`PALISADE_CT`, `PALISADE_CT4`), fixed
/// 2,048-bit membership bitsets (before 2026-12-03), and the service
/// array of builds whose frontend entries were 8 bytes (before
/// 2026-12-06).
pub const RETIRED: &[&str] = &[
    "PALISADE_CT",
    "PALISADE_CT4",
    "PALISADE_IDENTITIES",
    "PALISADE_CLASSES",
    "PALISADE_SVC_SERVICES",
];
