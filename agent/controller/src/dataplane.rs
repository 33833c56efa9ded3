//! The dataplane behind the controller: a trait, so the controller's logic
//! runs the same against the kernel ([`crate::AyaDataplane`], feature `aya`)
//! and against memory ([`MirrorDataplane`], for tests and dry runs).

use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_services::ServiceTable;
use policy_bpf::lower::{Capacity, InUse, MapWrite, Mirror, WritePlan};
use policy_bpf::services::{ServiceCapacity, ServiceEntries, lower_service_tables};
use policy_bpf_common::LocalEndpoint;

use crate::error::DataplaneError;

/// What an earlier process left enforcing: its maps and attached links.
#[derive(Debug, Clone, Default)]
pub struct Adopted {
    /// What the maps hold (slots, interfaces, prefixes, layouts).
    pub mirror: Mirror,
    /// The entries live policy depends on.
    pub in_use: InUse,
    /// Interfaces whose links were adopted (now running this process's
    /// programs).
    pub interfaces: Vec<String>,
}

/// Where policy is enforced. Calls come in the controller's order: `load`
/// or `adopt` once (before any other write), then writes, attaches and
/// the rest.
pub trait Dataplane {
    /// Whether this dataplane can load programs here; the error says why not.
    fn available(&self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Loads the programs with maps of `capacity` and writes `full` (the
    /// whole current state) into them.
    fn load(&mut self, capacity: Capacity, full: &WritePlan) -> Result<(), DataplaneError>;
    /// Loads the programs over maps and links an earlier process left
    /// pinned, without changing what they enforce; `None` when nothing was
    /// left (then `load` follows). Dataplanes that do not outlive their
    /// process never have anything to adopt.
    fn adopt(&mut self, _capacity: Capacity) -> Result<Option<Adopted>, DataplaneError> {
        Ok(None)
    }
    /// Writes a plan; on failure the maps are as `before` says (the
    /// implementation rolls back what it wrote).
    fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), DataplaneError>;
    /// The index of a network interface.
    fn interface_index(&self, ifname: &str) -> Result<u32, DataplaneError>;
    /// The MAC address of a network interface.
    fn interface_mac(&self, ifname: &str) -> Result<[u8; 6], DataplaneError>;
    /// Attaches the programs to an interface.
    fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError>;
    /// Detaches the programs from an interface.
    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError>;
    /// Delivers `addr` locally to `to`, or stops that (`None`).
    fn set_local_endpoint(
        &mut self,
        addr: IpAddr,
        to: Option<LocalEndpoint>,
    ) -> Result<(), DataplaneError>;
    /// Removes idle connections from conntrack, and flows through
    /// Services past conntrack's timeouts (UDP idle, TCP reset or closed
    /// both ways); returns how many.
    fn expire_conntrack(&mut self) -> Result<u64, DataplaneError>;
    /// Replaces the service tables, one per IP family (frontends and the
    /// backends each traffic class reaches); refused as a whole, naming
    /// the full map, when they do not fit: the previous ones stay in force.
    fn set_services(&mut self, tables: &[ServiceTable]) -> Result<(), DataplaneError>;
    /// The service map entries last written.
    fn services(&self) -> Option<&ServiceEntries>;
}

/// The writes that put everything of a mirror into empty maps, in the safe
/// order (entries first, then what points at them).
pub fn full_plan(m: &Mirror) -> WritePlan {
    let mut plan = WritePlan::default();
    let mut nodes: Vec<_> = m.nodes.iter().collect();
    nodes.sort_by_key(|(i, _)| **i);
    plan.prepare
        .extend(nodes.into_iter().map(|(i, n)| MapWrite::Node(*i, *n)));
    let (identities, classes) = m.layouts;
    plan.prepare.extend(
        m.identities
            .iter()
            .map(|(i, b)| MapWrite::Identity(*i, identities, b.clone())),
    );
    plan.prepare.extend(
        m.classes
            .iter()
            .map(|(i, b)| MapWrite::Class(*i, classes, b.clone())),
    );
    plan.switch.push(MapWrite::Layouts(identities, classes));
    plan.switch.extend(
        m.lpm4
            .iter()
            .map(|((l, a), c)| MapWrite::Lpm4(*l, *a, Some(*c))),
    );
    plan.switch.extend(
        m.lpm6
            .iter()
            .map(|((l, a), c)| MapWrite::Lpm6(*l, *a, Some(*c))),
    );
    plan.switch
        .extend(m.slots.iter().map(|(k, v)| MapWrite::Slot(*k, Some(*v))));
    plan.switch.extend(
        m.interfaces
            .iter()
            .map(|(i, z)| MapWrite::Interface(*i, Some(*z))),
    );
    plan
}

/// A dataplane in memory: the maps as a [`Mirror`], interfaces by name.
/// Writes can be refused on purpose to test what the controller does when
/// the kernel refuses.
#[derive(Debug, Clone, Default)]
pub struct MirrorDataplane {
    /// The maps' contents.
    pub maps: Mirror,
    /// Whether `load` was called.
    pub loaded: bool,
    /// Known interfaces: name to (index, MAC).
    pub interfaces: BTreeMap<String, (u32, [u8; 6])>,
    /// Interfaces the programs are attached to.
    pub attached: Vec<String>,
    /// Locally delivered addresses.
    pub local: BTreeMap<IpAddr, LocalEndpoint>,
    /// Writes made so far (whole plans count once).
    pub writes: usize,
    /// The service maps' sizes (from `load`).
    pub service_capacity: ServiceCapacity,
    /// The service entries last set.
    pub services: Option<ServiceEntries>,
    refuse: usize,
}

impl MirrorDataplane {
    /// A dataplane that knows `interfaces` (name, index, MAC).
    pub fn with_interfaces<'a>(
        interfaces: impl IntoIterator<Item = (&'a str, u32, [u8; 6])>,
    ) -> Self {
        MirrorDataplane {
            interfaces: interfaces
                .into_iter()
                .map(|(n, i, m)| (n.to_string(), (i, m)))
                .collect(),
            ..Default::default()
        }
    }

