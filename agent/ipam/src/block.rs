//! An allocation block as Calico's IPAM keeps one: a power-of-two range of
//! a pool, a free list of ordinals, the allocation of each ordinal (an index
//! into the block's attributes: handle and owner attributes), and sequence
//! numbers that let a releaser prove it saw the current allocation.
//!
//! - The free list starts in ascending order from the block's first address
//!   (network and broadcast addresses are handed out too); assignment takes
//!   from its head, skipping reserved addresses (which keep their place);
//!   released addresses go to its tail, lowest first.
//! - Host reservations pre-allocate the first and last addresses of a block
//!   under their own handle when the block is made.
//! - The block's sequence number is advanced by whoever writes the block;
//!   an allocation records the number the block had when it was made.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// The handle Calico's Windows path pre-allocates block addresses under; a
/// block holding only these counts as empty.
pub const WINDOWS_RESERVED_HANDLE: &str = "windows-reserved-ipam-handle";

/// Who owns an allocation: its handle and free-form attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribute {
    /// The handle the address was allocated under.
    pub handle: Option<String>,
    /// Owner attributes (pod, namespace, node, ...).
    pub attrs: BTreeMap<String, String>,
}

/// Addresses pre-allocated at both ends of every block a host claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostReserved {
    /// Addresses at the start of the block.
    pub start_of_block: u32,
    /// Addresses at the end of the block.
    pub end_of_block: u32,
    /// The handle they are allocated under.
    pub handle: String,
    /// A note kept as their attribute.
    pub note: String,
}

/// One address to release, with what the releaser believes about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// The address.
    pub address: IpAddr,
    /// The handle it must be allocated under, if checked.
    pub handle: Option<String>,
    /// The sequence number its allocation must carry, if checked.
    pub sequence: Option<u64>,
}

/// Why a block refused a change; the block is as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The address is not in this block.
    #[error("{address} is not in block {block}")]
    NotInBlock {
        /// The address.
        address: IpAddr,
        /// The block.
        block: IpNet,
    },
    /// The address is allocated already.
    #[error("resource already exists: {0} with error: Address already assigned in block")]
    InUse(IpAddr),
    /// A release names a sequence number or handle the allocation does not
    /// carry: the releaser saw an older allocation.
    #[error("update conflict: {address}: {reason}")]
    Conflict {
        /// The address.
        address: IpAddr,
        /// What did not match.
        reason: String,
    },
}

/// What a release did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Addresses that were not allocated (reported, not an error).
    pub unallocated: Vec<IpAddr>,
    /// Addresses released, per handle.
    pub by_handle: BTreeMap<String, usize>,
    /// Addresses released.
    pub count: usize,
}

/// An allocation block (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    cidr: IpNet,
    /// `host:<name>` (Calico's affinity string), if affine to a host.
    pub affinity: Option<String>,
    /// When the affinity was claimed (seconds, from the injected clock).
    pub affinity_claimed_at: Option<u64>,
    /// Advanced by one on every write of the block.
    pub sequence: u64,
    allocations: Vec<Option<usize>>,
    unallocated: Vec<u32>,
    attributes: Vec<Attribute>,
    sequence_of: BTreeMap<u32, u64>,
}

impl Block {
    /// A new block over `cidr` (its network address), its sequence numbers
    /// starting at `sequence` (a value no earlier reader can have seen: a
    /// clock reading), with `reserved` pre-allocated.
    pub fn new(cidr: IpNet, sequence: u64, reserved: Option<&HostReserved>) -> Block {
        let cidr = cidr.trunc();
        let size = block_size(&cidr);
        let mut b = Block {
            cidr,
            affinity: None,
            affinity_claimed_at: None,
            sequence,
            allocations: vec![None; size as usize],
            unallocated: (0..size).collect(),
            attributes: Vec::new(),
            sequence_of: BTreeMap::new(),
        };
        if let Some(r) = reserved {
            let (start, end) = (r.start_of_block.min(size), r.end_of_block.min(size));
            let attr = Attribute {
                handle: Some(r.handle.clone()),
                attrs: BTreeMap::from([("note".to_string(), r.note.clone())]),
            };
            b.attributes.push(attr);
            let last = size.saturating_sub(end);
            for o in (0..start).chain(last.max(start)..size) {
                b.allocations[o as usize] = Some(0);
            }
            b.unallocated.retain(|o| *o >= start && *o < last);
        }
        b
    }

