//! Membership rows: which peer sets an identity or a CIDR class belongs to,
//! laid out as strided rows of 64-bit words.

/// Membership rows: each identity and each address class has a row of
/// `stride` 64-bit words (bit `b` in word `b / 64`), stored densely in an
/// array map of words. The stride follows the number of peer-set bits in
/// use, so one test is still one array read however many peer sets there
/// are, and memory is rows × bits in use rather than a fixed width.
///
/// A layout word says where the rows are: bits 0-31 the index of row 0's
/// first word, bits 32-63 the stride (0: no rows, every bit clear). User
/// space writes it with one atomic store, so a program sees the old rows
/// or the new ones, never a mix of one's base and the other's stride.
#[inline(always)]
pub const fn member_layout(base: u32, stride: u32) -> u64 {
    (base as u64) | ((stride as u64) << 32)
}

/// The index of row 0's first word in a layout word.
#[inline(always)]
pub const fn member_base(layout: u64) -> u32 {
    layout as u32
}

/// Words per row in a layout word.
#[inline(always)]
pub const fn member_stride(layout: u64) -> u32 {
    (layout >> 32) as u32
}

/// Where one row is under a layout: its first word and its length.
/// Resolved once per walk, so a membership test is one bounds check and
/// one array read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberRow {
    /// Index of the row's first word.
    pub start: u32,
    /// Words in the row (0: no row, every bit clear).
    pub stride: u32,
}

impl MemberRow {
    /// Row `row` under `layout`. Wrapping arithmetic: an index past the
    /// map is refused by the map lookup, never read.
    #[inline(always)]
    pub fn of(layout: u64, row: u32) -> MemberRow {
        let stride = member_stride(layout);
        MemberRow {
            start: member_base(layout).wrapping_add(row.wrapping_mul(stride)),
            stride,
        }
    }

    /// Which word holds bit `bit`, or `None` when the bit is past the row
    /// (clear: the row was written before the bit existed).
    #[inline(always)]
    pub fn word(&self, bit: u32) -> Option<u32> {
        let w = bit / 64;
        (w < self.stride).then_some(self.start.wrapping_add(w))
    }
}

/// Whether membership bit `bit` is set in `row`: the test the walk makes,
/// with `word` reading the rows' array map (kernel) or its mirror (user
/// space).
#[inline(always)]
pub fn member_bit(row: MemberRow, bit: u32, word: impl Fn(u32) -> Option<u64>) -> bool {
    match row.word(bit) {
        Some(i) => word(i).is_some_and(|x| x & (1u64 << (bit % 64)) != 0),
        None => false,
    }
}

/// Most words a membership row may have (the kernel's walk keeps a row's
/// length in 16 bits): 4,194,240 peer sets.
pub const MAX_MEMBER_STRIDE: u32 = 0xffff;

/// Index of the identity rows' layout word in the layout map.
pub const LAYOUT_IDENTITIES: u32 = 0;
/// Index of the address-class rows' layout word in the layout map.
pub const LAYOUT_CLASSES: u32 = 1;

/// What the address LPM maps a prefix to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerClass {
    /// Identity slot + 1 (0: the address belongs to no endpoint).
    pub identity: u32,
    /// Address-class slot (0: no CIDR memberships).
    pub class: u32,
}
