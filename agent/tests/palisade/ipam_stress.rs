//! Allocators racing and dying: several `palisade ipam exercise`
//! processes on one store (embedded, and a 3-member etcd with three
//! nodes), three agents on a 3-member etcd handing out addresses to CNI
//! ADDs at once, and an allocator killed with SIGKILL at random points.
//! Their journals
//! (fsynced after every acknowledged step, with the wall clock) say what
//! each was promised; the checker proves no address was promised to two
//! holders at once, no block was claimed twice, nothing acknowledged was
//! lost, and that `palisade ipam check` names exactly what a killed
//! allocator leaked and `gc` brings the store back to the live allocations.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use palisade_testing::etcd::EtcdCluster;
use palisade_testing::netns::Netns;
use serde_json::json;

use super::cluster::etcd_available;
use super::cni::{Call, address, cni};
use super::lab::{Lab, Node, ip, on_store};
use super::{palisade, privileged, scratch};

/// What the journals say.
#[derive(Default, Debug)]
struct Promised {
    /// Handles acknowledged and not being released, with their addresses.
    live: BTreeMap<String, Vec<IpAddr>>,
    /// Per address: (from, until, handle) — until is u64::MAX while held.
    intervals: BTreeMap<IpAddr, Vec<(u64, u64, String)>>,
    /// Steps acknowledged.
    steps: usize,
}

fn read_journals(paths: &[PathBuf]) -> Promised {
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A kill can tear the last line: it was never acknowledged.
        lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    promised(lines)
}

/// What journal lines (`op`, `handle`, `t`, `ips`) promised, in time order.
fn promised(mut lines: Vec<serde_json::Value>) -> Promised {
    let mut p = Promised::default();
    let mut since: BTreeMap<String, (u64, Vec<IpAddr>)> = BTreeMap::new();
    lines.sort_by_key(|v| v["t"].as_u64().unwrap_or(0));
    for v in lines {
        let h = v["handle"].as_str().unwrap_or("").to_string();
        let t = v["t"].as_u64().unwrap_or(0);
        match v["op"].as_str() {
            Some("assigned") => {
                let ips: Vec<IpAddr> = v["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.as_str()?.parse().ok())
                    .collect();
                since.insert(h.clone(), (t, ips.clone()));
                p.live.insert(h, ips);
                p.steps += 1;
            }
            Some("releasing") => {
                p.live.remove(&h);
                if let Some((from, ips)) = since.remove(&h) {
                    for ip in ips {
                        p.intervals
                            .entry(ip)
                            .or_default()
                            .push((from, t, h.clone()));
                    }
                }
            }
            Some("released") => p.steps += 1,
            _ => {}
        }
    }
    for (h, (from, ips)) in since {
        for ip in ips {
            p.intervals
                .entry(ip)
                .or_default()
                .push((from, u64::MAX, h.clone()));
        }
    }
    p
}

/// No address promised to two holders at overlapping times. A journal
/// interval lies inside the true holding (it starts after the commit and
/// ends before the release), so an overlap here is a real double grant.
fn assert_never_held_twice(p: &Promised) {
    for (ip, spans) in &p.intervals {
        let mut spans = spans.clone();
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{ip} promised to {} and {} at once",
                w[0].2,
                w[1].2
            );
        }
    }
}

fn exercise(
    store: &[String],
    node: &str,
    ops: usize,
    seed: u64,
    journal: &Path,
    drain: bool,
) -> Child {
    let mut c = palisade();
    c.args(["ipam", "exercise", "--node", node])
        .args(["--ops", &ops.to_string(), "--seed", &seed.to_string()])
        .arg("--journal")
        .arg(journal)
        .args(store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if drain {
        c.arg("--drain");
    }
    c.spawn().unwrap()
}

fn cli(store: &[String], args: &[&str]) -> (bool, String) {
    let out = palisade().args(args).args(store).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// One pool and the nodes.
fn setup(dir: &Path, store: &[String], nodes: &[&str], cidr: &str, block: u8) {
    let mut yaml = format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: stress}}\n\
         spec: {{cidr: {cidr}, blockSize: {block}}}\n"
    );
    for n in nodes {
        yaml.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {n}}}\n"
        ));
    }
    let f = dir.join("pools.yaml");
    std::fs::write(&f, yaml).unwrap();
    let (ok, out) = cli(store, &["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}");
}

