//! The service maps from user space: a node's service table written in
//! (`set_services`), translated connections read back and resynchronised,
//! and the service program run on crafted packets.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use aya::maps::Map;
use palisade_services::ServiceTable;

use super::*;
use crate::services::{KeptBackends, ServiceEntries, lower_service_tables};

/// The socket-time load balancers of the node's own IPv4 and IPv6
/// sockets: `connect()`, unconnected datagrams, and the hooks that report
/// the frontend a socket addressed (received datagrams' source,
/// `getpeername()`).
///
/// In the order they are attached: those that give a socket its
/// frontend back first, then those that translate, so that no connection
/// is translated without being restored.
pub const SOCKET_PROGRAMS: [&str; 8] = [
    "palisade_recvmsg4",
    "palisade_recvmsg6",
    "palisade_getpeername4",
    "palisade_getpeername6",
    "palisade_connect4",
    "palisade_connect6",
    "palisade_sendmsg4",
    "palisade_sendmsg6",
];

/// Sets the address filter's bits for the frontends and backends the
/// service maps hold (pins adopted from a build before the filter), so
/// that the programs of this load find their connections' entries.
pub(super) fn seed_filter(ebpf: &Ebpf, filter: &Words) -> Result<(), DatapathError> {
    let map = |name: &'static str| {
        ebpf.map(name)
            .ok_or_else(|| DatapathError::Load(format!("map {name} missing")))
    };
    let frontends: BpfHashMap<&MapData, FrontendKey, FrontendValue> =
        BpfHashMap::try_from(map(map_names::SVC_FRONTENDS)?)
            .map_err(map_err(map_names::SVC_FRONTENDS))?;
    let frontends: Vec<FrontendKey> = frontends
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_err(map_names::SVC_FRONTENDS))?;
    let backends: Array<&MapData, BackendValue> =
        Array::try_from(map(map_names::SVC_BACKENDS)?).map_err(map_err(map_names::SVC_BACKENDS))?;
    let mut listed = Vec::new();
    for b in backends.iter() {
        let b = b.map_err(map_err(map_names::SVC_BACKENDS))?;
        // Unused slots are zero.
        if b.family != 0 {
            listed.push(b);
        }
    }
    set_filter_bits(filter, crate::services::filter_bits(&frontends, &listed));
    Ok(())
}

/// The configuration record builds before the service ranges
/// (2026-12-06) pinned: the two primary addresses and the flags.
const SHORT_CONFIG_BYTES: usize = 40;

