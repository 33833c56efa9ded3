//! The C types of the ABI, and the only code that turns raw pointers from C
//! into Rust references or gives Rust allocations to C. Every `unsafe` block
//! of the crate is in this module.

use std::collections::BTreeMap;
use std::ffi::c_char;
use std::marker::{PhantomData, PhantomPinned};
use std::sync::{Mutex, PoisonError};

use policy_core::ErrorKind;

use crate::error::FfiError;

/// Status code returned by every function that can fail.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum palisade_status {
    /// Success.
    PALISADE_OK = 0,
    /// A required pointer argument was NULL, or a NULL buffer was given a
    /// non-zero length.
    PALISADE_ERR_NULL = 1,
    /// A text argument is not valid UTF-8.
    PALISADE_ERR_UTF8 = 2,
    /// Malformed input: YAML or JSON syntax, an unknown manifest kind or
    /// apiVersion, an unknown or mistyped JSON field.
    PALISADE_ERR_PARSE = 3,
    /// Well-formed input with an invalid value (a bad selector, label, port,
    /// address, protocol...), or a request that cannot be answered.
    PALISADE_ERR_INVALID = 4,
    /// The named endpoint, object or interface does not exist.
    PALISADE_ERR_NOT_FOUND = 5,
    /// The engine handle or the allocation is not live: already freed, or
    /// never handed out by this library.
    PALISADE_ERR_BAD_HANDLE = 6,
    /// A size is wrong: a `struct_size` field does not match this library's
    /// struct, a length is larger than `PTRDIFF_MAX`, or a string's length was
    /// changed before it was freed.
    PALISADE_ERR_SIZE = 7,
    /// The eBPF datapath failed (privileges, kernel support, map capacity),
    /// or the library was built without it.
    PALISADE_ERR_DATAPATH = 8,
    /// A bug: the library panicked. The panic was caught; an engine that was
    /// in use may be unusable (later calls on it return this code) and
    /// should be freed.
    PALISADE_ERR_PANIC = 9,
}

/// A borrowed UTF-8 string: `len` bytes at `ptr`, followed by a NUL byte
/// that `len` does not count (so `ptr` can also be printed with `%s`).
/// `ptr` is never NULL. It is owned by whatever returned it (static, or the
/// enclosing verdict or error) and must not be freed on its own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct palisade_str {
    /// First byte.
    pub ptr: *const c_char,
    /// Length in bytes, without the terminating NUL.
    pub len: usize,
}

impl palisade_str {
    /// A string with static storage; `s` must end with a NUL byte.
    pub(crate) const fn from_static(s: &'static str) -> palisade_str {
        palisade_str {
            ptr: s.as_ptr().cast(),
            len: s.len() - 1,
        }
    }
}

/// An owned UTF-8 string handed out by the library: `len` bytes at `ptr`,
/// followed by a NUL byte that `len` does not count. Release it with
/// `palisade_string_free`, which also resets it to `{NULL, 0}`. A
/// `{NULL, 0}` string is empty and freeing it does nothing.
#[repr(C)]
#[derive(Debug)]
pub struct palisade_string {
    /// First byte, or NULL for the empty, unallocated string.
    pub ptr: *mut c_char,
    /// Length in bytes, without the terminating NUL.
    pub len: usize,
}

