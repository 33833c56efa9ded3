//! Conformance case parser and reference engine: any JSON gives a case or an
//! error; a parsed case's probes evaluate without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_core::ReferenceEngine;
use palisade_testing::conformance::{parse_case, run_case};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(case) = parse_case("fuzz.json", text) {
        let engine = ReferenceEngine::new(&case.cluster);
        let _ = run_case(&engine, &case);
    }
});
