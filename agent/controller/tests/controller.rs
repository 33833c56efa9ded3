//! The controller against the in-memory dataplane: what is applied is what
//! the dataplane holds, and every refusal (invalid input, a dataplane that
//! fails a write) leaves both as they were.

use palisade_controller::{
    Controller, ControllerError, DataplaneError, MirrorDataplane, UnavailableDataplane,
};
use policy_core::EndpointKey;
use policy_core::connection::ConnectionSpec;
use policy_core::net::Protocol;

const POLICY: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}
";

const DENY_ALL: &str = "\
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-all}
spec: {selector: all(), types: [Ingress, Egress]}
";

fn endpoint(name: &str, ip: &str, node: &str) -> String {
    format!(
        r#"{{"namespace":"shop","name":"{name}","labels":{{"app":"{name}"}},"ips":["{ip}"],"node":"{node}"}}"#
    )
}

fn key(s: &str) -> EndpointKey {
    s.parse().unwrap()
}

fn shop(node: Option<&str>) -> Controller<MirrorDataplane> {
    let dataplane = MirrorDataplane::with_interfaces([
        ("veth-web", 11, [2, 0, 0, 0, 0, 11]),
        ("veth-db", 12, [2, 0, 0, 0, 0, 12]),
    ]);
    let mut c = Controller::new(node.map(String::from), dataplane);
    c.load_manifests("shop.yaml", POLICY).unwrap();
    c.upsert_endpoint_json(&endpoint("web", "10.0.0.1", "n1"))
        .unwrap();
    c.upsert_endpoint_json(&endpoint("db", "10.0.0.2", "n1"))
        .unwrap();
    c.apply().unwrap();
    c
}

fn tcp(port: u16) -> ConnectionSpec {
    ConnectionSpec {
        protocol: Protocol::TCP,
        dst_port: Some(port),
        src_port: None,
        icmp: None,
        ip_version: None,
    }
}

fn allowed(c: &Controller<MirrorDataplane>, from: &str, to: &str) -> bool {
    let (a, a_ip) = c.peer(from, "src").unwrap();
    let (b, b_ip) = c.peer(to, "dst").unwrap();
    c.check((&a, a_ip.as_deref()), (&b, b_ip.as_deref()), tcp(5432))
        .unwrap()
        .allowed
}

#[test]
fn the_first_attach_loads_everything_applied_and_later_applies_follow() {
    let mut c = shop(None);
    assert!(!c.dataplane().loaded, "nothing is written before an attach");
    c.attach("veth-db", Some(key("shop/db"))).unwrap();
    assert!(c.dataplane().loaded);
    assert_eq!(c.dataplane().attached, ["veth-db"]);
    assert_eq!(c.dataplane().maps, *c.lowering().mirror());
    // A later apply is written as it happens.
    c.load_manifests("deny.yaml", DENY_ALL).unwrap();
    c.apply().unwrap();
    assert_eq!(c.dataplane().maps, *c.lowering().mirror());
    assert!(!allowed(&c, "shop/web", "shop/db"));
}

#[test]
fn a_refused_write_leaves_the_applied_state_and_the_maps_as_they_were() {
    let mut c = shop(None);
    c.attach("veth-db", Some(key("shop/db"))).unwrap();
    let maps = c.dataplane().maps.clone();
    assert!(allowed(&c, "shop/web", "shop/db"));

    c.load_manifests("deny.yaml", DENY_ALL).unwrap();
    c.dataplane_mut().refuse_next_writes(1);
    let err = c.apply().unwrap_err();
    assert!(
        matches!(err, ControllerError::Dataplane(DataplaneError::Refused(_))),
        "{err}"
    );
    assert!(allowed(&c, "shop/web", "shop/db"), "the old policy stays");
    // The recovery rewrites the old state (membership rows may move to the
    // other half of their maps); what the maps say is unchanged.
    assert_eq!(c.dataplane().maps, *c.lowering().mirror());
    assert_eq!(c.dataplane().maps.slots, maps.slots);
    assert_eq!(c.dataplane().maps.nodes, maps.nodes);
    assert_eq!(c.dataplane().maps.lpm4, maps.lpm4);

    // The refused change is gone; applying it again works.
    c.load_manifests("deny.yaml", DENY_ALL).unwrap();
    c.apply().unwrap();
    assert!(!allowed(&c, "shop/web", "shop/db"));
    assert_eq!(c.dataplane().maps, *c.lowering().mirror());
}

