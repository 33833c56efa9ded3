//! deploy/: the systemd unit names the binary's real flags, the environment
//! file the variables the binary reads, and systemd accepts the unit.

use std::collections::BTreeMap;

use super::{palisade, repo, scratch};

/// `[Section]` -> key -> values (a key may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.entry(section.clone())
            .or_default()
            .entry(k.trim().to_string())
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

fn agent_help() -> String {
    let out = palisade().args(["agent", "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_systemd_unit_runs_the_agent_with_flags_it_has() {
    let text = std::fs::read_to_string(repo().join("deploy/palisade-agent.service")).unwrap();
    let unit = parse_unit(&text);
    let service = &unit["Service"];
    assert_eq!(service["KillSignal"], ["SIGTERM"], "the clean-stop path");
    assert_eq!(service["Restart"], ["always"]);
    let exec = &service["ExecStart"];
    assert_eq!(exec.len(), 1);
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    assert!(
        words[0].ends_with("/palisade") && words[1] == "agent",
        "{words:?}"
    );
    let help = agent_help();
    let mut i = 2;
    while i < words.len() {
        let flag = words[i];
        assert!(flag.starts_with("--"), "{flag} in {words:?}");
        assert!(
            help.contains(&format!("{flag} <")),
            "palisade agent has no {flag}"
        );
        let value = words
            .get(i + 1)
            .unwrap_or_else(|| panic!("{flag} has no value"));
        assert!(!value.starts_with("--"), "{flag} has no value");
        i += 2;
    }
    assert!(exec[0].contains("--node %H"), "named by hostname");
    // The paths it writes are writable under the unit's sandbox.
    let writable = &service["ReadWritePaths"][0];
    for flag in ["--pin-path", "--state-dir"] {
        let at = words.iter().position(|w| *w == flag).unwrap();
        assert!(
            writable
                .split_whitespace()
                .any(|p| words[at + 1].starts_with(p)),
            "{flag}"
        );
    }
    // Every variable the environment file mentions is one the agent reads.
    let env = std::fs::read_to_string(repo().join("deploy/agent.env")).unwrap();
    for var in env
        .lines()
        .map(|l| l.trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "the agent does not read {var}"
        );
    }
    // systemd itself accepts it (with the binary where this build put it).
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let dir = scratch("unit");
        let copy = dir.join("palisade-agent.service");
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/palisade", env!("CARGO_BIN_EXE_palisade")),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn yaml_documents(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// deploy/kubernetes: the DaemonSet runs the agent with flags it has, on
/// the ServiceAccount the RBAC binds, with every path a flag names on a
/// mounted host path; its probes hit the metrics address; the CNI
/// configuration it installs is one palisade-cni accepts. (The RBAC rules
/// and CRDs are checked against the store's calls in palisade-datastore.)
#[test]
fn the_daemonset_runs_the_agent_with_flags_it_has_on_the_bound_account() {
    let docs = yaml_documents("deploy/kubernetes/daemonset.yaml");
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let rbac = yaml_documents("deploy/kubernetes/rbac.yaml");
    let account = rbac.iter().find(|d| d["kind"] == "ServiceAccount").unwrap();
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    assert_eq!(
        ds["metadata"]["namespace"],
        account["metadata"]["namespace"]
    );

    let agent = &pod["containers"][0];
    let words: Vec<&str> = agent["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert!(
        words[0].ends_with("/palisade") && words[1] == "agent",
        "{words:?}"
    );
    let help = agent_help();
    let mut flags = BTreeMap::new();
    for pair in words[2..].chunks(2) {
        let [flag, value] = pair else {
            panic!("{pair:?} has no value")
        };
        assert!(
            help.contains(&format!("{flag} <")),
            "palisade agent has no {flag}"
        );
        flags.insert(*flag, *value);
    }
    assert_eq!(flags["--datastore"], "kubernetes");
    assert!(help.contains("kubernetes"), "a datastore value it takes");
    // $(VAR) in the command names a variable the container defines.
    let env: Vec<&str> = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(flags["--node"], "$(NODE_NAME)");
    assert!(env.contains(&"NODE_NAME"));
    // The probes hit the metrics address.
    let port: u64 = flags["--metrics-addr"]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["port"], port, "{probe}");
    }
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Every path a flag names lies on a mount from the host.
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for flag in ["--pin-path", "--connect-hooks-cgroup"] {
        assert!(
            mounts.iter().any(|m| flags[flag].starts_with(m)),
            "{flag} {} is not mounted: {mounts:?}",
            flags[flag]
        );
    }
    // The installed CNI configuration is one the plugin accepts, installed
    // where the runtime reads it, naming the binary installed beside it.
    let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let (file, conflist) = config["data"].as_object().unwrap().iter().next().unwrap();
    let conflist: serde_json::Value = serde_json::from_str(conflist.as_str().unwrap()).unwrap();
    let plugin = &conflist["plugins"][0];
    assert_eq!(plugin["type"], "palisade-cni");
    let mut net = plugin.clone();
    net["cniVersion"] = conflist["cniVersion"].clone();
    net["name"] = conflist["name"].clone();
    palisade_cni::spec::NetConf::parse(net.to_string().as_bytes()).unwrap();
    let install = pod["initContainers"][0]["args"][0].as_str().unwrap();
    assert!(
        install.contains(&format!("/host/etc/cni/net.d/{file}")),
        "{install}"
    );
    assert!(
        install.contains("/host/opt/cni/bin/palisade-cni"),
        "{install}"
    );
}
