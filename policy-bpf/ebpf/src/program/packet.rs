//! The packet as the parser sees it (direct reads of linear data, helper
//! reads past it), and word-wise address helpers the BPF backend compiles
//! without byte loops.

use super::*;

/// Header reads at offsets below this come straight from the packet's
/// linear data (Ethernet, IPv4 with options or IPv6 with an extension
/// header, and the transport header fit); reads past it, or past the
/// linear data, go through `bpf_skb_load_bytes`.
pub(super) const DIRECT_BYTES: usize = 128;

/// The packet as the parser reads it.
pub(super) struct Skb<'a> {
    pub(super) ctx: &'a TcContext,
    /// `skb->data` and `skb->data_end`, read once.
    pub(super) data: usize,
    pub(super) data_end: usize,
}

impl Skb<'_> {
    /// The address of `n` packet bytes at `offset` when they are in the
    /// linear data (checked against `data_end` in a form the verifier
    /// tracks), else None.
    #[inline(always)]
    pub(super) fn direct(&self, offset: usize, n: usize) -> Option<usize> {
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
    pub(super) fn fixed<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
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
    pub(super) fn at(at: usize, i: usize) -> u8 {
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
pub(super) fn word(a: &[u8; 16], i: usize) -> u32 {
    // SAFETY: `a` is an address field at a 4-aligned offset of a
    // 4-aligned struct, so `a + 4 * i` (i < 4) is an aligned u32 inside it.
    unsafe { a.as_ptr().cast::<u32>().add(i & 3).read() }
}

/// Copies an address field word by word.
#[inline(always)]
pub(super) fn copy_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
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
pub(super) fn clear(p: &mut Parsed) {
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
pub(super) fn ct_key(p: &Parsed, key: &mut CtKey, key4: &mut CtKey4) -> bool {
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
    if p.family == AddressFamily::V4.code() {
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

/// The key under which a fragmented datagram's first verdict is kept.
#[inline(always)]
pub(super) fn fragment_key(p: &Parsed, zone: u32, key: &mut FragKey) {
    key.zone = zone;
    key.id = p.frag_id;
    key.family = p.family;
    key.protocol = p.protocol;
    key.pad = [0; 2];
    copy_addr(&mut key.src, &p.src);
    copy_addr(&mut key.dst, &p.dst);
}
