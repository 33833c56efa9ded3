//! Per-packet cost of the TC programs through `BPF_PROG_TEST_RUN`, timed by
//! the kernel itself (so syscall overhead is not counted), next to a
//! program that only passes packets, loaded from the same object and run
//! the same way in the same process. Packets arrive on the server pod's own
//! interface (a veth in a namespace of the benchmark's), as they do on a
//! node, where each pod has its host-side veth.

use std::time::Duration;

use palisade_testing::kernel_engine::KernelEngine;
use palisade_testing::netns::{Netns, ip_batch};
use policy_bpf::datapath::Hook;
use policy_bpf::lower::Capacity;
use policy_bpf::packet;
use policy_bpf_common::Config;
use policy_core::Flow;
use policy_core::net::Protocol;

use crate::dataplane::{CLIENT, SERVER, TCP_PORT};

/// A network namespace with a veth pair, one end standing for the server
/// pod's host-side interface. The benchmark binds the server to it, as an agent
/// binds each pod to its own interface, and delivers its packets on it:
/// with every endpoint on loopback (the kernel engine's default) the
/// program would find the server's slot in the slots hash, where on a node
/// it finds it in its interface's word.
#[derive(Debug)]
pub struct BenchNet {
    ns: Netns,
    server_ifindex: u32,
}

impl BenchNet {
    /// Creates the namespace and the interface (needs root).
    pub fn create() -> anyhow::Result<BenchNet> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("palisade-bench-{}-{n}", std::process::id());
        let ns = Netns::create(&name)?;
        ip_batch(
            Some(&name),
            &[
                "link add server0 type veth peer name server0-pod".to_string(),
                "link set server0 up".to_string(),
                "link set server0-pod up".to_string(),
            ],
        )?;
        let server_ifindex = ns.ifindex("server0")?;
        Ok(BenchNet { ns, server_ifindex })
    }

    /// Moves the calling thread into the namespace for good (a benchmark
    /// process's main thread).
    pub fn enter(&self) -> anyhow::Result<()> {
        Ok(self.ns.enter()?)
    }

    /// Runs `f` on a thread inside the namespace, where benchmark packets
    /// must be run (the kernel finds their interface there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        Ok(self.ns.run(f)?)
    }
}

/// The server's ingress program loaded with a policy set.
#[derive(Debug)]
pub struct PacketBench {
    engine: KernelEngine,
    /// The server's interface (in a [`BenchNet`]).
    ifindex: u32,
    next_port: u16,
    /// New flows since conntrack was last flushed, and how many it takes.
    since_flush: u32,
    flush_every: u32,
}

/// Source ports cycle through this range; conntrack is flushed when they
/// wrap, so every "new flow" really is one, and whenever the table holds
/// half its capacity (the load it is sized for), so new flows are inserted
/// as in production instead of finding their sets full.
const PORTS: std::ops::Range<u16> = 1024..65000;

impl PacketBench {
    /// Loads the programs with `cluster` compiled and lowered, the server
    /// bound to `net`'s interface (run the bench inside `net`). Allowed
    /// flows are not sampled into events, as in production.
    pub fn new(cluster: &policy_core::Cluster, net: &BenchNet) -> anyhow::Result<PacketBench> {
        Self::with_capacity(cluster, Capacity::default(), net)
    }

    /// [`PacketBench::new`] with maps sized by `cap`.
    pub fn with_capacity(
        cluster: &policy_core::Cluster,
        cap: Capacity,
        net: &BenchNet,
    ) -> anyhow::Result<PacketBench> {
        let server: policy_core::model::EndpointKey =
            "bench/server".parse().map_err(anyhow::Error::msg)?;
        let engine = KernelEngine::with_interfaces(cluster, cap, |k| {
            if *k == server { net.server_ifindex } else { 1 }
        })
        .map_err(|e| anyhow::anyhow!("loading the datapath: {e}"))?;
        engine
            .with_datapath(|dp| dp.set_config(Config::default()))
            .map_err(|e| anyhow::anyhow!("{e}"))??;
        Ok(PacketBench {
            engine,
            ifindex: net.server_ifindex,
            next_port: PORTS.start,
            since_flush: 0,
            flush_every: (cap.conntrack / 2).max(1),
        })
    }

    fn syn(sport: u16) -> Vec<u8> {
        packet::build(&Flow::ports(
            CLIENT.parse().expect("ip"),
            SERVER.parse().expect("ip"),
            Protocol::TCP,
            sport,
            TCP_PORT,
        ))
    }

    /// Kernel time for `iters` packets of fresh connections (a new source
    /// port each) through `hook`.
    pub fn new_flows(&mut self, hook: Hook, iters: u64) -> Duration {
        let mut total = 0u64;
        for _ in 0..iters {
            if self.next_port >= PORTS.end || self.since_flush >= self.flush_every {
                if self.next_port >= PORTS.end {
                    self.next_port = PORTS.start;
                }
                self.since_flush = 0;
                self.engine.flush();
            }
            self.since_flush += 1;
            let pkt = Self::syn(self.next_port);
            self.next_port += 1;
            let ifindex = self.ifindex;
            let r = self
                .engine
                .with_datapath(|dp| dp.run_on(hook, &pkt, 1, ifindex))
                .expect("datapath lock")
                .expect("test run");
            total += r.duration_ns;
        }
        Duration::from_nanos(total)
    }

