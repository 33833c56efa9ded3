//! The decision walk: a few steps inline, the rest in `bpf_loop`.

use super::*;

/// Walk steps taken inline before handing over to bpf_loop.
pub(super) const INLINE_WALK: u32 = 24;
pub(super) const WALK_RUNNING: u32 = 0;
pub(super) const WALK_LEAF: u32 = 1;
pub(super) const WALK_BROKEN: u32 = 2;
/// The status bits of [`WalkState::state`].
pub(super) const WALK_STATUS: u32 = 3;
/// Where the leaf's flags start in [`WalkState::state`].
pub(super) const WALK_FLAGS: u32 = 2;

/// A decision walk in progress (on the program's stack). The fields
/// that start at zero are interleaved with the others: LLVM turns a run
/// of more than 8 zeroed bytes into a memset subprogram call, on every
/// new flow (hence also the verdict as whole words, not a WalkOutcome with
/// two bools and padding).
#[repr(C)]
pub(super) struct WalkState {
    pub(super) at: u32,
    pub(super) steps: u32,
    /// First word of the peer identity's row (see [`MemberRow`]).
    pub(super) id_start: u32,
    /// `WALK_*` status in bits 0-1, the leaf's `LEAF_*` flags from
    /// bit 2 (packed: the walk's state and the caller's frame share a
    /// stack with no bytes to spare).
    pub(super) state: u32,
    /// First word of the peer address class's row.
    pub(super) class_start: u32,
    /// Words of the identity row (0: the peer has no identity) in
    /// bits 0-15, of the class row in bits 16-31.
    pub(super) strides: u32,
    pub(super) features: PacketFeatures,
    /// The leaf's rule index.
    pub(super) rule: u32,
}

/// One node per iteration; returns 1 to stop the loop.
#[inline(always)]
pub(super) extern "C" fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer given to it: the caller's
    // WalkState, alive and not otherwise borrowed during the loop.
    let w = unsafe { &mut *ctx.cast::<WalkState>() };
    let Some(n) = PALISADE_NODES.get(w.at) else {
        w.state = WALK_BROKEN;
        return 1;
    };
    // The class row is read from the state only when the identity's
    // test fails: held in registers across the identity's lookup, it
    // would spill to a stack that has no room.
    let state: &WalkState = w;
    let bit = |b: u32| {
        let id_row = MemberRow {
            start: state.id_start,
            stride: state.strides & 0xffff,
        };
        member_bit(id_row, b, |i| PALISADE_IDWORDS.get(i).copied()) || {
            // SAFETY: reads of fields of a live, aligned struct.
            let (start, strides) = unsafe {
                (
                    core::ptr::read_volatile(&state.class_start),
                    core::ptr::read_volatile(&state.strides),
                )
            };
            let class_row = MemberRow {
                start,
                stride: strides >> 16,
            };
            member_bit(class_row, b, |i| PALISADE_CLASSWORDS.get(i).copied())
        }
    };
    match step(n, &w.features, bit, w.steps) {
        Step::Leaf(v) => {
            w.state = WALK_LEAF
                | ((u32::from(v.allow) * LEAF_ALLOW as u32)
                    | (u32::from(v.logged) * LEAF_LOGGED as u32))
                    << WALK_FLAGS;
            w.rule = v.rule;
            1
        }
        Step::Next(next) => {
            w.at = next;
            w.steps += 1;
            0
        }
    }
}
