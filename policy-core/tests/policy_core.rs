//! Integration tests of policy-core: selector vectors, bad input, atomic
//! updates, the conformance corpus, and selector round-trips.

use std::path::{Path, PathBuf};

use policy_core::conformance::{ProbeStatus, parse_case, run_case};
use policy_core::manifest::{ManifestSet, parse_manifests};
use policy_core::selector::{Expr, Selector};
use policy_core::{Change, Cluster, ErrorKind, ObjectRef, ReferenceEngine};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance")
}

mod selectors {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        selector: String,
        #[serde(default)]
        labels: Option<std::collections::BTreeMap<String, String>>,
        #[serde(rename = "match", default)]
        matches: Option<bool>,
        #[serde(default)]
        invalid: bool,
        #[serde(default)]
        canonical: Option<String>,
        #[serde(default)]
        uid: Option<String>,
    }

    fn vectors(file: &str) -> Vec<Vector> {
        std::fs::read_to_string(corpus().join(file))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn calico_selector_vectors() {
        let vs = vectors("selectors.jsonl");
        assert!(vs.len() > 50);
        for v in vs {
            match Selector::parse(&v.selector) {
                Err(e) => assert!(v.invalid, "{:?} should parse: {e}", v.selector),
                Ok(s) => {
                    assert!(!v.invalid, "{:?} should be rejected", v.selector);
                    assert_eq!(
                        s.matches(v.labels.as_ref().unwrap()),
                        v.matches.unwrap(),
                        "{:?} over {:?}",
                        v.selector,
                        v.labels
                    );
                }
            }
        }
    }

    #[test]
    fn canonical_forms_and_ids() {
        let vs = vectors("selectors_canonical.jsonl");
        let mut with_uid = 0;
        for v in vs {
            let s = Selector::parse(&v.selector).unwrap();
            if let Some(c) = &v.canonical {
                assert_eq!(s.canonical(), c, "canonical of {:?}", v.selector);
            }
            if let Some(u) = &v.uid {
                assert_eq!(s.id(), u, "id of {:?}", v.selector);
                with_uid += 1;
            }
        }
        assert!(with_uid >= 3);
    }

    #[test]
    fn errors_have_offsets() {
        for (sel, offset) in [
            ("a = 'b'", 2),
            ("a == 'b' &&", 11),
            ("(a == 'b'", 9),
            ("a == b", 5),
            ("a in 'x'", 5),
            ("a == 'b' ) ", 9),
        ] {
            let e = Selector::parse(sel).unwrap_err();
            assert_eq!(e.offset, offset, "{sel}: {e}");
            assert!(!e.expected.is_empty());
        }
    }
}

mod bad_input {
    use super::*;

    fn err(yaml: &str) -> policy_core::Error {
        let mut set = ManifestSet::new();
        match set.add_source("test.yaml", yaml) {
            Err(e) => e,
            Ok(_) => Cluster::from_objects(set.into_objects().into_iter().map(|l| l.object))
                .expect_err("manifest should be rejected"),
        }
    }

