//! An API server that replays responses: kube's client runs on a tower
//! service that answers each request with the next reply scripted for its
//! path (list or watch), and records every request it got. A write
//! (PATCH) is answered with the object and its body kept.
//!
//! The replies are shaped as the API server writes them (List kinds with
//! `metadata.resourceVersion` and `continue`, items without kind, watch
//! frames one JSON object per line, BOOKMARK frames, `Status` bodies for
//! 403/410/429); none was recorded from a live server, since none can run
//! on these machines.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

type Chunk = Result<Bytes, std::io::Error>;
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

enum Reply {
    Json(u16, Value),
    Stream(UnboundedReceiver<Chunk>),
}

#[derive(Default)]
struct Script {
    replies: HashMap<(String, bool), VecDeque<Reply>>,
    requests: Vec<String>,
    /// `(method path, body)` of every request that carried one.
    bodies: Vec<(String, Value)>,
    /// Senders of the quiet watches handed out unscripted, kept open.
    quiet: Vec<UnboundedSender<Chunk>>,
}

/// The replaying API server.
#[derive(Clone, Default)]
pub struct MockApi {
    script: Arc<Mutex<Script>>,
}

/// A watch stream the test writes to.
pub struct Feed {
    tx: UnboundedSender<Chunk>,
}

impl Feed {
    fn frame(&self, frame: Value) {
        let mut line = frame.to_string().into_bytes();
        line.push(b'\n');
        let _ = self.tx.send(Ok(line.into()));
    }

    /// An ADDED, MODIFIED or DELETED event.
    pub fn event(&self, kind: &str, object: Value) {
        self.frame(json!({"type": kind, "object": object}));
    }

    /// A BOOKMARK at `version`.
    pub fn bookmark(&self, api_version: &str, kind: &str, version: &str) {
        self.frame(
            json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": version,
                         "annotations": {"k8s.io/initial-events-end": "true"}}}}),
        );
    }

    /// An ERROR frame carrying a Status (`410` expired).
    pub fn error(&self, code: u16, reason: &str, message: &str) {
        self.frame(json!({"type": "ERROR", "object": status(code, reason, message)}));
    }

    /// Half a frame, then the connection fails.
    pub fn break_mid_event(&self, object: Value) {
        let whole = json!({"type": "MODIFIED", "object": object}).to_string();
        let _ = self
            .tx
            .send(Ok(Bytes::from(whole[..whole.len() / 2].to_string())));
        let _ = self.tx.send(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
    }
}

/// A `Status` object as the API server sends it.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A kube client whose requests `answer` serves (head and whole body).
pub fn client_on(
    answer: impl Fn(http::Request<()>, Bytes) -> http::Response<Body> + Clone + Send + Sync + 'static,
) -> kube::Client {
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let answer = answer.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, Infallible>(answer(http::Request::from_parts(parts, ()), bytes))
        }
    });
    kube::Client::new(service, "default")
}

/// A List as the API server sends it (items without kind and apiVersion).
pub fn list(
    api_version: &str,
    kind: &str,
    version: &str,
    next: Option<&str>,
    items: &[Value],
) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut i = i.clone();
            if let Value::Object(m) = &mut i {
                m.remove("kind");
                m.remove("apiVersion");
            }
            i
        })
        .collect();
    let mut metadata = json!({"resourceVersion": version});
    if let Some(token) = next {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(1);
    }
    json!({"kind": format!("{kind}List"), "apiVersion": api_version,
           "metadata": metadata, "items": items})
}

fn path_of(uri: &http::Uri) -> (String, bool) {
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
    (uri.path().to_string(), watch)
}

impl MockApi {
    /// A kube client on this server (call on the store's runtime).
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        client_on(move |req, body| me.answer(&req, &body))
    }

    fn answer(&self, req: &http::Request<()>, body: &[u8]) -> http::Response<Body> {
        let mut s = self.script.lock().unwrap();
        if *req.method() != http::Method::GET {
            s.requests.push(format!("{} {}", req.method(), req.uri()));
            let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            s.bodies
                .push((format!("{} {}", req.method(), req.uri().path()), sent));
            // The API server answers a patch with the object it now holds.
            let name = req.uri().path().rsplit('/').next().unwrap_or_default();
            let kind = if req.uri().path().contains("/pods/") {
                "Pod"
            } else {
                "Node"
            };
            return http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(
                    Full::new(Bytes::from(
                        json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name}})
                            .to_string(),
                    ))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
                )
                .expect("a valid response");
        }
        s.requests.push(req.uri().to_string());
        let key = path_of(req.uri());
        let reply = s.replies.get_mut(&key).and_then(VecDeque::pop_front);
        let reply = match reply {
            Some(r) => r,
            // Unscripted: an empty kind, then a watch on which nothing happens.
            None if key.1 => {
                let (tx, rx) = unbounded_channel();
                s.quiet.push(tx);
                Reply::Stream(rx)
            }
            None => Reply::Json(200, list("v1", "Unscripted", "1", None, &[])),
        };
        let (code, body): (u16, Body) = match reply {
            Reply::Json(code, v) => (
                code,
                Full::new(Bytes::from(v.to_string()))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Reply::Stream(rx) => {
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|chunk| (chunk.map(Frame::data), rx))
                });
                (200, StreamBody::new(frames).boxed_unsync())
            }
        };
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(body)
            .expect("a valid response")
    }

    fn push(&self, path: &str, watch: bool, reply: Reply) {
        self.script
            .lock()
            .unwrap()
            .replies
            .entry((path.to_string(), watch))
            .or_default()
            .push_back(reply);
    }

    /// The next list of `path` answers `code` with `body`.
    pub fn on_list(&self, path: &str, code: u16, body: Value) {
        self.push(path, false, Reply::Json(code, body));
    }

    /// The next watch of `path` streams what the test feeds.
    pub fn on_watch(&self, path: &str) -> Feed {
        let (tx, rx) = unbounded_channel();
        self.push(path, true, Reply::Stream(rx));
        Feed { tx }
    }

    /// The first request `matches` accepts, waiting up to 10 s for it.
    pub fn wait_for(&self, matches: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| matches(r)) {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no such request: {:?}",
                self.requests()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// `(method path, body)` of every write so far.
    pub fn bodies(&self) -> Vec<(String, Value)> {
        self.script.lock().unwrap().bodies.clone()
    }

    /// Every request so far (path and query; writes with their method).
    pub fn requests(&self) -> Vec<String> {
        self.script.lock().unwrap().requests.clone()
    }
}
