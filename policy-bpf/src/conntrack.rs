//! The conntrack tables from user space. They are set-associative arrays
//! that the TC programs read and write with atomic operations on each way's
//! state word (see [`CtEntry4`]). User space maps them into its address
//! space (the maps are created mmapable) so that it can count, sweep and
//! flush the ways with the same compare-and-swap protocol. Freeing a way
//! through the map syscalls would overwrite it whole, racing the programs.

use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::Ebpf;
use aya::maps::{Map, MapData};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use policy_bpf_common::{
    CT_EMPTY, CT_LIVE, CT_LOCK, CT_STATUS, CT_WAYS, Config, CtEntry4, CtEntry6, CtValue, ct_expired,
};

use crate::datapath::DatapathError;

/// Most connections a table may be sized for: 2^25, in 2^26 ways (IPv6
/// ways are 128 bytes: 8 GiB).
pub const MAX_CONNECTIONS: u32 = 1 << 25;

/// Ways of a table sized for `connections`: twice as many, rounded up to a
/// power of two (sets are picked by masking the hash), at least two sets.
/// At half load two choices of four ways leave no set overflowing (a
/// random placement of the capacity overflows about one connection in
/// 10^5); a chained kernel hash needs about as many bytes per IPv4
/// connection (a 104-byte element and a 16-byte bucket) as two 64-byte
/// ways.
pub fn ways_for(connections: u32) -> Result<u32, DatapathError> {
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(DatapathError::Load(format!(
            "capacity.conntrack: {connections} connections; it must be between 1 and {MAX_CONNECTIONS}"
        )));
    }
    Ok((connections * 2).max(2 * CT_WAYS).next_power_of_two())
}

/// An entry type of a conntrack table.
pub trait Way: Copy {
    /// The table's map name.
    const MAP: &'static str;
    /// The connection's IP protocol.
    fn protocol(&self) -> u8;
    /// The connection.
    fn value(&self) -> &CtValue;
}

impl Way for CtEntry4 {
    const MAP: &'static str = "PALISADE_CONN4";
    fn protocol(&self) -> u8 {
        self.key.protocol
    }
    fn value(&self) -> &CtValue {
        &self.value
    }
}

impl Way for CtEntry6 {
    const MAP: &'static str = "PALISADE_CONN6";
    fn protocol(&self) -> u8 {
        self.key.protocol
    }
    fn value(&self) -> &CtValue {
        &self.value
    }
}

/// One family's table, mapped into this process.
pub struct Table<E: Way> {
    /// Keeps the map (and so the mapping's object) open.
    _map: MapData,
    base: NonNull<E>,
    ways: u32,
    _entries: PhantomData<E>,
}

impl<E: Way> std::fmt::Debug for Table<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("map", &E::MAP)
            .field("ways", &self.ways)
            .finish()
    }
}

// SAFETY: the mapping is shared memory owned by this value; every access
// goes through atomic operations on state words or volatile reads, so
// moving the owner to another thread or sharing it is sound.
unsafe impl<E: Way> Send for Table<E> {}
// SAFETY: as above.
unsafe impl<E: Way> Sync for Table<E> {}

impl<E: Way> Drop for Table<E> {
    fn drop(&mut self) {
        // SAFETY: `base` and the length are exactly what `open` mapped, and
        // no reference into the mapping outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.bytes()) };
    }
}