/// An engine: cluster state (namespaces, pods, policies), the compiled
/// decision programs, their lowered eBPF map entries and, after
/// `palisade_attach`, the loaded datapath. Opaque: only ever used through
/// a pointer returned by `palisade_engine_new`. The pointer is a handle, not
/// an address: a freed or made-up handle is detected and rejected with
/// `PALISADE_ERR_BAD_HANDLE`.
#[derive(Debug)]
pub struct palisade_engine {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// Details of a failed call, allocated by the library; release it with
/// `palisade_error_free`. Every string is valid (possibly empty) until
/// then. Manifest and endpoint errors say where the problem is: the source
/// and document, the object, and the field path inside it.
#[repr(C)]
#[derive(Debug)]
pub struct palisade_error {
    /// The status the call returned.
    pub code: palisade_status,
    /// Everything in one line, e.g. `zero-trust.yaml:12:3:
    /// NetworkPolicy shop/web: spec.selector: ...` (file:line:column).
    pub message: palisade_str,
    /// Source name of the manifest buffer, or empty.
    pub source: palisade_str,
    /// 1-based index of the document within the source, or 0.
    pub document: usize,
    /// Kind of the object concerned (`NetworkPolicy`, `Pod`...), or empty.
    pub object_kind: palisade_str,
    /// Namespace of the object, or empty.
    pub object_namespace: palisade_str,
    /// Name of the object, or empty.
    pub object_name: palisade_str,
    /// Field path inside the object (`spec.ingress[0].source.selector`,
    /// `ips[1]`), or empty.
    pub field: palisade_str,
}

/// A connection to check. Fill every field; set `struct_size` to
/// `sizeof(palisade_connection)` so a library built with another layout
/// rejects it (`PALISADE_ERR_SIZE`) instead of misreading it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct palisade_connection {
    /// `sizeof(palisade_connection)`.
    pub struct_size: usize,
    /// The client: `namespace/pod`, an IP address (the pod owning it, or an
    /// address outside the cluster if no pod has it) or `ip:ADDRESS` (always
    /// outside the cluster).
    pub src: *const c_char,
    /// Length of `src` in bytes.
    pub src_len: usize,
    /// The server, in the same forms as `src`.
    pub dst: *const c_char,
    /// Length of `dst` in bytes.
    pub dst_len: usize,
    /// IP protocol number 1-255 (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP).
    pub protocol: u32,
    /// Source port; 0 picks an ephemeral port. Only for TCP, UDP, SCTP, UDPLite.
    pub src_port: u16,
    /// Destination port; required for TCP, UDP, SCTP and UDPLite, 0 otherwise.
    pub dst_port: u16,
    /// ICMP type 0-255, or -1 for echo request. Only for ICMP and ICMPv6.
    pub icmp_type: i32,
    /// ICMP code 0-255, or -1 for 0.
    pub icmp_code: i32,
}

/// What policy at one end of a connection decided, and who decided it.
#[repr(C)]
#[derive(Debug)]
pub struct palisade_decision {
    /// False when this end is not a pod of the cluster (no policy applies
    /// there); every other field is then empty, false or -1.
    pub present: bool,
    /// Whether this end lets the connection through.
    pub allowed: bool,
    /// Whether a Log rule matched before the decision.
    pub logged: bool,
    /// The pod whose policy decided, `namespace/name`.
    pub endpoint: palisade_str,
    /// `rule` (a policy rule), `endOfTier` (no policy of the tier decided and
    /// the tier's default action denied), `profile` (a profile rule) or
    /// `noProfileMatch` (nothing allowed it).
    pub kind: palisade_str,
    /// The tier, for `rule` and `endOfTier`.
    pub tier: palisade_str,
    /// The policy as Calico's flow logs name it (`np:ns/name`,
    /// `gnp:name`, `knp:ns/name`...), or the profile name for `profile`.
    pub policy: palisade_str,
    /// Index of the rule in the policy's (or profile's) rules for this
    /// direction, or -1.
    pub rule: i64,
    /// The action that decided: `allow` or `deny` (`pass` in a profile
    /// counts as deny).
    pub action: palisade_str,
    /// The whole decision for people, e.g. `allow by tier default,
    /// np:shop-frontend/web-to-api, rule 0 (allow)`.
    pub text: palisade_str,
}

/// The answer to `palisade_check`, allocated by the library; release it
/// with `palisade_verdict_free`. Strings are valid until then.
#[repr(C)]
#[derive(Debug)]
pub struct palisade_verdict {
    /// Whether the connection is allowed: both present ends allow it.
    pub allowed: bool,
    /// The first packet that was evaluated, e.g. `TCP 10.10.1.10:45678 ->
    /// 10.10.2.10:8080`.
    pub flow: palisade_str,
    /// The client's egress decision.
    pub egress: palisade_decision,
    /// The server's ingress decision.
    pub ingress: palisade_decision,
}

// ---------------------------------------------------------------------------
// Reading arguments.

