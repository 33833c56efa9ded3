//! IPAM records on the Kubernetes API ([`KubeIpamStore`]) against a
//! stateful stand-in of the API server ([`FakeApi`]): the Calico IPAM
//! corpus, the same with every commit's first attempt answered with a
//! conflict and with half of all writes conflicting at the server, the
//! store's own contract, and allocators on several stores
//! racing for blocks.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use palisade_datastore::{KubeClient, KubeIpamStore};
use palisade_ipam::check::check;
use palisade_ipam::store::{Expect, IpamStore, StoreError, Write};
use palisade_ipam::{AutoAssignArgs, Cluster, FixedEnv, Ipam, Pool, Use};
use palisade_testing::ipam_conformance::{Run, is_scenario};
use serde_json::{Value, json};

use super::fake::FakeApi;

fn store_on(fake: &FakeApi) -> KubeIpamStore {
    let fake = fake.clone();
    KubeIpamStore::connect(KubeClient::Custom(std::sync::Arc::new(move || {
        fake.client()
    })))
    .unwrap()
}

fn scenarios() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/ipam");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let doc: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).ok()?;
            is_scenario(&doc).then(|| (p.file_name().unwrap().to_string_lossy().into_owned(), doc))
        })
        .collect()
}

/// The first `n` scenarios on `fake` (for the calls they make).
pub fn run_scenarios_on(fake: &FakeApi, n: usize) {
    for (name, doc) in scenarios().into_iter().take(n) {
        let store = store_on(fake);
        let mut run = Run::new(&doc, &store).unwrap_or_else(|e| panic!("{name}: {e}"));
        for step in doc["steps"].as_array().into_iter().flatten() {
            let _ = run.step(step);
        }
    }
}

/// Answers every other commit (the first attempt of each, when nothing
/// else commits in between) with a conflict before it reaches the store.
struct ConflictFirst<S> {
    inner: S,
    inject: std::sync::atomic::AtomicBool,
    injected: std::sync::atomic::AtomicUsize,
}

impl<S: IpamStore> IpamStore for ConflictFirst<S> {
    fn get(&self, key: &str) -> Result<Option<palisade_ipam::store::Entry>, StoreError> {
        self.inner.get(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<palisade_ipam::store::Entry>, StoreError> {
        self.inner.list(prefix)
    }

    fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if let Some(first) = writes.first()
            && self.inject.fetch_xor(true, SeqCst)
        {
            self.injected.fetch_add(1, SeqCst);
            return conflict(first.key());
        }
        self.inner.commit(writes)
    }
}

/// Every scenario on a fresh server; the steps, the failures (one line
/// each) and the conflicts injected.
fn run_corpus(make: impl Fn() -> FakeApi, conflict_first: bool) -> (usize, Vec<String>, usize) {
    let mut steps = 0;
    let mut failed = Vec::new();
    let mut injected = 0;
    for (name, doc) in scenarios() {
        let fake = make();
        let store = ConflictFirst {
            inner: store_on(&fake),
            inject: conflict_first.into(),
            injected: 0.into(),
        };
        let mut run = Run::new(&doc, &store).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, step) in doc["steps"].as_array().into_iter().flatten().enumerate() {
            steps += 1;
            if let Err(why) = run.step(step) {
                failed.push(format!("{name} step {i} {}: {why}", step["op"]));
            }
        }
        injected += fake.writes().1 + store.injected.into_inner();
    }
    (steps, failed, injected)
}

