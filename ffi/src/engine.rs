//! The engine behind a handle, in safe Rust: staged changes validated as they
//! arrive, applied atomically through the incremental compiler, lowered to
//! eBPF map entries and, once attached, written to the datapath.

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_bpf::lower::{Capacity, Lowering, MapWrite, Mirror, WritePlan};
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::connection::{ConnectionSpec, Peer, enforcing_endpoint, flow_between};
use policy_core::connection::{Engine as _, EngineError};
use policy_core::convert::SUPPORTED_KINDS;
use policy_core::error::{ErrorKind, ObjectRef};
use policy_core::flow::{Decision, Flow};
use policy_core::manifest::{ManifestSet, parse_source};
use policy_core::model::{DeclaredPort, Endpoint};
use policy_core::net::{PortMatch, Protocol};
use policy_core::{Change, Cluster, Direction, EndpointKey, Error, Object, ReferenceEngine};
use serde::Deserialize;

use crate::error::FfiError;
use crate::render;

/// One engine.
#[derive(Debug)]
pub struct Engine {
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
    /// The loaded datapath, after the first attach.
    #[cfg(feature = "datapath")]
    datapath: Option<crate::datapath::Attached>,
}

/// A connection as the C caller gave it, already decoded.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionArgs<'a> {
    /// Client text.
    pub src: &'a str,
    /// Server text.
    pub dst: &'a str,
    /// Protocol number.
    pub protocol: u32,
    /// Source port, 0 for the default.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// ICMP type or -1.
    pub icmp_type: i32,
    /// ICMP code or -1.
    pub icmp_code: i32,
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

/// The endpoint JSON accepted by `palisade_upsert_endpoint`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EndpointSpec {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    profiles: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    #[serde(default)]
    name: String,
    port: i64,
    #[serde(default)]
    protocol: Option<String>,
}

impl Engine {
    /// An empty engine compiling for `node` (every endpoint when `None`).
    pub fn new(node: Option<String>) -> Engine {
        let compiler = Compiler::new(CompileOptions { node: node.clone() });
        Engine {
            staged: compiler.cluster().clone(),
            node,
            compiler,
            pending: Vec::new(),
            lowering: Lowering::new(Capacity::default()),
            #[cfg(feature = "datapath")]
            datapath: None,
        }
    }

    /// Stages changes after checking them against the staged state; a
    /// rejected batch stages nothing.
    fn stage(&mut self, changes: Vec<Change>) -> Result<(), policy_core::Error> {
        self.staged.apply(changes.clone())?;
        self.pending.extend(changes);
        Ok(())
    }

    /// Parses and stages every object of a manifest text. Unlike the CLI,
    /// which skips kinds Palisade does not act on with a warning, the C ABI
    /// has nowhere to warn, so such a document is an error here.
    pub fn load_manifests(&mut self, source: &str, text: &str) -> Result<usize, FfiError> {
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
        let loaded = parsed.objects;
        let mut set = ManifestSet::new();
        let n = set.add_all(loaded)?;
        let loaded = set.into_objects();
        let origins: BTreeMap<ObjectRef, policy_core::Origin> = loaded
            .iter()
            .map(|l| (l.object.object_ref(), l.origin.clone()))
            .collect();
        let changes = loaded
            .into_iter()
            .map(|l| Change::Upsert(l.object))
            .collect();
        self.stage(changes).map_err(|e| {
            // Cross-object errors (a missing tier...) name the object; say
            // where it came from.
            let origin = e.object.as_ref().and_then(|o| origins.get(o)).cloned();
            match origin {
                Some(o) => e.from_origin(o),
                None => e,
            }
        })?;
        Ok(n)
    }

    /// Parses, validates and stages an endpoint.
    pub fn upsert_endpoint(&mut self, json: &str) -> Result<(), FfiError> {
        let ep = parse_endpoint(json)?;
        self.stage(vec![Change::Upsert(Object::Endpoint(ep))])?;
        Ok(())
    }

