//! The compiler's scaling report: full and node-local compile times,
//! incremental delta latency (p50/p99), compiled memory and lowered entries per
//! endpoint, each next to the reference engine's cost on the same work,
//! measured in the same run. Writes `docs/compiler-scaling.md`, `.csv` and
//! `.svg`.
//!
//! ```text
//! cargo xtask report compiler               # full grid
//! cargo xtask report compiler -- --quick    # 1k and 10k pods only
//! cargo xtask report compiler -- --wide-only  # rules-per-policy axis only
//! cargo xtask report compiler -- --admin-only # admin policies axis only
//! ```
//!
//! The rules-per-policy axis (few policies of many rules, each rule its own
//! port and peer set) goes to `docs/compiler-rules-per-policy.md`; the
//! admin-policies axis (AdminNetworkPolicies over the same generated
//! cluster) to `docs/compiler-admin-policies.md`.

use std::alloc::System;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use palisade_benches::{ChangeKind, INSTRUMENTED_SYSTEM, Region, StatsAlloc, change, cluster};
use palisade_testing::testgen::Rng;
use policy_core::compile::{CompileOptions, Compiler};
use policy_core::{Cluster, Direction, Engine, Flow, ReferenceEngine};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const NODE: &str = "node-0";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// The reference engine's cost on the work a compile does: index the
/// cluster and answer one flow per endpoint and direction.
fn reference_work(cluster: &Cluster, node: Option<&str>) -> Duration {
    let t = Instant::now();
    let engine = ReferenceEngine::new(cluster);
    for e in cluster.endpoints() {
        if node.is_some_and(|n| e.node.as_deref() != Some(n)) {
            continue;
        }
        let Some(ip) = e.ips.first() else { continue };
        let peer = "10.99.0.1".parse().expect("ip");
        for d in Direction::ALL {
            let (src, dst) = match d {
                Direction::Ingress => (peer, *ip),
                Direction::Egress => (*ip, peer),
            };
            let flow = Flow::ports(src, dst, policy_core::net::Protocol::TCP, 40000, 8080);
            let _ = engine.decide(&e.key, d, &flow);
        }
    }
    t.elapsed()
}

/// A figure plotted against pods.
type Metric = Box<dyn Fn(&Row) -> f64>;

struct Row {
    pods: usize,
    policies: usize,
    full: Duration,
    full_ref: Duration,
    node: Duration,
    node_ref: Duration,
    incremental: Vec<(ChangeKind, Duration, Duration, Duration)>,
    compiled_bytes: usize,
    source_bytes: usize,
    entries_per_endpoint: f64,
    node_entries_per_endpoint: f64,
    identities: usize,
    programs: usize,
    max_depth: usize,
}

