//! The conntrack table in the kernel: atomic state words, lookups of
//! established connections, claiming a way in a tag line or the log, and
//! recording approvals.

use super::*;

/// Atomic operations on conntrack state words and flags, which other
/// CPUs and the user-space sweep change concurrently. Callers pass
/// pointers into conntrack array maps' values: valid for the program's
/// run (array values are never freed) and naturally aligned.
pub(super) mod atomic {
    use core::intrinsics::{self, AtomicOrdering::SeqCst};

    /// The word, read whole.
    #[inline(always)]
    pub fn load(p: *mut u64) -> u64 {
        // SAFETY: see the module; an aligned 8-byte load is atomic.
        unsafe { p.read_volatile() }
    }

    /// Writes the word after every write before it, for the owner of
    /// a busy way. BPF has a store-release only from CPU v4, which
    /// this build does not target (and BPF LLVM selects no fences):
    /// an empty asm block that may touch memory keeps the compiler
    /// from moving earlier stores after it, and the plain store the
    /// JIT emits is a release on x86-64 (TSO). A weakly ordered CPU
    /// (arm64) needs the v4 instruction here.
    #[inline(always)]
    pub fn publish(p: *mut u64, v: u64) {
        // SAFETY: an empty block: no instructions, no registers.
        unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
        // SAFETY: see the module.
        unsafe { p.write_volatile(v) };
    }

    /// Replaces `old` by `new`; false if the word was not `old`.
    #[inline(always)]
    pub fn swap_if(p: *mut u64, old: u64, new: u64) -> bool {
        // SAFETY: see the module.
        unsafe { intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new).1 }
    }

    #[inline(always)]
    pub fn and(p: *mut u64, v: u64) {
        // SAFETY: see the module.
        unsafe { intrinsics::atomic_and::<u64, u64, { SeqCst }>(p, v) };
    }

    #[inline(always)]
    pub fn or(p: *mut u64, v: u64) {
        // SAFETY: see the module.
        unsafe { intrinsics::atomic_or::<u64, u64, { SeqCst }>(p, v) };
    }

    /// Adds `v` and returns the word before, or None when other CPUs
    /// kept changing it. A compare-and-swap loop: this build's CPU
    /// version has no fetching add.
    #[inline(always)]
    pub fn fetch_add(p: *mut u64, v: u64) -> Option<u64> {
        let mut seen = load(p);
        let mut tries = 0;
        while tries < 4 {
            // SAFETY: see the module.
            let (was, done) = unsafe {
                intrinsics::atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, seen, seen + v)
            };
            if done {
                return Some(was);
            }
            seen = was;
            tries += 1;
        }
        None
    }
}

/// A connection's flags as the 64-bit word of `flags` and the zero `pad`
/// after it, flags in the low half (BPF is little-endian here; the
/// target CPU has 64-bit atomics only).
#[inline(always)]
pub(super) fn flags_word(v: *mut CtValue) -> *mut u64 {
    // SAFETY: `flags` is at offset 16 of an 8-aligned CtValue in a
    // conntrack way, followed by its u32 pad.
    unsafe { (&raw mut (*v).flags).cast::<u64>() }
}

/// Way `i`'s state word in a table of tag lines.
#[inline(always)]
pub(super) fn state_word(tags: &Array<CtTags>, i: u32) -> Option<*mut u64> {
    let line = tags.get_ptr_mut(i / CT_TAG_LINE)?;
    // SAFETY: a word of the line (the index is below CT_TAG_LINE).
    Some(unsafe {
        (&raw mut (*line).state)
            .cast::<u64>()
            .add((i % CT_TAG_LINE) as usize)
    })
}

/// Whether two keys are equal: word XORs, no byte compares or memcmp.
#[inline(always)]
pub(super) fn same_words<const N: usize>(a: *const u32, b: *const u32) -> bool {
    let mut diff = 0;
    let mut i = 0;
    while i < N {
        // SAFETY: callers pass two 4-aligned keys of N words.
        diff |= unsafe { a.add(i).read_volatile() ^ b.add(i).read_volatile() };
        i += 1;
    }
    diff == 0
}

/// Where the key starts in both families' ways (checked by the common
/// crate's layout test).
pub(super) const KEY_AT: usize = core::mem::size_of::<CtValue>();

