use policy_core::cluster::Cluster;
use policy_core::compile::{CompileOptions, Compiler};
fn main() {
    let p: usize = std::env::args().nth(1).map_or(5, |a| a.parse().unwrap());
    let c = Cluster::from_objects(palisade_testing::testgen::wide_policies(p, 1000)).unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let r = Compiler::from_cluster(&c, CompileOptions::default()).unwrap();
        eprintln!("{p}x1000: {:?}", t.elapsed());
        drop(r);
    }
}
