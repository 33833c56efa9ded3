//! The conntrack tables from user space. They are set-associative arrays
//! that the TC programs read and write with atomic operations on each way's
//! state word, kept in a separate array of tag lines; the word names the
//! entry holding the way's connection, its home or one of the log's (see
//! [`CtEntry4`]).
//! User space maps both into its address space (the maps are created
//! mmapable) so that it can count, sweep and flush the ways with the same
//! compare-and-swap protocol. Freeing a way through the map syscalls would
//! overwrite its line of state words whole, racing the programs.

use policy_bpf_common::map_names;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::Ebpf;
use aya::maps::{Map, MapData};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use policy_bpf_common::{
    CT_LIVE, CT_LOCK, CT_STATUS, CT_TAG_LINE, CT_WAYS, Config, CtEntry4, CtEntry6, CtTags, CtValue,
    ct_entry, ct_expired, ct_freed, ct_log_entries, ct_owner,
};

use crate::error::DatapathError;

/// Most connections a table may be sized for: 2^25, in 2^26 ways (IPv6
/// ways are 128 bytes: 8 GiB).
pub const MAX_CONNECTIONS: u32 = 1 << 25;

/// The pinned map of the tables' log heads (see `CtEntry4`).
pub const CONNTRACK_LOG_HEAD: &str = map_names::CTHEAD;

/// Ways of a table sized for `connections`: twice as many, rounded up to a
/// power of two (sets are picked by masking the hash), at least two sets
/// (one line of state words). At half load two choices of four ways leave
/// no set overflowing (a random placement of the capacity overflows about
/// one connection in 10^5); a chained kernel hash needs about as many
/// bytes per IPv4 connection (a 104-byte element and a 16-byte bucket) as
/// two 64-byte ways and their state words.
pub fn ways_for(connections: u32) -> Result<u32, DatapathError> {
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(DatapathError::Load(format!(
            "capacity.conntrack: {connections} connections; it must be between 1 and {MAX_CONNECTIONS}"
        )));
    }
    Ok((connections * 2).max(CT_TAG_LINE).next_power_of_two())
}

/// An entry type of a conntrack table.
pub trait Way: Copy {
    /// The map of the table's entries (a home per way, then the log).
    const MAP: &'static str;
    /// The map of the ways' state words.
    const TAGS: &'static str;
    /// The map of the owners of its log entries.
    const OWNERS: &'static str;
    /// The connection's IP protocol.
    fn protocol(&self) -> u8;
    /// The connection.
    fn value(&self) -> &CtValue;
}

impl Way for CtEntry4 {
    const MAP: &'static str = map_names::CONN4;
    const TAGS: &'static str = map_names::CTTAG4;
    const OWNERS: &'static str = map_names::CTOWN4;
    fn protocol(&self) -> u8 {
        self.key.protocol
    }
    fn value(&self) -> &CtValue {
        &self.value
    }
}

impl Way for CtEntry6 {
    const MAP: &'static str = map_names::CONN6;
    const TAGS: &'static str = map_names::CTTAG6;
    const OWNERS: &'static str = map_names::CTOWN6;
    fn protocol(&self) -> u8 {
        self.key.protocol
    }
    fn value(&self) -> &CtValue {
        &self.value
    }
}

/// A map of `T` values, mapped into this process.
struct Mapping<T> {
    /// Keeps the map (and so the mapping's object) open.
    _map: MapData,
    base: NonNull<T>,
    len: usize,
}

impl<T> Mapping<T> {
    /// Takes array map `name` out of the loaded object and maps its values,
    /// checking they are `T`; returns it with its number of entries.
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<(Self, u32), DatapathError> {
        let err = |message: String| DatapathError::Map { map: name, message };
        let map = ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::Load(format!("map {name} missing")))?;
        let Map::Array(data) = map else {
            return Err(err(
                "not an array map (a pin from an older Palisade? remove it)".into(),
            ));
        };
        let info = data.info().map_err(|e| err(e.to_string()))?;
        if info.value_size() as usize != size_of::<T>() {
            return Err(err(format!(
                "value size {} where {} was expected (a pin from another version? remove it)",
                info.value_size(),
                size_of::<T>()
            )));
        }
        let entries = info.max_entries();
        let len = NonZeroUsize::new(entries as usize * size_of::<T>())
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
        Ok((
            Mapping {
                _map: data,
                base: base.cast(),
                len: len.get(),
            },
            entries,
        ))
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: `base` and `len` are exactly what `take` mapped, and no
        // reference into the mapping outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

/// An mmapable array map of words, mapped into this process: for words the
/// programs read whole while user space changes them (one atomic store
/// each, where a map update would copy the value byte by byte).
pub(crate) struct Words {
    map: Mapping<u64>,
    len: u32,
}

// SAFETY: shared memory owned by this value, only accessed through atomics.
unsafe impl Send for Words {}
// SAFETY: as above.
unsafe impl Sync for Words {}

impl Words {
    /// Takes array map `name` (of u64 values) out of the loaded object.
    pub(crate) fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        let (map, len) = Mapping::take(ebpf, name)?;
        Ok(Words { map, len })
    }

    /// Number of words.
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    /// Word `i`, if in bounds.
    pub(crate) fn get(&self, i: u32) -> Option<&AtomicU64> {
        // SAFETY: in bounds of the mapping, which lives as long as `self`;
        // an aligned u64 that the programs only read.
        (i < self.len)
            .then(|| unsafe { AtomicU64::from_ptr(self.map.base.as_ptr().add(i as usize)) })
    }
}

