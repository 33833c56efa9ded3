//! Local delivery: the slot rows of the IPv4 addresses delivered through one interface, kept
//! consistent with the per-interface local-delivery table (promotion, reconciliation, checks).

use super::*;
use policy_bpf_common::map_names;

/// The local delivery map's key for an address.
pub(super) fn local_key(addr: std::net::IpAddr) -> LocalKey {
    let mut key = LocalKey::default();
    match addr {
        std::net::IpAddr::V4(a) => {
            key.family = AddressFamily::V4.code();
            key.addr[..4].copy_from_slice(&a.octets());
        }
        std::net::IpAddr::V6(a) => {
            key.family = AddressFamily::V6.code();
            key.addr = a.octets();
        }
    }
    key
}

impl Datapath {
    /// Makes `addr` a local endpoint (`Some`) that allowed packets from
    /// other local pods go straight into (see [`LocalEndpoint`]), or stops
    /// that (`None`; removing an absent address is not an error). Without
    /// an entry, packets to the address take the node's forwarding, and
    /// the receiver's interface judges them there, as before.
    pub fn set_local_endpoint(
        &mut self,
        addr: std::net::IpAddr,
        endpoint: Option<LocalEndpoint>,
    ) -> Result<(), DatapathError> {
        let key = local_key(addr);
        match endpoint {
            Some(ep) => self
                .endpoints
                .insert(key, ep, 0)
                .map_err(map_err(map_names::ENDPOINTS)),
            None => {
                ignore_missing(self.endpoints.remove(&key)).map_err(map_err(map_names::ENDPOINTS))
            }
        }
    }
}

impl Datapath {
    /// The slots hash as it is in the kernel.
    pub(super) fn read_slots(&self) -> Result<HashMap<SlotKey, SlotValue>, DatapathError> {
        self.slots
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SLOTS))
    }

    /// Makes every IPv4 fast slot a copy of a slot in the hash (after a
    /// restart: pins from a build without them, or a process stopped
    /// between a slot's two writes).
    pub(super) fn reconcile_local4(&mut self) -> Result<(), DatapathError> {
        let v4 = v4_slots(&self.read_slots()?);
        for i in 0..self.local4.len() {
            let (ifindex, direction) = (i >> 1, (i & 1) as u8);
            let candidates = v4.get(&(ifindex, direction)).map_or(&[][..], Vec::as_slice);
            self.promote_local4(ifindex, direction, candidates);
        }
        Ok(())
    }

    /// Makes the fast word of an interface and direction copy one of its
    /// IPv4 slots, `candidates` (address, root): the one it copies if that
    /// is still there, else the lowest address's; none if there are none.
    pub(super) fn promote_local4(
        &self,
        ifindex: u32,
        direction: u8,
        candidates: &[([u8; 4], u32)],
    ) {
        let Some(word) = self.local4.get(local4_index(ifindex, direction)) else {
            return;
        };
        let current = word.load(std::sync::atomic::Ordering::Acquire);
        let kept = (current as u32).to_ne_bytes();
        let want = candidates
            .iter()
            .find(|(addr, _)| current != 0 && *addr == kept)
            .or_else(|| candidates.iter().min())
            .copied();
        let new = want.map_or(0, |(addr, root)| local4_word(addr, root));
        if new != current {
            word.store(new, std::sync::atomic::Ordering::Release);
        }
    }

    /// Where the IPv4 fast slots disagree with the slots hash: a word that
    /// copies no slot (or an old root), or an interface and direction with
    /// IPv4 slots but no word. Empty when consistent (checked by tests
    /// after updates, failed updates and restarts).
    pub fn local4_disagreements(&self) -> Result<Vec<String>, DatapathError> {
        let slots = self.read_slots()?;
        let with_v4: std::collections::HashSet<(u32, u8)> = slots
            .keys()
            .filter(|k| k.family == AddressFamily::V4.code())
            .map(|k| (k.ifindex, k.direction))
            .collect();
        let mut out = Vec::new();
        for i in 0..self.local4.len() {
            let (ifindex, direction) = (i >> 1, (i & 1) as u8);
            let Some(word) = self.local4.get(i) else {
                continue;
            };
            let word = word.load(std::sync::atomic::Ordering::Acquire);
            let addr = (word as u32).to_ne_bytes();
            let copied = slots
                .get(&slot_key4(ifindex, direction, addr))
                .map(|v| v.root);
            if word != 0 && local4_root(word, u32::from_ne_bytes(addr)) != copied {
                out.push(format!(
                    "interface {ifindex} direction {direction}: fast slot {} root {:?}, hash {copied:?}",
                    std::net::Ipv4Addr::from(addr),
                    local4_root(word, u32::from_ne_bytes(addr)),
                ));
            }
            if word == 0 && with_v4.contains(&(ifindex, direction)) {
                out.push(format!(
                    "interface {ifindex} direction {direction}: IPv4 slots but no fast slot"
                ));
            }
        }
        Ok(out)
    }

    /// Keeps the fast word of slot `k`'s interface and direction in step
    /// with the hash, right after the hash's write (so it never names a
    /// root the plan has moved away from): a new root for its address, or
    /// cleared with it. A free word takes the slot.
    pub(super) fn follow_local4(&self, k: &SlotKey, root: Option<u32>) {
        if k.family != AddressFamily::V4.code() {
            return;
        }
        let Some(word) = self.local4.get(local4_index(k.ifindex, k.direction)) else {
            return;
        };
        let addr = [k.addr[0], k.addr[1], k.addr[2], k.addr[3]];
        let current = word.load(std::sync::atomic::Ordering::Acquire);
        let ours = local4_root(current, u32::from_ne_bytes(addr)).is_some();
        let new = match root {
            Some(root) if ours || current == 0 => local4_word(addr, root),
            None if ours => 0,
            _ => return,
        };
        word.store(new, std::sync::atomic::Ordering::Release);
    }
}

/// The key of an IPv4 slot.
pub(super) fn slot_key4(ifindex: u32, direction: u8, addr: [u8; 4]) -> SlotKey {
    let mut k = SlotKey {
        ifindex,
        direction,
        family: AddressFamily::V4.code(),
        ..SlotKey::default()
    };
    k.addr[..4].copy_from_slice(&addr);
    k
}

/// An interface's IPv4 slots in one direction: (address, root).
pub(super) type V4Slots = Vec<([u8; 4], u32)>;

/// IPv4 slots by interface and direction.
pub(super) fn v4_slots(slots: &HashMap<SlotKey, SlotValue>) -> HashMap<(u32, u8), V4Slots> {
    let mut out: HashMap<(u32, u8), V4Slots> = HashMap::new();
    for (k, v) in slots
        .iter()
        .filter(|(k, _)| k.family == AddressFamily::V4.code())
    {
        out.entry((k.ifindex, k.direction))
            .or_default()
            .push(([k.addr[0], k.addr[1], k.addr[2], k.addr[3]], v.root));
    }
    out
}