    /// Stages the removal of an endpoint.
    pub fn delete_endpoint(&mut self, namespace: &str, name: &str) -> Result<(), FfiError> {
        let r = ObjectRef::new("Pod", Some(namespace), name);
        if self
            .staged
            .endpoint(&EndpointKey::new(namespace, name))
            .is_none()
        {
            return Err(FfiError::NotFound(format!(
                "endpoint {namespace}/{name} does not exist"
            )));
        }
        self.stage(vec![Change::Delete(r)])?;
        Ok(())
    }

    /// Applies the staged changes; returns the delta as JSON. On failure
    /// the staged changes are dropped and the last applied state stays.
    pub fn apply(&mut self) -> Result<String, FfiError> {
        let changes = std::mem::take(&mut self.pending);
        let previous = self.compiler.cluster().clone();
        let delta = match self.compiler.apply(changes) {
            Ok(d) => d,
            Err(e) => {
                self.staged = previous;
                return Err(e.into());
            }
        };
        let before = self
            .datapath_loaded()
            .then(|| self.lowering.mirror().clone());
        let plan = match self.lowering.lower(&delta) {
            Ok(p) => p,
            Err(e) => {
                self.rebuild(&previous)?;
                return Err(FfiError::Datapath(format!(
                    "lowering the change to map entries failed, nothing was applied: {e}"
                )));
            }
        };
        if let Some(before) = before
            && let Err(e) = self.write_plan(&plan, &before)
        {
            self.rebuild(&previous)?;
            return Err(e);
        }
        Ok(render::delta(&delta, &plan, &self.compiler))
    }

    /// Puts the engine back to `previous` after a failed apply.
    fn rebuild(&mut self, previous: &Cluster) -> Result<(), FfiError> {
        let (compiler, _) = Compiler::from_cluster(
            previous,
            CompileOptions {
                node: self.node.clone(),
            },
        )?;
        self.compiler = compiler;
        self.staged = previous.clone();
        let plan = self
            .lowering
            .resync(&self.compiler)
            .map_err(|e| FfiError::Datapath(e.to_string()))?;
        if self.datapath_loaded() {
            self.write_plan(&plan, &Mirror::default())?;
        }
        Ok(())
    }

    /// Checks a connection against the applied state.
    pub fn check(&self, c: &ConnectionArgs<'_>) -> Result<Checked, FfiError> {
        let cluster = self.compiler.cluster();
        let (from, from_ip) = peer(cluster, c.src, "src")?;
        let (to, to_ip) = peer(cluster, c.dst, "dst")?;
        let protocol = Protocol::from_number(i64::from(c.protocol))
            .map_err(|m| FfiError::Invalid(format!("protocol: {m}")))?;
        let icmp_part = |v: i32, what: &str| -> Result<Option<u8>, FfiError> {
            match v {
                -1 => Ok(None),
                0..=255 => Ok(Some(v as u8)),
                _ => Err(FfiError::Invalid(format!(
                    "{what} {v} is out of range: 0-255, or -1 for the default"
                ))),
            }
        };
        let icmp_type = icmp_part(c.icmp_type, "icmp_type")?;
        let icmp_code = icmp_part(c.icmp_code, "icmp_code")?;
        if !protocol.has_ports() && (c.src_port != 0 || c.dst_port != 0) {
            return Err(FfiError::Invalid(format!(
                "protocol {protocol} has no ports: set src_port and dst_port to 0"
            )));
        }
        let is_icmp = protocol.is_icmp();
        if !is_icmp && (icmp_type.is_some() || icmp_code.is_some()) {
            return Err(FfiError::Invalid(format!(
                "ICMP type/code given for protocol {protocol}: set them to -1"
            )));
        }
        let spec = ConnectionSpec {
            protocol,
            dst_port: (c.dst_port != 0).then_some(c.dst_port),
            src_port: (c.src_port != 0).then_some(c.src_port),
            icmp: match (icmp_type, icmp_code) {
                (None, None) => None,
                (Some(t), code) => Some((t, code.unwrap_or(0))),
                (None, Some(_)) => {
                    return Err(FfiError::Invalid(
                        "icmp_code is set but icmp_type is -1: give the type too".into(),
                    ));
                }
            },
            ip_version: None,
        };
        let flow = flow_between(
            cluster,
            &from,
            &to,
            spec,
            from_ip.as_deref(),
            to_ip.as_deref(),
        )
        .map_err(FfiError::Invalid)?;
        let mut out = Checked {
            allowed: true,
            flow,
            egress: None,
            ingress: None,
        };
        if let Some(k) = enforcing_endpoint(cluster, &from, true) {
            let d = self.decide(&k, Direction::Egress, &flow)?;
            out.allowed &= d.verdict == policy_core::Verdict::Allow;
            out.egress = Some((k, d));
        }
        if let Some(k) = enforcing_endpoint(cluster, &to, false) {
            let d = self.decide(&k, Direction::Ingress, &flow)?;
            out.allowed &= d.verdict == policy_core::Verdict::Allow;
            out.ingress = Some((k, d));
        }
        Ok(out)
    }

