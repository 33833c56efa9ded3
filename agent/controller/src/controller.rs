//! The node controller: changes are staged (each validated against the
//! staged state as it arrives), applied atomically through the incremental
//! compiler, lowered to map writes and written to the dataplane; interfaces
//! are bound to endpoints and attached. A failed apply, lowering or write
//! leaves the last applied state in force, in memory and in the dataplane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use policy_bpf::lower::{Binding, Capacity, Lowering, MapWrite, Mirror, WritePlan, full_delta};
use policy_bpf_common::{LocalEndpoint, SlotKey};
use policy_core::compile::{CompileOptions, Compiler, Delta};
use policy_core::connection::{ConnectionSpec, Peer, enforcing_endpoint, flow_between};
use policy_core::convert::SUPPORTED_KINDS;
use policy_core::error::{ErrorKind, ObjectRef};
use policy_core::flow::{Decision, Flow};
use policy_core::manifest::{ManifestSet, parse_source};
use policy_core::{
    Change, Cluster, Direction, EndpointKey, Engine, Object, ReferenceEngine, Verdict,
};

use crate::dataplane::{Dataplane, full_plan};
use crate::endpoint_json::parse_endpoint;
use crate::error::ControllerError;

/// What an apply changed: the compiler's delta and the writes it became.
#[derive(Debug, Clone)]
pub struct Applied {
    /// What changed in the compiled state.
    pub delta: Delta,
    /// The map writes made of it.
    pub plan: WritePlan,
}

/// The answer to a connection check.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Both ends allow it.
    pub allowed: bool,
    /// The evaluated flow.
    pub flow: Flow,
    /// The client's egress decision, with the endpoint that made it.
    pub egress: Option<(EndpointKey, Decision)>,
    /// The server's ingress decision.
    pub ingress: Option<(EndpointKey, Decision)>,
}

/// An interface the programs are attached to.
#[derive(Debug, Clone)]
pub struct AttachedInterface {
    /// Its index.
    pub ifindex: u32,
    /// Endpoints bound to it.
    pub endpoints: BTreeSet<EndpointKey>,
    /// Addresses delivered locally through it.
    pub local: BTreeSet<IpAddr>,
}

/// What [`Controller::start`] found and did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Whether maps and links an earlier process pinned were adopted.
    pub adopted: bool,
    /// Interfaces attached and bound to their endpoints.
    pub attached: Vec<String>,
    /// Interfaces an earlier process attached that no endpoint uses now
    /// (detached).
    pub detached: Vec<String>,
    /// Bindings that could not be made, with why (an interface that does
    /// not exist yet, say); the caller retries them.
    pub failed: Vec<(String, String)>,
}

/// One node's controller over a dataplane `D`.
#[derive(Debug)]
pub struct Controller<D: Dataplane> {
    /// Endpoints on this node get programs; `None`: every endpoint.
    node: Option<String>,
    /// The applied state.
    compiler: Compiler,
    /// The applied state plus the staged changes (validated as they come).
    staged: Cluster,
    /// Changes waiting for `apply`.
    pending: Vec<Change>,
    /// Map entries of the applied state.
    lowering: Lowering,
    dataplane: D,
    /// Whether the dataplane holds the programs (after the first attach).
    loaded: bool,
    interfaces: BTreeMap<String, AttachedInterface>,
    next_zone: u32,
}

impl<D: Dataplane> Controller<D> {
    /// An empty controller compiling for `node` (every endpoint when `None`).
    pub fn new(node: Option<String>, dataplane: D) -> Self {
        let compiler = Compiler::new(CompileOptions { node: node.clone() });
        Self::with_compiler(
            node,
            compiler,
            Lowering::new(Capacity::default()),
            dataplane,
        )
    }

