//! The CNI specification as Palisade's plugin speaks it (1.1.0, and the
//! results of 0.3.x, 0.4.0 and 1.0.0 for older runtimes): the environment,
//! the network configuration, results and errors. Pure: strings in,
//! values out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The versions this plugin speaks (VERSION lists them).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of them.
pub const LATEST: &str = "1.1.0";
/// The socket the node agent listens on unless the configuration names another.
pub const DEFAULT_SOCKET: &str = "/run/palisade/cni.sock";

/// The spec's error codes (section "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 1: incompatible CNI version.
    IncompatibleVersion,
    /// 2: unsupported field in the network configuration.
    UnsupportedField,
    /// 3: container unknown or does not exist.
    UnknownContainer,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment,
    /// 5: I/O failure.
    Io,
    /// 6: failed to decode content.
    Decode,
    /// 7: invalid network configuration.
    InvalidConfig,
    /// 11: try again later.
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    NotAvailable,
    /// 999: the plugin's own failures (an address pool exhausted, a kernel refusal).
    Plugin,
}

impl ErrorCode {
    /// The number the spec gives it.
    pub fn number(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnvironment => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::NotAvailable => 50,
            ErrorCode::Plugin => 999,
        }
    }
}

/// A CNI error: what the plugin prints (as JSON) when a call fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The spec's code.
    pub code: ErrorCode,
    /// A short message naming the cause.
    pub msg: String,
    /// More about it.
    pub details: String,
}

impl CniError {
    /// An error with a message and details.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error JSON, for a configuration of `version`.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code.number(),
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Check an attachment is as ADD left it.
    Check,
    /// Whether ADD can succeed now.
    Status,
    /// Remove attachments not in the runtime's list.
    Gc,
    /// The versions spoken.
    Version,
}

/// The environment of one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for STATUS, GC, VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (ADD, CHECK; DEL when the namespace still exists).
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, in order.
    pub args: Vec<(String, String)>,
}

fn env_error(var: &str, why: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{var} {why}"),
        String::new(),
    )
}

impl Invocation {
    /// Reads the environment through `var` (`std::env::var` in the
    /// binary), checking what each verb needs.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
        let command = match var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(env_error(
                    "CNI_COMMAND",
                    &format!("is {other:?}, not ADD, DEL, CHECK, STATUS, GC or VERSION"),
                ));
            }
            None => return Err(env_error("CNI_COMMAND", "is not set")),
        };
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = var("CNI_CONTAINERID").unwrap_or_default();
        let ifname = var("CNI_IFNAME").unwrap_or_default();
        let netns = var("CNI_NETNS").filter(|n| !n.is_empty());
        if per_container {
            check_container_id(&container_id)?;
            check_ifname(&ifname)?;
            if command != Command::Del && netns.is_none() {
                return Err(env_error("CNI_NETNS", "is not set"));
            }
        }
        let args = parse_args(&var("CNI_ARGS").unwrap_or_default())?;
        Ok(Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The value of a `CNI_ARGS` key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn check_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else if id.is_empty() {
        Err(env_error("CNI_CONTAINERID", "is not set"))
    } else {
        Err(env_error(
            "CNI_CONTAINERID",
            &format!(
                "{id:?} is not letters, digits, '_', '.' and '-' starting with a letter or digit"
            ),
        ))
    }
}

fn check_ifname(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(env_error("CNI_IFNAME", "is not set"));
    }
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(env_error(
            "CNI_IFNAME",
            &format!("{name:?} is not an interface name (at most 15 bytes, no '/', ':' or spaces)"),
        ));
    }
    Ok(())
}

/// `K1=V1;K2=V2`.
fn parse_args(text: &str) -> Result<Vec<(String, String)>, CniError> {
    text.split(';')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(env_error("CNI_ARGS", &format!("has {p:?}, not KEY=VALUE"))),
        })
        .collect()
}

/// A container attachment the runtime still holds (GC's list).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    /// Its container.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface.
    pub ifname: String,
}

/// The network configuration: the spec's fields and Palisade's.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`: the network (and the first half of the IPAM handle).
    pub name: String,
    /// `mtu`: the pod's MTU; none: the agent's (the underlay's less VXLAN's 50).
    pub mtu: Option<u32>,
    /// `agent_socket`: where the agent listens.
    pub agent_socket: String,
    /// `namespace`: the namespace of containers whose runtime does not say
    /// (podman passes only `K8S_POD_NAME`).
    pub namespace: Option<String>,
    /// `labels`: labels of this network's containers (when no Pod object says).
    pub labels: BTreeMap<String, String>,
    /// `ipam.ipv4_pools`: the pools (names or CIDRs) to take addresses from.
    pub ipv4_pools: Vec<String>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The configuration as given (IPAM reads its own fields).
    pub raw: Value,
}

