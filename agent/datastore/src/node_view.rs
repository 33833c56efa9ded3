//! What the datastore's changes mean for one node: the calculation stage
//! felix has between its watchers and its dataplane writers. Datastore
//! changes in; model changes for the node controller and the interface
//! bindings of this node's endpoints out. Pure: no I/O, no clock, so every
//! rule here is tested without a kernel.
//!
//! - An object that no longer converts (a bad selector written by another
//!   tool, a field this version does not know) is reported and skipped:
//!   its previous version stays in force, everything else goes on.
//! - An endpoint is local when its node is this node and it names the
//!   host-side interface it is attached to (a WorkloadEndpoint).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Revision, Snapshot, StoreChange};
use policy_core::cluster::Change;
use policy_core::convert::{Object, calico_node, convert_document_all};
use policy_core::{EndpointKey, ObjectRef};

/// A stored object the stage could not use.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// Its datastore key.
    pub key: String,
    /// The revision that wrote it.
    pub revision: Revision,
    /// Every problem, one per line (object, field, message).
    pub errors: String,
}

/// What one batch of datastore changes means for this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Changes for the node controller, in order.
    pub changes: Vec<Change>,
    /// Interfaces to bind to an endpoint (attach programs).
    pub bind: Vec<(String, EndpointKey)>,
    /// Interfaces no local endpoint uses any more (detach).
    pub unbind: Vec<String>,
    /// Objects skipped in this batch (their previous version, if any,
    /// stays in force).
    pub rejected: Vec<Rejected>,
}

/// One node's view of the datastore: the objects in force, by key.
#[derive(Debug, Clone)]
pub struct NodeView {
    node: String,
    objects: BTreeMap<String, Object>,
    rejected: BTreeMap<String, Rejected>,
    bindings: BTreeMap<String, EndpointKey>,
}

impl NodeView {
    /// An empty view for node `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            objects: BTreeMap::new(),
            rejected: BTreeMap::new(),
            bindings: BTreeMap::new(),
        }
    }

    /// Objects currently skipped because they do not convert.
    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> {
        self.rejected.values()
    }

    /// Interfaces bound to this node's endpoints.
    pub fn bindings(&self) -> &BTreeMap<String, EndpointKey> {
        &self.bindings
    }

    /// Takes a batch of datastore changes (in revision order).
    pub fn update(&mut self, batch: &[StoreChange]) -> Step {
        let mut step = Step::default();
        for change in batch {
            match change {
                // IP pools, reservations and nodes are IPAM's; nodes are
                // also what admin policies' node peers select.
                StoreChange::Put(stored)
                    if crate::kinds::document_ref(&stored.document)
                        .is_some_and(|(info, _)| !info.policy && info.kind != "Node") => {}
                StoreChange::Put(stored) => match convert_stored(&stored.document) {
                    Ok(object) => {
                        self.rejected.remove(&stored.key);
                        let old = self.objects.insert(stored.key.clone(), object.clone());
                        if old.as_ref() == Some(&object) {
                            continue;
                        }
                        // An object whose identity changed (an endpoint
                        // moved to another pod name) leaves its old one.
                        if let Some(old) = &old
                            && old.object_ref() != object.object_ref()
                        {
                            step.changes.push(Change::Delete(old.object_ref()));
                        }
                        step.changes.push(Change::Upsert(object));
                    }
                    Err(errors) => {
                        let r = Rejected {
                            key: stored.key.clone(),
                            revision: stored.revision,
                            errors: errors.to_string(),
                        };
                        self.rejected.insert(stored.key.clone(), r.clone());
                        step.rejected.push(r);
                    }
                },
                StoreChange::Deleted { key, .. } => {
                    self.rejected.remove(key);
                    if let Some(old) = self.objects.remove(key) {
                        step.changes.push(Change::Delete(old.object_ref()));
                    }
                }
            }
        }
        self.rebind(&mut step);
        step
    }

    /// Compares the local endpoints' interfaces with the bindings.
    fn rebind(&mut self, step: &mut Step) {
        let wanted: BTreeMap<String, EndpointKey> = self
            .objects
            .values()
            .filter_map(|o| match o {
                Object::Endpoint(e) if e.node.as_deref() == Some(self.node.as_str()) => {
                    e.interface.clone().map(|i| (i, e.key.clone()))
                }
                _ => None,
            })
            .collect();
        for (iface, key) in &self.bindings {
            if wanted.get(iface) != Some(key) {
                step.unbind.push(iface.clone());
            }
        }
        for (iface, key) in &wanted {
            if self.bindings.get(iface) != Some(key) {
                step.bind.push((iface.clone(), key.clone()));
            }
        }
        self.bindings = wanted;
    }

    /// The changes that turn this view into `snapshot`'s: a put of every
    /// object in it (unchanged ones change nothing) and a delete of every
    /// key it no longer holds. For a watcher that lost its place (a
    /// compacted revision, a datastore that was replaced) and listed again.
    pub fn resync_changes(&self, snapshot: &Snapshot) -> Vec<StoreChange> {
        let listed: BTreeSet<&str> = snapshot.objects.iter().map(|o| o.key.as_str()).collect();
        let gone = self
            .objects
            .iter()
            .map(|(k, o)| (k, o.object_ref()))
            .chain(self.rejected.keys().map(|k| {
                let r = ObjectRef::new("unknown", None, k.as_str());
                (k, r)
            }))
            .filter(|(k, _)| !listed.contains(k.as_str()))
            .map(|(k, object)| StoreChange::Deleted {
                key: k.clone(),
                object,
                revision: snapshot.revision,
            });
        gone.chain(snapshot.objects.iter().cloned().map(StoreChange::Put))
            .collect()
    }

    /// The reference of the object stored under `key`, if in force.
    pub fn object_at(&self, key: &str) -> Option<ObjectRef> {
        self.objects.get(key).map(Object::object_ref)
    }
}

