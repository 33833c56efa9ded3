//! Writes docs/datapath-vs-iptables.{md,svg}: real traffic through veth pairs
//! with no policy, Calico-style iptables rules, and Palisade's TC programs,
//! at 10 to 5k policies; every rate relative to the no-policy baseline
//! measured in the same run.
//!
//! `sudo cargo xtask report veth [-- --quick]` (installs what it needs: the
//! eBPF toolchain, iptables and ipset). `-- --profile palisade|forwarded|iptables|baseline|pass-through`
//! runs only UDP new flows in one lab for five seconds, for `perf record -a`;
//! add `--times` for the programs' nanoseconds per run in six one-second runs.

use std::fmt::Write as _;

use anyhow::Result;
use palisade_benches::chart::{Series, line_chart};
use palisade_benches::dataplane::SIZES;
use palisade_benches::packet_cost::median;
use palisade_benches::veth::{Lab, Mode};

/// Median rates of one mode at one size: UDP new flows/s, TCP connects/s,
/// bulk bytes/s.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    udp: f64,
    tcp: f64,
    bulk: f64,
}

/// The labs of a run, in the order of [`measure`]'s result.
const MODES: [Mode; 5] = [
    Mode::Baseline,
    Mode::Iptables,
    Mode::Palisade,
    Mode::PalisadeForwarded,
    Mode::PassThrough,
];

/// Nanoseconds per run of the programs during UDP new flows: Palisade's
/// from the pod (with local delivery: both judgements), and without local
/// delivery from the pod and to the pod; the pass-through program.
#[derive(Debug, Clone, Copy, Default)]
struct ProgramTimes {
    delivered: f64,
    from_pod: f64,
    to_pod: f64,
    pass: f64,
}

/// Medians per mode, measured in interleaved rounds (the labs exist side
/// by side; each round runs every workload in every mode, rotating the
/// order) so drift and warm-up affect all modes alike; then one more UDP
/// run in the labs with programs, timing them.
fn measure(n: usize, rounds: usize, secs: f64) -> Result<([Rates; 5], u64, ProgramTimes)> {
    let modes = MODES;
    let labs: Vec<Lab> = modes
        .iter()
        .map(|m| Lab::new(*m, n))
        .collect::<Result<_>>()?;
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); modes.len()];
    for round in 0..rounds.max(1) {
        for k in 0..modes.len() {
            let i = (round + k) % modes.len();
            let lab = &labs[i];
            let what =
                |e: anyhow::Error| e.context(format!("{} with {n} policies", modes[i].name()));
            samples[i].0.push(lab.udp_new_flows(secs).map_err(what)?);
            samples[i].1.push(lab.tcp_connect_rate(secs).map_err(what)?);
            samples[i].2.push(lab.bulk(secs).map_err(what)?);
        }
    }
    let ct_full = labs[2].conntrack_full()? + labs[3].conntrack_full()?;
    let (delivered, _) = labs[2].udp_program_times(secs)?.unwrap_or_default();
    let (from_pod, to_pod) = labs[3].udp_program_times(secs)?.unwrap_or_default();
    let (pass, _) = labs[4].udp_program_times(secs)?.unwrap_or_default();
    let times = ProgramTimes {
        delivered,
        from_pod,
        to_pod,
        pass,
    };
    let mut out = [Rates::default(); 5];
    for (o, (u, t, b)) in out.iter_mut().zip(samples.iter_mut()) {
        *o = Rates {
            udp: median(u),
            tcp: median(t),
            bulk: median(b),
        };
    }
    Ok((out, ct_full, times))
}

/// Policies, then baseline, iptables, palisade, palisade without local
/// delivery and pass-through rates.
type Row = (usize, Rates, Rates, Rates, Rates, Rates);