fn assert_all_passed(steps: usize, failed: &[String]) {
    assert!(
        failed.is_empty(),
        "{} of {steps} steps failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn the_calico_ipam_corpus_passes_on_the_kubernetes_store() {
    let (steps, failed, _) = run_corpus(FakeApi::default, false);
    assert!(steps > 300, "{steps} steps");
    assert_all_passed(steps, &failed);
}

/// Every commit of the allocator meets a conflict on its first attempt
/// (nothing written) and is retried.
#[test]
fn the_corpus_passes_when_every_commit_first_meets_a_conflict() {
    let (steps, failed, injected) = run_corpus(FakeApi::default, true);
    assert!(injected > 300, "{injected} conflicts injected");
    assert_all_passed(steps, &failed);
}

/// Half of all writes the API receives (undo writes included) meet a
/// conflict after another writer rewrote the object.
#[test]
fn the_corpus_passes_with_a_conflict_on_half_of_all_writes() {
    let (steps, failed, injected) = run_corpus(|| FakeApi::conflicting(0x5eed), false);
    assert!(injected > 300, "{injected} conflicts injected");
    assert_all_passed(steps, &failed);
}

const BLOCK: &str = "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26";
const AFFINITY: &str = "/calico/ipam/v2/host/node-a/ipv4/block/10.0.0.0-26";
const HANDLE: &str = "/calico/ipam/v2/handle/pod-a";

fn put(key: &str, value: Value, expect: Expect) -> Write {
    Write::Put {
        key: key.into(),
        value: value.to_string().into_bytes(),
        expect,
    }
}

fn conflict(key: &str) -> Result<(), StoreError> {
    Err(StoreError::Conflict { key: key.into() })
}

/// Per-object compare-and-swap; a commit whose expectation fails writes
/// nothing, and one that conflicts part-way undoes what it wrote.
#[test]
fn the_kubernetes_store_keeps_compare_and_swap_per_object_and_undoes_a_conflicting_commit() {
    let fake = FakeApi::default();
    let store = store_on(&fake);
    let block = json!({"cidr": "10.0.0.0/26", "affinity": "host:node-a", "allocations": [null], "unallocated": [0], "attributes": []});
    store
        .commit(&[
            put(BLOCK, block.clone(), Expect::Absent),
            put(
                AFFINITY,
                json!({"state": "confirmed", "deleted": false}),
                Expect::Absent,
            ),
        ])
        .unwrap();
    assert_eq!(
        fake.objects("ipamblocks")[0]["metadata"]["name"],
        "10-0-0-0-26"
    );
    assert_eq!(fake.objects("blockaffinities")[0]["spec"]["node"], "node-a");
    let b = store.get(BLOCK).unwrap().unwrap();
    let keys: Vec<String> = store
        .list("/calico/ipam/v2/")
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, [BLOCK, AFFINITY]);
    assert_eq!(store.list("/calico/ipam/v2/host/node-b/").unwrap(), vec![]);

    assert_eq!(
        store.commit(&[put(BLOCK, block.clone(), Expect::Absent)]),
        conflict(BLOCK)
    );
    assert_eq!(
        store.commit(&[put(BLOCK, block.clone(), Expect::At(b.revision + 100))]),
        conflict(BLOCK)
    );
    assert_eq!(
        store.commit(&[put(HANDLE, json!({"block": {}}), Expect::At(0))]),
        conflict(HANDLE)
    );
    // The block's stale expectation fails after the handle was created:
    // the handle is taken back.
    assert_eq!(
        store.commit(&[
            put(HANDLE, json!({"block": {"10.0.0.0/26": 1}}), Expect::Absent),
            put(BLOCK, block.clone(), Expect::At(b.revision + 100)),
        ]),
        conflict(BLOCK)
    );
    assert_eq!(store.get(HANDLE).unwrap(), None);

    // A conflict part-way (another writer got in between the check and the
    // write) undoes what the commit had written.
    let b = store.get(BLOCK).unwrap().unwrap();
    let handle = json!({"block": {"10.0.0.0/26": 1}});
    let changed = json!({"cidr": "10.0.0.0/26", "changed": true});
    fake.script_conflicts(&[false, true]);
    let result = store.commit(&[
        put(HANDLE, handle.clone(), Expect::Absent),
        put(BLOCK, changed.clone(), Expect::At(b.revision)),
    ]);
    assert_eq!(result, conflict(BLOCK));
    assert_eq!(
        store.get(HANDLE).unwrap(),
        None,
        "the handle it created is gone"
    );
    assert_eq!(
        store.get(BLOCK).unwrap().unwrap().value,
        b.value,
        "the block is as it was"
    );
    let b = store.get(BLOCK).unwrap().unwrap();
    // The undo itself meets a conflict (its object rewritten unchanged):
    // it reads again and still undoes.
    fake.script_conflicts(&[false, true, true]);
    let result = store.commit(&[
        put(HANDLE, handle.clone(), Expect::Absent),
        put(BLOCK, changed.clone(), Expect::At(b.revision)),
    ]);
    assert_eq!(result, conflict(BLOCK));
    assert_eq!(store.get(HANDLE).unwrap(), None);
    assert_eq!(store.get(BLOCK).unwrap().unwrap().value, b.value);
    // A delete undone is the record created again.
    let b = store.get(BLOCK).unwrap().unwrap();
    store
        .commit(&[put(HANDLE, handle.clone(), Expect::Absent)])
        .unwrap();
    let h = store.get(HANDLE).unwrap().unwrap();
    fake.script_conflicts(&[false, true]);
    let result = store.commit(&[
        Write::Delete {
            key: HANDLE.into(),
            revision: h.revision,
        },
        put(BLOCK, changed.clone(), Expect::At(b.revision)),
    ]);
    assert_eq!(result, conflict(BLOCK));
    let back = store.get(HANDLE).unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&back.value).unwrap(),
        handle
    );
    let b = store.get(BLOCK).unwrap().unwrap();
    // Without conflicts the same commit lands whole.
    store
        .commit(&[
            Write::Delete {
                key: HANDLE.into(),
                revision: back.revision,
            },
            put(BLOCK, changed.clone(), Expect::At(b.revision)),
        ])
        .unwrap();
    assert_eq!(store.get(HANDLE).unwrap(), None);
    assert_eq!(
        serde_json::from_slice::<Value>(&store.get(BLOCK).unwrap().unwrap().value).unwrap(),
        changed
    );
}