    fn gnp(rule: &str) -> String {
        format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: p\nspec:\n  ingress:\n  - {rule}\n"
        )
    }

    #[test]
    fn invalid_selector_names_field_and_offset() {
        let e = err(&gnp(
            "{action: Allow, source: {selector: \"app == 'a' &&& x\"}}",
        ));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].source.selector"));
        let ErrorKind::Selector(s) = &e.kind else {
            panic!("{e}")
        };
        assert_eq!(s.offset, 13);
        assert_eq!(
            e.object,
            Some(ObjectRef::new("GlobalNetworkPolicy", None, "p"))
        );
        assert!(
            e.to_string()
                .starts_with("test.yaml: document 1: GlobalNetworkPolicy p: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_kind() {
        let e = err("apiVersion: projectcalico.org/v3\nkind: Polciy\nmetadata: {name: x}\n");
        assert!(matches!(e.kind, ErrorKind::UnknownKind { .. }), "{e}");
        assert_eq!(e.field.as_deref(), Some("kind"));
    }

    #[test]
    fn wrong_api_version() {
        let e = err(
            "apiVersion: projectcalico.org/v2\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n",
        );
        assert!(matches!(e.kind, ErrorKind::WrongApiVersion { .. }), "{e}");
        let e = err("apiVersion: v1\nkind: Tier\nmetadata: {name: x}\n");
        assert!(matches!(e.kind, ErrorKind::WrongApiVersion { .. }), "{e}");
    }

    #[test]
    fn invalid_cidr() {
        let e = err(&gnp(
            "{action: Allow, source: {nets: [10.0.0.0/8, 10.0.0.0/33]}}",
        ));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].source.nets[1]"));
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
        let e = err(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: a}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 300.1.1.1/8}}]\n",
        );
        assert_eq!(
            e.field.as_deref(),
            Some("spec.ingress[0].from[0].ipBlock.cidr")
        );
    }

    #[test]
    fn port_out_of_range() {
        for port in ["0", "65536"] {
            let e = err(&gnp(&format!(
                "{{action: Allow, protocol: TCP, destination: {{ports: [{port}]}}}}"
            )));
            assert_eq!(
                e.field.as_deref(),
                Some("spec.ingress[0].destination.ports[0]"),
                "{e}"
            );
            assert!(e.to_string().contains(port), "{e}");
        }
        let e = err(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: a}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 65536}]\n",
        );
        assert_eq!(
            e.field.as_deref(),
            Some("spec.ingress[0].ports[0].port"),
            "{e}"
        );
    }

    #[test]
    fn numeric_port_needs_protocol() {
        let e = err(&gnp("{action: Allow, destination: {ports: [80]}}"));
        assert_eq!(
            e.field.as_deref(),
            Some("spec.ingress[0].destination.ports")
        );
        assert!(e.to_string().contains("protocol"), "{e}");
        // Named ports alone are fine without a protocol.
        let yaml = gnp("{action: Allow, destination: {ports: [http]}}");
        assert!(parse_manifests("t.yaml", &yaml).is_ok());
    }

    #[test]
    fn invalid_named_port() {
        for name in ["Http", "-http", "http--x", "a-very-long-port-name"] {
            let e = err(&gnp(&format!(
                "{{action: Allow, protocol: TCP, destination: {{ports: [\"{name}\"]}}}}"
            )));
            assert_eq!(
                e.field.as_deref(),
                Some("spec.ingress[0].destination.ports[0]"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn icmp_with_wrong_ip_version() {
        let e = err(&gnp("{action: Allow, protocol: ICMP, ipVersion: 6}"));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].protocol"));
        let e = err(&gnp("{action: Allow, protocol: ICMPv6, ipVersion: 4}"));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].protocol"));
        let e = err(&gnp("{action: Allow, protocol: TCP, icmp: {type: 8}}"));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].icmp"));
    }

    #[test]
    fn over_limit_rule_counts() {
        let mut yaml = String::from(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: big\nspec:\n  egress:\n",
        );
        for _ in 0..1025 {
            yaml.push_str("  - action: Allow\n");
        }
        let e = err(&yaml);
        assert!(
            matches!(
                e.kind,
                ErrorKind::Limit {
                    count: 1025,
                    limit: 1024,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.field.as_deref(), Some("spec.egress"));
        let nets: Vec<String> = (0..257)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let e = err(&gnp(&format!(
            "{{action: Allow, source: {{nets: [{}]}}}}",
            nets.join(", ")
        )));
        assert!(matches!(e.kind, ErrorKind::Limit { limit: 256, .. }), "{e}");
        let ports: Vec<String> = (1..=51).map(|p| p.to_string()).collect();
        let e = err(&gnp(&format!(
            "{{action: Allow, protocol: TCP, destination: {{ports: [{}]}}}}",
            ports.join(", ")
        )));
        assert!(matches!(e.kind, ErrorKind::Limit { limit: 50, .. }), "{e}");
    }

    #[test]
    fn tier_must_exist() {
        let e = err(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec: {tier: security}\n",
        );
        assert_eq!(e.kind, ErrorKind::UnknownTier("security".into()));
        assert_eq!(e.field.as_deref(), Some("spec.tier"));
        assert_eq!(
            e.object,
            Some(ObjectRef::new("GlobalNetworkPolicy", None, "p"))
        );
    }

    #[test]
    fn duplicate_objects() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let e = err(yaml);
        assert!(matches!(e.kind, ErrorKind::Duplicate(..)), "{e}");
        assert_eq!(e.origin.as_ref().unwrap().document, 2);
    }

    #[test]
    fn malformed_yaml() {
        let e = err("apiVersion: v1\nkind: Namespace\nmetadata: {name: a\n");
        assert!(
            matches!(e.kind, ErrorKind::Syntax { format: "YAML", .. }),
            "{e}"
        );
        let e = err("{\"apiVersion\": \"v1\",");
        assert!(
            matches!(e.kind, ErrorKind::Syntax { format: "JSON", .. }),
            "{e}"
        );
    }

    #[test]
    fn misspelt_field() {
        let e = err(&gnp("{action: Allow, sorce: {selector: all()}}"));
        assert_eq!(e.field.as_deref(), Some("spec.ingress[0].sorce"));
        assert!(e.to_string().contains("sorce"), "{e}");
    }
}

mod updates {
    use super::*;

    const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: security}\nspec: {order: 10}\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec: {tier: security, selector: all()}\n";

    fn cluster() -> Cluster {
        let objs = parse_manifests("base.yaml", BASE).unwrap();
        Cluster::from_objects(objs.into_iter().map(|l| l.object)).unwrap()
    }

    fn snapshot(c: &Cluster) -> String {
        format!(
            "{:?}{:?}{:?}",
            c.policies().collect::<Vec<_>>(),
            c.tiers().collect::<Vec<_>>(),
            c.namespaces().collect::<Vec<_>>()
        )
    }

    #[test]
    fn rejected_batch_changes_nothing() {
        let mut c = cluster();
        let before = snapshot(&c);
        let more = parse_manifests(
            "more.yaml",
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: q}\nspec: {selector: all()}\n---\n\
apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: p}\nspec: {tier: missing}\n",
        )
        .unwrap();
        let e = c
            .apply(more.into_iter().map(|l| Change::Upsert(l.object)).collect())
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownTier("missing".into()));
        assert_eq!(snapshot(&c), before);
    }

    #[test]
    fn deleting_a_tier_in_use_is_refused() {
        let mut c = cluster();
        let before = snapshot(&c);
        let e = c
            .apply(vec![Change::Delete(ObjectRef::new(
                "Tier", None, "security",
            ))])
            .unwrap_err();
        assert!(e.to_string().contains("still used"), "{e}");
        assert_eq!(snapshot(&c), before);
        // Deleting the policy and the tier together is fine.
        c.apply(vec![
            Change::Delete(ObjectRef::new("GlobalNetworkPolicy", None, "p")),
            Change::Delete(ObjectRef::new("Tier", None, "security")),
        ])
        .unwrap();
        assert!(c.tier("security").is_none());
    }

    #[test]
    fn deleting_a_missing_object_is_an_error() {
        let mut c = cluster();
        let e = c
            .apply(vec![Change::Delete(ObjectRef::new(
                "Namespace",
                None,
                "nope",
            ))])
            .unwrap_err();
        assert!(matches!(e.kind, ErrorKind::NotFound(_)), "{e}");
    }
}

