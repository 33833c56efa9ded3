//! A small stateful stand-in of the Kubernetes API over HTTP/1.1, for the
//! agent's own client: objects by collection, one version counter, list,
//! watch (the events after the version asked for, then new ones, chunked),
//! get, create, replace (compare-and-swap on resourceVersion), merge patch
//! and delete (with a resourceVersion precondition), answered with the
//! codes and `Status` bodies the API server uses. No API server can run on
//! these machines; this is what the agent talks to in their place.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Default)]
struct State {
    version: u64,
    /// `(collection, namespace/name or name)` → object.
    objects: BTreeMap<(String, String), Value>,
    /// `(version, collection, type, object)` of every change.
    events: Vec<(u64, String, &'static str, Value)>,
    requests: Vec<String>,
}

/// The stand-in (stops serving when dropped).
pub struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A request's target: collection (`/api/v1/pods`), namespace, name.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let Value::Object(t) = target else { return };
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl State {
    fn key(object: &Value) -> String {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        match object["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        }
    }

    /// Stores `object` in `collection` with the next version; the event.
    fn put(&mut self, collection: &str, mut object: Value, kind: &'static str) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let key = (collection.to_string(), Self::key(&object));
        self.objects.insert(key, object.clone());
        self.events
            .push((self.version, collection.to_string(), kind, object.clone()));
        object
    }

    fn answer(&mut self, method: &str, t: &Target, body: &Value) -> (u16, Value) {
        let key = |name: &str| {
            let k = match &t.namespace {
                Some(ns) => format!("{ns}/{name}"),
                None => name.to_string(),
            };
            (t.collection.clone(), k)
        };
        let missing = |name: &str| {
            (
                404,
                status(404, "NotFound", &format!("\"{name}\" not found")),
            )
        };
        match (method, &t.name) {
            ("GET", None) => {
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((c, k), _)| {
                        *c == t.collection
                            && t.namespace
                                .as_ref()
                                .is_none_or(|ns| k.starts_with(&format!("{ns}/")))
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (
                    200,
                    json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": self.version.to_string()}, "items": items}),
                )
            }
            ("GET", Some(name)) => match self.objects.get(&key(name)) {
                Some(o) => (200, o.clone()),
                None => missing(name),
            },
            ("POST", None) => {
                let mut object = body.clone();
                if let Some(ns) = &t.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if self.objects.contains_key(&key(&name)) {
                    return (
                        409,
                        status(409, "AlreadyExists", &format!("\"{name}\" already exists")),
                    );
                }
                (201, self.put(&t.collection, object, "ADDED"))
            }
            ("PUT", Some(name)) => {
                let Some(current) = self.objects.get(&key(name)) else {
                    return missing(name);
                };
                if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                    return (409, status(409, "Conflict", "the object has been modified"));
                }
                (200, self.put(&t.collection, body.clone(), "MODIFIED"))
            }
            ("PATCH", Some(name)) => {
                let Some(mut object) = self.objects.get(&key(name)).cloned() else {
                    return missing(name);
                };
                merge(&mut object, body);
                (200, self.put(&t.collection, object, "MODIFIED"))
            }
            ("DELETE", Some(name)) => {
                let Some(current) = self.objects.get(&key(name)).cloned() else {
                    return missing(name);
                };
                let wanted = &body["preconditions"]["resourceVersion"];
                if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
                    return (409, status(409, "Conflict", "precondition failed"));
                }
                self.objects.remove(&key(name));
                self.version += 1;
                self.events.push((
                    self.version,
                    t.collection.clone(),
                    "DELETED",
                    current.clone(),
                ));
                (200, current)
            }
            _ => (405, status(405, "MethodNotAllowed", method)),
        }
    }
}

impl KubeApi {
    /// Serves on loopback inside network namespace `netns`, holding
    /// `objects` (`(collection, object)`).
    pub fn start(netns: &str, objects: Vec<(&str, Value)>) -> KubeApi {
        let listener = listen_in(netns);
        let mut state = State::default();
        for (collection, object) in objects {
            state.put(collection, object, "ADDED");
        }
        let api = KubeApi {
            addr: listener.local_addr().unwrap(),
            state: Arc::new(Mutex::new(state)),
            stop: Arc::default(),
        };
        let state = api.state.clone();
        accept_each(listener, api.stop.clone(), move |conn, stop| {
            let _ = serve(conn, &state, stop);
        });
        api
    }

