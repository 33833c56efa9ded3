//! palisade-ipam against its invariants: random operations from several
//! hosts and threads never hand out an address that is held, never claim a
//! block twice, and leave records `check` finds consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use palisade_ipam::check::{Finding, check};
use palisade_ipam::{
    AssignIpArgs, AutoAssignArgs, Cluster, Config, FixedEnv, Ipam, IpamStore, MemoryStore, Pool,
    Release, Use,
};
use serde_json::json;

fn pool(name: &str, cidr: &str, block: u8) -> Pool {
    Pool::from_document(&json!({"metadata": {"name": name},
        "spec": {"cidr": cidr, "blockSize": block}}))
    .unwrap()
}

fn cluster(hosts: &[&str]) -> Cluster {
    let mut c = Cluster::new();
    c.set_pools(vec![
        pool("frontend", "10.10.0.0/24", 28),
        pool("backend", "10.20.0.0/25", 29),
        pool("v6", "fd00:10::/120", 124),
    ])
    .unwrap();
    for h in hosts {
        c.nodes.insert(h.to_string(), Default::default());
    }
    c
}

/// xorshift: reproducible choices without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn clean(findings: &[Finding]) -> bool {
    findings.is_empty()
}

#[test]
fn random_operations_keep_every_invariant() {
    let hosts = ["node-a", "node-b", "node-c"];
    let c = cluster(&hosts);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 1);
    let ipam = Ipam::new(&store, &c, &env);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // What the test was given and still holds: address → handle.
    let mut held: BTreeMap<IpAddr, String> = BTreeMap::new();
    for step in 0..1500 {
        let host = hosts[rng.next(3) as usize];
        let handle = format!("h{}", rng.next(40));
        match rng.next(10) {
            0..=4 => {
                let mut args = AutoAssignArgs::new(
                    host,
                    1 + rng.next(3) as usize,
                    rng.next(2) as usize,
                    Use::Workload,
                );
                args.handle = Some(handle.clone());
                let got = ipam.auto_assign(&args);
                for a in [got.v4, got.v6].into_iter().flatten() {
                    for ip in a.ips {
                        let prev = held.insert(ip.addr(), handle.clone());
                        assert!(
                            prev.is_none(),
                            "step {step}: {} handed out while held by {prev:?}",
                            ip.addr()
                        );
                    }
                }
            }
            5 => {
                let ip: IpAddr = format!("10.20.0.{}", rng.next(128)).parse().unwrap();
                let args = AssignIpArgs {
                    ip,
                    hostname: host.into(),
                    handle: Some(handle.clone()),
                    attrs: Default::default(),
                    intended_use: None,
                    max_alloc_per_handle: 0,
                    host_reserved: None,
                };
                match ipam.assign_ip(&args) {
                    Ok(()) => assert!(
                        held.insert(ip, handle.clone()).is_none(),
                        "step {step}: {ip} assigned twice"
                    ),
                    Err(e) => assert!(
                        held.contains_key(&ip) || e.kind() != "addressInUse",
                        "step {step}: {e}"
                    ),
                }
            }
            6..=7 => {
                if ipam.release_by_handle(&handle).is_ok() {
                    held.retain(|_, h| *h != handle);
                } else {
                    assert!(
                        !held.values().any(|h| *h == handle),
                        "step {step}: handle {handle} lost"
                    );
                }
            }
            8 => {
                let some: Vec<IpAddr> = held.keys().copied().filter(|_| rng.next(4) == 0).collect();
                let reqs: Vec<Release> = some
                    .iter()
                    .map(|a| Release {
                        address: *a,
                        handle: None,
                        sequence: None,
                    })
                    .collect();
                let out = ipam.release_ips(&reqs).unwrap();
                assert!(
                    out.error.is_none() && out.unallocated.is_empty(),
                    "step {step}: {out:?}"
                );
                for a in some {
                    held.remove(&a);
                }
            }
            _ => {
                let _ = ipam.release_host_affinities(host, rng.next(2) == 0);
            }
        }
        if step % 50 == 0 {
            let report = check(ipam.records(), &c, None).unwrap();
            assert!(
                clean(&report.findings),
                "step {step}: {:#?}",
                report.findings
            );
            let actual: BTreeMap<IpAddr, String> = report
                .allocated
                .into_iter()
                .map(|(ip, h)| (ip, h.unwrap_or_default()))
                .collect();
            assert_eq!(
                actual, held,
                "step {step}: the store and what was handed out differ"
            );
        }
    }
}

