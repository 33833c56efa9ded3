//! Errors of the datapath, in their own module so that the datapath and the
//! conntrack table (which both report them) do not import each other.

/// Datapath failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatapathError {
    /// The process lacks the privileges to load BPF programs.
    #[error("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN): {0}")]
    Privileges(String),
    /// A service table does not fit the service maps (nothing was written).
    #[error(transparent)]
    ServiceMapFull(#[from] crate::services::ServiceMapFull),
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
    /// A test run (`BPF_PROG_TEST_RUN`) failed.
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(String),
    /// The kernel refused run-time statistics.
    #[error("enabling BPF run-time statistics: {0}")]
    RunTimeStats(String),
    /// Reading a program's information failed.
    #[error("{program}: {message}")]
    ProgramInfo {
        /// The program.
        program: &'static str,
        /// What happened.
        message: String,
    },
    /// The conntrack clock could not be read or measured.
    #[error("{0}")]
    Clock(String),
    /// The pin directory could not be read.
    #[error("{path}: {message}")]
    Pins {
        /// The directory.
        path: String,
        /// What happened.
        message: String,
    },
    /// A write failed on purpose (fault injection in tests).
    #[error("injected failure at write {0}")]
    Injected(usize),
}
