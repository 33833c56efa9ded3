//! What the controller and its dataplanes fail with. Each variant names the
//! object it is about; callers (the C ABI, the CLI, the agent) map them to
//! their own codes without parsing messages.

use policy_bpf::datapath::DatapathError;
use policy_bpf::lower::LowerError;
use policy_core::connection::ConnectionError;
use policy_core::{EndpointKey, EngineError};

/// A dataplane operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataplaneError {
    /// This dataplane cannot load programs at all (a build without the
    /// kernel side, say); the text says why.
    #[error("{0}")]
    Unavailable(String),
    /// No interface of that name in this network namespace.
    #[error("interface {ifname:?} does not exist in this network namespace: {reason}")]
    NoSuchInterface {
        /// The name asked for.
        ifname: String,
        /// What the lookup said.
        reason: String,
    },
    /// The interface has no link-layer address.
    #[error("interface {ifname:?} has no MAC address in this network namespace")]
    NoMacAddress {
        /// The interface.
        ifname: String,
    },
    /// Listing the interfaces failed.
    #[error("listing interfaces: {0}")]
    ListInterfaces(String),
    /// The kernel datapath refused (loading, a map write, an attach...).
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A test dataplane refused a write on purpose (fault injection).
    #[error("the dataplane refused write {0} (injected fault)")]
    Refused(usize),
}

/// A controller operation that failed; the controller's state is as it was
/// before the call unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// A manifest, an endpoint or a staged change is invalid (with its
    /// origin, object and field).
    #[error(transparent)]
    Input(#[from] policy_core::Error),
    /// A staged delete names an endpoint that does not exist.
    #[error("endpoint {0} does not exist")]
    NoSuchEndpoint(EndpointKey),
    /// An endpoint to attach is not in the applied state.
    #[error("endpoint {0} does not exist (upsert it and apply first)")]
    EndpointNotApplied(EndpointKey),
    /// A connection end names an endpoint that is not applied.
    #[error("{side}: endpoint {endpoint} does not exist in the applied state")]
    UnknownPeer {
        /// Which end (`src`, `dst`).
        side: &'static str,
        /// The endpoint named.
        endpoint: EndpointKey,
    },
    /// The endpoint runs on another node, so it has no programs here.
    #[error("endpoint {endpoint} is not on node {node}: it has no programs to attach")]
    NotOnThisNode {
        /// The endpoint.
        endpoint: EndpointKey,
        /// This controller's node.
        node: String,
    },
    /// The endpoint is bound to another interface already.
    #[error("endpoint {endpoint} is attached to interface index {ifindex}: detach that first")]
    AttachedElsewhere {
        /// The endpoint.
        endpoint: EndpointKey,
        /// The interface it is bound to.
        ifindex: u32,
    },
    /// Not an interface name the kernel would accept.
    #[error("{0:?} is not an interface name: 1-15 bytes without '/', NUL or spaces")]
    BadInterfaceName(String),
    /// The interface is not attached by this controller.
    #[error("interface {0:?} is not attached by this engine")]
    InterfaceNotAttached(String),
    /// An operation that needs loaded programs, before any attach.
    #[error("no datapath is loaded: attach an interface first")]
    NotLoaded,
    /// `start` after the programs were loaded.
    #[error("the datapath is already loaded")]
    AlreadyLoaded,
    /// A connection to check is malformed (its text says how).
    #[error("{0}")]
    InvalidConnection(String),
    /// The connection has no flow (no address of the right version...).
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    /// An engine could not decide a connection.
    #[error(transparent)]
    Decide(#[from] EngineError),
    /// An applied change did not fit the maps; the previous state is kept.
    #[error("lowering the change to map entries failed, nothing was applied: {0}")]
    ChangeNotLowered(LowerError),
    /// The state does not fit the maps (or binding an endpoint failed).
    #[error(transparent)]
    Lowering(#[from] LowerError),
    /// The dataplane failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}
