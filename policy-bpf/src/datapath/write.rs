//! Writing plans to the maps: one write at a time with its undo, membership rows with atomic
//! stores, and the rollback of a plan that fails half way.

use super::*;
use policy_bpf_common::map_names;

pub(super) fn ignore_missing(
    r: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc_enoent()) =>
        {
            Ok(())
        }
        other => other,
    }
}

pub(super) fn libc_enoent() -> i32 {
    2
}

/// Writes row `slot` of a membership map at `layout`: `stride` words, one
/// atomic store each. Rows are only rewritten with supersets of what a
/// live program may read (or after the switch away from them), so a
/// program reading word by word never sees a bit it must not.
pub(super) fn write_row(
    words: &Words,
    slot: u32,
    layout: u64,
    bits: &policy_core::compile::Bits,
    map: &'static str,
) -> Result<(), DatapathError> {
    let stride = member_stride(layout);
    let start = u64::from(member_base(layout)) + u64::from(slot) * u64::from(stride);
    if start + u64::from(stride) > u64::from(words.len()) {
        return Err(DatapathError::Map {
            map,
            message: format!(
                "row {slot} of {stride} words from word {start} is past the map's {} words",
                words.len()
            ),
        });
    }
    for w in 0..stride {
        let value = bits.words().get(w as usize).copied().unwrap_or(0);
        if let Some(word) = words.get(start as u32 + w) {
            word.store(value, std::sync::atomic::Ordering::Release);
        }
    }
    Ok(())
}

