//! The IPAM stores against the contract `MemoryStore` defines: listings in
//! key order within their prefix, every expectation checked, a conflicting
//! commit writes nothing, revisions only grow (across reopens too); and no
//! update lost between handles incrementing one counter at once.

use palisade_datastore::{EmbeddedIpamStore, EtcdIpamStore};
use palisade_ipam::store::{Entry, Expect, IpamStore, MemoryStore, Revision, StoreError, Write};
use palisade_testing::etcd::EtcdCluster;

use super::etcd::{config, etcd_available};

fn put(key: &str, value: &str, expect: Expect) -> Write {
    Write::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        expect,
    }
}

fn delete(key: &str, revision: Revision) -> Write {
    Write::Delete {
        key: key.into(),
        revision,
    }
}

fn conflict(key: &str) -> Result<(), StoreError> {
    Err(StoreError::Conflict { key: key.into() })
}

fn entry(store: &dyn IpamStore, key: &str) -> Entry {
    store
        .get(key)
        .unwrap()
        .unwrap_or_else(|| panic!("{key} missing"))
}

fn keys(store: &dyn IpamStore, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect()
}

/// Every key the contract writes, in byte order (which is `str` order).
const KEYS: [&str; 8] = [
    "/s",
    "/t/a",
    "/t/a/x",
    "/t/ab",
    "/t/b",
    "/t/c",
    "/t/\u{e9}",
    "/t0",
];