/// Outcome of recording an approval.
pub(super) enum Record {
    Done,
    /// Every way of the set holds a live connection.
    Full,
    /// Another CPU changed the way in between.
    Contended,
}

/// A connection's entry, in the table of its family. The family is
/// read from the per-CPU scratch at each access (volatile): kept in a
/// register, it would split every verifier state after the parse in
/// two (IPv4 and IPv6) and exceed the verifier's instruction budget;
/// read from memory, the paths merge again after each access. For the
/// same reason the lookup's result lives in the scratch ([`CtProbe`]).
pub(super) struct Conn<'a> {
    pub(super) family: &'a u8,
    pub(super) key: &'a CtKey,
    pub(super) key4: &'a CtKey4,
    pub(super) probe: *mut CtProbe,
    /// Ways of each family's table (the log's entries follow their
    /// homes).
    pub(super) ways: u32,
    /// This CPU's runs of log entries (in the scratch).
    pub(super) log4: *mut CtCursor,
    pub(super) log6: *mut CtCursor,
}

impl Conn<'_> {
    #[inline(always)]
    pub(super) fn v4(&self) -> bool {
        // SAFETY: a valid, aligned reference.
        unsafe { core::ptr::read_volatile(self.family) == AddressFamily::V4.code() }
    }

    /// Reads the connection's sets into the probe: the way holding it
    /// (live), and a way an insert may claim. Each family's scan is
    /// whole in its branch, so the verifier sees every key access
    /// against the entry size of the table it came from.
    #[inline(always)]
    pub(super) fn lookup(&self, cfg: &Config, now: u64) {
        // SAFETY: the probe is in this CPU's scratch (see `process`).
        unsafe { self.probe.write_volatile(CtProbe::default()) };
        if self.v4() {
            let place = ct_place4(self.key4, cfg.ct_seed, cfg.ct_sets_mask);
            scan::<CtEntry4, 4, { core::mem::offset_of!(CtKey4, protocol) }>(
                &PALISADE_CTTAG4,
                &PALISADE_CONN4,
                place,
                (self.key4 as *const CtKey4).cast(),
                self.probe,
                cfg,
                now,
            );
        } else {
            let place = ct_place6(self.key, cfg.ct_seed, cfg.ct_sets_mask);
            scan::<CtEntry6, 10, { core::mem::offset_of!(CtKey, protocol) }>(
                &PALISADE_CTTAG6,
                &PALISADE_CONN6,
                place,
                (self.key as *const CtKey).cast(),
                self.probe,
                cfg,
                now,
            );
        }
    }

    /// The way found holding the connection: its value, its state word
    /// and the state then.
    #[inline(always)]
    pub(super) fn hit(&self) -> Option<(*mut CtValue, *mut u64, u64)> {
        // SAFETY: the probe is in this CPU's scratch.
        let (hit, state) = unsafe {
            (
                core::ptr::read_volatile(&(*self.probe).hit),
                core::ptr::read_volatile(&(*self.probe).hit_state),
            )
        };
        let i = hit.checked_sub(1)?;
        if self.v4() {
            let v = PALISADE_CONN4.get_ptr_mut(ct_entry(state))?.cast();
            Some((v, state_word(&PALISADE_CTTAG4, i)?, state))
        } else {
            let v = PALISADE_CONN6.get_ptr_mut(ct_entry(state))?.cast();
            Some((v, state_word(&PALISADE_CTTAG6, i)?, state))
        }
    }

    /// Forgets the hit (an expired or closed connection): its way is the
    /// one a new insert claims.
    #[inline(always)]
    pub(super) fn retire_hit(&self) {
        // SAFETY: the probe is in this CPU's scratch.
        unsafe {
            let p = self.probe;
            (*p).free = core::ptr::read_volatile(&(*p).hit);
            (*p).free_state = core::ptr::read_volatile(&(*p).hit_state);
            (*p).hit = 0;
        }
    }

    /// Forgets a hit whose way was reused under us: neither join nor
    /// claim it.
    #[inline(always)]
    pub(super) fn drop_hit(&self) {
        // SAFETY: the probe is in this CPU's scratch.
        unsafe {
            (*self.probe).hit = 0;
            (*self.probe).free = 0;
        }
    }

    /// Claims the free way and writes the connection into it.
    #[inline(always)]
    pub(super) fn insert(&self, v: &CtValue) -> Record {
        // SAFETY: the probe is in this CPU's scratch.
        let (free, state, tag) = unsafe {
            (
                core::ptr::read_volatile(&(*self.probe).free),
                core::ptr::read_volatile(&(*self.probe).free_state),
                core::ptr::read_volatile(&(*self.probe).tag),
            )
        };
        let Some(i) = free.checked_sub(1) else {
            return Record::Full;
        };
        let Some(head) = PALISADE_CTHEAD.get_ptr_mut(if self.v4() { 0 } else { 1 }) else {
            return Record::Full;
        };
        let way = Way { i, state, tag };
        if self.v4() {
            claim(
                &PALISADE_CTTAG4,
                &PALISADE_CONN4,
                Log {
                    cursor: self.log4,
                    head,
                    owners: &PALISADE_CTOWN4,
                    ways: self.ways,
                },
                way,
                v,
                self.key4,
            )
        } else {
            claim(
                &PALISADE_CTTAG6,
                &PALISADE_CONN6,
                Log {
                    cursor: self.log6,
                    head,
                    owners: &PALISADE_CTOWN6,
                    ways: self.ways,
                },
                way,
                v,
                self.key,
            )
        }
    }
}

