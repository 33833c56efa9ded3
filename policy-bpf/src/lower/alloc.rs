//! Allocation of map entries: dense indexes (program nodes, classes) and
//! ranges of nodes, plus small helpers on bit sets and addresses.

use super::*;

pub(super) fn or(a: &Bits, b: &Bits) -> Bits {
    let mut out = a.clone();
    out.union_with(b);
    out
}

pub(super) fn superset(a: &Bits, b: &Bits) -> bool {
    let (a, b) = (a.words(), b.words());
    b.iter()
        .enumerate()
        .all(|(i, y)| a.get(i).copied().unwrap_or(0) & y == *y)
}

/// Words per row that bits below `bits` need (at least one).
pub(super) fn stride_for(bits: u64) -> u32 {
    bits.div_ceil(64).max(1) as u32
}

pub(super) fn addr_bytes(ip: &IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            (AddressFamily::V4.code(), out)
        }
        IpAddr::V6(a) => (AddressFamily::V6.code(), a.octets()),
    }
}

/// Free-list allocator of dense indexes.
#[derive(Debug, Clone, Default)]
pub(super) struct Dense {
    pub(super) next: u32,
    pub(super) free: Vec<u32>,
    pub(super) used: u32,
}

impl Dense {
    pub(super) fn alloc(&mut self) -> u32 {
        self.used += 1;
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
    pub(super) fn release(&mut self, i: u32) {
        self.used -= 1;
        self.free.push(i);
    }
    /// Rows (highest index + 1) once `k` more are allocated: free ones first.
    pub(super) fn rows_after(&self, k: u64) -> u64 {
        u64::from(self.next) + k.saturating_sub(self.free.len() as u64)
    }

    /// Marks `i` used without handing it out (it belongs to someone else).
    pub(super) fn reserve(&mut self, i: u32) {
        if i >= self.next {
            self.free.extend(self.next..i);
            self.next = i + 1;
        } else if let Some(p) = self.free.iter().position(|f| *f == i) {
            self.free.swap_remove(p);
        } else {
            return;
        }
        self.used += 1;
    }
}

/// First-fit allocator of node ranges.
#[derive(Debug, Clone)]
pub(super) struct Ranges {
    pub(super) free: BTreeMap<u32, u32>,
}

impl Ranges {
    pub(super) fn new(capacity: u32) -> Self {
        Ranges {
            free: BTreeMap::from([(0, capacity)]),
        }
    }

    pub(super) fn alloc(&mut self, len: u32) -> Option<u32> {
        let (start, size) = self
            .free
            .iter()
            .find(|(_, s)| **s >= len)
            .map(|(a, b)| (*a, *b))?;
        self.free.remove(&start);
        if size > len {
            self.free.insert(start + len, size - len);
        }
        Some(start)
    }

    /// Takes `[start, start + len)` out of the free ranges.
    pub(super) fn reserve(&mut self, start: u32, len: u32) {
        let end = start + len;
        let overlapping: Vec<(u32, u32)> = self
            .free
            .range(..end)
            .filter(|(s, l)| **s + **l > start)
            .map(|(s, l)| (*s, *l))
            .collect();
        for (s, l) in overlapping {
            self.free.remove(&s);
            if s < start {
                self.free.insert(s, start - s);
            }
            if s + l > end {
                self.free.insert(end, s + l - end);
            }
        }
    }

    pub(super) fn release(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        // Merge with neighbours.
        if let Some((&ps, &pl)) = self.free.range(..start).next_back()
            && ps + pl == start
        {
            self.free.remove(&ps);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }
}