/// The contract every store keeps, on an empty store; the highest revision
/// it saw.
fn contract(store: &dyn IpamStore) -> Revision {
    assert_eq!(store.get("/t/a").unwrap(), None);
    assert_eq!(store.list("").unwrap(), vec![]);

    // One commit, written out of order: one revision for all.
    let mut shuffled = KEYS;
    shuffled.reverse();
    shuffled.swap(1, 5);
    let writes: Vec<Write> = shuffled
        .iter()
        .map(|k| put(k, &format!("v{k}"), Expect::Absent))
        .collect();
    store.commit(&writes).unwrap();
    let first = entry(store, "/t/a").revision;
    assert!(first > 0);
    let all = store.list("").unwrap();
    assert_eq!(all.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(), KEYS);
    for e in &all {
        assert_eq!(e.value, format!("v{}", e.key).into_bytes(), "{}", e.key);
        assert_eq!(e.revision, first, "{}", e.key);
        assert_eq!(&entry(store, &e.key), e);
    }

    // Prefix bounds: a prefix is bytes, not path segments.
    assert_eq!(
        keys(store, "/t/"),
        ["/t/a", "/t/a/x", "/t/ab", "/t/b", "/t/c", "/t/\u{e9}"]
    );
    assert_eq!(keys(store, "/t/a"), ["/t/a", "/t/a/x", "/t/ab"]);
    assert_eq!(keys(store, "/t/a/"), ["/t/a/x"]);
    assert_eq!(keys(store, "/t"), KEYS[1..]);
    assert_eq!(keys(store, "/t/\u{e9}"), ["/t/\u{e9}"]);
    assert_eq!(keys(store, "/t/d"), Vec::<String>::new());
    assert_eq!(keys(store, "/u"), Vec::<String>::new());
    assert_eq!(store.get("/t").unwrap(), None);

    // Absent: only where there is no record.
    assert_eq!(
        store.commit(&[put("/t/a", "x", Expect::Absent)]),
        conflict("/t/a")
    );
    assert_eq!(entry(store, "/t/a").value, b"v/t/a");

    // At: only the revision there now; not on a missing key, never at 0.
    assert_eq!(
        store.commit(&[put("/t/a", "x", Expect::At(first + 1000))]),
        conflict("/t/a")
    );
    assert_eq!(
        store.commit(&[put("/t/none", "x", Expect::At(first))]),
        conflict("/t/none")
    );
    assert_eq!(
        store.commit(&[put("/t/none", "x", Expect::At(0))]),
        conflict("/t/none")
    );
    assert_eq!(store.get("/t/none").unwrap(), None);
    store
        .commit(&[put("/t/a", "a2", Expect::At(first))])
        .unwrap();
    let a2 = entry(store, "/t/a");
    assert_eq!(a2.value, b"a2");
    assert!(a2.revision > first, "{} after {first}", a2.revision);
    assert_eq!(
        store.commit(&[put("/t/a", "x", Expect::At(first))]),
        conflict("/t/a"),
        "the old revision no longer holds"
    );

    // Delete: only at the revision there now.
    assert_eq!(store.commit(&[delete("/t/a", first)]), conflict("/t/a"));
    assert_eq!(
        store.commit(&[delete("/t/none", first)]),
        conflict("/t/none")
    );
    assert_eq!(store.commit(&[delete("/t/none", 0)]), conflict("/t/none"));
    store.commit(&[delete("/t/a", a2.revision)]).unwrap();
    assert_eq!(store.get("/t/a").unwrap(), None);
    assert_eq!(keys(store, "/t/a"), ["/t/a/x", "/t/ab"]);
    // Created again: Absent holds once more.
    store.commit(&[put("/t/a", "a3", Expect::Absent)]).unwrap();
    let a3 = entry(store, "/t/a");
    assert!(a3.revision > a2.revision);

    // A commit with one failed expectation writes nothing, and names the
    // first key whose expectation failed.
    let before = store.list("").unwrap();
    let b = entry(store, "/t/b").revision;
    let c = entry(store, "/t/c").revision;
    let mixed = [
        put("/n1", "x", Expect::Absent),
        put("/t/b", "x", Expect::At(b)),
        delete("/t/c", c + 1000),
        put("/t/ab", "x", Expect::Absent),
        delete("/s", first),
        put("/n2", "x", Expect::Absent),
    ];
    assert_eq!(store.commit(&mixed), conflict("/t/c"));
    assert_eq!(store.list("").unwrap(), before, "nothing was written");
    assert_eq!(
        store.commit(&[delete("/t/c", c), put("/t/ab", "x", Expect::Absent)]),
        conflict("/t/ab"),
        "a later failure is not reported first"
    );
    assert_eq!(store.list("").unwrap(), before);
    // The same commit with current expectations lands whole.
    let fixed = [
        put("/n1", "x", Expect::Absent),
        put("/t/b", "b2", Expect::At(b)),
        delete("/t/c", c),
        put("/n2", "y", Expect::Absent),
    ];
    store.commit(&fixed).unwrap();
    let n1 = entry(store, "/n1");
    assert!(n1.revision > a3.revision);
    for k in ["/n2", "/t/b"] {
        assert_eq!(entry(store, k).revision, n1.revision, "{k}");
    }
    assert_eq!(store.get("/t/c").unwrap(), None);
    assert_eq!(entry(store, "/t/b").value, b"b2");
    assert_eq!(
        keys(store, "/"),
        [
            "/n1",
            "/n2",
            "/s",
            "/t/a",
            "/t/a/x",
            "/t/ab",
            "/t/b",
            "/t/\u{e9}",
            "/t0"
        ]
    );
    // An empty commit is no conflict.
    store.commit(&[]).unwrap();

    // Every write takes a revision greater than every one before it.
    let mut last = n1.revision;
    for i in 0..5 {
        let key = if i % 2 == 0 { "/t/b" } else { "/s" };
        let at = entry(store, key).revision;
        store
            .commit(&[put(key, &format!("w{i}"), Expect::At(at))])
            .unwrap();
        let now = entry(store, key).revision;
        assert!(now > last, "write {i}: {now} after {last}");
        last = now;
    }

    // A checked commit writes only when every check holds too, names the
    // check that failed, and tells the revision its writes took.
    use palisade_ipam::store::{Check, Committed};
    let s_at = entry(store, "/s").revision;
    let newest_t = store
        .list("/t/")
        .unwrap()
        .iter()
        .map(|e| e.revision)
        .max()
        .unwrap();
    let u = || [put("/u", "u", Expect::Absent)];
    for (check, named) in [
        (Check::Key("/s", Expect::At(s_at + 1000)), "/s"),
        (Check::Key("/s", Expect::Absent), "/s"),
        (Check::Key("/missing", Expect::At(s_at)), "/missing"),
        (
            Check::NoneNewer {
                prefix: "/t/",
                revision: newest_t - 1,
            },
            "/t/",
        ),
    ] {
        assert_eq!(
            store.commit_checked(&[check], &u()),
            Err(StoreError::Conflict { key: named.into() }),
            "{check:?}"
        );
        assert_eq!(store.get("/u").unwrap(), None, "{check:?} wrote");
    }
    // A prefix check sees only its prefix: "/t0" is not under "/t/".
    let t0 = entry(store, "/t0").revision;
    store
        .commit(&[put("/t0", "later", Expect::At(t0))])
        .unwrap();
    let all_hold = [
        Check::Key("/s", Expect::At(s_at)),
        Check::Key("/missing", Expect::Absent),
        Check::NoneNewer {
            prefix: "/t/",
            revision: newest_t,
        },
        Check::NoneNewer {
            prefix: "/none/",
            revision: 0,
        },
    ];
    let landed = store.commit_checked(&all_hold, &u()).unwrap();
    let u_at = entry(store, "/u").revision;
    assert_eq!(landed, Committed::Landed(u_at));
    assert!(u_at > entry(store, "/t0").revision);
    last = u_at;
    store
        .commit(&[
            delete("/u", u_at),
            put("/t0", "w", Expect::At(entry(store, "/t0").revision)),
        ])
        .unwrap();
    last = last.max(entry(store, "/t0").revision);

    // A batched read answers as the reads one by one would.
    use palisade_ipam::store::Read;
    let reads = [
        Read::Prefix("/t/"),
        Read::Key("/s"),
        Read::Key("/missing"),
        Read::Prefix("/none/"),
    ];
    let batched = store.read(&reads).unwrap();
    let single: Vec<Vec<Entry>> = vec![
        store.list("/t/").unwrap(),
        store.get("/s").unwrap().into_iter().collect(),
        Vec::new(),
        Vec::new(),
    ];
    assert_eq!(batched, single);
    last
}