fn cluster(hosts: &[&str]) -> Cluster {
    let mut c = Cluster::new();
    let pool = Pool::from_document(&json!({"metadata": {"name": "frontend"},
        "spec": {"cidr": "10.10.0.0/24", "blockSize": 28}}))
    .unwrap();
    c.set_pools(vec![pool]).unwrap();
    for h in hosts {
        c.nodes.insert(h.to_string(), Default::default());
    }
    c
}

/// Allocators of two hosts, each on a store of its own, racing on one API
/// server that also answers the first attempt of every write with a
/// conflict: no address is handed out twice, no block claimed twice, and
/// the records are consistent at the end.
#[test]
fn allocators_racing_on_one_api_server_never_both_win() {
    let fake = FakeApi::conflicting(0x9e37_79b9);
    let hosts = ["node-a", "node-b"];
    let c = cluster(&hosts);
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 7);
    let given = Mutex::new(BTreeSet::<IpAddr>::new());
    std::thread::scope(|s| {
        for t in 0..4usize {
            let (c, env, given, fake) = (&c, &env, &given, &fake);
            s.spawn(move || {
                let store = store_on(fake);
                let ipam = Ipam::new(&store, c, env);
                let host = hosts[t % 2];
                for i in 0..25 {
                    let mut args = AutoAssignArgs::new(host, 1, 0, Use::Workload);
                    args.handle = Some(format!("t{t}-{i}"));
                    let got = ipam.auto_assign(&args);
                    assert!(got.error.is_none(), "{:?}", got.error);
                    for ip in got.v4.into_iter().flat_map(|a| a.ips) {
                        assert!(
                            given.lock().unwrap().insert(ip.addr()),
                            "{} given twice",
                            ip.addr()
                        );
                    }
                }
            });
        }
    });
    let store = store_on(&fake);
    let ipam = Ipam::new(&store, &c, &env);
    let report = check(ipam.records(), &c, None).unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    let held: BTreeSet<IpAddr> = report.allocated.keys().copied().collect();
    assert_eq!(held, *given.lock().unwrap());
    assert_eq!(held.len(), 100);
    // Each block has one owner.
    let owners: Vec<Value> = fake
        .objects("ipamblocks")
        .iter()
        .map(|b| b["spec"]["affinity"].clone())
        .collect();
    assert!(
        owners
            .iter()
            .all(|o| o.as_str().is_some_and(|a| a.starts_with("host:node-"))),
        "{owners:?}"
    );
    assert!(
        fake.writes().1 > 50,
        "conflicts were injected: {:?}",
        fake.writes()
    );
}

/// What an assignment costs on this store, in API calls (each a round trip
/// to the API server): the first on a node claims its block, the next ones
/// find it. Printed for the docs; bounded so a change that adds calls is
/// seen.
#[test]
fn api_calls_per_assignment() {
    let fake = FakeApi::default();
    let c = cluster(&["node-a"]);
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 11);
    let store = store_on(&fake);
    let cache = palisade_ipam::IpamCache::new();
    let ipam = Ipam::new(&store, &c, &env).with_cache(&cache);
    let mut costs = Vec::new();
    for i in 0..5 {
        let before = fake.calls().len();
        let mut args = AutoAssignArgs::new("node-a", 1, 0, Use::Workload);
        args.handle = Some(format!("pod-{i}"));
        let got = ipam.auto_assign(&args);
        assert!(got.error.is_none(), "{:?}", got.error);
        let calls = &fake.calls()[before..];
        let writes = calls
            .iter()
            .filter(|c| c.2 != "get" && c.2 != "list")
            .count();
        costs.push((calls.len(), writes));
    }
    let release_before = fake.calls().len();
    ipam.release_by_handle("pod-0").unwrap();
    let release = fake.calls().len() - release_before;
    eprintln!(
        "API calls (all, writes) per assignment: first {:?}, then {:?}; release by handle: {release}",
        costs[0],
        &costs[1..]
    );
    assert!(
        costs[1..]
            .iter()
            .all(|(all, writes)| *all <= 6 && *writes == 2),
        "{costs:?}"
    );
}