/// One family's table, mapped into this process.
pub struct Table<E: Way> {
    entries_map: Mapping<E>,
    tags_map: Mapping<CtTags>,
    /// Owners of the log entries (see `ct_owner`).
    owners: Words,
    ways: u32,
    /// Entries: a home per way, then the log.
    entries: u32,
}

impl<E: Way> std::fmt::Debug for Table<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("map", &E::MAP)
            .field("ways", &self.ways)
            .finish()
    }
}

// SAFETY: the mappings are shared memory owned by this value; every access
// goes through atomic operations on state words or volatile reads, so
// moving the owner to another thread or sharing it is sound.
unsafe impl<E: Way> Send for Table<E> {}
// SAFETY: as above.
unsafe impl<E: Way> Sync for Table<E> {}

impl<E: Way> Table<E> {
    /// Takes the table's maps out of the loaded object and maps them (an
    /// mmapable array of `E`, homes then log, one of the ways' state words
    /// and one of the log entries' owners).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        let (entries_map, entries) = Mapping::take(ebpf, E::MAP)?;
        let (tags_map, lines) = Mapping::take(ebpf, E::TAGS)?;
        let ways = u64::from(lines) * u64::from(CT_TAG_LINE);
        let ways = u32::try_from(ways)
            .ok()
            .filter(|w| w.is_power_of_two())
            .ok_or_else(|| DatapathError::Map {
                map: E::TAGS,
                message: format!(
                    "{lines} lines of state words: not a power of two of whole lines of sets"
                ),
            })?;
        let owners = Words::take(ebpf, E::OWNERS)?;
        if u64::from(entries) != u64::from(ways) + u64::from(ct_log_entries(ways))
            || owners.len() != ct_log_entries(ways)
        {
            return Err(DatapathError::Map {
                map: E::MAP,
                message: format!(
                    "{entries} entries and {} owners for {ways} ways and their log (pins of different sizes? remove them)",
                    owners.len()
                ),
            });
        }
        Ok(Table {
            entries_map,
            tags_map,
            owners,
            ways,
            entries,
        })
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
        // SAFETY: `i` is in bounds, so its line is; a state word is an
        // aligned u64 of a line in the mapping, and everyone writes it
        // atomically (the programs with BPF atomic instructions, or an
        // ordered store of a way they own).
        unsafe {
            let line = self.tags_map.base.as_ptr().add((i / CT_TAG_LINE) as usize);
            AtomicU64::from_ptr(
                (&raw mut (*line).state)
                    .cast::<u64>()
                    .add((i % CT_TAG_LINE) as usize),
            )
        }
    }

    /// A consistent copy of way `i` with its state word: None while a
    /// writer holds it or when it changed during the copy (a seqlock read).
    fn read(&self, i: u32) -> Option<(u64, E)> {
        let before = self.state(i).load(Ordering::Acquire);
        if before & CT_LOCK != 0 {
            return None;
        }
        let at = ct_entry(before);
        if at >= self.entries {
            return None;
        }
        // SAFETY: in bounds (checked above) and aligned; a volatile copy of
        // plain integers. A concurrent writer can tear it, which the state
        // check below detects (writers change the state word around their
        // writes, and an entry is rewritten only once its way no longer
        // names it).
        let entry = unsafe {
            self.entries_map
                .base
                .as_ptr()
                .add(at as usize)
                .read_volatile()
        };
        std::sync::atomic::fence(Ordering::Acquire);
        (self.state(i).load(Ordering::Relaxed) == before).then_some((before, entry))
    }

    /// The ways holding a live connection, with their state words as
    /// read (one load each: most ways of a sparse table are empty).
    fn live_ways(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        (0..self.ways)
            .map(|i| (i, self.state(i).load(Ordering::Relaxed)))
            .filter(|&(_, s)| s & CT_STATUS == CT_LIVE)
    }

    /// Live connections.
    pub fn len(&self) -> usize {
        self.live_ways().count()
    }

    /// Live connections held in a log entry.
    pub fn logged(&self) -> usize {
        self.live_ways()
            .filter(|&(_, s)| ct_entry(s) >= self.ways)
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
        for (i, _) in self.live_ways() {
            let Some((state, entry)) = self.read(i) else {
                continue;
            };
            if state & CT_STATUS != CT_LIVE || !dead(&entry) {
                continue;
            }
            if self
                .state(i)
                .compare_exchange(state, ct_freed(state), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                freed += 1;
                // Its log entry is free again (unless an inserter that
                // found the way free has taken it meanwhile).
                if let Some(owner) = ct_entry(state)
                    .checked_sub(self.ways)
                    .and_then(|n| self.owners.get(n))
                {
                    let _ = owner.compare_exchange(
                        ct_owner(i, state),
                        0,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
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
        self.live_ways()
            .filter_map(|(i, _)| self.read(i))
            .filter(|(s, _)| s & CT_STATUS == CT_LIVE)
            .map(|(_, e)| e)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_whole_lines_of_sets_of_a_power_of_two() {
        assert_eq!(ways_for(1).unwrap(), CT_TAG_LINE);
        assert_eq!(ways_for(4).unwrap(), 8);
        assert_eq!(ways_for(5).unwrap(), 16);
        assert_eq!(ways_for(262_144).unwrap(), 524_288);
        assert_eq!(ways_for(MAX_CONNECTIONS).unwrap(), 1 << 26);
        let e = ways_for(0).unwrap_err().to_string();
        assert!(e.contains("capacity.conntrack"), "{e}");
        assert!(ways_for(MAX_CONNECTIONS + 1).is_err());
    }
}