#[test]
fn the_memory_store_keeps_the_contract() {
    contract(&MemoryStore::new());
}

#[test]
fn the_embedded_store_keeps_the_contract_and_its_revisions_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.redb");
    let store = EmbeddedIpamStore::open(&path).unwrap();
    let last = contract(&store);
    let records = store.list("").unwrap();
    drop(store);

    let store = EmbeddedIpamStore::open(&path).unwrap();
    assert_eq!(store.list("").unwrap(), records);
    let at = entry(&store, "/t0").revision;
    store
        .commit(&[put("/t0", "again", Expect::At(at))])
        .unwrap();
    let again = entry(&store, "/t0").revision;
    assert!(again > last, "{again} after reopening at {last}");

    // Two handles on the file at once (as two processes have): each sees
    // the other's commits, and a stale expectation fails across them.
    let other = EmbeddedIpamStore::open(&path).unwrap();
    let seen = entry(&other, "/t0");
    store
        .commit(&[put("/t0", "first", Expect::At(seen.revision))])
        .unwrap();
    assert_eq!(
        other.commit(&[put("/t0", "second", Expect::At(seen.revision))]),
        conflict("/t0")
    );
    let now = entry(&other, "/t0");
    assert_eq!(
        (now.value.as_slice(), now.revision > again),
        (&b"first"[..], true)
    );
    other
        .commit(&[put("/t0", "second", Expect::At(now.revision))])
        .unwrap();
    assert_eq!(entry(&store, "/t0").value, b"second");
}

#[test]
fn a_corrupt_embedded_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let e = EmbeddedIpamStore::open(&path).unwrap_err();
    let file = path.display().to_string();
    assert!(
        matches!(&e, StoreError::Corrupt { key, .. } if *key == file),
        "{e:?}"
    );
}

