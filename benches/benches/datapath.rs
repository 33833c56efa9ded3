//! Per-packet cost of the TC programs at 10, 100, 1k and 5k policies, new
//! and established flows, next to a pass-through program (criterion, timed
//! by the kernel through `iter_custom`). Needs root; skipped without it.
//!
//! `cargo bench -p palisade-benches --bench datapath`; the table in
//! docs/datapath-cost.md comes from `cargo run --release -p
//! palisade-benches --bin datapath-report`.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade_benches::dataplane::{SIZES, cluster};
use palisade_benches::packet_cost::{BenchNet, PacketBench};
use policy_bpf::datapath::Hook;

fn datapath(c: &mut Criterion) {
    if !policy_bpf::datapath::privileged() {
        eprintln!("datapath benchmarks skipped: loading BPF programs needs root");
        return;
    }
    // Packets arrive on the server's interface, in the bench's namespace,
    // which this thread (criterion runs the benchmarks on it) joins.
    let net = BenchNet::create().expect("the bench namespace");
    net.enter().expect("joining the bench namespace");
    let mut g = c.benchmark_group("packet");
    for n in SIZES {
        let mut b = PacketBench::new(&cluster(n), &net).expect("datapath loads");
        assert!(b.allowed());
        g.bench_function(format!("pass-through/new/{n}"), |x| {
            x.iter_custom(|iters| b.new_flows(Hook::PassThrough, iters))
        });
        g.bench_function(format!("policy/new/{n}"), |x| {
            x.iter_custom(|iters| b.new_flows(Hook::ToPod, iters))
        });
        g.bench_function(format!("pass-through/established/{n}"), |x| {
            x.iter_custom(|iters| b.established(Hook::PassThrough, iters))
        });
        g.bench_function(format!("policy/established/{n}"), |x| {
            x.iter_custom(|iters| b.established(Hook::ToPod, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, datapath);
criterion_main!(benches);
