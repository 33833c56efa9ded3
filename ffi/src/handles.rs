//! Engine handles. A handle is a number dressed as a pointer: the C side
//! never dereferences it, and the library looks it up in a registry. Numbers
//! are never reused, so a freed handle, a copy of one, or a made-up pointer
//! is reported (`PALISADE_ERR_BAD_HANDLE`) instead of being undefined
//! behaviour.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::abi::palisade_engine;
use crate::engine::Engine;
use crate::error::FfiError;

type Shared = Arc<Mutex<Engine>>;

static ENGINES: Mutex<BTreeMap<usize, Shared>> = Mutex::new(BTreeMap::new());
/// Next handle number; handles are multiples of 16 so they look like (and
/// are as unlikely to collide with stray values as) aligned pointers.
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<usize, Shared>> {
    // The map is always consistent: a panic cannot interrupt an insert or
    // a remove half-way in a way that matters here.
    ENGINES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers an engine; returns its handle.
pub fn insert(engine: Engine) -> *mut palisade_engine {
    let key = NEXT.fetch_add(1, Ordering::Relaxed) << 4;
    registry().insert(key, Arc::new(Mutex::new(engine)));
    std::ptr::without_provenance_mut(key)
}

fn dead(handle: *mut palisade_engine) -> FfiError {
    FfiError::BadHandle(format!(
        "engine handle {handle:p} is not live: it was freed, or never returned by palisade_engine_new"
    ))
}

/// The engine behind a handle.
pub fn get(handle: *mut palisade_engine) -> Result<Shared, FfiError> {
    if handle.is_null() {
        return Err(FfiError::Null("engine"));
    }
    registry()
        .get(&handle.addr())
        .cloned()
        .ok_or_else(|| dead(handle))
}

/// Unregisters a handle; the engine is dropped when the last call using it
/// returns.
pub fn remove(handle: *mut palisade_engine) -> Result<Shared, FfiError> {
    if handle.is_null() {
        return Err(FfiError::Null("engine"));
    }
    registry()
        .remove(&handle.addr())
        .ok_or_else(|| dead(handle))
}