/// The pools hold 384 IPv4 addresses; four threads keep at most half.
const HELD_PER_THREAD: usize = 48;

#[test]
fn threads_sharing_a_store_never_share_an_address() {
    let hosts = ["node-a", "node-b"];
    let c = cluster(&hosts);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 2);
    let given = Mutex::new(BTreeSet::new());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, store, env, given) = (&c, &store, &env, &given);
            s.spawn(move || {
                // Each thread remembers its hosts' blocks, as a long-running
                // allocator process does; the others' writes make it stale.
                let cache = palisade_ipam::IpamCache::new();
                let ipam = Ipam::new(store, c, env).with_cache(&cache);
                let mut rng = Rng(0x1234_5678 + t);
                let host = hosts[(t % 2) as usize];
                let mut mine: Vec<String> = Vec::new();
                for i in 0..300 {
                    // Up to HELD_PER_THREAD each: half the pools, so every
                    // request must be met, and a host needs at most 12 of
                    // its 20 blocks; beyond that a full pool, not a race,
                    // would decide the outcome.
                    let assign = rng.next(3) < 2 || mine.is_empty();
                    if assign && mine.len() < HELD_PER_THREAD {
                        let handle = format!("t{t}-{i}");
                        let mut args = AutoAssignArgs::new(host, 1, 0, Use::Workload);
                        args.handle = Some(handle.clone());
                        let got = ipam.auto_assign(&args);
                        assert!(got.error.is_none(), "{:?}", got.error);
                        let ips = got.v4.map(|a| a.ips).unwrap_or_default();
                        assert_eq!(ips.len(), 1, "{handle}: one address asked for");
                        for ip in ips {
                            assert!(
                                given.lock().unwrap().insert(ip.addr()),
                                "{} given twice",
                                ip.addr()
                            );
                            mine.push(handle.clone());
                        }
                    } else {
                        let handle = mine.swap_remove(rng.next(mine.len() as u64) as usize);
                        let ips = ipam.ips_by_handle(&handle).unwrap();
                        {
                            let mut g = given.lock().unwrap();
                            for ip in &ips {
                                g.remove(&ip.addr());
                            }
                        }
                        // Removed from `given` before the release lands, so
                        // a reuse right after is not a false alarm.
                        ipam.release_by_handle(&handle).unwrap();
                    }
                }
            });
        }
    });
    let ipam = Ipam::new(&store, &c, &env);
    let report = check(ipam.records(), &c, None).unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    let held: BTreeSet<IpAddr> = report.allocated.keys().copied().collect();
    assert_eq!(held, *given.lock().unwrap());
}

#[test]
fn a_full_pool_says_which_pools_and_a_disabled_pool_is_never_used() {
    let mut c = cluster(&["node-a"]);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 3);
    {
        let ipam = Ipam::new(&store, &c, &env);
        let mut args = AutoAssignArgs::new("node-a", 200, 0, Use::Workload);
        args.ipv4_pools = vec!["10.20.0.0/25".parse().unwrap()];
        let got = ipam.auto_assign(&args);
        let v4 = got.v4.unwrap();
        assert_eq!(v4.ips.len(), 128);
        let text = v4.partial_fulfillment_error().unwrap();
        assert!(
            text.contains("Assigned 128 out of 200")
                && text.contains("No IPs available in pools: [10.20.0.0/25]"),
            "{text}"
        );
    }
    let mut pools: Vec<Pool> = c.pools().to_vec();
    for p in &mut pools {
        p.disabled = p.name == "frontend";
    }
    c.set_pools(pools).unwrap();
    let ipam = Ipam::new(&store, &c, &env);
    let got = ipam.auto_assign(&AutoAssignArgs::new("node-a", 1, 0, Use::Workload));
    // frontend is disabled and backend is full: nothing, and no address of
    // the disabled pool.
    let v4 = got.v4.unwrap();
    assert!(v4.ips.is_empty(), "{:?}", v4.ips);
    assert!(
        v4.msgs.iter().any(|m| m.contains("10.20.0.0/25")),
        "{:?}",
        v4.msgs
    );
}