/// A stored document as a policy object: a Calico Node as the addresses
/// node peers select, a Pod the CNI plugin annotated as the endpoint on its
/// interface, anything else as itself.
fn convert_stored(document: &serde_json::Value) -> Result<Object, policy_core::Errors> {
    if crate::kinds::document_ref(document).is_some_and(|(info, _)| info.kind == "Node") {
        return calico_node(document).map(Object::Node).map_err(Into::into);
    }
    if let Some(endpoint) = crate::stored_pods::endpoint_of_annotated_pod(document) {
        return convert_document_all(&endpoint);
    }
    convert_document_all(document)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredObject;
    use serde_json::json;

    fn put(key: &str, revision: Revision, document: serde_json::Value) -> StoreChange {
        StoreChange::Put(StoredObject {
            key: key.into(),
            object: ObjectRef::new("x", None, key),
            revision,
            document,
        })
    }

    fn gnp(selector: &str) -> serde_json::Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
               "metadata": {"name": "p"}, "spec": {"selector": selector}})
    }

    fn wep(node: &str, iface: &str) -> serde_json::Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
               "metadata": {"name": "n-k8s-web-eth0", "namespace": "a"},
               "spec": {"node": node, "orchestrator": "k8s", "pod": "web",
                        "interfaceName": iface, "ipNetworks": ["10.0.0.1/32"]}})
    }

    #[test]
    fn calico_nodes_become_the_addresses_node_peers_select() {
        let mut view = NodeView::new("n");
        let node = json!({"apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": "n2", "labels": {"kubernetes.io/os": "linux"}},
            "spec": {"bgp": {"ipv4Address": "192.168.1.2/24"},
                     "addresses": [{"address": "192.168.1.2", "type": "InternalIP"},
                                   {"address": "fd00::2", "type": "InternalIP"}],
                     "ipv4VXLANTunnelAddr": "10.10.0.1"}});
        let step = view.update(&[put("nodes/n2", 1, node)]);
        let [Change::Upsert(Object::Node(n))] = step.changes.as_slice() else {
            panic!("{:?}", step.changes);
        };
        assert_eq!(n.name, "n2");
        assert_eq!(n.labels["kubernetes.io/os"], "linux");
        let ips: Vec<String> = n.ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["192.168.1.2", "fd00::2"]);
        let step = view.update(&[StoreChange::Deleted {
            key: "nodes/n2".into(),
            object: ObjectRef::new("Node", None, "n2"),
            revision: 2,
        }]);
        assert_eq!(
            step.changes,
            [Change::Delete(ObjectRef::new("Node", None, "n2"))]
        );
        // A bad address is reported with its field, like any object.
        let bad = json!({"apiVersion": "projectcalico.org/v3", "kind": "Node",
            "metadata": {"name": "n3"}, "spec": {"addresses": [{"address": "nope"}]}});
        let step = view.update(&[put("nodes/n3", 3, bad)]);
        assert!(step.changes.is_empty());
        assert!(
            step.rejected[0]
                .errors
                .contains("spec.addresses[0].address"),
            "{:?}",
            step.rejected
        );
    }

    #[test]
    fn a_bad_version_is_skipped_and_the_last_good_one_stays() {
        let mut calc = NodeView::new("n");
        let step = calc.update(&[put("gnp/p", 1, gnp("all()"))]);
        assert_eq!(step.changes.len(), 1);
        let step = calc.update(&[put("gnp/p", 2, gnp("app = 'x'"))]);
        assert!(step.changes.is_empty(), "nothing changes for a bad version");
        assert_eq!(step.rejected.len(), 1);
        assert!(
            step.rejected[0].errors.contains("spec.selector"),
            "{:?}",
            step.rejected
        );
        assert_eq!(calc.object_at("gnp/p").unwrap().name, "p");
        // A good version again clears the report.
        let step = calc.update(&[put("gnp/p", 3, gnp("app == 'x'"))]);
        assert_eq!(step.changes.len(), 1);
        assert_eq!(calc.rejected().count(), 0);
        // The same document again changes nothing.
        assert!(
            calc.update(&[put("gnp/p", 4, gnp("app == 'x'"))])
                .changes
                .is_empty()
        );
    }

    #[test]
    fn a_resync_deletes_what_the_listing_lacks_and_puts_the_rest() {
        let mut calc = NodeView::new("n");
        calc.update(&[
            put("gnp/a", 1, gnp("all()")),
            put("gnp/b", 2, gnp("app = 'bad'")),
            put("wep", 3, wep("n", "cali1")),
        ]);
        let listing = Snapshot {
            revision: 9,
            objects: vec![StoredObject {
                key: "wep".into(),
                object: ObjectRef::new("x", None, "wep"),
                revision: 3,
                document: wep("n", "cali1"),
            }],
        };
        let changes = calc.resync_changes(&listing);
        let step = calc.update(&changes);
        assert!(
            matches!(&step.changes[..], [Change::Delete(r)] if r.name == "p"),
            "only gnp/a goes; the endpoint is unchanged: {:?}",
            step.changes
        );
        assert_eq!(calc.rejected().count(), 0, "the skipped gnp/b is gone too");
        assert!(step.bind.is_empty() && step.unbind.is_empty());
    }

    #[test]
    fn this_nodes_endpoints_bind_their_interfaces_and_others_do_not() {
        let mut calc = NodeView::new("n");
        let step = calc.update(&[put("wep", 1, wep("other", "cali1"))]);
        assert_eq!(step.changes.len(), 1, "remote endpoints are identities too");
        assert!(step.bind.is_empty());
        let step = calc.update(&[put("wep", 2, wep("n", "cali1"))]);
        assert_eq!(
            step.bind,
            vec![("cali1".into(), EndpointKey::new("a", "web"))]
        );
        let step = calc.update(&[put("wep", 3, wep("n", "cali2"))]);
        assert_eq!(step.unbind, vec!["cali1".to_string()]);
        assert_eq!(step.bind.len(), 1);
        let step = calc.update(&[StoreChange::Deleted {
            key: "wep".into(),
            object: ObjectRef::new("WorkloadEndpoint", Some("a"), "n-k8s-web-eth0"),
            revision: 4,
        }]);
        assert_eq!(step.unbind, vec!["cali2".to_string()]);
        assert!(matches!(&step.changes[..], [Change::Delete(r)] if r.name == "web"));
        assert!(calc.bindings().is_empty());
    }
}