    /// One direction at one endpoint: from the compiled programs when the
    /// endpoint is on this node, else from the reference evaluator over the
    /// same applied state (no programs are compiled for other nodes).
    fn decide(&self, k: &EndpointKey, dir: Direction, flow: &Flow) -> Result<Decision, FfiError> {
        let cluster = self.compiler.cluster();
        let local = match &self.node {
            None => true,
            Some(n) => cluster
                .endpoint(k)
                .is_some_and(|e| e.node.as_deref() == Some(n.as_str())),
        };
        let r = if local {
            self.compiler.decide(k, dir, flow)
        } else {
            ReferenceEngine::new(cluster).decide(k, dir, flow)
        };
        r.map_err(|e| match e {
            EngineError::UnknownEndpoint(_) => FfiError::NotFound(e.to_string()),
            EngineError::Unavailable(_) => FfiError::Datapath(e.to_string()),
            _ => FfiError::Invalid(e.to_string()),
        })
    }

    /// The lowered map entries as JSON.
    pub fn export_maps(&self) -> Result<String, FfiError> {
        // Slot roots are read by binding every endpoint on a scratch copy.
        let mut scratch = self.lowering.clone();
        let mut slots = Vec::new();
        for ep in self.compiler.cluster().endpoints() {
            let plan = scratch
                .bind(
                    &ep.key,
                    Some(policy_bpf::lower::Binding {
                        ifindex: 0,
                        zone: 0,
                    }),
                )
                .map_err(|e| FfiError::Datapath(e.to_string()))?;
            for w in plan.iter() {
                if let MapWrite::Slot(key, Some(value)) = w {
                    slots.push((ep.key.clone(), *key, value.root));
                }
            }
        }
        Ok(render::maps(&self.lowering, &slots, self.bindings()))
    }

    fn bindings(&self) -> Vec<(String, u32, Vec<EndpointKey>)> {
        #[cfg(feature = "datapath")]
        if let Some(a) = &self.datapath {
            return a.interfaces();
        }
        Vec::new()
    }

    fn datapath_loaded(&self) -> bool {
        #[cfg(feature = "datapath")]
        return self.datapath.is_some();
        #[cfg(not(feature = "datapath"))]
        false
    }

    /// Writes a plan to the loaded datapath (no-op without one).
    fn write_plan(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), FfiError> {
        #[cfg(feature = "datapath")]
        if let Some(a) = &mut self.datapath {
            return a.write(plan, before);
        }
        let _ = (plan, before);
        Ok(())
    }

