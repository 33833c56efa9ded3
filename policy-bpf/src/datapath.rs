//! The kernel side from user space: loads the TC programs with aya, pins the
//! maps under a bpffs directory (so a restarted agent re-adopts them and
//! established connections survive), applies write plans with rollback,
//! attaches and detaches programs with TCX links (pinned, atomically
//! replaceable), runs programs on crafted packets with `BPF_PROG_TEST_RUN`,
//! and reads counters, statistics and verdict events.

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
use crate::lower::{Capacity, InUse, MapWrite, Mirror, WritePlan};

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

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The process lacks the privileges to load BPF programs.
    #[error("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN): {0}")]
    Privileges(String),
    /// Loading or verifying failed.
    #[error("loading the TC programs failed: {0}")]
    Load(String),
    /// A map operation failed.
    #[error("map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What happened.
        message: String,
    },
    /// Attaching or detaching failed.
    #[error("interface {interface}: {message}")]
    Attach {
        /// Interface.
        interface: String,
        /// What happened.
        message: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

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
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromPod => "palisade_from_pod",
            Hook::ToPod => "palisade_to_pod",
            Hook::PassThrough => "palisade_pass",
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod | Hook::PassThrough => TcAttachType::Egress,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Hook::FromPod => "from-pod",
            Hook::ToPod => "to-pod",
            Hook::PassThrough => "pass",
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
    nodes: Array<MapData, Node>,
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

/// The key of an IPv4 slot.
fn slot_key4(ifindex: u32, direction: u8, addr: [u8; 4]) -> SlotKey {
    let mut k = SlotKey {
        ifindex,
        direction,
        family: FAMILY_V4,
        ..SlotKey::default()
    };
    k.addr[..4].copy_from_slice(&addr);
    k
}

/// An interface's IPv4 slots in one direction: (address, root).
type V4Slots = Vec<([u8; 4], u32)>;

/// IPv4 slots by interface and direction.
fn v4_slots(slots: &HashMap<SlotKey, SlotValue>) -> HashMap<(u32, u8), V4Slots> {
    let mut out: HashMap<(u32, u8), V4Slots> = HashMap::new();
    for (k, v) in slots.iter().filter(|(k, _)| k.family == FAMILY_V4) {
        out.entry((k.ifindex, k.direction))
            .or_default()
            .push(([k.addr[0], k.addr[1], k.addr[2], k.addr[3]], v.root));
    }
    out
}

/// The program that reports the conntrack clock (run, never attached).
const CLOCK_PROGRAM: &str = "palisade_clock";

/// The receiver's side of local delivery (tail-called, never attached).
const LOCAL_DELIVERY_PROGRAM: &str = "palisade_to_pod_local";

/// Kernel tick rates (CONFIG_HZ) a measurement is snapped to: at least 20%
/// apart, so the 8% windows around them never overlap.
const KNOWN_HZ: [u32; 6] = [100, 200, 250, 300, 500, 1000];

/// Ticks per second from `ticks` jiffies seen over `ns` nanoseconds of the
/// coarse clock, which the kernel advances in the same tick update: a
/// known rate within 8%, else the rounded measurement. (A reading taken
/// between the jiffies increment and the clock update is a tick off: over
/// the 60 ms and 6 ticks measured that stays within 8% but at 100 Hz.)
fn snap_hz(ticks: u64, ns: u64) -> u32 {
    let raw = ticks as f64 * 1e9 / ns.max(1) as f64;
    KNOWN_HZ
        .into_iter()
        .find(|&hz| (raw - f64::from(hz)).abs() <= 0.08 * f64::from(hz))
        .unwrap_or(raw.round().clamp(1.0, 100_000.0) as u32)
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
        let obsolete = [
            "PALISADE_CT",
            "PALISADE_CT4",
            "PALISADE_IDENTITIES",
            "PALISADE_CLASSES",
        ]
        .into_iter()
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
        std::fs::create_dir_all(pin_dir.join("links"))
            .map_err(|e| DatapathError::Load(format!("creating {}: {e}", pin_dir.display())))?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries("PALISADE_NODES", cap.nodes)
            .map_max_entries("PALISADE_SLOTS", cap.slots)
            .map_max_entries("PALISADE_MANAGED", cap.interfaces)
            .map_max_entries("PALISADE_IFACES", cap.interface_index.max(1))
            .map_max_entries("PALISADE_LOCAL4", 2 * cap.interface_index.max(1))
            .map_max_entries("PALISADE_LPM4", cap.lpm4)
            .map_max_entries("PALISADE_LPM6", cap.lpm6)
            .map_max_entries("PALISADE_IDWORDS", cap.identity_words.max(2))
            .map_max_entries("PALISADE_CLASSWORDS", cap.class_words.max(2))
            .map_max_entries(CtEntry4::MAP, conntrack_entries)
            .map_max_entries(CtEntry4::TAGS, conntrack_ways / CT_TAG_LINE)
            .map_max_entries(CtEntry6::MAP, conntrack_entries)
            .map_max_entries("PALISADE_CTOWN4", ct_log_entries(conntrack_ways))
            .map_max_entries("PALISADE_CTOWN6", ct_log_entries(conntrack_ways))
            .map_max_entries(CtEntry6::TAGS, conntrack_ways / CT_TAG_LINE)
            .map_max_entries("PALISADE_COUNTERS", cap.rules)
            .map_max_entries("PALISADE_ENDPOINTS", cap.slots);
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for name in [
            Hook::FromPod.program(),
            Hook::ToPod.program(),
            Hook::PassThrough.program(),
            CLOCK_PROGRAM,
            LOCAL_DELIVERY_PROGRAM,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        }
        // The pinned jump table now leads to this load's receiver program
        // (programs attached by an earlier process jump there as well).
        {
            let target = ebpf
                .program(LOCAL_DELIVERY_PROGRAM)
                .ok_or_else(|| {
                    DatapathError::Load(format!("program {LOCAL_DELIVERY_PROGRAM} missing"))
                })?
                .fd()
                .map_err(|e| DatapathError::Load(format!("{LOCAL_DELIVERY_PROGRAM}: {e}")))?
                .try_clone()
                .map_err(|e| DatapathError::Load(format!("{LOCAL_DELIVERY_PROGRAM}: {e}")))?;
            let mut jump = ProgramArray::try_from(
                ebpf.map_mut("PALISADE_DELIVER")
                    .ok_or_else(|| DatapathError::Load("map PALISADE_DELIVER missing".into()))?,
            )
            .map_err(map_err("PALISADE_DELIVER"))?;
            jump.set(0, &target, 0)
                .map_err(map_err("PALISADE_DELIVER"))?;
        }
        macro_rules! take {
            ($name:literal, $ty:ty) => {{
                let m = ebpf
                    .take_map($name)
                    .ok_or_else(|| DatapathError::Load(format!("map {} missing", $name)))?;
                <$ty>::try_from(m).map_err(map_err($name))?
            }};
        }
        let mut dp = Datapath {
            nodes: take!("PALISADE_NODES", Array<MapData, Node>),
            slots: take!("PALISADE_SLOTS", BpfHashMap<MapData, SlotKey, SlotValue>),
            managed: take!("PALISADE_MANAGED", BpfHashMap<MapData, u32, u32>),
            ifaces: take!("PALISADE_IFACES", Array<MapData, Interface>),
            local4: Words::take(&mut ebpf, "PALISADE_LOCAL4")?,
            lpm4: take!("PALISADE_LPM4", LpmTrie<MapData, [u8; 4], PeerClass>),
            lpm6: take!("PALISADE_LPM6", LpmTrie<MapData, [u8; 16], PeerClass>),
            identities: Words::take(&mut ebpf, "PALISADE_IDWORDS")?,
            classes: Words::take(&mut ebpf, "PALISADE_CLASSWORDS")?,
            layouts: Words::take(&mut ebpf, "PALISADE_LAYOUT")?,
            conn4: Table::take(&mut ebpf)?,
            conn6: Table::take(&mut ebpf)?,
            counters: take!("PALISADE_COUNTERS", PerCpuArray<MapData, Counter>),
            stats: take!("PALISADE_STATS", PerCpuArray<MapData, u64>),
            events: take!("PALISADE_EVENTS", RingBuf<MapData>),
            config: take!("PALISADE_CONFIG", Array<MapData, Config>),
            endpoints: take!("PALISADE_ENDPOINTS", BpfHashMap<MapData, LocalKey, LocalEndpoint>),
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            owns_pin_dir: false,
            links: HashMap::new(),
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

    /// The slots hash as it is in the kernel.
    fn read_slots(&self) -> Result<HashMap<SlotKey, SlotValue>, DatapathError> {
        self.slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("PALISADE_SLOTS"))
    }

    /// Makes every IPv4 fast slot a copy of a slot in the hash (after a
    /// restart: pins from a build without them, or a process stopped
    /// between a slot's two writes).
    fn reconcile_local4(&mut self) -> Result<(), DatapathError> {
        let v4 = v4_slots(&self.read_slots()?);
        for i in 0..self.local4.len() {
            let (ifindex, direction) = (i >> 1, (i & 1) as u8);
            let candidates = v4.get(&(ifindex, direction)).map_or(&[][..], Vec::as_slice);
            self.promote_local4(ifindex, direction, candidates);
        }
        Ok(())
    }

    /// Makes the fast word of an interface and direction copy one of its
    /// IPv4 slots, `candidates` (address, root): the one it copies if that
    /// is still there, else the lowest address's; none if there are none.
    fn promote_local4(&self, ifindex: u32, direction: u8, candidates: &[([u8; 4], u32)]) {
        let Some(word) = self.local4.get(local4_index(ifindex, direction)) else {
            return;
        };
        let current = word.load(std::sync::atomic::Ordering::Acquire);
        let kept = (current as u32).to_ne_bytes();
        let want = candidates
            .iter()
            .find(|(addr, _)| current != 0 && *addr == kept)
            .or_else(|| candidates.iter().min())
            .copied();
        let new = want.map_or(0, |(addr, root)| local4_word(addr, root));
        if new != current {
            word.store(new, std::sync::atomic::Ordering::Release);
        }
    }

    /// Where the IPv4 fast slots disagree with the slots hash: a word that
    /// copies no slot (or an old root), or an interface and direction with
    /// IPv4 slots but no word. Empty when consistent (checked by tests
    /// after updates, failed updates and restarts).
    pub fn local4_disagreements(&self) -> Result<Vec<String>, DatapathError> {
        let slots = self.read_slots()?;
        let with_v4: std::collections::HashSet<(u32, u8)> = slots
            .keys()
            .filter(|k| k.family == FAMILY_V4)
            .map(|k| (k.ifindex, k.direction))
            .collect();
        let mut out = Vec::new();
        for i in 0..self.local4.len() {
            let (ifindex, direction) = (i >> 1, (i & 1) as u8);
            let Some(word) = self.local4.get(i) else {
                continue;
            };
            let word = word.load(std::sync::atomic::Ordering::Acquire);
            let addr = (word as u32).to_ne_bytes();
            let copied = slots
                .get(&slot_key4(ifindex, direction, addr))
                .map(|v| v.root);
            if word != 0 && local4_root(word, u32::from_ne_bytes(addr)) != copied {
                out.push(format!(
                    "interface {ifindex} direction {direction}: fast slot {} root {:?}, hash {copied:?}",
                    std::net::Ipv4Addr::from(addr),
                    local4_root(word, u32::from_ne_bytes(addr)),
                ));
            }
            if word == 0 && with_v4.contains(&(ifindex, direction)) {
                out.push(format!(
                    "interface {ifindex} direction {direction}: IPv4 slots but no fast slot"
                ));
            }
        }
        Ok(out)
    }

    /// Keeps the fast word of slot `k`'s interface and direction in step
    /// with the hash, right after the hash's write (so it never names a
    /// root the plan has moved away from): a new root for its address, or
    /// cleared with it. A free word takes the slot.
    fn follow_local4(&self, k: &SlotKey, root: Option<u32>) {
        if k.family != FAMILY_V4 {
            return;
        }
        let Some(word) = self.local4.get(local4_index(k.ifindex, k.direction)) else {
            return;
        };
        let addr = [k.addr[0], k.addr[1], k.addr[2], k.addr[3]];
        let current = word.load(std::sync::atomic::Ordering::Acquire);
        let ours = local4_root(current, u32::from_ne_bytes(addr)).is_some();
        let new = match root {
            Some(root) if ours || current == 0 => local4_word(addr, root),
            None if ours => 0,
            _ => return,
        };
        word.store(new, std::sync::atomic::Ordering::Release);
    }

    /// The conntrack clock as the programs read it: (jiffies, coarse
    /// monotonic nanoseconds), from one run of the clock program.
    pub fn kernel_clock(&self) -> Result<(u64, u64), DatapathError> {
        // An Ethernet-sized frame; the program overwrites its first 16 bytes.
        let (r, out) = self.test_run(CLOCK_PROGRAM, &[0u8; 64], 1, 0)?;
        // TC_ACT_SHOT: bpf_skb_store_bytes failed.
        if r.retval == 2 {
            return Err(DatapathError::Other(
                "the clock program could not write its packet".into(),
            ));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&out[8 * i..8 * i + 8]);
            u64::from_ne_bytes(b)
        };
        Ok((word(0), word(1)))
    }

    /// Ticks per second of the conntrack clock (the kernel's HZ), measured
    /// once per process over about 60 ms of the clock program's readings.
    pub fn ticks_per_s(&self) -> Result<u32, DatapathError> {
        static HZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, t0) = self.kernel_clock()?;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(2));
            let (j, t) = self.kernel_clock()?;
            let (ticks, ns) = (j.saturating_sub(j0), t.saturating_sub(t0));
            if ns >= 60_000_000 && ticks >= 6 {
                return Ok(*HZ.get_or_init(|| snap_hz(ticks, ns)));
            }
            if ns > 2_000_000_000 {
                return Err(DatapathError::Other(format!(
                    "measuring the kernel's tick rate: {ticks} jiffies in {ns} ns"
                )));
            }
        }
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
        self.config.get(&0, 0).map_err(map_err("PALISADE_CONFIG"))
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
        self.config.set(0, c, 0).map_err(map_err("PALISADE_CONFIG"))
    }

    fn write_one(&mut self, w: &MapWrite) -> Result<(), DatapathError> {
        match w {
            MapWrite::Node(i, n) => self.nodes.set(*i, n, 0).map_err(map_err("PALISADE_NODES")),
            MapWrite::Slot(k, Some(v)) => {
                self.slots
                    .insert(k, v, 0)
                    .map_err(map_err("PALISADE_SLOTS"))?;
                self.follow_local4(k, Some(v.root));
                Ok(())
            }
            MapWrite::Slot(k, None) => {
                ignore_missing(self.slots.remove(k)).map_err(map_err("PALISADE_SLOTS"))?;
                self.follow_local4(k, None);
                Ok(())
            }
            MapWrite::Interface(i, z) if *i < self.ifaces.len() => {
                let v = match z {
                    Some(zone) => Interface {
                        zone: *zone,
                        managed: 1,
                    },
                    None => Interface::default(),
                };
                self.ifaces
                    .set(*i, v, 0)
                    .map_err(map_err("PALISADE_IFACES"))
            }
            MapWrite::Interface(i, Some(z)) => self
                .managed
                .insert(i, z, 0)
                .map_err(map_err("PALISADE_MANAGED")),
            MapWrite::Interface(i, None) => {
                ignore_missing(self.managed.remove(i)).map_err(map_err("PALISADE_MANAGED"))
            }
            MapWrite::Lpm4(l, a, Some(v)) => self
                .lpm4
                .insert(&Key::new(*l, *a), v, 0)
                .map_err(map_err("PALISADE_LPM4")),
            MapWrite::Lpm4(l, a, None) => ignore_missing(self.lpm4.remove(&Key::new(*l, *a)))
                .map_err(map_err("PALISADE_LPM4")),
            MapWrite::Lpm6(l, a, Some(v)) => self
                .lpm6
                .insert(&Key::new(*l, *a), v, 0)
                .map_err(map_err("PALISADE_LPM6")),
            MapWrite::Lpm6(l, a, None) => ignore_missing(self.lpm6.remove(&Key::new(*l, *a)))
                .map_err(map_err("PALISADE_LPM6")),
            MapWrite::Identity(slot, layout, bits) => {
                write_row(&self.identities, *slot, *layout, bits, "PALISADE_IDWORDS")
            }
            MapWrite::Class(slot, layout, bits) => {
                write_row(&self.classes, *slot, *layout, bits, "PALISADE_CLASSWORDS")
            }
            MapWrite::Layouts(identities, classes) => {
                for (i, word) in [(LAYOUT_IDENTITIES, identities), (LAYOUT_CLASSES, classes)] {
                    let w = self.layouts.get(i).ok_or(DatapathError::Map {
                        map: "PALISADE_LAYOUT",
                        message: format!("no word {i}"),
                    })?;
                    w.store(*word, std::sync::atomic::Ordering::Release);
                }
                Ok(())
            }
            MapWrite::ResetCounter(i) => {
                let cpus =
                    aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Other(e.to_string()))?;
                let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])
                    .map_err(|e| DatapathError::Other(e.to_string()))?;
                self.counters
                    .set(*i, zero, 0)
                    .map_err(map_err("PALISADE_COUNTERS"))
            }
        }
    }

    /// The inverse of a write, from the state before the plan.
    fn undo_one(&mut self, w: &MapWrite, before: &Mirror) {
        let restore = match w {
            MapWrite::Node(..) | MapWrite::ResetCounter(_) => None,
            MapWrite::Slot(k, _) => Some(MapWrite::Slot(*k, before.slots.get(k).copied())),
            MapWrite::Interface(i, _) => {
                Some(MapWrite::Interface(*i, before.interfaces.get(i).copied()))
            }
            MapWrite::Lpm4(l, a, _) => {
                Some(MapWrite::Lpm4(*l, *a, before.lpm4.get(&(*l, *a)).copied()))
            }
            MapWrite::Lpm6(l, a, _) => {
                Some(MapWrite::Lpm6(*l, *a, before.lpm6.get(&(*l, *a)).copied()))
            }
            // A row written in the live layout gets its old words back; a
            // row in a layout the plan had not switched to yet is not read.
            MapWrite::Identity(i, layout, _) => (*layout == before.layouts.0).then(|| {
                MapWrite::Identity(
                    *i,
                    *layout,
                    before.identities.get(i).cloned().unwrap_or_default(),
                )
            }),
            MapWrite::Class(i, layout, _) => (*layout == before.layouts.1).then(|| {
                MapWrite::Class(
                    *i,
                    *layout,
                    before.classes.get(i).cloned().unwrap_or_default(),
                )
            }),
            MapWrite::Layouts(..) => Some(MapWrite::Layouts(before.layouts.0, before.layouts.1)),
        };
        if let Some(r) = restore {
            let _ = self.write_one(&r);
        }
    }

    /// Applies a plan in order. If a write fails, everything written so far
    /// is put back as `before` had it and the error is returned: the previous
    /// policy stays enforced.
    pub fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), DatapathError> {
        self.write_with(plan, before, |_| false)
    }

    /// [`Datapath::write`] with a fault injector (tests): when `fail(i)` is
    /// true the i-th write fails as if the kernel had refused it.
    pub fn write_with(
        &mut self,
        plan: &WritePlan,
        before: &Mirror,
        fail: impl Fn(usize) -> bool,
    ) -> Result<(), DatapathError> {
        let writes: Vec<&MapWrite> = plan.iter().collect();
        for (i, w) in writes.iter().enumerate() {
            let r = if fail(i) {
                Err(DatapathError::Other(format!(
                    "injected failure at write {i}"
                )))
            } else {
                self.write_one(w)
            };
            if let Err(e) = r {
                for done in writes[..i].iter().rev() {
                    self.undo_one(done, before);
                }
                self.promote_touched_local4(&writes[..i], &before.slots);
                return Err(e);
            }
        }
        // The slots after the plan, only when it wrote some.
        if writes.iter().any(|w| matches!(w, MapWrite::Slot(..))) {
            let mut after = before.slots.clone();
            for w in &writes {
                if let MapWrite::Slot(k, v) = w {
                    match v {
                        Some(v) => after.insert(*k, *v),
                        None => after.remove(k),
                    };
                }
            }
            self.promote_touched_local4(&writes, &after);
        }
        Ok(())
    }

    /// Gives the fast words that slot writes left free (an address removed
    /// while the interface has others) another of the interface's IPv4
    /// slots, from the slots now in the hash.
    fn promote_touched_local4(&self, writes: &[&MapWrite], slots: &HashMap<SlotKey, SlotValue>) {
        let touched: std::collections::BTreeSet<(u32, u8)> = writes
            .iter()
            .filter_map(|w| match w {
                MapWrite::Slot(k, _) if k.family == FAMILY_V4 => Some((k.ifindex, k.direction)),
                _ => None,
            })
            .collect();
        if touched.is_empty() {
            return;
        }
        let v4 = v4_slots(slots);
        for (ifindex, direction) in touched {
            let candidates = v4.get(&(ifindex, direction)).map_or(&[][..], Vec::as_slice);
            self.promote_local4(ifindex, direction, candidates);
        }
    }

    fn link_path(&self, iface: &str, hook: Hook) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{iface}-{}", hook.name()))
    }

    /// Attaches both programs to an interface with TCX links, pinned so they
    /// outlive this process. An existing pinned link is updated in place
    /// (atomic program replacement). Must run in the interface's netns.
    pub fn attach(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_programs(iface, false)
    }

    /// Attaches the pass-through program in both places [`Self::attach`]
    /// attaches the policy programs: what TC hooks cost a packet before
    /// any policy (benchmarks measure against it). Detached like them.
    pub fn attach_pass_through(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.attach_programs(iface, true)
    }

    fn attach_programs(&mut self, iface: &str, pass_through: bool) -> Result<(), DatapathError> {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let path = self.link_path(iface, hook);
            let program = if pass_through {
                Hook::PassThrough.program()
            } else {
                hook.program()
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(program)
                .ok_or_else(|| DatapathError::Load("program missing".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            let attach_err = |m: String| DatapathError::Attach {
                interface: iface.to_string(),
                message: m,
            };
            let id = match PinnedLink::from_pin(&path) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| attach_err(e.to_string()))?;
                    let _ = std::fs::remove_file(&path);
                    prog.attach_to_link(link)
                        .map_err(|e| attach_err(e.to_string()))?
                }
                Err(_) => prog
                    .attach_with_options(
                        iface,
                        hook.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| attach_err(format!("TCX attach ({}): {e}", hook.name())))?,
            };
            let link = prog.take_link(id).map_err(|e| attach_err(e.to_string()))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(e.to_string()))?;
            fd.pin(&path)
                .map_err(|e| attach_err(format!("pinning link: {e}")))?;
            self.links.insert((iface.to_string(), hook), path);
        }
        Ok(())
    }

    /// Re-adopts links pinned by an earlier process: every pinned link is
    /// switched to this process's programs (atomically; traffic never sees
    /// a gap).
    pub fn adopt_links(&mut self) -> Result<Vec<String>, DatapathError> {
        let mut adopted = Vec::new();
        let dir = self.pin_dir.join("links");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DatapathError::Other(format!("{}: {e}", dir.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (iface, hook) = if let Some(i) = name.strip_suffix("-from-pod") {
                (i.to_string(), Hook::FromPod)
            } else if let Some(i) = name.strip_suffix("-to-pod") {
                (i.to_string(), Hook::ToPod)
            } else {
                continue;
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(hook.program())
                .ok_or_else(|| DatapathError::Load("program missing".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            let path = e.path();
            let err = |m: String| DatapathError::Attach {
                interface: iface.clone(),
                message: m,
            };
            let pinned = PinnedLink::from_pin(&path).map_err(|e| err(e.to_string()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(|e| err(e.to_string()))?;
            let _ = std::fs::remove_file(&path);
            let id = prog.attach_to_link(link).map_err(|e| err(e.to_string()))?;
            let link = prog.take_link(id).map_err(|e| err(e.to_string()))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| err(e.to_string()))?;
            fd.pin(&path).map_err(|e| err(e.to_string()))?;
            self.links.insert((iface.clone(), hook), path);
            adopted.push(format!("{iface} {}", hook.name()));
        }
        Ok(adopted)
    }

    /// Detaches the programs from an interface (removes the pinned links).
    pub fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
        for hook in [Hook::FromPod, Hook::ToPod] {
            let path = self.link_path(iface, hook);
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                let _ = pinned.unpin();
            }
            self.links.remove(&(iface.to_string(), hook));
        }
        Ok(())
    }

    /// Runs a program on a packet with `BPF_PROG_TEST_RUN` (`repeat` times).
    /// The packet arrives on this thread's netns loopback (ifindex 1).
    pub fn run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<RunResult, DatapathError> {
        self.test_run(hook.program(), packet, repeat, 0)
            .map(|(r, _)| r)
    }

    /// [`Datapath::run`] on a packet arriving on interface `ifindex`, a
    /// device of the calling thread's network namespace (0 or 1: loopback),
    /// as the programs see it when attached there.
    pub fn run_on(
        &self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<RunResult, DatapathError> {
        self.test_run(hook.program(), packet, repeat, ifindex)
            .map(|(r, _)| r)
    }

    /// The loaded TC program `name`.
    fn classifier(&self, name: &str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))
    }

    /// Runs the named program on `packet` with BPF_PROG_TEST_RUN; returns
    /// the result and the packet as the program left it.
    fn test_run(
        &self,
        name: &str,
        packet: &[u8],
        repeat: u32,
        ifindex: u32,
    ) -> Result<(RunResult, Vec<u8>), DatapathError> {
        let prog = self.classifier(name)?;
        let mut out = vec![0u8; packet.len() + 256];
        // A `struct __sk_buff` up to its `ifindex` (offset 40), the one
        // field set: the kernel delivers the packet on that device.
        let mut skb = [0u8; 44];
        skb[40..].copy_from_slice(&ifindex.to_ne_bytes());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: (ifindex > 1).then_some(&skb[..]),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| DatapathError::Other(format!("BPF_PROG_TEST_RUN: {}", chain(&e))))?;
        let result = RunResult {
            retval: r.return_value as i32,
            duration_ns: r.duration.as_nanos() as u64,
        };
        Ok((result, out))
    }

    /// Turns on the kernel's run-time statistics of every BPF program
    /// until the returned descriptor is dropped (each run then reads the
    /// clock twice; see [`Datapath::program_stats`]).
    pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, DatapathError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| DatapathError::Other(format!("enabling BPF run-time statistics: {e}")))
    }

    /// The kernel's run-time statistics of a hook's program: total time
    /// and runs, counted while statistics are enabled (`BPF_ENABLE_STATS`,
    /// `aya::sys::enable_stats`, or `kernel.bpf_stats_enabled`).
    pub fn program_stats(&self, hook: Hook) -> Result<(std::time::Duration, u64), DatapathError> {
        let name = hook.program();
        let prog = self.classifier(name)?;
        let info = prog
            .info()
            .map_err(|e| DatapathError::Other(format!("{name}: {e}")))?;
        Ok((info.run_time(), info.run_count()))
    }

    /// Packet and byte counters of a rule index, summed over CPUs.
    pub fn counter(&self, rule: u32) -> Result<Counter, DatapathError> {
        let v = self
            .counters
            .get(&rule, 0)
            .map_err(map_err("PALISADE_COUNTERS"))?;
        Ok(v.iter().fold(Counter::default(), |a, c| Counter {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
        }))
    }

    /// Makes `addr` a local endpoint (`Some`) that allowed packets from
    /// other local pods go straight into (see [`LocalEndpoint`]), or stops
    /// that (`None`; removing an absent address is not an error). Without
    /// an entry, packets to the address take the node's forwarding, and
    /// the receiver's interface judges them there, as before.
    pub fn set_local_endpoint(
        &mut self,
        addr: std::net::IpAddr,
        endpoint: Option<LocalEndpoint>,
    ) -> Result<(), DatapathError> {
        let key = local_key(addr);
        match endpoint {
            Some(ep) => self
                .endpoints
                .insert(key, ep, 0)
                .map_err(map_err("PALISADE_ENDPOINTS")),
            None => {
                ignore_missing(self.endpoints.remove(&key)).map_err(map_err("PALISADE_ENDPOINTS"))
            }
        }
    }

    /// Datapath statistics (`STAT_*`), summed over CPUs.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], DatapathError> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err("PALISADE_STATS"))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }

    /// Drains the verdict events the programs reported.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(e) = Event::from_bytes(&item) {
                out.push(e);
            }
        }
        out
    }

    /// The ring buffer's file descriptor, for polling.
    pub fn events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Number of tracked connections.
    pub fn conntrack_len(&self) -> usize {
        self.conn4.len() + self.conn6.len()
    }

    /// Tracked connections held in a log entry rather than their way's
    /// home (see [`CtEntry4`]); the rest of [`Datapath::conntrack_len`]
    /// were inserted while the log's next entries were taken.
    pub fn conntrack_logged(&self) -> usize {
        self.conn4.logged() + self.conn6.logged()
    }

    /// Copies of the tracked IPv4 and IPv6 connections.
    pub fn conntrack_entries(&self) -> (Vec<CtEntry4>, Vec<CtEntry6>) {
        (self.conn4.entries(), self.conn6.entries())
    }

    /// Removes tracked connections idle for longer than their timeout (the
    /// timeouts in the program's configuration) and returns how many went.
    ///
    /// Conntrack is a fixed-size set-associative table: the programs
    /// reuse a way whose connection expired when a new connection hashes
    /// to its set, but sets nobody inserts into keep their dead. Whoever
    /// owns the datapath calls this periodically (every few seconds under
    /// load; `STAT_CT_FULL` counts connections that found their set full of
    /// live ones).
    pub fn expire_conntrack(&self) -> Result<usize, DatapathError> {
        let cfg = self.config()?;
        let (now, _) = self.kernel_clock()?;
        Ok(self.conn4.expire(&cfg, now) + self.conn6.expire(&cfg, now))
    }

    /// Forgets every tracked connection; returns how many there were.
    pub fn flush_conntrack(&self) -> usize {
        self.conn4.free_where(|_| true) + self.conn6.free_where(|_| true)
    }

    /// The entries live policy depends on: nodes reachable from the slots,
    /// identity and class slots the prefixes point at (for a restart).
    pub fn read_in_use(&self) -> InUse {
        let mut u = InUse::default();
        let mut stack: Vec<u32> = self
            .slots
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v.root)
            .collect();
        while let Some(i) = stack.pop() {
            if !u.nodes.insert(i) {
                continue;
            }
            if let Ok(n) = self.nodes.get(&i, 0)
                && n.op != OP_LEAF
            {
                stack.push(n.then);
                stack.push(n.otherwise);
            }
        }
        let classes = self
            .lpm4
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v)
            .chain(self.lpm6.iter().filter_map(Result::ok).map(|(_, v)| v));
        for c in classes {
            if c.identity > 0 {
                u.identities.insert(c.identity - 1);
            }
            u.classes.insert(c.class);
        }
        u
    }

    /// A membership layout word as the programs read it.
    fn layout(&self, which: u32) -> u64 {
        self.layouts
            .get(which)
            .map_or(0, |w| w.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Reads back the slots, LPM entries and row layouts (for adoption
    /// after a restart).
    pub fn read_mirror(&self) -> Mirror {
        Mirror {
            slots: self.slots.iter().filter_map(Result::ok).collect(),
            interfaces: self
                .ifaces
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Ok(v) if v.managed != 0 => Some((i as u32, v.zone)),
                    _ => None,
                })
                .chain(self.managed.iter().filter_map(Result::ok))
                .collect(),
            lpm4: self
                .lpm4
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect(),
            lpm6: self
                .lpm6
                .iter()
                .filter_map(Result::ok)
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect(),
            layouts: (self.layout(LAYOUT_IDENTITIES), self.layout(LAYOUT_CLASSES)),
            ..Mirror::default()
        }
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

/// Writes row `slot` of a membership map at `layout`: `stride` words, one
/// atomic store each. Rows are only rewritten with supersets of what a
/// live program may read (or after the switch away from them), so a
/// program reading word by word never sees a bit it must not.
fn write_row(
    words: &Words,
    slot: u32,
    layout: u64,
    bits: &policy_core::compile::Bits,
    map: &'static str,
) -> Result<(), DatapathError> {
    let stride = member_stride(layout);
    let start = u64::from(member_base(layout)) + u64::from(slot) * u64::from(stride);
    if start + u64::from(stride) > u64::from(words.len()) {
        return Err(DatapathError::Map {
            map,
            message: format!(
                "row {slot} of {stride} words from word {start} is past the map's {} words",
                words.len()
            ),
        });
    }
    for w in 0..stride {
        let value = bits.words().get(w as usize).copied().unwrap_or(0);
        if let Some(word) = words.get(start as u32 + w) {
            word.store(value, std::sync::atomic::Ordering::Release);
        }
    }
    Ok(())
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

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc_enoent()) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn libc_enoent() -> i32 {
    2
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

/// The local delivery map's key for an address.
fn local_key(addr: std::net::IpAddr) -> LocalKey {
    let mut key = LocalKey::default();
    match addr {
        std::net::IpAddr::V4(a) => {
            key.family = FAMILY_V4;
            key.addr[..4].copy_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            key.family = FAMILY_V6;
            key.addr = a.octets();
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::snap_hz;

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