fn invalid(field: &str, why: impl std::fmt::Display) -> CniError {
    CniError::new(
        ErrorCode::InvalidConfig,
        format!("invalid network configuration: {field}"),
        why.to_string(),
    )
}

/// Whether a configuration of `version` may use STATUS and GC.
pub fn at_least_1_1(version: &str) -> bool {
    version == "1.1.0"
}

impl NetConf {
    /// Parses and checks a configuration (stdin of every call).
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network configuration is not JSON",
                e.to_string(),
            )
        })?;
        if !raw.is_object() {
            return Err(CniError::new(
                ErrorCode::Decode,
                "the network configuration is not a JSON object",
                String::new(),
            ));
        }
        let text = |field: &str| -> Result<Option<String>, CniError> {
            match &raw[field] {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(invalid(field, format!("{other} is not a string"))),
            }
        };
        let cni_version = text("cniVersion")?.ok_or_else(|| invalid("cniVersion", "is missing"))?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("incompatible CNI version {cni_version}"),
                format!("palisade-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let name = text("name")?.ok_or_else(|| invalid("name", "is missing"))?;
        let name_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !name_ok {
            return Err(invalid(
                "name",
                format!(
                    "{name:?} is not letters, digits, '_', '.' and '-' starting with a letter or digit"
                ),
            ));
        }
        if text("type")?.is_none() {
            return Err(invalid("type", "is missing"));
        }
        let mtu = match &raw["mtu"] {
            Value::Null => None,
            v => match v.as_u64() {
                Some(0) => None,
                Some(m @ 68..=65535) => Some(m as u32),
                _ => return Err(invalid("mtu", format!("{v} is not 0 or 68 to 65535"))),
            },
        };
        let agent_socket = text("agent_socket")?.unwrap_or_else(|| DEFAULT_SOCKET.to_string());
        let namespace = text("namespace")?;
        let labels = match &raw["labels"] {
            Value::Null => BTreeMap::new(),
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(invalid(
                        &format!("labels.{k}"),
                        format!("{other} is not a string"),
                    )),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(invalid("labels", format!("{other} is not an object"))),
        };
        let ipam = &raw["ipam"];
        match &ipam["type"] {
            Value::Null => {}
            Value::String(t) if t == "palisade-ipam" || t == "calico-ipam" => {}
            other => {
                return Err(CniError::new(
                    ErrorCode::UnsupportedField,
                    "invalid network configuration: ipam.type",
                    format!(
                        "{other} is not supported: palisade-cni assigns addresses through the node agent (palisade-ipam, calico-ipam)"
                    ),
                ));
            }
        }
        let ipv4_pools = match &ipam["ipv4_pools"] {
            Value::Null => Vec::new(),
            Value::Array(a) => a
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid("ipam.ipv4_pools", format!("{p} is not a string")))
                })
                .collect::<Result<_, _>>()?,
            other => return Err(invalid("ipam.ipv4_pools", format!("{other} is not a list"))),
        };
        let valid_attachments = match &raw["cni.dev/valid-attachments"] {
            Value::Null => None,
            v => Some(
                serde_json::from_value::<Vec<Attachment>>(v.clone())
                    .map_err(|e| invalid("cni.dev/valid-attachments", e))?,
            ),
        };
        Ok(NetConf {
            cni_version,
            name,
            mtu,
            agent_socket,
            namespace,
            labels,
            ipv4_pools,
            valid_attachments,
            raw,
        })
    }
}

/// What ADD made, whatever the version asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// The host end of the veth.
    pub host_ifname: String,
    /// The container end (`CNI_IFNAME`).
    pub pod_ifname: String,
    /// The container end's MAC.
    pub pod_mac: String,
    /// The container's namespace path.
    pub sandbox: String,
    /// Its addresses (host prefixes: /32, /128).
    pub ips: Vec<IpNet>,
    /// Its routes: destination and gateway.
    pub routes: Vec<(IpNet, IpAddr)>,
    /// Its MTU.
    pub mtu: u32,
}