fn measure(pods: usize, policies: usize, changes: usize) -> Row {
    eprintln!("== {pods} pods x {policies} policies");
    let c = cluster(pods, policies);
    let reps = if pods * policies > 20_000_000 { 1 } else { 3 };

    let full_ref = median((0..reps).map(|_| reference_work(&c, None)).collect());
    let node_ref = median((0..reps).map(|_| reference_work(&c, Some(NODE))).collect());

    let mut full_times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let (compiled, _) =
            Compiler::from_cluster(&c, CompileOptions::default()).expect("compiles");
        full_times.push(t.elapsed());
        drop(compiled);
    }
    let full = median(full_times);
    eprintln!(
        "   full compile {:.1} ms (reference work {:.1} ms)",
        ms(full),
        ms(full_ref)
    );
    let node = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let _ = Compiler::from_cluster(
                    &c,
                    CompileOptions {
                        node: Some(NODE.into()),
                    },
                );
                t.elapsed()
            })
            .collect(),
    );

    // Memory: the compiler holds its own copy of the cluster; measure that
    // copy alone and subtract it.
    let region = Region::new(GLOBAL);
    let copy = c.clone();
    let source_bytes = region
        .change()
        .bytes_allocated
        .saturating_sub(region.change().bytes_deallocated);
    drop(copy);
    let region = Region::new(GLOBAL);
    let (mut compiled, _) =
        Compiler::from_cluster(&c, CompileOptions::default()).expect("compiles");
    let stats = region.change();
    let total = stats
        .bytes_allocated
        .saturating_sub(stats.bytes_deallocated);
    let compiled_bytes = total.saturating_sub(source_bytes);
    let s = compiled.stats();
    let (node_view, _) = Compiler::from_cluster(
        &c,
        CompileOptions {
            node: Some(NODE.into()),
        },
    )
    .expect("compiles");
    let ns = node_view.stats();
    drop(node_view);

    let mut incremental = Vec::new();
    let mut r = Rng::new(7);
    let mut step = 0;
    for kind in ChangeKind::ALL {
        let mut times = Vec::with_capacity(changes);
        for _ in 0..changes {
            let ch = change(kind, compiled.cluster(), &mut r, step);
            step += 1;
            let t = Instant::now();
            compiled.apply(vec![ch]).expect("valid change");
            times.push(t.elapsed());
        }
        // Baseline: what a non-incremental engine does after a change —
        // rebuild the reference engine's indexes.
        let base = median(
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let e = ReferenceEngine::new(compiled.cluster());
                    let d = t.elapsed();
                    drop(e);
                    d
                })
                .collect(),
        );
        let p50 = percentile(&times, 0.5);
        let p99 = percentile(&times, 0.99);
        eprintln!(
            "   {:<17} p50 {:.3} ms p99 {:.3} ms (reference rebuild {:.1} ms)",
            kind.name(),
            ms(p50),
            ms(p99),
            ms(base)
        );
        incremental.push((kind, p50, p99, base));
    }
    Row {
        pods,
        policies,
        full,
        full_ref,
        node,
        node_ref,
        incremental,
        compiled_bytes,
        source_bytes,
        entries_per_endpoint: s.lowered_entries as f64 / s.local_endpoints.max(1) as f64,
        node_entries_per_endpoint: ns.lowered_entries as f64 / ns.local_endpoints.max(1) as f64,
        identities: s.identities,
        programs: s.programs,
        max_depth: s.max_depth,
    }
}

