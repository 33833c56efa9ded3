//! The Kubernetes datastore report: how long the agent's store takes to
//! list N pods from the API and be in sync (every kind listed and watched),
//! and how fast it follows pod events, each next to the floor measured in
//! the same run: parsing the same JSON the API sent, nothing else. Writes
//! `docs/kubernetes-sync.md`.
//!
//! ```text
//! cargo xtask report kube                      # 1k, 10k and 50k pods
//! cargo xtask report kube -- --sizes 1000,5000
//! ```
//!
//! The API is kube's client on an in-process service answering as the API
//! server does (pages of 500 with `continue`, chunked watch events); no
//! network, so the ratio is the store's own cost: conversion, keys, the
//! change log.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use palisade_datastore::{Datastore, Follower, KubeClient, KubeOptions, KubeStore};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

const PAGE: usize = 500;

type Chunk = Result<Bytes, std::io::Error>;

fn pod(i: usize, app: &str, version: usize) -> Value {
    json!({"metadata": {"name": format!("pod-{i}"), "namespace": format!("ns-{}", i % 50),
                        "labels": {"app": app, "tier": format!("t{}", i % 7)},
                        "resourceVersion": version.to_string(), "uid": format!("uid-{i}")},
           "spec": {"nodeName": format!("node-{}", i % 100), "serviceAccountName": "default",
                    "containers": [{"name": "main", "image": "busybox",
                                    "ports": [{"name": "http", "containerPort": 8080}]}]},
           "status": {"phase": "Running", "podIP": format!("10.{}.{}.{}", 10 + i / 65536, (i / 256) % 256, i % 256),
                      "podIPs": [{"ip": format!("10.{}.{}.{}", 10 + i / 65536, (i / 256) % 256, i % 256)}]}})
}

/// The list pages of `n` pods, as the API server writes them.
fn pages(n: usize) -> Vec<String> {
    let count = n.div_ceil(PAGE).max(1);
    (0..count)
        .map(|p| {
            let items: Vec<Value> = (p * PAGE..((p + 1) * PAGE).min(n))
                .map(|i| pod(i, "web", 1))
                .collect();
            let mut metadata = json!({"resourceVersion": "1000"});
            if p + 1 < count {
                metadata["continue"] = json!(format!("page-{}", p + 1));
            }
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items})
                .to_string()
        })
        .collect()
}

/// The service: pod pages by `continue`, empty lists elsewhere; the pods
/// watch streams what is sent on `events`, other watches stay quiet.
fn client(
    pages: Arc<Vec<String>>,
    events: Arc<Mutex<Option<UnboundedReceiver<Chunk>>>>,
) -> kube::Client {
    let quiet: Arc<Mutex<Vec<UnboundedSender<Chunk>>>> = Arc::default();
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let (pages, events, quiet) = (pages.clone(), events.clone(), quiet.clone());
        async move {
            let query = req.uri().query().unwrap_or_default().to_string();
            let path = req.uri().path().to_string();
            let body = if query.contains("watch=true") {
                let feed = if path == "/api/v1/pods" {
                    events.lock().unwrap().take()
                } else {
                    None
                };
                let rx = match feed {
                    Some(rx) => rx,
                    None => {
                        let (tx, rx) = unbounded_channel();
                        quiet.lock().unwrap().push(tx);
                        rx
                    }
                };
                let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|c| (c.map(Frame::data), rx))
                });
                StreamBody::new(frames).boxed_unsync()
            } else {
                let text = if path == "/api/v1/pods" {
                    let page = query
                        .split('&')
                        .find_map(|p| p.strip_prefix("continue=page-"))
                        .and_then(|p| p.parse::<usize>().ok())
                        .unwrap_or(0);
                    pages[page].clone()
                } else {
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
                        .to_string()
                };
                Full::new(Bytes::from(text))
                    .map_err(|never| match never {})
                    .boxed_unsync()
            };
            Ok::<_, Infallible>(
                http::Response::builder()
                    .status(200)
                    .body(body)
                    .expect("a response"),
            )
        }
    });
    kube::Client::new(service, "default")
}