/// Runs allocators at once (node, count each), each `ops` operations,
/// releasing all they hold at the end; then checks journals and store.
fn race(dir: &Path, store: &[String], nodes: &[&str], per_node: usize, ops: usize) {
    // Small blocks (a /22 in /28s: 64 blocks of 16) so hosts keep claiming,
    // filling and releasing blocks while the others do.
    setup(dir, store, nodes, "10.40.0.0/22", 28);
    let mut children = Vec::new();
    let mut journals = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for j in 0..per_node {
            let journal = dir.join(format!("journal-{n}-{j}"));
            children.push(exercise(
                store,
                n,
                ops,
                (i * 10 + j + 1) as u64,
                &journal,
                true,
            ));
            journals.push(journal);
        }
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let p = read_journals(&journals);
    assert!(p.steps >= nodes.len() * per_node * ops, "{} steps", p.steps);
    assert_never_held_twice(&p);
    assert!(
        p.live.is_empty(),
        "every allocator drained: {:?}",
        p.live.keys().take(3).collect::<Vec<_>>()
    );
    // Everything was released: no block claimed twice, nothing left over.
    let (ok, out) = cli(store, &["ipam", "check"]);
    assert!(
        ok && out.contains("0 allocated addresses") && out.contains("0 findings"),
        "{out}"
    );
}

#[test]
fn four_allocator_processes_on_the_embedded_store_never_share_an_address() {
    let dir = scratch("ipam-race-embedded");
    let store = vec![
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
    ];
    race(&dir, &store, &["node-a", "node-b"], 2, 400);
}

#[test]
fn three_nodes_on_a_three_member_etcd_never_share_an_address() {
    if !etcd_available() {
        return;
    }
    let dir = scratch("ipam-race-etcd");
    let cluster = EtcdCluster::start(&dir, 3, None).unwrap();
    let store = vec![
        "--datastore".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        cluster.endpoints().join(","),
    ];
    race(&dir, &store, &["node-a", "node-b", "node-c"], 2, 250);
    let claims = assert_never_affine_twice(&cluster);
    assert!(claims >= 3, "only {claims} blocks claimed");
}