    /// A controller whose applied state is `cluster`, compiled and lowered
    /// (nothing is written until the first attach).
    pub fn from_cluster(
        cluster: &Cluster,
        node: Option<String>,
        dataplane: D,
    ) -> Result<Self, ControllerError> {
        let (compiler, _) = Compiler::from_cluster(cluster, CompileOptions { node: node.clone() })?;
        Self::from_compiler(compiler, node, dataplane)
    }

    /// A controller over an already compiled state; fails when it does not
    /// fit the maps (default capacities).
    pub fn from_compiler(
        compiler: Compiler,
        node: Option<String>,
        dataplane: D,
    ) -> Result<Self, ControllerError> {
        let mut lowering = Lowering::new(Capacity::default());
        lowering.lower(&full_delta(&compiler))?;
        Ok(Self::with_compiler(node, compiler, lowering, dataplane))
    }

    fn with_compiler(
        node: Option<String>,
        compiler: Compiler,
        lowering: Lowering,
        dataplane: D,
    ) -> Self {
        Controller {
            staged: compiler.cluster().clone(),
            node,
            compiler,
            pending: Vec::new(),
            lowering,
            dataplane,
            loaded: false,
            interfaces: BTreeMap::new(),
            next_zone: 1,
        }
    }

    /// The applied, compiled state.
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    /// The map entries of the applied state.
    pub fn lowering(&self) -> &Lowering {
        &self.lowering
    }

    /// The dataplane.
    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    /// The dataplane, to inject faults into or read telemetry from.
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// Attached interfaces by name.
    pub fn interfaces(&self) -> &BTreeMap<String, AttachedInterface> {
        &self.interfaces
    }

    /// Whether the dataplane holds the programs.
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// The dataplane, giving up the controller (a restart test hands it to
    /// the next one).
    pub fn into_dataplane(self) -> D {
        self.dataplane
    }

    /// Loads the dataplane with the applied state and binds `bindings`
    /// (interface, endpoint). When an earlier process left its programs
    /// enforcing, they are adopted instead of replaced: the applied state
    /// is written beside what is live and switched over, established
    /// connections keep their conntrack zones, and interfaces it attached
    /// that no endpoint uses now are detached. Traffic never sees empty
    /// maps or the previous policy half rewritten.
    pub fn start(
        &mut self,
        bindings: &[(String, EndpointKey)],
    ) -> Result<Started, ControllerError> {
        if self.loaded {
            return Err(ControllerError::AlreadyLoaded);
        }
        self.dataplane.available()?;
        let mut started = Started::default();
        let mut usable = Vec::new();
        for (ifname, key) in bindings {
            match self.bindable(ifname, key) {
                Ok(ifindex) => usable.push((ifname.clone(), ifindex, key.clone())),
                Err(e) => started.failed.push((ifname.clone(), e.to_string())),
            }
        }
        let cap = self.lowering.capacity();
        let Some(adopted) = self.dataplane.adopt(cap)? else {
            self.dataplane
                .load(cap, &full_plan(self.lowering.mirror()))?;
            self.loaded = true;
            for (ifname, _, key) in usable {
                match self.attach(&ifname, Some(key)) {
                    Ok(()) => started.attached.push(ifname),
                    Err(e) => started.failed.push((ifname, e.to_string())),
                }
            }
            return Ok(started);
        };
        started.adopted = true;
        // An interface keeps its zone, so its tracked connections stay
        // established; new ones take zones no live interface has.
        let live = &adopted.mirror.interfaces;
        self.next_zone = live.values().max().map_or(1, |z| z + 1);
        let mut bound = Vec::new();
        for (_, ifindex, key) in &usable {
            let zone = match live.get(ifindex) {
                Some(z) => *z,
                None => {
                    self.next_zone += 1;
                    self.next_zone - 1
                }
            };
            bound.push((
                key.clone(),
                Binding {
                    ifindex: *ifindex,
                    zone,
                },
            ));
        }
        let (mut lowering, plan) = Lowering::restart(
            cap,
            &self.compiler,
            &bound,
            &adopted.mirror,
            &adopted.in_use,
        )?;
        self.dataplane.write(&plan, &adopted.mirror)?;
        lowering.release_reserved();
        self.lowering = lowering;
        self.loaded = true;
        for (ifname, ifindex, key) in usable {
            match self.dataplane.attach(&ifname) {
                Ok(()) => {
                    let iface = self.interfaces.entry(ifname.clone()).or_insert_with(|| {
                        AttachedInterface {
                            ifindex,
                            endpoints: BTreeSet::new(),
                            local: BTreeSet::new(),
                        }
                    });
                    iface.endpoints.insert(key);
                    started.attached.push(ifname);
                }
                Err(e) => started.failed.push((ifname, e.to_string())),
            }
        }
        for ifname in adopted.interfaces {
            if !self.interfaces.contains_key(&ifname) {
                self.dataplane.detach(&ifname)?;
                started.detached.push(ifname);
            }
        }
        Ok(started)
    }

