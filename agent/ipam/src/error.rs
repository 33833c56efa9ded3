//! IPAM's errors: Calico's texts where Calico has one, and a stable kind
//! name for each (what `palisade verify` and the CLI report).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::pool::{PoolError, Use};
use crate::store::StoreError;

/// Why a requested pool cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolProblem {
    /// No pool has that CIDR.
    NotFound,
    /// The pool is disabled.
    Disabled,
    /// The pool's blocks cannot hold the host reservations.
    Unqualified,
}

/// An IPAM call that failed; whatever it wrote before failing is whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// A pool Calico would refuse.
    #[error(transparent)]
    InvalidPool(PoolError),
    /// The node the request names does not exist.
    #[error("node {0} does not exist")]
    NodeNotFound(String),
    /// No enabled pool is usable (for this use, when given).
    #[error("cannot find a qualified ippool{}", .0.map(|u| format!(", no pools match the required use ({u:?})")).unwrap_or_default())]
    NoQualifiedPool(Option<Use>),
    /// No pool selects the node (and namespace).
    #[error("no configured Calico pools for node {0}")]
    NoMatchingPool(String),
    /// A requested pool cannot be used.
    #[error("the given pool ({cidr}) does not exist, or is not enabled")]
    RequestedPool {
        /// The pool's CIDR.
        cidr: IpNet,
        /// Why.
        why: PoolProblem,
    },
    /// A pool list holds a pool of the other family.
    #[error("provided IPv{0} IPPools list contains one or more IPv{1} IPPools")]
    MixedFamilyPools(u8, u8),
    /// AssignIP of an address outside every enabled pool.
    #[error("The provided IP address is not in a configured pool\n")]
    NotInAnyPool(IpAddr),
    /// AssignIP of an allocated address.
    #[error("resource already exists: {0} with error: Address already assigned in block")]
    AddressInUse(IpAddr),
    /// AssignIP with a use the pool does not allow.
    #[error(
        "IP address {ip} is in IP pool {pool:?}, which is not allowed for use {usage:?} (allowedUses: {allowed:?})"
    )]
    UseNotAllowed {
        /// The address.
        ip: IpAddr,
        /// The pool's name.
        pool: String,
        /// The requested use.
        usage: Use,
        /// The pool's allowed uses.
        allowed: Vec<Use>,
    },
    /// A new block is needed but the host is at its block limit.
    #[error("cannot allocate new block due to per host block limit")]
    BlockLimit,
    /// No block could be found or claimed.
    #[error("No Free Blocks")]
    NoFreeBlocks,
    /// No such handle.
    #[error("resource does not exist: IPAMHandle({0})")]
    HandleNotFound(String),
    /// No pool, block or allocation for an address.
    #[error("resource does not exist: {ip} with error: {reason}")]
    ResourceDoesNotExist {
        /// The address (or block).
        ip: String,
        /// What is missing.
        reason: String,
    },
    /// A release whose sequence number or handle does not match.
    #[error("update conflict: {address}: {reason}")]
    ReleaseConflict {
        /// The address.
        address: IpAddr,
        /// What did not match.
        reason: String,
    },
    /// Releasing the affinity of a block that must be empty and is not.
    #[error("block '{0}' is not empty")]
    BlockNotEmpty(IpNet),
    /// The block is affine to another host.
    #[error("block '{0}' is claimed by another host")]
    ClaimConflict(IpNet),
    /// An affinity CIDR smaller than a block.
    #[error("The requested CIDR ({0}) is smaller than the minimum.")]
    CidrTooSmall(IpNet),
    /// An affinity CIDR outside every enabled pool.
    #[error("The requested CIDR ({0}) is not within any configured pools.")]
    CidrNotInPool(IpNet),
    /// The handle already holds its maximum of addresses.
    #[error(
        "handle {handle} already has IP(s) allocated, cannot assign additional IP {ip} (maxAllocPerIPVersion={max})"
    )]
    MaxAllocReached {
        /// The handle.
        handle: String,
        /// The address asked for.
        ip: IpAddr,
        /// The limit.
        max: usize,
    },
    /// Windows nodes need strict affinity.
    #[error("global strict affinity should not be false for Windows node")]
    StrictAffinityRequired,
    /// A pool selector does not parse.
    #[error("invalid selector: {0}")]
    InvalidSelector(String),
    /// Host reservations that leave no block size.
    #[error("HostReservedAttr has wrong parameters")]
    BadHostReservation,
    /// IPAM configuration Calico refuses.
    #[error("{0}")]
    InvalidConfig(String),
    /// A block's addresses are held by another affinity than expected.
    #[error("Block affinity ({have}) does not match provided ({want})")]
    AffinityMismatch {
        /// The block's affinity.
        have: String,
        /// The requester's.
        want: String,
    },
    /// Other writers kept winning.
    #[error("Max retries hit - excessive concurrent IPAM requests")]
    TooManyConflicts,
    /// Blocks cannot be claimed (autoAllocateBlocks off) and no affine
    /// block has room.
    #[error("failed to find or claim a block")]
    NoClaimableBlock,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IpamError {
    /// The kind name (the conformance corpus's error kinds).
    pub fn kind(&self) -> &'static str {
        match self {
            IpamError::InvalidPool(_) => "invalidPool",
            IpamError::NodeNotFound(_) => "nodeNotFound",
            IpamError::NoQualifiedPool(_) => "noQualifiedPool",
            IpamError::NoMatchingPool(_) => "noMatchingPool",
            IpamError::RequestedPool { why, .. } => match why {
                PoolProblem::NotFound => "poolNotFound",
                PoolProblem::Disabled => "poolDisabled",
                PoolProblem::Unqualified => "poolUnqualified",
            },
            IpamError::MixedFamilyPools(..) => "mixedFamilyPools",
            IpamError::NotInAnyPool(_) => "notInAnyPool",
            IpamError::AddressInUse(_) => "addressInUse",
            IpamError::UseNotAllowed { .. } => "useNotAllowed",
            IpamError::BlockLimit => "blockLimit",
            IpamError::NoFreeBlocks => "noFreeBlocks",
            IpamError::HandleNotFound(_) => "handleNotFound",
            IpamError::ResourceDoesNotExist { .. } => "resourceDoesNotExist",
            IpamError::ReleaseConflict { .. } => "releaseConflict",
            IpamError::BlockNotEmpty(_) => "blockNotEmpty",
            IpamError::ClaimConflict(_) => "claimConflict",
            IpamError::CidrTooSmall(_) => "cidrTooSmall",
            IpamError::CidrNotInPool(_) => "cidrNotInPool",
            IpamError::MaxAllocReached { .. } => "maxAllocReached",
            IpamError::StrictAffinityRequired => "strictAffinityRequired",
            IpamError::InvalidSelector(_) => "invalidSelector",
            IpamError::BadHostReservation => "badHostReservation",
            IpamError::InvalidConfig(_) => "invalidConfig",
            IpamError::AffinityMismatch { .. } => "affinityMismatch",
            IpamError::TooManyConflicts => "tooManyConflicts",
            IpamError::NoClaimableBlock => "noClaimableBlock",
            IpamError::Store(_) => "store",
        }
    }
}