/// Takes out of `pin_dir` a service configuration pinned by a build whose
/// record was shorter (the programs of this one would read past its end),
/// returning what it held for [`restore_service_config`]: each table
/// write rewrites the record whole, so until the next one the old fields
/// stand, without the ranges (the programs then use the address trie).
pub(super) fn take_short_service_config(
    pin_dir: &Path,
) -> Result<Option<ServiceConfig>, DatapathError> {
    let path = pin_dir.join(map_names::SVC_CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let err = |e: aya::maps::MapError| {
        DatapathError::Load(format!("the pinned {}: {e}", map_names::SVC_CONFIG))
    };
    let size = aya::maps::MapInfo::from_pin(&path)
        .map_err(err)?
        .value_size() as usize;
    if size == std::mem::size_of::<ServiceConfig>() {
        return Ok(None);
    }
    let mut carried = None;
    if size == SHORT_CONFIG_BYTES {
        let map = Map::Array(MapData::from_pin(&path).map_err(err)?);
        let old: Array<MapData, [u8; SHORT_CONFIG_BYTES]> = Array::try_from(map).map_err(err)?;
        let b = old.get(&0, 0).map_err(err)?;
        let mut config = ServiceConfig::default();
        config.primary_v4.copy_from_slice(&b[..16]);
        config.primary_v6.copy_from_slice(&b[16..32]);
        config.flags = u32::from_ne_bytes([b[32], b[33], b[34], b[35]]) & !CONFIG_RANGES_KNOWN;
        carried = Some(config);
    }
    std::fs::remove_file(&path)
        .map_err(|e| DatapathError::Load(format!("replacing {}: {e}", path.display())))?;
    Ok(carried)
}

/// Writes a configuration [`take_short_service_config`] carried over
/// into this load's record.
pub(super) fn restore_service_config(
    ebpf: &mut Ebpf,
    config: ServiceConfig,
) -> Result<(), DatapathError> {
    let map = ebpf
        .map_mut(map_names::SVC_CONFIG)
        .ok_or_else(|| DatapathError::Load(format!("map {} missing", map_names::SVC_CONFIG)))?;
    let mut array: Array<&mut MapData, ServiceConfig> =
        Array::try_from(map).map_err(map_err(map_names::SVC_CONFIG))?;
    array
        .set(0, config, 0)
        .map_err(map_err(map_names::SVC_CONFIG))
}

/// ORs `bits` (word → bits) into the address filter.
fn set_filter_bits(filter: &Words, bits: std::collections::BTreeMap<u32, u64>) {
    for (word, bits) in bits {
        if let Some(w) = filter.get(word) {
            w.fetch_or(bits, Ordering::Release);
        }
    }
}

impl Datapath {
    /// Writes a node's service table into the service maps (lowered with
    /// this datapath's capacities: a table that does not fit is refused
    /// with the map named, and nothing is written), then forgets the NAT
    /// state of connections whose backend the slices no longer list (UDP
    /// flows: no longer serving): their next packet is decided again, so
    /// they never reach a removed backend, and connections whose backend
    /// stays keep it, also while it terminates and new connections go
    /// elsewhere (graceful shutdown).
    pub fn set_services(&mut self, table: &ServiceTable) -> Result<(), DatapathError> {
        self.set_service_tables(std::slice::from_ref(table))
    }

    /// [`Datapath::set_services`] for a dual-stack node: one table per
    /// IP family, written as one.
    pub fn set_service_tables(&mut self, tables: &[ServiceTable]) -> Result<(), DatapathError> {
        let entries = lower_service_tables(tables, &self.service_capacity)?;
        self.write_services(&entries)?;
        let kept = KeptBackends::of(tables);
        self.services = Some(entries);
        // Backends only added (a scale-up, a new Service): no flow lost
        // its backend, and the table is not read. After a restart the
        // first table reads it (backends may have gone meanwhile).
        if !self
            .kept_backends
            .as_ref()
            .is_some_and(|before| kept.covers(before))
        {
            self.resync_nat(&kept)?;
        }
        self.kept_backends = Some(kept);
        Ok(())
    }

    /// Load-balances the IPv4 and IPv6 sockets of processes in `cgroup` (a
    /// cgroup v2 directory; its root for every process of the node): a
    /// `connect()` or unconnected datagram to a frontend is pointed at a
    /// backend before any packet exists, so host traffic needs no NAT, and
    /// replies' source and `getpeername()` name the frontend. Only the
    /// namespaces listed with [`Datapath::set_socket_netns`] are balanced;
    /// the calling thread's is listed as the node's.
    ///
    /// The links are pinned (`links/cgroup-<inode>-<program>`), so the hooks
    /// outlive this process as the TC links do: a restarting agent leaves
    /// the node's sockets balanced. A link an earlier process pinned for
    /// the same cgroup and program is released only once this one's is
    /// attached, so no socket goes without a hook (for that moment both
    /// run: the second finds a backend, not a frontend, and leaves it).
    pub fn attach_socket_hooks(&mut self, cgroup: &std::path::Path) -> Result<(), DatapathError> {
        use std::os::unix::fs::MetadataExt;

        let attach_err = |message: String| DatapathError::Attach {
            interface: format!("cgroup {}", cgroup.display()),
            message,
        };
        let file = std::fs::File::open(cgroup).map_err(|e| attach_err(e.to_string()))?;
        let inode = file
            .metadata()
            .map_err(|e| attach_err(e.to_string()))?
            .ino();
        let node = super::current_netns_cookie()?;
        self.set_socket_netns(node, super::SocketNetns::Node)?;
        // Loaded at first use (nodes without the hooks never verify them),
        // all before any is attached: loading takes the verifier a while,
        // and a node half hooked rewrites connect() without getpeername().
        for name in SOCKET_PROGRAMS {
            let prog = self.socket_program(name)?;
            if prog.fd().is_err() {
                prog.load()
                    .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
            }
        }
        for name in SOCKET_PROGRAMS {
            let path = self.socket_link_path(inode, name);
            let prog = self.socket_program(name)?;
            let id = prog
                .attach(&file, aya::programs::links::CgroupAttachMode::Single)
                .map_err(|e| attach_err(format!("{name}: {e}")))?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|e| attach_err(format!("{name}: {e}")))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| {
                    attach_err(format!("{name}: a cgroup link needs Linux 5.7: {e}"))
                })?;
            if let Ok(earlier) = PinnedLink::from_pin(&path) {
                // Unpinned and closed: the earlier process's link goes.
                let _ = earlier.unpin();
            }
            link.pin(&path)
                .map_err(|e| attach_err(format!("pinning the {name} link: {e}")))?;
        }
        Ok(())
    }

    fn socket_program(
        &mut self,
        name: &str,
    ) -> Result<&mut aya::programs::CgroupSockAddr, DatapathError> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))
    }

    /// Detaches the socket hooks from `cgroup` (removes their pinned links).
    pub fn detach_socket_hooks(&mut self, cgroup: &std::path::Path) -> Result<(), DatapathError> {
        use std::os::unix::fs::MetadataExt;

        let inode = std::fs::metadata(cgroup)
            .map_err(|e| DatapathError::Attach {
                interface: format!("cgroup {}", cgroup.display()),
                message: e.to_string(),
            })?
            .ino();
        for name in SOCKET_PROGRAMS {
            if let Ok(pinned) = PinnedLink::from_pin(self.socket_link_path(inode, name)) {
                let _ = pinned.unpin();
            }
        }
        Ok(())
    }

    fn socket_link_path(&self, cgroup_inode: u64, program: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("cgroup-{cgroup_inode}-{program}"))
    }

    /// The service entries last written.
    pub fn services(&self) -> Option<&ServiceEntries> {
        self.services.as_ref()
    }

    /// Writes `new` over the entries last written. A map write that fails
    /// midway (the kernel refusing memory, say) writes the previous
    /// entries back before returning the error, so the previous table
    /// stays in force and on record.
    fn write_services(&mut self, new: &ServiceEntries) -> Result<(), DatapathError> {
        let old = self.services.take().unwrap_or_default();
        let written = self.write_service_maps(new, &old);
        if written.is_err() {
            let _ = self.write_service_maps(&old, new);
            self.services = Some(old);
        }
        written
    }

    fn write_service_maps(
        &mut self,
        new: &ServiceEntries,
        old: &ServiceEntries,
    ) -> Result<(), DatapathError> {
        // The filter first: a packet of a connection to a backend or
        // frontend written next is looked up.
        // ClusterIPs too: the programs skip the address lookup for an
        // address the frontends' half rules out (every ClusterIP has a
        // frontend for each of its ports; these cover any without).
        let cluster_ips: Vec<FrontendKey> = new
            .addresses
            .iter()
            .filter(|(_, flags)| flags & ADDR_CLUSTER_IP != 0)
            .map(|(net, _)| {
                let (family, addr) = crate::services::net_bytes(net);
                FrontendKey {
                    addr,
                    family,
                    ..FrontendKey::default()
                }
            })
            .collect();
        set_filter_bits(
            &self.service_filter,
            crate::services::filter_bits(new.frontends.keys().chain(&cluster_ips), &new.backends),
        );
        // Backends next: a frontend written after them finds its ranges
        // in place.
        self.write_array(map_names::SVC_BACKENDS, &new.backends)?;
        {
            let mut config: Array<&mut MapData, ServiceConfig> =
                Array::try_from(self.map_mut(map_names::SVC_CONFIG)?)
                    .map_err(map_err(map_names::SVC_CONFIG))?;
            config
                .set(0, new.config, 0)
                .map_err(map_err(map_names::SVC_CONFIG))?;
        }
        {
            let mut addresses: LpmTrie<&mut MapData, SvcAddrKey, u32> =
                LpmTrie::try_from(self.map_mut(map_names::SVC_ADDRESSES)?)
                    .map_err(map_err(map_names::SVC_ADDRESSES))?;
            let key = |net: &ipnet::IpNet| {
                let (family, addr) = crate::services::net_bytes(net);
                Key::new(
                    ADDR_KEY_BITS + u32::from(net.prefix_len()),
                    SvcAddrKey {
                        family,
                        pad: [0; 3],
                        addr,
                    },
                )
            };
            let keep: BTreeSet<&ipnet::IpNet> = new.addresses.iter().map(|(n, _)| n).collect();
            for (net, flags) in &new.addresses {
                addresses
                    .insert(&key(net), *flags, 0)
                    .map_err(map_err(map_names::SVC_ADDRESSES))?;
            }
            for (net, _) in old.addresses.iter().filter(|(n, _)| !keep.contains(n)) {
                let _ = addresses.remove(&key(net));
            }
        }
        {
            let mut ranges: LpmTrie<&mut MapData, SvcRangeKey, u8> =
                LpmTrie::try_from(self.map_mut(map_names::SVC_SOURCE_RANGES)?)
                    .map_err(map_err(map_names::SVC_SOURCE_RANGES))?;
            let key = |service: u32, net: &ipnet::IpNet| {
                let (family, addr) = crate::services::net_bytes(net);
                Key::new(
                    RANGE_KEY_BITS + u32::from(net.prefix_len()),
                    SvcRangeKey {
                        service: service.to_be_bytes(),
                        family,
                        pad: [0; 3],
                        addr,
                    },
                )
            };
            let keep: BTreeSet<&(u32, ipnet::IpNet)> =
                new.source_ranges.iter().map(|(k, _)| k).collect();
            for ((service, net), flags) in &new.source_ranges {
                ranges
                    .insert(&key(*service, net), *flags, 0)
                    .map_err(map_err(map_names::SVC_SOURCE_RANGES))?;
            }
            for ((service, net), _) in old.source_ranges.iter().filter(|(k, _)| !keep.contains(k)) {
                let _ = ranges.remove(&key(*service, net));
            }
        }
        {
            let mut frontends: BpfHashMap<&mut MapData, FrontendKey, FrontendValue> =
                BpfHashMap::try_from(self.map_mut(map_names::SVC_FRONTENDS)?)
                    .map_err(map_err(map_names::SVC_FRONTENDS))?;
            for (k, v) in &new.frontends {
                frontends
                    .insert(k, v, 0)
                    .map_err(map_err(map_names::SVC_FRONTENDS))?;
            }
            for k in old
                .frontends
                .keys()
                .filter(|k| !new.frontends.contains_key(k))
            {
                let _ = frontends.remove(k);
            }
        }
        Ok(())
    }

    /// Writes `values` at indices 0.. of an array map.
    fn write_array<T: aya::Pod>(
        &mut self,
        name: &'static str,
        values: &[T],
    ) -> Result<(), DatapathError> {
        let mut array: Array<&mut MapData, T> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (i, v) in values.iter().enumerate() {
            array.set(i as u32, *v, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    pub(super) fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("map {name} missing")))
    }

    fn nat_map(&mut self) -> Result<BpfHashMap<&mut MapData, NatTuple, NatValue>, DatapathError> {
        BpfHashMap::try_from(self.map_mut(map_names::SVC_NAT)?).map_err(map_err(map_names::SVC_NAT))
    }

    /// Bits of the service address filter set (of
    /// `64 * ADDR_FILTER_WORDS`; see [`ADDR_FILTER_BITS_LOG2`]).
    pub fn service_filter_bits(&self) -> usize {
        (0..self.service_filter.len())
            .filter_map(|i| self.service_filter.get(i))
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// NAT entries (both directions of each translated connection) and
    /// ClientIP affinities held, for metrics.
    pub fn service_state_len(&self) -> Result<(usize, usize), DatapathError> {
        Ok((
            self.read_hash_map::<NatTuple, NatValue>(map_names::SVC_NAT)?
                .len(),
            self.read_hash_map::<AffinityKey, AffinityValue>(map_names::SVC_AFFINITY)?
                .len(),
        ))
    }

    /// Every NAT entry (both directions of each translated connection).
    pub fn nat_entries(&self) -> Result<Vec<(NatTuple, NatValue)>, DatapathError> {
        self.read_hash_map(map_names::SVC_NAT)
    }

    /// Every entry of the hash map `name`, read in batches of `batch`
    /// entries a system call ([`batch`]).
    fn read_hash_map<K: aya::Pod + Default, V: aya::Pod + Default>(
        &self,
        name: &'static str,
    ) -> Result<Vec<(K, V)>, DatapathError> {
        self.read_hash_map_in(name, batch::BATCH_ENTRIES)
    }

    /// [`Self::read_hash_map`] with a chosen batch size (tests: a batch
    /// smaller than a hash bucket).
    #[doc(hidden)]
    pub fn read_hash_map_in<K: aya::Pod + Default, V: aya::Pod + Default>(
        &self,
        name: &'static str,
        batch: usize,
    ) -> Result<Vec<(K, V)>, DatapathError> {
        let fail = |message: String| DatapathError::Map { map: name, message };
        let data = match self.ebpf.map(name) {
            Some(Map::HashMap(m) | Map::LruHashMap(m)) => m,
            Some(_) => return Err(fail("not a hash map".into())),
            None => return Err(DatapathError::Load(format!("map {name} missing"))),
        };
        batch::lookup_all(data.fd().as_fd(), batch)
            .map_err(|e| fail(format!("reading it in batches: {e}")))
    }

    /// Ends the flows through a frontend that the kernel's conntrack
    /// would have timed out by now ([`crate::nat_expiry`]: idle UDP,
    /// TCP reset or closed both ways); returns how many. The agent calls
    /// it with each conntrack sweep.
    pub fn expire_service_flows(&mut self) -> Result<usize, DatapathError> {
        let (_, coarse_ns) = self.kernel_clock()?;
        self.expire_service_flows_at((coarse_ns / 1_000_000_000) as u32)
    }

    /// [`Self::expire_service_flows`] at `now`, in seconds of the kernel's
    /// coarse monotonic clock (the programs' [`NatValue::seen`]). A flow
    /// a packet met since it was read is left.
    pub fn expire_service_flows_at(&mut self, now: u32) -> Result<usize, DatapathError> {
        let entries = self.nat_entries()?;
        let mut nat = self.nat_map()?;
        let mut ended = 0;
        for flow in crate::nat_expiry::expired_flows(&entries, now) {
            // A packet since the read (a new clock, a mark) or a new
            // connection on the tuple leaves the flow.
            let untouched = flow
                .iter()
                .all(|(k, read)| nat.get(k, 0).is_ok_and(|v| v == *read));
            if !untouched {
                continue;
            }
            for (k, _) in &flow {
                let _ = nat.remove(k);
            }
            ended += 1;
        }
        Ok(ended)
    }

    /// Forgets every translated connection and affinity (the verification
    /// engine's fresh start before each probe).
    pub fn flush_services_state(&mut self) -> Result<(), DatapathError> {
        let mut nat = self.nat_map()?;
        let keys: Vec<NatTuple> = nat.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = nat.remove(&k);
        }
        let mut affinity: BpfHashMap<&mut MapData, AffinityKey, AffinityValue> =
            BpfHashMap::try_from(self.map_mut(map_names::SVC_AFFINITY)?)
                .map_err(map_err(map_names::SVC_AFFINITY))?;
        let keys: Vec<AffinityKey> = affinity.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = affinity.remove(&k);
        }
        Ok(())
    }

    /// Removes the NAT entries of flows whose backend is not kept.
    /// And the socket hooks' UDP flows likewise.
    fn resync_nat(&mut self, kept: &KeptBackends) -> Result<(), DatapathError> {
        let entries = self.nat_entries()?;
        let mut nat = self.nat_map()?;
        for k in kept.forgotten(&entries) {
            let _ = nat.remove(&k);
        }
        let flows = self.socket_flows()?;
        let mut map: BpfHashMap<&mut MapData, SockReverseKey, SockFlowValue> =
            BpfHashMap::try_from(self.map_mut(map_names::SOCK_FLOWS)?)
                .map_err(map_err(map_names::SOCK_FLOWS))?;
        for k in kept.forgotten_socket_flows(&flows) {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// The socket hooks' UDP flows: (socket cookie and frontend, backend).
    pub fn socket_flows(&self) -> Result<Vec<(SockReverseKey, SockFlowValue)>, DatapathError> {
        self.read_hash_map(map_names::SOCK_FLOWS)
    }

    /// Runs the service program on a crafted packet (arriving on
    /// `ifindex`, 0 for none): its return code and the packet it left.
    pub fn run_service(
        &self,
        packet: &[u8],
        ifindex: u32,
    ) -> Result<(RunResult, Vec<u8>), DatapathError> {
        self.test_run(SERVICE_PROGRAM, packet, 1, ifindex)
    }

    /// Runs the NAT-state floor of the service benchmarks
    /// ([`Datapath::attach_nat_floor_as_service`]) on a crafted packet: its
    /// return code and the packet it left.
    pub fn run_nat_floor(&self, packet: &[u8]) -> Result<(RunResult, Vec<u8>), DatapathError> {
        self.test_run(NAT_FLOOR_PROGRAM, packet, 1, 0)
    }

    /// Runs the after-policy translation (`palisade_reply_nat`, which the
    /// policy programs tail-call) on a crafted packet: how a reply from a
    /// backend on another node meets its entries.
    pub fn run_reply_nat(&self, packet: &[u8]) -> Result<(RunResult, Vec<u8>), DatapathError> {
        self.test_run(REPLY_NAT_PROGRAM, packet, 1, 0)
    }

    /// Moves every NAT entry's clock `seconds` back, as if no packet had
    /// met the flows for that long (tests of timeouts without the wait).
    #[doc(hidden)]
    pub fn age_service_flows(&mut self, seconds: u32) -> Result<(), DatapathError> {
        let entries = self.nat_entries()?;
        let mut nat = self.nat_map()?;
        for (k, mut v) in entries {
            if v.seen != 0 {
                v.seen = v.seen.saturating_sub(seconds).max(1);
                nat.insert(k, v, 0).map_err(map_err(map_names::SVC_NAT))?;
            }
        }
        Ok(())
    }

    /// Runs the service program `repeat` times on one packet (benchmarks:
    /// the mean run time is in the result).
    pub fn run_service_repeated(
        &self,
        packet: &[u8],
        repeat: u32,
    ) -> Result<RunResult, DatapathError> {
        self.test_run(SERVICE_PROGRAM, packet, repeat, 0)
            .map(|(r, _)| r)
    }
}