#[test]
fn an_allocator_killed_anywhere_leaks_only_what_check_names_and_gc_restores() {
    let dir = scratch("ipam-kill");
    let store = vec![
        "--state-dir".to_string(),
        dir.join("state").display().to_string(),
    ];
    // Room for what the killed allocators leave held (a host holds at most
    // 20 blocks: 1,280 addresses in /26s).
    setup(&dir, &store, &["node-a"], "10.40.0.0/20", 26);
    let journal = dir.join("journal");
    let mut seed = 0x5eed_u64;
    // Kill at random points until thousands of steps were acknowledged
    // (how many fit between kills depends on the machine).
    let mut kills = 0;
    while read_journals(std::slice::from_ref(&journal)).steps < 2000 {
        assert!(kills < 200, "the allocator makes no progress");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = exercise(&store, "node-a", 100_000, kills + 1, &journal, false);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 350));
        // SIGKILL: no chance to finish the step in flight.
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let p = read_journals(&[journal]);
    assert_never_held_twice(&p);

    // Every live promise is in the store under its handle; whatever else
    // the store holds is a leak of a step in flight at a kill.
    let live_ips: BTreeSet<IpAddr> = p.live.values().flatten().copied().collect();
    let mut pods = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: exercise}\n");
    for h in p.live.keys() {
        pods.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {h}, namespace: exercise}}\n"
        ));
    }
    let f = dir.join("pods.yaml");
    std::fs::write(&f, pods).unwrap();
    let (ok, out) = cli(&store, &["apply", "-f", f.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (_, report) = cli(&store, &["ipam", "check"]);
    let leaked: BTreeSet<String> = report
        .lines()
        .filter_map(|l| {
            l.split("(handle ")
                .nth(1)?
                .split(')')
                .next()
                .map(String::from)
        })
        .collect();
    assert!(
        leaked.iter().all(|h| !p.live.contains_key(h)),
        "a live handle called leaked: {report}"
    );
    let allocated: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("checked ")?
                .split(", ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    let leaked_ips = report.lines().filter(|l| l.contains("(handle ")).count();
    assert_eq!(allocated, live_ips.len() + leaked_ips, "{report}");
    // At most one step is in flight per kill.
    assert!(leaked.len() as u64 <= kills, "{report}");
    eprintln!(
        "{} steps acknowledged over {kills} kills: {} addresses live, {} leaked ({:?})",
        p.steps,
        live_ips.len(),
        leaked_ips,
        leaked
    );

    let (ok, out) = cli(&store, &["ipam", "gc", "--grace-seconds", "0"]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&store, &["ipam", "check"]);
    assert!(ok && out.contains("0 findings"), "{out}");
    assert!(
        out.contains(&format!(", {} allocated", live_ips.len())),
        "{out}"
    );
}

/// The wall clock in nanoseconds, as the allocators' journals write it.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One node's CNI traffic: `ops` ADDs and DELs in a random order over
/// `slots` pod namespaces, draining at the end; journal lines as the
/// allocators write them (an ADD's after its answer, a DEL's `releasing`
/// before its call).
fn cni_churn(node: &Node, index: usize, slots: &[Netns], ops: usize) -> Vec<serde_json::Value> {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "stress", "type": "palisade-cni",
        "agent_socket": node.socket, "namespace": "shop", "labels": {"app": "churn"},
        "ipam": {"type": "calico-ipam", "ipv4_pools": ["stress"]},
    });
    let mut journal = Vec::new();
    let mut rng = 0x9e37_79b9_u64 + index as u64;
    let mut held: Vec<Option<String>> = vec![None; slots.len()];
    let mut seq = 0;
    let call = |command: &str, container: &str, slot: usize| {
        let args = format!("K8S_POD_NAME={container}");
        cni(
            &Call {
                command,
                container,
                netns: Some(slots[slot].name()),
                args: &args,
            },
            &conf,
        )
    };
    let del = |journal: &mut Vec<serde_json::Value>, slot: usize, container: &str| {
        journal.push(json!({"op": "releasing", "handle": container, "t": now_ns()}));
        let (ok, out) = call("DEL", container, slot);
        assert!(ok, "{} DEL {container}: {out}", node.name);
        journal.push(json!({"op": "released", "handle": container, "t": now_ns()}));
    };
    for _ in 0..ops {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let slot = (rng % slots.len() as u64) as usize;
        match held[slot].take() {
            Some(container) => del(&mut journal, slot, &container),
            None => {
                seq += 1;
                let container = format!("{}-{seq}", node.name);
                let (ok, out) = call("ADD", &container, slot);
                assert!(ok, "{} ADD {container}: {out}", node.name);
                journal.push(json!({"op": "assigned", "handle": container,
                    "ips": [address(&out).to_string()], "t": now_ns()}));
                held[slot] = Some(container);
            }
        }
    }
    for (slot, container) in held.iter_mut().enumerate() {
        if let Some(container) = container.take() {
            del(&mut journal, slot, &container);
        }
    }
    journal
}

#[test]
fn three_agents_on_a_three_member_etcd_never_give_two_pods_one_address() {
    if !privileged() || !etcd_available() {
        return;
    }
    let dir = scratch("ipam-race-agents");
    let cluster = EtcdCluster::start(&dir.join("etcd"), 3, None).unwrap();
    let store = vec![
        "--datastore".to_string(),
        "etcd".to_string(),
        "--etcd-endpoints".to_string(),
        cluster.endpoints().join(","),
    ];
    let nodes = ["node-a", "node-b", "node-c"];
    // Small blocks (a /24 in /30s: 64 blocks of 4) so that each node's six
    // pods and tunnel need two blocks or more, claimed while the others
    // claim theirs.
    let mut manifests = String::from(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: stress}\n\
         spec: {cidr: 10.40.0.0/24, blockSize: 30, vxlanMode: Always}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    for n in nodes {
        manifests.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: {n}}}\n"
        ));
    }
    let lab = Lab::start_on("ir", 9150, &dir, &nodes, &manifests, store);
    // The tunnel addresses come from the same pool: held all along.
    let mut tunnels = Vec::new();
    for n in &lab.nodes {
        let addr = ip(n.ns.name(), "-4 -o addr show dev vxlan.calico");
        let a: IpAddr = addr
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}'s tunnel address: {addr}", n.name));
        tunnels.push(
            json!({"op": "assigned", "handle": format!("vxlan-tunnel-addr-{}", n.name),
            "ips": [a.to_string()], "t": 0}),
        );
    }
    let pid = std::process::id();
    let slots: Vec<Vec<Netns>> = (0..nodes.len())
        .map(|i| {
            (0..6)
                .map(|k| Netns::create(&format!("palir{i}{k}{pid}")).unwrap())
                .collect()
        })
        .collect();
    let ops = 700;
    let started = std::time::Instant::now();
    let journals: Vec<Vec<serde_json::Value>> = std::thread::scope(|s| {
        let runs: Vec<_> = lab
            .nodes
            .iter()
            .zip(&slots)
            .enumerate()
            .map(|(i, (n, pods))| s.spawn(move || cni_churn(n, i, pods, ops)))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut lines: Vec<serde_json::Value> = journals.into_iter().flatten().collect();
    let calls = lines.iter().filter(|v| v["op"] != "releasing").count();
    lines.extend(tunnels);
    let p = promised(lines);
    eprintln!(
        "{calls} CNI calls on 3 agents in {:.1} s, {} addresses used",
        started.elapsed().as_secs_f64(),
        p.intervals.len()
    );
    assert!(calls >= nodes.len() * ops, "{calls} calls");
    assert_never_held_twice(&p);
    assert_eq!(
        p.live.len(),
        nodes.len(),
        "only the tunnels left: {:?}",
        p.live
    );
    // Nothing left but the tunnels; no block claimed twice; every
    // endpoint the CNI wrote is gone.
    let check = on_store(&lab.store, &["ipam", "check"]);
    assert!(
        check.contains(&format!("{} allocated addresses", nodes.len()))
            && check.contains("\n0 findings"),
        "{check}"
    );
    let weps = on_store(&lab.store, &["get", "workloadendpoints"]);
    assert!(!weps.contains("node-"), "{weps}");
    let claims = assert_never_affine_twice(&cluster);
    assert!(claims > nodes.len(), "only {claims} blocks claimed");
}

/// Replays etcd's history of block affinities, revision by revision: a
/// block is never affine to two hosts at once. How many claims there were.
fn assert_never_affine_twice(cluster: &EtcdCluster) -> usize {
    let history = cluster.history("/calico/ipam/v2/host/").unwrap();
    let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut claims = 0;
    let mut i = 0;
    while i < history.len() {
        // Every change of one transaction, then the state it left.
        let revision = history[i].revision;
        let mut touched = Vec::new();
        while i < history.len() && history[i].revision == revision {
            let c = &history[i];
            i += 1;
            let parts: Vec<&str> = c.key.split('/').collect();
            // ["", "calico", "ipam", "v2", "host", <host>, "ipv4", "block", <cidr>]
            let (Some(host), Some(cidr)) = (parts.get(5), parts.get(8)) else {
                panic!("not an affinity key: {}", c.key);
            };
            let hosts = owners.entry(cidr.to_string()).or_default();
            if c.deleted {
                hosts.remove(*host);
            } else if hosts.insert(host.to_string()) {
                claims += 1;
            }
            touched.push(cidr.to_string());
        }
        for cidr in touched {
            assert!(
                owners[&cidr].len() <= 1,
                "revision {revision}: block {cidr} affine to {:?}",
                owners[&cidr]
            );
        }
    }
    eprintln!(
        "{claims} block claims in {} changes of etcd's history, never a block affine to two hosts",
        history.len()
    );
    claims
}