#[test]
fn config_is_validated_as_calico_does() {
    let c = cluster(&[]);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1), 4);
    let ipam = Ipam::new(&store, &c, &env);
    let both_off = Config {
        strict_affinity: false,
        auto_allocate_blocks: false,
        max_blocks_per_host: 0,
    };
    assert_eq!(
        ipam.set_config(both_off).unwrap_err().kind(),
        "invalidConfig"
    );
    let limit_loose = Config {
        strict_affinity: false,
        auto_allocate_blocks: true,
        max_blocks_per_host: 4,
    };
    assert_eq!(
        ipam.set_config(limit_loose).unwrap_err().kind(),
        "invalidConfig"
    );
    assert_eq!(ipam.get_config(false).unwrap(), Config::default());
    assert!(
        store.list("/").unwrap().is_empty(),
        "reading the config must not write it"
    );
}

fn pod_attrs(env: &FixedEnv, ns: &str, pod: &str) -> std::collections::BTreeMap<String, String> {
    use palisade_ipam::Env;
    [
        ("namespace", ns.to_string()),
        ("pod", pod.to_string()),
        ("node", "node-a".to_string()),
        (
            "timestamp",
            palisade_ipam::time::rfc3339(env.now().as_secs()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

#[test]
fn check_names_leaks_and_gc_brings_the_store_back_to_the_live_allocations() {
    use palisade_ipam::gc::Live;
    use palisade_ipam::store::{Expect, Write};
    let mut c = cluster(&["node-a", "node-b"]);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1_800_000_000), 5);
    let pods = ["web-1", "web-2", "db-1"];
    {
        let ipam = Ipam::new(&store, &c, &env);
        for (i, p) in pods.iter().enumerate() {
            let mut args = AutoAssignArgs::new(
                if i == 2 { "node-b" } else { "node-a" },
                1,
                1,
                Use::Workload,
            );
            args.handle = Some(format!("k8s-pod-network.{p}"));
            args.attrs = pod_attrs(&env, "shop", p);
            assert!(ipam.auto_assign(&args).error.is_none());
        }
    }
    // web-2 is gone; node-b (and db-1 on it) are gone.
    let live = Live {
        pods: [("shop".to_string(), "web-1".to_string())].into(),
        nodes: ["node-a".to_string()].into(),
    };
    c.nodes.remove("node-b");
    let ipam = Ipam::new(&store, &c, &env);
    // A crash left a handle count high: check says so.
    let (mut h, rev) = ipam
        .records()
        .handle("k8s-pod-network.web-1")
        .unwrap()
        .unwrap();
    for n in h.block.values_mut() {
        *n += 3;
    }
    store
        .commit(&[Write::Put {
            key: palisade_ipam::store::handle_key("k8s-pod-network.web-1"),
            value: serde_json::to_vec(&h).unwrap(),
            expect: Expect::At(rev),
        }])
        .unwrap();
    let handles = palisade_ipam::gc::live_handles(&ipam, &live).unwrap();
    let report = check(ipam.records(), &c, Some(&handles)).unwrap();
    let leaked: BTreeSet<String> = report
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::Leaked { handle, .. } => Some(handle.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        leaked,
        ["k8s-pod-network.db-1", "k8s-pod-network.web-2"]
            .map(String::from)
            .into(),
        "{:#?}",
        report.findings
    );
    assert!(
        report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::HandleCount { .. }))
    );
    assert!(
        report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::DeletedNode { host, .. } if host == "node-b"))
    );

    // Inside the grace period nothing is released.
    let (done, _) = ipam.collect(&live, Duration::from_secs(900)).unwrap();
    assert_eq!(
        (done.released, done.waiting, done.handles_mended),
        (0, 4, 1),
        "{done:?}"
    );
    env.advance(Duration::from_secs(901));
    let (done, _) = ipam.collect(&live, Duration::from_secs(900)).unwrap();
    assert_eq!(done.released, 4, "{done:?}");
    assert_eq!(
        done.blocks_released, 2,
        "node-b's IPv4 and IPv6 blocks: {done:?}"
    );
    // Exactly the live allocations are left, and nothing else is wrong.
    let report = check(ipam.records(), &c, None).unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    let owners: BTreeSet<Option<String>> = report.allocated.values().cloned().collect();
    assert_eq!(owners, [Some("k8s-pod-network.web-1".to_string())].into());
    assert_eq!(report.allocated.len(), 2);
}

/// A store that counts the calls made of it.
struct Counting<'a> {
    inner: &'a MemoryStore,
    reads: std::sync::atomic::AtomicUsize,
    commits: std::sync::atomic::AtomicUsize,
}

