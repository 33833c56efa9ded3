//! `palisade verify` for the Calico IPAM corpus: the stores each scenario
//! runs on (each starts empty) and the tally; the runner is
//! `palisade_testing::ipam_conformance`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use palisade_ipam::IpamStore;
use palisade_testing::ipam_conformance::Run;
pub use palisade_testing::ipam_conformance::is_scenario;
use serde_json::Value;

use crate::Tally;

/// Where scenarios keep IPAM state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// In memory (the reference for the others).
    Memory,
    /// The embedded store: a redb file in a scratch directory.
    Embedded,
    /// etcd at --etcd-endpoints.
    Etcd,
}

/// Opens an empty store of the kind asked for, for one scenario.
pub struct StoreFactory {
    pub kind: StoreKind,
    pub etcd: Option<palisade_datastore::EtcdConfig>,
    scratch: tempfile::TempDir,
    count: usize,
}

impl StoreFactory {
    pub fn new(kind: StoreKind, etcd: Option<palisade_datastore::EtcdConfig>) -> Result<Self> {
        if kind == StoreKind::Etcd && etcd.is_none() {
            bail!("--store etcd needs --etcd-endpoints");
        }
        Ok(StoreFactory {
            kind,
            etcd,
            scratch: tempfile::tempdir().context("making a scratch directory")?,
            count: 0,
        })
    }

    fn open(&mut self) -> Result<Box<dyn IpamStore>> {
        self.count += 1;
        let store: Box<dyn IpamStore> = match self.kind {
            StoreKind::Memory => Box::new(palisade_ipam::MemoryStore::new()),
            StoreKind::Embedded => Box::new(
                palisade_datastore::EmbeddedIpamStore::open(
                    self.scratch
                        .path()
                        .join(format!("ipam-{}.redb", self.count)),
                )
                .context("opening the embedded IPAM store")?,
            ),
            StoreKind::Etcd => {
                let config = self.etcd.as_ref().context("no etcd endpoints")?;
                let store = palisade_datastore::EtcdIpamStore::connect(config)
                    .context("connecting to etcd")?;
                wipe(&store)?;
                Box::new(store)
            }
        };
        Ok(store)
    }
}

/// Deletes every IPAM record (each scenario starts from nothing).
fn wipe(store: &dyn IpamStore) -> Result<()> {
    let all = store.list(palisade_ipam::store::PREFIX)?;
    for chunk in all.chunks(64) {
        let writes: Vec<_> = chunk
            .iter()
            .map(|e| palisade_ipam::store::Write::Delete {
                key: e.key.clone(),
                revision: e.revision,
            })
            .collect();
        store.commit(&writes)?;
    }
    Ok(())
}

/// Runs one scenario file; every step is one check.
pub fn run_file(
    path: &Path,
    doc: &Value,
    stores: &mut StoreFactory,
    verbose: bool,
) -> Result<Tally> {
    let name = path.display().to_string();
    let store = stores.open()?;
    let mut run = Run::new(doc, store.as_ref()).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let mut tally = Tally::default();
    for (i, step) in doc["steps"].as_array().into_iter().flatten().enumerate() {
        let op = step["op"].as_str().unwrap_or("?");
        match run.step(step) {
            Ok(()) => {
                tally.passed += 1;
                if verbose {
                    outln!("ok   {name} step {i} {op}")?;
                }
            }
            Err(why) => {
                tally.failed += 1;
                outln!("FAIL {name} step {i} {op}: {why}")?;
            }
        }
    }
    Ok(tally)
}