/// The iptables lab's commands, checked before anything is built.
fn check_tools() -> Result<()> {
    let missing: Vec<&str> = [("ipset", "ipset"), ("iptables-restore", "iptables")]
        .into_iter()
        .filter(|(cmd, _)| {
            std::process::Command::new(cmd)
                .arg("--version")
                .output()
                .is_err()
        })
        .map(|(_, package)| package)
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the iptables lab needs {}: run `sudo cargo xtask report veth`, which installs them, or `apt-get install {}`",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    check_tools()?;
    if let Some(mode) = std::env::args().skip_while(|a| a != "--profile").nth(1) {
        // Only one workload, for `perf record -a`: UDP new flows through the
        // palisade (or iptables, or baseline) lab at 1000 policies for 5 s.
        let mode = match mode.as_str() {
            "iptables" => Mode::Iptables,
            "forwarded" => Mode::PalisadeForwarded,
            "baseline" => Mode::Baseline,
            "pass-through" => Mode::PassThrough,
            _ => Mode::Palisade,
        };
        let lab = Lab::new(mode, 1000)?;
        if std::env::args().any(|a| a == "--times") {
            for _ in 0..6 {
                let t = lab.udp_program_times(1.0)?;
                eprintln!("{} program ns/run: {t:?}", mode.name());
            }
            return Ok(());
        }
        let rate = lab.udp_new_flows(5.0)?;
        eprintln!("{} UDP new flows/s: {rate:.0}", mode.name());
        return Ok(());
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, secs) = if quick { (1, 0.5) } else { (5, 1.5) };
    let mut rows: Vec<Row> = Vec::new();
    let mut times: Vec<ProgramTimes> = Vec::new();
    let mut ct_full_total = 0u64;
    for n in SIZES {
        eprintln!(
            "{n} policies: baseline, iptables, palisade, palisade with node forwarding, pass-through ({rounds} rounds of {secs} s each)..."
        );
        let ([base, ipt, pal, fwd, pass], ct_full, t) = measure(n, rounds, secs)?;
        ct_full_total += ct_full;
        times.push(t);
        eprintln!(
            "  UDP new flows: iptables {:.2}, palisade {:.2} (node forwarding {:.2}), pass-through {:.2}; TCP connects: iptables {:.2}, palisade {:.2}; bulk: iptables {:.2}, palisade {:.2} (of baseline)",
            ipt.udp / base.udp,
            pal.udp / base.udp,
            fwd.udp / base.udp,
            pass.udp / base.udp,
            ipt.tcp / base.tcp,
            pal.tcp / base.tcp,
            ipt.bulk / base.bulk,
            pal.bulk / base.bulk
        );
        rows.push((n, base, ipt, pal, fwd, pass));
    }
    let mut md = String::new();
    writeln!(
        md,
        "# Palisade's TC programs and Calico-style iptables on real traffic\n"
    )?;
    writeln!(
        md,
        "Client and server pods are network namespaces joined by veth pairs to a node namespace \
         (`policy-bpf/src/netns.rs`). The node enforces the benchmark policy set \
         (`benches/src/dataplane.rs`: *n* Calico NetworkPolicies all selecting the server, only the \
         last allowing the client) either with iptables rules and ipsets laid out as Calico's \
         iptables mode does (`benches/src/veth.rs`: conntrack ESTABLISHED accept first, a chain per \
         policy, a rule per policy rule, an ipset per selector) or with Palisade's TC programs; the \
         baseline has no policy. Each number is the rate relative to the baseline measured in the \
         same run (medians of {rounds} rounds of {secs} s). Palisade runs as a node would \
         (`policy_bpf_common::LocalEndpoint`): a datagram from one pod to another goes straight \
         into the receiving pod (`bpf_redirect_peer`) once the sender's egress and the \
         receiver's ingress policy allow it, as Cilium does, instead of through the node's IP \
         forwarding; a second Palisade lab leaves forwarding to the node, so the receiver's \
         interface judges on the way out (the datapath before 2026-11-27). A last lab attaches \
         a program that passes every packet where Palisade's programs go: what the TC hooks \
         cost before any policy.\n"
    )?;
    writeln!(
        md,
        "- **UDP new flows**: every datagram a fresh 5-tuple (changing source and destination ports), datagrams/s reaching the server. \
         A lab's rounds continue one sequence of {} flows, so no datagram reuses a flow its conntrack \
         still tracks (until 2026-11-26 each round restarted the sequence, and Palisade passed the repeats \
         as established: its earlier UDP figures, 0.83-0.88, were too high).",
        palisade_benches::veth::UDP_FLOWS
    )?;
    writeln!(
        md,
        "- **TCP connect**: connections/s opened and reset, each a fresh 5-tuple."
    )?;
    writeln!(md, "- **bulk**: one established TCP stream, bytes/s.\n")?;
    writeln!(md, "![relative throughput](datapath-vs-iptables.svg)\n")?;
    writeln!(
        md,
        "| policies | baseline UDP new flows/s | iptables | palisade | node fwd | pass-through | baseline TCP connects/s | iptables | palisade | node fwd | pass-through | baseline bulk Gbit/s | iptables | palisade | node fwd | pass-through |"
    )?;
    writeln!(
        md,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for (n, b, i, p, f, t) in &rows {
        writeln!(
            md,
            "| {n} | {:.0} | {:.2} | **{:.2}** | {:.2} | {:.2} | {:.0} | {:.2} | **{:.2}** | {:.2} | {:.2} | {:.2} | {:.2} | **{:.2}** | {:.2} | {:.2} |",
            b.udp,
            i.udp / b.udp,
            p.udp / b.udp,
            f.udp / b.udp,
            t.udp / b.udp,
            b.tcp,
            i.tcp / b.tcp,
            p.tcp / b.tcp,
            f.tcp / b.tcp,
            t.tcp / b.tcp,
            b.bulk * 8.0 / 1e9,
            i.bulk / b.bulk,
            p.bulk / b.bulk,
            f.bulk / b.bulk,
            t.bulk / b.bulk
        )?;
    }
    writeln!(
        md,
        "\nBoth conntrack tables have room for every flow of a run ({} connections; Palisade's \
         set-associative tables hold them in twice as many ways); allowed connections that \
         found their conntrack sets full in Palisade: {ct_full_total}.",
        palisade_benches::veth::CONNTRACK_ENTRIES
    )?;
    writeln!(
        md,
        "\nWhere a UDP new flow's time goes, in nanoseconds per datagram: what the goal allows \
         over the baseline (a rate of 0.9: a ninth of the baseline's time per datagram), what \
         each lab adds (from the rates above), and what the programs take a run, from the \
         kernel's run-time statistics during one more run (`BPF_ENABLE_STATS`, which adds two \
         clock reads a run; the rates above are measured without it). With node forwarding \
         Palisade runs two programs on every datagram (the client's egress on its interface, \
         then the server's ingress on the server's); with local delivery both judgements run \
         on the client's interface, the second in a program the first tail-calls, and the \
         kernel counts both in the first's time. The pass-through lab runs its program in the \
         two places of node forwarding.\n"
    )?;
    writeln!(
        md,
        "| policies | allowed at 0.9 | palisade adds | node fwd adds | pass-through adds | palisade: from_pod run (both judgements) | node fwd: from_pod run | node fwd: to_pod run | pass-through run |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for ((n, b, _, p, f, t), pt) in rows.iter().zip(&times) {
        let per = |rate: f64| 1e9 / rate;
        writeln!(
            md,
            "| {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            per(b.udp) / 9.0,
            per(p.udp) - per(b.udp),
            per(f.udp) - per(b.udp),
            per(t.udp) - per(b.udp),
            pt.delivered,
            pt.from_pod,
            pt.to_pod,
            pt.pass
        )?;
    }
    writeln!(
        md,
        "\nGoal (issue 4): at least 0.9 of the baseline for new flows at every size.\n\n\
         Reproduce: `sudo cargo xtask report veth` \
         (add `-- --quick` for a one-round smoke run)."
    )?;
    let series = |name: &str, color: &'static str, dashed: bool, f: &dyn Fn(&Row) -> f64| Series {
        name: name.to_string(),
        color,
        dashed,
        points: rows.iter().map(|r| (r.0 as f64, f(r))).collect(),
    };
    let svg = line_chart(
        "New-flow and bulk rates relative to no policy",
        "policies selecting the server (log scale)",
        "rate / no-policy rate",
        &[
            series("palisade UDP new", "#1f77b4", false, &|r| r.3.udp / r.1.udp),
            series("palisade TCP connect", "#2ca02c", false, &|r| {
                r.3.tcp / r.1.tcp
            }),
            series("palisade bulk", "#9467bd", false, &|r| r.3.bulk / r.1.bulk),
            series("iptables UDP new", "#1f77b4", true, &|r| r.2.udp / r.1.udp),
            series("iptables TCP connect", "#2ca02c", true, &|r| {
                r.2.tcp / r.1.tcp
            }),
            series("iptables bulk", "#9467bd", true, &|r| r.2.bulk / r.1.bulk),
            series(
                "palisade UDP new, node forwarding",
                "#17becf",
                false,
                &|r| r.4.udp / r.1.udp,
            ),
            series("pass-through UDP new", "#7f7f7f", true, &|r| {
                r.5.udp / r.1.udp
            }),
        ],
        1.2,
        Some((0.9, "goal 0.9")),
    );
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::write(docs.join("datapath-vs-iptables.md"), md)?;
    std::fs::write(docs.join("datapath-vs-iptables.svg"), svg)?;
    eprintln!("wrote docs/datapath-vs-iptables.{{md,svg}}");
    Ok(())
}
