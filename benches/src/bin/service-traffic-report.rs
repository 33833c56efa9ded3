//! Real traffic through a ClusterIP: TCP connections per second from a
//! client pod to N ClusterIP Services of 10 endpoints each, balanced by
//! Palisade's service program, by kube-proxy's iptables-mode rules and by
//! its nftables-mode rules for the same Services, against the same client
//! connecting straight to the endpoints on a plain node, at 100, 1k and
//! 10k Services, every number from the same run. Writes
//! `docs/services-traffic.md` and `.svg`.
//!
//! ```text
//! cargo xtask report service-traffic
//! cargo xtask report service-traffic -- --sizes 100,1000 --rounds 1 --secs 0.5
//! ```
//!
//! Loading kube-proxy's rules for 10k Services takes tens of seconds
//! (iptables) to a few minutes (nftables); progress goes to stderr.

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_benches::chart::{line_chart, series_of};
use palisade_benches::packet_cost::median;
use palisade_benches::service_lab::{
    Balancer, CLUSTER_CIDR, ENDPOINT_RANGE, ENDPOINTS, NAT_ENTRIES, ProgramTime, ServiceLab, Via,
    table,
};

/// One size's medians, in [`Balancer::ALL`]'s order (connections/s),
/// then Palisade's lab balancing at `connect()` and to the endpoints
/// ([`PALISADE_VIA`]).
struct Row {
    services: usize,
    rates: Rates,
    /// The lowest and highest of Palisade's rate over direct's in the
    /// same round.
    palisade_rounds: (f64, f64),
    /// Connections made through all the labs.
    connections: u64,
    /// Palisade's connections not recorded for a full NAT table.
    nat_full: u64,
    /// The service program in place, in Palisade's lab, each way of
    /// [`PALISADE_VIA`]: (ns a run, runs a connection).
    program: [ProgramTime; 3],
}

/// A size's median rates (connections/s), by lab and way.
#[derive(Clone, Copy)]
struct Rates {
    direct: f64,
    palisade: f64,
    iptables: f64,
    nft: f64,
    empty: f64,
    /// The NAT-state floor, to the endpoints.
    floor: f64,
    at_connect: f64,
    /// Palisade's lab to the endpoints (its program, no Service).
    untranslated: f64,
}

impl Rates {
    /// From the medians in the measures' order: [`Balancer::ALL`], then
    /// [`PALISADE_VIA`]'s two more ways.
    fn of(m: [f64; 8]) -> Rates {
        let [
            direct,
            palisade,
            iptables,
            nft,
            empty,
            floor,
            at_connect,
            untranslated,
        ] = m;
        Rates {
            direct,
            palisade,
            iptables,
            nft,
            empty,
            floor,
            at_connect,
            untranslated,
        }
    }

    fn all(&self) -> [f64; 8] {
        [
            self.direct,
            self.palisade,
            self.iptables,
            self.nft,
            self.empty,
            self.floor,
            self.at_connect,
            self.untranslated,
        ]
    }

    fn map(&self, f: impl Fn(f64) -> f64) -> Rates {
        Rates::of(self.all().map(f))
    }

    /// Each rate over direct's.
    fn of_direct(&self) -> Rates {
        self.map(|r| r / self.direct)
    }

    /// Microseconds each adds to a connection over direct (1/rate − 1/direct rate).
    fn added_us(&self) -> Rates {
        self.map(|r| 1e6 / r - 1e6 / self.direct)
    }
}

/// Palisade's lab is measured three ways: per packet (as its agent
/// balances pods), at `connect()` (the client's namespace listed, in the
/// hooks' cgroup) and to the endpoints (no Service).
const PALISADE_VIA: [Via; 3] = [Via::Balancer, Via::AtConnect, Via::Endpoints];

/// The value after `flag`, parsed.
fn option<T: std::str::FromStr>(args: &[String], flag: &str) -> Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == flag) {
        Some(i) => Ok(Some(
            args.get(i + 1)
                .with_context(|| format!("{flag} needs a value"))?
                .parse()?,
        )),
        None => Ok(None),
    }
}