    /// Attaches the programs to an interface and binds `endpoint` to it.
    pub fn attach(&mut self, ifname: &str, endpoint: Option<EndpointKey>) -> Result<(), FfiError> {
        check_ifname(ifname)?;
        if let Some(k) = &endpoint {
            let ep = self.compiler.cluster().endpoint(k).ok_or_else(|| {
                FfiError::NotFound(format!(
                    "endpoint {k} does not exist (upsert it and apply first)"
                ))
            })?;
            if let Some(n) = &self.node
                && ep.node.as_deref() != Some(n.as_str())
            {
                return Err(FfiError::Invalid(format!(
                    "endpoint {k} is not on node {n}: it has no programs to attach"
                )));
            }
        }
        #[cfg(feature = "datapath")]
        {
            let ifindex = crate::datapath::ifindex(ifname)?;
            if self.datapath.is_none() {
                self.datapath = Some(crate::datapath::Attached::load(&self.lowering)?);
            }
            let a = self
                .datapath
                .as_mut()
                .ok_or_else(|| FfiError::Panic("the datapath vanished after loading".into()))?;
            a.attach(&mut self.lowering, ifname, ifindex, endpoint)
        }
        #[cfg(not(feature = "datapath"))]
        {
            let _ = endpoint;
            Err(no_datapath())
        }
    }

    /// Detaches the programs from an interface and unbinds its endpoints.
    pub fn detach(&mut self, ifname: &str) -> Result<(), FfiError> {
        check_ifname(ifname)?;
        #[cfg(feature = "datapath")]
        {
            match &mut self.datapath {
                Some(a) => a.detach(&mut self.lowering, ifname),
                None => Err(FfiError::NotFound(format!(
                    "interface {ifname:?} is not attached by this engine"
                ))),
            }
        }
        #[cfg(not(feature = "datapath"))]
        Err(no_datapath())
    }

    /// Delivers `addr` locally through attached interface `ifname` to a pod
    /// whose MAC is `pod_mac`, or stops that (`None`).
    pub fn set_local_endpoint(
        &mut self,
        addr: std::net::IpAddr,
        to: Option<(&str, [u8; 6])>,
    ) -> Result<(), FfiError> {
        if let Some((ifname, _)) = to {
            check_ifname(ifname)?;
        }
        #[cfg(feature = "datapath")]
        {
            match &mut self.datapath {
                Some(a) => a.set_local_endpoint(addr, to),
                None => Err(FfiError::NotFound(
                    "no datapath is loaded: attach an interface first".into(),
                )),
            }
        }
        #[cfg(not(feature = "datapath"))]
        {
            let _ = (addr, to);
            Err(no_datapath())
        }
    }

    /// Sweeps idle connections out of the datapath's conntrack table;
    /// returns how many were removed.
    pub fn expire_conntrack(&mut self) -> Result<u64, FfiError> {
        #[cfg(feature = "datapath")]
        {
            match &mut self.datapath {
                Some(a) => a.expire_conntrack(),
                None => Err(FfiError::NotFound(
                    "no datapath is loaded: attach an interface first".into(),
                )),
            }
        }
        #[cfg(not(feature = "datapath"))]
        Err(no_datapath())
    }
}

#[cfg(not(feature = "datapath"))]
fn no_datapath() -> FfiError {
    FfiError::Datapath(
        "this build of libpalisade has no datapath (cargo feature `datapath` is off)".into(),
    )
}

fn check_ifname(ifname: &str) -> Result<(), FfiError> {
    // IFNAMSIZ is 16 with the NUL.
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(FfiError::Invalid(format!(
            "{ifname:?} is not an interface name: 1-15 bytes without '/', NUL or spaces"
        )));
    }
    Ok(())
}

/// Decodes a connection end: the peer, and the address to use when the
/// caller named the pod by one of its addresses.
fn peer(cluster: &Cluster, text: &str, what: &str) -> Result<(Peer, Option<String>), FfiError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        let mut owners = cluster.endpoints().filter(|e| e.ips.contains(&ip));
        return Ok(match (owners.next(), owners.next()) {
            (Some(e), None) => (Peer::Endpoint(e.key.clone()), Some(text.to_string())),
            _ => (Peer::Ip(ip), None),
        });
    }
    let p: Peer = text
        .parse()
        .map_err(|m| FfiError::Invalid(format!("{what}: {m} (or an IP address)")))?;
    if let Peer::Endpoint(k) = &p
        && cluster.endpoint(k).is_none()
    {
        return Err(FfiError::NotFound(format!(
            "{what}: endpoint {k} does not exist in the applied state"
        )));
    }
    Ok((p, None))
}

