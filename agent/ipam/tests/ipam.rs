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
                    if rng.next(3) < 2 || mine.is_empty() {
                        let handle = format!("t{t}-{i}");
                        let mut args = AutoAssignArgs::new(host, 1, 0, Use::Workload);
                        args.handle = Some(handle.clone());
                        let got = ipam.auto_assign(&args);
                        assert!(got.error.is_none(), "{:?}", got.error);
                        for ip in got.v4.into_iter().flat_map(|a| a.ips) {
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