/// A way an insert claims: its index, its state word as read (free)
/// and the new connection's tag.
pub(super) struct Way {
    pub(super) i: u32,
    pub(super) state: u64,
    pub(super) tag: u32,
}

/// Where a CPU writes a table's new connections: its run of log
/// entries (in the scratch), the table's shared head, the log
/// entries' owners, and the table's ways (the log follows their homes).
pub(super) struct Log<'a> {
    pub(super) cursor: *mut CtCursor,
    pub(super) head: *mut u64,
    pub(super) owners: &'a Array<u64>,
    pub(super) ways: u32,
}

/// The next entry of this CPU's run of the log whose connection (if
/// any) is gone, with its owner word and the owner as read: two
/// tries, then None (the insert writes the way's home). Entries are
/// counted from the start of the array (the log follows the `ways`
/// homes).
#[inline(always)]
pub(super) fn log_entry(tags: &Array<CtTags>, log: &Log) -> Option<(u32, *mut u64, u64)> {
    let ways = log.ways;
    let entries = ct_log_entries(ways);
    let run = if entries < CT_LOG_CHUNK {
        entries
    } else {
        CT_LOG_CHUNK
    };
    // The head and the owner entries are array-map values (valid for the
    // run; array values are never freed), reached through `atomic`.
    // SAFETY: the cursor is in this CPU's scratch map value, which lives
    // for the whole run and which nothing else on this CPU borrows while
    // the program runs (programs do not nest on one CPU's scratch).
    let cursor = unsafe { &mut *log.cursor };
    let mut tries = 0;
    while tries < 2 {
        if cursor.left == 0 {
            // Runs start at multiples of their length, so one never
            // wraps past the end of the log.
            let start = atomic::fetch_add(log.head, u64::from(run))?;
            cursor.next = start as u32 & (entries - 1);
            cursor.left = run;
        }
        let n = cursor.next & (entries - 1);
        let at = ways + n;
        cursor.next = cursor.next.wrapping_add(1);
        cursor.left -= 1;
        let owner = log.owners.get_ptr_mut(n)?;
        let seen = atomic::load(owner);
        // An owner is cleared when its way stops naming the entry; one
        // left behind (a sweep that stopped half-way) is checked
        // against its way's state word, a random read.
        let taken = match ct_owner_way(seen) {
            Some(way) => match state_word(tags, way) {
                Some(word) => ct_log_entry_taken(atomic::load(word), at),
                None => false,
            },
            None => false,
        };
        if !taken {
            return Some((at, owner, seen));
        }
        tries += 1;
    }
    None
}

