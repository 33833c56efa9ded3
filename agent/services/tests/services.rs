//! palisade-services against the vendored kube-proxy corpus, session
//! affinity and endpoint churn.

use std::path::PathBuf;

use palisade_services::case::{Case, check_selection, is_case, outcome};

fn corpus() -> Vec<(String, serde_json::Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/services");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let doc = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), doc));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn kube_proxy_corpus_on_the_reference_model() {
    let mut failures = Vec::new();
    let (mut passed, mut skipped) = (0, 0);
    for (name, doc) in corpus() {
        assert!(is_case(&doc), "{name}");
        let case = Case::from_json(&name, &doc).unwrap();
        let table = case.table().unwrap();
        for probe in &case.probes {
            if probe.skip_reason(&case).is_some() {
                skipped += 1;
                continue;
            }
            let packet = probe.packet().unwrap();
            let got = outcome(&table.decide(&packet), packet.source);
            let want = probe.expected().unwrap();
            if got == want {
                passed += 1;
            } else {
                failures.push(format!("{name} {}: got {got}, want {want}", probe.name));
            }
        }
        for check in &case.selection_checks {
            match check_selection(&case, check) {
                Ok(()) => passed += 1,
                Err(e) => failures.push(format!("{name} {}: {e}", check.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        passed > 100 && skipped > 0,
        "{passed} passed, {skipped} skipped"
    );
}
