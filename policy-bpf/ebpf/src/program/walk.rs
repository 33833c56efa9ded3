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

/// The root of the program of the endpoint's slot: its address on this
/// interface and direction, IPv4 from the direct table when it is there.
/// `None` when the endpoint has no such address (a spoofed source).
// The slot key lives in this CPU's scratch and goes to the map helper by
// reference: by value it would be copied onto the stack.
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "scratch keys stay off the stack"
)]
#[inline(always)]
pub(super) fn slot_root(
    p: &Parsed,
    direction: u8,
    ifindex: u32,
    slot: &mut SlotKey,
) -> Option<u32> {
    let local = if direction == HookDirection::Egress.code() {
        &p.src
    } else {
        &p.dst
    };
    let fast = match PALISADE_LOCAL4.get_ptr(local4_index(ifindex, direction)) {
        Some(w) if p.family == AddressFamily::V4.code() => {
            // SAFETY: an aligned word of an array map, written whole (one
            // atomic store) by user space.
            local4_root(unsafe { core::ptr::read_volatile(w) }, word(local, 0))
        }
        _ => None,
    };
    if fast.is_some() {
        return fast;
    }
    slot.ifindex = ifindex;
    slot.direction = direction;
    slot.family = p.family;
    slot.pad = [0; 2];
    copy_addr(&mut slot.addr, local);
    // SAFETY: slot values are written whole by user space (a hash
    // element is replaced, not rewritten).
    PALISADE_SLOTS.get_ptr(&*slot).map(|s| unsafe { (*s).root })
}

/// The verdict of the program at `root` on a new flow: the peer's
/// address class and identity from the LPM maps, their membership rows,
/// then the walk. `None` when the walk failed (too deep, or a missing
/// node).
#[inline(always)]
pub(super) fn judge(p: &Parsed, direction: u8, root: u32) -> Option<WalkOutcome> {
    let peer = if direction == HookDirection::Egress.code() {
        &p.dst
    } else {
        &p.src
    };
    let class = if p.family == AddressFamily::V4.code() {
        PALISADE_LPM4
            .get(Key::new(32, [peer[0], peer[1], peer[2], peer[3]]))
            .copied()
    } else {
        PALISADE_LPM6.get(Key::new(128, *peer)).copied()
    }
    .unwrap_or_default();
    // The peer's rows, resolved once: a test is then one bounds check
    // and one array read.
    let id_row = if class.identity > 0 {
        MemberRow::of(layout(LAYOUT_IDENTITIES), class.identity - 1)
    } else {
        MemberRow::default()
    };
    let class_row = MemberRow::of(layout(LAYOUT_CLASSES), class.class);
    let mut w = WalkState {
        at: root,
        steps: 0,
        id_start: id_row.start,
        state: WALK_RUNNING,
        class_start: class_row.start,
        // The lowering keeps strides within 16 bits (MAX_MEMBER_STRIDE).
        strides: (id_row.stride & 0xffff) | (class_row.stride << 16),
        features: features(p, direction),
        rule: 0,
    };
    // Most programs are shallow: the first steps run inline (cheapest);
    // deeper walks continue in a bpf_loop callback, which the verifier
    // checks once however deep programs are.
    let mut i = 0;
    while i < INLINE_WALK && w.state & WALK_STATUS == WALK_RUNNING {
        walk_step(0, (&mut w as *mut WalkState).cast());
        i += 1;
    }
    if w.state & WALK_STATUS == WALK_RUNNING {
        // SAFETY: `walk_step` has the callback signature bpf_loop expects
        // and `w` is a stack object that outlives the call.
        unsafe {
            bpf_loop(
                MAX_WALK - INLINE_WALK,
                walk_step as *mut c_void,
                (&mut w as *mut WalkState).cast(),
                0,
            )
        };
    }
    if w.state & WALK_STATUS != WALK_LEAF {
        return None;
    }
    Some(WalkOutcome {
        allow: (w.state >> WALK_FLAGS) & LEAF_ALLOW as u32 != 0,
        logged: (w.state >> WALK_FLAGS) & LEAF_LOGGED as u32 != 0,
        rule: w.rule,
        steps: w.steps,
    })
}