impl Counting<'_> {
    fn calls(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.reads.load(Relaxed), self.commits.load(Relaxed))
    }
    fn read(&self) {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl IpamStore for Counting<'_> {
    fn read(
        &self,
        reads: &[palisade_ipam::store::Read<'_>],
    ) -> Result<Vec<Vec<palisade_ipam::store::Entry>>, palisade_ipam::store::StoreError> {
        Counting::read(self);
        self.inner.read(reads)
    }
    fn get(
        &self,
        key: &str,
    ) -> Result<Option<palisade_ipam::store::Entry>, palisade_ipam::store::StoreError> {
        Counting::read(self);
        self.inner.get(key)
    }
    fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<palisade_ipam::store::Entry>, palisade_ipam::store::StoreError> {
        Counting::read(self);
        self.inner.list(prefix)
    }
    fn commit(
        &self,
        writes: &[palisade_ipam::store::Write],
    ) -> Result<(), palisade_ipam::store::StoreError> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.commit(writes)
    }
    fn commit_checked(
        &self,
        checks: &[palisade_ipam::store::Check<'_>],
        writes: &[palisade_ipam::store::Write],
    ) -> Result<palisade_ipam::store::Committed, palisade_ipam::store::StoreError> {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.commit_checked(checks, writes)
    }
}

/// A copy of every record (revisions differ; nothing IPAM decides reads them).
fn snapshot(store: &MemoryStore) -> MemoryStore {
    use palisade_ipam::store::{Expect, Write};
    let copy = MemoryStore::new();
    let writes: Vec<Write> = store
        .list("")
        .unwrap()
        .into_iter()
        .map(|e| Write::Put {
            key: e.key,
            value: e.value,
            expect: Expect::Absent,
        })
        .collect();
    copy.commit(&writes).unwrap();
    copy
}

fn addresses(got: &palisade_ipam::AutoAssigned) -> Vec<IpAddr> {
    [&got.v4, &got.v6]
        .into_iter()
        .flatten()
        .flat_map(|a| a.ips.iter().map(|n| n.addr()))
        .collect()
}

/// The cached allocator's one-commit assignments (decided from what it
/// remembers) are exactly what an allocator reading afresh would assign,
/// while another allocator assigns, releases, changes the config and takes
/// the host's affinities away behind its back; and when nothing changed
/// behind it, an assignment is one commit and no read.
#[test]
fn a_cached_allocator_assigns_exactly_as_a_fresh_read_would_in_one_commit() {
    let c = cluster(&["node-a", "node-b"]);
    let memory = MemoryStore::new();
    let store = Counting {
        inner: &memory,
        reads: 0.into(),
        commits: 0.into(),
    };
    let cache = palisade_ipam::IpamCache::new();
    let now = Duration::from_secs(1_800_000_000);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut mine: Vec<String> = Vec::new();
    let mut theirs: Vec<String> = Vec::new();
    let (mut quiet, mut one_commit) = (0, 0);
    let mut changed_behind = true;
    for step in 0..1200u64 {
        let env = FixedEnv::new(now, step + 1);
        let ipam = Ipam::new(&store, &c, &env).with_cache(&cache);
        let other = Ipam::new(&memory, &c, &env);
        match rng.next(20) {
            0..=9 => {
                let handle = format!("mine-{step}");
                let mut args =
                    AutoAssignArgs::new("node-a", 1, (rng.next(4) == 0) as usize, Use::Workload);
                args.handle = Some(handle.clone());
                let fresh_store = snapshot(&memory);
                let fresh_env = FixedEnv::new(now, step + 1);
                let fresh = Ipam::new(&fresh_store, &c, &fresh_env).auto_assign(&args);
                let before = store.calls();
                let got = ipam.auto_assign(&args);
                let after = store.calls();
                assert_eq!(
                    addresses(&got),
                    addresses(&fresh),
                    "step {step}: the cached allocator chose differently ({:?} / {:?})",
                    got.error,
                    fresh.error
                );
                assert_eq!(got.error.is_some(), fresh.error.is_some(), "step {step}");
                if !changed_behind && args.num6 == 0 && got.error.is_none() {
                    quiet += 1;
                    if after.0 == before.0 && after.1 == before.1 + 1 {
                        one_commit += 1;
                    }
                }
                changed_behind = false;
                if !addresses(&got).is_empty() {
                    mine.push(handle);
                }
            }
            10..=13 if !mine.is_empty() => {
                let h = mine.swap_remove(rng.next(mine.len() as u64) as usize);
                ipam.release_by_handle(&h).unwrap();
            }
            14..=16 => {
                // Another process of the same node, or of another.
                let host = ["node-a", "node-b"][rng.next(2) as usize];
                let handle = format!("theirs-{step}");
                let mut args =
                    AutoAssignArgs::new(host, 1 + rng.next(2) as usize, 0, Use::Workload);
                args.handle = Some(handle.clone());
                if !addresses(&other.auto_assign(&args)).is_empty() {
                    theirs.push(handle);
                }
                changed_behind = true;
            }
            17 if !mine.is_empty() => {
                // Someone else releases one of ours (a GC, an operator).
                let h = mine.swap_remove(rng.next(mine.len() as u64) as usize);
                other.release_by_handle(&h).unwrap();
                changed_behind = true;
            }
            18 => {
                let strict = rng.next(2) == 0;
                other
                    .set_config(Config {
                        strict_affinity: strict,
                        auto_allocate_blocks: true,
                        max_blocks_per_host: if strict { 1 + rng.next(6) as u32 } else { 0 },
                    })
                    .unwrap();
                changed_behind = true;
            }
            19 => {
                // node-a's empty blocks go (as when its pods drain).
                let _ = other.release_host_affinities("node-a", true);
                changed_behind = true;
            }
            _ => {}
        }
        if theirs.len() > 40 {
            let h = theirs.remove(0);
            other.release_by_handle(&h).unwrap();
            changed_behind = true;
        }
    }
    assert!(
        quiet > 100,
        "only {quiet} assignments with nothing changed behind"
    );
    assert!(
        one_commit * 10 >= quiet * 8,
        "{one_commit} of {quiet} assignments with nothing changed behind took one commit and no read"
    );
    let env = FixedEnv::new(now, 1);
    let report = check(Ipam::new(&memory, &c, &env).records(), &c, None).unwrap();
    assert!(clean(&report.findings), "{:?}", report.findings);
}

#[test]
fn claim_affinity_reports_what_it_claimed_alongside_its_error() {
    let c = cluster(&["node-a", "node-b"]);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1), 5);
    let ipam = Ipam::new(&store, &c, &env);
    // Smaller than a block (/28): refused up front, nothing claimed.
    let refused = ipam.claim_affinity(&"10.10.0.0/29".parse().unwrap(), "node-a");
    assert!(refused.error.is_some());
    assert!(refused.claimed.is_empty() && refused.failed.is_empty());
    // node-b holds the second block: node-a claims the others, fails it.
    let held = ipam.claim_affinity(&"10.10.0.16/28".parse().unwrap(), "node-b");
    assert_eq!((held.claimed.len(), held.error), (1, None));
    let got = ipam.claim_affinity(&"10.10.0.0/26".parse().unwrap(), "node-a");
    assert_eq!(got.error, None);
    assert_eq!((got.claimed.len(), got.failed.len()), (3, 1));
    assert_eq!(got.failed, vec!["10.10.0.16/28".parse().unwrap()]);
}

