//! The cluster state: every object Palisade knows, updated by atomic batches of
//! changes. A rejected batch leaves the state exactly as it was.

use std::collections::BTreeMap;

use crate::convert::Object;
use crate::error::{Error, ErrorKind, ObjectRef};
use crate::model::*;

/// One change to the cluster state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace an object.
    Upsert(Object),
    /// Remove an object.
    Delete(ObjectRef),
}

/// Everything Palisade knows about a cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    namespaces: BTreeMap<String, Namespace>,
    service_accounts: BTreeMap<(String, String), ServiceAccount>,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
    policies: BTreeMap<PolicyId, Policy>,
    tiers: BTreeMap<String, Tier>,
    network_sets: BTreeMap<(Option<String>, String), NetworkSet>,
    /// Nodes, each with the address set node peers select.
    nodes: BTreeMap<String, (Node, NetworkSet)>,
    profiles: BTreeMap<String, Profile>,
    endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    /// Policies with `services` matches, as written; `policies` holds them
    /// resolved against the current EndpointSlices.
    service_policies: BTreeMap<PolicyId, Policy>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

/// Undo record for one applied change.
enum Undo {
    Restore(Object),
    Remove(ObjectRef),
}

/// What one applied change did: the object before and after (either may be
/// absent). Incremental consumers derive their invalidations from these.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The object before the change.
    pub old: Option<Object>,
    /// The object after the change.
    pub new: Option<Object>,
    /// A policy re-resolved because an EndpointSlice its Service matches
    /// name changed (undoing the slice change undoes this too).
    pub derived: bool,
}

impl Cluster {
    /// An empty cluster with Calico's well-known tiers.
    pub fn new() -> Self {
        Self {
            namespaces: BTreeMap::new(),
            service_accounts: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            policies: BTreeMap::new(),
            tiers: Tier::well_known()
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect(),
            network_sets: BTreeMap::new(),
            nodes: BTreeMap::new(),
            profiles: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            service_policies: BTreeMap::new(),
        }
    }

