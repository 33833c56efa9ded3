//! Errors for bad input: each names where (file, document), which object and
//! which field, and says what is wrong.

use std::fmt;

use crate::selector::SelectorError;

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File name or other source label.
    pub source: String,
    /// 1-based index of the document within the source.
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.document)
    }
}

/// Which object an error is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Object kind.
    pub kind: String,
    /// Namespace, for namespaced objects.
    pub namespace: Option<String>,
    /// Object name.
    pub name: String,
}

impl ObjectRef {
    /// Builds a reference.
    pub fn new(kind: impl Into<String>, namespace: Option<&str>, name: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.map(str::to_string),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ErrorKind {
    /// The text is not valid YAML/JSON.
    #[error("malformed {format}: {message}")]
    Syntax {
        /// `YAML` or `JSON`.
        format: &'static str,
        /// Parser message (with line and column).
        message: String,
    },
    /// The document has no usable `kind`.
    #[error("unknown kind {kind:?} (apiVersion {api_version:?}); supported: {supported}")]
    UnknownKind {
        /// The kind found.
        kind: String,
        /// The apiVersion found.
        api_version: String,
        /// The kinds Palisade reads.
        supported: &'static str,
    },
    /// The kind is known but the apiVersion is not the one it belongs to.
    #[error("wrong apiVersion {found:?} for kind {kind}: expected {expected:?}")]
    WrongApiVersion {
        /// The kind.
        kind: String,
        /// The apiVersion found.
        found: String,
        /// The apiVersion expected.
        expected: &'static str,
    },
    /// A field has a bad value.
    #[error("{0}")]
    Invalid(String),
    /// A selector does not parse.
    #[error(transparent)]
    Selector(#[from] SelectorError),
    /// Over one of Calico's size limits.
    #[error("too many {what}: {count}, the limit is {limit}")]
    Limit {
        /// What is counted.
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A policy names a tier that is not defined.
    #[error("tier {0:?} does not exist (define a projectcalico.org/v3 Tier first)")]
    UnknownTier(String),
    /// The same object is defined twice.
    #[error("duplicate object: {0} is already defined{1}")]
    Duplicate(ObjectRef, String),
    /// A feature Palisade does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A referenced object does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
}

/// An error about one input, with everything needed to find it. Boxed so
/// `Result`s stay small; fields are reached through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct Error(Box<ErrorData>);

/// The contents of an [`Error`].
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorData {
    /// Source and document index, when the input came from a document.
    pub origin: Option<Origin>,
    /// The object concerned, when known.
    pub object: Option<ObjectRef>,
    /// Field path inside the object, e.g. `spec.ingress[0].source.selector`.
    pub field: Option<String>,
    /// What is wrong.
    pub kind: ErrorKind,
}

impl std::ops::Deref for Error {
    type Target = ErrorData;
    fn deref(&self) -> &ErrorData {
        &self.0
    }
}

impl std::ops::DerefMut for Error {
    fn deref_mut(&mut self) -> &mut ErrorData {
        &mut self.0
    }
}

impl Error {
    /// An error with only a kind.
    pub fn new(kind: ErrorKind) -> Self {
        Self(Box::new(ErrorData {
            origin: None,
            object: None,
            field: None,
            kind,
        }))
    }

    /// Replaces the field path (used to prefix a path from an outer document).
    pub fn with_field(mut self, field: Option<String>) -> Self {
        self.field = field;
        self
    }

    /// An invalid-value error at a field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid(message.into())).at(field)
    }

    /// Sets the field path (keeps one already set deeper down).
    pub fn at(mut self, field: impl Into<String>) -> Self {
        if self.field.is_none() {
            self.field = Some(field.into());
        }
        self
    }

    /// Sets the object (keeps one already set).
    pub fn on(mut self, object: ObjectRef) -> Self {
        if self.object.is_none() {
            self.object = Some(object);
        }
        self
    }

    /// Sets the origin (keeps one already set).
    pub fn from_origin(mut self, origin: Origin) -> Self {
        if self.origin.is_none() {
            self.origin = Some(origin);
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

/// `Display` already includes the kind's message, so there is no separate
/// source to chain (chaining would print the message twice).
impl std::error::Error for Error {}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
