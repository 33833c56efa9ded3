//! Manifest loader: any text gives objects or an error, never a panic; a
//! successful load builds a cluster or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_core::Cluster;
use policy_core::manifest::parse_manifests;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(objects) = parse_manifests("fuzz.yaml", text) {
        let _ = Cluster::from_objects(objects.into_iter().map(|l| l.object));
    }
});