    /// Refuses the next `n` plan writes (loads included), leaving the maps
    /// as they were, as a kernel that fails a write and rolls back would.
    pub fn refuse_next_writes(&mut self, n: usize) {
        self.refuse = n;
    }

    fn write_all(&mut self, plan: &WritePlan) -> Result<(), DataplaneError> {
        if self.refuse > 0 {
            self.refuse -= 1;
            return Err(DataplaneError::Refused(self.writes));
        }
        for w in plan.iter() {
            self.maps.apply(w);
        }
        self.writes += 1;
        Ok(())
    }

    fn known(&self, ifname: &str) -> Result<(u32, [u8; 6]), DataplaneError> {
        self.interfaces
            .get(ifname)
            .copied()
            .ok_or_else(|| DataplaneError::NoSuchInterface {
                ifname: ifname.to_string(),
                reason: "not known to the in-memory dataplane".into(),
            })
    }
}

impl Dataplane for MirrorDataplane {
    fn load(&mut self, capacity: Capacity, full: &WritePlan) -> Result<(), DataplaneError> {
        self.write_all(full)?;
        self.loaded = true;
        self.service_capacity = capacity.services;
        Ok(())
    }

    /// A mirror that was loaded before stands for maps a process left
    /// pinned (hand a controller's dataplane to a new one to test a restart).
    fn adopt(&mut self, _capacity: Capacity) -> Result<Option<Adopted>, DataplaneError> {
        if !self.loaded {
            return Ok(None);
        }
        Ok(Some(Adopted {
            mirror: self.maps.clone(),
            in_use: self.maps.in_use(),
            interfaces: self.attached.clone(),
        }))
    }

    fn write(&mut self, plan: &WritePlan, _before: &Mirror) -> Result<(), DataplaneError> {
        self.write_all(plan)
    }

    fn interface_index(&self, ifname: &str) -> Result<u32, DataplaneError> {
        self.known(ifname).map(|(i, _)| i)
    }

    fn interface_mac(&self, ifname: &str) -> Result<[u8; 6], DataplaneError> {
        self.known(ifname).map(|(_, m)| m)
    }

    fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.known(ifname)?;
        if !self.attached.iter().any(|a| a == ifname) {
            self.attached.push(ifname.to_string());
        }
        Ok(())
    }

    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.attached.retain(|a| a != ifname);
        Ok(())
    }

    fn set_local_endpoint(
        &mut self,
        addr: IpAddr,
        to: Option<LocalEndpoint>,
    ) -> Result<(), DataplaneError> {
        match to {
            Some(ep) => self.local.insert(addr, ep),
            None => self.local.remove(&addr),
        };
        Ok(())
    }

    fn expire_conntrack(&mut self) -> Result<u64, DataplaneError> {
        // No connections are tracked in memory.
        Ok(0)
    }

    fn set_services(&mut self, tables: &[ServiceTable]) -> Result<(), DataplaneError> {
        let entries = lower_service_tables(tables, &self.service_capacity)
            .map_err(|e| DataplaneError::Datapath(e.into()))?;
        self.services = Some(entries);
        Ok(())
    }

    fn services(&self) -> Option<&ServiceEntries> {
        self.services.as_ref()
    }
}

/// A dataplane that cannot load programs (a build without the kernel
/// side): every operation fails with the reason given.
#[derive(Debug, Clone)]
pub struct UnavailableDataplane(pub String);

impl UnavailableDataplane {
    fn error(&self) -> DataplaneError {
        DataplaneError::Unavailable(self.0.clone())
    }
}

impl Dataplane for UnavailableDataplane {
    fn available(&self) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn load(&mut self, _: Capacity, _: &WritePlan) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn write(&mut self, _: &WritePlan, _: &Mirror) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn interface_index(&self, _: &str) -> Result<u32, DataplaneError> {
        Err(self.error())
    }
    fn interface_mac(&self, _: &str) -> Result<[u8; 6], DataplaneError> {
        Err(self.error())
    }
    fn attach(&mut self, _: &str) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn detach(&mut self, _: &str) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn set_local_endpoint(
        &mut self,
        _: IpAddr,
        _: Option<LocalEndpoint>,
    ) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn expire_conntrack(&mut self) -> Result<u64, DataplaneError> {
        Err(self.error())
    }
    fn set_services(&mut self, _: &[ServiceTable]) -> Result<(), DataplaneError> {
        Err(self.error())
    }
    fn services(&self) -> Option<&ServiceEntries> {
        None
    }
}