mod corpus {
    use super::*;

    fn run_folder(folder: &str) -> (usize, usize, Vec<String>) {
        let dir = corpus().join(folder);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        files.sort();
        let (mut passed, mut skipped, mut failures) = (0, 0, Vec::new());
        for f in files {
            let name = f.display().to_string();
            let case = parse_case(&name, &std::fs::read_to_string(&f).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let engine = ReferenceEngine::new(&case.cluster);
            for r in run_case(&engine, &case) {
                match r.status {
                    ProbeStatus::Passed => passed += 1,
                    ProbeStatus::Skipped(_) => skipped += 1,
                    ProbeStatus::Failed(why) => failures.push(format!("{name} {}: {why}", r.probe)),
                }
            }
        }
        (passed, skipped, failures)
    }

    #[test]
    fn kubernetes_calico_extra_with_reference_engine() {
        for folder in ["kubernetes", "calico", "extra"] {
            let (passed, _skipped, failures) = run_folder(folder);
            assert!(failures.is_empty(), "{folder}:\n{}", failures.join("\n"));
            assert!(passed > 0, "{folder}: nothing ran");
        }
    }
}

mod roundtrip {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9./_-]{0,6}".prop_filter("keywords are fine as labels", |_| true)
    }
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9 ]{0,4}",
            Just("'".to_string()),
            Just("\"".to_string())
        ]
    }

    fn leaf() -> impl Strategy<Value = Expr> {
        prop_oneof![
            Just(Expr::All),
            Just(Expr::Global),
            label().prop_map(Expr::Has),
            (label(), value()).prop_map(|(k, v)| Expr::Eq(k, v)),
            (label(), value()).prop_map(|(k, v)| Expr::Ne(k, v)),
            (label(), value()).prop_map(|(k, v)| Expr::Contains(k, v)),
            (label(), value()).prop_map(|(k, v)| Expr::StartsWith(k, v)),
            (label(), value()).prop_map(|(k, v)| Expr::EndsWith(k, v)),
            (label(), prop::collection::btree_set(value(), 0..4))
                .prop_map(|(k, v)| Expr::In(k, v.into_iter().collect())),
            (label(), prop::collection::btree_set(value(), 0..4))
                .prop_map(|(k, v)| Expr::NotIn(k, v.into_iter().collect())),
        ]
    }

    fn expr() -> impl Strategy<Value = Expr> {
        leaf().prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
                prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// canonical(parse(canonical(e))) reproduces the same tree.
        #[test]
        fn canonical_round_trips(e in expr()) {
            // A value holding both quote kinds cannot be written; skip those.
            let s = Selector::from_expr(e.clone());
            let back = Selector::parse(s.canonical()).unwrap();
            prop_assert_eq!(back.expr(), &e);
            prop_assert_eq!(back.id(), s.id());
        }
    }
}

