//! Integration tests of policy-core: selector vectors, bad input, atomic
//! updates, the conformance corpus, and selector round-trips.

use std::path::{Path, PathBuf};

use palisade_testing::conformance::{ProbeStatus, parse_case, run_case};
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
            Err(e) => e.into_vec().remove(0),
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
    fn services_matches_are_checked_as_calico_checks_them() {
        for (rule, field, says) in [
            (
                "{action: Allow, source: {services: {name: api}}}",
                "spec.ingress[0].source.services.namespace",
                "must specify a namespace",
            ),
            (
                "{action: Allow, destination: {services: {name: api, namespace: x}}}",
                "spec.ingress[0].destination.services",
                "not allowed in an ingress rule's destination",
            ),
            (
                "{action: Allow, source: {services: {name: api, namespace: x}, nets: [10.0.0.0/8]}}",
                "spec.ingress[0].source.services",
                "cannot specify nets/notNets and services",
            ),
            (
                "{action: Allow, source: {services: {name: '', namespace: x}}}",
                "spec.ingress[0].source.services.name",
                "must specify a service name",
            ),
        ] {
            let e = err(&gnp(rule));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = err(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
spec:\n  egress:\n  - {action: Allow, protocol: TCP, destination: {services: {name: api}, ports: [80]}}\n",
        );
        assert_eq!(
            e.field.as_deref(),
            Some("spec.egress[0].destination.ports"),
            "{e}"
        );
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
                .starts_with("test.yaml:7:3: GlobalNetworkPolicy p: "),
            "{e}"
        );
    }

    #[test]
    fn misspelt_kind() {
        // Close to a kind Palisade reads: an error that names it.
        let e = err(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicies\nmetadata: {name: x}\n",
        );
        assert_eq!(e.field.as_deref(), Some("kind"));
        assert!(
            e.to_string().ends_with("did you mean GlobalNetworkPolicy?"),
            "{e}"
        );
        // Without a kind, a document is not an object at all.
        let e = err("apiVersion: v1\nmetadata: {name: x}\n");
        assert!(matches!(e.kind, ErrorKind::UnknownKind { .. }), "{e}");
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
    use palisade_testing::testgen::{Rng, flows, random_change, small_cluster};
    use policy_core::compile::{CompileOptions, Compiler};
    use policy_core::model::Endpoint;
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
                prop_assert!(node.slots().all(|(s, _)| s.endpoint != e.key));
            }
            let _ = Direction::Ingress;
        }
    }
}

/// Issue 16: strict loading of Kubernetes kinds, skipped kinds, every error
/// at once with positions.
mod strict_load {
    use policy_core::manifest::{ManifestSet, parse_source};
    use policy_core::{ErrorKind, Errors};

    fn errors(yaml: &str) -> Errors {
        let mut set = ManifestSet::new();
        let e = set
            .add_source("np.yaml", yaml)
            .expect_err("manifest should be rejected");
        assert!(set.objects().is_empty(), "a rejected load adds nothing");
        e
    }

    fn lines(e: &Errors) -> Vec<String> {
        e.iter().map(ToString::to_string).collect()
    }

    const API_TO_DB: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: api-to-db
  namespace: shop
spec:
  podSelector:
    matchLabel:
      app: db
  ingres:
  - from:
    - podSelecter:
        matchLabels:
          app: api
";

    #[test]
    fn kubernetes_typos_are_errors_with_path_and_suggestion() {
        let e = errors(API_TO_DB);
        let want = [
            (
                "spec.podSelector.matchLabel",
                "did you mean `matchLabels`?",
                8,
            ),
            ("spec.ingres", "did you mean `ingress`?", 10),
        ];
        assert_eq!(e.len(), want.len(), "{e}");
        for (err, (field, help, line)) in e.iter().zip(want) {
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.to_string().ends_with(help), "{err}");
            let o = err.origin.as_ref().unwrap();
            assert_eq!((o.source.as_str(), o.line), ("np.yaml", line), "{err}");
        }
        assert_eq!(
            e.iter().next().unwrap().to_string(),
            "np.yaml:8:5: NetworkPolicy shop/api-to-db: spec.podSelector.matchLabel: \
             unknown field `matchLabel`; did you mean `matchLabels`?"
        );

