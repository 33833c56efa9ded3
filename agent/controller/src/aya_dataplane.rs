//! The real dataplane: Palisade's TC programs loaded with aya, attached to
//! interfaces of the calling thread's network namespace, with maps and links
//! pinned either in a private bpffs directory that lives as long as the
//! dataplane, or in a node agent's directory that outlives it (so a
//! restarted agent adopts what is enforcing).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use palisade_services::ServiceTable;
use policy_bpf::datapath::Datapath;
use policy_bpf::lower::{Capacity, Mirror, WritePlan};
use policy_bpf::services::ServiceEntries;
use policy_bpf_common::{LocalEndpoint, map_names};

use crate::dataplane::{Adopted, Dataplane};
use crate::error::DataplaneError;

/// Set to a number of milliseconds, the dataplane stops that long in the
/// middle of every plan write: after the entries it prepares, before the
/// switch that makes them live. Fault injection for tests that kill the
/// process in the middle of a batch; never set in production.
pub const STALL_ENV: &str = "PALISADE_TEST_STALL_MID_WRITE_MS";

/// What a stalled write says on stderr (tests wait for it).
pub const STALL_MESSAGE: &str = "palisade fault injection: stalled in the middle of a write";

/// The kernel dataplane; programs are loaded by the first `load` or `adopt`.
#[derive(Debug, Default)]
pub struct AyaDataplane {
    datapath: Option<Datapath>,
    /// Pins that outlive the process; `None`: a private directory.
    pin_dir: Option<PathBuf>,
    /// See [`STALL_ENV`].
    stall_mid_write: Option<std::time::Duration>,
}

impl AyaDataplane {
    /// A dataplane with nothing loaded yet, pinned privately (removed when
    /// it is dropped).
    pub fn new() -> Self {
        Self::default()
    }

    /// A dataplane pinned under `pin_dir`, which it leaves behind: the
    /// programs go on enforcing after the process ends, and the next
    /// dataplane on the same directory adopts them.
    pub fn pinned(pin_dir: impl Into<PathBuf>) -> Self {
        let stall_mid_write = std::env::var(STALL_ENV)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(std::time::Duration::from_millis);
        AyaDataplane {
            datapath: None,
            pin_dir: Some(pin_dir.into()),
            stall_mid_write,
        }
    }

    /// The pin directory, when it outlives the dataplane.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The loaded datapath (for telemetry), once loaded.
    pub fn datapath(&self) -> Option<&Datapath> {
        self.datapath.as_ref()
    }

    /// Attaches only the service program (a node interface: NodePorts and
    /// external IPs reached from outside).
    pub fn attach_service(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.attach_service(ifname)?)
    }

    /// Socket-time load balancing for the sockets of processes in
    /// `cgroup` (the node's own traffic to Services): connect, sendmsg,
    /// and the frontend reported by recvmsg and getpeername.
    pub fn attach_socket_hooks(&mut self, cgroup: &Path) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.attach_socket_hooks(cgroup)?)
    }

    /// The programs on `cgroup`'s socket hooks this dataplane did not load
    /// (another balancer of the same `connect()`s); empty before it loads.
    pub fn foreign_socket_hooks(
        &self,
        cgroup: &Path,
    ) -> Result<Vec<policy_bpf::datapath::ForeignSocketHook>, DataplaneError> {
        match &self.datapath {
            Some(dp) => Ok(dp.foreign_socket_hooks(cgroup)?),
            None => Ok(Vec::new()),
        }
    }

    /// Lets the socket hooks balance the sockets of network namespace
    /// `cookie` as `who`'s.
    pub fn set_socket_netns(
        &mut self,
        cookie: u64,
        who: policy_bpf::datapath::SocketNetns,
    ) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.set_socket_netns(cookie, who)?)
    }

    /// Stops balancing the sockets of network namespace `cookie`.
    pub fn remove_socket_netns(&mut self, cookie: u64) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.remove_socket_netns(cookie)?)
    }

    /// Translated connections and ClientIP affinities held (NAT entries
    /// count both directions of each connection).
    pub fn service_state_len(&self) -> Option<(usize, usize)> {
        self.datapath.as_ref()?.service_state_len().ok()
    }

    fn loaded(&mut self) -> Result<&mut Datapath, DataplaneError> {
        self.datapath
            .as_mut()
            .ok_or_else(|| DataplaneError::Unavailable("the programs are not loaded yet".into()))
    }
}