fn svg(rows: &[Row]) -> String {
    // Two panels: full compile time, and worst incremental p99, against pods.
    let (w, h, pad) = (900.0, 380.0, 60.0);
    let panel_w = (w - 3.0 * pad) / 2.0;
    let panel_h = h - 2.0 * pad;
    let pods: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.pods).collect();
        v.sort();
        v.dedup();
        v
    };
    let policies: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.policies).collect();
        v.sort();
        v.dedup();
        v
    };
    let colors = ["#1b9e77", "#d95f02", "#7570b3"];
    let lx = |p: usize| (p as f64).log10();
    let (xmin, xmax) = (
        lx(pods[0]) - 0.1,
        lx(*pods.last().unwrap_or(&pods[0])) + 0.1,
    );
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    let panels: [(&str, Metric); 2] = [
        (
            "full compile (ms, log scale)",
            Box::new(|r: &Row| ms(r.full)),
        ),
        (
            "single change to delta, worst p99 (ms, log scale)",
            Box::new(|r: &Row| r.incremental.iter().map(|i| ms(i.2)).fold(0.0, f64::max)),
        ),
    ];
    for (pi, (title, value)) in panels.iter().enumerate() {
        let x0 = pad + pi as f64 * (panel_w + pad);
        let y0 = pad;
        let vals: Vec<f64> = rows.iter().map(|r| value(r).max(0.001)).collect();
        let ymin = vals
            .iter()
            .cloned()
            .fold(f64::MAX, f64::min)
            .log10()
            .floor();
        let ymax = vals
            .iter()
            .cloned()
            .fold(0.0, f64::max)
            .log10()
            .ceil()
            .max(ymin + 1.0);
        let px = |p: usize| x0 + (lx(p) - xmin) / (xmax - xmin) * panel_w;
        let py = |v: f64| y0 + panel_h - (v.max(0.001).log10() - ymin) / (ymax - ymin) * panel_h;
        let _ = writeln!(
            out,
            "<text x='{}' y='{}' font-weight='bold'>{title}</text>",
            x0,
            y0 - 15.0
        );
        let _ = writeln!(
            out,
            "<rect x='{x0}' y='{y0}' width='{panel_w}' height='{panel_h}' fill='none' stroke='#999'/>"
        );
        let mut e = ymin;
        while e <= ymax {
            let y = py(10f64.powf(e));
            let _ = writeln!(
                out,
                "<line x1='{x0}' x2='{}' y1='{y}' y2='{y}' stroke='#eee'/><text x='{}' y='{}' text-anchor='end'>{}</text>",
                x0 + panel_w,
                x0 - 5.0,
                y + 4.0,
                10f64.powf(e)
            );
            e += 1.0;
        }
        for p in &pods {
            let _ = writeln!(
                out,
                "<text x='{}' y='{}' text-anchor='middle'>{}k pods</text>",
                px(*p),
                y0 + panel_h + 18.0,
                p / 1000
            );
        }
        if pi == 0 {
            // 1 s goal line.
            let y = py(1000.0);
            if (y0..=y0 + panel_h).contains(&y) {
                let _ = writeln!(
                    out,
                    "<line x1='{x0}' x2='{}' y1='{y}' y2='{y}' stroke='red' stroke-dasharray='4'/><text x='{}' y='{}' fill='red'>1 s goal (10k x 1k)</text>",
                    x0 + panel_w,
                    x0 + 5.0,
                    y - 4.0
                );
            }
        } else {
            let y = py(5.0);
            if (y0..=y0 + panel_h).contains(&y) {
                let _ = writeln!(
                    out,
                    "<line x1='{x0}' x2='{}' y1='{y}' y2='{y}' stroke='red' stroke-dasharray='4'/><text x='{}' y='{}' fill='red'>5 ms p99 goal</text>",
                    x0 + panel_w,
                    x0 + 5.0,
                    y - 4.0
                );
            }
        }
        for (ci, pol) in policies.iter().enumerate() {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.policies == *pol)
                .map(|r| (px(r.pods), py(value(r))))
                .collect();
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let color = colors[ci % colors.len()];
            let _ = writeln!(
                out,
                "<polyline points='{}' fill='none' stroke='{color}' stroke-width='2'/>",
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    out,
                    "<circle cx='{x:.1}' cy='{y:.1}' r='3' fill='{color}'/>"
                );
            }
            let _ = writeln!(
                out,
                "<text x='{}' y='{}' fill='{color}'>{pol} policies</text>",
                x0 + 10.0,
                y0 + 18.0 + 15.0 * ci as f64
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// One point on the rules-per-policy axis.
struct WideRow {
    policies: usize,
    rules: usize,
    compile: Duration,
    compiled_bytes: usize,
    reference_matrix: Duration,
    peer_sets: usize,
    programs: usize,
    max_depth: usize,
}

/// Few, wide policies (`testgen::wide_policies`): compile time and memory
/// next to the reference engine answering the same cluster's whole matrix
/// (every pod pair, both directions, the first rule's port), timed on every
/// tenth row and scaled to the whole: it takes minutes otherwise.
/// The reference matrix is timed on one row in this many.
const REFERENCE_ROW_STEP: usize = 10;

fn measure_wide(policies: usize, rules: usize) -> WideRow {
    eprintln!("== {policies} policies x {rules} rules");
    let mut c = Cluster::new();
    c.apply(
        palisade_testing::testgen::wide_policies(policies, rules)
            .into_iter()
            .map(policy_core::Change::Upsert)
            .collect(),
    )
    .expect("generated cluster is valid");
    let reps = 3;
    let compile = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let compiled = Compiler::from_cluster(&c, CompileOptions::default());
                let d = t.elapsed();
                drop(compiled);
                d
            })
            .collect(),
    );
    let region = Region::new(GLOBAL);
    let (compiled, _) = Compiler::from_cluster(&c, CompileOptions::default()).expect("compiles");
    let stats = region.change();
    let compiled_bytes = stats
        .bytes_allocated
        .saturating_sub(stats.bytes_deallocated);
    let s = compiled.stats();
    drop(compiled);
    let reference_matrix = median(
        (0..1)
            .map(|_| {
                let t = Instant::now();
                let engine = ReferenceEngine::new(&c);
                let eps: Vec<_> = c.endpoints().collect();
                for src in eps.iter().step_by(REFERENCE_ROW_STEP) {
                    for dst in &eps {
                        let (Some(s), Some(d)) = (src.ips.first(), dst.ips.first()) else {
                            continue;
                        };
                        let flow =
                            Flow::ports(*s, *d, policy_core::net::Protocol::TCP, 40000, 1000);
                        let _ = engine.decide(&src.key, Direction::Egress, &flow);
                        let _ = engine.decide(&dst.key, Direction::Ingress, &flow);
                    }
                }
                t.elapsed() * REFERENCE_ROW_STEP as u32
            })
            .collect(),
    );
    eprintln!(
        "   compile {:.0} ms, reference matrix {:.0} ms",
        ms(compile),
        ms(reference_matrix)
    );
    WideRow {
        policies,
        rules,
        compile,
        compiled_bytes,
        reference_matrix,
        peer_sets: s.peer_sets,
        programs: s.programs,
        max_depth: s.max_depth,
    }
}

