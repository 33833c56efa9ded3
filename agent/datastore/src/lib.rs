//! Palisade's datastores: where the objects a node agent enforces live,
//! each with the revision it was written at, and the ordered changes an
//! agent follows. One trait, [`Datastore`]; the backends:
//!
//! | backend | for | changes |
//! |---|---|---|
//! | [`EmbeddedStore`] | one node: a state directory | an append-only log, fsynced per apply, followed with inotify ([`Watch`]) |
//! | [`EtcdStore`] | several nodes: Calico's etcdv3 key layout | etcd watches ([`EtcdWatch`]), resumed from their revision |
//! | [`KubeStore`] | a real cluster: Calico's Kubernetes datastore (read-only) | list + watch per kind ([`KubeWatch`]), resumed from each kind's resourceVersion |
//!
//! IPAM's compare-and-swap records (`palisade_ipam::store::IpamStore`) have
//! stores of their own in [`ipam`]: [`EmbeddedIpamStore`] (one redb file a
//! node's processes share) and [`EtcdIpamStore`].
//!
//! Every backend validates an apply exactly as the CLI validates manifests
//! (strict fields, selectors, references between objects) and applies all
//! of it or nothing. A node follows a store through a [`NodeView`]: the
//! changes as model changes for its controller, its endpoints' interfaces
//! to bind, and the objects it had to skip.
//!
//! ```
//! use palisade_datastore::{Datastore, EmbeddedStore};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(dir.path()).unwrap();
//! let applied = store.apply_text("deny.yaml", "\
//! apiVersion: projectcalico.org/v3
//! kind: GlobalNetworkPolicy
//! metadata: {name: default-deny}
//! spec: {selector: all(), types: [Ingress, Egress]}
//! ").unwrap();
//! assert_eq!(applied.revision, 1);
//!
//! // A rejected apply changes nothing.
//! assert!(store.apply_text("bad.yaml", "\
//! apiVersion: projectcalico.org/v3
//! kind: GlobalNetworkPolicy
//! metadata: {name: broken}
//! spec: {selector: app = 'x'}
//! ").is_err());
//! let snapshot = store.snapshot().unwrap();
//! assert_eq!((snapshot.revision, snapshot.objects.len()), (1, 1));
//! assert_eq!(store.changes_since(0).unwrap().len(), 1);
//! ```

mod embedded;
mod etcd;
pub mod ipam;
pub mod kinds;
pub mod kubernetes;
mod node_view;
mod plan;
pub mod resources;
mod sources;
pub mod stored_pods;
mod validate;
mod watch;

use serde::{Deserialize, Serialize};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore, EtcdWatch, PREFIXES};
pub use ipam::{EmbeddedIpamStore, EtcdIpamStore, KubeIpamStore, SystemEnv};
pub use kinds::{KINDS, KindInfo, kind_named};
pub use kubernetes::{KubeClient, KubeOptions, KubeStore, KubeWatch};
pub use node_view::{NodeView, Rejected, Step};
pub use validate::validate_apply;
pub use watch::Watch;

use policy_core::{Errors, ObjectRef};

/// A datastore's change counter: every apply or delete takes the next one.
pub type Revision = u64;

/// One object as stored: its identity, the document as applied, and the
/// revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredObject {
    /// Where it is stored (see [`KindInfo::key`]).
    pub key: String,
    /// Kind, namespace and name.
    #[serde(rename = "ref")]
    pub object: ObjectRef,
    /// The revision that wrote it.
    pub revision: Revision,
    /// The manifest document, as applied.
    pub document: serde_json::Value,
}

/// One change, in revision order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StoreChange {
    /// An object was created or replaced.
    Put(StoredObject),
    /// An object was deleted.
    Deleted {
        /// Its key.
        key: String,
        /// Kind, namespace and name.
        #[serde(rename = "ref")]
        object: ObjectRef,
        /// The revision of the delete.
        revision: Revision,
    },
}

impl StoreChange {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            StoreChange::Put(o) => o.revision,
            StoreChange::Deleted { revision, .. } => *revision,
        }
    }
}

/// Every object at one revision, ordered by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The revision of the last change included.
    pub revision: Revision,
    /// The objects.
    pub objects: Vec<StoredObject>,
}

/// What an apply or delete did.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The revision it took (unchanged when nothing changed).
    pub revision: Revision,
    /// Objects created.
    pub created: Vec<ObjectRef>,
    /// Objects replaced with a different document.
    pub replaced: Vec<ObjectRef>,
    /// Objects applied again unchanged.
    pub unchanged: Vec<ObjectRef>,
    /// Objects deleted.
    pub deleted: Vec<ObjectRef>,
}

/// Datastore failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The apply was refused; nothing was written.
    #[error("{0}")]
    Rejected(Errors),
    /// A kind name no datastore holds.
    #[error("unknown kind {name:?}; known kinds: {known}")]
    UnknownKind {
        /// The name given.
        name: String,
        /// The plural names.
        known: String,
    },
    /// A delete of an object that is not stored; nothing was written.
    #[error("{0} does not exist")]
    NotFound(ObjectRef),
    /// The store's files cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The datastore cannot be reached or refused the request.
    #[error("{0}")]
    Unavailable(String),
    /// The changes after a revision are no longer kept (etcd compacted its
    /// history): list again.
    #[error(
        "the datastore no longer has the changes after revision {after} (compacted up to {compacted}): list again"
    )]
    Compacted {
        /// The revision the follower had.
        after: Revision,
        /// The oldest revision still kept.
        compacted: Revision,
    },
    /// A record of the store does not parse (not a torn last write, which
    /// is ignored): the store needs repair.
    #[error("{path}:{line}: corrupt record: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// Its line.
        line: usize,
        /// The parser's message.
        message: String,
    },
}

/// Follows a datastore's changes after a revision, whole batches in order
/// ([`Watch`] for the embedded store, [`EtcdWatch`] for etcd).
pub trait Follower {
    /// The last revision handed out: a follower that lost its connection
    /// resumes after it.
    fn revision(&self) -> Revision;
    /// The next changes, waiting up to `timeout` (forever with `None`);
    /// empty when the time ran out.
    fn next(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> Result<Vec<StoreChange>, StoreError>;
}

/// A store of the objects an agent enforces. Writers validate and apply a
/// whole batch or nothing; readers see whole batches in revision order.
///
/// Synchronous by choice: the embedded store's work is a few file
/// operations, and the agent calls datastores from its watcher threads, so
/// an async backend (etcd) runs its client on the agent's runtime behind
/// this interface rather than every caller needing one.
pub trait Datastore {
    /// Every object, at the latest revision.
    fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// Validates manifest sources (name and text, YAML or JSON, several
    /// documents each) and writes every object (create or replace) as one
    /// batch. Kinds no datastore holds are refused.
    fn apply_sources(&self, sources: &[(String, String)]) -> Result<Written, StoreError>;
    /// Deletes objects as one batch; all must exist.
    fn delete(&self, objects: &[ObjectRef]) -> Result<Written, StoreError>;

    /// Applies one manifest source.
    fn apply_text(&self, source: &str, text: &str) -> Result<Written, StoreError> {
        self.apply_sources(&[(source.to_string(), text.to_string())])
    }
}