    /// Kernel time for `iters` packets of one established connection.
    pub fn established(&mut self, hook: Hook, iters: u64) -> Duration {
        let pkt = Self::syn(PORTS.end);
        let ifindex = self.ifindex;
        let dp = |f: &mut dyn FnMut(&mut policy_bpf::datapath::Datapath) -> u64| {
            self.engine.with_datapath(|d| f(d)).expect("datapath lock")
        };
        // First packet creates the entry; the timed ones find it.
        dp(&mut |d| {
            d.run_on(hook, &pkt, 1, ifindex)
                .expect("test run")
                .duration_ns
        });
        let per = dp(&mut |d| {
            d.run_on(
                hook,
                &pkt,
                iters.clamp(1, u64::from(u32::MAX)) as u32,
                ifindex,
            )
            .expect("test run")
            .duration_ns
        });
        Duration::from_nanos(per * iters)
    }

    /// Whether the benchmark packet is allowed (it must be, or the numbers
    /// would measure drops).
    pub fn allowed(&mut self) -> bool {
        let pkt = Self::syn(PORTS.end - 1);
        let ifindex = self.ifindex;
        self.engine.flush();
        self.engine
            .with_datapath(|d| d.run_on(Hook::ToPod, &pkt, 1, ifindex))
            .expect("datapath lock")
            .expect("test run")
            .passed()
    }
}

/// One row of the report: nanoseconds per packet.
#[derive(Debug, Clone, Copy)]
pub struct CostRow {
    /// Policies.
    pub policies: usize,
    /// Conntrack capacity (connections).
    pub conntrack: u32,
    /// Peer sets (membership bits) the compiled policy set has.
    pub peer_sets: usize,
    /// Words per membership row the lowering laid out.
    pub row_words: u32,
    /// Pass-through program, new-flow method (one run per packet).
    pub pass_single: f64,
    /// Pass-through program, repeated run (established method).
    pub pass_repeat: f64,
    /// New flow through the server's ingress program.
    pub new_flow: f64,
    /// Established flow.
    pub established: f64,
}

impl CostRow {
    /// What policy adds to a new flow.
    pub fn new_added(&self) -> f64 {
        self.new_flow - self.pass_single
    }
    /// What policy adds to an established flow.
    pub fn established_added(&self) -> f64 {
        self.established - self.pass_repeat
    }
}

/// Measures one policy count: `samples` rounds of `per_round` packets each,
/// alternating programs so drift affects all alike; medians of the rounds.
pub fn measure(policies: usize, samples: usize, per_round: u64) -> anyhow::Result<CostRow> {
    measure_with(policies, Capacity::default(), samples, per_round)
}

/// [`measure`] with maps sized by `cap`.
pub fn measure_with(
    policies: usize,
    cap: Capacity,
    samples: usize,
    per_round: u64,
) -> anyhow::Result<CostRow> {
    measure_cluster(
        &crate::dataplane::cluster(policies),
        policies,
        cap,
        samples,
        per_round,
    )
}

/// [`measure`] on the policy set with `sets` more peer sets
/// ([`crate::dataplane::cluster_with_peer_sets`]).
pub fn measure_peer_sets(
    policies: usize,
    sets: usize,
    samples: usize,
    per_round: u64,
) -> anyhow::Result<CostRow> {
    measure_cluster(
        &crate::dataplane::cluster_with_peer_sets(policies, sets),
        policies,
        Capacity::default(),
        samples,
        per_round,
    )
}

/// [`measure`] on the policy set behind `anps` AdminNetworkPolicies
/// ([`crate::dataplane::cluster_with_admin`]).
pub fn measure_admin(
    policies: usize,
    anps: usize,
    samples: usize,
    per_round: u64,
) -> anyhow::Result<CostRow> {
    measure_cluster(
        &crate::dataplane::cluster_with_admin(policies, anps),
        policies,
        Capacity::default(),
        samples,
        per_round,
    )
}

fn measure_cluster(
    cluster: &policy_core::Cluster,
    policies: usize,
    cap: Capacity,
    samples: usize,
    per_round: u64,
) -> anyhow::Result<CostRow> {
    let net = BenchNet::create()?;
    let mut b = PacketBench::with_capacity(cluster, cap, &net)?;
    let peer_sets = policy_core::compile::Compiler::from_cluster(cluster, Default::default())?
        .0
        .stats()
        .peer_sets;
    let row_words = b.engine.lowering().stride();
    let mut row = net.run(|| measure_loaded(&mut b, policies, cap, samples, per_round))??;
    row.peer_sets = peer_sets;
    row.row_words = row_words;
    Ok(row)
}

/// The rounds of [`measure_with`], on a thread inside the bench's namespace.
fn measure_loaded(
    b: &mut PacketBench,
    policies: usize,
    cap: Capacity,
    samples: usize,
    per_round: u64,
) -> anyhow::Result<CostRow> {
    anyhow::ensure!(b.allowed(), "the benchmark flow must be allowed");
    let mut pass_single = Vec::new();
    let mut pass_repeat = Vec::new();
    let mut new_flow = Vec::new();
    let mut established = Vec::new();
    let per = |d: Duration| d.as_nanos() as f64 / per_round as f64;
    for _ in 0..samples {
        pass_single.push(per(b.new_flows(Hook::PassThrough, per_round)));
        new_flow.push(per(b.new_flows(Hook::ToPod, per_round)));
        pass_repeat.push(per(b.established(Hook::PassThrough, per_round * 20)) / 20.0);
        established.push(per(b.established(Hook::ToPod, per_round * 20)) / 20.0);
    }
    Ok(CostRow {
        policies,
        conntrack: cap.conntrack,
        peer_sets: 0,
        row_words: 0,
        pass_single: median(&mut pass_single),
        pass_repeat: median(&mut pass_repeat),
        new_flow: median(&mut new_flow),
        established: median(&mut established),
    })
}

/// Median of a sample.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}
