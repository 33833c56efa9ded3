//! Errors of the C ABI: one enum, each variant with its status code, turned
//! into a `palisade_error` for the caller.

use policy_core::ErrorKind;

use crate::abi::{Texts, palisade_error, palisade_status};

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

impl FfiError {
    /// The status code for this error.
    pub(crate) fn code(&self) -> palisade_status {
        use palisade_status::*;
        match self {
            FfiError::Null(_) => PALISADE_ERR_NULL,
            FfiError::Utf8(..) => PALISADE_ERR_UTF8,
            FfiError::Input(e) => match &e.kind {
                ErrorKind::Syntax { .. }
                | ErrorKind::UnknownKind { .. }
                | ErrorKind::WrongApiVersion { .. } => PALISADE_ERR_PARSE,
                ErrorKind::NotFound(_) => PALISADE_ERR_NOT_FOUND,
                _ => PALISADE_ERR_INVALID,
            },
            FfiError::Invalid(_) => PALISADE_ERR_INVALID,
            FfiError::NotFound(_) => PALISADE_ERR_NOT_FOUND,
            FfiError::BadHandle(_) => PALISADE_ERR_BAD_HANDLE,
            FfiError::Size(_) => PALISADE_ERR_SIZE,
            FfiError::Datapath(_) => PALISADE_ERR_DATAPATH,
            FfiError::Panic(_) => PALISADE_ERR_PANIC,
        }
    }

    /// The C view of this error and the strings it points into.
    pub(crate) fn to_c(&self) -> (palisade_error, Texts) {
        let mut t = Texts::default();
        let message = t.add(&self.to_string());
        let (source, document, kind, namespace, name, field) = match self {
            FfiError::Input(e) => (
                e.origin.as_ref().map_or("", |o| o.source.as_str()),
                e.origin.as_ref().map_or(0, |o| o.document),
                e.object.as_ref().map_or("", |o| o.kind.as_str()),
                e.object
                    .as_ref()
                    .and_then(|o| o.namespace.as_deref())
                    .unwrap_or(""),
                e.object.as_ref().map_or("", |o| o.name.as_str()),
                e.field.as_deref().unwrap_or(""),
            ),
            _ => ("", 0, "", "", "", ""),
        };
        let error = palisade_error {
            code: self.code(),
            message,
            source: t.add(source),
            document,
            object_kind: t.add(kind),
            object_namespace: t.add(namespace),
            object_name: t.add(name),
            field: t.add(field),
        };
        (error, t)
    }
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
