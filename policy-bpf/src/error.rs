//! Errors of the datapath, in their own module so that the datapath and the
//! conntrack table (which both report them) do not import each other.

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The process lacks the privileges to load BPF programs.
    #[error("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN): {0}")]
    Privileges(String),
    /// Loading or verifying failed.
    #[error("loading the TC programs failed: {0}")]
    Load(String),
    /// A map operation failed.
    #[error("map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What happened.
        message: String,
    },
    /// Attaching or detaching failed.
    #[error("interface {interface}: {message}")]
    Attach {
        /// Interface.
        interface: String,
        /// What happened.
        message: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}