    /// The index of `ifname` if `key` may be bound to it here.
    fn bindable(&self, ifname: &str, key: &EndpointKey) -> Result<u32, ControllerError> {
        check_ifname(ifname)?;
        let ep = self
            .compiler
            .cluster()
            .endpoint(key)
            .ok_or_else(|| ControllerError::EndpointNotApplied(key.clone()))?;
        if let Some(n) = &self.node
            && ep.node.as_deref() != Some(n.as_str())
        {
            return Err(ControllerError::NotOnThisNode {
                endpoint: key.clone(),
                node: n.clone(),
            });
        }
        Ok(self.dataplane.interface_index(ifname)?)
    }

    /// Stages changes after checking them against the staged state; a
    /// rejected batch stages nothing.
    pub fn stage(&mut self, changes: Vec<Change>) -> Result<(), ControllerError> {
        self.staged.apply(changes.clone())?;
        self.pending.extend(changes);
        Ok(())
    }

    /// Parses and stages every object of a manifest text; returns how many.
    /// Kinds Palisade does not act on are an error here (an embedder has
    /// nowhere to show the CLI's warning).
    pub fn load_manifests(&mut self, source: &str, text: &str) -> Result<usize, ControllerError> {
        let parsed = parse_source(source, text).map_err(|e| {
            e.into_vec()
                .into_iter()
                .next()
                .unwrap_or_else(|| policy_core::Error::new(ErrorKind::Invalid("rejected".into())))
        })?;
        if let Some(s) = parsed.skipped.first() {
            let (namespace, name) = match s.name.split_once('/') {
                Some((ns, n)) => (Some(ns), n),
                None => (None, s.name.as_str()),
            };
            return Err(policy_core::Error::new(ErrorKind::UnknownKind {
                kind: s.kind.clone(),
                api_version: s.api_version.clone(),
                supported: SUPPORTED_KINDS,
            })
            .at("kind")
            .on(ObjectRef::new(s.kind.clone(), namespace, name))
            .from_origin(s.origin.clone())
            .into());
        }
        let mut set = ManifestSet::new();
        let n = set.add_all(parsed.objects)?;
        let loaded = set.into_objects();
        let origins: BTreeMap<ObjectRef, policy_core::Origin> = loaded
            .iter()
            .map(|l| (l.object.object_ref(), l.origin.clone()))
            .collect();
        let changes = loaded
            .into_iter()
            .map(|l| Change::Upsert(l.object))
            .collect();
        self.stage(changes).map_err(|e| match e {
            // Cross-object errors (a missing tier...) name the object; say
            // where it came from.
            ControllerError::Input(e) => {
                let origin = e.object.as_ref().and_then(|o| origins.get(o)).cloned();
                ControllerError::Input(match origin {
                    Some(o) => e.from_origin(o),
                    None => e,
                })
            }
            other => other,
        })?;
        Ok(n)
    }

