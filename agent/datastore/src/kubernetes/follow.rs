//! One task per kind: list (in pages), watch from the listing's
//! resourceVersion with bookmarks, resume from the last version seen, list
//! again on `410 Gone`. Everything it learns goes to [`Shared`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use serde_json::Value;
use tokio::sync::watch::Receiver;

use super::convert::{Stored, convert};
use super::{API_KINDS, ApiKind, KindSync, KubeClient, KubeOptions, Shared};

/// Runs every kind's task on a runtime of this thread until the store is
/// dropped.
pub(super) fn run(
    client: KubeClient,
    shared: Arc<Shared>,
    options: KubeOptions,
    stop: Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail_all(&shared, &format!("starting its runtime: {e}")),
    };
    runtime.block_on(async move {
        let client = match client {
            KubeClient::Custom(make) => make(),
            KubeClient::Infer => match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => return fail_all(&shared, &format!("no client configuration: {e}")),
            },
            KubeClient::Kubeconfig(path) => match super::client_from(&path).await {
                Ok(c) => c,
                Err(e) => return fail_all(&shared, &e),
            },
        };
        let tasks = API_KINDS.iter().map(|kind| {
            let shared = Arc::clone(&shared);
            let client = client.clone();
            let mut stop = stop.clone();
            async move {
                tokio::select! {
                    () = follow_kind(client, kind, &shared, options) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
        });
        futures_util::future::join_all(tasks).await;
    });
}

fn fail_all(shared: &Shared, why: &str) {
    for kind in API_KINDS {
        shared.set_sync(kind.resource, KindSync::Failed(why.to_string()));
    }
}

/// What a failed request means for the task.
enum Failure {
    /// `410 Gone`: the version is too old; list again.
    Gone,
    /// `404`: the API does not serve the kind (its CRD is not installed).
    NotServed,
    /// Anything else: out of sync, wait, try again.
    Other(String),
}

fn classify(kind: &ApiKind, e: &kube::Error) -> Failure {
    match e {
        kube::Error::Api(status) => match status.code {
            410 => Failure::Gone,
            404 => Failure::NotServed,
            403 => Failure::Other(format!(
                "403 Forbidden: {} (the agent's ServiceAccount needs get, list and watch on {})",
                status.message, kind.resource
            )),
            429 => Failure::Other(format!(
                "429 throttled by the API server: {}",
                status.message
            )),
            code => Failure::Other(format!("{code} {}: {}", status.reason, status.message)),
        },
        other => Failure::Other(other.to_string()),
    }
}

/// The doubling wait after failures in a row.
struct Backoff {
    next: Duration,
    options: KubeOptions,
}

impl Backoff {
    fn new(options: KubeOptions) -> Self {
        Self {
            next: options.backoff,
            options,
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.options.max_backoff);
    }

    fn reset(&mut self) {
        self.next = self.options.backoff;
    }
}

/// The key and stored document of an API object (`None`: absent).
fn stored(kind: &ApiKind, object: &DynamicObject) -> Option<(String, Option<Value>)> {
    let name = object.metadata.name.as_deref()?;
    let namespace = object.metadata.namespace.as_deref();
    let mut json = serde_json::to_value(object).ok()?;
    // List items carry no apiVersion and kind.
    json["apiVersion"] = Value::from(kind.api_version());
    json["kind"] = Value::from(kind.kind);
    let info = kind.info();
    let key = info.key(namespace.filter(|_| info.namespaced), name);
    Some(match convert(kind.conversion, &json) {
        Stored::Document(d) => (key, Some(d)),
        Stored::Absent => (key, None),
    })
}

fn resource_version(object: &DynamicObject) -> Option<String> {
    object.metadata.resource_version.clone()
}