fn cni_request(
    netconf: &serde_json::Value,
    reuse_existing: bool,
) -> palisade_ipam::cni::CniRequest<'_> {
    palisade_ipam::cni::CniRequest {
        netconf,
        container_id: "badbeef",
        ip: None,
        pod: None,
        local_host: "node-a",
        reuse_existing,
    }
}

#[test]
fn a_cni_add_under_another_network_name_finds_the_containers_endpoint() {
    use palisade_ipam::cni::add;

    let c = cluster(&["node-a"]);
    let store = MemoryStore::new();
    let env = FixedEnv::new(Duration::from_secs(1), 6);
    let ipam = Ipam::new(&store, &c, &env);
    let net1 = json!({"name": "net1", "type": "calico", "ipam": {"type": "calico-ipam"}});
    let net2 = json!({"name": "net2", "type": "calico", "ipam": {"type": "calico-ipam"}});
    let first = add(&ipam, &cni_request(&net1, true)).unwrap();
    // The `calico` plugin: the container's endpoint exists, whichever
    // network made it; its addresses come back, nothing is assigned.
    let again = add(&ipam, &cni_request(&net2, true)).unwrap();
    assert_eq!(again, first);
    assert!(
        !ipam
            .ips_by_handle("net2.badbeef")
            .is_ok_and(|ips| !ips.is_empty())
    );
    // `calico-ipam` alone assigns for the new handle.
    let other = add(&ipam, &cni_request(&net2, false)).unwrap();
    assert_ne!(other.ips, first.ips);
}