#[test]
fn invalid_changes_stage_nothing() {
    let mut c = shop(None);
    let err = c
        .upsert_endpoint_json(r#"{"namespace":"shop","name":"x","ips":["nope"]}"#)
        .unwrap_err();
    assert!(matches!(err, ControllerError::Input(_)), "{err}");
    let err = c.delete_endpoint(&key("shop/nope")).unwrap_err();
    assert!(matches!(err, ControllerError::NoSuchEndpoint(_)), "{err}");
    let applied = c.apply().unwrap();
    assert!(applied.delta.is_empty());
    assert!(applied.plan.is_empty());
}

#[test]
fn attach_refuses_what_it_cannot_bind_and_detach_unbinds() {
    let mut c = shop(Some("n2"));
    let err = c.attach("veth-db", Some(key("shop/db"))).unwrap_err();
    assert!(
        matches!(err, ControllerError::NotOnThisNode { .. }),
        "{err}"
    );
    let mut c = shop(None);
    for (ifname, endpoint) in [
        ("bad/name", None),
        ("veth-db", Some(key("shop/nope"))),
        ("veth-none", None),
    ] {
        assert!(c.attach(ifname, endpoint).is_err(), "{ifname}");
    }
    assert!(!c.dataplane().loaded, "a refused attach loads nothing");
    c.attach("veth-web", Some(key("shop/web"))).unwrap();
    let err = c.attach("veth-db", Some(key("shop/web"))).unwrap_err();
    assert!(
        matches!(err, ControllerError::AttachedElsewhere { ifindex: 11, .. }),
        "{err}"
    );
    c.detach("veth-web").unwrap();
    assert!(c.dataplane().attached.is_empty());
    assert!(c.lowering().binding(&key("shop/web")).is_none());
    assert_eq!(c.dataplane().maps, *c.lowering().mirror());
    let err = c.detach("veth-web").unwrap_err();
    assert!(
        matches!(err, ControllerError::InterfaceNotAttached(_)),
        "{err}"
    );
}

#[test]
fn local_delivery_follows_attached_interfaces() {
    let mut c = shop(None);
    let addr = "10.0.0.2".parse().unwrap();
    let err = c
        .set_local_endpoint(addr, Some(("veth-db", [2, 0, 0, 0, 1, 2])))
        .unwrap_err();
    assert!(matches!(err, ControllerError::NotLoaded), "{err}");
    c.attach("veth-db", Some(key("shop/db"))).unwrap();
    c.set_local_endpoint(addr, Some(("veth-db", [2, 0, 0, 0, 1, 2])))
        .unwrap();
    let ep = c.dataplane().local[&addr];
    assert_eq!((ep.ifindex, ep.host_mac), (12, [2, 0, 0, 0, 0, 12]));
    c.detach("veth-db").unwrap();
    assert!(
        c.dataplane().local.is_empty(),
        "detach stops local delivery"
    );
}

#[test]
fn a_dataplane_that_cannot_load_says_why() {
    let mut c = Controller::new(None, UnavailableDataplane("no kernel side here".into()));
    let err = c.attach("veth0", None).unwrap_err();
    assert_eq!(err.to_string(), "no kernel side here");
    assert!(c.expire_conntrack().is_err());
}

#[test]
fn a_restarted_controller_adopts_what_the_last_one_left_enforcing() {
    let mut first = shop(Some("n1"));
    let started = first
        .start(&[
            ("veth-db".into(), key("shop/db")),
            ("veth-web".into(), key("shop/web")),
        ])
        .unwrap();
    assert!(!started.adopted, "nothing was pinned before");
    assert_eq!(started.attached, ["veth-db", "veth-web"]);
    let zones = first.dataplane().maps.interfaces.clone();
    let left = first.into_dataplane();

    // The next process compiles the datastore's current state (web gone,
    // deny-all added) and adopts the maps the last one left.
    let mut next = Controller::new(Some("n1".into()), left);
    next.load_manifests("shop.yaml", POLICY).unwrap();
    next.load_manifests("deny.yaml", DENY_ALL).unwrap();
    next.upsert_endpoint_json(&endpoint("db", "10.0.0.2", "n1"))
        .unwrap();
    next.apply().unwrap();
    let started = next.start(&[("veth-db".into(), key("shop/db"))]).unwrap();
    assert!(started.adopted);
    assert_eq!(started.attached, ["veth-db"]);
    assert_eq!(started.detached, ["veth-web"], "its endpoint is gone");
    assert_eq!(next.dataplane().attached, ["veth-db"]);
    // db keeps its conntrack zone; what the maps hold is the new state.
    assert_eq!(next.dataplane().maps.interfaces[&12], zones[&12]);
    assert_eq!(next.dataplane().maps.slots, next.lowering().mirror().slots);
    assert!(matches!(
        next.start(&[]),
        Err(ControllerError::AlreadyLoaded)
    ));
    // Later applies go on from the adopted state.
    next.upsert_endpoint_json(&endpoint("web", "10.0.0.1", "n1"))
        .unwrap();
    next.apply().unwrap();
    assert_eq!(next.dataplane().maps.slots, next.lowering().mirror().slots);
}

#[test]
fn start_reports_bindings_it_cannot_make_and_makes_the_rest() {
    let mut c = shop(Some("n1"));
    let started = c
        .start(&[
            ("veth-db".into(), key("shop/db")),
            ("veth-gone".into(), key("shop/web")),
        ])
        .unwrap();
    assert_eq!(started.attached, ["veth-db"]);
    assert_eq!(started.failed.len(), 1);
    assert!(started.failed[0].1.contains("veth-gone"), "{started:?}");
}