struct Row {
    pods: usize,
    sync: Duration,
    parse: Duration,
    events: usize,
    follow: Duration,
    parse_events: Duration,
}

fn measure(n: usize) -> Result<Row> {
    let pages = Arc::new(pages(n));
    let (tx, rx) = unbounded_channel();
    let events = Arc::new(Mutex::new(Some(rx)));
    let started = Instant::now();
    let (p, e) = (pages.clone(), events.clone());
    let store = KubeStore::start(
        KubeClient::Custom(Arc::new(move || client(p.clone(), e.clone()))),
        KubeOptions {
            sync_timeout: Duration::from_secs(600),
            page: PAGE as u32,
            log_limit: 4 * n.max(1000),
            ..KubeOptions::default()
        },
    )?;
    let snapshot = store.snapshot()?;
    let sync = started.elapsed();
    let endpoints = snapshot
        .objects
        .iter()
        .filter(|o| o.object.kind == "WorkloadEndpoint")
        .count();
    if endpoints != n {
        bail!("{endpoints} of {n} pods listed as endpoints");
    }
    let started = Instant::now();
    for page in pages.iter() {
        std::hint::black_box(serde_json::from_str::<Value>(page)?);
    }
    let parse = started.elapsed();

    // Events: every pod relabelled once.
    let m = n;
    let lines: Vec<String> = (0..m)
        .map(|i| {
            format!(
                "{}\n",
                json!({"type": "MODIFIED", "object": pod(i, "api", 2000 + i)})
            )
        })
        .collect();
    let mut follower = store.watch(snapshot.revision)?;
    let started = Instant::now();
    for line in &lines {
        tx.send(Ok(Bytes::from(line.clone())))?;
    }
    let mut seen = 0;
    while seen < m {
        seen += follower.next(Some(Duration::from_secs(60)))?.len();
    }
    let follow = started.elapsed();
    let started = Instant::now();
    for line in &lines {
        std::hint::black_box(serde_json::from_str::<Value>(line)?);
    }
    let parse_events = started.elapsed();
    Ok(Row {
        pods: n,
        sync,
        parse,
        events: m,
        follow,
        parse_events,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sizes = palisade_benches::sizes_arg(&args, &[1_000, 10_000, 50_000])?;
    let mut rows = Vec::new();
    for &n in &sizes {
        // The median of three runs by sync time.
        let mut runs: Vec<Row> = (0..3).map(|_| measure(n)).collect::<Result<_>>()?;
        runs.sort_by_key(|r| r.sync);
        let row = runs.swap_remove(1);
        eprintln!(
            "{n} pods: in sync in {:?} (parse {:?}); {} events followed in {:?} (parse {:?})",
            row.sync, row.parse, row.events, row.follow, row.parse_events
        );
        rows.push(row);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut md = String::from(
        "# The Kubernetes datastore: listing and following pods\n\n\
         `cargo xtask report kube` (benches/src/bin/kube-report.rs), release build, this 2-core VM.\n\
         kube's client on an in-process service answering as the API server does (pages of 500,\n\
         chunked watch events), so no network: what remains is the store's own work (conversion\n\
         into workload endpoints, keys, the change log) next to the floor measured in the same\n\
         run, parsing the same JSON and nothing else. Median of 3.\n\n\
         | pods | in sync (all 17 kinds listed, watched) | parse only | ratio | pod events followed | per event | parse only | ratio |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} ms | {:.0} ms | {:.1}x | {} | {:.1} µs | {:.1} µs | {:.1}x |",
            r.pods,
            ms(r.sync),
            ms(r.parse),
            ms(r.sync) / ms(r.parse).max(1e-3),
            r.events,
            ms(r.follow) * 1e3 / r.events as f64,
            ms(r.parse_events) * 1e3 / r.events as f64,
            ms(r.follow) / ms(r.parse_events).max(1e-3),
        );
    }
    md.push_str(
        "\nThe follower sees each event as its own batch (one revision per event); the agent\n\
         coalesces what is waiting into one compile, so this is the datastore side only.\n",
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kubernetes-sync.md");
    std::fs::write(&path, md)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
