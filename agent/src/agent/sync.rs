//! The agent's pure core, felix's calculation graph and dataplane driver in
//! one place: datastore batches in, dataplane writes out. No threads, clock
//! or kernel here: the node view turns stored objects into model changes,
//! the controller compiles, lowers and writes them to a [`Dataplane`], so
//! every rule below is tested against the in-memory dataplane.
//!
//! - A batch the controller refuses as a whole (an object that references
//!   another the batch does not have, a state that does not fit the maps)
//!   is cut in halves until the change at fault is found; everything else
//!   is applied, in order.
//! - Interfaces wanted but not there yet (a record written before its veth)
//!   are retried on every tick until they appear or are no longer wanted.

use std::collections::BTreeMap;

use palisade_controller::{Controller, ControllerError, Dataplane};
use palisade_datastore::{NodeView, Rejected, Revision, Snapshot, StoreChange};
use policy_core::error::ErrorKind;
use policy_core::{Change, EndpointKey, ObjectRef};

/// A change or object the agent could not enforce.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// The datastore revision that brought it.
    pub revision: Revision,
    /// The object (kind/namespace/name or datastore key).
    pub object: String,
    /// What is wrong, with the field.
    pub message: String,
}

/// What one sync or update did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Model changes applied.
    pub applied: usize,
    /// Objects skipped because they do not convert (their last good
    /// version stays in force).
    pub rejected: Vec<Problem>,
    /// Changes the controller refused (found by bisection).
    pub refused: Vec<Problem>,
    /// Interfaces attached.
    pub attached: Vec<String>,
    /// Interfaces detached.
    pub detached: Vec<String>,
    /// Whether the maps an earlier agent left were adopted.
    pub adopted: bool,
}

/// One node's agent state over a dataplane `D`.
#[derive(Debug)]
pub struct NodeSync<D: Dataplane> {
    view: NodeView,
    controller: Controller<D>,
    /// Bindings waiting for their interface: name -> (endpoint, last error).
    pending: BTreeMap<String, (EndpointKey, String)>,
    revision: Revision,
}