    /// The objects of `collection`.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.objects
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Every request so far (`METHOD target`).
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// A kubeconfig for it, written in `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        kubeconfig(self.addr, dir)
    }
}

/// A listener on loopback inside network namespace `netns` (non-blocking).
pub fn listen_in(netns: &str) -> TcpListener {
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind("127.0.0.1:0").unwrap()
        })
        .join()
        .unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Serves each connection on a thread of its own until `stop`.
pub fn accept_each(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    serve: impl Fn(TcpStream, &AtomicBool) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let (serve, stop) = (serve.clone(), stop.clone());
                    std::thread::spawn(move || serve(conn, &stop));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
}

/// A kubeconfig naming the server at `addr` (plain HTTP, a token).
pub fn kubeconfig(addr: SocketAddr, dir: &Path) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: test, cluster: {{server: \"http://{addr}\"}}}}]\n\
             users: [{{name: agent, user: {{token: test-token}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: agent}}}}]\n\
             current-context: test\n"
        ),
    )
    .unwrap();
    path
}

/// One HTTP/1.1 request: method, target (path and query), body.
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

impl Request {
    /// Reads the next request of a connection (`None`: it closed).
    pub fn read(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let target = words.next().unwrap_or_default().to_string();
        let mut length = 0;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            if header.trim().is_empty() {
                break;
            }
            if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        Ok(Some(Request {
            method,
            target,
            body,
        }))
    }

    /// Path and query.
    pub fn split(&self) -> (&str, &str) {
        self.target.split_once('?').unwrap_or((&self.target, ""))
    }

    /// Whether it asks for a watch.
    pub fn watching(&self) -> bool {
        self.split().1.split('&').any(|p| p == "watch=true")
    }
}

/// Starts a chunked 200 answer (a watch stream).
pub fn start_stream(out: &mut TcpStream) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    out.flush()
}

/// One chunk of a stream.
pub fn chunk(out: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    write!(out, "{:x}\r\n", bytes.len())?;
    out.write_all(bytes)?;
    out.write_all(b"\r\n")?;
    out.flush()
}

/// A whole JSON answer.
pub fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        out,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    out.flush()
}

fn serve(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    while let Some(request) = Request::read(&mut reader)? {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let (path, query) = request.split();
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let method = request.method.as_str();
        state
            .lock()
            .unwrap()
            .requests
            .push(format!("{method} {}", request.target));
        let Some(t) = target(path) else {
            respond(&mut out, 404, &status(404, "NotFound", path))?;
            continue;
        };
        if request.watching() {
            let mut seen: u64 = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            start_stream(&mut out)?;
            while !stop.load(Ordering::Relaxed) {
                let lines: Vec<(u64, String)> = {
                    let s = state.lock().unwrap();
                    s.events
                        .iter()
                        .filter(|(v, c, _, o)| {
                            *v > seen
                                && *c == t.collection
                                && t.namespace
                                    .as_ref()
                                    .is_none_or(|ns| o["metadata"]["namespace"] == *ns)
                        })
                        .map(|(v, _, kind, o)| {
                            (*v, format!("{}\n", json!({"type": kind, "object": o})))
                        })
                        .collect()
                };
                for (v, text) in lines {
                    chunk(&mut out, text.as_bytes())?;
                    seen = v;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        let (code, answer) = state.lock().unwrap().answer(method, &t, &body);
        respond(&mut out, code, &answer)?;
    }
    Ok(())
}
