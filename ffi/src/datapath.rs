//! An engine's loaded datapath (cargo feature `datapath`): the TC programs
//! and their maps in a private bpffs pin directory that lives as long as the
//! engine, the interfaces they are attached to and the endpoints bound to
//! each.

use std::collections::{BTreeMap, BTreeSet};

use policy_bpf::datapath::{Datapath, DatapathError};
use policy_bpf::lower::{Binding, Lowering, MapWrite, Mirror, WritePlan};
use policy_core::EndpointKey;

use crate::error::FfiError;

/// The datapath and what is attached.
#[derive(Debug)]
pub struct Attached {
    dp: Datapath,
    interfaces: BTreeMap<String, Iface>,
    next_zone: u32,
}

#[derive(Debug)]
struct Iface {
    ifindex: u32,
    endpoints: BTreeSet<EndpointKey>,
    /// Addresses delivered locally through this interface.
    local: BTreeSet<std::net::IpAddr>,
}

/// The MAC of an interface in the calling thread's network namespace.
fn mac_of(ifname: &str) -> Result<[u8; 6], FfiError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| FfiError::Datapath(format!("listing interfaces: {e}")))?;
    addrs
        .filter(|a| a.interface_name == ifname)
        .find_map(|a| {
            a.address
                .and_then(|s| s.as_link_addr().and_then(|l| l.addr()))
        })
        .ok_or_else(|| {
            FfiError::NotFound(format!(
                "interface {ifname:?} has no MAC address in this network namespace"
            ))
        })
}

/// The index of an interface in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, FfiError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| {
        FfiError::NotFound(format!(
            "interface {ifname:?} does not exist in this network namespace: {e}"
        ))
    })
}

fn dp_err(e: DatapathError) -> FfiError {
    FfiError::Datapath(e.to_string())
}

fn lower_err(e: policy_bpf::lower::LowerError) -> FfiError {
    FfiError::Datapath(e.to_string())
}

/// The writes that put everything of a mirror into empty maps.
fn full_plan(m: &Mirror) -> WritePlan {
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

impl Attached {
    /// Loads the programs and writes the lowering's current entries.
    pub fn load(lowering: &Lowering) -> Result<Attached, FfiError> {
        let mut dp = Datapath::load_private(lowering.capacity()).map_err(dp_err)?;
        dp.write(&full_plan(lowering.mirror()), &Mirror::default())
            .map_err(dp_err)?;
        Ok(Attached {
            dp,
            interfaces: BTreeMap::new(),
            next_zone: 1,
        })
    }

    /// Applies a plan (rolled back by the datapath if a write fails).
    pub fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), FfiError> {
        self.dp.write(plan, before).map_err(dp_err)
    }

    /// Binds `endpoint` (if any) to `ifname` and attaches the programs.
    pub fn attach(
        &mut self,
        lowering: &mut Lowering,
        ifname: &str,
        ifindex: u32,
        endpoint: Option<EndpointKey>,
    ) -> Result<(), FfiError> {
        let mut bound = None;
        if let Some(k) = endpoint.clone() {
            match lowering.binding(&k) {
                Some(b) if b.ifindex != ifindex => {
                    return Err(FfiError::Invalid(format!(
                        "endpoint {k} is attached to interface index {}: detach that first",
                        b.ifindex
                    )));
                }
                Some(_) => {}
                None => {
                    let zone = self.next_zone;
                    let before = lowering.mirror().clone();
                    let plan = lowering
                        .bind(&k, Some(Binding { ifindex, zone }))
                        .map_err(lower_err)?;
                    if let Err(e) = self.dp.write(&plan, &before) {
                        // The maps were put back; forget the binding too.
                        let _ = lowering.bind(&k, None);
                        return Err(dp_err(e));
                    }
                    self.next_zone += 1;
                    bound = Some(k);
                }
            }
        }
        if let Err(e) = self.dp.attach(ifname) {
            if let Some(k) = bound {
                let before = lowering.mirror().clone();
                if let Ok(plan) = lowering.bind(&k, None) {
                    let _ = self.dp.write(&plan, &before);
                }
            }
            return Err(dp_err(e));
        }
        let iface = self
            .interfaces
            .entry(ifname.to_string())
            .or_insert_with(|| Iface {
                ifindex,
                endpoints: BTreeSet::new(),
                local: BTreeSet::new(),
            });
        iface.ifindex = ifindex;
        iface.endpoints.extend(endpoint);
        Ok(())
    }

    /// Detaches the programs from `ifname` and unbinds its endpoints.
    pub fn detach(&mut self, lowering: &mut Lowering, ifname: &str) -> Result<(), FfiError> {
        if !self.interfaces.contains_key(ifname) {
            return Err(FfiError::NotFound(format!(
                "interface {ifname:?} is not attached by this engine"
            )));
        }
        self.dp.detach(ifname).map_err(dp_err)?;
        let iface = self.interfaces.remove(ifname).unwrap_or(Iface {
            ifindex: 0,
            endpoints: BTreeSet::new(),
            local: BTreeSet::new(),
        });
        // Its pods are not delivered to through it any more.
        for addr in &iface.local {
            self.dp.set_local_endpoint(*addr, None).map_err(dp_err)?;
        }
        for k in iface.endpoints {
            if lowering.binding(&k).is_some() {
                let before = lowering.mirror().clone();
                let plan = lowering.bind(&k, None).map_err(lower_err)?;
                self.dp.write(&plan, &before).map_err(dp_err)?;
            }
        }
        Ok(())
    }

    /// Delivers `addr` locally through attached interface `ifname` (the
    /// host side of the pod's veth) to a pod whose MAC is `pod_mac`, or,
    /// with `None`, stops that (an address without an entry is no error).
    pub fn set_local_endpoint(
        &mut self,
        addr: std::net::IpAddr,
        to: Option<(&str, [u8; 6])>,
    ) -> Result<(), FfiError> {
        let Some((ifname, pod_mac)) = to else {
            self.dp.set_local_endpoint(addr, None).map_err(dp_err)?;
            for iface in self.interfaces.values_mut() {
                iface.local.remove(&addr);
            }
            return Ok(());
        };
        let Some(ifindex) = self.interfaces.get(ifname).map(|i| i.ifindex) else {
            return Err(FfiError::NotFound(format!(
                "interface {ifname:?} is not attached by this engine"
            )));
        };
        let host_mac = mac_of(ifname)?;
        self.dp
            .set_local_endpoint(
                addr,
                Some(policy_bpf_common::LocalEndpoint {
                    ifindex,
                    pod_mac,
                    host_mac,
                }),
            )
            .map_err(dp_err)?;
        for (name, iface) in self.interfaces.iter_mut() {
            if name == ifname {
                iface.local.insert(addr);
            } else {
                iface.local.remove(&addr);
            }
        }
        Ok(())
    }

    /// Removes idle conntrack entries.
    pub fn expire_conntrack(&mut self) -> Result<u64, FfiError> {
        self.dp.expire_conntrack().map(|n| n as u64).map_err(dp_err)
    }

    /// Attached interfaces: name, index and the endpoints bound to it.
    pub fn interfaces(&self) -> Vec<(String, u32, Vec<EndpointKey>)> {
        self.interfaces
            .iter()
            .map(|(n, i)| (n.clone(), i.ifindex, i.endpoints.iter().cloned().collect()))
            .collect()
    }
}