impl<E: Way> Table<E> {
    /// Takes the table's map out of the loaded object and maps it (an
    /// mmapable array of `E`).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let err = |message: String| DatapathError::Map {
            map: E::MAP,
            message,
        };
        let map = ebpf
            .take_map(E::MAP)
            .ok_or_else(|| DatapathError::Load(format!("map {} missing", E::MAP)))?;
        let Map::Array(data) = map else {
            return Err(err(
                "not an array map (a pin from an older Palisade? remove it)".into(),
            ));
        };
        let info = data.info().map_err(|e| err(e.to_string()))?;
        let ways = info.max_entries();
        if info.value_size() as usize != size_of::<E>() {
            return Err(err(format!(
                "value size {} where {} was expected (a pin from another version? remove it)",
                info.value_size(),
                size_of::<E>()
            )));
        }
        if !ways.is_power_of_two() || ways < CT_WAYS {
            return Err(err(format!(
                "{ways} ways: not a power of two of whole sets"
            )));
        }
        let len = NonZeroUsize::new(ways as usize * size_of::<E>())
            .ok_or_else(|| err("empty table".into()))?;
        // SAFETY: a fresh shared mapping of the map's value area (the
        // kernel checks the map is mmapable and the length fits); nothing
        // else in this process aliases it.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                data.fd().as_fd(),
                0,
            )
        }
        .map_err(|e| err(format!("mmap: {e} (created without BPF_F_MMAPABLE?)")))?;
        Ok(Table {
            _map: data,
            base: base.cast(),
            ways,
            _entries: PhantomData,
        })
    }

    fn bytes(&self) -> usize {
        self.ways as usize * size_of::<E>()
    }

    /// Sets minus one, as the programs mask their hash with.
    pub fn sets_mask(&self) -> u32 {
        self.ways / CT_WAYS - 1
    }

    /// Number of ways.
    pub fn ways(&self) -> u32 {
        self.ways
    }

    /// The state word of way `i`.
    fn state(&self, i: u32) -> &AtomicU64 {
        debug_assert!(i < self.ways);
        // SAFETY: `i` is in bounds; the state word is the first field of a
        // 64-aligned entry in the mapping, and everyone writes it
        // atomically (the programs with BPF atomic instructions).
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(i as usize).cast::<u64>()) }
    }

    /// A consistent copy of way `i` with its state word: None while a
    /// writer holds it or when it changed during the copy (a seqlock read).
    fn read(&self, i: u32) -> Option<(u64, E)> {
        let before = self.state(i).load(Ordering::Acquire);
        if before & CT_LOCK != 0 {
            return None;
        }
        // SAFETY: in bounds and aligned; a volatile copy of plain integers.
        // A concurrent writer can tear it, which the state check below
        // detects (writers change the state word around their writes).
        let entry = unsafe { self.base.as_ptr().add(i as usize).read_volatile() };
        std::sync::atomic::fence(Ordering::Acquire);
        (self.state(i).load(Ordering::Relaxed) == before).then_some((before, entry))
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        (0..self.ways)
            .filter(|&i| self.state(i).load(Ordering::Relaxed) & CT_STATUS == CT_LIVE)
            .count()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees the live ways `dead` picks, unless a program changed them
    /// since they were read; returns how many were freed.
    pub fn free_where(&self, dead: impl Fn(&E) -> bool) -> usize {
        let mut freed = 0;
        for i in 0..self.ways {
            // Most ways of a sparse table are empty: skip them on one load.
            if self.state(i).load(Ordering::Relaxed) & CT_STATUS != CT_LIVE {
                continue;
            }
            let Some((state, entry)) = self.read(i) else {
                continue;
            };
            if state & CT_STATUS != CT_LIVE || !dead(&entry) {
                continue;
            }
            // Same generation, empty: the next claim advances it.
            let empty = (state & !(CT_STATUS | CT_LOCK)) | CT_EMPTY;
            if self
                .state(i)
                .compare_exchange(state, empty, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                freed += 1;
            }
        }
        freed
    }

    /// Frees the connections idle past their timeout at `now` (ticks).
    pub fn expire(&self, cfg: &Config, now: u64) -> usize {
        self.free_where(|e| {
            let v = e.value();
            ct_expired(cfg, e.protocol(), v.flags, v.last_seen, now)
        })
    }

    /// Copies of the live connections.
    pub fn entries(&self) -> Vec<E> {
        (0..self.ways)
            .filter(|&i| self.state(i).load(Ordering::Relaxed) & CT_STATUS == CT_LIVE)
            .filter_map(|i| self.read(i))
            .filter(|(s, _)| s & CT_STATUS == CT_LIVE)
            .map(|(_, e)| e)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_whole_sets_of_a_power_of_two() {
        assert_eq!(ways_for(1).unwrap(), 2 * CT_WAYS);
        assert_eq!(ways_for(4).unwrap(), 8);
        assert_eq!(ways_for(5).unwrap(), 16);
        assert_eq!(ways_for(262_144).unwrap(), 524_288);
        assert_eq!(ways_for(MAX_CONNECTIONS).unwrap(), 1 << 26);
        let e = ways_for(0).unwrap_err().to_string();
        assert!(e.contains("capacity.conntrack"), "{e}");
        assert!(ways_for(MAX_CONNECTIONS + 1).is_err());
    }
}
