//! Allocators racing and dying: several `palisade ipam exercise`
//! processes on one store (embedded, and a 3-member etcd with three
//! nodes), and one killed with SIGKILL at random points. Their journals
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

use super::cluster::etcd_available;
use super::{palisade, scratch};

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
    let mut p = Promised::default();
    let mut since: BTreeMap<String, (u64, Vec<IpAddr>)> = BTreeMap::new();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A kill can tear the last line: it was never acknowledged.
        lines.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
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
