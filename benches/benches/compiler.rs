//! Criterion benchmarks of the compiler, each next to the reference engine
//! doing the same job in the same run (see `docs/compiler-scaling.md` for the
//! full grid and the p50/p99 figures, from `compiler-report`).
//!
//! ```text
//! cargo bench -p palisade-benches --bench compiler
//! ```

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use palisade_benches::{ChangeKind, change, cluster};
use palisade_testing::testgen::Rng;
use policy_core::ReferenceEngine;
use policy_core::compile::{CompileOptions, Compiler};

fn compile(c: &mut Criterion) {
    for (pods, policies) in [(1_000, 100), (10_000, 1_000)] {
        let cl = cluster(pods, policies);
        let mut g = c.benchmark_group(format!("compile {pods} pods x {policies} policies"));
        g.sample_size(10);
        g.bench_function("reference: index cluster", |b| {
            b.iter(|| ReferenceEngine::new(&cl))
        });
        g.bench_function("compiled: full cluster", |b| {
            b.iter(|| Compiler::from_cluster(&cl, CompileOptions::default()).expect("compiles"))
        });
        g.bench_function("compiled: node-local (200 endpoints)", |b| {
            b.iter(|| {
                Compiler::from_cluster(
                    &cl,
                    CompileOptions {
                        node: Some("node-0".into()),
                    },
                )
                .expect("compiles")
            })
        });
        g.finish();
    }
}

fn incremental(c: &mut Criterion) {
    let cl = cluster(10_000, 1_000);
    let (mut compiled, _) =
        Compiler::from_cluster(&cl, CompileOptions::default()).expect("compiles");
    let mut g = c.benchmark_group("single change, 10k pods x 1k policies");
    g.sample_size(50);
    let mut r = Rng::new(11);
    let mut step = 0;
    for kind in ChangeKind::ALL {
        // Changes are generated up front against the initial cluster; each
        // is applied to a state that already holds the earlier ones, which
        // the generator's fresh names and toggles allow.
        let changes: Vec<_> = (0..2_000)
            .map(|_| {
                step += 1;
                change(kind, compiled.cluster(), &mut r, step)
            })
            .collect();
        let mut next = changes.into_iter().cycle();
        g.bench_function(format!("compiled: {}", kind.name()), |b| {
            b.iter_batched(
                || next.next().expect("cycle"),
                |ch| compiled.apply(vec![ch]).expect("valid change"),
                BatchSize::SmallInput,
            )
        });
    }
    g.bench_function("reference: rebuild after a change", |b| {
        b.iter(|| ReferenceEngine::new(compiled.cluster()))
    });
    g.finish();
}

criterion_group!(benches, compile, incremental);
criterion_main!(benches);
