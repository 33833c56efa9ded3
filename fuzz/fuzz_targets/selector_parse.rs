//! Selector parser: never panics, and parse -> canonical -> parse gives the
//! same tree, canonical form and selector ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy_core::selector::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(sel) = Selector::parse(text) {
        let again = Selector::parse(sel.canonical())
            .unwrap_or_else(|e| panic!("canonical form {:?} does not parse: {e}", sel.canonical()));
        assert_eq!(again.expr(), sel.expr(), "round trip of {text:?}");
        assert_eq!(again.canonical(), sel.canonical());
        assert_eq!(again.id(), sel.id());
        // Evaluation and restrictions must not panic either.
        let labels = std::collections::BTreeMap::from([("a".to_string(), "b".to_string())]);
        let _ = sel.matches(&labels);
        let _ = sel.label_restrictions();
    }
});
