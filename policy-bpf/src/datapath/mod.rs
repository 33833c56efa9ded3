//! The kernel side from user space: loads the TC programs with aya, pins the
//! maps under a bpffs directory (so a restarted agent re-adopts them and
//! established connections survive), applies write plans with rollback,
//! attaches and detaches programs with TCX links (pinned, atomically
//! replaceable), runs programs on crafted packets with `BPF_PROG_TEST_RUN`,
//! and reads counters, statistics and verdict events.

use policy_bpf_common::map_names;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key;
use aya::maps::{
    Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, ProgramArray,
    RingBuf,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use policy_bpf_common::*;

use crate::conntrack::{CONNTRACK_LOG_HEAD, Table, Way, Words, ways_for};
mod attach;
mod batch;
mod cgroup_hooks;
mod local;
mod services;
mod socket_netns;
mod telemetry;
mod write;
use local::*;
use write::*;

pub use crate::error::DatapathError;
use crate::lower::{Capacity, InUse, MapWrite, Mirror, WritePlan};
pub use cgroup_hooks::{ForeignSocketHook, attached_socket_hooks, cgroup_socket_hooks};
pub use services::SOCKET_PROGRAMS;
pub use socket_netns::{SocketNetns, current_netns_cookie, netns_cookie, socket_cookie};

/// A random, nonzero seed for the conntrack set hash (std's hasher keys
/// come from the OS's random source).
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() as u32).max(1)
}

/// The TC program object, built by build.rs for the BPF target.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-tc"));

/// Where Palisade pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/palisade";

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        message: e.to_string(),
    }
}

/// Which program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Host veth TC ingress: traffic from the pod (its egress policy).
    FromPod,
    /// Host veth TC egress: traffic to the pod (its ingress policy).
    ToPod,
    /// A program that only passes packets: the baseline of benchmarks
    /// (never attached).
    PassThrough,
    /// Service load balancing at TC ingress, before the policy program
    /// (see [`Datapath::attach_service`]).
    Service,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => "palisade_from_pod",
            Hook::ToPod => "palisade_to_pod",
            Hook::PassThrough => "palisade_pass",
            Hook::Service => SERVICE_PROGRAM,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod | Hook::Service => TcAttachType::Ingress,
            Hook::ToPod | Hook::PassThrough => TcAttachType::Egress,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Hook::FromPod => "from-pod",
            Hook::ToPod => "to-pod",
            Hook::PassThrough => "pass",
            Hook::Service => "service",
        }
    }
}

/// Result of one program run on a crafted packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return code.
    pub retval: i32,
    /// Average time per run (ns), as the kernel measured it.
    pub duration_ns: u64,
}

impl RunResult {
    /// Whether the packet passes (TCX next/pass).
    pub fn passed(&self) -> bool {
        self.retval == -1 || self.retval == 0
    }
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    owns_pin_dir: bool,
    nodes: Array<MapData, LoweredNode>,
    slots: BpfHashMap<MapData, SlotKey, SlotValue>,
    managed: BpfHashMap<MapData, u32, u32>,
    ifaces: Array<MapData, Interface>,
    /// A copy of one IPv4 slot per interface and direction ([`local4_index`]).
    local4: Words,
    lpm4: LpmTrie<MapData, [u8; 4], PeerClass>,
    lpm6: LpmTrie<MapData, [u8; 16], PeerClass>,
    /// Identity membership rows (see [`member_layout`]).
    identities: Words,
    /// Address-class membership rows.
    classes: Words,
    /// The two layout words ([`LAYOUT_IDENTITIES`], [`LAYOUT_CLASSES`]).
    layouts: Words,
    conn4: Table<CtEntry4>,
    conn6: Table<CtEntry6>,
    counters: PerCpuArray<MapData, Counter>,
    stats: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    config: Array<MapData, Config>,
    endpoints: BpfHashMap<MapData, LocalKey, LocalEndpoint>,
    links: HashMap<(String, Hook), PathBuf>,
    /// What [`Datapath::set_services`] last wrote (the service maps'
    /// contents, for replacing them).
    services: Option<crate::services::ServiceEntries>,
    /// The backends translated flows kept at the last table: a table that
    /// keeps all of them has no NAT state to forget.
    kept_backends: Option<crate::services::KeptBackends>,
    service_capacity: crate::services::ServiceCapacity,
    /// Which addresses may be a frontend or a backend (bits only set).
    service_filter: Words,
}

