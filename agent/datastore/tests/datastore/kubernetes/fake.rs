//! A stateful stand-in for the API server's custom-resource endpoints, for
//! IPAM: get, list, create, replace and delete of cluster-scoped objects,
//! with resourceVersion preconditions answered as the API server answers
//! them (409 Conflict, 409 AlreadyExists, 404 NotFound as `Status`), one
//! version counter for all. Optionally it answers half of all writes,
//! picked by a seeded generator, with a conflict, after another writer
//! rewrote the object unchanged (its version moves on). (Not "the first
//! attempt of each write": a retry that picks another random block, as
//! allocation from single-address blocks does, would never get through.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::mock::{Body, client_on, status};

#[derive(Default)]
struct State {
    version: u64,
    /// `(plural, name)` → object.
    objects: BTreeMap<(String, String), Value>,
    /// xorshift state of the conflict injection (0: none).
    conflicts: u64,
    /// The next writes' fates, before the generator's (true: conflict).
    scripted: std::collections::VecDeque<bool>,
    writes: usize,
    injected: usize,
    log: Vec<String>,
}

/// The stand-in server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn reply(code: u16, body: &Value) -> http::Response<Body> {
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("a valid response")
}

fn not_found(plural: &str, name: &str) -> http::Response<Body> {
    reply(
        404,
        &status(
            404,
            "NotFound",
            &format!("{plural}.crd.projectcalico.org \"{name}\" not found"),
        ),
    )
}

fn conflict(plural: &str, name: &str) -> http::Response<Body> {
    reply(
        409,
        &status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {plural}.crd.projectcalico.org \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        ),
    )
}

/// A DNS subdomain, as the API server requires of names.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl FakeApi {
    /// Answers half of all writes (seeded by `seed`) with a conflict.
    pub fn conflicting(seed: u64) -> Self {
        let fake = Self::default();
        fake.state.lock().unwrap().conflicts = seed | 1;
        fake
    }

    /// The next writes meet a conflict where `fates` says true.
    pub fn script_conflicts(&self, fates: &[bool]) {
        self.state.lock().unwrap().scripted.extend(fates);
    }

    /// A kube client on this server.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        client_on(move |req, body| me.answer(req.method(), req.uri(), &body))
    }

    /// Writes answered, and how many of them with an injected conflict.
    pub fn writes(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.writes, s.injected)
    }

    /// Every stored object of `plural`.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .iter()
            .filter(|((p, _), _)| p == plural)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// `(group, resource, verb)` of every request, as RBAC names them.
    pub fn calls(&self) -> Vec<(String, String, String)> {
        self.log()
            .iter()
            .map(|line| {
                let mut words = line.split(' ');
                let method = words.next().unwrap_or_default();
                let path = words.next().unwrap_or_default();
                let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                let verb = match (method, parts.len()) {
                    ("GET", 4) => "list",
                    ("GET", _) => "get",
                    ("POST", _) => "create",
                    ("PUT", _) => "update",
                    ("DELETE", _) => "delete",
                    (other, _) => other,
                };
                (parts[1].to_string(), parts[3].to_string(), verb.to_string())
            })
            .collect()
    }

    /// Every request and its answer's code.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn answer(&self, method: &http::Method, uri: &http::Uri, body: &[u8]) -> http::Response<Body> {
        let response = self.answer_inner(method, uri, body);
        self.state.lock().unwrap().log.push(format!(
            "{method} {} {} -> {}",
            uri.path(),
            String::from_utf8_lossy(body),
            response.status().as_u16()
        ));
        response
    }

    fn answer_inner(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        body: &[u8],
    ) -> http::Response<Body> {
        let parts: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
        let (plural, name) = match parts.as_slice() {
            ["apis", "crd.projectcalico.org", "v1", plural] => (*plural, None),
            ["apis", "crd.projectcalico.org", "v1", plural, name] => (*plural, Some(*name)),
            _ => {
                return reply(
                    404,
                    &status(404, "NotFound", &format!("no such path {}", uri.path())),
                );
            }
        };
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut s = self.state.lock().unwrap();
        let s = &mut *s;
        let write = *method != http::Method::GET;
        if write {
            s.writes += 1;
            let inject = if let Some(fate) = s.scripted.pop_front() {
                fate
            } else {
                s.conflicts != 0 && {
                    s.conflicts ^= s.conflicts << 13;
                    s.conflicts ^= s.conflicts >> 7;
                    s.conflicts ^= s.conflicts << 17;
                    s.conflicts.is_multiple_of(2)
                }
            };
            if inject {
                s.injected += 1;
                let target = name
                    .or_else(|| request["metadata"]["name"].as_str())
                    .unwrap_or_default();
                let key = (plural.to_string(), target.to_string());
                if let Some(object) = s.objects.get_mut(&key) {
                    // Another writer rewrote it unchanged.
                    s.version += 1;
                    object["metadata"]["resourceVersion"] = json!(s.version.to_string());
                }
                return conflict(plural, target);
            }
        }
        match (method.as_str(), name) {
            ("GET", None) => {
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((p, _), _)| p == plural)
                    .map(|(_, o)| o.clone())
                    .collect();
                reply(
                    200,
                    &json!({"apiVersion": "crd.projectcalico.org/v1", "kind": "List",
                    "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name)) => match s.objects.get(&(plural.to_string(), name.to_string())) {
                Some(o) => reply(200, o),
                None => not_found(plural, name),
            },
            ("POST", None) => {
                let name = request["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if !valid_name(&name) {
                    return reply(
                        422,
                        &status(
                            422,
                            "Invalid",
                            &format!("metadata.name: Invalid value: {name:?}"),
                        ),
                    );
                }
                let key = (plural.to_string(), name.clone());
                if s.objects.contains_key(&key) {
                    return reply(
                        409,
                        &status(
                            409,
                            "AlreadyExists",
                            &format!("{plural}.crd.projectcalico.org \"{name}\" already exists"),
                        ),
                    );
                }
                s.version += 1;
                let mut object = request.clone();
                object["metadata"]["resourceVersion"] = json!(s.version.to_string());
                object["metadata"]["uid"] = json!(format!("uid-{}", s.version));
                s.objects.insert(key, object.clone());
                reply(201, &object)
            }
            ("PUT", Some(name)) => {
                let key = (plural.to_string(), name.to_string());
                let Some(current) = s.objects.get(&key) else {
                    return not_found(plural, name);
                };
                if request["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]
                {
                    return conflict(plural, name);
                }
                s.version += 1;
                let mut object = request.clone();
                object["metadata"]["resourceVersion"] = json!(s.version.to_string());
                object["metadata"]["uid"] = current["metadata"]["uid"].clone();
                s.objects.insert(key, object.clone());
                reply(200, &object)
            }
            ("DELETE", Some(name)) => {
                let key = (plural.to_string(), name.to_string());
                let Some(current) = s.objects.get(&key) else {
                    return not_found(plural, name);
                };
                let wanted = &request["preconditions"]["resourceVersion"];
                if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
                    return conflict(plural, name);
                }
                let object = s.objects.remove(&key).unwrap_or_default();
                s.version += 1;
                reply(200, &object)
            }
            _ => reply(405, &status(405, "MethodNotAllowed", "not here")),
        }
    }
}