    /// Builds a cluster from objects, failing on the first invalid one.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Result<Self, Error> {
        let mut c = Cluster::new();
        c.apply(objects.into_iter().map(Change::Upsert).collect())?;
        Ok(c)
    }

    /// Applies a batch atomically: either every change is applied and the
    /// result is consistent, or nothing changes and the error says why.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<Vec<Applied>, Error> {
        let mut undo: Vec<Undo> = Vec::with_capacity(changes.len());
        let mut applied: Vec<Applied> = Vec::with_capacity(changes.len());
        let mut touched: Vec<ObjectRef> = Vec::new();
        for change in changes {
            let r = match change {
                Change::Upsert(obj) => {
                    touched.push(obj.object_ref());
                    Ok(self.put_tracked(obj, &mut applied))
                }
                Change::Delete(r) => self.remove_tracked(&r, &mut applied),
            };
            match r {
                Ok(u) => undo.push(u),
                Err(e) => {
                    self.rollback(undo);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.check_consistency(&touched) {
            self.rollback(undo);
            return Err(e);
        }
        Ok(applied)
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Restore(obj) => {
                    self.put(obj);
                }
                Undo::Remove(r) => {
                    // The object was created by the batch; it is there to take out.
                    let _ = self.remove(&r);
                }
            }
        }
    }

    /// [`Cluster::put`], recording in `applied` what changed: the object,
    /// then any policy whose Service matches it re-resolved (marked derived).
    fn put_tracked(&mut self, obj: Object, applied: &mut Vec<Applied>) -> Undo {
        let slice_service = match &obj {
            Object::EndpointSlice(s) => s.service.clone().map(|svc| (s.namespace.clone(), svc)),
            _ => None,
        };
        let old_service = match &obj {
            Object::EndpointSlice(s) => self
                .endpoint_slices
                .get(&(s.namespace.clone(), s.name.clone()))
                .and_then(|o| o.service.clone().map(|svc| (o.namespace.clone(), svc))),
            _ => None,
        };
        let new = obj.clone();
        let before = self.resolved_dependents(&[&slice_service, &old_service]);
        let u = self.put(obj);
        let old = match &u {
            Undo::Restore(o) => Some(o.clone()),
            Undo::Remove(_) => None,
        };
        applied.push(Applied {
            old,
            new: Some(new),
            derived: false,
        });
        self.note_dependents(before, applied);
        u
    }

    fn remove_tracked(&mut self, r: &ObjectRef, applied: &mut Vec<Applied>) -> Result<Undo, Error> {
        let service = (r.kind == "EndpointSlice")
            .then(|| {
                self.endpoint_slices
                    .get(&(r.namespace.clone().unwrap_or_default(), r.name.clone()))
                    .and_then(|o| o.service.clone().map(|svc| (o.namespace.clone(), svc)))
            })
            .flatten();
        let before = self.resolved_dependents(&[&service]);
        let u = self.remove(r)?;
        if let Undo::Restore(o) = &u {
            applied.push(Applied {
                old: Some(o.clone()),
                new: None,
                derived: false,
            });
        }
        self.note_dependents(before, applied);
        Ok(u)
    }

    /// The resolved form of every policy matching one of these Services.
    fn resolved_dependents(&self, services: &[&Option<(String, String)>]) -> Vec<Policy> {
        let wanted: Vec<ServiceRef> = services
            .iter()
            .filter_map(|s| s.as_ref())
            .map(|(namespace, name)| ServiceRef {
                namespace: namespace.clone(),
                name: name.clone(),
            })
            .collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        self.service_policies
            .values()
            .filter(|p| {
                crate::service_match::services_of(p)
                    .iter()
                    .any(|s| wanted.contains(s))
            })
            .filter_map(|p| self.policies.get(&p.id).cloned())
            .collect()
    }

    /// Re-resolves the policies in `before` and records those that changed.
    fn note_dependents(&mut self, before: Vec<Policy>, applied: &mut Vec<Applied>) {
        for old in before {
            let Some(raw) = self.service_policies.get(&old.id) else {
                continue;
            };
            let new = crate::service_match::resolve(raw, self.endpoint_slices.values());
            if new != old {
                self.policies.insert(new.id.clone(), new.clone());
                applied.push(Applied {
                    old: Some(Object::Policy(old)),
                    new: Some(Object::Policy(new)),
                    derived: true,
                });
            }
        }
    }

    /// Inserts or replaces; returns how to undo it.
    fn put(&mut self, obj: Object) -> Undo {
        let r = obj.object_ref();
        let old = match obj {
            Object::Policy(p) => {
                let raw_old = self.service_policies.remove(&p.id);
                let resolved = if crate::service_match::uses_services(&p) {
                    let resolved = crate::service_match::resolve(&p, self.endpoint_slices.values());
                    self.service_policies.insert(p.id.clone(), p);
                    resolved
                } else {
                    p
                };
                let old = self.policies.insert(resolved.id.clone(), resolved);
                raw_old.or(old).map(Object::Policy)
            }
            Object::EndpointSlice(s) => {
                let key = (s.namespace.clone(), s.name.clone());
                let old = self
                    .endpoint_slices
                    .insert(key, s)
                    .map(Object::EndpointSlice);
                self.reresolve_all();
                old
            }
            Object::Tier(t) => self.tiers.insert(t.name.clone(), t).map(Object::Tier),
            Object::NetworkSet(n) => self
                .network_sets
                .insert((n.namespace.clone(), n.name.clone()), n)
                .map(Object::NetworkSet),
            Object::Profile(p) => self.profiles.insert(p.name.clone(), p).map(Object::Profile),
            Object::Node(n) => {
                let set = n.address_set();
                self.nodes
                    .insert(n.name.clone(), (n, set))
                    .map(|(old, _)| Object::Node(old))
            }
            Object::Namespace(n) => self
                .namespaces
                .insert(n.name.clone(), n)
                .map(Object::Namespace),
            Object::ServiceAccount(s) => self
                .service_accounts
                .insert((s.namespace.clone(), s.name.clone()), s)
                .map(Object::ServiceAccount),
            Object::Endpoint(e) => self
                .endpoints
                .insert(e.key.clone(), e)
                .map(Object::Endpoint),
        };
        match old {
            Some(o) => Undo::Restore(o),
            None => Undo::Remove(r),
        }
    }

    fn remove(&mut self, r: &ObjectRef) -> Result<Undo, Error> {
        let ns = r.namespace.clone();
        let name = r.name.clone();
        let removed = match r.kind.as_str() {
            "NetworkPolicy"
            | "GlobalNetworkPolicy"
            | "StagedNetworkPolicy"
            | "StagedGlobalNetworkPolicy"
            | "StagedKubernetesNetworkPolicy"
            | "KubernetesNetworkPolicy"
            | "AdminNetworkPolicy"
            | "BaselineAdminNetworkPolicy"
            | "ClusterNetworkPolicy" => {
                let kinds: &[PolicyKind] = match r.kind.as_str() {
                    "NetworkPolicy" => &[PolicyKind::NetworkPolicy],
                    "KubernetesNetworkPolicy" => &[PolicyKind::KubernetesNetworkPolicy],
                    "GlobalNetworkPolicy" => &[PolicyKind::GlobalNetworkPolicy],
                    "StagedNetworkPolicy" => &[PolicyKind::StagedNetworkPolicy],
                    "StagedGlobalNetworkPolicy" => &[PolicyKind::StagedGlobalNetworkPolicy],
                    "AdminNetworkPolicy" => &[PolicyKind::AdminNetworkPolicy],
                    "BaselineAdminNetworkPolicy" => &[PolicyKind::BaselineAdminNetworkPolicy],
                    "ClusterNetworkPolicy" => &[PolicyKind::ClusterNetworkPolicy],
                    _ => &[PolicyKind::StagedKubernetesNetworkPolicy],
                };
                kinds.iter().find_map(|k| {
                    let id = PolicyId {
                        kind: *k,
                        namespace: if k.is_namespaced() { ns.clone() } else { None },
                        name: name.clone(),
                    };
                    let raw = self.service_policies.remove(&id);
                    self.policies
                        .remove(&id)
                        .map(|p| Object::Policy(raw.unwrap_or(p)))
                })
            }
            "Tier" => {
                if Tier::well_known().iter().any(|t| t.name == name) {
                    return Err(Error::invalid(
                        "metadata.name",
                        format!("the well-known tier {name:?} cannot be deleted"),
                    )
                    .on(r.clone()));
                }
                self.tiers.remove(&name).map(Object::Tier)
            }
            "NetworkSet" | "GlobalNetworkSet" => self
                .network_sets
                .remove(&(if r.kind == "NetworkSet" { ns } else { None }, name))
                .map(Object::NetworkSet),
            "Profile" => self.profiles.remove(&name).map(Object::Profile),
            "Node" => self.nodes.remove(&name).map(|(n, _)| Object::Node(n)),
            "Namespace" => self.namespaces.remove(&name).map(Object::Namespace),
            "ServiceAccount" => self
                .service_accounts
                .remove(&(ns.unwrap_or_default(), name))
                .map(Object::ServiceAccount),
            "EndpointSlice" => {
                let removed = self
                    .endpoint_slices
                    .remove(&(ns.unwrap_or_default(), name))
                    .map(Object::EndpointSlice);
                self.reresolve_all();
                removed
            }
            "Pod" | "WorkloadEndpoint" => self
                .endpoints
                .remove(&EndpointKey::new(ns.unwrap_or_default(), name))
                .map(Object::Endpoint),
            _ => None,
        };
        match removed {
            Some(o) => Ok(Undo::Restore(o)),
            None => Err(Error::new(ErrorKind::NotFound(r.to_string())).on(r.clone())),
        }
    }

    /// Resolves every policy with Service matches against the slices now.
    fn reresolve_all(&mut self) {
        for raw in self.service_policies.values() {
            let resolved = crate::service_match::resolve(raw, self.endpoint_slices.values());
            self.policies.insert(resolved.id.clone(), resolved);
        }
    }

    /// EndpointSlices.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.endpoint_slices.values()
    }

    /// A policy as written (Service matches unresolved); [`Cluster::policy`]
    /// gives the resolved form engines evaluate.
    pub fn policy_as_written(&self, id: &PolicyId) -> Option<&Policy> {
        self.service_policies
            .get(id)
            .or_else(|| self.policies.get(id))
    }

    /// Cross-object rules: policies name existing tiers, tiers in use are not deleted.
    fn check_consistency(&self, touched: &[ObjectRef]) -> Result<(), Error> {
        for p in self.policies.values() {
            if !self.tiers.contains_key(&p.tier) {
                let r = crate::convert::policy_ref(&p.id);
                let err = Error::new(ErrorKind::UnknownTier(p.tier.clone())).at("spec.tier");
                // Blame the tier deletion if the policy itself was not touched.
                if touched.contains(&r) {
                    return Err(err.on(r));
                }
                return Err(Error::invalid(
                    "metadata.name",
                    format!("tier {:?} is still used by {}", p.tier, p.id),
                )
                .on(ObjectRef::new("Tier", None, p.tier.clone())));
            }
        }
        Ok(())
    }

    /// Every object, in an order that can be applied to an empty cluster
    /// (tiers before the policies that use them).
    pub fn objects(&self) -> Vec<Object> {
        let mut v: Vec<Object> = Vec::new();
        let well_known: Vec<String> = Tier::well_known().into_iter().map(|t| t.name).collect();
        v.extend(
            self.tiers
                .values()
                .filter(|t| {
                    !well_known.contains(&t.name) || Tier::well_known().iter().all(|w| w != *t)
                })
                .cloned()
                .map(Object::Tier),
        );
        v.extend(self.namespaces.values().cloned().map(Object::Namespace));
        v.extend(
            self.service_accounts
                .values()
                .cloned()
                .map(Object::ServiceAccount),
        );
        v.extend(self.profiles.values().cloned().map(Object::Profile));
        v.extend(self.network_sets.values().cloned().map(Object::NetworkSet));
        v.extend(self.nodes.values().map(|(n, _)| Object::Node(n.clone())));
        v.extend(
            self.endpoint_slices
                .values()
                .cloned()
                .map(Object::EndpointSlice),
        );
        v.extend(
            self.policies
                .keys()
                .filter_map(|id| self.policy_as_written(id))
                .cloned()
                .map(Object::Policy),
        );
        v.extend(self.endpoints.values().cloned().map(Object::Endpoint));
        v
    }

    /// All namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.namespaces.values()
    }
    /// One namespace.
    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }
    /// All service accounts.
    pub fn service_accounts(&self) -> impl Iterator<Item = &ServiceAccount> {
        self.service_accounts.values()
    }
    /// All endpoints.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }
    /// One endpoint.
    pub fn endpoint(&self, key: &EndpointKey) -> Option<&Endpoint> {
        self.endpoints.get(key)
    }
    /// All policies, staged included.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }
    /// One policy.
    pub fn policy(&self, id: &PolicyId) -> Option<&Policy> {
        self.policies.get(id)
    }
    /// All tiers.
    pub fn tiers(&self) -> impl Iterator<Item = &Tier> {
        self.tiers.values()
    }
    /// One tier.
    pub fn tier(&self, name: &str) -> Option<&Tier> {
        self.tiers.get(name)
    }
    /// All network sets.
    /// Network sets, including the address set of each Node (which only
    /// admin policies' node peers select).
    pub fn network_sets(&self) -> impl Iterator<Item = &NetworkSet> {
        self.network_sets
            .values()
            .chain(self.nodes.values().map(|(_, set)| set))
    }

    /// Nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().map(|(n, _)| n)
    }
    /// Explicitly defined profiles (not the ones derived from namespaces).
    pub fn explicit_profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// A profile by name: an explicit Profile object, or the one Calico
    /// derives from a namespace (`kns.<ns>`: allow all, `pcns.` labels) or a
    /// service account (`ksa.<ns>.<sa>`: no rules, `pcsa.` labels).
    pub fn profile(&self, name: &str) -> Option<Profile> {
        if let Some(p) = self.profiles.get(name) {
            return Some(p.clone());
        }
        if let Some(ns) = name.strip_prefix(NAMESPACE_PROFILE_PREFIX) {
            let ns = self.namespaces.get(ns)?;
            return Some(namespace_profile(ns));
        }
        if let Some(rest) = name.strip_prefix(SERVICE_ACCOUNT_PROFILE_PREFIX) {
            let (ns, sa) = rest.split_once('.')?;
            let sa = self
                .service_accounts
                .get(&(ns.to_string(), sa.to_string()))?;
            return Some(service_account_profile(sa));
        }
        None
    }

    /// The labels selectors see on an endpoint: its own labels, Calico's
    /// implicit labels, then labels inherited from its profiles (own labels
    /// win, then the first profile that sets a key).
    pub fn endpoint_labels(&self, ep: &Endpoint) -> LabelMap {
        endpoint_labels_with(ep, |name| self.profile(name).map(|p| p.labels_to_apply))
    }

    /// The labels selectors see on a network set: its own, plus for
    /// namespaced sets the namespace label and the namespace's `pcns.` labels.
    pub fn network_set_labels(&self, set: &NetworkSet) -> LabelMap {
        let mut labels = set.labels.clone();
        if let Some(ns) = &set.namespace {
            labels.insert(LABEL_NAMESPACE.into(), ns.clone());
            if let Some(n) = self.namespaces.get(ns) {
                for (k, v) in namespace_profile(n).labels_to_apply {
                    labels.entry(k).or_insert(v);
                }
            }
        }
        labels
    }

    /// Tiers in evaluation order.
    pub fn sorted_tiers(&self) -> Vec<&Tier> {
        let mut t: Vec<&Tier> = self.tiers.values().collect();
        t.sort_by_key(|t| t.sort_key());
        t
    }

    /// Policies of a tier in evaluation order (staged included).
    pub fn sorted_policies(&self, tier: &str) -> Vec<&Policy> {
        let mut p: Vec<&Policy> = self.policies.values().filter(|p| p.tier == tier).collect();
        p.sort_by_key(|p| p.sort_key());
        p
    }
}