/// Mounts bpffs at /sys/fs/bpf if it is not mounted (needs root).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf ")
            })
        })
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(|e| DatapathError::Privileges(e.to_string()))?;
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| DatapathError::Privileges(format!("mounting bpffs at /sys/fs/bpf: {e}")))
}

/// The program that reports the conntrack clock (run, never attached).
const CLOCK_PROGRAM: &str = "palisade_clock";

/// The receiver's side of local delivery (tail-called, never attached).
const LOCAL_DELIVERY_PROGRAM: &str = "palisade_to_pod_local";

/// Service load balancing (see [`Datapath::set_services`]).
pub(crate) const SERVICE_PROGRAM: &str = "palisade_service";

/// Reply translation after policy (tail-called, never attached).
const REPLY_NAT_PROGRAM: &str = "palisade_reply_nat";

/// Reply translation after policy, then local delivery (tail-called).
const REPLY_NAT_LOCAL_PROGRAM: &str = "palisade_reply_nat_local";
/// The NAT-state floor of the service benchmarks (see
/// [`Datapath::attach_nat_floor_as_service`]; never attached by the agent).
const NAT_FLOOR_PROGRAM: &str = "palisade_nat_floor";

/// Every TC program, in the order they are loaded.
const TC_PROGRAMS: [&str; 9] = [
    "palisade_from_pod",
    "palisade_to_pod",
    "palisade_pass",
    CLOCK_PROGRAM,
    LOCAL_DELIVERY_PROGRAM,
    SERVICE_PROGRAM,
    REPLY_NAT_PROGRAM,
    REPLY_NAT_LOCAL_PROGRAM,
    NAT_FLOOR_PROGRAM,
];

