//! Reading and writing IPAM's records through the store: blocks, block
//! affinities, handles and the IPAM config, each with the revision it was
//! read at so writes can say what they expect.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::block::Block;
use crate::store::{
    self, Entry, Expect, IpamStore, Revision, StoreError, Write, affinity_key, block_key,
    handle_key,
};

/// Calico's global IPAM configuration (`IPAMConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Hosts only take addresses from their own blocks.
    #[serde(rename = "strict_affinity")]
    pub strict_affinity: bool,
    /// Hosts claim new blocks when theirs are full.
    #[serde(rename = "auto_allocate_blocks")]
    pub auto_allocate_blocks: bool,
    /// Blocks a host may hold (0: the built-in 20).
    #[serde(rename = "maxBlocksPerHost", default)]
    pub max_blocks_per_host: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: 0,
        }
    }
}

/// A handle: how many addresses it holds in each block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// Addresses per block (`10.0.0.0/26` → count).
    pub block: BTreeMap<String, usize>,
    /// Calico's tombstone flag; always false here.
    #[serde(default)]
    pub deleted: bool,
}

/// A block affinity's state, as Calico keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    /// `confirmed` (Palisade claims in one commit, so never `pending`).
    pub state: String,
    /// Calico's tombstone flag; always false here.
    #[serde(default)]
    pub deleted: bool,
}

impl Affinity {
    fn confirmed() -> Affinity {
        Affinity {
            state: "confirmed".into(),
            deleted: false,
        }
    }
}

fn corrupt(key: &str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        message: message.to_string(),
    }
}

fn expect(revision: Option<Revision>) -> Expect {
    match revision {
        Some(r) => Expect::At(r),
        None => Expect::Absent,
    }
}

/// Typed access to the records of a store.
#[derive(Clone, Copy)]
pub struct Records<'a> {
    /// The store.
    pub store: &'a dyn IpamStore,
}

impl std::fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Records")
    }
}

impl<'a> Records<'a> {
    /// A block and its revision.
    pub fn block(&self, cidr: &IpNet) -> Result<Option<(Block, Revision)>, StoreError> {
        let key = block_key(cidr);
        match self.store.get(&key)? {
            None => Ok(None),
            Some(e) => Ok(Some((parse_block(&e)?, e.revision))),
        }
    }

    /// Every block (of one family, or both), in key order.
    pub fn blocks(&self, version: Option<u8>) -> Result<Vec<(Block, Revision)>, StoreError> {
        self.store
            .list(&store::blocks_prefix(version))?
            .iter()
            .map(|e| Ok((parse_block(e)?, e.revision)))
            .collect()
    }

    /// A handle and its revision.
    pub fn handle(&self, id: &str) -> Result<Option<(Handle, Revision)>, StoreError> {
        handle_of(self.store.get(&handle_key(id))?.as_ref())
    }

    /// Every handle id with its record.
    pub fn handles(&self) -> Result<Vec<(String, Handle)>, StoreError> {
        let prefix = store::handles_prefix();
        self.store
            .list(&prefix)?
            .iter()
            .map(|e| {
                let h = serde_json::from_slice(&e.value).map_err(|err| corrupt(&e.key, err))?;
                Ok((e.key[prefix.len()..].to_string(), h))
            })
            .collect()
    }

    /// The revision of `host`'s affinity for `cidr`, if it has one.
    pub fn affinity(&self, host: &str, cidr: &IpNet) -> Result<Option<Revision>, StoreError> {
        Ok(self
            .store
            .get(&affinity_key(host, cidr))?
            .map(|e| e.revision))
    }

    /// Blocks affine to `host` (of one family, or both), in key order.
    pub fn host_blocks(
        &self,
        host: &str,
        version: Option<u8>,
    ) -> Result<Vec<(IpNet, Revision)>, StoreError> {
        Ok(host_blocks_of(
            host,
            &self.store.list(&store::host_prefix(host, version))?,
        ))
    }