/// `threads` handles, each its own connection or file handle, add 1 to one
/// counter `each` times with read-modify-write and retry on conflict; the
/// count reached.
fn count_concurrently(
    threads: usize,
    each: usize,
    open: impl Fn() -> Box<dyn IpamStore> + Sync,
) -> u64 {
    const COUNTER: &str = "/calico/ipam/v2/config";
    let start = std::sync::Barrier::new(threads);
    let conflicts: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    // Opened at once: a file that does not exist yet is
                    // created by several handles together.
                    start.wait();
                    let store = open();
                    let mut conflicts = 0;
                    for _ in 0..each {
                        loop {
                            let (n, expect) = match store.get(COUNTER).unwrap() {
                                Some(e) => {
                                    let n: u64 =
                                        String::from_utf8(e.value).unwrap().parse().unwrap();
                                    (n, Expect::At(e.revision))
                                }
                                None => (0, Expect::Absent),
                            };
                            match store.commit(&[put(COUNTER, &(n + 1).to_string(), expect)]) {
                                Ok(()) => break,
                                Err(StoreError::Conflict { key }) => {
                                    assert_eq!(key, COUNTER);
                                    conflicts += 1;
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let store = open();
    let value = entry(store.as_ref(), COUNTER).value;
    let count = String::from_utf8(value).unwrap().parse().unwrap();
    eprintln!("{count} increments with {conflicts} conflicts retried");
    count
}

#[test]
fn embedded_handles_on_one_file_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.redb");
    let count = count_concurrently(4, 200, || {
        Box::new(EmbeddedIpamStore::open(&path).unwrap()) as Box<dyn IpamStore>
    });
    assert_eq!(count, 800);
}

#[test]
fn the_etcd_store_keeps_the_contract() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let store = EtcdIpamStore::connect(&config(&cluster)).unwrap();
    let last = contract(&store);
    // The revision is the key's mod revision: the cluster's own counter.
    assert_eq!(last, cluster.revision().unwrap());
}

#[test]
fn etcd_clients_lose_no_update() {
    if !etcd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(&dir.path().join("etcd"), 1, None).unwrap();
    let cfg = config(&cluster);
    let count = count_concurrently(4, 100, || {
        Box::new(EtcdIpamStore::connect(&cfg).unwrap()) as Box<dyn IpamStore>
    });
    assert_eq!(count, 400);
}

#[test]
fn an_unreachable_etcd_is_unavailable_and_named() {
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = palisade_datastore::EtcdConfig {
        endpoints: vec![endpoint.clone()],
        ..Default::default()
    };
    match EtcdIpamStore::connect(&cfg) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains(&endpoint), "{m}"),
        Err(e) => panic!("{e:?}"),
        // The client connects lazily: the first request says it.
        Ok(store) => match store.commit(&[put("/k", "v", Expect::Absent)]) {
            Err(StoreError::Unavailable(m)) => assert!(m.contains(&endpoint), "{m}"),
            other => panic!("{other:?}"),
        },
    }
}

const POOLS: &str = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: frontend}\n\
spec: {cidr: 10.10.0.0/16, vxlanMode: Always, natOutgoing: true}\n---\n\
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: backend}\n\
spec: {cidr: 10.20.0.0/16, nodeSelector: \"zone == 'b'\"}\n---\n\
apiVersion: projectcalico.org/v3\nkind: IPReservation\nmetadata: {name: gateways}\n\
spec: {reservedCIDRs: [10.10.0.1, 10.20.0.0/30]}\n---\n\
apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: node-b, labels: {zone: b}}\n";

#[test]
fn ip_pools_reservations_and_nodes_are_stored_for_ipam_and_validated() {
    use palisade_datastore::{Datastore, NodeView, resources};
    let (_dir, store) = super::store();
    let w = store
        .apply_sources(&[("pools.yaml".into(), POOLS.into())])
        .unwrap();
    assert_eq!(w.created.len(), 4);
    let snapshot = store.snapshot().unwrap();
    let cluster = resources::cluster(&snapshot.objects);
    let names: Vec<&str> = cluster.pools().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["backend", "frontend"]);
    assert_eq!(cluster.nodes["node-b"]["zone"], "b");
    assert!(cluster.is_reserved("10.20.0.3".parse().unwrap()));

    // The policy side sees only the node (what admin policies' node peers
    // select), and calls nothing rejected.
    let mut view = NodeView::new("node-b");
    let step = view.update(
        &snapshot
            .objects
            .iter()
            .cloned()
            .map(palisade_datastore::StoreChange::Put)
            .collect::<Vec<_>>(),
    );
    assert!(step.rejected.is_empty(), "{step:?}");
    assert!(
        step.changes.iter().all(|c| matches!(
            c,
            policy_core::cluster::Change::Upsert(policy_core::Object::Node(n)) if n.name == "node-b"
        )) && step.changes.len() == 1,
        "{step:?}"
    );

    // A bad block size and an overlap: refused, naming pool and field, and
    // nothing of the batch is written.
    for (doc, field) in [
        (
            "kind: IPPool\nmetadata: {name: ci}\nspec: {cidr: 10.30.0.0/16, blockSize: 19}",
            "spec.blockSize",
        ),
        (
            "kind: IPPool\nmetadata: {name: ci}\nspec: {cidr: 10.10.128.0/17}",
            "overlaps IPPool frontend",
        ),
        (
            "kind: IPReservation\nmetadata: {name: r}\nspec: {reservedCIDRs: [nonsense]}",
            "spec.reservedCIDRs[0]",
        ),
    ] {
        let text = format!(
            "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: node-c}}\n---\napiVersion: projectcalico.org/v3\n{doc}\n"
        );
        let e = store
            .apply_sources(&[("bad.yaml".into(), text)])
            .unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
        assert_eq!(
            store.snapshot().unwrap().revision,
            snapshot.revision,
            "{field}: written anyway"
        );
    }
}
