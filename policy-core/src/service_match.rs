//! Calico's `services` rule matches, resolved against EndpointSlices into
//! plain rules every engine already evaluates: a source Service becomes
//! `nets` (its endpoint addresses, any port, as Calico's IP-only set); a
//! destination Service becomes one rule per (protocol, port list) its
//! slices carry, with those addresses as `nets` and those ports, as
//! Calico's IP-and-port set. A Service without endpoints matches nothing.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::model::{EndpointSlice, EntityMatch, Policy, Rule, ServiceRef};
use crate::net::{PortMatch, Protocol};

/// Networks that together hold every address: as `notNets`, nothing matches.
fn everything() -> Vec<IpNet> {
    vec![
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

fn match_nothing(side: &mut EntityMatch) {
    side.nets.clear();
    side.not_nets = everything();
}

fn slices_of<'a>(
    svc: &ServiceRef,
    slices: impl Iterator<Item = &'a EndpointSlice>,
) -> Vec<&'a EndpointSlice> {
    slices
        .filter(|s| s.namespace == svc.namespace && s.service.as_deref() == Some(&svc.name))
        .collect()
}

fn host_nets<'a>(addrs: impl Iterator<Item = &'a std::net::IpAddr>) -> Vec<IpNet> {
    let set: BTreeSet<IpNet> = addrs.map(|a| IpNet::from(*a)).collect();
    set.into_iter().collect()
}

/// Whether any rule of `p` names a Service.
pub fn uses_services(p: &Policy) -> bool {
    p.ingress
        .iter()
        .chain(&p.egress)
        .any(|r| r.source.services.is_some() || r.destination.services.is_some())
}

/// The Services `p`'s rules name.
pub fn services_of(p: &Policy) -> BTreeSet<ServiceRef> {
    p.ingress
        .iter()
        .chain(&p.egress)
        .flat_map(|r| [&r.source.services, &r.destination.services])
        .flatten()
        .cloned()
        .collect()
}

/// `p` with every Service match replaced by what the slices say now.
pub fn resolve<'a>(p: &Policy, slices: impl Iterator<Item = &'a EndpointSlice> + Clone) -> Policy {
    let mut out = p.clone();
    out.ingress = p
        .ingress
        .iter()
        .flat_map(|r| resolve_rule(r, slices.clone()))
        .collect();
    out.egress = p
        .egress
        .iter()
        .flat_map(|r| resolve_rule(r, slices.clone()))
        .collect();
    out
}

fn resolve_rule<'a>(
    rule: &Rule,
    slices: impl Iterator<Item = &'a EndpointSlice> + Clone,
) -> Vec<Rule> {
    let mut base = rule.clone();
    if let Some(svc) = base.source.services.take() {
        let nets = host_nets(
            slices_of(&svc, slices.clone())
                .into_iter()
                .flat_map(|s| &s.addresses),
        );
        if nets.is_empty() {
            match_nothing(&mut base.source);
        } else {
            base.source.nets = nets;
        }
    }
    let Some(svc) = base.destination.services.take() else {
        return vec![base];
    };
    // (protocol, ports) -> addresses: the IP-and-port set, grouped so each
    // group is one rule.
    let mut groups: BTreeMap<(Protocol, Vec<u16>), BTreeSet<IpNet>> = BTreeMap::new();
    for s in slices_of(&svc, slices) {
        let mut by_proto: BTreeMap<Protocol, BTreeSet<u16>> = BTreeMap::new();
        for p in &s.ports {
            by_proto.entry(p.protocol).or_default().insert(p.port);
        }
        for (proto, ports) in by_proto {
            if base.protocol.is_some_and(|p| p != proto) || base.not_protocol == Some(proto) {
                continue;
            }
            groups
                .entry((proto, ports.into_iter().collect()))
                .or_default()
                .extend(s.addresses.iter().map(|a| IpNet::from(*a)));
        }
    }
    groups.retain(|_, addrs| !addrs.is_empty());
    if groups.is_empty() {
        match_nothing(&mut base.destination);
        return vec![base];
    }
    groups
        .into_iter()
        .map(|((proto, ports), addrs)| {
            let mut r = base.clone();
            r.protocol = Some(proto);
            r.destination.nets = addrs.into_iter().collect();
            r.destination.ports = ports
                .into_iter()
                .map(|p| PortMatch::Range { first: p, last: p })
                .collect();
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, SlicePort};

    fn slice(name: &str, addrs: &[&str], ports: &[(Protocol, u16)]) -> EndpointSlice {
        EndpointSlice {
            namespace: "ns".into(),
            name: name.into(),
            service: Some("svc".into()),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|(protocol, port)| SlicePort {
                    name: String::new(),
                    protocol: *protocol,
                    port: *port,
                })
                .collect(),
        }
    }

    fn svc() -> Option<ServiceRef> {
        Some(ServiceRef {
            namespace: "ns".into(),
            name: "svc".into(),
        })
    }

    #[test]
    fn destination_groups_by_protocol_and_ports() {
        let mut r = Rule::any(Action::Allow);
        r.destination.services = svc();
        let slices = [
            slice(
                "a",
                &["10.0.0.1"],
                &[(Protocol::TCP, 80), (Protocol::UDP, 53)],
            ),
            slice("b", &["10.0.0.2"], &[(Protocol::TCP, 8080)]),
        ];
        let out = resolve_rule(&r, slices.iter());
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|r| r.destination.services.is_none()));
        assert_eq!(out[0].protocol, Some(Protocol::TCP));
        assert_eq!(
            out[0].destination.nets,
            vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            out[0].destination.ports,
            vec![PortMatch::Range {
                first: 80,
                last: 80
            }]
        );
    }

    #[test]
    fn no_endpoints_matches_nothing() {
        let mut r = Rule::any(Action::Allow);
        r.source.services = svc();
        let out = resolve_rule(&r, std::iter::empty());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].source.not_nets, everything());
    }

    #[test]
    fn source_is_addresses_only() {
        let mut r = Rule::any(Action::Allow);
        r.source.services = svc();
        let slices = [slice(
            "a",
            &["10.0.0.1", "10.0.0.1"],
            &[(Protocol::TCP, 80)],
        )];
        let out = resolve_rule(&r, slices.iter());
        assert_eq!(out[0].source.nets.len(), 1);
        assert!(out[0].source.ports.is_empty() && out[0].protocol.is_none());
    }
}
