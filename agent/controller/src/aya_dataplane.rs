//! The real dataplane: Palisade's TC programs loaded with aya into a private
//! bpffs pin directory that lives as long as the dataplane, attached to
//! interfaces of the calling thread's network namespace.

use std::net::IpAddr;

use policy_bpf::datapath::Datapath;
use policy_bpf::lower::{Capacity, Mirror, WritePlan};
use policy_bpf_common::LocalEndpoint;

use crate::dataplane::Dataplane;
use crate::error::DataplaneError;

/// The kernel dataplane; programs are loaded by the first `load`.
#[derive(Debug, Default)]
pub struct AyaDataplane {
    datapath: Option<Datapath>,
}

impl AyaDataplane {
    /// A dataplane with nothing loaded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The loaded datapath (for telemetry), once loaded.
    pub fn datapath(&self) -> Option<&Datapath> {
        self.datapath.as_ref()
    }

    fn loaded(&mut self) -> Result<&mut Datapath, DataplaneError> {
        self.datapath
            .as_mut()
            .ok_or_else(|| DataplaneError::Unavailable("the programs are not loaded yet".into()))
    }
}

impl Dataplane for AyaDataplane {
    fn load(&mut self, capacity: Capacity, full: &WritePlan) -> Result<(), DataplaneError> {
        let mut dp = Datapath::load_private(capacity)?;
        dp.write(full, &Mirror::default())?;
        self.datapath = Some(dp);
        Ok(())
    }

    fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.write(plan, before)?)
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

    fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        Ok(self.loaded()?.attach(ifname)?)
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
        Ok(self.loaded()?.expire_conntrack()? as u64)
    }
}
