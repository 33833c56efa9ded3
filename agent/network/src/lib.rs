//! Pod networking for Palisade, over netlink (rtnetlink, no `ip`
//! commands): a pod's veth wired as Calico wires it ([`pod`]), and the
//! VXLAN overlay between nodes ([`overlay`] plans it as plain data,
//! [`vxlan`] makes the kernel match the plan); the pods' MTU ([`mtu`]);
//! IP pools' `natOutgoing` ([`natout`] plans it, [`nft`] writes it);
//! kube-proxy's rules found on a node ([`kube_proxy`]).
//!
//! The netlink edge ([`netlink`]) is the only place that talks to the
//! kernel; everything it is asked to do is decided by plain functions.
//!
//! ```
//! use palisade_network::pod::{host_ifname, GATEWAY_V4};
//! // The host end of a pod's veth has a stable name, as Calico's `cali…`.
//! assert_eq!(host_ifname("frontend.web-0"), host_ifname("frontend.web-0"));
//! assert_eq!(GATEWAY_V4.to_string(), "169.254.1.1");
//! ```

#![forbid(unsafe_code)]

pub mod kube_proxy;
pub mod mtu;
pub mod natout;
pub mod netlink;
pub mod nft;
pub mod overlay;
pub mod pod;
pub mod vxlan;

/// Netlink and namespace failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The kernel refused a request.
    #[error("{op}: {message}")]
    Netlink {
        /// What was asked.
        op: String,
        /// The errno (0 when not from the kernel).
        errno: i32,
        /// What was said.
        message: String,
    },
    /// A system call or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
    /// A namespace could not be joined.
    #[error("{0}")]
    Namespace(String),
    /// A request that cannot be made, or a state that should not be.
    #[error("{0}")]
    Invalid(String),
    /// A failure injected by a test.
    #[error("injected failure at {0}")]
    Injected(String),
}

impl NetError {
    fn io(what: impl Into<String>, source: std::io::Error) -> NetError {
        NetError::Io {
            what: what.into(),
            source,
        }
    }
}