    /// The block's range.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// Addresses in the block.
    pub fn size(&self) -> u32 {
        self.allocations.len() as u32
    }

    /// The ordinal of `ip` in this block.
    pub fn ordinal(&self, ip: IpAddr) -> Option<u32> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        let offset = match (ip, self.cidr.network()) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) - u128::from(n),
            _ => return None,
        };
        u32::try_from(offset).ok()
    }

    /// The address at `ordinal`.
    pub fn ip(&self, ordinal: u32) -> IpAddr {
        match self.cidr.network() {
            IpAddr::V4(n) => IpAddr::V4((u32::from(n) + ordinal).into()),
            IpAddr::V6(n) => IpAddr::V6((u128::from(n) + u128::from(ordinal)).into()),
        }
    }

    fn attribute_index(&mut self, handle: Option<&str>, attrs: &BTreeMap<String, String>) -> usize {
        let wanted = Attribute {
            handle: handle.map(String::from),
            attrs: attrs.clone(),
        };
        match self.attributes.iter().position(|a| *a == wanted) {
            Some(i) => i,
            None => {
                self.attributes.push(wanted);
                self.attributes.len() - 1
            }
        }
    }

    /// Up to `n` free addresses from the head of the free list, skipping
    /// those `reserved` says no to (they keep their place).
    pub fn auto_assign(
        &mut self,
        n: usize,
        handle: Option<&str>,
        attrs: &BTreeMap<String, String>,
        reserved: impl Fn(IpAddr) -> bool,
    ) -> Vec<IpAddr> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.unallocated.len());
        for &o in &self.unallocated {
            if taken.len() < n && !reserved(self.ip(o)) {
                taken.push(o);
            } else {
                kept.push(o);
            }
        }
        if taken.is_empty() {
            return Vec::new();
        }
        let i = self.attribute_index(handle, attrs);
        for &o in &taken {
            self.allocations[o as usize] = Some(i);
            self.sequence_of.insert(o, self.sequence);
        }
        self.unallocated = kept;
        taken.into_iter().map(|o| self.ip(o)).collect()
    }

    /// Allocates `ip` (AssignIP).
    pub fn assign(
        &mut self,
        ip: IpAddr,
        handle: Option<&str>,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), BlockError> {
        let o = self.ordinal(ip).ok_or(BlockError::NotInBlock {
            address: ip,
            block: self.cidr,
        })?;
        if self.allocations[o as usize].is_some() {
            return Err(BlockError::InUse(ip));
        }
        let i = self.attribute_index(handle, attrs);
        self.allocations[o as usize] = Some(i);
        self.sequence_of.insert(o, self.sequence);
        self.unallocated.retain(|u| *u != o);
        Ok(())
    }

    /// The allocation of `ip`: its attribute, if allocated.
    pub fn allocation(&self, ip: IpAddr) -> Option<&Attribute> {
        let o = self.ordinal(ip)?;
        self.allocations[o as usize].map(|i| &self.attributes[i])
    }

    /// The sequence number recorded for `ip`'s allocation (the block's
    /// current one when none is recorded, as Calico reads it).
    pub fn sequence_of(&self, ip: IpAddr) -> Option<u64> {
        let o = self.ordinal(ip)?;
        Some(self.sequence_of.get(&o).copied().unwrap_or(self.sequence))
    }

    /// Releases addresses: all of them or, when one names a handle or
    /// sequence number its allocation does not carry, none (`Conflict`).
    pub fn release(&mut self, requests: &[Release]) -> Result<Released, BlockError> {
        let mut unique: BTreeMap<u32, &Release> = BTreeMap::new();
        for r in requests {
            let o = self.ordinal(r.address).ok_or(BlockError::NotInBlock {
                address: r.address,
                block: self.cidr,
            })?;
            unique.insert(o, r);
        }
        let mut out = Released::default();
        let mut freed = Vec::new();
        for (&o, r) in &unique {
            if let Some(seq) = r.sequence {
                let have = self.sequence_of.get(&o).copied().unwrap_or(self.sequence);
                if seq != have {
                    return Err(BlockError::Conflict {
                        address: r.address,
                        reason: format!(
                            "the given sequence number ({seq}) does not match ({have})"
                        ),
                    });
                }
            }
            let Some(i) = self.allocations[o as usize] else {
                out.unallocated.push(r.address);
                continue;
            };
            let handle = self.attributes[i].handle.clone().unwrap_or_default();
            if let Some(want) = &r.handle
                && *want != handle
            {
                return Err(BlockError::Conflict {
                    address: r.address,
                    reason: format!("the given handle ({want}) does not match ({handle})"),
                });
            }
            if !handle.is_empty() {
                *out.by_handle.entry(handle).or_insert(0) += 1;
            }
            freed.push(o);
        }
        for &o in &freed {
            self.allocations[o as usize] = None;
            self.sequence_of.remove(&o);
            self.unallocated.push(o);
        }
        out.count = freed.len();
        self.drop_unused_attributes();
        Ok(out)
    }

    /// Whether any address of the block is held by `handle`.
    pub fn holds_handle(&self, handle: &str) -> bool {
        self.allocations
            .iter()
            .flatten()
            .any(|i| self.attributes[*i].handle.as_deref() == Some(handle))
    }

    /// Releases every address allocated under `handle`; how many.
    pub fn release_by_handle(&mut self, handle: &str) -> usize {
        let ordinals: Vec<u32> = (0..self.size())
            .filter(|o| {
                self.allocations[*o as usize]
                    .is_some_and(|i| self.attributes[i].handle.as_deref() == Some(handle))
            })
            .collect();
        for &o in &ordinals {
            self.allocations[o as usize] = None;
            self.sequence_of.remove(&o);
            self.unallocated.push(o);
        }
        self.drop_unused_attributes();
        ordinals.len()
    }

    /// Addresses allocated under `handle`, in address order.
    pub fn ips_by_handle(&self, handle: &str) -> Vec<IpAddr> {
        (0..self.size())
            .filter(|o| {
                self.allocations[*o as usize]
                    .is_some_and(|i| self.attributes[i].handle.as_deref() == Some(handle))
            })
            .map(|o| self.ip(o))
            .collect()
    }

    /// Free addresses that `reserved` does not hold back.
    pub fn free(&self, reserved: impl Fn(IpAddr) -> bool) -> usize {
        self.unallocated
            .iter()
            .filter(|o| !reserved(self.ip(**o)))
            .count()
    }

    /// Addresses allocated (host reservations included).
    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    /// Whether nothing but Windows host reservations is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().flatten().all(|i| {
            self.attributes[*i]
                .handle
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(WINDOWS_RESERVED_HANDLE))
        })
    }

    /// Attributes no allocation points at any more go; indexes are kept
    /// consistent.
    fn drop_unused_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for i in self.allocations.iter().flatten() {
            used[*i] = true;
        }
        if used.iter().all(|u| *u) {
            return;
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut kept = Vec::new();
        for (i, a) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used[i] {
                remap[i] = Some(kept.len());
                kept.push(a);
            }
        }
        self.attributes = kept;
        for a in self.allocations.iter_mut().flatten() {
            // Every allocation points at a used attribute, so it has a new index.
            *a = remap[*a].unwrap_or(0);
        }
    }
}