mod differential {
    use super::*;
    use policy_core::compile::{CompileOptions, Compiler};
    use policy_core::model::Endpoint;
    use policy_core::testgen::{Rng, flows, random_change, small_cluster};
    use policy_core::{Direction, Engine};
    use proptest::prelude::*;

    fn cases(default: u32) -> u32 {
        std::env::var("PALISADE_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn check_against_reference(
        cluster: &Cluster,
        compiled: &Compiler,
        seed: u64,
        n: usize,
    ) -> Result<(), TestCaseError> {
        let reference = ReferenceEngine::new(cluster);
        let eps: Vec<Endpoint> = cluster.endpoints().cloned().collect();
        let external = small_cluster(0).external;
        let mut r = Rng::new(seed);
        for (ep, dir, flow) in flows(&mut r, &eps, &external, n) {
            let want = reference.decide(&ep, dir, &flow);
            let got = compiled.decide(&ep, dir, &flow);
            prop_assert_eq!(&got, &want, "{} {} {}", ep, dir, flow);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(1500)))]

        /// The compiled engine answers exactly like the reference engine,
        /// provenance (tier, policy, rule, action, logged) included.
        #[test]
        fn compiled_agrees_with_reference(seed in any::<u64>()) {
            let g = small_cluster(seed);
            let cluster = Cluster::from_objects(g.objects).unwrap();
            let (compiled, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
            check_against_reference(&cluster, &compiled, seed ^ 0x5eed, 150)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases(400)))]

        /// Any sequence of changes applied incrementally gives the same
        /// compiled state as compiling the end result from scratch; rejected
        /// changes leave the state untouched.
        #[test]
        fn incremental_equals_from_scratch(seed in any::<u64>()) {
            let g = small_cluster(seed);
            let mut c = Compiler::new(CompileOptions::default());
            c.apply(g.objects.into_iter().map(Change::Upsert).collect()).unwrap();
            let mut r = Rng::new(seed ^ 0xc4a5);
            for step in 0..12 {
                let current = c.cluster().objects();
                let n = 1 + r.below(3);
                let batch: Vec<Change> = (0..n).map(|i| random_change(&mut r, &current, step * 4 + i)).collect();
                let before = c.canonical();
                if c.apply(batch.clone()).is_err() {
                    prop_assert_eq!(c.canonical(), before, "rejected batch {:?} changed the state", batch);
                }
                if let Err(e) = c.check_invariants() {
                    prop_assert!(false, "after {:?}: {}", batch, e);
                }
            }
            let (scratch, _) = Compiler::from_cluster(c.cluster(), CompileOptions::default()).unwrap();
            prop_assert_eq!(c.canonical(), scratch.canonical());
            check_against_reference(c.cluster(), &c, seed ^ 0xfeed, 60)?;
        }

        /// A node view compiles only that node's endpoints and answers for
        /// them like the cluster view.
        #[test]
        fn node_view_agrees(seed in any::<u64>()) {
            let g = small_cluster(seed);
            let cluster = Cluster::from_objects(g.objects).unwrap();
            let (node, _) = Compiler::from_cluster(&cluster, CompileOptions { node: Some("node-0".into()) }).unwrap();
            let reference = ReferenceEngine::new(&cluster);
            let eps: Vec<Endpoint> = cluster.endpoints().filter(|e| e.node.as_deref() == Some("node-0")).cloned().collect();
            let mut r = Rng::new(seed);
            for (ep, dir, flow) in flows(&mut r, &eps, &g.external, 60) {
                prop_assert_eq!(node.decide(&ep, dir, &flow), reference.decide(&ep, dir, &flow));
            }
            for e in cluster.endpoints().filter(|e| e.node.as_deref() != Some("node-0")) {
                prop_assert!(node.slots().all(|(s, _)| s.0 != e.key));
            }
            let _ = Direction::Ingress;
        }
    }
}
