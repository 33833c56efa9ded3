//! What a connected socket addressed, kept in the socket's own storage:
//! written by the `connect()` hooks, read by them for `getpeername()`
//! and `recvmsg()`, and by the TC program for a hairpin the hook picked.

use aya_ebpf::helpers::{bpf_sk_fullsock, bpf_sk_storage_get};
use aya_ebpf::macros::btf_map;
use aya_ebpf::programs::{SockAddrContext, TcContext};

use super::*;

/// What a connected socket addressed, in its own storage: one peer per
/// socket, freed with it. Per connection this costs an allocation where
/// the LRU above would, once full, evict an entry each time. Pinned, so a
/// restarted agent's hooks read what the earlier one's wrote: sockets
/// connected before the restart still name the Service as their peer.
#[btf_map]
pub(super) static PALISADE_SOCK_PEER: PinnedSkStorage<SockPeer> = PinnedSkStorage::new();

/// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`) pinned by name. aya-ebpf's
/// `SkStorage` has no pinning field; this is its BTF definition with one
/// (libbpf's `__uint(pinning, LIBBPF_PIN_BY_NAME)`, which the loader reads
/// as the length of the array the field points to). The fields are never
/// read: the loader takes the map's shape from their types.
#[repr(C)]
pub(super) struct PinnedSkStorage<T> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; 1],
}

// SAFETY: the fields are null placeholders the loader replaces with the
// map; nothing reads or writes them, so sharing the static is sound.
unsafe impl<T> Sync for PinnedSkStorage<T> {}

impl<T> PinnedSkStorage<T> {
    const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The storage of the context's socket, or null; with `init`, made
    /// from it when the socket has none.
    ///
    /// # Safety
    ///
    /// `ctx` is the hook's context: its socket pointer is the kernel's.
    #[inline(always)]
    pub(super) unsafe fn get(&self, ctx: &SockAddrContext, init: Option<&mut T>) -> *mut T {
        // SAFETY: the context the kernel passed; `sk` is its socket.
        let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
        let flags = if init.is_some() {
            u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        let init = init.map_or(core::ptr::null_mut(), core::ptr::from_mut);
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: `map` is this static, relocated to the map by the loader.
        unsafe { bpf_sk_storage_get(map, sk.cast(), init.cast(), flags) }.cast()
    }

    /// The storage of the socket a TC program's packet carries (a local
    /// socket's packet keeps it across the veth into the node), or null.
    #[inline(always)]
    pub(super) fn of_packet(&self, ctx: &TcContext) -> *const T {
        // SAFETY: the context the kernel passed; `sk` may be null.
        let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
        if sk.is_null() {
            return core::ptr::null();
        }
        // SAFETY: a non-null socket of the packet; the helper returns
        // null for a request or time-wait socket, which has no storage.
        let full = unsafe { bpf_sk_fullsock(sk) };
        if full.is_null() {
            return core::ptr::null();
        }
        let map = core::ptr::from_ref(self).cast_mut().cast();
        // SAFETY: as in `get`; without the create flag nothing is written.
        unsafe { bpf_sk_storage_get(map, full.cast(), core::ptr::null_mut(), 0) }
            .cast_const()
            .cast()
    }
}