    /// Every affinity: host, block and revision.
    pub fn affinities(&self) -> Result<Vec<(String, IpNet, Revision)>, StoreError> {
        let mut out = Vec::new();
        for e in self.store.list(&store::affinities_prefix())? {
            let Some((host, cidr)) = store::parse_affinity_key(&e.key) else {
                return Err(corrupt(&e.key, "not an affinity key"));
            };
            out.push((host, cidr, e.revision));
        }
        Ok(out)
    }

    /// The IPAM config and its revision (the default when none is stored;
    /// reading never writes).
    pub fn config(&self) -> Result<(Config, Option<Revision>), StoreError> {
        config_of(self.store.get(store::CONFIG_KEY)?.as_ref())
    }
}

/// The IPAM config in a read entry (the default when there is none).
pub fn config_of(e: Option<&Entry>) -> Result<(Config, Option<Revision>), StoreError> {
    match e {
        None => Ok((Config::default(), None)),
        Some(e) => {
            let c = serde_json::from_slice(&e.value).map_err(|err| corrupt(&e.key, err))?;
            Ok((c, Some(e.revision)))
        }
    }
}

/// A handle in a read entry.
pub fn handle_of(e: Option<&Entry>) -> Result<Option<(Handle, Revision)>, StoreError> {
    e.map(|e| {
        let h = serde_json::from_slice(&e.value).map_err(|err| corrupt(&e.key, err))?;
        Ok((h, e.revision))
    })
    .transpose()
}

/// Affinities in a listing of one host's prefix: block and revision.
pub fn host_blocks_of(host: &str, entries: &[Entry]) -> Vec<(IpNet, Revision)> {
    entries
        .iter()
        .filter_map(|e| match store::parse_affinity_key(&e.key) {
            Some((h, cidr)) if h == host => Some((cidr, e.revision)),
            _ => None,
        })
        .collect()
}

fn parse_block(e: &Entry) -> Result<Block, StoreError> {
    Block::from_json(&e.value).map_err(|m| corrupt(&e.key, m))
}

/// Writes a block whose read revision was `revision` (None: create it);
/// every write of a block advances its sequence number, as Calico's does.
pub fn put_block(block: &mut Block, revision: Option<Revision>) -> Write {
    if revision.is_some() {
        block.sequence += 1;
    }
    Write::Put {
        key: block_key(&block.cidr()),
        value: block.to_json(),
        expect: expect(revision),
    }
}

/// Deletes a block read at `revision`.
pub fn delete_block(cidr: &IpNet, revision: Revision) -> Write {
    Write::Delete {
        key: block_key(cidr),
        revision,
    }
}

/// Creates (or confirms) `host`'s affinity for `cidr`.
pub fn put_affinity(host: &str, cidr: &IpNet, revision: Option<Revision>) -> Write {
    Write::Put {
        key: affinity_key(host, cidr),
        // A two-field struct always serialises.
        value: serde_json::to_vec(&Affinity::confirmed()).unwrap_or_default(),
        expect: expect(revision),
    }
}

/// Deletes `host`'s affinity for `cidr`, read at `revision`.
pub fn delete_affinity(host: &str, cidr: &IpNet, revision: Revision) -> Write {
    Write::Delete {
        key: affinity_key(host, cidr),
        revision,
    }
}

/// Writes a handle read at `revision` (None: create), or deletes it when it
/// holds nothing.
pub fn write_handle(id: &str, handle: &Handle, revision: Option<Revision>) -> Option<Write> {
    let key = handle_key(id);
    if handle.block.values().all(|n| *n == 0) {
        return revision.map(|r| Write::Delete { key, revision: r });
    }
    Some(Write::Put {
        key,
        // Maps of strings to numbers always serialise.
        value: serde_json::to_vec(handle).unwrap_or_default(),
        expect: expect(revision),
    })
}

/// Writes the IPAM config.
pub fn put_config(config: &Config, revision: Option<Revision>) -> Write {
    Write::Put {
        key: store::CONFIG_KEY.to_string(),
        value: serde_json::to_vec(config).unwrap_or_default(),
        expect: expect(revision),
    }
}
