//! The engine behind a handle: the node controller (`palisade-controller`)
//! with the C-facing parts around it — connection arguments as C passes
//! them, errors as status codes, results as JSON.

use policy_core::EndpointKey;
use policy_core::connection::ConnectionSpec;
use policy_core::net::Protocol;

use palisade_controller::{Checked, Controller};

use crate::error::FfiError;
use crate::render;

/// The dataplane of this build: the kernel's with the `datapath` feature.
#[cfg(feature = "datapath")]
type Plane = palisade_controller::AyaDataplane;
#[cfg(not(feature = "datapath"))]
type Plane = palisade_controller::UnavailableDataplane;

#[cfg(feature = "datapath")]
fn plane() -> Plane {
    Plane::new()
}

#[cfg(not(feature = "datapath"))]
fn plane() -> Plane {
    palisade_controller::UnavailableDataplane(
        "this build of libpalisade has no datapath (cargo feature `datapath` is off)".into(),
    )
}

/// One engine: a node controller.
#[derive(Debug)]
pub struct Engine(Controller<Plane>);

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

impl Engine {
    /// An empty engine compiling for `node` (every endpoint when `None`).
    pub fn new(node: Option<String>) -> Engine {
        Engine(Controller::new(node, plane()))
    }

    /// Parses and stages every object of a manifest text.
    pub fn load_manifests(&mut self, source: &str, text: &str) -> Result<usize, FfiError> {
        Ok(self.0.load_manifests(source, text)?)
    }

    /// Parses, validates and stages an endpoint.
    pub fn upsert_endpoint(&mut self, json: &str) -> Result<(), FfiError> {
        Ok(self.0.upsert_endpoint_json(json)?)
    }

    /// Stages the removal of an endpoint.
    pub fn delete_endpoint(&mut self, namespace: &str, name: &str) -> Result<(), FfiError> {
        Ok(self.0.delete_endpoint(&EndpointKey::new(namespace, name))?)
    }

    /// Applies the staged changes; returns the delta as JSON.
    pub fn apply(&mut self) -> Result<String, FfiError> {
        let applied = self.0.apply()?;
        Ok(render::delta(
            &applied.delta,
            &applied.plan,
            self.0.compiler(),
        ))
    }

    /// Checks a connection against the applied state.
    pub fn check(&self, c: &ConnectionArgs<'_>) -> Result<Checked, FfiError> {
        let (from, from_ip) = self.0.peer(c.src, "src")?;
        let (to, to_ip) = self.0.peer(c.dst, "dst")?;
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
        if !protocol.is_icmp() && (icmp_type.is_some() || icmp_code.is_some()) {
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
        Ok(self
            .0
            .check((&from, from_ip.as_deref()), (&to, to_ip.as_deref()), spec)?)
    }

    /// The lowered map entries as JSON.
    pub fn export_maps(&self) -> Result<String, FfiError> {
        let slots = self.0.slot_roots()?;
        let interfaces = self
            .0
            .interfaces()
            .iter()
            .map(|(n, i)| (n.clone(), i.ifindex, i.endpoints.iter().cloned().collect()))
            .collect();
        Ok(render::maps(self.0.lowering(), &slots, interfaces))
    }

    /// Attaches the programs to an interface and binds `endpoint` to it.
    pub fn attach(&mut self, ifname: &str, endpoint: Option<EndpointKey>) -> Result<(), FfiError> {
        Ok(self.0.attach(ifname, endpoint)?)
    }

    /// Detaches the programs from an interface and unbinds its endpoints.
    pub fn detach(&mut self, ifname: &str) -> Result<(), FfiError> {
        Ok(self.0.detach(ifname)?)
    }

    /// Delivers `addr` locally through attached interface `ifname` to a pod
    /// whose MAC is `pod_mac`, or stops that (`None`).
    pub fn set_local_endpoint(
        &mut self,
        addr: std::net::IpAddr,
        to: Option<(&str, [u8; 6])>,
    ) -> Result<(), FfiError> {
        Ok(self.0.set_local_endpoint(addr, to)?)
    }

    /// Sweeps idle connections out of the datapath's conntrack table;
    /// returns how many were removed.
    pub fn expire_conntrack(&mut self) -> Result<u64, FfiError> {
        Ok(self.0.expire_conntrack()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_changes_are_validated_and_applied_atomically() {
        let mut e = Engine::new(None);
        e.upsert_endpoint(
            r#"{"namespace":"a","name":"web","labels":{"app":"web"},"ips":["10.0.0.1"]}"#,
        )
        .unwrap();
        assert!(e.0.compiler().cluster().endpoints().next().is_none());
        let delta = e.apply().unwrap();
        assert!(delta.contains("\"slots\""), "{delta}");
        assert!(e.0.compiler().cluster().endpoints().next().is_some());
        let err = e.delete_endpoint("a", "nope").unwrap_err();
        assert!(matches!(err, FfiError::NotFound(_)), "{err}");
    }
}