/// Parses and validates the endpoint JSON.
fn parse_endpoint(json: &str) -> Result<Endpoint, Error> {
    let spec: EndpointSpec = serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_str(json),
    )
    .map_err(|e| {
        let path = e.path().to_string();
        let err = Error::new(ErrorKind::Syntax {
            format: "JSON",
            message: e.into_inner().to_string(),
        });
        if path == "." { err } else { err.at(path) }
    })?;
    let object = ObjectRef::new("Pod", Some(&spec.namespace), spec.name.clone());
    let on = |e: Error| e.on(object.clone());
    for (field, v) in [("namespace", &spec.namespace), ("name", &spec.name)] {
        if v.is_empty() || v.len() > 253 || v.contains('/') || v.chars().any(char::is_whitespace) {
            return Err(on(Error::invalid(
                field,
                format!("{v:?} is not a valid {field}: 1-253 characters without '/' or spaces"),
            )));
        }
    }
    let labels = policy_core::convert::check_labels(&spec.labels, "labels").map_err(on)?;
    let mut ips = Vec::new();
    for (i, ip) in spec.ips.iter().enumerate() {
        let ip: IpAddr = ip.parse().map_err(|_| {
            on(Error::invalid(
                format!("ips[{i}]"),
                format!("{ip:?} is not an IP address"),
            ))
        })?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = format!("ports[{i}]");
        let protocol = Protocol::parse(p.protocol.as_deref().unwrap_or("TCP"))
            .map_err(|m| on(Error::invalid(format!("{f}.protocol"), m)))?;
        if !protocol.has_ports() {
            return Err(on(Error::invalid(
                format!("{f}.protocol"),
                format!("{protocol} has no ports"),
            )));
        }
        let port = match PortMatch::number(p.port) {
            Ok(PortMatch::Range { first, .. }) => first,
            Ok(_) => {
                return Err(on(Error::invalid(format!("{f}.port"), "not a port number")));
            }
            Err(m) => return Err(on(Error::invalid(format!("{f}.port"), m))),
        };
        if !p.name.is_empty() {
            policy_core::net::validate_port_name(&p.name)
                .map_err(|m| on(Error::invalid(format!("{f}.name"), m)))?;
        }
        ports.push(DeclaredPort {
            name: p.name.clone(),
            port,
            protocol,
        });
    }
    Ok(Endpoint {
        key: EndpointKey::new(spec.namespace, spec.name),
        labels,
        ips,
        ports,
        service_account: Some(
            spec.service_account
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
        ),
        node: spec.node.filter(|n| !n.is_empty()),
        profiles: spec.profiles,
        orchestrator: "k8s".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_errors_name_the_field() {
        let e = parse_endpoint(r#"{"namespace":"a","name":"b","ips":["10.0.0.1","nope"]}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ips[1]"), "{e}");
        assert_eq!(e.object.as_ref().unwrap().name, "b");
        let e = parse_endpoint(r#"{"namespace":"a","name":"b","colour":1}"#).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Syntax { .. }), "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
        let e =
            parse_endpoint(r#"{"namespace":"a","name":"b","ports":[{"port":70000}]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ports[0].port"), "{e}");
    }

    #[test]
    fn staged_changes_are_validated_and_applied_atomically() {
        let mut e = Engine::new(None);
        e.upsert_endpoint(
            r#"{"namespace":"a","name":"web","labels":{"app":"web"},"ips":["10.0.0.1"]}"#,
        )
        .unwrap();
        assert!(e.compiler.cluster().endpoints().next().is_none());
        let delta = e.apply().unwrap();
        assert!(delta.contains("\"slots\""), "{delta}");
        assert!(e.compiler.cluster().endpoints().next().is_some());
        let err = e.delete_endpoint("a", "nope").unwrap_err();
        assert!(matches!(err, FfiError::NotFound(_)), "{err}");
    }
}
