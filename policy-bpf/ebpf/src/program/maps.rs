//! The maps the programs share with user space (pinned, sized by user space
//! at load), and the two small reads every packet makes: config and layout.

use super::*;

// Sizes here are defaults; user space sets them from configuration at load.
#[map]
pub(super) static PALISADE_NODES: Array<LoweredNode> = Array::pinned(262_144, 0);
#[map]
pub(super) static PALISADE_SLOTS: HashMap<SlotKey, SlotValue> = HashMap::pinned(65_536, 0);
/// Managed interfaces by ifindex: an array read (inlined by the
/// verifier) on every packet; interfaces whose index is past its end are
/// in PALISADE_MANAGED.
#[map]
pub(super) static PALISADE_IFACES: Array<Interface> = Array::pinned(65_536, 0);
#[map]
pub(super) static PALISADE_MANAGED: HashMap<u32, u32> = HashMap::pinned(16_384, 0);
/// One IPv4 slot per interface of the direct table and direction (see
/// [`local4_index`]): a new flow's slot without the hash lookup
/// (about 30 ns a run in the veth lab). Mmapable so user space writes
/// each word with one atomic store.
#[map]
pub(super) static PALISADE_LOCAL4: Array<u64> = Array::pinned(2 * 65_536, BPF_F_MMAPABLE);
#[map]
pub(super) static PALISADE_LPM4: LpmTrie<[u8; 4], PeerClass> = LpmTrie::pinned(262_144, 0);
#[map]
pub(super) static PALISADE_LPM6: LpmTrie<[u8; 16], PeerClass> = LpmTrie::pinned(262_144, 0);
/// Identity membership rows, `stride` words each (see
/// [`member_layout`]); mmapable so user space writes each word with
/// one atomic store.
#[map]
pub(super) static PALISADE_IDWORDS: Array<u64> = Array::pinned(8 << 20, BPF_F_MMAPABLE);
/// Address-class membership rows.
#[map]
pub(super) static PALISADE_CLASSWORDS: Array<u64> = Array::pinned(2 << 20, BPF_F_MMAPABLE);
/// Where the rows are: [`LAYOUT_IDENTITIES`] and [`LAYOUT_CLASSES`]
/// layout words, each switched with one atomic store.
#[map]
pub(super) static PALISADE_LAYOUT: Array<u64> = Array::pinned(2, BPF_F_MMAPABLE);
/// Conntrack: set-associative tables in array maps (see [`CtEntry4`]),
/// the entries (a home per way, then the log) and the ways' state
/// words, mmapable so the user-space sweep reads and frees ways with
/// the same atomic operations as the program. Not an LRU: dead ways
/// are reused by inserts into their set and freed by the sweep
/// (`Datapath::expire_conntrack`); live ones are never evicted.
#[map]
pub(super) static PALISADE_CONN4: Array<CtEntry4> =
    Array::pinned(524_288 + ct_log_entries(524_288), BPF_F_MMAPABLE);
/// State words of the IPv4 ways, eight to a line.
#[map]
pub(super) static PALISADE_CTTAG4: Array<CtTags> = Array::pinned(524_288 / 8, BPF_F_MMAPABLE);
/// IPv6 connections.
#[map]
pub(super) static PALISADE_CONN6: Array<CtEntry6> =
    Array::pinned(524_288 + ct_log_entries(524_288), BPF_F_MMAPABLE);
/// State words of the IPv6 ways.
#[map]
pub(super) static PALISADE_CTTAG6: Array<CtTags> = Array::pinned(524_288 / 8, BPF_F_MMAPABLE);
/// Where the next run of log entries starts, counted from the start
/// of the log without wrapping: IPv4 (0), IPv6 (1). Pinned, so a
/// restarted program goes on where the last one stopped.
#[map]
pub(super) static PALISADE_CTHEAD: Array<u64> = Array::pinned(2, 0);
/// The way (and its generation: [`ct_owner`]) holding each IPv4 log
/// entry, cleared when the way lets go (0: none): apart from the
/// entries, so that finding a free one reads eight to a cache line, in
/// order, and not the entry a new flow only writes. Inserters take an
/// entry with a compare-and-swap here.
#[map]
pub(super) static PALISADE_CTOWN4: Array<u64> =
    Array::pinned(ct_log_entries(524_288), BPF_F_MMAPABLE);
/// Owners of the IPv6 log entries.
#[map]
pub(super) static PALISADE_CTOWN6: Array<u64> =
    Array::pinned(ct_log_entries(524_288), BPF_F_MMAPABLE);
#[map]
pub(super) static PALISADE_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::pinned(16_384, 0);
#[map]
pub(super) static PALISADE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(65_536, 0);
#[map]
pub(super) static PALISADE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(Statistic::COUNT, 0);
#[map]
pub(super) static PALISADE_EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);
#[map]
pub(super) static PALISADE_CONFIG: Array<Config> = Array::pinned(1, 0);
/// Local endpoints by address (see [`LocalEndpoint`]).
#[map]
pub(super) static PALISADE_ENDPOINTS: HashMap<LocalKey, LocalEndpoint> = HashMap::pinned(65_536, 0);
/// The tail-call table: `palisade_to_pod_local` (local delivery), then
/// the reply translations (see the `DELIVER_*` slots).
#[map]
pub(super) static PALISADE_DELIVER: ProgramArray = ProgramArray::pinned(DELIVER_SLOTS, 0);
/// Working memory; not pinned (each loaded program has its own).
#[map]
pub(super) static PALISADE_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// A membership layout word (see [`member_layout`]; 0: no rows).
#[inline(always)]
pub(super) fn layout(which: u32) -> u64 {
    match PALISADE_LAYOUT.get_ptr(which) {
        // SAFETY: an aligned word of an array map, written whole (one
        // atomic store) by user space.
        Some(w) => unsafe { core::ptr::read_volatile(w) },
        None => 0,
    }
}

#[inline(always)]
pub(super) fn config() -> Config {
    match PALISADE_CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// The conntrack zone of a managed interface (one endpoint per
/// interface; keeps fragment tracking apart); `None` for an interface
/// Palisade does not manage.
#[inline(always)]
pub(super) fn interface_zone(ifindex: u32) -> Option<u32> {
    match PALISADE_IFACES.get(ifindex) {
        Some(i) if i.managed != 0 => Some(i.zone),
        Some(_) => None,
        // SAFETY: a u32 written whole by user space.
        None => PALISADE_MANAGED.get_ptr(ifindex).map(|z| unsafe { *z }),
    }
}
