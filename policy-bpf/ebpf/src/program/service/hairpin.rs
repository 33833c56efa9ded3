//! A hairpin the `connect()` hook picked: the TC program takes the pick.

use aya_ebpf::programs::TcContext;

use super::super::sock_peer::PALISADE_SOCK_PEER;
use super::*;

/// A pod's connection whose `connect()` hook picked the pod itself left
/// it addressing the frontend (a hairpin is masqueraded, which only this
/// program does): the pick, kept in the socket's storage, stands, so the
/// pod reaches itself as often as kube-proxy would send it there. A pick
/// whose backend left the Service since is not followed.
#[inline(never)]
pub(super) fn take_hairpin_picked_at_connect(
    ctx: &TcContext,
    sc: &mut ServiceScratch,
    first: u32,
    count: u16,
) {
    let peer = PALISADE_SOCK_PEER.of_packet(ctx);
    if peer.is_null() {
        return;
    }
    // SAFETY: the socket's storage, valid for this run; copied out.
    let peer = unsafe { *peer };
    let t = &sc.tuple;
    let Some(index) = peer.hairpin_backend(t.family, &t.dst, t.dst_port.to_be()) else {
        return;
    };
    if index < first || index >= first + u32::from(count) {
        return;
    }
    let Some(b) = PALISADE_SVC_BACKENDS.get(index).copied() else {
        return;
    };
    if b.family == t.family && b.addr == t.src && b.port.to_be() == peer.backend_port {
        sc.chosen.backend = index;
        sc.chosen.value = b;
    }
}