/// The bytes of a (pointer, length) argument. NULL with length 0 is the
/// empty string.
///
/// # Safety
/// `ptr` is NULL or points to `len` bytes readable for `'a`.
pub(crate) unsafe fn bytes_arg<'a>(
    ptr: *const c_char,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], FfiError> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(FfiError::Null(what))
        };
    }
    if len > isize::MAX as usize {
        return Err(FfiError::Size(format!(
            "{what}: length {len} is larger than PTRDIFF_MAX"
        )));
    }
    // SAFETY: ptr is non-null and, by this function's contract, points to
    // `len` readable bytes for 'a; `len` fits in isize (checked above).
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) })
}

/// A UTF-8 text argument.
///
/// # Safety
/// As for [`bytes_arg`].
pub(crate) unsafe fn str_arg<'a>(
    ptr: *const c_char,
    len: usize,
    what: &'static str,
) -> Result<&'a str, FfiError> {
    // SAFETY: forwarded contract of this function.
    let bytes = unsafe { bytes_arg(ptr, len, what) }?;
    std::str::from_utf8(bytes).map_err(|e| FfiError::Utf8(what, e))
}

/// A size-checked input struct whose first field is a `size_t struct_size`.
///
/// # Safety
/// `ptr` is NULL or points to a readable object that starts with a `size_t`
/// and, when that size equals `size_of::<T>()`, is a valid `T` for `'a`.
pub(crate) unsafe fn sized_arg<'a, T>(
    ptr: *const T,
    what: &'static str,
) -> Result<&'a T, FfiError> {
    if ptr.is_null() {
        return Err(FfiError::Null(what));
    }
    // SAFETY: non-null, and by contract the object starts with a readable
    // size_t; read_unaligned makes no alignment assumption.
    let size = unsafe { ptr.cast::<usize>().read_unaligned() };
    let expected = std::mem::size_of::<T>();
    if size != expected {
        return Err(FfiError::Size(format!(
            "{what}: struct_size is {size}, this library's struct is {expected} bytes \
             (set it to sizeof; the header and the library must match)"
        )));
    }
    // SAFETY: the caller promises a valid T when the size matches, which
    // it does; it is borrowed only for the call.
    Ok(unsafe { &*ptr })
}

/// An optional out-parameter.
///
/// # Safety
/// `ptr` is NULL or valid for reads and writes of a `T` for `'a`.
pub(crate) unsafe fn out_arg<'a, T>(ptr: *mut T) -> Option<&'a mut T> {
    // SAFETY: forwarded contract: NULL or valid for 'a.
    unsafe { ptr.as_mut() }
}

// ---------------------------------------------------------------------------
// Allocations handed to C. Each live one is registered by address, so a
// double free or a pointer this library never returned is reported
// (PALISADE_ERR_BAD_HANDLE) instead of corrupting the heap.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    /// A `palisade_string` buffer of `len + 1` bytes.
    String { len: usize },
    /// A [`VerdictBox`].
    Verdict,
    /// An [`ErrorBox`].
    Error,
}

static LIVE: Mutex<BTreeMap<usize, Live>> = Mutex::new(BTreeMap::new());

fn register(addr: usize, what: Live) {
    LIVE.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(addr, what);
}

/// Unregisters the allocation at `addr` if `accept` agrees it is the
/// expected kind (checked and removed under one lock, so two threads
/// freeing the same pointer cannot both succeed).
fn take(
    addr: usize,
    accept: impl FnOnce(Option<Live>) -> Result<(), FfiError>,
) -> Result<Live, FfiError> {
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    let found = live.get(&addr).copied();
    accept(found)?;
    live.remove(&addr);
    found.ok_or_else(|| FfiError::BadHandle("not a live allocation".into()))
}

/// Strings owned by a verdict or an error: NUL-terminated heap buffers
/// whose addresses do not change when the owner moves.
#[derive(Debug, Default)]
pub(crate) struct Texts(Vec<Box<[u8]>>);

impl Texts {
    /// Keeps a copy of `s` and returns a borrowed view of it.
    pub(crate) fn add(&mut self, s: &str) -> palisade_str {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        let b = v.into_boxed_slice();
        let view = palisade_str {
            ptr: b.as_ptr().cast(),
            len: s.len(),
        };
        self.0.push(b);
        view
    }
}