impl<D: Dataplane> NodeSync<D> {
    /// Nothing synced yet; nothing is written until [`NodeSync::sync`].
    pub fn new(node: &str, dataplane: D) -> Self {
        NodeSync {
            view: NodeView::new(node),
            controller: Controller::new(Some(node.to_string()), dataplane),
            pending: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The controller (applied state, dataplane).
    pub fn controller(&self) -> &Controller<D> {
        &self.controller
    }

    /// The dataplane, for what the controller does not drive (services).
    pub fn dataplane_mut(&mut self) -> &mut D {
        self.controller.dataplane_mut()
    }

    /// The node view (objects in force, skipped ones, bindings).
    pub fn view(&self) -> &NodeView {
        &self.view
    }

    /// Bindings waiting for their interface, with the last error.
    pub fn pending(&self) -> &BTreeMap<String, (EndpointKey, String)> {
        &self.pending
    }

    /// The datastore revision applied last.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Whether the first complete sync was written to the dataplane.
    pub fn started(&self) -> bool {
        self.controller.loaded()
    }

    /// A complete listing of the datastore: the first one loads the
    /// dataplane (adopting what an earlier agent left enforcing); later ones
    /// (after a watch lost its place) apply the difference.
    pub fn sync(&mut self, snapshot: &Snapshot) -> Result<Outcome, ControllerError> {
        let changes = self.view.resync_changes(snapshot);
        if self.controller.loaded() {
            let out = self.update(&changes);
            self.revision = snapshot.revision;
            return Ok(out);
        }
        let step = self.view.update(&changes);
        let mut out = Outcome {
            rejected: problems(&step.rejected),
            ..Outcome::default()
        };
        self.apply_bisecting(step.changes, snapshot.revision, &mut out);
        let bindings: Vec<(String, EndpointKey)> = self
            .view
            .bindings()
            .iter()
            .map(|(i, k)| (i.clone(), k.clone()))
            .collect();
        let started = self.controller.start(&bindings)?;
        out.adopted = started.adopted;
        out.attached = started.attached;
        out.detached = started.detached;
        for (ifname, error) in started.failed {
            if let Some(key) = self.view.bindings().get(&ifname) {
                self.pending.insert(ifname, (key.clone(), error));
            }
        }
        self.revision = snapshot.revision;
        Ok(out)
    }

    /// A batch of changes, in revision order (call after the first sync).
    pub fn update(&mut self, batch: &[StoreChange]) -> Outcome {
        let revision = batch.last().map_or(self.revision, StoreChange::revision);
        let step = self.view.update(batch);
        let mut out = Outcome {
            rejected: problems(&step.rejected),
            ..Outcome::default()
        };
        // Interfaces first leave their old endpoints, then the policy
        // changes, then the new bindings (their endpoints now applied).
        for ifname in &step.unbind {
            if self.pending.remove(ifname).is_some() {
                continue;
            }
            if self.controller.interfaces().contains_key(ifname) {
                match self.controller.detach(ifname) {
                    Ok(()) => out.detached.push(ifname.clone()),
                    Err(e) => out.refused.push(Problem {
                        revision,
                        object: format!("interface {ifname}"),
                        message: format!("detach: {e}"),
                    }),
                }
            }
        }
        self.apply_bisecting(step.changes, revision, &mut out);
        for (ifname, key) in step.bind {
            self.pending.insert(ifname, (key, String::new()));
        }
        out.attached.extend(self.retry_pending());
        self.revision = revision;
        out
    }

    /// Attaches the interfaces still waiting; returns those attached now.
    pub fn retry_pending(&mut self) -> Vec<String> {
        if !self.controller.loaded() {
            return Vec::new();
        }
        let mut attached = Vec::new();
        let waiting: Vec<(String, EndpointKey)> = self
            .pending
            .iter()
            .map(|(i, (k, _))| (i.clone(), k.clone()))
            .collect();
        for (ifname, key) in waiting {
            match self.controller.attach(&ifname, Some(key)) {
                Ok(()) => {
                    self.pending.remove(&ifname);
                    attached.push(ifname);
                }
                Err(e) => {
                    if let Some(p) = self.pending.get_mut(&ifname) {
                        p.1 = e.to_string();
                    }
                }
            }
        }
        attached
    }

    /// Sweeps idle connections out of conntrack.
    pub fn expire_conntrack(&mut self) -> Result<u64, ControllerError> {
        self.controller.expire_conntrack()
    }

    /// Applies changes; a refused batch is cut in halves until the change
    /// at fault is alone, and everything else is applied in order.
    fn apply_bisecting(&mut self, mut changes: Vec<Change>, revision: Revision, out: &mut Outcome) {
        if changes.is_empty() {
            return;
        }
        let n = changes.len();
        let attempt = self
            .controller
            .stage(changes.clone())
            .and_then(|()| self.controller.apply());
        match attempt {
            Ok(_) => out.applied += n,
            // A delete of something the controller never took (its only
            // version was refused) has nothing to remove.
            Err(ControllerError::Input(e))
                if n == 1
                    && matches!(changes[0], Change::Delete(_))
                    && matches!(e.kind, ErrorKind::NotFound(_)) => {}
            Err(e) if n == 1 => out.refused.push(Problem {
                revision,
                object: change_ref(&changes[0]).to_string(),
                message: e.to_string(),
            }),
            Err(_) => {
                let second = changes.split_off(n / 2);
                self.apply_bisecting(changes, revision, out);
                self.apply_bisecting(second, revision, out);
            }
        }
    }
}

fn change_ref(c: &Change) -> ObjectRef {
    match c {
        Change::Upsert(o) => o.object_ref(),
        Change::Delete(r) => r.clone(),
    }
}

fn problems(rejected: &[Rejected]) -> Vec<Problem> {
    rejected
        .iter()
        .map(|r| Problem {
            revision: r.revision,
            object: r.key.clone(),
            message: r.errors.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_controller::MirrorDataplane;
    use palisade_datastore::StoredObject;
    use serde_json::{Value, json};

    fn put(revision: Revision, document: Value) -> StoreChange {
        let name = document["metadata"]["name"].as_str().unwrap().to_string();
        let kind = document["kind"].as_str().unwrap().to_string();
        StoreChange::Put(StoredObject {
            key: format!("{kind}/{name}"),
            object: ObjectRef::new(kind, None, name),
            revision,
            document,
        })
    }

    fn gnp(name: &str, tier: Option<&str>) -> Value {
        let mut spec = json!({"selector": "all()", "types": ["Ingress"]});
        if let Some(t) = tier {
            spec["tier"] = json!(t);
        }
        json!({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
               "metadata": {"name": name}, "spec": spec})
    }

    fn wep(pod: &str, iface: &str) -> Value {
        json!({"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
               "metadata": {"name": format!("n-k8s-{pod}-eth0"), "namespace": "a"},
               "spec": {"node": "n", "orchestrator": "k8s", "pod": pod,
                        "interfaceName": iface, "ipNetworks": ["10.0.0.1/32"]}})
    }

    fn node() -> NodeSync<MirrorDataplane> {
        NodeSync::new(
            "n",
            MirrorDataplane::with_interfaces([("cali1", 5, [2, 0, 0, 0, 0, 5])]),
        )
    }

    fn snapshot(revision: Revision, changes: Vec<StoreChange>) -> Snapshot {
        Snapshot {
            revision,
            objects: changes
                .into_iter()
                .map(|c| match c {
                    StoreChange::Put(o) => o,
                    StoreChange::Deleted { .. } => unreachable!(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_first_sync_loads_binds_and_later_batches_are_deltas() {
        let mut n = node();
        let out = n
            .sync(&snapshot(
                2,
                vec![put(1, gnp("p", None)), put(2, wep("web", "cali1"))],
            ))
            .unwrap();
        assert_eq!(
            (out.applied, out.attached.clone()),
            (2, vec!["cali1".into()])
        );
        assert!(n.started() && !out.adopted);
        let out = n.update(&[put(3, gnp("q", None))]);
        assert_eq!(out.applied, 1);
        assert_eq!(n.revision(), 3);
        assert_eq!(
            n.controller().dataplane().maps.slots,
            n.controller().lowering().mirror().slots
        );
    }

    #[test]
    fn a_change_the_controller_refuses_is_found_and_the_rest_applied() {
        let mut n = node();
        n.sync(&snapshot(1, vec![put(1, gnp("p", None))])).unwrap();
        // A policy in a tier nobody created converts, but the controller
        // refuses it: the bisection finds it among the good ones.
        let out = n.update(&[
            put(2, gnp("a", None)),
            put(3, gnp("orphan", Some("missing"))),
            put(4, gnp("b", None)),
            put(5, gnp("c", None)),
        ]);
        assert_eq!(out.applied, 3, "{out:?}");
        assert_eq!(out.refused.len(), 1);
        assert!(out.refused[0].object.contains("orphan"), "{out:?}");
        assert!(out.refused[0].message.contains("missing"), "{out:?}");
        // Deleting the refused object later is no error.
        let out = n.update(&[StoreChange::Deleted {
            key: "GlobalNetworkPolicy/orphan".into(),
            object: ObjectRef::new("GlobalNetworkPolicy", None, "orphan"),
            revision: 6,
        }]);
        assert!(out.refused.is_empty(), "{out:?}");
    }

    #[test]
    fn an_interface_that_is_not_there_yet_waits_and_is_attached_later() {
        let mut n = node();
        let out = n
            .sync(&snapshot(1, vec![put(1, wep("late", "cali9"))]))
            .unwrap();
        assert!(out.attached.is_empty());
        assert!(
            n.pending()["cali9"].1.contains("cali9"),
            "{:?}",
            n.pending()
        );
        n.controller
            .dataplane_mut()
            .interfaces
            .insert("cali9".into(), (9, [2, 0, 0, 0, 0, 9]));
        assert_eq!(n.retry_pending(), ["cali9"]);
        assert!(n.pending().is_empty());
        // The record goes: the interface is detached.
        let out = n.update(&[StoreChange::Deleted {
            key: "WorkloadEndpoint/n-k8s-late-eth0".into(),
            object: ObjectRef::new("WorkloadEndpoint", Some("a"), "n-k8s-late-eth0"),
            revision: 2,
        }]);
        assert_eq!(out.detached, ["cali9"]);
    }

    #[test]
    fn a_restarted_agent_adopts_and_a_later_listing_applies_the_difference() {
        let mut first = node();
        first
            .sync(&snapshot(
                2,
                vec![put(1, gnp("p", None)), put(2, wep("web", "cali1"))],
            ))
            .unwrap();
        let left = first.controller.into_dataplane();
        let mut next = NodeSync::new("n", left);
        let out = next
            .sync(&snapshot(
                3,
                vec![put(3, gnp("q", None)), put(2, wep("web", "cali1"))],
            ))
            .unwrap();
        assert!(out.adopted);
        assert_eq!(out.attached, ["cali1"]);
        // A second listing (the watch lost its place) deletes what is gone.
        let out = next
            .sync(&snapshot(4, vec![put(2, wep("web", "cali1"))]))
            .unwrap();
        assert_eq!(out.applied, 1, "q is deleted: {out:?}");
        assert_eq!(next.revision(), 4);
    }
}
