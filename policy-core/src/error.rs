//! Errors for bad input: each names where (file, document), which object and
//! which field, and says what is wrong.

use std::fmt;

use crate::net::NetValueError;
use crate::selector::SelectorError;

/// Where a document (or a field in it) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// File name or other source label.
    pub source: String,
    /// 1-based index of the document within the source.
    pub document: usize,
    /// 1-based line in the source where the document (or, when it could be
    /// found, the field an error is about) starts; 0 when unknown.
    pub line: usize,
    /// 1-based column on that line; 0 when unknown.
    pub column: usize,
}

impl Origin {
    /// A document of a source whose position in the text is unknown.
    pub fn document(source: impl Into<String>, document: usize) -> Self {
        Self {
            source: source.into(),
            document,
            line: 0,
            column: 0,
        }
    }
}

/// `file:line:column` when the position is known, else `file: document N`.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}:{}", self.source, self.line, self.column.max(1))
        } else {
            write!(f, "{}: document {}", self.source, self.document)
        }
    }
}

/// Which object an error is about.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
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

/// What is wrong with a field's value: a network value a caller can
/// match on, or a rule of the object's schema, told in words.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidValue {
    /// A protocol, port, port name or CIDR that does not parse or is out
    /// of range.
    #[error(transparent)]
    Net(#[from] NetValueError),
    /// Any other rule of the object's schema; the message says which.
    #[error("{0}")]
    Rule(String),
}

impl From<String> for InvalidValue {
    fn from(message: String) -> Self {
        Self::Rule(message)
    }
}

impl From<&str> for InvalidValue {
    fn from(message: &str) -> Self {
        Self::Rule(message.to_owned())
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
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
    /// A field the object's type does not have (a typo, or another API's
    /// syntax): rejected like kubectl's strict field validation does.
    #[error("unknown field `{name}`{}", help.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
    UnknownField {
        /// The field as written.
        name: String,
        /// What to write instead, when there is a good guess.
        help: Option<String>,
    },
    /// A field has a bad value.
    #[error("{0}")]
    Invalid(InvalidValue),
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
    pub fn invalid(field: impl Into<String>, problem: impl Into<InvalidValue>) -> Self {
        Self::new(ErrorKind::Invalid(problem.into())).at(field)
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

/// How many errors [`Errors`] prints before summing up the rest.
pub const MAX_REPORTED: usize = 20;

/// Every error of one load, in source and document order. Printing shows
/// one per line, the first [`MAX_REPORTED`], then how many more there are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Errors(Vec<Error>);

impl Errors {
    /// No errors yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one.
    pub fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    /// Adds all of `other`.
    pub fn extend(&mut self, other: Errors) {
        self.0.extend(other.0);
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The errors, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Error> {
        self.0.iter()
    }

    /// The first error, if any.
    pub fn first(&self) -> Option<&Error> {
        self.0.first()
    }

    /// The errors, in order.
    pub fn into_vec(self) -> Vec<Error> {
        self.0
    }

    /// `Ok(value)` when there are no errors.
    pub fn or_ok<T>(self, value: T) -> Result<T, Errors> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }

    /// Applies `f` to every error (to add an origin or an object).
    pub fn map(self, f: impl FnMut(Error) -> Error) -> Errors {
        Errors(self.0.into_iter().map(f).collect())
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().take(MAX_REPORTED).enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > MAX_REPORTED {
            write!(f, "\n... and {} more errors", self.0.len() - MAX_REPORTED)?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

impl From<Error> for Errors {
    fn from(e: Error) -> Self {
        Errors(vec![e])
    }
}

impl From<ErrorKind> for Errors {
    fn from(kind: ErrorKind) -> Self {
        Errors(vec![Error::new(kind)])
    }
}

impl IntoIterator for Errors {
    type Item = Error;
    type IntoIter = std::vec::IntoIter<Error>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<Error> for Errors {
    fn from_iter<I: IntoIterator<Item = Error>>(iter: I) -> Self {
        Errors(iter.into_iter().collect())
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifests;

    #[test]
    fn bad_network_values_stay_typed_and_keep_their_message() {
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                    metadata: {name: p, namespace: a}\n\
                    spec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}\n";
        let e = parse_manifests("p.yaml", yaml).unwrap_err();
        assert!(
            matches!(
                e.kind,
                ErrorKind::Invalid(InvalidValue::Net(NetValueError::PortOutOfRange {
                    port: 70000,
                    ..
                }))
            ),
            "{e:?}"
        );
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].ports[0].port"));
        let rule: InvalidValue = "a name is required".into();
        assert_eq!(rule.to_string(), "a name is required");
    }
}