impl Dataplane for AyaDataplane {
    fn load(&mut self, capacity: Capacity, full: &WritePlan) -> Result<(), DataplaneError> {
        let mut dp = match &self.pin_dir {
            Some(dir) => Datapath::load(dir, capacity)?,
            None => Datapath::load_private(capacity)?,
        };
        dp.write(full, &Mirror::default())?;
        self.datapath = Some(dp);
        Ok(())
    }

    fn adopt(&mut self, capacity: Capacity) -> Result<Option<Adopted>, DataplaneError> {
        // Only a directory holding the program map of an earlier load has
        // anything to adopt.
        let Some(dir) = &self.pin_dir else {
            return Ok(None);
        };
        if !dir.join(map_names::NODES).exists() {
            return Ok(None);
        }
        let mut dp = Datapath::load(dir, capacity)?;
        let interfaces = dp
            .adopt_links()?
            .into_iter()
            .filter_map(|l| l.split_once(' ').map(|(iface, _)| iface.to_string()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let adopted = Adopted {
            mirror: dp.read_mirror(),
            in_use: dp.read_in_use(),
            interfaces,
        };
        self.datapath = Some(dp);
        Ok(Some(adopted))
    }

    fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), DataplaneError> {
        let stall = self.stall_mid_write;
        let dp = self.loaded()?;
        if let Some(stall) = stall.filter(|_| !plan.prepare.is_empty()) {
            // Fault injection: the new entries are in the maps, nothing
            // points at them yet; a test kills the process here.
            let prepared = WritePlan {
                prepare: plan.prepare.clone(),
                ..WritePlan::default()
            };
            dp.write(&prepared, before)?;
            eprintln!("{STALL_MESSAGE} ({} writes prepared)", plan.prepare.len());
            std::thread::sleep(stall);
            let rest = WritePlan {
                switch: plan.switch.clone(),
                cleanup: plan.cleanup.clone(),
                ..WritePlan::default()
            };
            return Ok(dp.write(&rest, before)?);
        }
        Ok(dp.write(plan, before)?)
    }

    fn interface_index(&self, ifname: &str) -> Result<u32, DataplaneError> {
        nix::net::if_::if_nametoindex(ifname).map_err(|e| DataplaneError::NoSuchInterface {
            ifname: ifname.to_string(),
            reason: e.to_string(),
        })
    }

    fn interface_mac(&self, ifname: &str) -> Result<[u8; 6], DataplaneError> {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| DataplaneError::ListInterfaces(e.to_string()))?;
        addrs
            .filter(|a| a.interface_name == ifname)
            .find_map(|a| {
                a.address
                    .and_then(|s| s.as_link_addr().and_then(|l| l.addr()))
            })
            .ok_or_else(|| DataplaneError::NoMacAddress {
                ifname: ifname.to_string(),
            })
    }

    /// The policy programs and, first on ingress, the service program: a
    /// pod's connections to Services are translated before policy judges
    /// the backend (with no Service it passes packets on).
    fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let dp = self.loaded()?;
        dp.attach(ifname)?;
        Ok(dp.attach_service(ifname)?)
    }

    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.detach(ifname)?)
    }

    fn set_local_endpoint(
        &mut self,
        addr: IpAddr,
        to: Option<LocalEndpoint>,
    ) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.set_local_endpoint(addr, to)?)
    }

    fn expire_conntrack(&mut self) -> Result<u64, DataplaneError> {
        let datapath = self.loaded()?;
        let tracked = datapath.expire_conntrack()?;
        // Flows through Services (UDP idle, TCP closed) end as conntrack's
        // would, with it.
        Ok((tracked + datapath.expire_service_flows()?) as u64)
    }

    fn set_services(&mut self, tables: &[ServiceTable]) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.set_service_tables(tables)?)
    }

    fn services(&self) -> Option<&ServiceEntries> {
        self.datapath.as_ref()?.services()
    }
}