/// Calico's stored form of a block (`model.AllocationBlock`), field for
/// field, so other tools reading the store see what Calico writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredBlock {
    cidr: IpNet,
    affinity: Option<String>,
    #[serde(
        rename = "affinityClaimTime",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    affinity_claim_time: Option<String>,
    allocations: Vec<Option<usize>>,
    unallocated: Vec<u32>,
    attributes: Vec<StoredAttribute>,
    #[serde(default)]
    deleted: bool,
    #[serde(rename = "sequenceNumber", default)]
    sequence_number: u64,
    #[serde(rename = "sequenceNumberForAllocation", default)]
    sequence_number_for_allocation: BTreeMap<String, u64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAttribute {
    handle_id: Option<String>,
    #[serde(default)]
    secondary: Option<BTreeMap<String, String>>,
}

impl Block {
    /// The block as Calico stores it (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        let stored = StoredBlock {
            cidr: self.cidr,
            affinity: self.affinity.clone(),
            affinity_claim_time: self.affinity_claimed_at.map(crate::time::rfc3339),
            allocations: self.allocations.clone(),
            unallocated: self.unallocated.clone(),
            attributes: self
                .attributes
                .iter()
                .map(|a| StoredAttribute {
                    handle_id: a.handle.clone(),
                    secondary: (!a.attrs.is_empty()).then(|| a.attrs.clone()),
                })
                .collect(),
            deleted: false,
            sequence_number: self.sequence,
            sequence_number_for_allocation: self
                .sequence_of
                .iter()
                .map(|(o, s)| (o.to_string(), *s))
                .collect(),
        };
        // A struct of strings, numbers and maps with string keys always
        // serialises.
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// Reads a stored block, checking that its parts agree (every ordinal
    /// either free or allocated, attribute indexes in range).
    pub fn from_json(bytes: &[u8]) -> Result<Block, String> {
        let s: StoredBlock = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let size = block_size(&s.cidr) as usize;
        if s.allocations.len() != size {
            return Err(format!(
                "{} allocations for a block of {size} addresses",
                s.allocations.len()
            ));
        }
        let mut seen = vec![false; size];
        for &o in &s.unallocated {
            let i = o as usize;
            if i >= size || seen[i] || s.allocations[i].is_some() {
                return Err(format!(
                    "free ordinal {o} is out of range, repeated or allocated"
                ));
            }
            seen[i] = true;
        }
        for (i, a) in s.allocations.iter().enumerate() {
            match a {
                None if !seen[i] => {
                    return Err(format!("ordinal {i} is neither free nor allocated"));
                }
                Some(x) if *x >= s.attributes.len() => {
                    return Err(format!("ordinal {i} points at missing attribute {x}"));
                }
                _ => {}
            }
        }
        let mut sequence_of = BTreeMap::new();
        for (k, v) in s.sequence_number_for_allocation {
            let o: u32 = k
                .parse()
                .map_err(|_| format!("sequence number key {k:?} is not an ordinal"))?;
            sequence_of.insert(o, v);
        }
        Ok(Block {
            cidr: s.cidr.trunc(),
            affinity: s.affinity,
            affinity_claimed_at: match s.affinity_claim_time {
                Some(t) => Some(crate::time::parse_rfc3339(&t)?),
                None => None,
            },
            sequence: s.sequence_number,
            allocations: s.allocations,
            unallocated: s.unallocated,
            attributes: s
                .attributes
                .into_iter()
                .map(|a| Attribute {
                    handle: a.handle_id,
                    attrs: a.secondary.unwrap_or_default(),
                })
                .collect(),
            sequence_of,
        })
    }

    /// Ordinals allocated under each handle.
    pub fn handles(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for i in self.allocations.iter().flatten() {
            if let Some(h) = &self.attributes[*i].handle {
                *out.entry(h.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Every allocated address with its attribute.
    pub fn allocated(&self) -> impl Iterator<Item = (IpAddr, &Attribute)> + '_ {
        self.allocations
            .iter()
            .enumerate()
            .filter_map(|(o, a)| a.map(|i| (self.ip(o as u32), &self.attributes[i])))
    }
}

/// Addresses in a block range.
pub fn block_size(cidr: &IpNet) -> u32 {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    1u32.checked_shl(host_bits).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(cidr: &str) -> Block {
        Block::new(cidr.parse().unwrap(), 7, None)
    }

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    const NONE: fn(IpAddr) -> bool = |_| false;

    #[test]
    fn addresses_come_from_the_head_and_go_back_to_the_tail() {
        let mut b = block("10.0.0.0/30");
        let attrs = BTreeMap::new();
        let got = b.auto_assign(3, Some("h1"), &attrs, NONE);
        assert_eq!(got, ips(&["10.0.0.0", "10.0.0.1", "10.0.0.2"]));
        let r = b
            .release(&[Release {
                address: got[0],
                handle: None,
                sequence: None,
            }])
            .unwrap();
        assert_eq!((r.count, r.by_handle["h1"]), (1, 1));
        // .3 is next, then the released .0 from the tail.
        assert_eq!(
            b.auto_assign(2, None, &attrs, NONE),
            ips(&["10.0.0.3", "10.0.0.0"])
        );
        assert_eq!(b.free(NONE), 0);
    }

    #[test]
    fn reserved_addresses_keep_their_place_and_host_reservations_hold_the_ends() {
        let reserved = HostReserved {
            start_of_block: 3,
            end_of_block: 1,
            handle: WINDOWS_RESERVED_HANDLE.into(),
            note: "windows".into(),
        };
        let mut b = Block::new("10.0.0.0/29".parse().unwrap(), 1, Some(&reserved));
        assert!(b.is_empty(), "only Windows reservations");
        assert_eq!(b.in_use(), 4);
        let skip = |ip: IpAddr| ip == "10.0.0.3".parse::<IpAddr>().unwrap();
        let got = b.auto_assign(1, Some("pod"), &BTreeMap::new(), skip);
        assert_eq!(got, ips(&["10.0.0.4"]));
        assert!(!b.is_empty());
        assert_eq!(b.free(skip), 2, ".5 and .6 (.3 held back, .7 reserved)");
    }

    #[test]
    fn a_release_with_a_stale_sequence_or_handle_releases_nothing() {
        let mut b = block("10.0.0.0/29");
        let attrs = BTreeMap::new();
        let a = b.auto_assign(2, Some("h"), &attrs, NONE);
        let seq = b.sequence_of(a[0]).unwrap();
        b.sequence += 1;
        let stale = b.release(&[
            Release {
                address: a[1],
                handle: None,
                sequence: None,
            },
            Release {
                address: a[0],
                handle: None,
                sequence: Some(seq + 1),
            },
        ]);
        assert!(
            matches!(stale, Err(BlockError::Conflict { .. })),
            "{stale:?}"
        );
        let wrong = b.release(&[Release {
            address: a[0],
            handle: Some("other".into()),
            sequence: Some(seq),
        }]);
        assert!(matches!(wrong, Err(BlockError::Conflict { .. })));
        assert_eq!(b.in_use(), 2, "nothing was released");
        let ok = b
            .release(&[
                Release {
                    address: a[0],
                    handle: Some("h".into()),
                    sequence: Some(seq),
                },
                Release {
                    address: "10.0.0.5".parse().unwrap(),
                    handle: None,
                    sequence: None,
                },
            ])
            .unwrap();
        assert_eq!(ok.count, 1);
        assert_eq!(ok.unallocated, ips(&["10.0.0.5"]));
    }

    #[test]
    fn assign_ip_handles_and_attributes() {
        let mut b = block("fd00::/126");
        let pod = BTreeMap::from([("pod".to_string(), "web".to_string())]);
        b.assign("fd00::2".parse().unwrap(), Some("h"), &pod)
            .unwrap();
        assert_eq!(
            b.assign("fd00::2".parse().unwrap(), Some("h"), &pod),
            Err(BlockError::InUse("fd00::2".parse().unwrap()))
        );
        assert!(b.assign("fd00::9".parse().unwrap(), None, &pod).is_err());
        b.auto_assign(1, Some("h"), &pod, NONE);
        assert_eq!(b.ips_by_handle("h"), ips(&["fd00::", "fd00::2"]));
        assert_eq!(b.allocation("fd00::".parse().unwrap()).unwrap().attrs, pod);
        assert_eq!(b.release_by_handle("h"), 2);
        assert!(b.is_empty());
        assert!(b.attributes.is_empty(), "unused attributes go");
        assert_eq!(block_size(&"10.0.0.0/26".parse().unwrap()), 64);
    }
}