/// Lists every page; the objects by key and the listing's version.
async fn list(
    api: &Api<DynamicObject>,
    kind: &ApiKind,
    page: u32,
) -> Result<(BTreeMap<String, Value>, String), kube::Error> {
    let mut objects = BTreeMap::new();
    let mut params = ListParams::default().limit(page);
    loop {
        let list = api.list(&params).await?;
        for item in &list.items {
            if let Some((key, Some(document))) = stored(kind, item) {
                objects.insert(key, document);
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = ListParams::default().limit(page).continue_token(&token),
            None => return Ok((objects, list.metadata.resource_version.unwrap_or_default())),
        }
    }
}

/// The task of one kind; returns only when the store stops.
async fn follow_kind(client: kube::Client, kind: &ApiKind, shared: &Shared, options: KubeOptions) {
    let resource = ApiResource {
        group: kind.group.to_string(),
        version: kind.version.to_string(),
        api_version: kind.api_version(),
        kind: kind.kind.to_string(),
        plural: kind.plural.to_string(),
    };
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let prefix = kind.info().key(None, "");
    let mut version: Option<String> = None;
    let mut backoff = Backoff::new(options);
    loop {
        let Some(from) = version.clone() else {
            match list(&api, kind, options.page).await {
                Ok((objects, listed_at)) => {
                    shared.relisted(&prefix, objects);
                    shared.set_sync(kind.resource, KindSync::InSync);
                    version = Some(listed_at);
                    backoff.reset();
                }
                Err(e) => match classify(kind, &e) {
                    Failure::NotServed => {
                        // Nothing of a kind the API does not serve: in
                        // sync with that, and looked for again later.
                        tracing::warn!(
                            kind = kind.resource,
                            "the API does not serve it (CRD not installed?): none"
                        );
                        shared.relisted(&prefix, BTreeMap::new());
                        shared.set_sync(kind.resource, KindSync::InSync);
                        tokio::time::sleep(options.max_backoff).await;
                    }
                    Failure::Gone => {}
                    Failure::Other(why) => {
                        shared.set_sync(kind.resource, KindSync::Failed(format!("list: {why}")));
                        backoff.wait().await;
                    }
                },
            }
            continue;
        };
        // Bookmarks are asked for by default: they move `version` on while
        // nothing of this kind changes, so a resume needs no re-list.
        let params = WatchParams::default().timeout(options.watch_timeout);
        let stream = match api.watch(&params, &from).await {
            Ok(s) => {
                shared.set_sync(kind.resource, KindSync::InSync);
                s
            }
            Err(e) => {
                match classify(kind, &e) {
                    Failure::Gone => {
                        shared.set_sync(
                            kind.resource,
                            KindSync::Failed("410 Gone: listing again".into()),
                        );
                        version = None;
                    }
                    Failure::NotServed => version = None,
                    Failure::Other(why) => {
                        shared.set_sync(kind.resource, KindSync::Failed(format!("watch: {why}")));
                        backoff.wait().await;
                    }
                }
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                    if let Some(change) = stored(kind, &o) {
                        shared.write(vec![change]);
                    }
                    version = resource_version(&o).or(version);
                    backoff.reset();
                }
                Ok(WatchEvent::Deleted(o)) => {
                    if let Some((key, _)) = stored(kind, &o) {
                        shared.write(vec![(key, None)]);
                    }
                    version = resource_version(&o).or(version);
                }
                Ok(WatchEvent::Bookmark(b)) => version = Some(b.metadata.resource_version),
                Ok(WatchEvent::Error(status)) if status.code == 410 => {
                    shared.set_sync(
                        kind.resource,
                        KindSync::Failed("410 Gone: listing again".into()),
                    );
                    version = None;
                    break;
                }
                Ok(WatchEvent::Error(status)) => {
                    shared.set_sync(
                        kind.resource,
                        KindSync::Failed(format!(
                            "watch: {} {}: {}",
                            status.code, status.reason, status.message
                        )),
                    );
                    backoff.wait().await;
                    break;
                }
                Err(e) => {
                    // Broken mid-stream: resume from the last version seen.
                    shared.set_sync(kind.resource, KindSync::Failed(format!("watch broke: {e}")));
                    backoff.wait().await;
                    break;
                }
            }
        }
        // A watch the server ended resumes from where it was.
    }
}