/// A map size as the loader takes it (at least one entry).
fn entries(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

/// Whether this process can load BPF programs (root or CAP_BPF+CAP_NET_ADMIN).
pub fn privileged() -> bool {
    nix::unistd::Uid::effective().is_root()
}

impl Datapath {
    /// Loads the programs with maps sized by `cap`, pinned under `pin_dir`
    /// (existing pins are re-adopted, so conntrack survives a restart).
    pub fn load(pin_dir: &Path, cap: Capacity) -> Result<Self, DatapathError> {
        if !privileged() {
            return Err(DatapathError::Privileges("not running as root".into()));
        }
        ensure_bpffs()?;
        let conntrack_ways = ways_for(cap.conntrack)?;
        let conntrack_entries = conntrack_ways + ct_log_entries(conntrack_ways);
        // Builds before the set-associative conntrack pinned hash tables
        // under the first two names, and a shorter configuration record;
        // builds before the tag lines kept each way's state word in the way
        // (their table of ways is pinned without tag lines); builds before
        // the log kept each connection in its way's entry (the tables are
        // pinned without a log head): their maps cannot be re-adopted.
        let pinned = |name: &str| pin_dir.join(name).exists();
        // Builds before membership rows (2026-12-03) pinned fixed
        // 2,048-bit bitsets under these names.
        let obsolete = map_names::RETIRED
            .iter()
            .copied()
            .find(|name| pinned(name))
            .or((pinned(CtEntry4::MAP) && !pinned(CtEntry4::TAGS)).then_some(CtEntry4::MAP))
            .or((pinned(CtEntry4::MAP) && !pinned(CONNTRACK_LOG_HEAD)).then_some(CtEntry4::MAP));
        if let Some(obsolete) = obsolete {
            return Err(DatapathError::Load(format!(
                "{} holds pins of an earlier Palisade ({obsolete}); detach its programs and \
                 remove the directory before loading this version",
                pin_dir.display()
            )));
        }
        let fresh = !pin_dir.exists();
        let short_config = services::take_short_service_config(pin_dir)?;
        // Pins of a build before the address filter: it starts empty
        // beside tables in force, and is filled from them below.
        let filter_missing = !fresh && !pin_dir.join(map_names::SVC_FILTER).exists();
        std::fs::create_dir_all(pin_dir.join("links"))
            .map_err(|e| DatapathError::Load(format!("creating {}: {e}", pin_dir.display())))?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(map_names::NODES, cap.nodes)
            .map_max_entries(map_names::SLOTS, cap.slots)
            .map_max_entries(map_names::MANAGED, cap.interfaces)
            .map_max_entries(map_names::IFACES, cap.interface_index.max(1))
            .map_max_entries(map_names::LOCAL4, 2 * cap.interface_index.max(1))
            .map_max_entries(map_names::LPM4, cap.lpm4)
            .map_max_entries(map_names::LPM6, cap.lpm6)
            .map_max_entries(map_names::IDWORDS, cap.identity_words.max(2))
            .map_max_entries(map_names::CLASSWORDS, cap.class_words.max(2))
            .map_max_entries(CtEntry4::MAP, conntrack_entries)
            .map_max_entries(CtEntry4::TAGS, conntrack_ways / CT_TAG_LINE)
            .map_max_entries(CtEntry6::MAP, conntrack_entries)
            .map_max_entries(map_names::CTOWN4, ct_log_entries(conntrack_ways))
            .map_max_entries(map_names::CTOWN6, ct_log_entries(conntrack_ways))
            .map_max_entries(CtEntry6::TAGS, conntrack_ways / CT_TAG_LINE)
            .map_max_entries(map_names::COUNTERS, cap.rules)
            .map_max_entries(map_names::ENDPOINTS, cap.slots)
            .map_max_entries(map_names::SVC_FRONTENDS, entries(cap.services.frontends))
            .map_max_entries(map_names::SVC_BACKENDS, entries(cap.services.backends))
            .map_max_entries(map_names::SVC_ADDRESSES, entries(cap.services.addresses))
            .map_max_entries(
                map_names::SVC_SOURCE_RANGES,
                entries(cap.services.source_ranges),
            )
            .map_max_entries(map_names::SVC_NAT, entries(cap.services.nat))
            .map_max_entries(map_names::SVC_AFFINITY, entries(cap.services.affinity));
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for name in TC_PROGRAMS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        }
        let service_filter = Words::take(&mut ebpf, map_names::SVC_FILTER)?;
        if filter_missing {
            services::seed_filter(&ebpf, &service_filter)?;
        }
        if let Some(config) = short_config {
            services::restore_service_config(&mut ebpf, config)?;
        }
        // The pinned jump table now leads to this load's programs
        // (programs attached by an earlier process jump there as well).
        {
            let mut targets = Vec::new();
            for (slot, name) in [
                (DELIVER_LOCAL, LOCAL_DELIVERY_PROGRAM),
                (DELIVER_REPLY_NAT, REPLY_NAT_PROGRAM),
                (DELIVER_REPLY_NAT_LOCAL, REPLY_NAT_LOCAL_PROGRAM),
            ] {
                let fd = ebpf
                    .program(name)
                    .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
                    .fd()
                    .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?
                    .try_clone()
                    .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
                targets.push((slot, fd));
            }
            let mut jump =
                ProgramArray::try_from(ebpf.map_mut(map_names::DELIVER).ok_or_else(|| {
                    DatapathError::Load(format!("map {} missing", map_names::DELIVER))
                })?)
                .map_err(map_err(map_names::DELIVER))?;
            for (slot, fd) in &targets {
                jump.set(*slot, fd, 0)
                    .map_err(map_err(map_names::DELIVER))?;
            }
        }
        macro_rules! take {
            ($name:expr, $ty:ty) => {{
                let m = ebpf
                    .take_map($name)
                    .ok_or_else(|| DatapathError::Load(format!("map {} missing", $name)))?;
                <$ty>::try_from(m).map_err(map_err($name))?
            }};
        }
        let mut dp = Datapath {
            nodes: take!(map_names::NODES, Array<MapData, LoweredNode>),
            slots: take!(map_names::SLOTS, BpfHashMap<MapData, SlotKey, SlotValue>),
            managed: take!(map_names::MANAGED, BpfHashMap<MapData, u32, u32>),
            ifaces: take!(map_names::IFACES, Array<MapData, Interface>),
            local4: Words::take(&mut ebpf, map_names::LOCAL4)?,
            lpm4: take!(map_names::LPM4, LpmTrie<MapData, [u8; 4], PeerClass>),
            lpm6: take!(map_names::LPM6, LpmTrie<MapData, [u8; 16], PeerClass>),
            identities: Words::take(&mut ebpf, map_names::IDWORDS)?,
            classes: Words::take(&mut ebpf, map_names::CLASSWORDS)?,
            layouts: Words::take(&mut ebpf, map_names::LAYOUT)?,
            conn4: Table::take(&mut ebpf)?,
            conn6: Table::take(&mut ebpf)?,
            counters: take!(map_names::COUNTERS, PerCpuArray<MapData, Counter>),
            stats: take!(map_names::STATS, PerCpuArray<MapData, u64>),
            events: take!(map_names::EVENTS, RingBuf<MapData>),
            config: take!(map_names::CONFIG, Array<MapData, Config>),
            endpoints: take!(map_names::ENDPOINTS, BpfHashMap<MapData, LocalKey, LocalEndpoint>),
            service_filter,
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            owns_pin_dir: false,
            links: HashMap::new(),
            services: None,
            kept_backends: None,
            service_capacity: cap.services,
        };
        if dp.conn4.ways() != dp.conn6.ways() {
            return Err(DatapathError::Load(format!(
                "the pinned conntrack tables differ in size ({} and {} ways); remove them",
                dp.conn4.ways(),
                dp.conn6.ways()
            )));
        }
        // A re-adopted configuration keeps its tunables; the tick rate is
        // measured again all the same (it is the kernel's, not the user's).
        let cfg = if fresh {
            Config::default()
        } else {
            dp.config()?
        };
        dp.set_config(cfg)?;
        dp.reconcile_local4()?;
        Ok(dp)
    }

    /// Loads into a private, temporary pin directory that is removed on drop
    /// (for tests and the kernel engine).
    pub fn load_private(cap: Capacity) -> Result<Self, DatapathError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            remove_stale_private_dirs();
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-private-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut dp = Self::load(&dir, cap)?;
        dp.owns_pin_dir = true;
        Ok(dp)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The tunables the programs read.
    pub fn config(&self) -> Result<Config, DatapathError> {
        self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))
    }

    /// Sets the tunables. What is not a tunable is not taken from `c`:
    /// `ticks_per_s` is measured, the conntrack set mask follows the
    /// tables, and the set hash's seed stays what the tables were filled
    /// with (a new random one for empty tables).
    pub fn set_config(&mut self, c: Config) -> Result<(), DatapathError> {
        let seed = match self.config()?.ct_seed {
            0 => random_seed(),
            kept => kept,
        };
        let c = Config {
            ticks_per_s: self.ticks_per_s()?,
            ct_sets_mask: self.conn4.sets_mask(),
            ct_seed: seed,
            pad: 0,
            ..c
        };
        self.config.set(0, c, 0).map_err(map_err(map_names::CONFIG))
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("links", &self.links.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Private pin directories of processes that died without cleaning up.
fn remove_stale_private_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("palisade-private-")
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// An error with its causes, one after the other.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.owns_pin_dir {
            for (_, path) in self.links.drain() {
                let _ = std::fs::remove_file(path);
            }
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::telemetry::snap_hz;

    #[test]
    fn the_kernel_object_defines_exactly_the_named_maps() {
        use policy_bpf_common::map_names;
        let object = aya_obj::Object::parse(super::OBJECT).expect("the built object parses");
        let mut defined: Vec<&str> = object.maps.keys().map(String::as_str).collect();
        defined.sort_unstable();
        let mut named: Vec<&str> = map_names::ALL.to_vec();
        named.push(map_names::SCRATCH);
        named.push(map_names::SVC_SCRATCH);
        named.push(map_names::SVC_KEYS);
        named.sort_unstable();
        assert_eq!(
            defined, named,
            "map_names and the kernel's statics disagree"
        );
        for retired in map_names::RETIRED {
            assert!(
                !named.contains(retired),
                "{retired} is both live and retired"
            );
        }
    }

    #[test]
    fn tick_rates_snap_to_known_values() {
        // 60 ms at HZ=250 is 15 ticks; the tick updates' jitter moves the
        // nanosecond span a little either way.
        assert_eq!(snap_hz(15, 60_100_000), 250);
        assert_eq!(snap_hz(15, 59_900_000), 250);
        assert_eq!(snap_hz(6, 60_000_000), 100);
        assert_eq!(snap_hz(18, 60_000_000), 300);
        assert_eq!(snap_hz(60, 60_020_000), 1000);
        // A reading a tick off: still the right rate.
        assert_eq!(snap_hz(16, 60_000_000), 250);
        assert_eq!(snap_hz(61, 60_000_000), 1000);
        // Not near a known rate: the measurement, rounded.
        assert_eq!(snap_hz(21, 60_000_000), 350);
        assert_eq!(snap_hz(0, 0), 1);
    }
}