    /// Parses, validates and stages an endpoint given as JSON.
    pub fn upsert_endpoint_json(&mut self, json: &str) -> Result<(), ControllerError> {
        let ep = parse_endpoint(json)?;
        self.stage(vec![Change::Upsert(Object::Endpoint(ep))])
    }

    /// Stages the removal of an endpoint.
    pub fn delete_endpoint(&mut self, key: &EndpointKey) -> Result<(), ControllerError> {
        if self.staged.endpoint(key).is_none() {
            return Err(ControllerError::NoSuchEndpoint(key.clone()));
        }
        let r = ObjectRef::new("Pod", Some(&key.namespace), key.name.clone());
        self.stage(vec![Change::Delete(r)])
    }

    /// Applies the staged changes. On failure the staged changes are
    /// dropped and the last applied state stays, in memory and in the
    /// dataplane.
    pub fn apply(&mut self) -> Result<Applied, ControllerError> {
        let changes = std::mem::take(&mut self.pending);
        // The applied state is not copied up front (at 10k pods that copy
        // costs more than the change): a failure undoes the batch instead.
        let (delta, undo) = match self.compiler.apply_undoable(changes) {
            Ok(d) => d,
            Err(e) => {
                self.staged = self.compiler.cluster().clone();
                return Err(e.into());
            }
        };
        let plan = match self.lowering.lower(&delta) {
            Ok(p) => p,
            Err(e) => {
                self.undo(undo)?;
                return Err(ControllerError::ChangeNotLowered(e));
            }
        };
        if self.loaded
            && let Err(e) = self
                .dataplane
                .write(&plan, self.lowering.before_last_plan())
        {
            self.undo(undo)?;
            return Err(e.into());
        }
        Ok(Applied { delta, plan })
    }

    /// Puts the controller back as it was before a batch whose lowering or
    /// write failed (`undo` from [`Compiler::apply_undoable`]).
    fn undo(&mut self, undo: Vec<Change>) -> Result<(), ControllerError> {
        let mut previous = self.compiler.cluster().clone();
        previous.apply(undo)?;
        self.rebuild(&previous)
    }

    /// Puts the controller back to `previous` after a failed apply.
    fn rebuild(&mut self, previous: &Cluster) -> Result<(), ControllerError> {
        let (compiler, _) = Compiler::from_cluster(
            previous,
            CompileOptions {
                node: self.node.clone(),
            },
        )?;
        self.compiler = compiler;
        self.staged = previous.clone();
        let plan = self.lowering.resync(&self.compiler)?;
        if self.loaded {
            self.dataplane.write(&plan, &Mirror::default())?;
        }
        Ok(())
    }

    /// Decodes a connection end given as text: `ns/name`, `ip:ADDR`, or an
    /// address (the pod owning it, when exactly one does). Returns the peer
    /// and, for a pod named by address, that address.
    pub fn peer(
        &self,
        text: &str,
        side: &'static str,
    ) -> Result<(Peer, Option<String>), ControllerError> {
        let cluster = self.compiler.cluster();
        if let Ok(ip) = text.parse::<IpAddr>() {
            let mut owners = cluster.endpoints().filter(|e| e.ips.contains(&ip));
            return Ok(match (owners.next(), owners.next()) {
                (Some(e), None) => (Peer::Endpoint(e.key.clone()), Some(text.to_string())),
                _ => (Peer::Ip(ip), None),
            });
        }
        let p: Peer = text.parse().map_err(|m| {
            ControllerError::InvalidConnection(format!("{side}: {m} (or an IP address)"))
        })?;
        if let Peer::Endpoint(k) = &p
            && cluster.endpoint(k).is_none()
        {
            return Err(ControllerError::UnknownPeer {
                side,
                endpoint: k.clone(),
            });
        }
        Ok((p, None))
    }

