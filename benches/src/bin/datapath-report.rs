//! Writes docs/datapath-cost.md: per-packet cost the TC programs add over a
//! pass-through program, new and established flows, at 10 to 5k policies.
//!
//! `sudo cargo xtask report datapath [-- --quick]` (installs the eBPF toolchain first).
//! `-- --admin-only` measures only the admin-policies table
//! (docs/datapath-admin-policies.md), which the full run writes too.

use std::fmt::Write as _;

use anyhow::Result;
use palisade_benches::dataplane::{PEER_SETS, SIZES};
use palisade_benches::packet_cost::{
    CostRow, measure, measure_admin, measure_peer_sets, measure_with,
};
use policy_bpf::lower::Capacity;

/// Conntrack capacities the report compares (connections).
const CAPACITIES: [u32; 4] = [4_096, 32_768, 262_144, 1_048_576];

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    if let Some(kind) = std::env::args().skip_while(|a| a != "--profile").nth(1) {
        // Only the program runs, for `perf record -a`: new or established
        // flows at 1000 policies for five seconds.
        // `--conntrack N` sizes the table (default: the production default).
        let conntrack = std::env::args()
            .skip_while(|a| a != "--conntrack")
            .nth(1)
            .map(|n| n.parse::<u32>())
            .transpose()?
            .unwrap_or(Capacity::default().conntrack);
        let cap = Capacity {
            conntrack,
            ..Capacity::default()
        };
        let net = palisade_benches::packet_cost::BenchNet::create()?;
        let mut b = palisade_benches::packet_cost::PacketBench::with_capacity(
            &palisade_benches::dataplane::cluster(1000),
            cap,
            &net,
        )?;
        let hook = policy_bpf::datapath::Hook::ToPod;
        net.run(|| {
            let t = std::time::Instant::now();
            while t.elapsed().as_secs() < 5 {
                if kind == "new" {
                    b.new_flows(hook, 1000);
                } else {
                    b.established(hook, 100_000);
                }
            }
        })?;
        return Ok(());
    }
    let (samples, per_round) = if quick { (5, 2_000) } else { (21, 10_000) };
    admin_report(samples, per_round)?;
    if std::env::args().any(|a| a == "--admin-only") {
        return Ok(());
    }
    let mut rows: Vec<CostRow> = Vec::new();
    for n in SIZES {
        eprintln!("measuring {n} policies ({samples} rounds of {per_round} packets)...");
        let r = measure(n, samples, per_round)?;
        eprintln!(
            "  new flow +{:.0} ns, established +{:.0} ns",
            r.new_added(),
            r.established_added()
        );
        rows.push(r);
    }
    // The smallest policy set with thousands of peer sets in front of it:
    // membership rows as wide as they need, one word read per test.
    eprintln!("measuring {PEER_SETS} more peer sets at 10 policies...");
    let wide = measure_peer_sets(10, PEER_SETS, samples, per_round)?;
    eprintln!(
        "  {} peer sets, {} words per row: new flow +{:.0} ns, established +{:.0} ns",
        wide.peer_sets,
        wide.row_words,
        wide.new_added(),
        wide.established_added()
    );
    rows.push(wide);
    // The same flows against conntrack tables of other sizes: what a new
    // flow's misses on a larger table cost.
    let mut by_capacity: Vec<CostRow> = Vec::new();
    for conntrack in CAPACITIES {
        eprintln!("measuring a conntrack table of {conntrack} connections at 1000 policies...");
        let cap = Capacity {
            conntrack,
            ..Capacity::default()
        };
        let r = measure_with(1000, cap, samples, per_round)?;
        eprintln!(
            "  new flow +{:.0} ns, established +{:.0} ns",
            r.new_added(),
            r.established_added()
        );
        by_capacity.push(r);
    }
    let base = rows[0];
    let mut md = String::new();
    writeln!(md, "# Per-packet cost of the TC programs\n")?;
    writeln!(
        md,
        "Measured with `BPF_PROG_TEST_RUN`, timed by the kernel, on the server pod's ingress program \
         (`palisade_to_pod`) with the benchmark policy set (`benches/src/dataplane.rs`: *n* Calico \
         NetworkPolicies all selecting the server, only the last allowing the client). \"Added\" is \
         the time over `palisade_pass`, a program that only passes packets, loaded from the same \
         object and run the same way in the same process: a new flow is one run per packet with a \
         fresh source port each time; an established flow repeats one packet whose connection is \
         tracked. Packets arrive on the server's own interface (one end of a veth pair in a \
         namespace of the benchmark's), as on a node, where the program finds the server's slot \
         in that interface's word rather than in the slots hash. Medians of {samples} rounds of \
         {per_round} packets.\n"
    )?;
    writeln!(
        md,
        "| policies | peer sets | words per row | pass-through, new (ns) | new flow (ns) | added, new (ns) | new vs 10 policies | pass-through, established (ns) | established (ns) | added, established (ns) |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.0} |",
            r.policies,
            r.peer_sets,
            r.row_words,
            r.pass_single,
            r.new_flow,
            r.new_added(),
            r.new_flow / base.new_flow,
            r.pass_repeat,
            r.established,
            r.established_added()
        )?;
    }
    writeln!(
        md,
        "\nThe last row is the 10-policy set after {PEER_SETS} more rules (1,000 a policy, \
         ordered first), each with a selector of its own (`benches/src/dataplane.rs`, \
         `manifests_with_peer_sets`): membership rows of {} words. \
         Goals (issue 4): new-flow cost flat in the number of policies (5k within 1.2x of 10); \
         added cost at most about 300 ns for a new flow and 60 ns for an established one. \
         Issue 16: flat in the number of peer sets too (10k within 1.2x of 10 policies).\n",
        rows.last().map_or(0, |r| r.row_words)
    )?;
    writeln!(
        md,
        "New-flow cost by conntrack capacity, at 1000 policies (the default is {}; tables are \
         flushed whenever they hold half their capacity, the load they are sized for, so every \
         new flow is inserted), next to what this machine takes to read a random cache line of a \
         buffer as large as the tag lines and as the entries (a chain of dependent reads from \
         user space, `benches/src/memory.rs`, measured in the same run): a new flow reads a tag \
         line at random and writes the next entry of its CPU's run of the log (in order, so not \
         a random line). The last column adds the tag-line read to the smallest table's \
         new-flow cost (its arrays stay cached): how much of each row that line explains.\n",
        Capacity::default().conntrack
    )?;
    writeln!(
        md,
        "| conntrack capacity (connections) | IPv4 tag lines (MiB) | random line read there (ns) | IPv4 entries, homes and log (MiB) | random line read there (ns) | added, new (ns) | added, established (ns) | smallest table's new flow + a tag-line read (ns) |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let cached = by_capacity.first().map_or(0.0, |r| r.new_added());
    for r in &by_capacity {
        let ways = policy_bpf::conntrack::ways_for(r.conntrack)? as usize;
        let read = |bytes: usize| palisade_benches::memory::random_line_read_ns(bytes, 2_000_000);
        let entries = ways + policy_bpf_common::ct_log_entries(ways as u32) as usize;
        let (tags_read, entries_read) = (read(ways * 8), read(entries * 64));
        writeln!(
            md,
            "| {} | {:.2} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.conntrack,
            (ways * 8) as f64 / f64::from(1 << 20),
            tags_read,
            (entries * 64) as f64 / f64::from(1 << 20),
            entries_read,
            r.new_added(),
            r.established_added(),
            cached + tags_read
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "Where the time goes (`perf record -a` while `datapath-report --profile new|est` runs, \
         timing with `kernel.bpf_stats_enabled`, and ablations made by editing the program). \
         Conntrack is a set-associative table in array maps: two candidate sets of four ways \
         per connection, and each way's state word (a 16-bit tag of the connection's hash and \
         the index of the entry holding it) in a separate array of tag lines, eight words to a \
         cache line. The entries are a home per way and then a log of a quarter as many, which \
         each CPU fills in order, 64 entries (a 4 KiB page) at a time; whether a log entry is \
         free is read from an owner word per entry, eight to a line in their own array, \
         cleared when the way stops naming the entry. A new flow reads one or two tag lines (4 \
         MB of them at the default 262,144 connections), claims a way there and writes the \
         next free log entry of its CPU (64 bytes for IPv4); an entry whose connection still \
         lives is skipped, and after two the insert writes the way's home instead (counted: \
         `Statistic::CtHome`). Before the log (2026-11-27) every new flow wrote its way's home, a \
         random line of a 32 MB array: a memory latency on every new flow, 446-484 ns added at \
         the default capacity in this report where the log gives 277-349 (three runs). The kernel hash \
         before that spent about 170 ns of a new flow in `htab_map_update_elem` (bucket lock, \
         free-list pop, element write). With a table small enough to stay cached (4,096 \
         connections, in the table above) a new flow costs about 200-230 ns; larger tables add \
         one tag-line read that misses the cache: in the profile, the first load of the tag \
         line takes 38% of the program's samples at 32,768 connections (512 KiB of tag lines) \
         and 51% at the default, against 8% at 4,096. A user-space chain of random reads over \
         512 KiB takes 5.5 ns, with 4 KiB pages as with huge ones (so not the page walks), \
         but two new flows of one tag line come milliseconds apart, and over that time the \
         line does not stay in this VM's caches; writing no entry at all (an ablation) left \
         the cost unchanged. Tried and \
         not kept: the log entry's owner in the entry itself (+150 ns: reading the line before \
         writing it waits for it, which a write alone does not), the owner's state word read \
         on every insert to tell whether its entry is free (+100 ns, a random tag-line read; \
         now read only for an owner left behind), pages holding both tag lines and their ways \
         (400-500 ns), loading the way to be claimed before the walk so its miss overlaps it \
         (no change), tag lines in 16 KiB inner arrays of an array of maps (kmalloc'd, so in \
         memory the kernel maps with huge pages: no change on this VM), a per-CPU LRU \
         (`BPF_F_NO_COMMON_LRU`, 80-250 ns slower than the preallocated hash), a hash without \
         preallocation (about 400 ns slower), the whole walk in `bpf_loop` (+150 ns), loading \
         every way of both sets along with the tag lines so the misses overlap (no change), and \
         hint bytes (one byte per way in an array 64 times smaller than the ways: +40 ns \
         cache-resident, +100 ns a new flow in the veth lab, since claiming a way then needs its \
         state word first, a dependent miss). An established flow is the parse (straight from \
         the packet's linear data), one tag line and one entry (key and value share a cache \
         line for IPv4), the jiffies clock (`bpf_jiffies64`) and two counters.\n"
    )?;
    writeln!(
        md,
        "Reproduce: `sudo cargo xtask report datapath`; \
         the criterion version is `sudo cargo bench -p palisade-benches --bench datapath` after `cargo xtask setup`."
    )?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/datapath-cost.md");
    std::fs::write(&out, md)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// AdminNetworkPolicies in front of 1000 policies: what crossing the
/// kube-admin tier adds to a packet, against the same set without them,
/// measured in the same run.
fn admin_report(samples: usize, per_round: u64) -> Result<()> {
    const POLICIES: usize = 1000;
    let mut rows = Vec::new();
    for anps in [0usize, 10, 100, 500] {
        eprintln!("measuring {POLICIES} policies behind {anps} AdminNetworkPolicies...");
        let r = if anps == 0 {
            measure(POLICIES, samples, per_round)?
        } else {
            measure_admin(POLICIES, anps, samples, per_round)?
        };
        eprintln!(
            "  new flow +{:.0} ns, established +{:.0} ns",
            r.new_added(),
            r.established_added()
        );
        rows.push((anps, r));
    }
    let base = rows[0].1;
    let mut md = String::from("# Per-packet cost behind admin policies\n\n");
    writeln!(
        md,
        "Measured as [datapath-cost.md](datapath-cost.md) (`BPF_PROG_TEST_RUN`, the server's ingress \
         program, medians of {samples} rounds of {per_round} packets), on its {POLICIES}-policy set \
         behind *n* AdminNetworkPolicies and the BaselineAdminNetworkPolicy, all selecting the \
         server (`benches/src/dataplane.rs`, `manifests_with_admin`): each denies one peer group \
         on a port of its own and Passes another, so the client's packets cross the whole \
         kube-admin tier before the default tier allows them. Baseline: the same set without \
         admin policies, in the same run.\n"
    )?;
    writeln!(
        md,
        "| AdminNetworkPolicies | peer sets | added, new (ns) | new vs none | added, established (ns) | established vs none |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for (anps, r) in &rows {
        writeln!(
            md,
            "| {anps} | {} | {:.0} | {:.2}x | {:.0} | {:.2}x |",
            r.peer_sets,
            r.new_added(),
            r.new_flow / base.new_flow,
            r.established_added(),
            r.established / base.established
        )?;
    }
    writeln!(
        md,
        "\nReproduce: `sudo cargo xtask report datapath -- --admin-only`."
    )?;
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/datapath-admin-policies.md");
    std::fs::write(&out, md)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