/// Claims `way` of a table (read free) for a new connection and writes
/// it: into the next free entry of this CPU's run of the log, or into
/// the way's home when the log's next entries still hold connections
/// or another CPU took the same entry (a run taken a whole lap of the
/// log ago). Each family calls it in its own branch, so the verifier
/// checks the key's write against its table.
#[inline(always)]
pub(super) fn claim<E, K: Copy>(
    tags: &Array<CtTags>,
    table: &Array<E>,
    log: Log,
    way: Way,
    v: &CtValue,
    key: &K,
) -> Record {
    let Some(word) = state_word(tags, way.i) else {
        return Record::Full;
    };
    let ways = log.ways;
    let logged = log_entry(tags, &log);
    let first = match logged {
        Some((at, _, _)) => at,
        None => way.i,
    };
    let claimed = ct_claimed(way.state, way.tag, first);
    if !atomic::swap_if(word, way.state, claimed) {
        return Record::Contended;
    }
    // A reused way's connection no longer holds its log entry.
    let was = ct_entry(way.state);
    if way.state & CT_STATUS != CT_EMPTY
        && was >= ways
        && let Some(owner) = log.owners.get_ptr_mut(was - ways)
    {
        atomic::swap_if(owner, ct_owner(way.i, way.state), 0);
    }
    // The log entry is ours once its owner names this way: busy and
    // naming the entry, the way now marks it taken for every other
    // inserter that reads it after this exchange.
    let at = match logged {
        Some((at, owner, seen)) if atomic::swap_if(owner, seen, ct_owner(way.i, claimed)) => at,
        _ => {
            stat(Statistic::CtHome);
            way.i
        }
    };
    let Some(entry) = table.get_ptr_mut(at) else {
        atomic::publish(word, ct_freed(claimed));
        return Record::Full;
    };
    // SAFETY: the entry is ours while the way is busy (readers skip
    // busy ways; a home entry is only its way's, a log entry only its
    // owner's); its key of type K sits at KEY_AT.
    unsafe {
        entry.cast::<CtValue>().write(*v);
        entry.cast::<u8>().add(KEY_AT).cast::<K>().write(*key);
    }
    // Busy to live, after the writes above. A plain store: an atomic
    // read-modify-write here would wait for the entry's cache line
    // before the packet goes on.
    atomic::publish(word, ct_moved(claimed, at) - CT_BUSY + CT_LIVE);
    Record::Done
}

/// Scans the two sets of `place` in one family's table for the key of
/// `N` words (see [`Conn::lookup`]): first their state words alone,
/// opening only ways whose tag matches; the ways themselves only when
/// both sets are full, for one whose connection has expired. The way
/// offered for an insert is the first free one of the set with fewer
/// ways taken before it (sets fill from their first way), so inserts
/// balance the two choices.
#[inline(always)]
pub(super) fn scan<E, const N: usize, const PROTOCOL_AT: usize>(
    tags: &Array<CtTags>,
    table: &Array<E>,
    place: CtPlace,
    key: *const u32,
    probe: *mut CtProbe,
    cfg: &Config,
    now: u64,
) {
    // Ways and state words are array-map values (valid for the run). A
    // concurrent writer can tear what is read: a torn key compares
    // unequal, and a torn expiry only offers a way whose claim (a
    // compare-and-swap on the state read here) then fails.
    // SAFETY: the probe points into this CPU's scratch map value: valid,
    // aligned and not aliased by any other reference during the run.
    unsafe { (*probe).tag = place.tag };
    let mut set = 0;
    while set < 2 {
        let base = if set == 0 { place.a } else { place.b };
        let Some(line) = tags.get_ptr_mut(base / CT_TAG_LINE) else {
            return;
        };
        // The set's four words: the line's first or second half.
        // SAFETY: `line` is a live array-map value; `state` holds
        // 2 * CT_WAYS u64 words and `base & CT_WAYS` is 0 or CT_WAYS, so the
        // offset stays inside it.
        let first = unsafe {
            (&raw mut (*line).state)
                .cast::<u64>()
                .add((base & CT_WAYS) as usize)
        };
        let mut w = 0;
        while w < CT_WAYS {
            // SAFETY: w < CT_WAYS, so the word is inside this set's half of
            // the line (see `first`).
            let state = atomic::load(unsafe { first.add(w as usize) });
            let status = state & CT_STATUS;
            if status == CT_LIVE && ct_tag(state) == place.tag {
                let Some(entry) = table.get_ptr_mut(ct_entry(state)) else {
                    return;
                };
                // SAFETY: `entry` is a live array-map value of type E, whose
                // key starts KEY_AT bytes in (checked by the common crate's
                // layout test), 4-aligned.
                let at = unsafe { entry.cast::<u8>().add(KEY_AT).cast::<u32>() };
                if same_words::<N>(at, key) {
                    // SAFETY: the probe is this CPU's scratch (see above).
                    unsafe {
                        (*probe).hit = base + w + 1;
                        (*probe).hit_state = state;
                    }
                    return;
                }
            }
            if status == CT_EMPTY {
                offer(probe, set, base + w, w, state);
            }
            w += 1;
        }
        set += 1;
    }
    // SAFETY: the probe is this CPU's scratch (see above); a volatile read
    // so the verifier sees the value the offers above stored.
    if unsafe { core::ptr::read_volatile(&(*probe).free) } != 0 {
        return;
    }
    // Both sets full: reuse a connection idle past its timeout.
    let mut set = 0;
    while set < 2 {
        let base = if set == 0 { place.a } else { place.b };
        let mut w = 0;
        while w < CT_WAYS {
            let Some(word) = state_word(tags, base + w) else {
                return;
            };
            let state = atomic::load(word);
            let Some(entry) = table.get_ptr_mut(ct_entry(state)) else {
                return;
            };
            let v = entry.cast::<CtValue>();
            // SAFETY: `entry` is a live array-map value beginning with a
            // CtValue, with the key (and its protocol byte) KEY_AT bytes in;
            // concurrent writers may tear these reads (see above), never
            // make them invalid.
            let expired = unsafe {
                let protocol = entry.cast::<u8>().add(KEY_AT + PROTOCOL_AT).read_volatile();
                ct_expired(
                    cfg,
                    protocol,
                    core::ptr::read_volatile(&(*v).flags),
                    core::ptr::read_volatile(&(*v).last_seen),
                    now,
                )
            };
            if state & CT_STATUS == CT_LIVE && expired {
                offer(probe, set, base + w, w, state);
            }
            w += 1;
        }
        set += 1;
    }
}