fn wide_report(root: &std::path::Path) -> anyhow::Result<()> {
    // Rules per policy at five policies, then policies at 1,000 rules.
    let grid = [(5, 100), (5, 500), (5, 1_000), (1, 1_000), (20, 1_000)];
    let rows: Vec<WideRow> = grid.iter().map(|(p, r)| measure_wide(*p, *r)).collect();
    let mut md = String::from(
        "# Compiler: rules per policy

",
    );
    let _ = writeln!(
        md,
        "Measured with `cargo xtask report compiler -- --wide-only`. Clusters from `palisade_testing::testgen::wide_policies`: 200 pods, GlobalNetworkPolicies on `all()` whose every rule has its own port and its own peer set. Baseline, same run: the reference engine answering the whole 200 x 200 matrix (both directions) of the same cluster, timed on every tenth row and scaled. Goal: 5 x 1,000 rules under 1 s.
"
    );
    let _ = writeln!(
        md,
        "| policies | rules each | compile | vs reference matrix | compiled memory | peer sets | programs | deepest walk |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.2}x | {:.1} MB | {} | {} | {} |",
            r.policies,
            r.rules,
            ms(r.compile),
            ms(r.compile) / ms(r.reference_matrix),
            r.compiled_bytes as f64 / 1e6,
            r.peer_sets,
            r.programs,
            r.max_depth
        );
    }
    std::fs::create_dir_all(root.join("docs"))?;
    // Shared machines skew wall times; say how busy this one was.
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let one_minute = load.split_whitespace().next().unwrap_or("?");
        let _ = writeln!(
            md,
            "\nLoad average at the end of the run: {one_minute} on {} cores.",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    std::fs::write(root.join("docs/compiler-rules-per-policy.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// One point on the admin-policies axis.
struct AdminRow {
    admin: usize,
    full: Duration,
    node: Duration,
    full_ref: Duration,
    node_entries_per_endpoint: f64,
    programs: usize,
    max_depth: usize,
}

/// AdminNetworkPolicies (`testgen::admin_policies`, plus the baseline
/// policy) added to one generated cluster: compile times against the same
/// cluster without them and against the reference engine's work, and what
/// the datapath walks per packet.
fn admin_report(root: &std::path::Path) -> anyhow::Result<()> {
    let (pods, policies) = (10_000, 1_000);
    let base = cluster(pods, policies);
    let namespaces = base.namespaces().count();
    let mut rows = Vec::new();
    for admin in [0usize, 10, 100, 500] {
        eprintln!("== {pods} pods x {policies} policies + {admin} AdminNetworkPolicies");
        let mut c = base.clone();
        c.apply(
            palisade_testing::testgen::admin_policies(admin, namespaces)
                .into_iter()
                .map(policy_core::Change::Upsert)
                .collect(),
        )
        .expect("admin policies apply");
        let time = |node: Option<&str>| {
            median(
                (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        let compiled = Compiler::from_cluster(
                            &c,
                            CompileOptions {
                                node: node.map(String::from),
                            },
                        );
                        let d = t.elapsed();
                        drop(compiled);
                        d
                    })
                    .collect(),
            )
        };
        let (full, node) = (time(None), time(Some(NODE)));
        let full_ref = median((0..3).map(|_| reference_work(&c, None)).collect());
        let (node_view, _) = Compiler::from_cluster(
            &c,
            CompileOptions {
                node: Some(NODE.into()),
            },
        )
        .expect("compiles");
        let s = node_view.stats();
        eprintln!(
            "   full {:.0} ms, node {:.0} ms, deepest walk {}",
            ms(full),
            ms(node),
            s.max_depth
        );
        rows.push(AdminRow {
            admin,
            full,
            node,
            full_ref,
            node_entries_per_endpoint: s.lowered_entries as f64 / s.local_endpoints.max(1) as f64,
            programs: s.programs,
            max_depth: s.max_depth,
        });
    }
    let mut md = String::from("# Compiler: admin policies\n\n");
    let _ = writeln!(
        md,
        "Measured with `cargo xtask report compiler -- --admin-only`. The generated cluster of [compiler-scaling.md](compiler-scaling.md) ({pods} pods, {policies} policies) plus `palisade_testing::testgen::admin_policies`: AdminNetworkPolicies in tier kube-admin (per team: deny from dev, allow monitoring to the named metrics port, Pass the team's own namespaces on 8080 and a port range, deny the metadata address, allow DNS), half by namespace and half by pod subject, and the BaselineAdminNetworkPolicy. Baselines from the same run: the cluster without admin policies, and the reference engine indexing the cluster and answering one flow per endpoint and direction.\n"
    );
    let _ = writeln!(
        md,
        "| AdminNetworkPolicies | full compile | vs none | vs reference | node compile (200 endpoints) | vs none | entries per endpoint (node view) | programs | deepest walk |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let (none_full, none_node) = (rows[0].full, rows[0].node);
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} ms | {:.2}x | {:.2}x | {:.0} ms | {:.2}x | {:.1} | {} | {} |",
            r.admin,
            ms(r.full),
            ms(r.full) / ms(none_full),
            ms(r.full) / ms(r.full_ref),
            ms(r.node),
            ms(r.node) / ms(none_node),
            r.node_entries_per_endpoint,
            r.programs,
            r.max_depth
        );
    }
    let _ = writeln!(
        md,
        "\nWhat the kernel spends per packet with admin policies in front: [datapath-admin-policies.md](datapath-admin-policies.md) (new-flow cost within 1.1x of none at 10, 100 and 500 admin policies in the run recorded there)."
    );
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        let one_minute = load.split_whitespace().next().unwrap_or("?");
        let _ = writeln!(
            md,
            "\nLoad average at the end of the run: {one_minute} on {} cores.",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
    }
    std::fs::create_dir_all(root.join("docs"))?;
    std::fs::write(root.join("docs/compiler-admin-policies.md"), &md)?;
    print!("{md}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    if std::env::args().any(|a| a == "--wide-only") {
        return wide_report(&root);
    }
    if std::env::args().any(|a| a == "--admin-only") {
        return admin_report(&root);
    }
    wide_report(&root)?;
    admin_report(&root)?;
    let quick = std::env::args().any(|a| a == "--quick");
    let pods: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 50_000]
    };
    let policies = [100usize, 1_000, 5_000];
    let changes = if quick { 60 } else { 100 };
    let mut rows = Vec::new();
    for &p in pods {
        for &q in &policies {
            rows.push(measure(p, q, changes));
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "# Compiler scaling\n");
    let _ = writeln!(
        md,
        "Measured with `cargo xtask report compiler` on {} cores ({cpu}). Clusters come from `palisade_testing::testgen::scale_cluster` (see its documentation for the mix of namespaces, labels and policies). Ratios are against the reference engine measured in the same run: for a compile, indexing the cluster and answering one flow per endpoint and direction; for a change, rebuilding the reference engine's indexes.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let _ = writeln!(md, "![scaling](compiler-scaling.svg)\n");
    let _ = writeln!(
        md,
        "| pods | policies | full compile | vs reference | node compile (200 endpoints) | vs reference | pod add p50 / p99 | label change p50 / p99 | policy change p50 / p99 | p99 vs reference rebuild | compiled memory | entries per endpoint (node view) | identities | programs | deepest walk |"
    );
    let _ = writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut csv = String::from(
        "pods,policies,full_ms,full_ref_ms,node_ms,node_ref_ms,pod_add_p50_ms,pod_add_p99_ms,label_p50_ms,label_p99_ms,policy_p50_ms,policy_p99_ms,reference_rebuild_ms,compiled_mb,source_mb,entries_per_endpoint,node_entries_per_endpoint\n",
    );
    for r in &rows {
        let inc = |k: ChangeKind| r.incremental.iter().find(|i| i.0 == k).expect("measured");
        let (pa, la, pc) = (
            inc(ChangeKind::PodAdd),
            inc(ChangeKind::LabelChange),
            inc(ChangeKind::PolicyChange),
        );
        let worst = [pa.2, la.2, pc.2].into_iter().max().expect("three");
        let base = median(vec![pa.3, la.3, pc.3]);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.1}x | {:.0} ms | {:.1}x | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.3}x | {:.1} MB (source {:.1} MB) | {:.1} ({:.1}) | {} | {} | {} |",
            r.pods,
            r.policies,
            ms(r.full),
            ms(r.full) / ms(r.full_ref),
            ms(r.node),
            ms(r.node) / ms(r.node_ref),
            ms(pa.1),
            ms(pa.2),
            ms(la.1),
            ms(la.2),
            ms(pc.1),
            ms(pc.2),
            ms(worst) / ms(base),
            r.compiled_bytes as f64 / 1e6,
            r.source_bytes as f64 / 1e6,
            r.entries_per_endpoint,
            r.node_entries_per_endpoint,
            r.identities,
            r.programs,
            r.max_depth
        );
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.3},{:.3},{:.3},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.3},{:.2},{:.2},{:.2},{:.2}",
            r.pods,
            r.policies,
            ms(r.full),
            ms(r.full_ref),
            ms(r.node),
            ms(r.node_ref),
            ms(pa.1),
            ms(pa.2),
            ms(la.1),
            ms(la.2),
            ms(pc.1),
            ms(pc.2),
            ms(base),
            r.compiled_bytes as f64 / 1e6,
            r.source_bytes as f64 / 1e6,
            r.entries_per_endpoint,
            r.node_entries_per_endpoint
        );
    }
    let _ = writeln!(
        md,
        "\nA ratio below 1 means the compiler did the work in less time than the reference engine; the compile ratios compare a full compilation (every program of every endpoint) with the reference engine's much smaller job of indexing and answering one question per endpoint, so they measure what the compiled form costs up front; the change ratios show what incrementality saves against rebuilding.\n"
    );
    std::fs::create_dir_all(root.join("docs"))?;
    std::fs::write(root.join("docs/compiler-scaling.md"), &md)?;
    std::fs::write(root.join("docs/compiler-scaling.csv"), &csv)?;
    std::fs::write(root.join("docs/compiler-scaling.svg"), svg(&rows))?;
    print!("{md}");
    Ok(())
}