    /// Checks a connection between two peers (see [`Controller::peer`])
    /// against the applied state.
    pub fn check(
        &self,
        from: (&Peer, Option<&str>),
        to: (&Peer, Option<&str>),
        spec: ConnectionSpec,
    ) -> Result<Checked, ControllerError> {
        let cluster = self.compiler.cluster();
        let flow = flow_between(cluster, from.0, to.0, spec, from.1, to.1)?;
        let mut out = Checked {
            allowed: true,
            flow,
            egress: None,
            ingress: None,
        };
        if let Some(k) = enforcing_endpoint(cluster, from.0, true) {
            let d = self.decide(&k, Direction::Egress, &flow)?;
            out.allowed &= d.verdict == Verdict::Allow;
            out.egress = Some((k, d));
        }
        if let Some(k) = enforcing_endpoint(cluster, to.0, false) {
            let d = self.decide(&k, Direction::Ingress, &flow)?;
            out.allowed &= d.verdict == Verdict::Allow;
            out.ingress = Some((k, d));
        }
        Ok(out)
    }

    /// One direction at one endpoint: from the compiled programs when the
    /// endpoint is on this node, else from the reference evaluator over the
    /// same applied state (no programs are compiled for other nodes).
    pub fn decide(
        &self,
        k: &EndpointKey,
        dir: Direction,
        flow: &Flow,
    ) -> Result<Decision, ControllerError> {
        let cluster = self.compiler.cluster();
        let local = match &self.node {
            None => true,
            Some(n) => cluster
                .endpoint(k)
                .is_some_and(|e| e.node.as_deref() == Some(n.as_str())),
        };
        let decision = if local {
            self.compiler.decide(k, dir, flow)
        } else {
            ReferenceEngine::new(cluster).decide(k, dir, flow)
        };
        Ok(decision?)
    }

    /// Every endpoint's slot keys and program roots, as they would be
    /// written were it bound (interface index and zone 0).
    pub fn slot_roots(&self) -> Result<Vec<(EndpointKey, SlotKey, u32)>, ControllerError> {
        let mut scratch = self.lowering.clone();
        let mut slots = Vec::new();
        for ep in self.compiler.cluster().endpoints() {
            let plan = scratch.bind(
                &ep.key,
                Some(Binding {
                    ifindex: 0,
                    zone: 0,
                }),
            )?;
            for w in plan.iter() {
                if let MapWrite::Slot(key, Some(value)) = w {
                    slots.push((ep.key.clone(), *key, value.root));
                }
            }
        }
        Ok(slots)
    }

    /// Attaches the programs to an interface and binds `endpoint` to it.
    /// The first attach loads the programs with the whole applied state.
    pub fn attach(
        &mut self,
        ifname: &str,
        endpoint: Option<EndpointKey>,
    ) -> Result<(), ControllerError> {
        check_ifname(ifname)?;
        if let Some(k) = &endpoint {
            let ep = self
                .compiler
                .cluster()
                .endpoint(k)
                .ok_or_else(|| ControllerError::EndpointNotApplied(k.clone()))?;
            if let Some(n) = &self.node
                && ep.node.as_deref() != Some(n.as_str())
            {
                return Err(ControllerError::NotOnThisNode {
                    endpoint: k.clone(),
                    node: n.clone(),
                });
            }
        }
        self.dataplane.available()?;
        let ifindex = self.dataplane.interface_index(ifname)?;
        if !self.loaded {
            self.dataplane
                .load(self.lowering.capacity(), &full_plan(self.lowering.mirror()))?;
            self.loaded = true;
        }
        let mut bound = None;
        if let Some(k) = endpoint.clone() {
            match self.lowering.binding(&k) {
                Some(b) if b.ifindex != ifindex => {
                    return Err(ControllerError::AttachedElsewhere {
                        endpoint: k,
                        ifindex: b.ifindex,
                    });
                }
                Some(_) => {}
                None => {
                    let zone = self.next_zone;
                    let plan = self.lowering.bind(&k, Some(Binding { ifindex, zone }))?;
                    if let Err(e) = self
                        .dataplane
                        .write(&plan, self.lowering.before_last_plan())
                    {
                        // The maps were put back; forget the binding too.
                        let _ = self.lowering.bind(&k, None);
                        return Err(e.into());
                    }
                    self.next_zone += 1;
                    bound = Some(k);
                }
            }
        }
        if let Err(e) = self.dataplane.attach(ifname) {
            if let Some(k) = bound
                && let Ok(plan) = self.lowering.bind(&k, None)
            {
                let _ = self
                    .dataplane
                    .write(&plan, self.lowering.before_last_plan());
            }
            return Err(e.into());
        }
        let iface = self
            .interfaces
            .entry(ifname.to_string())
            .or_insert_with(|| AttachedInterface {
                ifindex,
                endpoints: BTreeSet::new(),
                local: BTreeSet::new(),
            });
        iface.ifindex = ifindex;
        iface.endpoints.extend(endpoint);
        Ok(())
    }