/// Offers way `i` (way `w` of its set) to an insert, unless the probe
/// holds a way of the other set at most as far in.
#[inline(always)]
pub(super) fn offer(probe: *mut CtProbe, set: u32, i: u32, w: u32, state: u64) {
    // SAFETY: the probe is in this CPU's scratch. Read back from memory:
    // unknown to the verifier, so the ways' outcomes do not multiply
    // its states.
    unsafe {
        let offered = core::ptr::read_volatile(&(*probe).free);
        if offered == 0 || (set == 1 && w < (offered - 1) % CT_WAYS) {
            (*probe).free = i + 1;
            (*probe).free_state = state;
        }
    }
}

/// Records this side's approval: joins the entry when the connection is
/// tracked, else inserts one, with `sender`'s deferred approval when
/// there is one. (Joining an entry another CPU inserted meanwhile
/// drops it: the sender's next packet is judged again.)
#[inline(always)]
pub(super) fn approve(
    conn: &Conn,
    local_is_a: bool,
    a_is_src: bool,
    rule: u32,
    ifindex: u32,
    now: u64,
    sender: Approval,
) -> Record {
    if let Some((v, word, state)) = conn.hit() {
        // Join: lock the way in the generation that was read (a reused
        // way fails the exchange), write this side, unlock.
        let unlocked = state & !CT_LOCK;
        if !atomic::swap_if(word, unlocked, unlocked | CT_LOCK) {
            return Record::Contended;
        }
        // SAFETY: this side's fields are ours while the lock is held;
        // flags are shared with the established path, hence the atomic.
        unsafe {
            let bit = if local_is_a {
                (*v).rule_a = rule;
                (*v).ifindex_a = ifindex;
                CT_APPROVED_A
            } else {
                (*v).rule_b = rule;
                (*v).ifindex_b = ifindex;
                CT_APPROVED_B
            };
            atomic::or(flags_word(v), u64::from(bit));
        }
        atomic::and(word, !CT_LOCK);
        return Record::Done;
    }
    let origin = if a_is_src { CT_ORIGIN_A } else { 0 };
    // A new entry carries the other side's deferred approval too.
    let other = if sender.ifindex != 0 {
        if local_is_a {
            CT_APPROVED_B
        } else {
            CT_APPROVED_A
        }
    } else {
        0
    };
    let (rule_a, ifindex_a, rule_b, ifindex_b, approved) = if local_is_a {
        (
            rule,
            ifindex,
            sender.rule,
            sender.ifindex,
            CT_APPROVED_A | other,
        )
    } else {
        (
            sender.rule,
            sender.ifindex,
            rule,
            ifindex,
            CT_APPROVED_B | other,
        )
    };
    conn.insert(&CtValue {
        rule_a,
        rule_b,
        ifindex_a,
        ifindex_b,
        flags: origin | approved,
        pad: 0,
        created: now,
        last_seen: now,
    })
}