/// Labels an endpoint may not carry as its own: the namespace and
/// service-account families Calico derives, and the node label, which
/// would make a pod pass for a node to admin policies' node peers.
fn is_reserved_for_others(key: &str) -> bool {
    key.starts_with(NAMESPACE_LABEL_PREFIX)
        || key.starts_with(SERVICE_ACCOUNT_LABEL_PREFIX)
        || key == LABEL_NODE
}

/// Effective endpoint labels, with profile labels supplied by `profile_labels`
/// (so callers can cache them). See [`Cluster::endpoint_labels`].
pub fn endpoint_labels_with<L: std::borrow::Borrow<LabelMap>>(
    ep: &Endpoint,
    mut profile_labels: impl FnMut(&str) -> Option<L>,
) -> LabelMap {
    let mut labels: LabelMap = ep
        .labels
        .iter()
        .filter(|(k, _)| !is_reserved_for_others(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_NAMESPACE.into(), ep.key.namespace.clone());
    labels.insert(LABEL_ORCHESTRATOR.into(), ep.orchestrator.clone());
    if let Some(sa) = &ep.service_account {
        labels.insert(LABEL_SERVICE_ACCOUNT.into(), sa.clone());
    }
    for name in ep.profile_names() {
        if let Some(p) = profile_labels(&name) {
            for (k, v) in p.borrow() {
                if !labels.contains_key(k) && k != LABEL_NODE {
                    labels.insert(k.clone(), v.clone());
                }
            }
        }
    }
    labels
}

/// The profile Calico derives from a namespace.
pub fn namespace_profile(ns: &Namespace) -> Profile {
    let mut labels: LabelMap = ns
        .labels
        .iter()
        .map(|(k, v)| (format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone()))
        .collect();
    labels.insert(
        format!("{NAMESPACE_LABEL_PREFIX}{LABEL_NAME}"),
        ns.name.clone(),
    );
    Profile {
        name: format!("{NAMESPACE_PROFILE_PREFIX}{}", ns.name),
        ingress: vec![Rule::any(Action::Allow)],
        egress: vec![Rule::any(Action::Allow)],
        labels_to_apply: labels,
    }
}

/// The profile Calico derives from a service account.
pub fn service_account_profile(sa: &ServiceAccount) -> Profile {
    let mut labels: LabelMap = sa
        .labels
        .iter()
        .map(|(k, v)| (format!("{SERVICE_ACCOUNT_LABEL_PREFIX}{k}"), v.clone()))
        .collect();
    labels.insert(
        format!("{SERVICE_ACCOUNT_LABEL_PREFIX}{LABEL_NAME}"),
        sa.name.clone(),
    );
    Profile {
        name: format!(
            "{SERVICE_ACCOUNT_PROFILE_PREFIX}{}.{}",
            sa.namespace, sa.name
        ),
        ingress: vec![],
        egress: vec![],
        labels_to_apply: labels,
    }
}
