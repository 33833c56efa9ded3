//! Errors of the C ABI: one enum naming what went wrong; `abi` gives each
//! variant its status code and turns it into a `palisade_error`.

use palisade_controller::{ControllerError, DataplaneError};
use policy_core::EngineError;

/// Everything a call can fail with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FfiError {
    /// A required pointer was NULL.
    #[error("{0} is NULL")]
    Null(&'static str),
    /// A text argument is not UTF-8.
    #[error("{0} is not valid UTF-8: {1}")]
    Utf8(&'static str, std::str::Utf8Error),
    /// A manifest or endpoint problem, with its location.
    #[error(transparent)]
    Input(#[from] policy_core::Error),
    /// A value that is not valid (connections, interface names...).
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A handle or allocation that is not live.
    #[error("{0}")]
    BadHandle(String),
    /// A struct or length of the wrong size.
    #[error("{0}")]
    Size(String),
    /// The datapath failed or is not built in.
    #[error("{0}")]
    Datapath(String),
    /// A caught panic, or an engine left unusable by one.
    #[error("internal error (please report it): {0}")]
    Panic(String),
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// The controller's errors by the status class the C caller sees; the
/// message is the controller's own.
impl From<ControllerError> for FfiError {
    fn from(e: ControllerError) -> Self {
        let message = e.to_string();
        match e {
            ControllerError::Input(e) => FfiError::Input(e),
            ControllerError::NoSuchEndpoint(_)
            | ControllerError::EndpointNotApplied(_)
            | ControllerError::UnknownPeer { .. }
            | ControllerError::InterfaceNotAttached(_)
            | ControllerError::NotLoaded
            | ControllerError::Decide(EngineError::UnknownEndpoint(_)) => {
                FfiError::NotFound(message)
            }
            ControllerError::Dataplane(
                DataplaneError::NoSuchInterface { .. } | DataplaneError::NoMacAddress { .. },
            ) => FfiError::NotFound(message),
            ControllerError::Decide(EngineError::Unavailable(_))
            | ControllerError::ChangeNotLowered(_)
            | ControllerError::Lowering(_)
            | ControllerError::Dataplane(_) => FfiError::Datapath(message),
            _ => FfiError::Invalid(message),
        }
    }
}