impl Datapath {
    pub(super) fn write_one(&mut self, w: &MapWrite) -> Result<(), DatapathError> {
        match w {
            MapWrite::Node(i, n) => self.nodes.set(*i, n, 0).map_err(map_err(map_names::NODES)),
            MapWrite::Slot(k, Some(v)) => {
                self.slots
                    .insert(k, v, 0)
                    .map_err(map_err(map_names::SLOTS))?;
                self.follow_local4(k, Some(v.root));
                Ok(())
            }
            MapWrite::Slot(k, None) => {
                ignore_missing(self.slots.remove(k)).map_err(map_err(map_names::SLOTS))?;
                self.follow_local4(k, None);
                Ok(())
            }
            MapWrite::Interface(i, z) if *i < self.ifaces.len() => {
                let v = match z {
                    Some(zone) => Interface {
                        zone: *zone,
                        managed: 1,
                    },
                    None => Interface::default(),
                };
                self.ifaces
                    .set(*i, v, 0)
                    .map_err(map_err(map_names::IFACES))
            }
            MapWrite::Interface(i, Some(z)) => self
                .managed
                .insert(i, z, 0)
                .map_err(map_err(map_names::MANAGED)),
            MapWrite::Interface(i, None) => {
                ignore_missing(self.managed.remove(i)).map_err(map_err(map_names::MANAGED))
            }
            MapWrite::Lpm4(l, a, Some(v)) => self
                .lpm4
                .insert(&Key::new(*l, *a), v, 0)
                .map_err(map_err(map_names::LPM4)),
            MapWrite::Lpm4(l, a, None) => ignore_missing(self.lpm4.remove(&Key::new(*l, *a)))
                .map_err(map_err(map_names::LPM4)),
            MapWrite::Lpm6(l, a, Some(v)) => self
                .lpm6
                .insert(&Key::new(*l, *a), v, 0)
                .map_err(map_err(map_names::LPM6)),
            MapWrite::Lpm6(l, a, None) => ignore_missing(self.lpm6.remove(&Key::new(*l, *a)))
                .map_err(map_err(map_names::LPM6)),
            MapWrite::Identity(slot, layout, bits) => {
                write_row(&self.identities, *slot, *layout, bits, map_names::IDWORDS)
            }
            MapWrite::Class(slot, layout, bits) => {
                write_row(&self.classes, *slot, *layout, bits, map_names::CLASSWORDS)
            }
            MapWrite::Layouts(identities, classes) => {
                for (i, word) in [(LAYOUT_IDENTITIES, identities), (LAYOUT_CLASSES, classes)] {
                    let w = self.layouts.get(i).ok_or(DatapathError::Map {
                        map: map_names::LAYOUT,
                        message: format!("no word {i}"),
                    })?;
                    w.store(*word, std::sync::atomic::Ordering::Release);
                }
                Ok(())
            }
            MapWrite::ResetCounter(i) => {
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Map {
                    map: map_names::COUNTERS,
                    message: e.to_string(),
                })?;
                let zero = PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(|e| {
                    DatapathError::Map {
                        map: map_names::COUNTERS,
                        message: e.to_string(),
                    }
                })?;
                self.counters
                    .set(*i, zero, 0)
                    .map_err(map_err(map_names::COUNTERS))
            }
        }
    }

    /// The inverse of a write, from the state before the plan.
    pub(super) fn undo_one(&mut self, w: &MapWrite, before: &Mirror) {
        let restore = match w {
            MapWrite::Node(..) | MapWrite::ResetCounter(_) => None,
            MapWrite::Slot(k, _) => Some(MapWrite::Slot(*k, before.slots.get(k).copied())),
            MapWrite::Interface(i, _) => {
                Some(MapWrite::Interface(*i, before.interfaces.get(i).copied()))
            }
            MapWrite::Lpm4(l, a, _) => {
                Some(MapWrite::Lpm4(*l, *a, before.lpm4.get(&(*l, *a)).copied()))
            }
            MapWrite::Lpm6(l, a, _) => {
                Some(MapWrite::Lpm6(*l, *a, before.lpm6.get(&(*l, *a)).copied()))
            }
            // A row written in the live layout gets its old words back; a
            // row in a layout the plan had not switched to yet is not read.
            MapWrite::Identity(i, layout, _) => (*layout == before.layouts.0).then(|| {
                MapWrite::Identity(
                    *i,
                    *layout,
                    before.identities.get(i).cloned().unwrap_or_default(),
                )
            }),
            MapWrite::Class(i, layout, _) => (*layout == before.layouts.1).then(|| {
                MapWrite::Class(
                    *i,
                    *layout,
                    before.classes.get(i).cloned().unwrap_or_default(),
                )
            }),
            MapWrite::Layouts(..) => Some(MapWrite::Layouts(before.layouts.0, before.layouts.1)),
        };
        if let Some(r) = restore {
            let _ = self.write_one(&r);
        }
    }

    /// Applies a plan in order. If a write fails, everything written so far
    /// is put back as `before` had it and the error is returned: the previous
    /// policy stays enforced.
    pub fn write(&mut self, plan: &WritePlan, before: &Mirror) -> Result<(), DatapathError> {
        self.write_with(plan, before, |_| false)
    }

    /// [`Datapath::write`] with a fault injector (tests): when `fail(i)` is
    /// true the i-th write fails as if the kernel had refused it.
    pub fn write_with(
        &mut self,
        plan: &WritePlan,
        before: &Mirror,
        fail: impl Fn(usize) -> bool,
    ) -> Result<(), DatapathError> {
        let writes: Vec<&MapWrite> = plan.iter().collect();
        for (i, w) in writes.iter().enumerate() {
            let r = if fail(i) {
                Err(DatapathError::Injected(i))
            } else {
                self.write_one(w)
            };
            if let Err(e) = r {
                for done in writes[..i].iter().rev() {
                    self.undo_one(done, before);
                }
                self.promote_touched_local4(&writes[..i], &before.slots);
                return Err(e);
            }
        }
        // The slots after the plan, only when it wrote some.
        if writes.iter().any(|w| matches!(w, MapWrite::Slot(..))) {
            let mut after = before.slots.clone();
            for w in &writes {
                if let MapWrite::Slot(k, v) = w {
                    match v {
                        Some(v) => after.insert(*k, *v),
                        None => after.remove(k),
                    };
                }
            }
            self.promote_touched_local4(&writes, &after);
        }
        Ok(())
    }

    /// Gives the fast words that slot writes left free (an address removed
    /// while the interface has others) another of the interface's IPv4
    /// slots, from the slots now in the hash.
    pub(super) fn promote_touched_local4(
        &self,
        writes: &[&MapWrite],
        slots: &HashMap<SlotKey, SlotValue>,
    ) {
        let touched: std::collections::BTreeSet<(u32, u8)> = writes
            .iter()
            .filter_map(|w| match w {
                MapWrite::Slot(k, _) if k.family == AddressFamily::V4.code() => {
                    Some((k.ifindex, k.direction))
                }
                _ => None,
            })
            .collect();
        if touched.is_empty() {
            return;
        }
        let v4 = v4_slots(slots);
        for (ifindex, direction) in touched {
            let candidates = v4.get(&(ifindex, direction)).map_or(&[][..], Vec::as_slice);
            self.promote_local4(ifindex, direction, candidates);
        }
    }
}
