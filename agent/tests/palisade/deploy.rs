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
