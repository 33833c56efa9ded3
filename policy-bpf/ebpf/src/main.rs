//! Palisade's TC programs. `palisade_from_pod` runs on the host side of a
//! pod's veth at TC ingress (the pod's egress policy); `palisade_to_pod` at TC
//! egress (the pod's ingress policy). A packet from a pod that its egress
//! policy allows, addressed to a local endpoint, goes on by tail call to
//! `palisade_to_pod_local`: the receiver's ingress policy, judged as on the
//! receiver's interface, then straight into the receiving pod
//! (`bpf_redirect_peer`), past the node's forwarding.
//!
//! Per packet: look up the interface (unmanaged ones pass untouched, managed
//! ones give the endpoint's zone); parse the headers in place;
//! established connections pass on one conntrack lookup. A new flow finds
//! the endpoint slot for (interface, direction, local address) — a missing
//! one means a spoofed source — classifies its peer with one LPM lookup,
//! reads where the membership rows are (two words), walks the slot's
//! decision program (array reads, at most MAX_WALK; a membership test reads
//! one word of the peer's identity row and at most one of its class row), counts
//! the rule, records the connection, and reports drops (and sampled allows)
//! on a ring buffer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// Rust's BPF target offers no compare-and-swap or fetch-or through its
// atomic types; the intrinsics lower to BPF's atomic instructions.
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::bindings::{BPF_F_MMAPABLE, BPF_NOEXIST, TC_ACT_SHOT};
    use aya_ebpf::cty::c_void;
    use aya_ebpf::helpers::{
        bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_loop,
        bpf_redirect_peer, bpf_skb_load_bytes,
    };
    use aya_ebpf::macros::{classifier, map};
    use aya_ebpf::maps::lpm_trie::Key;
    use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf};
    use aya_ebpf::programs::TcContext;
    use policy_bpf_common::*;

    /// TCX_NEXT: let the next program (or the stack) decide.
    const PASS: i32 = -1;
    const DROP: i32 = TC_ACT_SHOT as i32;
    /// `process`'s verdict on a packet policy allowed: it passes, or goes
    /// straight to a local endpoint (see `palisade_from_pod`). Not a TC
    /// return code.
    const ALLOWED: i32 = -2;
    /// `process`'s verdict on a new connection from a pod to a local
    /// endpoint that the pod's egress policy allowed: its approval is in
    /// the skb's control block (see [`stash`]) for the receiver's
    /// judgement, to be tail-called next. Not a TC return code.
    const DEFERRED: i32 = -3;
    /// Marks `skb->cb` as holding a deferred approval ("PAL1").
    const STASH_MAGIC: u32 = 0x5041_4c31;
    const ETH_HLEN: usize = 14;

    // Sizes here are defaults; user space sets them from configuration at load.
    #[map]
    static PALISADE_NODES: Array<Node> = Array::pinned(262_144, 0);
    #[map]
    static PALISADE_SLOTS: HashMap<SlotKey, SlotValue> = HashMap::pinned(65_536, 0);
    /// Managed interfaces by ifindex: an array read (inlined by the
    /// verifier) on every packet; interfaces whose index is past its end are
    /// in PALISADE_MANAGED.
    #[map]
    static PALISADE_IFACES: Array<Interface> = Array::pinned(65_536, 0);
    #[map]
    static PALISADE_MANAGED: HashMap<u32, u32> = HashMap::pinned(16_384, 0);
    /// One IPv4 slot per interface of the direct table and direction (see
    /// [`local4_index`]): a new flow's slot without the hash lookup
    /// (about 30 ns a run in the veth lab). Mmapable so user space writes
    /// each word with one atomic store.
    #[map]
    static PALISADE_LOCAL4: Array<u64> = Array::pinned(2 * 65_536, BPF_F_MMAPABLE);
    #[map]
    static PALISADE_LPM4: LpmTrie<[u8; 4], PeerClass> = LpmTrie::pinned(262_144, 0);
    #[map]
    static PALISADE_LPM6: LpmTrie<[u8; 16], PeerClass> = LpmTrie::pinned(262_144, 0);
    /// Identity membership rows, `stride` words each (see
    /// [`member_layout`]); mmapable so user space writes each word with
    /// one atomic store.
    #[map]
    static PALISADE_IDWORDS: Array<u64> = Array::pinned(8 << 20, BPF_F_MMAPABLE);
    /// Address-class membership rows.
    #[map]
    static PALISADE_CLASSWORDS: Array<u64> = Array::pinned(2 << 20, BPF_F_MMAPABLE);
    /// Where the rows are: [`LAYOUT_IDENTITIES`] and [`LAYOUT_CLASSES`]
    /// layout words, each switched with one atomic store.
    #[map]
    static PALISADE_LAYOUT: Array<u64> = Array::pinned(2, BPF_F_MMAPABLE);
    /// Conntrack: set-associative tables in array maps (see [`CtEntry4`]),
    /// the entries (a home per way, then the log) and the ways' state
    /// words, mmapable so the user-space sweep reads and frees ways with
    /// the same atomic operations as the program. Not an LRU: dead ways
    /// are reused by inserts into their set and freed by the sweep
    /// (`Datapath::expire_conntrack`); live ones are never evicted.
    #[map]
    static PALISADE_CONN4: Array<CtEntry4> =
        Array::pinned(524_288 + ct_log_entries(524_288), BPF_F_MMAPABLE);
    /// State words of the IPv4 ways, eight to a line.
    #[map]
    static PALISADE_CTTAG4: Array<CtTags> = Array::pinned(524_288 / 8, BPF_F_MMAPABLE);
    /// IPv6 connections.
    #[map]
    static PALISADE_CONN6: Array<CtEntry6> =
        Array::pinned(524_288 + ct_log_entries(524_288), BPF_F_MMAPABLE);
    /// State words of the IPv6 ways.
    #[map]
    static PALISADE_CTTAG6: Array<CtTags> = Array::pinned(524_288 / 8, BPF_F_MMAPABLE);
    /// Where the next run of log entries starts, counted from the start
    /// of the log without wrapping: IPv4 (0), IPv6 (1). Pinned, so a
    /// restarted program goes on where the last one stopped.
    #[map]
    static PALISADE_CTHEAD: Array<u64> = Array::pinned(2, 0);
    /// The way (and its generation: [`ct_owner`]) holding each IPv4 log
    /// entry, cleared when the way lets go (0: none): apart from the
    /// entries, so that finding a free one reads eight to a cache line, in
    /// order, and not the entry a new flow only writes. Inserters take an
    /// entry with a compare-and-swap here.
    #[map]
    static PALISADE_CTOWN4: Array<u64> = Array::pinned(ct_log_entries(524_288), BPF_F_MMAPABLE);
    /// Owners of the IPv6 log entries.
    #[map]
    static PALISADE_CTOWN6: Array<u64> = Array::pinned(ct_log_entries(524_288), BPF_F_MMAPABLE);
    #[map]
    static PALISADE_FRAGS: LruHashMap<FragKey, u64> = LruHashMap::pinned(16_384, 0);
    #[map]
    static PALISADE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(65_536, 0);
    #[map]
    static PALISADE_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);
    #[map]
    static PALISADE_EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);
    #[map]
    static PALISADE_CONFIG: Array<Config> = Array::pinned(1, 0);
    /// Local endpoints by address (see [`LocalEndpoint`]).
    #[map]
    static PALISADE_ENDPOINTS: HashMap<LocalKey, LocalEndpoint> = HashMap::pinned(65_536, 0);
    /// Slot 0: `palisade_to_pod_local`, which local delivery tail-calls.
    #[map]
    static PALISADE_DELIVER: ProgramArray = ProgramArray::pinned(1, 0);
    /// Working memory; not pinned (each loaded program has its own).
    #[map]
    static PALISADE_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

    /// Header reads at offsets below this come straight from the packet's
    /// linear data (Ethernet, IPv4 with options or IPv6 with an extension
    /// header, and the transport header fit); reads past it, or past the
    /// linear data, go through `bpf_skb_load_bytes`.
    const DIRECT_BYTES: usize = 128;

    /// The packet as the parser reads it.
    struct Skb<'a> {
        ctx: &'a TcContext,
        /// `skb->data` and `skb->data_end`, read once.
        data: usize,
        data_end: usize,
    }

    impl Skb<'_> {
        /// The address of `n` packet bytes at `offset` when they are in the
        /// linear data (checked against `data_end` in a form the verifier
        /// tracks), else None.
        #[inline(always)]
        fn direct(&self, offset: usize, n: usize) -> Option<usize> {
            if offset >= DIRECT_BYTES {
                return None;
            }
            // The mask restates the bound for the verifier, which then
            // accepts the variable offset into the packet.
            let mut at = self.data + (offset & (DIRECT_BYTES - 1));
            // SAFETY: a register move LLVM cannot see through (it only
            // claims to change `at`): it keeps LLVM from folding `at + n`
            // into another pointer (say, `data + offset + n` computed for a
            // neighbouring read) that the verifier would not connect to `at`.
            // Not an empty template: that emits no instruction, and the
            // kernel rejects two line-info records at one offset.
            unsafe { core::arch::asm!("{0} = {0}", inout(reg) at) };
            (at + n <= self.data_end).then_some(at)
        }

        /// `N` bytes at `offset`: loaded straight from the packet into a
        /// value LLVM keeps in registers, else copied by the helper into a
        /// buffer of their own (a buffer shared by both paths would have
        /// its address taken and live on the stack).
        #[inline(always)]
        fn fixed<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
            match self.direct(offset, N) {
                Some(at) => Some(core::array::from_fn(|i| Self::at(at, i))),
                None => {
                    let mut b = [0u8; N];
                    self.read(offset, &mut b).then_some(b)
                }
            }
        }

        /// Byte `i` at a checked packet address (see `direct`).
        #[inline(always)]
        fn at(at: usize, i: usize) -> u8 {
            // SAFETY: `direct` checked that `at..at + n` is inside the linear
            // data and callers stay below n.
            unsafe { *((at + i) as *const u8) }
        }
    }

    impl PacketBytes for Skb<'_> {
        /// Reads exactly `dst.len()` bytes through the helper, which fails
        /// past the end of the packet (the slow path: headers outside the
        /// linear data).
        #[inline(always)]
        fn read(&self, offset: usize, dst: &mut [u8]) -> bool {
            // SAFETY: `dst` is a writable buffer of `dst.len()` bytes and the
            // skb pointer is valid for the program's run.
            let ret = unsafe {
                bpf_skb_load_bytes(
                    self.ctx.skb.skb.cast(),
                    offset as u32,
                    dst.as_mut_ptr().cast(),
                    dst.len() as u32,
                )
            };
            ret == 0
        }

        #[inline(always)]
        fn byte(&self, offset: usize) -> Option<u8> {
            self.fixed::<1>(offset).map(|b| b[0])
        }

        #[inline(always)]
        fn be16(&self, offset: usize) -> Option<u16> {
            self.fixed(offset).map(u16::from_be_bytes)
        }

        #[inline(always)]
        fn be32(&self, offset: usize) -> Option<u32> {
            self.fixed(offset).map(u32::from_be_bytes)
        }

        /// Writes the address as whole words (in packet byte order), so the
        /// word reads that follow are forwarded from these stores.
        #[inline(always)]
        fn addr(&self, offset: usize, dst: &mut [u8; 16], words: usize) -> bool {
            let words = if words == 1 { 1 } else { 4 };
            match self.direct(offset, 4 * words) {
                Some(at) => {
                    let d = dst.as_mut_ptr().cast::<u32>();
                    let mut w = 0;
                    while w < words {
                        let b = |i: usize| u32::from(Self::at(at, 4 * w + i));
                        // Little-endian host: byte 0 of the word is the low byte.
                        let v = b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24);
                        // SAFETY: `dst` is a 4-aligned address field (checked
                        // below at compile time for Parsed) and w < 4.
                        unsafe { d.add(w).write(v) };
                        w += 1;
                    }
                    true
                }
                None => self.read(offset, &mut dst[..4 * words]),
            }
        }
    }

    // Addresses as 32-bit words. The BPF backend turns copies and
    // comparisons of byte arrays into calls to byte-loop memcpy/memcmp
    // subprograms; word access is a few instructions. Sound because every
    // address field touched this way sits at a 4-byte-aligned offset of a
    // struct aligned to at least 4 (checked here at compile time).
    const _: () = {
        use core::mem::{align_of, offset_of};
        assert!(align_of::<Parsed>() >= 4 && align_of::<CtKey>() >= 4);
        assert!(align_of::<FragKey>() >= 4 && align_of::<SlotKey>() >= 4);
        assert!(align_of::<Event>() >= 4);
        assert!(offset_of!(Parsed, src) % 4 == 0 && offset_of!(Parsed, dst) % 4 == 0);
        assert!(offset_of!(CtKey, addr_a) % 4 == 0 && offset_of!(CtKey, addr_b) % 4 == 0);
        assert!(align_of::<CtKey4>() >= 4);
        assert!(offset_of!(CtKey4, addr_a) % 4 == 0 && offset_of!(CtKey4, addr_b) % 4 == 0);
        assert!(offset_of!(FragKey, src) % 4 == 0 && offset_of!(FragKey, dst) % 4 == 0);
        assert!(offset_of!(SlotKey, addr) % 4 == 0);
        assert!(offset_of!(Event, src) % 4 == 0 && offset_of!(Event, dst) % 4 == 0);
        assert!(offset_of!(Event, pad2) % 2 == 0);
        assert!(core::mem::size_of::<Parsed>() == 48 && align_of::<Parsed>() == 8);
    };

    /// Word `i` (0..4) of an address field (see the layout check above).
    #[inline(always)]
    fn word(a: &[u8; 16], i: usize) -> u32 {
        // SAFETY: `a` is an address field at a 4-aligned offset of a
        // 4-aligned struct, so `a + 4 * i` (i < 4) is an aligned u32 inside it.
        unsafe { a.as_ptr().cast::<u32>().add(i & 3).read() }
    }

    /// Copies an address field word by word.
    #[inline(always)]
    fn copy_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
        let d = dst.as_mut_ptr().cast::<u32>();
        // SAFETY: as in `word`, for both fields; they do not overlap (one is
        // borrowed mutably).
        unsafe {
            d.write(word(src, 0));
            d.add(1).write(word(src, 1));
            d.add(2).write(word(src, 2));
            d.add(3).write(word(src, 3));
        }
    }

    /// Zeroes the parse output with six word stores (volatile: LLVM would
    /// merge plain ones back into a memset call).
    #[inline(always)]
    fn clear(p: &mut Parsed) {
        let w = (p as *mut Parsed).cast::<u64>();
        // SAFETY: Parsed is 48 bytes, 8-aligned, all integers (checked above).
        unsafe {
            w.write_volatile(0);
            w.add(1).write_volatile(0);
            w.add(2).write_volatile(0);
            w.add(3).write_volatile(0);
            w.add(4).write_volatile(0);
            w.add(5).write_volatile(0);
        }
    }

    /// Fills the normalised conntrack key of the packet's family ([`CtKey4`]
    /// or [`CtKey`]); returns whether the packet's source is side a.
    #[inline(always)]
    fn ct_key(p: &Parsed, key: &mut CtKey, key4: &mut CtKey4) -> bool {
        // Lexicographic (address, port) order; byte order of an address is
        // the numeric order of its big-endian words, and the first
        // differing word decides.
        let mut a_is_src = p.src_port <= p.dst_port;
        let mut i = 4;
        while i > 0 {
            i -= 1;
            let (x, y) = (u32::from_be(word(&p.src, i)), u32::from_be(word(&p.dst, i)));
            if x != y {
                a_is_src = x < y;
            }
        }
        if p.family == FAMILY_V4 {
            let (a, b) = if a_is_src {
                (&p.src, &p.dst)
            } else {
                (&p.dst, &p.src)
            };
            key4.protocol = p.protocol;
            key4.pad = 0;
            key4.pad2 = 0;
            (key4.port_a, key4.port_b) = if a_is_src {
                (p.src_port, p.dst_port)
            } else {
                (p.dst_port, p.src_port)
            };
            // SAFETY: 4-aligned fields of a 4-aligned struct (checked above).
            unsafe {
                key4.addr_a.as_mut_ptr().cast::<u32>().write(word(a, 0));
                key4.addr_b.as_mut_ptr().cast::<u32>().write(word(b, 0));
            }
            return a_is_src;
        }
        key.family = p.family;
        key.protocol = p.protocol;
        key.pad = 0;
        if a_is_src {
            copy_addr(&mut key.addr_a, &p.src);
            key.port_a = p.src_port;
            copy_addr(&mut key.addr_b, &p.dst);
            key.port_b = p.dst_port;
        } else {
            copy_addr(&mut key.addr_a, &p.dst);
            key.port_a = p.dst_port;
            copy_addr(&mut key.addr_b, &p.src);
            key.port_b = p.src_port;
        }
        a_is_src
    }

    /// Atomic operations on conntrack state words and flags, which other
    /// CPUs and the user-space sweep change concurrently. Callers pass
    /// pointers into conntrack array maps' values: valid for the program's
    /// run (array values are never freed) and naturally aligned.
    mod atomic {
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
    fn flags_word(v: *mut CtValue) -> *mut u64 {
        // SAFETY: `flags` is at offset 16 of an 8-aligned CtValue in a
        // conntrack way, followed by its u32 pad.
        unsafe { (&raw mut (*v).flags).cast::<u64>() }
    }

    /// Way `i`'s state word in a table of tag lines.
    #[inline(always)]
    fn state_word(tags: &Array<CtTags>, i: u32) -> Option<*mut u64> {
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
    fn same_words<const N: usize>(a: *const u32, b: *const u32) -> bool {
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
    const KEY_AT: usize = core::mem::size_of::<CtValue>();

    /// Outcome of recording an approval.
    enum Record {
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
    struct Conn<'a> {
        family: &'a u8,
        key: &'a CtKey,
        key4: &'a CtKey4,
        probe: *mut CtProbe,
        /// Ways of each family's table (the log's entries follow their
        /// homes).
        ways: u32,
        /// This CPU's runs of log entries (in the scratch).
        log4: *mut CtCursor,
        log6: *mut CtCursor,
    }

    impl Conn<'_> {
        #[inline(always)]
        fn v4(&self) -> bool {
            // SAFETY: a valid, aligned reference.
            unsafe { core::ptr::read_volatile(self.family) == FAMILY_V4 }
        }

        /// Reads the connection's sets into the probe: the way holding it
        /// (live), and a way an insert may claim. Each family's scan is
        /// whole in its branch, so the verifier sees every key access
        /// against the entry size of the table it came from.
        #[inline(always)]
        fn lookup(&self, cfg: &Config, now: u64) {
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
        fn hit(&self) -> Option<(*mut CtValue, *mut u64, u64)> {
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
        fn retire_hit(&self) {
            // SAFETY: the probe is in this CPU's scratch.
            unsafe {
                let p = self.probe;
                (*p).free = core::ptr::read_volatile(&(*p).hit);
                (*p).free_state = core::ptr::read_volatile(&(*p).hit_state);
                (*p).hit = 0;
            }
        }

        /// Claims the free way and writes the connection into it.
        #[inline(always)]
        fn insert(&self, v: &CtValue) -> Record {
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
    struct Way {
        i: u32,
        state: u64,
        tag: u32,
    }

    /// Where a CPU writes a table's new connections: its run of log
    /// entries (in the scratch), the table's shared head, the log
    /// entries' owners, and the table's ways (the log follows their homes).
    struct Log<'a> {
        cursor: *mut CtCursor,
        head: *mut u64,
        owners: &'a Array<u64>,
        ways: u32,
    }

    /// The next entry of this CPU's run of the log whose connection (if
    /// any) is gone, with its owner word and the owner as read: two
    /// tries, then None (the insert writes the way's home). Entries are
    /// counted from the start of the array (the log follows the `ways`
    /// homes).
    #[inline(always)]
    fn log_entry(tags: &Array<CtTags>, log: &Log) -> Option<(u32, *mut u64, u64)> {
        let ways = log.ways;
        let entries = ct_log_entries(ways);
        let run = if entries < CT_LOG_CHUNK {
            entries
        } else {
            CT_LOG_CHUNK
        };
        // SAFETY (every block below): the cursor is in this CPU's scratch;
        // the head and the entries are in array maps (valid for the run).
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
    fn claim<E, K: Copy>(
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
        if way.state & CT_STATUS != CT_EMPTY && was >= ways {
            if let Some(owner) = log.owners.get_ptr_mut(was - ways) {
                atomic::swap_if(owner, ct_owner(way.i, way.state), 0);
            }
        }
        // The log entry is ours once its owner names this way: busy and
        // naming the entry, the way now marks it taken for every other
        // inserter that reads it after this exchange.
        let at = match logged {
            Some((at, owner, seen)) if atomic::swap_if(owner, seen, ct_owner(way.i, claimed)) => at,
            _ => {
                stat(STAT_CT_HOME);
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
    fn scan<E, const N: usize, const PROTOCOL_AT: usize>(
        tags: &Array<CtTags>,
        table: &Array<E>,
        place: CtPlace,
        key: *const u32,
        probe: *mut CtProbe,
        cfg: &Config,
        now: u64,
    ) {
        // SAFETY (every block below): the probe is in this CPU's scratch;
        // ways and state words are in array maps (valid for the run). A
        // concurrent writer can tear what is read: a torn key compares
        // unequal, and a torn expiry only offers a way whose claim (a
        // compare-and-swap on the state read here) then fails.
        unsafe { (*probe).tag = place.tag };
        let mut set = 0;
        while set < 2 {
            let base = if set == 0 { place.a } else { place.b };
            let Some(line) = tags.get_ptr_mut(base / CT_TAG_LINE) else {
                return;
            };
            // The set's four words: the line's first or second half.
            let first = unsafe {
                (&raw mut (*line).state)
                    .cast::<u64>()
                    .add((base & CT_WAYS) as usize)
            };
            let mut w = 0;
            while w < CT_WAYS {
                let state = atomic::load(unsafe { first.add(w as usize) });
                let status = state & CT_STATUS;
                if status == CT_LIVE && ct_tag(state) == place.tag {
                    let Some(entry) = table.get_ptr_mut(ct_entry(state)) else {
                        return;
                    };
                    let at = unsafe { entry.cast::<u8>().add(KEY_AT).cast::<u32>() };
                    if same_words::<N>(at, key) {
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
    fn offer(probe: *mut CtProbe, set: u32, i: u32, w: u32, state: u64) {
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
    fn approve(
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

    #[inline(always)]
    fn stat(i: u32) {
        if let Some(p) = PALISADE_STATS.get_ptr_mut(i) {
            // SAFETY: per-CPU slot; no other program touches it concurrently.
            unsafe { *p += 1 };
        }
    }

    #[inline(always)]
    fn count(rule: u32, bytes: u32) {
        if let Some(c) = PALISADE_COUNTERS.get_ptr_mut(rule) {
            // SAFETY: per-CPU slot owned by this CPU while the program runs.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += u64::from(bytes);
            }
        }
    }

    #[inline(always)]
    fn event(
        p: &Parsed,
        ifindex: u32,
        direction: u8,
        allow: bool,
        rule: u32,
        reason: u8,
        logged: bool,
    ) {
        match PALISADE_EVENTS.reserve::<Event>(0) {
            Some(mut e) => {
                let (sp, dp) = if p.protocol == 1 || p.protocol == 58 {
                    ((u16::from(p.icmp_type) << 8) | u16::from(p.icmp_code), 0)
                } else {
                    (p.src_port, p.dst_port)
                };
                let ev = e.as_mut_ptr();
                // SAFETY: `ev` points at a reserved, writable ring-buffer
                // record of size_of::<Event>(); every field is written before
                // submit, so the record is fully initialised.
                unsafe {
                    (*ev).ts_ns = bpf_ktime_get_ns();
                    (*ev).rule = rule;
                    (*ev).ifindex = ifindex;
                    (*ev).allow = allow as u8;
                    (*ev).direction = direction;
                    (*ev).family = p.family;
                    (*ev).protocol = p.protocol;
                    (*ev).reason = reason;
                    (*ev).flags = if logged { EVENT_LOGGED } else { 0 };
                    (*ev).src_port = sp;
                    (*ev).dst_port = dp;
                    // Three halfword stores (pad2 is 2-aligned, checked
                    // above); an array store compiles to a memset call.
                    let pad = (*ev).pad2.as_mut_ptr().cast::<u16>();
                    pad.write_volatile(0);
                    pad.add(1).write_volatile(0);
                    pad.add(2).write_volatile(0);
                    copy_addr(&mut (*ev).src, &p.src);
                    copy_addr(&mut (*ev).dst, &p.dst);
                }
                e.submit(0);
            }
            None => stat(STAT_EVENTS_LOST),
        }
    }

    /// A membership layout word (see [`member_layout`]; 0: no rows).
    #[inline(always)]
    fn layout(which: u32) -> u64 {
        match PALISADE_LAYOUT.get_ptr(which) {
            // SAFETY: an aligned word of an array map, written whole (one
            // atomic store) by user space.
            Some(w) => unsafe { core::ptr::read_volatile(w) },
            None => 0,
        }
    }

    #[inline(always)]
    fn config() -> Config {
        match PALISADE_CONFIG.get(0) {
            Some(c) => *c,
            None => Config::default(),
        }
    }

    /// Judges a packet as the `direction` hook of interface `ifindex`
    /// would (the interface it arrived on, or the local endpoint's it is
    /// being delivered to). `sender` is the other side's deferred
    /// approval, recorded with this side's when the connection is new
    /// (none: interface 0).
    #[inline(always)]
    fn process(ctx: &TcContext, direction: u8, ifindex: u32, sender: Approval) -> i32 {
        // The interface's zone (one endpoint per interface; keeps
        // fragment tracking apart).
        let zone = match PALISADE_IFACES.get(ifindex) {
            Some(i) if i.managed != 0 => i.zone,
            Some(_) => {
                stat(STAT_UNMANAGED);
                return PASS;
            }
            None => match PALISADE_MANAGED.get_ptr(&ifindex) {
                // SAFETY: a u32 written whole by user space.
                Some(z) => unsafe { *z },
                None => {
                    stat(STAT_UNMANAGED);
                    return PASS;
                }
            },
        };
        let Some(scratch) = PALISADE_SCRATCH.get_ptr_mut(0) else {
            return DROP;
        };
        // SAFETY: the per-CPU scratch slot is owned by this program run (TC
        // programs do not nest on a CPU).
        let sc = unsafe { &mut *scratch };
        let bytes = Skb {
            ctx,
            data: ctx.data(),
            data_end: ctx.data_end(),
        };
        clear(&mut sc.parsed);
        match parse_into(&bytes, &mut sc.parsed) {
            Ok(()) => {}
            Err(ParseError::NotIp) => {
                stat(STAT_NON_IP);
                return PASS;
            }
            Err(ParseError::Malformed) => {
                stat(STAT_MALFORMED);
                // Whatever was parsed before the failure is reported as is.
                event(
                    &sc.parsed,
                    ifindex,
                    direction,
                    false,
                    0,
                    REASON_MALFORMED,
                    false,
                );
                return DROP;
            }
        }
        let p = &sc.parsed;
        // Neighbour discovery and multicast listener reports keep IPv6
        // working on the link; policy is for traffic.
        if is_link_control(p) {
            return PASS;
        }
        let cfg = config();
        // Jiffies are enough for idle timeouts, and the cheapest clock: a
        // nanosecond one (even the coarse one) costs about 10 ns a packet.
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_jiffies64() };

        // The fragment key, only for fragments (later ones are looked up
        // here; an allowed first one is recorded at the end).
        if p.fragment {
            sc.frag.zone = zone;
            sc.frag.id = p.frag_id;
            sc.frag.family = p.family;
            sc.frag.protocol = p.protocol;
            sc.frag.pad = [0; 2];
            copy_addr(&mut sc.frag.src, &p.src);
            copy_addr(&mut sc.frag.dst, &p.dst);
        }
        if p.later_fragment {
            if PALISADE_FRAGS.get_ptr(&sc.frag).is_some() {
                return ALLOWED;
            }
            stat(STAT_FRAGMENT);
            event(p, ifindex, direction, false, 0, REASON_FRAGMENT, false);
            return DROP;
        }

        let a_is_src = ct_key(p, &mut sc.ct, &mut sc.ct4);
        let conn = Conn {
            family: &sc.parsed.family,
            key: &sc.ct,
            key4: &sc.ct4,
            probe: &raw mut sc.probe,
            ways: (cfg.ct_sets_mask + 1) * CT_WAYS,
            log4: &raw mut sc.log4,
            log6: &raw mut sc.log6,
        };
        conn.lookup(&cfg, now);
        // The side of the connection this interface's endpoint is on.
        let local_is_a = a_is_src == (direction == DIR_EGRESS);
        let approved_bit = if local_is_a {
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
            let closed =
                flags & CT_RST != 0 || flags & (CT_FIN_A | CT_FIN_B) == (CT_FIN_A | CT_FIN_B);
            let reopened =
                p.protocol == 6 && closed && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            let expired = ct_expired(&cfg, p.protocol, flags, last_seen, now);
            if !reopened && !expired {
                let (rule, approved_on) = unsafe {
                    if local_is_a {
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
                            gained |= if a_is_src { CT_FIN_A } else { CT_FIN_B };
                        }
                    }
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
                    stat(STAT_ESTABLISHED);
                    return ALLOWED;
                }
                if !same_way {
                    // Reused under us: neither join nor claim it.
                    sc.probe.hit = 0;
                    sc.probe.free = 0;
                }
            } else {
                conn.retire_hit();
            }
        }

        // New flow: find the endpoint's slot (its address on this
        // interface: anything else is spoofed), classify the peer and walk
        // the slot's program.
        let local = if direction == DIR_EGRESS {
            &p.src
        } else {
            &p.dst
        };
        let fast = match PALISADE_LOCAL4.get_ptr(local4_index(ifindex, direction)) {
            // SAFETY: an aligned word of an array map, written whole (one
            // atomic store) by user space.
            Some(w) if p.family == FAMILY_V4 => {
                local4_root(unsafe { core::ptr::read_volatile(w) }, word(local, 0))
            }
            _ => None,
        };
        let root = match fast {
            Some(root) => root,
            None => {
                sc.slot.ifindex = ifindex;
                sc.slot.direction = direction;
                sc.slot.family = p.family;
                sc.slot.pad = [0; 2];
                copy_addr(&mut sc.slot.addr, local);
                match PALISADE_SLOTS.get_ptr(&sc.slot) {
                    // SAFETY: slot values are written whole by user space
                    // (a hash element is replaced, not rewritten).
                    Some(s) => unsafe { (*s).root },
                    None => {
                        stat(STAT_SPOOFED);
                        event(p, ifindex, direction, false, 0, REASON_SPOOFED, false);
                        return DROP;
                    }
                }
            }
        };
        stat(STAT_NEW_FLOWS);
        let peer = if direction == DIR_EGRESS {
            &p.dst
        } else {
            &p.src
        };
        let class = if p.family == FAMILY_V4 {
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
            stat(STAT_WALK);
            event(p, ifindex, direction, false, 0, REASON_WALK, false);
            return DROP;
        }
        let v = Verdict {
            allow: (w.state >> WALK_FLAGS) & LEAF_ALLOW as u32 != 0,
            logged: (w.state >> WALK_FLAGS) & LEAF_LOGGED as u32 != 0,
            rule: w.rule,
            steps: w.steps,
        };
        count(v.rule, ctx.len());
        if !v.allow {
            event(
                p,
                ifindex,
                direction,
                false,
                v.rule,
                REASON_POLICY,
                v.logged,
            );
            return DROP;
        }
        // A new connection from this pod to a local endpoint: the approval
        // rides with the packet to the receiver's judgement, tail-called
        // next, which records both sides in one insert. Recorded here, the
        // receiver would join the entry with locked instructions that wait
        // for this insert's write (a cache miss in a large table) to land.
        let deferred = direction == DIR_EGRESS
            && !p.fragment
            && conn.hit().is_none()
            && local_receiver(ctx, ifindex, &mut sc.local).is_some();
        if deferred {
            stash(ctx, v.rule, ifindex);
        } else {
            match approve(&conn, local_is_a, a_is_src, v.rule, ifindex, now, sender) {
                Record::Done => {}
                // The policy allowed this packet, so it passes; later
                // packets are judged by policy again.
                Record::Full => stat(STAT_CT_FULL),
                Record::Contended => stat(STAT_CT_CONTENDED),
            }
        }
        if p.fragment {
            let _ = PALISADE_FRAGS.insert(&sc.frag, &now, u64::from(BPF_NOEXIST));
        }
        if cfg.allow_sample > 0 {
            // SAFETY: helper without preconditions.
            let r = unsafe { bpf_get_prandom_u32() };
            if r % cfg.allow_sample == 0 {
                event(p, ifindex, direction, true, v.rule, REASON_POLICY, v.logged);
            }
        }
        if deferred { DEFERRED } else { ALLOWED }
    }

    /// One side's approval of a connection: its rule and interface.
    #[derive(Clone, Copy)]
    struct Approval {
        rule: u32,
        /// 0: no approval.
        ifindex: u32,
    }

    impl Approval {
        const NONE: Approval = Approval {
            rule: 0,
            ifindex: 0,
        };
    }

    /// Puts a deferred approval in the skb's control block, which the tail
    /// call keeps: `[STASH_MAGIC, rule, ifindex]`. The caller writes the
    /// block right before every tail call (see [`clear_stash`]), so the
    /// receiver never reads another packet's or layer's bytes as one.
    #[inline(always)]
    fn stash(ctx: &TcContext, rule: u32, ifindex: u32) {
        // SAFETY: `cb` is the context's scratch words, writable by TC
        // programs.
        unsafe {
            let skb = ctx.skb.skb;
            (*skb).cb[0] = STASH_MAGIC;
            (*skb).cb[1] = rule;
            (*skb).cb[2] = ifindex;
        }
    }

    /// Marks the control block as holding no deferred approval.
    #[inline(always)]
    fn clear_stash(ctx: &TcContext) {
        // SAFETY: as in `stash`.
        unsafe { (*ctx.skb.skb).cb[0] = 0 };
    }

    /// Takes the deferred approval out of the control block, if any.
    #[inline(always)]
    fn unstash(ctx: &TcContext) -> Approval {
        // SAFETY: as in `stash`.
        unsafe {
            let skb = ctx.skb.skb;
            if (*skb).cb[0] != STASH_MAGIC {
                return Approval::NONE;
            }
            (*skb).cb[0] = 0;
            Approval {
                rule: (*skb).cb[1],
                ifindex: (*skb).cb[2],
            }
        }
    }

    /// The interface a packet arrived on.
    #[inline(always)]
    fn arrival(ctx: &TcContext) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*ctx.skb.skb).ifindex }
    }

    /// The local endpoint a frame is addressed to, and its IP family,
    /// when it is one and the frame is for local delivery: Ethernet then
    /// IP in the linear data (a pod's veth carries no VLAN tags), with a
    /// hop left, not from the endpoint's own interface `from`. Read from
    /// the frame, not from a parse another program made.
    #[inline(always)]
    fn local_receiver(
        ctx: &TcContext,
        from: u32,
        key: &mut LocalKey,
    ) -> Option<(LocalEndpoint, u8)> {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + ETH_HLEN + 20 > end {
            return None;
        }
        key.pad = [0; 3];
        let b = data as *const u8;
        let words = key.addr.as_mut_ptr().cast::<u32>();
        // SAFETY (reads): inside the bounds checked before each. (Writes):
        // the key's address is 4-aligned and four words long.
        let family = unsafe {
            match (*b.add(12), *b.add(13)) {
                (0x08, 0x00) => {
                    if *b.add(ETH_HLEN + 8) <= 1 {
                        return None;
                    }
                    words.write(b.add(ETH_HLEN + 16).cast::<u32>().read_unaligned());
                    words.add(1).write(0);
                    words.add(2).write(0);
                    words.add(3).write(0);
                    FAMILY_V4
                }
                (0x86, 0xdd) => {
                    if data + ETH_HLEN + 40 > end || *b.add(ETH_HLEN + 7) <= 1 {
                        return None;
                    }
                    let dst = b.add(ETH_HLEN + 24).cast::<u32>();
                    words.write(dst.read_unaligned());
                    words.add(1).write(dst.add(1).read_unaligned());
                    words.add(2).write(dst.add(2).read_unaligned());
                    words.add(3).write(dst.add(3).read_unaligned());
                    FAMILY_V6
                }
                _ => return None,
            }
        };
        key.family = family;
        // SAFETY: a value of the map, written whole by user space.
        let ep = unsafe { *PALISADE_ENDPOINTS.get_ptr(key)? };
        (ep.ifindex != from && ep.ifindex != 0).then_some((ep, family))
    }

    /// Hands an allowed packet to a local endpoint: what
    /// the node's forwarding would write (the pod's and the host side's
    /// MACs, one hop less), then straight into the pod's end of the veth.
    #[inline(always)]
    fn hand_over(ctx: &TcContext, ep: &LocalEndpoint, family: u8) -> i32 {
        let (data, end) = (ctx.data(), ctx.data_end());
        if data + ETH_HLEN + 20 > end {
            return PASS;
        }
        let b = data as *mut u8;
        // SAFETY: inside the bounds checked above (the IPv6 hop limit is
        // at ETH_HLEN + 7); `local_receiver` checked the EtherType and
        // that a hop is left.
        unsafe {
            let mut i = 0;
            while i < 6 {
                *b.add(i) = ep.pod_mac[i];
                *b.add(6 + i) = ep.host_mac[i];
                i += 1;
            }
            if family == FAMILY_V4 {
                *b.add(ETH_HLEN + 8) -= 1;
                // RFC 1624's incremental update, as the kernel's
                // ip_decrease_ttl: the TTL is the high byte of its word.
                let at = b.add(ETH_HLEN + 10).cast::<u16>();
                let check = u32::from(at.read_unaligned()) + u32::from(0x0100u16.to_be());
                at.write_unaligned((check + u32::from(check >= 0xffff)) as u16);
            } else {
                *b.add(ETH_HLEN + 7) -= 1;
            }
        }
        stat(STAT_DELIVERED);
        // SAFETY: helper without preconditions; TC_ACT_REDIRECT with no
        // flags, and this runs at TC ingress (tail-called from the
        // sender's hook), where a peer redirect is allowed.
        unsafe { bpf_redirect_peer(ep.ifindex, 0) as i32 }
    }

    /// Walk steps taken inline before handing over to bpf_loop.
    const INLINE_WALK: u32 = 24;
    const WALK_RUNNING: u32 = 0;
    const WALK_LEAF: u32 = 1;
    const WALK_BROKEN: u32 = 2;
    /// The status bits of [`WalkState::state`].
    const WALK_STATUS: u32 = 3;
    /// Where the leaf's flags start in [`WalkState::state`].
    const WALK_FLAGS: u32 = 2;

    /// A decision walk in progress (on the program's stack). The fields
    /// that start at zero are interleaved with the others: LLVM turns a run
    /// of more than 8 zeroed bytes into a memset subprogram call, on every
    /// new flow (hence also the verdict as whole words, not a Verdict with
    /// two bools and padding).
    #[repr(C)]
    struct WalkState {
        at: u32,
        steps: u32,
        /// First word of the peer identity's row (see [`MemberRow`]).
        id_start: u32,
        /// `WALK_*` status in bits 0-1, the leaf's `LEAF_*` flags from
        /// bit 2 (packed: the walk's state and the caller's frame share a
        /// stack with no bytes to spare).
        state: u32,
        /// First word of the peer address class's row.
        class_start: u32,
        /// Words of the identity row (0: the peer has no identity) in
        /// bits 0-15, of the class row in bits 16-31.
        strides: u32,
        features: Features,
        /// The leaf's rule index.
        rule: u32,
    }

    /// One node per iteration; returns 1 to stop the loop.
    #[inline(always)]
    extern "C" fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
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
                    | (u32::from(v.allow) * LEAF_ALLOW as u32
                        | u32::from(v.logged) * LEAF_LOGGED as u32)
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

    /// The pod's egress policy: packets the pod sends.
    // The macro's entry point calls this function: inlined, the program
    // is one function (a BPF-to-BPF call costs a frame on every packet).
    #[classifier]
    #[inline(always)]
    pub fn palisade_from_pod(ctx: TcContext) -> i32 {
        let from = arrival(&ctx);
        let deliver = match process(&ctx, DIR_EGRESS, from, Approval::NONE) {
            DEFERRED => true,
            ALLOWED => match PALISADE_SCRATCH.get_ptr_mut(0) {
                // SAFETY: this CPU's scratch (TC programs do not nest).
                Some(sc) => {
                    local_receiver(&ctx, from, unsafe { &mut (*sc).local }).is_some() && {
                        clear_stash(&ctx);
                        true
                    }
                }
                None => false,
            },
            r => return r,
        };
        if deliver {
            // SAFETY: the target is a TC program taking the same context;
            // this returns only when the slot is empty (then a deferred
            // approval is lost: the connection's next packet is judged
            // again).
            unsafe { PALISADE_DELIVER.tail_call(&ctx, 0) };
        }
        PASS
    }

    /// The pod's ingress policy: packets sent to the pod.
    #[classifier]
    #[inline(always)]
    pub fn palisade_to_pod(ctx: TcContext) -> i32 {
        match process(&ctx, DIR_INGRESS, arrival(&ctx), Approval::NONE) {
            ALLOWED => PASS,
            r => r,
        }
    }

    /// The receiver's ingress policy for a packet `palisade_from_pod`
    /// allowed to a local endpoint (only ever tail-called from there): the
    /// judgement `palisade_to_pod` makes on the receiver's interface, then
    /// the hand-over. It finds the receiver again rather than taking it
    /// from the caller: a caller of another build (during a restart) shares
    /// only the pinned maps with it. A packet it does not judge (say, an
    /// interface no longer managed) passes, takes the node's forwarding,
    /// and meets `palisade_to_pod` there.
    #[classifier]
    pub fn palisade_to_pod_local(ctx: TcContext) -> i32 {
        let Some(sc) = PALISADE_SCRATCH.get_ptr_mut(0) else {
            return PASS;
        };
        // SAFETY: this CPU's scratch (TC programs do not nest on a CPU).
        let Some((ep, family)) = local_receiver(&ctx, arrival(&ctx), unsafe { &mut (*sc).local })
        else {
            return PASS;
        };
        match process(&ctx, DIR_INGRESS, ep.ifindex, unstash(&ctx)) {
            ALLOWED | DEFERRED => hand_over(&ctx, &ep, family),
            r => r,
        }
    }

    /// Reports the conntrack clock to user space, which runs it with
    /// BPF_PROG_TEST_RUN (never attached): writes jiffies, then coarse
    /// monotonic nanoseconds, over the start of the packet.
    #[classifier]
    pub fn palisade_clock(ctx: TcContext) -> i32 {
        // SAFETY: helpers without preconditions.
        let now = unsafe { [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
        match ctx.store(0, &now, 0) {
            Ok(()) => PASS,
            Err(_) => DROP,
        }
    }

    /// Does nothing but pass: the baseline benchmarks subtract, measured in
    /// the same run, so reported costs are what policy adds.
    #[classifier]
    pub fn palisade_pass(_ctx: TcContext) -> i32 {
        PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

/// On the host the crate builds as an empty binary, so workspace-wide checks
/// and tests work; the programs exist only for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