    /// Detaches the programs from an interface and unbinds its endpoints.
    pub fn detach(&mut self, ifname: &str) -> Result<(), ControllerError> {
        check_ifname(ifname)?;
        self.dataplane.available()?;
        if !self.interfaces.contains_key(ifname) {
            return Err(ControllerError::InterfaceNotAttached(ifname.to_string()));
        }
        self.dataplane.detach(ifname)?;
        let Some(iface) = self.interfaces.remove(ifname) else {
            return Ok(());
        };
        // Its pods are not delivered to through it any more.
        for addr in &iface.local {
            self.dataplane.set_local_endpoint(*addr, None)?;
        }
        for k in iface.endpoints {
            if self.lowering.binding(&k).is_some() {
                let plan = self.lowering.bind(&k, None)?;
                self.dataplane
                    .write(&plan, self.lowering.before_last_plan())?;
            }
        }
        Ok(())
    }

    /// Delivers `addr` locally through attached interface `ifname` (the
    /// host side of the pod's veth) to a pod whose MAC is `pod_mac`, or,
    /// with `None`, stops that (an address without an entry is no error).
    pub fn set_local_endpoint(
        &mut self,
        addr: IpAddr,
        to: Option<(&str, [u8; 6])>,
    ) -> Result<(), ControllerError> {
        if let Some((ifname, _)) = to {
            check_ifname(ifname)?;
        }
        self.dataplane.available()?;
        if !self.loaded {
            return Err(ControllerError::NotLoaded);
        }
        let Some((ifname, pod_mac)) = to else {
            self.dataplane.set_local_endpoint(addr, None)?;
            for iface in self.interfaces.values_mut() {
                iface.local.remove(&addr);
            }
            return Ok(());
        };
        let Some(ifindex) = self.interfaces.get(ifname).map(|i| i.ifindex) else {
            return Err(ControllerError::InterfaceNotAttached(ifname.to_string()));
        };
        let host_mac = self.dataplane.interface_mac(ifname)?;
        self.dataplane.set_local_endpoint(
            addr,
            Some(LocalEndpoint {
                ifindex,
                pod_mac,
                host_mac,
            }),
        )?;
        for (name, iface) in self.interfaces.iter_mut() {
            if name == ifname {
                iface.local.insert(addr);
            } else {
                iface.local.remove(&addr);
            }
        }
        Ok(())
    }

    /// Sweeps idle connections out of conntrack; returns how many.
    pub fn expire_conntrack(&mut self) -> Result<u64, ControllerError> {
        self.dataplane.available()?;
        if !self.loaded {
            return Err(ControllerError::NotLoaded);
        }
        Ok(self.dataplane.expire_conntrack()?)
    }
}

/// Interface names as the kernel takes them (IFNAMSIZ is 16 with the NUL).
fn check_ifname(ifname: &str) -> Result<(), ControllerError> {
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(ControllerError::BadInterfaceName(ifname.to_string()));
    }
    Ok(())
}