/// Network namespaces that exist now.
fn namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Runs `f`, saying every 15 s that it still runs (loading 10k Services'
/// rules takes minutes).
fn with_heartbeat<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let (done, wake) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let start = Instant::now();
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                wake.recv_timeout(Duration::from_secs(15))
            {
                eprintln!("    still loading ({:.0} s)", start.elapsed().as_secs_f64());
            }
        });
        let out = f();
        drop(done);
        out
    })
}

/// Builds the labs for `n` Services side by side, measures them in
/// interleaved rounds (rotating the order, so drift on the machine falls
/// on all alike), tears them down and checks their namespaces are gone.
fn measure(n: usize, rounds: usize, secs: f64) -> Result<Row> {
    let t = Instant::now();
    let table = table(n)?;
    eprintln!(
        "  service table: {} Services, {:.1} s",
        table.services.len(),
        t.elapsed().as_secs_f64()
    );
    let mut labs = Vec::new();
    for b in Balancer::ALL {
        let what = match b {
            Balancer::Direct => "a plain node (no rules, no programs)",
            Balancer::Palisade => {
                "Palisade's service program on the host veths, its socket hooks on a cgroup"
            }
            Balancer::Iptables => "kube-proxy's iptables rules (iptables-restore)",
            Balancer::Nftables => "kube-proxy's nftables rules (nft -f)",
            Balancer::EmptyProgram => "a program that only passes packets on the host veths",
            Balancer::NatFloor => {
                "the NAT-state floor on the host veths (a lookup a packet, two entries a connection)"
            }
        };
        eprintln!("  building {}: {what} ...", b.name());
        let t = Instant::now();
        let lab = with_heartbeat(|| ServiceLab::new(b, &table))
            .with_context(|| format!("{} lab", b.name()))?;
        labs.push(lab);
        eprintln!("    ready in {:.1} s", t.elapsed().as_secs_f64());
    }
    let names: Vec<String> = labs.iter().flat_map(ServiceLab::namespaces).collect();
    // One unmeasured run each first: the first connections of a lab pay
    // for first touches (socket slabs, the acceptor thread, map pages).
    for lab in &labs {
        lab.connects(secs.min(0.5))
            .with_context(|| format!("{} warm-up", lab.balancer().name()))?;
    }
    // Each lab through its balancer, and Palisade's twice more: at
    // connect(), and to the endpoints (its program on the way, no Service).
    let palisade = Balancer::ALL
        .iter()
        .position(|b| *b == Balancer::Palisade)
        .context("no Palisade lab")?;
    let measures: Vec<(usize, Via)> = (0..labs.len())
        .map(|i| (i, Via::Balancer))
        .chain([(palisade, Via::AtConnect), (palisade, Via::Endpoints)])
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); measures.len()];
    let (mut connections, mut nat_full) = (0, 0);
    for round in 0..rounds {
        let mut line = format!("  round {}/{rounds}:", round + 1);
        for k in 0..measures.len() {
            let m = (round + k) % measures.len();
            let (i, via) = measures[m];
            let lab = &labs[i];
            let name = match via {
                Via::Balancer => lab.balancer().name(),
                Via::AtConnect => "palisade-at-connect",
                Via::Endpoints => "palisade-to-endpoints",
            };
            let run = lab
                .connects_via(via, secs)
                .with_context(|| format!("{name} with {n} Services"))?;
            connections += run.connects.connected;
            nat_full += run.nat_full;
            samples[m].push(run.connects.rate());
            let _ = write!(line, " {name} {:.0}/s", run.connects.rate());
        }
        eprintln!("{line}");
    }
    // Then the program's own time in place, in runs of their own (the
    // kernel's statistics cost each run two clock reads).
    let mut program = [ProgramTime::default(); 3];
    for (slot, via) in program.iter_mut().zip(PALISADE_VIA) {
        *slot = labs[palisade]
            .program_time(via, secs)?
            .context("Palisade's lab has no datapath")?;
    }
    eprintln!(
        "  in place: the service program {:.0} ns a run per packet ({:.1} runs a connection), {:.0} ns at connect() (and the hook {:.0} ns a connection), {:.0} ns to the endpoints",
        program[0].ns_a_run,
        program[0].runs_a_connection,
        program[1].ns_a_run,
        program[1].connect_hook_ns,
        program[2].ns_a_run
    );
    eprintln!("  tearing down ...");
    drop(labs);
    let left: Vec<String> = namespaces()?
        .into_iter()
        .filter(|ns| names.contains(ns))
        .collect();
    if !left.is_empty() {
        bail!("namespaces left behind: {}", left.join(", "));
    }
    let by_round: Vec<f64> = samples[1]
        .iter()
        .zip(&samples[0])
        .map(|(p, d)| p / d)
        .collect();
    let palisade_rounds = (
        by_round.iter().copied().fold(f64::INFINITY, f64::min),
        by_round.iter().copied().fold(0.0, f64::max),
    );
    let mut rates = [0.0; 8];
    for (r, s) in rates.iter_mut().zip(samples.iter_mut()) {
        *r = median(s);
    }
    Ok(Row {
        services: n,
        rates: Rates::of(rates),
        palisade_rounds,
        connections,
        nat_full,
        program,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = match option::<String>(&args, "--sizes")? {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![100, 1_000, 10_000],
    };
    let rounds: usize = option(&args, "--rounds")?.unwrap_or(3).max(1);
    let secs: f64 = option(&args, "--secs")?.unwrap_or(2.0);
    for tool in ["iptables-restore", "nft"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!(
                "{tool} is missing: run `sudo cargo xtask report service-traffic`, which installs iptables and nftables"
            );
        }
    }
    let mut rows = Vec::new();
    for n in &sizes {
        eprintln!(
            "service traffic: {n} Services x {ENDPOINTS} endpoints, {rounds} rounds of {secs} s ..."
        );
        let row = measure(*n, rounds, secs)?;
        let f = row.rates.of_direct();
        eprintln!(
            "  of direct: Palisade {:.2}, iptables {:.2}, nftables {:.2}; Palisade at connect() {:.2}, its program with no Service {:.2}; an empty program {:.2}, the NAT-state floor {:.2}",
            f.palisade, f.iptables, f.nft, f.at_connect, f.untranslated, f.empty, f.floor
        );
        rows.push(row);
    }
    let version = palisade_benches::tool_version;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");

    let mut md = String::from("# Services: TCP connections through a ClusterIP\n\n");
    let _ = writeln!(
        md,
        "`cargo xtask report service-traffic` (benches/src/bin/service-traffic-report.rs, \
         the lab in benches/src/service_lab.rs). A node namespace with a client pod and a server pod \
         on veths (`palisade_testing::netns::Topology`); N ClusterIP Services (port 80/TCP), {ENDPOINTS} \
         endpoints each (target port 8080), every endpoint address an address of the server pod \
         (an AnyIP route for {ENDPOINT_RANGE}, which the node routes to it) where one socket listens \
         on 0.0.0.0:8080. The client opens TCP connections and resets each at once (`SO_LINGER` 0: \
         a new flow each, no TIME_WAIT), one at a time from one thread, for {secs} s a round; \
         connections/s, median of {rounds} rounds after a 0.5 s warm-up; the six labs exist side by \
         side and the rounds alternate between them (and Palisade's two more ways below), rotating \
         the order. The same Services, balanced four ways, and two floors:\n\n\
         - **direct** (the baseline): a plain node, no rules, no programs; the client connects \
         straight to the endpoints' addresses, in turn over every endpoint of every Service.\n\
         - **Palisade**: `palisade_service` at the TC ingress of both host veths (no policy program, \
         so it applies both halves of the NAT: the DNAT on the way in, the frontend restored on the \
         reply), the table written by `Datapath::set_services`, every packet translated, as its \
         agent balances pods; NAT table sized for every connection of the run ({} connections), \
         none unrecorded: {}.\n\
         - **iptables**: kube-proxy's rules for the same Services as its iptables proxier writes \
         them (`KUBE-SERVICES` → `KUBE-SVC-*` with `statistic` probabilities → `KUBE-SEP-*` DNAT; \
         benches/src/kube_proxy.rs), loaded with `iptables-restore` in the node namespace.\n\
         - **nftables**: the same Services as its nftables proxier writes them (the `service-ips` \
         verdict map → `service-*` chains with `numgen random mod 10 vmap` → `endpoint-*` DNAT), \
         loaded with `nft -f`.\n\
         - **empty program** (the floor of any per-packet design): a plain node as direct, with \
         `palisade_pass` (a program that returns at once) where Palisade's lab has its service \
         program; the client connects to the endpoints, as in direct.\n\
         - **NAT-state floor** (the floor of any per-packet design that keeps conntrack's state): \
         as the empty program, with `palisade_nat_floor` in its place: each packet parsed and its \
         tuple looked up in a NAT table as large as Palisade's lab's, two entries recorded for \
         each new connection (its way there and its way back, as Palisade records one), no \
         decision, nothing rewritten (checked: connections recorded, none for a full table).\n\n\
         In the three balanced labs the client connects to the ClusterIPs, in turn over all N. The \
         cluster CIDR ({CLUSTER_CIDR}) holds the client, so nothing is masqueraded (pod to Service). \
         Every round is checked: the server accepted every connection the client opened, from the \
         client's own address, at an endpoint address (sampled: every 256th connection's local \
         address), else the report fails. The rule-based labs' conntrack limit is raised to hold \
         every flow of the run. Palisade's lab is measured two more ways. **Palisade at connect()**: \
         its socket hooks are attached to a cgroup of their own and the client's namespace is \
         listed as a pod's (`Datapath::set_socket_netns`); the client joins that cgroup, so each \
         connection is pointed at a backend in `connect()` (Calico's \
         `bpfConnectTimeLoadBalancing: TCP`) and leaves for it directly (checked: every connection \
         balanced there, no packet translated). **Palisade, no Service**: the client connects to \
         the endpoints as in direct: the program runs on every packet and finds no connection and \
         no frontend (checked: it translated none), what it costs traffic it does not balance.\n",
        NAT_ENTRIES / 2,
        rows.iter().map(|r| r.nat_full).sum::<u64>(),
    );
    md.push_str(
        "| Services | direct /s | Palisade /s | iptables /s | nftables /s | Palisade/direct | iptables/direct | nft/direct | Palisade/direct by round | Palisade at connect() /s | its /direct | Palisade, no Service /s | its /direct | empty program /s | its /direct | NAT-state floor /s | its /direct |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let (q, f) = (r.rates, r.rates.of_direct());
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | **{:.2}** | {:.2} | {:.2} | {:.2}-{:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
            r.services,
            q.direct,
            q.palisade,
            q.iptables,
            q.nft,
            f.palisade,
            f.iptables,
            f.nft,
            r.palisade_rounds.0,
            r.palisade_rounds.1,
            q.at_connect,
            f.at_connect,
            q.untranslated,
            f.untranslated,
            q.empty,
            f.empty,
            q.floor,
            f.floor
        );
    }
    md.push_str(
        "\nThe ratios are of the medians; \"by round\" is Palisade's rate over direct's within each \
         round (the two labs measured back to back): how far one ratio moves on this machine, from \
         round to round and, in repeated runs of this report, about as much from one build of the \
         labs to the next.\n\n\
         Goal (issue 21): Palisade at least 0.9 of direct at every size.\n\n\
         What a connection costs over direct, in microseconds (1/rate − 1/direct rate):\n\n\
         | Services | direct (µs a connection) | Palisade adds | Palisade at connect() adds | Palisade, no Service, adds | empty program adds | NAT-state floor adds | iptables adds | nftables adds |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let a = r.rates.added_us();
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.services,
            1e6 / r.rates.direct,
            a.palisade,
            a.at_connect,
            a.untranslated,
            a.empty,
            a.floor,
            a.iptables,
            a.nft
        );
    }
    md.push_str(
        "\nWhere Palisade's time goes: its service program in place, from the kernel's run-time \
         statistics (`BPF_ENABLE_STATS`, on for one more run of each kind after the rounds, as they \
         add two clock reads to every run), and at `connect()` its hook's, against what the \
         connection costs over direct above:\n\n\
         | Services | per packet: ns a run | runs a connection | µs a connection | Palisade adds (µs) | at connect(): the hook (ns) | the program, ns a run | µs a connection, both | at connect() adds (µs) | to the endpoints: ns a run | µs a connection | no Service adds (µs) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let a = r.rates.added_us();
        let [packet, connect, endpoints] = r.program;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} |",
            r.services,
            packet.ns_a_run,
            packet.runs_a_connection,
            packet.ns_a_run * packet.runs_a_connection / 1e3,
            a.palisade,
            connect.connect_hook_ns,
            connect.ns_a_run,
            (connect.ns_a_run * connect.runs_a_connection + connect.connect_hook_ns) / 1e3,
            a.at_connect,
            endpoints.ns_a_run,
            endpoints.ns_a_run * endpoints.runs_a_connection / 1e3,
            a.untranslated,
        );
    }
    let _ = writeln!(
        md,
        "\n![connections per second](services-traffic.svg)\n\n\
         Reading it: a connection here is a handshake and a reset, four packets, the worst case \
         for a balancer that works per packet; the baseline's whole connection (both TCP stacks, \
         two veth crossings each way, the node's forwarding) is what the others are measured \
         against, so 0.9 allows a ninth of it. Palisade runs its program on each of the four \
         packets (SYN, ACK and RST on the client's veth, SYN-ACK on the server's): once as a new \
         connection (the Service found in hash maps, a backend picked, two NAT entries recorded in \
         an LRU, the DNAT) and three times as an established one (a NAT entry read, the rewrite). \
         The table above times those runs in place, where the caches are colder than under \
         `BPF_PROG_TEST_RUN` ([services-per-packet.md](services-per-packet.md) times the same \
         program on a packet already in place); compare its µs a connection with what Palisade \
         adds. To the endpoints, the address filter spares most packets the hash lookups (the \
         SYN-ACK, from a backend, and the SYN, to one, still look up the NAT table); what is left \
         is the parse, the filter's words and the hook (an address outside the service ranges and \
         no frontend's needs no address lookup). None of it grows with the number of \
         Services beyond cache pressure. At `connect()` the program still runs on every packet \
         (as to the endpoints) and the hook adds its own decision, the backend picked and the \
         frontend kept in the socket's storage for `getpeername()`. The NAT-state floor does \
         only the table's part of a per-packet design (a lookup on every packet, two entries for \
         a new connection, in an LRU as large as Palisade's): its distance from the empty program \
         is what keeping conntrack's state per packet costs before any decision or rewrite, and \
         Palisade's distance from it is Palisade's own work. \
         kube-proxy's rules run kernel conntrack for every connection (an entry created, \
         confirmed, NATed both ways, and kept 10 s after the reset) whichever proxier wrote them; the \
         nftables proxier then finds the Service in one verdict-map lookup, so it stays flat, \
         while the iptables proxier matches the first packet against the `KUBE-SERVICES` rules \
         one after another (on average half of the N), so it falls as N grows. {} connections \
         in all ({} rounds of each of the six labs, and of Palisade's at connect() and to the endpoints, at {} sizes).\n\n\
         Tools: {}; {}. Kernel {}, {cores} cores; load average at the end of the run {load} \
         (loading the largest size's rules included). \
         The machine was shared with other work: the ratios, measured in alternating rounds, \
         are the point; the absolute rates are this machine's.",
        rows.iter().map(|r| r.connections).sum::<u64>(),
        rounds,
        rows.len(),
        version("iptables-restore"),
        version("nft"),
        kernel.trim(),
    );
    type Column = fn(&Row) -> f64;
    let columns: [(&str, &'static str, bool, Column); 8] = [
        ("direct (no Service)", "#7f7f7f", true, |r| r.rates.direct),
        ("Palisade", "#1f77b4", false, |r| r.rates.palisade),
        ("Palisade at connect()", "#9467bd", false, |r| {
            r.rates.at_connect
        }),
        ("Palisade's program, no Service", "#1f77b4", true, |r| {
            r.rates.untranslated
        }),
        ("an empty program (floor)", "#bcbd22", true, |r| {
            r.rates.empty
        }),
        ("the NAT-state floor", "#8c564b", true, |r| r.rates.floor),
        ("kube-proxy iptables", "#d62728", false, |r| {
            r.rates.iptables
        }),
        ("kube-proxy nftables", "#2ca02c", false, |r| r.rates.nft),
    ];
    let series = series_of(&columns, &rows, |r| r.services as f64);
    let y_max = rows.iter().flat_map(|r| r.rates.all()).fold(0.0, f64::max) * 1.15;
    let svg = line_chart(
        "TCP connections through a ClusterIP",
        "Services (10 endpoints each)",
        "connections/s",
        &series,
        y_max,
        None,
    );
    palisade_benches::write_docs("services-traffic", &md, &svg)?;
    Ok(())
}