/// A new owned string.
pub(crate) fn new_string(s: String) -> palisade_string {
    let len = s.len();
    let mut bytes = s.into_bytes();
    bytes.push(0);
    let ptr = Box::into_raw(bytes.into_boxed_slice()).cast::<c_char>();
    register(ptr.addr(), Live::String { len });
    palisade_string { ptr, len }
}

/// Frees an owned string and resets it to `{NULL, 0}`.
pub(crate) fn free_string(s: &mut palisade_string) -> Result<(), FfiError> {
    if s.ptr.is_null() {
        return Ok(());
    }
    let given = s.len;
    let found = take(s.ptr.addr(), |found| match found {
        Some(Live::String { len }) if len == given => Ok(()),
        Some(Live::String { len }) => Err(FfiError::Size(format!(
            "palisade_string: len is {given}, the string was handed out with len {len}"
        ))),
        _ => Err(FfiError::BadHandle(
            "palisade_string: ptr is not a live string of this library (already freed?)".into(),
        )),
    })?;
    let Live::String { len } = found else {
        return Err(FfiError::BadHandle("palisade_string: not a string".into()));
    };
    let buf = std::ptr::slice_from_raw_parts_mut(s.ptr.cast::<u8>(), len + 1);
    // SAFETY: the registry said `s.ptr` was a live buffer of `len + 1` bytes
    // made by Box::into_raw in new_string; `take` unregistered it under the
    // lock, so it is freed exactly once.
    drop(unsafe { Box::from_raw(buf) });
    s.ptr = std::ptr::null_mut();
    s.len = 0;
    Ok(())
}

/// A verdict with the strings it points into. `repr(C)` puts the verdict
/// at offset 0, so a pointer to the box is a pointer to the verdict.
#[repr(C)]
struct VerdictBox {
    verdict: palisade_verdict,
    _texts: Texts,
}

/// Hands a verdict to C.
pub(crate) fn new_verdict(verdict: palisade_verdict, texts: Texts) -> *mut palisade_verdict {
    let ptr = Box::into_raw(Box::new(VerdictBox {
        verdict,
        _texts: texts,
    }))
    .cast::<palisade_verdict>();
    register(ptr.addr(), Live::Verdict);
    ptr
}

/// Frees a verdict handed out by [`new_verdict`]; NULL is a no-op.
pub(crate) fn free_verdict(v: *mut palisade_verdict) -> Result<(), FfiError> {
    if v.is_null() {
        return Ok(());
    }
    take(v.addr(), |found| match found {
        Some(Live::Verdict) => Ok(()),
        _ => Err(FfiError::BadHandle(
            "palisade_verdict: not a live verdict of this library (already freed?)".into(),
        )),
    })?;
    // SAFETY: the registry said `v` came from Box::into_raw of a VerdictBox
    // in new_verdict; `take` unregistered it under the lock, so it is freed
    // exactly once.
    drop(unsafe { Box::from_raw(v.cast::<VerdictBox>()) });
    Ok(())
}

/// An error with the strings it points into (see [`VerdictBox`]).
#[repr(C)]
struct ErrorBox {
    error: palisade_error,
    _texts: Texts,
}

/// Hands an error to C.
pub(crate) fn new_error(error: palisade_error, texts: Texts) -> *mut palisade_error {
    let ptr = Box::into_raw(Box::new(ErrorBox {
        error,
        _texts: texts,
    }))
    .cast::<palisade_error>();
    register(ptr.addr(), Live::Error);
    ptr
}

/// Frees an error handed out by [`new_error`]; NULL is a no-op.
pub(crate) fn free_error(e: *mut palisade_error) -> Result<(), FfiError> {
    if e.is_null() {
        return Ok(());
    }
    take(e.addr(), |found| match found {
        Some(Live::Error) => Ok(()),
        _ => Err(FfiError::BadHandle(
            "palisade_error: not a live error of this library (already freed?)".into(),
        )),
    })?;
    // SAFETY: the registry said `e` came from Box::into_raw of an ErrorBox
    // in new_error; `take` unregistered it under the lock, so it is freed
    // exactly once.
    drop(unsafe { Box::from_raw(e.cast::<ErrorBox>()) });
    Ok(())
}

/// The C side of an [`FfiError`]: its status code and its `palisade_error`
/// (here, next to the C types, so that `error` stays free of them).
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