/// Which side of its connection a packet's endpoint is on.
#[derive(Clone, Copy)]
pub(super) struct Side {
    /// The endpoint at this hook is the connection's side A.
    pub(super) local_is_a: bool,
    /// The packet's source is side A.
    pub(super) a_is_src: bool,
}

/// A packet of a connection this endpoint approved on this interface:
/// updates the connection's flags and last use and counts the packet
/// against the approving rule; true when the packet passes on that.
/// An expired or closed connection is retired, a way reused meanwhile
/// forgotten: the packet is then a new flow.
#[inline(always)]
pub(super) fn established(
    ctx: &TcContext,
    p: &Parsed,
    conn: &Conn,
    side: Side,
    ifindex: u32,
    cfg: &Config,
    now: u64,
) -> bool {
    let approved_bit = if side.local_is_a {
        CT_APPROVED_A
    } else {
        CT_APPROVED_B
    };
    if let Some((v, word, state)) = conn.hit() {
        // SAFETY: `v` is a way of a conntrack array (valid for the
        // run); fields are read one by one, and the state word is read
        // again afterwards: if the way was reused meanwhile (a new
        // generation), what was read belongs to another connection and
        // is not used. Flags only gain bits here, atomically; approval
        // bits are only set after a policy allow.
        let (flags, last_seen) = unsafe {
            (
                core::ptr::read_volatile(&(*v).flags),
                core::ptr::read_volatile(&(*v).last_seen),
            )
        };
        let closed = flags & CT_RST != 0 || flags & (CT_FIN_A | CT_FIN_B) == (CT_FIN_A | CT_FIN_B);
        let reopened = p.protocol == 6 && closed && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let expired = ct_expired(cfg, p.protocol, flags, last_seen, now);
        if !reopened && !expired {
            // SAFETY: `v` is the same live conntrack way read above;
            // volatile reads of its fields (a reuse is caught by the state
            // word's generation check below).
            let (rule, approved_on) = unsafe {
                if side.local_is_a {
                    (
                        core::ptr::read_volatile(&(*v).rule_a),
                        core::ptr::read_volatile(&(*v).ifindex_a),
                    )
                } else {
                    (
                        core::ptr::read_volatile(&(*v).rule_b),
                        core::ptr::read_volatile(&(*v).ifindex_b),
                    )
                }
            };
            let same_way = atomic::load(word) & !CT_LOCK == state & !CT_LOCK;
            // Approved by this endpoint, on this interface (a packet
            // with the same addresses from elsewhere is not).
            if same_way && flags & approved_bit != 0 && approved_on == ifindex {
                let mut gained = 0;
                if p.protocol == 6 {
                    if p.tcp_flags & TCP_RST != 0 {
                        gained |= CT_RST;
                    }
                    if p.tcp_flags & TCP_FIN != 0 {
                        gained |= if side.a_is_src { CT_FIN_A } else { CT_FIN_B };
                    }
                }
                // SAFETY: `v` is the live way above; its flags word is
                // naturally aligned (see `flags_word`) and only changed
                // atomically, here and by other CPUs.
                unsafe {
                    if gained & !flags != 0 {
                        atomic::or(flags_word(v), u64::from(gained));
                    }
                    // Once per tick at most: a write per packet would
                    // bounce the line between the CPUs of both sides.
                    if last_seen != now {
                        core::ptr::write_volatile(&raw mut (*v).last_seen, now);
                    }
                }
                count(rule, ctx.len());
                return true;
            }
            if !same_way {
                // Reused under us: neither join nor claim it.
                conn.drop_hit();
            }
        } else {
            conn.retire_hit();
        }
    }
    false
}