/// The result JSON of an ADD for a configuration of `version`.
pub fn result_json(version: &str, a: &Attached) -> Value {
    let old = version.starts_with("0.");
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|ip| {
            let mut v = json!({"address": ip.to_string(), "interface": 1});
            if old {
                v["version"] = json!(if ip.addr().is_ipv4() { "4" } else { "6" });
            }
            v
        })
        .collect();
    let routes: Vec<Value> = a
        .routes
        .iter()
        .map(|(dst, gw)| json!({"dst": dst.to_string(), "gw": gw.to_string()}))
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host_ifname, "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": a.pod_ifname, "mac": a.pod_mac, "sandbox": a.sandbox, "mtu": a.mtu},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// VERSION's answer.
pub fn version_json(version: &str) -> Value {
    json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_environment_is_checked_per_verb() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME=web;IgnoreUnknown=1"),
        ];
        let inv = Invocation::from_env(env(&add)).unwrap();
        assert_eq!(inv.arg("K8S_POD_NAME"), Some("web"));
        let no_netns = [add[0], add[1], add[3]];
        let e = Invocation::from_env(env(&no_netns)).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (ErrorCode::InvalidEnvironment, "CNI_NETNS is not set")
        );
        // DEL without a namespace is fine (it may be gone already).
        let del = [("CNI_COMMAND", "DEL"), add[1], add[3]];
        assert!(Invocation::from_env(env(&del)).is_ok());
        let bad_if = [add[0], add[1], add[2], ("CNI_IFNAME", "eth0/x")];
        assert!(
            Invocation::from_env(env(&bad_if))
                .unwrap_err()
                .msg
                .contains("CNI_IFNAME")
        );
        let bad_args = [add[0], add[1], add[2], add[3], ("CNI_ARGS", "novalue")];
        assert!(
            Invocation::from_env(env(&bad_args))
                .unwrap_err()
                .msg
                .contains("CNI_ARGS")
        );
        let version = [("CNI_COMMAND", "VERSION")];
        assert_eq!(
            Invocation::from_env(env(&version)).unwrap().command,
            Command::Version
        );
        assert!(Invocation::from_env(env(&[("CNI_COMMAND", "UP")])).is_err());
    }

    #[test]
    fn configurations_are_checked_with_the_field_named() {
        let ok = br#"{"cniVersion":"1.0.0","name":"frontend","type":"palisade-cni",
            "namespace":"shop","labels":{"app":"web"},"ipam":{"type":"calico-ipam","ipv4_pools":["frontend"]}}"#;
        let c = NetConf::parse(ok).unwrap();
        assert_eq!(c.ipv4_pools, vec!["frontend".to_string()]);
        assert_eq!(c.agent_socket, DEFAULT_SOCKET);
        let cases: [(&[u8], ErrorCode, &str); 7] = [
            (b"{", ErrorCode::Decode, "not JSON"),
            (
                br#"{"name":"n","type":"t"}"#,
                ErrorCode::InvalidConfig,
                "cniVersion",
            ),
            (
                br#"{"cniVersion":"2.0.0","name":"n","type":"t"}"#,
                ErrorCode::IncompatibleVersion,
                "2.0.0",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"a b","type":"t"}"#,
                ErrorCode::InvalidConfig,
                "name",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"t","mtu":9}"#,
                ErrorCode::InvalidConfig,
                "mtu",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"type":"host-local"}}"#,
                ErrorCode::UnsupportedField,
                "ipam.type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"ipv4_pools":"x"}}"#,
                ErrorCode::InvalidConfig,
                "ipam.ipv4_pools",
            ),
        ];
        for (text, code, says) in cases {
            let e = NetConf::parse(text).unwrap_err();
            assert_eq!(e.code, code, "{e}");
            assert!(e.to_string().contains(says), "{e} does not say {says}");
        }
    }

    #[test]
    fn results_follow_the_version_asked_for() {
        let a = Attached {
            host_ifname: "cali0123456789a".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "02:00:00:00:00:01".into(),
            sandbox: "/run/netns/x".into(),
            ips: vec!["10.10.0.5/32".parse().unwrap()],
            routes: vec![("0.0.0.0/0".parse().unwrap(), "169.254.1.1".parse().unwrap())],
            mtu: 1450,
        };
        let new = result_json("1.0.0", &a);
        assert_eq!(
            new["ips"][0],
            json!({"address": "10.10.0.5/32", "interface": 1})
        );
        let old = result_json("0.4.0", &a);
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(version_json("1.1.0")["supportedVersions"][2], "0.4.0");
        let e = CniError::new(
            ErrorCode::TryAgainLater,
            "the node agent is not running",
            "x",
        );
        assert_eq!(e.to_json("1.0.0")["code"], 11);
    }
}