        // Under the right `ingress`, the peer's typo is found too.
        let e = errors(&API_TO_DB.replace("ingres:", "ingress:"));
        let fields: Vec<_> = e.iter().map(|e| e.field.clone().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "spec.podSelector.matchLabel",
                "spec.ingress[0].from[0].podSelecter"
            ]
        );
        assert!(lines(&e)[1].ends_with("did you mean `podSelector`?"), "{e}");
    }

    #[test]
    fn calico_syntax_in_a_kubernetes_policy_says_so() {
        let e = errors(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
             spec:\n  selector: app == 'db'\n  ingress:\n  - action: Allow\n    from:\n    - selector: app == 'api'\n",
        );
        let l = lines(&e);
        assert_eq!(l.len(), 3, "{e}");
        assert!(
            l[0].contains("spec.selector: unknown field `selector`; `selector` is Calico syntax; in networking.k8s.io/v1 use podSelector"),
            "{e}"
        );
        assert!(
            l[1].contains(
                "spec.ingress[0].action: unknown field `action`; `action` is Calico syntax"
            ),
            "{e}"
        );
        assert!(
            l[2].contains("spec.ingress[0].from[0].selector: unknown field `selector`; `selector` is Calico syntax; in networking.k8s.io/v1 use podSelector"),
            "{e}"
        );
        // And the other way round.
        let e = errors(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
             spec:\n  podSelector: {}\n",
        );
        assert!(
            lines(&e)[0].contains(
                "`podSelector` is networking.k8s.io/v1 syntax; in projectcalico.org/v3 use selector"
            ),
            "{e}"
        );
    }

    #[test]
    fn pods_and_namespaces_are_strict_too() {
        let e = errors(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, lables: {team: x}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\n\
             spec: {containers: [{name: c, port: [{containerPort: 80}]}]}\nstatus: {podIp: 10.0.0.1}\n",
        );
        let l = lines(&e);
        assert_eq!(l.len(), 3, "{e}");
        assert!(l[0].starts_with("np.yaml:3:21: Namespace a: metadata.lables: unknown field `lables`; did you mean `labels`?"), "{e}");
        assert!(l[1].starts_with("np.yaml:8:31: Pod a/p: spec.containers[0].port: unknown field `port`; did you mean `ports`?"), "{e}");
        assert!(
            l[2].starts_with(
                "np.yaml:9:10: Pod a/p: status.podIp: unknown field `podIp`; did you mean `podIP`?"
            ),
            "{e}"
        );
    }

    #[test]
    fn kinds_palisade_does_not_act_on_are_skipped() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {replicas: 2, template: {spec: {containers: []}}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool}
spec: {cidr: 10.0.0.0/16}
---
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata: {name: default}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c, namespace: shop}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
";
        let parsed = parse_source("app.yaml", text).unwrap();
        assert_eq!(parsed.objects.len(), 1);
        let skipped: Vec<_> = parsed
            .skipped
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_str(), s.origin.line))
            .collect();
        assert_eq!(
            skipped,
            [
                ("Deployment", "shop/web", 1),
                ("Service", "shop/web", 6),
                ("IPPool", "pool", 10),
                ("FelixConfiguration", "default", 15),
                ("ConfigMap", "shop/c", 22),
            ]
        );
        // Typed lists (kubectl get -o yaml) are read item by item.
        let parsed = parse_source(
            "list.yaml",
            "apiVersion: v1\nkind: PodList\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n\
             - {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}\n",
        )
        .unwrap();
        assert_eq!((parsed.objects.len(), parsed.skipped.len()), (1, 1));
        let e = errors(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicyList\nitems:\n\
             - apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p}\n  spec:\n    ingres: []\n",
        );
        assert_eq!(
            lines(&e),
            [
                "np.yaml:8:5: NetworkPolicy p: items[0].spec.ingres: unknown field `ingres`; did you mean `ingress`?"
            ]
        );
        // A kind Palisade acts on is still strict next to them.
        let e = errors(&format!(
            "{text}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: b, labls: {{}}}}\n"
        ));
        assert_eq!(e.len(), 1, "{e}");
        assert!(
            lines(&e)[0].starts_with("np.yaml:27:21: Namespace b: metadata.labls"),
            "{e}"
        );
    }

    #[test]
    fn every_error_of_a_load_in_document_order_with_lines() {
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!(
                "---\n# policy {i}\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: x}}\nspec: {{podSelecter: {{}}}}\n"
            ));
        }
        // A syntax error in one document does not hide the others.
        text.push_str("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a\n");
        text.push_str("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\nspce: {}\n");
        let e = errors(&text);
        assert_eq!(e.len(), 32, "{e}");
        for (i, err) in e.iter().take(30).enumerate() {
            let o = err.origin.as_ref().unwrap();
            assert_eq!((o.document, o.line), (i + 1, 6 * i + 6), "{err}");
        }
        let l = lines(&e);
        assert!(
            l[30].starts_with("np.yaml:185:") && l[30].contains("malformed YAML"),
            "{}",
            l[30]
        );
        assert!(l[30].contains("line 184"), "{}", l[30]);
        assert!(
            l[31].starts_with("np.yaml:189:1: Namespace b: spce"),
            "{}",
            l[31]
        );
        let shown = e.to_string();
        assert_eq!(shown.lines().count(), 21, "{shown}");
        assert!(shown.ends_with("\n... and 12 more errors"), "{shown}");
    }

    #[test]
    fn duplicates_are_all_reported_with_lines() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let e = errors(&format!("{ns}---\n{ns}---\n{ns}"));
        assert_eq!(e.len(), 2, "{e}");
        assert!(
            matches!(e.iter().next().unwrap().kind, ErrorKind::Duplicate(..)),
            "{e}"
        );
        assert!(lines(&e)[1].starts_with("np.yaml:9:1: "), "{e}");
        assert!(
            lines(&e)[1].contains("already defined at np.yaml:1:1"),
            "{e}"
        );
    }

    #[test]
    fn json_documents_have_positions() {
        let e = errors(
            "[\n  {\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"a\"}},\n  {\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"nme\": \"b\"}}\n]\n",
        );
        assert!(
            lines(&e)[0].starts_with("np.yaml:3:58: Namespace <unnamed>: metadata.nme"),
            "{e}"
        );
        assert_eq!(
            e.iter().next().unwrap().origin.as_ref().unwrap().document,
            2
        );
        let e = errors("{\"apiVersion\": \"v1\",\n \"kind\": }");
        assert!(
            lines(&e)[0].starts_with("np.yaml:2:10: malformed JSON"),
            "{e}"
        );
    }
}

mod matrix;
