//! `palisade services`: the table of the example Services and one
//! connection's fate, the same from the model and the maps.

use super::*;

fn services(extra: &[&str]) -> (bool, String, String) {
    let out = palisade()
        .args(["services", "-f", "examples/services", "--node", "node-a"])
        .args(["--node-ip", "192.168.0.2", "--cluster-cidr", "10.0.0.0/8"])
        .args(["--service-cidr", "172.30.0.0/16"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn table_and_probes() {
    let (ok, out, err) = services(&[]);
    assert!(ok, "{err}");
    let web = out
        .lines()
        .find(|l| l.starts_with("frontend/web:https"))
        .unwrap();
    // eTP=Local: every endpoint for Cluster traffic, node-a's for Local.
    assert!(web.contains("eTP=Local,ranges"), "{web}");
    assert!(web.ends_with("10.10.0.3:8443"), "{web}");
    assert!(out.contains("nodeport 192.168.0.2:30443"), "{out}");
    let api = out
        .lines()
        .find(|l| l.starts_with("backend/api:http"))
        .unwrap();
    // The terminating endpoint is not used while ready ones exist.
    assert!(
        api.contains("10.20.0.5:9090 10.20.1.7:9090") && !api.contains("10.20.1.8"),
        "{api}"
    );
    assert!(out.contains("maps: frontends 8/"), "{out}");

    for (probe, model, maps) in [
        // External client inside the source range: node-a's endpoint, not masqueraded.
        (
            "203.0.113.9,1.2.3.4:443",
            "DNAT frontend/web:https -> 10.10.0.3:8443",
            "forward to one of 10.10.0.3:8443 (masquerade false)",
        ),
        // Outside the range.
        ("198.51.100.1,1.2.3.4:443", "DROP (SourceRange)", "Drop(1)"),
        // No endpoint anywhere.
        (
            "10.10.0.3,172.30.0.31:80",
            "REJECT (NoEndpoints)",
            "Reject(1)",
        ),
        // Unallocated address in the service range.
        (
            "10.10.0.3,172.30.9.9:80",
            "DROP (UnallocatedClusterIp)",
            "Drop(4)",
        ),
        // A node's own connection to a ClusterIP is masqueraded.
        (
            "192.168.0.2,172.30.0.10:80/tcp",
            "(masquerade)",
            "(masquerade true)",
        ),
    ] {
        let (ok, out, err) = services(&["--probe", probe]);
        assert!(ok, "{probe}: {err}");
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("  {prefix}")))
                .unwrap_or_else(|| panic!("{probe}: no {prefix} line in {out}"))
                .to_string()
        };
        assert!(line("model:").contains(model), "{probe}: {out}");
        assert!(line("maps:").contains(maps), "{probe}: {out}");
    }
    let (ok, _, err) = services(&["--probe", "not-a-probe"]);
    assert!(!ok && err.contains("--probe"), "{err}");
}
