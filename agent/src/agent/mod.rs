//! `palisade agent`: one per node, keeping the node's dataplane equal to the
//! datastore's policy, structured as felix is:
//!
//! ```text
//!  datastore ──watcher thread──▶ channel ──▶ writer thread ─────────────▶ kernel maps
//!  (listing, then changes)       (batches    NodeView → Controller         and TCX links
//!                                 coalesced)  (pure: sync.rs)              (pinned)
//!                                              │ status, metrics
//!  tokio: /metrics /healthz /readyz /status ◀──┘  SIGTERM → writer stops, pins stay
//! ```
//!
//! Choices:
//! - Threads for the watcher and the writer, tokio only for HTTP and
//!   signals: the datastore and the kernel calls block, and the writer must
//!   own the dataplane alone (one writer, no locks around map writes).
//! - Coalescing: the writer drains every batch waiting in the channel and
//!   applies them as one compile, so a burst costs one write, not one each.
//! - The first write waits for the first complete listing: a restarted
//!   agent never enforces a partial state; until then the pinned programs
//!   of the last run go on enforcing the last state.

mod http;
pub mod metrics;
pub mod status;
pub mod sync;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use palisade_controller::{AyaDataplane, Dataplane, MirrorDataplane};
use palisade_datastore::{
    Datastore, EmbeddedStore, EtcdStore, Follower, Revision, Snapshot, StoreChange, StoreError,
    Watch,
};
use policy_bpf_common::Statistic;
use policy_core::compile::RuleRef;
use policy_core::model::Action;

use crate::store_cmd::{DatastoreKind, StoreArgs};
use metrics::{EventLabel, MapLabel, Metrics, RuleLabel, StatisticLabel};
use status::{ConntrackStatus, LocalEndpointStatus, MapFill, Status, SyncState};
use sync::{NodeSync, Outcome, Problem};

/// `palisade agent` flags.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (endpoints whose node is this one are enforced here).
    #[arg(long)]
    pub node: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// bpffs directory for the maps and links; they stay after the agent
    /// exits (the programs go on enforcing) and the next agent adopts them.
    #[arg(long, default_value = "/sys/fs/bpf/palisade")]
    pub pin_path: PathBuf,
    /// Where /metrics, /healthz, /readyz and /status are served.
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
    /// The network namespace of the node's interfaces (a name under
    /// /run/netns or a path), when it is not the agent's own: the dataplane
    /// writer works there while the datastore and /metrics stay in the
    /// agent's namespace (labs that run several nodes on one machine).
    #[arg(long)]
    pub netns: Option<String>,
    /// Seconds between conntrack sweeps.
    #[arg(long, default_value_t = 10)]
    pub conntrack_sweep_seconds: u64,
    /// Log filter (tracing's syntax: `info`, `palisade=debug`, ...).
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// What the watcher hands the writer.
#[derive(Debug)]
enum Input {
    /// A complete listing (the first, or after the watch was lost).
    Listing(Snapshot, Instant),
    /// Changes after the last listing or batch, in order.
    Changes(Vec<StoreChange>, Instant),
    /// The datastore cannot be followed; the watcher retries.
    Lost(String),
    /// Following again after the revision, after a loss.
    Resumed(Revision),
    /// Stop (SIGTERM).
    Stop,
}

/// State the writer publishes and the HTTP side reads.
#[derive(Debug)]
pub struct Shared {
    /// The metrics.
    pub metrics: Metrics,
    status: Mutex<Status>,
    /// The writer's last sign of life (seconds since the epoch).
    heartbeat: AtomicU64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shared {
    fn new(status: Status) -> Self {
        Shared {
            metrics: Metrics::new(),
            status: Mutex::new(status),
            heartbeat: AtomicU64::new(now_s()),
        }
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        // A writer that panicked while holding the lock left a status that
        // is still worth showing.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status_json(&self) -> String {
        serde_json::to_string(&*self.status()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Healthy while the writer loop turns (it ticks every second).
    fn healthy(&self) -> Result<(), String> {
        let age = now_s().saturating_sub(self.heartbeat.load(Ordering::Relaxed));
        if age > 30 {
            return Err(format!("the dataplane writer has not run for {age} s"));
        }
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        let s = self.status();
        match s.sync {
            SyncState::Synced if s.ready => Ok(()),
            SyncState::Starting => Err("waiting for the first complete sync".into()),
            SyncState::Disconnected => Err(format!(
                "datastore disconnected: {}",
                s.datastore_error.as_deref().unwrap_or("")
            )),
            SyncState::Synced => Err("not ready".into()),
        }
    }

    fn refresh_process_usage(&self) {
        if let Some((cpu, rss)) = metrics::process_usage() {
            self.metrics.cpu_seconds.set(cpu);
            self.metrics.resident_memory_bytes.set(rss);
        }
    }
}

/// The dataplane's counters, where it has them (the kernel does; memory
/// does not).
pub trait Telemetry {
    /// Tracked connections.
    fn conntrack_len(&self) -> Option<usize> {
        None
    }
    /// New flows that ended at rule `index`.
    fn rule_packets(&self, _index: u32) -> Option<u64> {
        None
    }
    /// Datapath statistics.
    fn statistics(&self) -> Option<Vec<(Statistic, u64)>> {
        None
    }
}

impl Telemetry for MirrorDataplane {}

impl Telemetry for AyaDataplane {
    fn conntrack_len(&self) -> Option<usize> {
        self.datapath().map(|d| d.conntrack_len())
    }
    fn rule_packets(&self, index: u32) -> Option<u64> {
        self.datapath()?.counter(index).ok().map(|c| c.packets)
    }
    fn statistics(&self) -> Option<Vec<(Statistic, u64)>> {
        let stats = self.datapath()?.stats().ok()?;
        Some(
            Statistic::ALL
                .iter()
                .map(|s| (*s, stats[s.code() as usize]))
                .collect(),
        )
    }
}

/// Runs the agent until SIGTERM or SIGINT (exit 0, programs left
/// enforcing), or until the writer fails to start (error).
pub fn run(args: AgentArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?}", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let datastore = args.store.describe();
    let shared = Arc::new(Shared::new(Status {
        node: args.node.clone(),
        datastore,
        pin_path: args.pin_path.display().to_string(),
        ..Status::default()
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    // Bound first: a second agent on the same address stops here.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.metrics_addr))
        .with_context(|| format!("listening on {}", args.metrics_addr))?;
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_watcher(&args, tx.clone())?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let writer = {
        let shared = shared.clone();
        let args = args.clone();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                let r = write_loop(&args, rx, &shared);
                let _ = done_tx.send(());
                r
            })
            .context("starting the writer thread")?
    };
    tracing::info!(node = %args.node, metrics = %args.metrics_addr, pins = %args.pin_path.display(), "agent started");
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = http::serve(listener, shared.clone()) => {}
            _ = term.recv() => tracing::info!("SIGTERM: stopping; the programs stay attached and enforcing"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping; the programs stay attached and enforcing"),
            _ = done_rx => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    let _ = tx.send(Input::Stop);
    match writer.join() {
        Ok(r) => r,
        Err(_) => anyhow::bail!("the dataplane writer panicked"),
    }
}

/// Follows the datastore on its own thread: a listing, then changes as they
/// are written. When the datastore goes away it says so, and reconnects
/// with backoff: it resumes from the last revision it handed out, and lists
/// again only when the datastore no longer has the changes after it.
fn spawn_watcher(args: &AgentArgs, tx: Sender<Input>) -> Result<()> {
    let store = args.store.clone();
    std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || match store.datastore {
            DatastoreKind::Embedded => watch_loop(
                &tx,
                || Ok(EmbeddedStore::open(&store.state_dir)?),
                |s, after| Ok(Watch::new(s.clone(), after)?),
            ),
            DatastoreKind::Etcd => watch_loop(
                &tx,
                || Ok(EtcdStore::connect(&store.etcd())?),
                |s, after| Ok(s.watch(after)?),
            ),
        })
        .context("starting the watcher thread")?;
    Ok(())
}

/// How a follow ended.
enum Ended {
    /// The writer is gone (the agent is stopping).
    Stopping,
    /// The history after our revision is gone: list again at once.
    Compacted,
    /// The datastore failed: say so, wait, reconnect.
    Failed(anyhow::Error),
}

fn watch_loop<S: Datastore, F: Follower>(
    tx: &Sender<Input>,
    open: impl Fn() -> Result<S>,
    follow: impl Fn(&S, Revision) -> Result<F>,
) {
    let mut resume: Option<Revision> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let ended = (|| -> Ended {
            let store = match open() {
                Ok(s) => s,
                Err(e) => return Ended::Failed(e),
            };
            let mut follower = match resume {
                Some(after) => match follow(&store, after) {
                    Ok(f) => {
                        if tx.send(Input::Resumed(after)).is_err() {
                            return Ended::Stopping;
                        }
                        f
                    }
                    Err(e) => return Ended::Failed(e),
                },
                None => {
                    let listed = store
                        .snapshot()
                        .map_err(anyhow::Error::from)
                        .and_then(|snap| Ok((follow(&store, snap.revision)?, snap)));
                    match listed {
                        Ok((f, snap)) => {
                            resume = Some(snap.revision);
                            if tx.send(Input::Listing(snap, Instant::now())).is_err() {
                                return Ended::Stopping;
                            }
                            f
                        }
                        Err(e) => return Ended::Failed(e),
                    }
                }
            };
            backoff = Duration::from_millis(100);
            loop {
                match follower.next(None) {
                    Ok(changes) => {
                        resume = Some(follower.revision());
                        if !changes.is_empty()
                            && tx.send(Input::Changes(changes, Instant::now())).is_err()
                        {
                            return Ended::Stopping;
                        }
                    }
                    Err(StoreError::Compacted { .. }) => return Ended::Compacted,
                    Err(e) => return Ended::Failed(e.into()),
                }
            }
        })();
        match ended {
            Ended::Stopping => return,
            Ended::Compacted => {
                tracing::warn!(after = ?resume, "the datastore compacted the changes after our revision: listing again");
                resume = None;
            }
            Ended::Failed(err) => {
                let why = format!("{err:#}");
                tracing::warn!(error = %why, retry_in = ?backoff, "datastore lost; the dataplane keeps enforcing the last state");
                if tx.send(Input::Lost(why)).is_err() {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The writer: owns the dataplane; applies what the watcher sends, ticks
/// every second (pending interfaces, telemetry, conntrack sweeps).
fn write_loop(args: &AgentArgs, rx: Receiver<Input>, shared: &Shared) -> Result<()> {
    if let Some(ns) = &args.netns {
        enter_netns(ns)?;
    }
    let dataplane = AyaDataplane::pinned(&args.pin_path);
    dataplane
        .available()
        .context("the agent needs to load BPF programs")?;
    let mut node = NodeSync::new(&args.node, dataplane);
    let sweep_every = Duration::from_secs(args.conntrack_sweep_seconds.max(1));
    let mut last_sweep = Instant::now();
    let mut drops_seen: std::collections::HashMap<u32, u64> = Default::default();
    let mut stats_seen = [0u64; Statistic::COUNT as usize];
    loop {
        shared.heartbeat.store(now_s(), Ordering::Relaxed);
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(i) => Some(i),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        // Coalescing: everything waiting goes in with the first.
        let mut inputs: Vec<Input> = first.into_iter().collect();
        inputs.extend(rx.try_iter());
        let mut batch: Vec<StoreChange> = Vec::new();
        let mut arrived: Option<Instant> = None;
        for input in inputs {
            match input {
                Input::Changes(c, at) => {
                    count_events(shared, &c);
                    batch.extend(c);
                    arrived.get_or_insert(at);
                }
                other => {
                    flush(&mut node, shared, &mut batch, &mut arrived);
                    match other {
                        Input::Stop => {
                            tracing::info!(revision = node.revision(), "writer stopped");
                            return Ok(());
                        }
                        Input::Lost(why) => {
                            let mut s = shared.status();
                            s.sync = if node.started() {
                                SyncState::Disconnected
                            } else {
                                SyncState::Starting
                            };
                            s.ready = false;
                            s.datastore_error = Some(why);
                            shared.metrics.ready.set(0);
                            shared.metrics.datastore_connected.set(0);
                        }
                        Input::Listing(snapshot, at) => {
                            listing(&mut node, shared, &snapshot, at)?;
                        }
                        Input::Resumed(after) => {
                            tracing::info!(after, "datastore back: following again");
                            let mut s = shared.status();
                            s.sync = SyncState::Synced;
                            s.ready = node.started();
                            s.datastore_error = None;
                            shared.metrics.ready.set(i64::from(node.started()));
                            shared.metrics.datastore_connected.set(1);
                        }
                        Input::Changes(..) => {}
                    }
                }
            }
        }
        flush(&mut node, shared, &mut batch, &mut arrived);
        if !node.started() {
            continue;
        }
        node.retry_pending();
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            match node.expire_conntrack() {
                Ok(n) => {
                    shared.metrics.conntrack_sweeps.inc();
                    shared.metrics.conntrack_expired.inc_by(n);
                }
                Err(e) => tracing::warn!(error = %e, "conntrack sweep"),
            }
        }
        publish(&node, shared, &mut drops_seen, &mut stats_seen);
    }
}

/// Moves the calling thread into a network namespace (only this thread:
/// interface lookups and attaches happen there).
fn enter_netns(ns: &str) -> Result<()> {
    let path = if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
    };
    let file = std::fs::File::open(&path)
        .with_context(|| format!("--netns: opening {}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("--netns: entering {}", path.display()))
}

fn count_events(shared: &Shared, changes: &[StoreChange]) {
    for c in changes {
        let kind = match c {
            StoreChange::Put(_) => "put",
            StoreChange::Deleted { .. } => "delete",
        };
        shared
            .metrics
            .datastore_events
            .get_or_create(&EventLabel {
                r#type: kind.into(),
            })
            .inc();
    }
}

/// A complete listing: the first loads (or adopts) the dataplane and makes
/// the agent ready; a later one (after the watch was lost) applies the
/// difference. A first one that cannot be written is fatal: nothing else
/// the agent does makes sense without its programs.
fn listing<D: Dataplane + Telemetry>(
    node: &mut NodeSync<D>,
    shared: &Shared,
    snapshot: &Snapshot,
    arrived: Instant,
) -> Result<()> {
    let first = !node.started();
    let started = Instant::now();
    let out = node.sync(snapshot).context("loading the dataplane")?;
    let took = started.elapsed();
    if !first {
        shared.metrics.datastore_resyncs.inc();
    }
    report(node, shared, &out, arrived, took);
    let mut s = shared.status();
    s.sync = SyncState::Synced;
    s.ready = true;
    s.datastore_error = None;
    s.adopted |= out.adopted;
    drop(s);
    shared.metrics.ready.set(1);
    shared.metrics.datastore_connected.set(1);
    tracing::info!(
        revision = snapshot.revision,
        objects = snapshot.objects.len(),
        adopted = out.adopted,
        attached = out.attached.len(),
        detached = out.detached.len(),
        took_ms = took.as_secs_f64() * 1e3,
        "{}",
        if first {
            "first sync written: ready"
        } else {
            "listed again: resynced"
        }
    );
    Ok(())
}

fn flush<D: Dataplane + Telemetry>(
    node: &mut NodeSync<D>,
    shared: &Shared,
    batch: &mut Vec<StoreChange>,
    arrived: &mut Option<Instant>,
) {
    if batch.is_empty() {
        return;
    }
    let changes = std::mem::take(batch);
    let at = arrived.take().unwrap_or_else(Instant::now);
    if !node.started() {
        // Changes before the first listing cannot happen (the watcher
        // lists first); keep the invariant anyway.
        return;
    }
    let started = Instant::now();
    let out = node.update(&changes);
    report(node, shared, &out, at, started.elapsed());
    tracing::debug!(
        changes = changes.len(),
        revision = node.revision(),
        applied = out.applied,
        "batch written"
    );
}

/// Logs and counts what an update did, and refreshes the status.
fn report<D: Dataplane + Telemetry>(
    node: &NodeSync<D>,
    shared: &Shared,
    out: &Outcome,
    arrived: Instant,
    took: Duration,
) {
    let m = &shared.metrics;
    m.batches.inc();
    m.apply_seconds.observe(took.as_secs_f64());
    m.update_latency_seconds
        .observe(arrived.elapsed().as_secs_f64());
    m.datastore_revision.set(node.revision() as i64);
    for p in &out.rejected {
        tracing::error!(object = %p.object, revision = p.revision, error = %p.message, "skipped an object that does not convert; its last good version stays in force");
    }
    for p in &out.refused {
        tracing::error!(object = %p.object, revision = p.revision, error = %p.message, "the dataplane refused a change; the rest of the batch is applied");
    }
    for i in &out.attached {
        tracing::info!(interface = %i, "attached");
    }
    for i in &out.detached {
        tracing::info!(interface = %i, "detached");
    }
    m.rejected_changes
        .inc_by((out.rejected.len() + out.refused.len()) as u64);
    let mut s = shared.status();
    for p in out.rejected.iter().chain(&out.refused) {
        s.record(p.clone());
    }
}

/// Refreshes the status and the gauges from the node's state; counters
/// read from the kernel advance by what they grew since `drops_seen` and
/// `stats_seen`.
fn publish<D: Dataplane + Telemetry>(
    node: &NodeSync<D>,
    shared: &Shared,
    drops_seen: &mut std::collections::HashMap<u32, u64>,
    stats_seen: &mut [u64; Statistic::COUNT as usize],
) {
    let c = node.controller();
    let lowering = c.lowering();
    let cap = lowering.capacity();
    let mirror = lowering.mirror();
    let maps = [
        ("nodes", mirror.nodes.len(), cap.nodes),
        ("slots", mirror.slots.len(), cap.slots),
        ("interfaces", mirror.interfaces.len(), cap.interfaces),
        ("lpm4", mirror.lpm4.len(), cap.lpm4),
        ("lpm6", mirror.lpm6.len(), cap.lpm6),
        ("identities", mirror.identities.len(), cap.identities),
        ("classes", mirror.classes.len(), cap.classes),
        ("rules", lowering.rules().count(), cap.rules),
    ];
    let m = &shared.metrics;
    let mut fill = Vec::new();
    for (name, entries, capacity) in maps {
        let label = MapLabel { map: name.into() };
        m.map_entries.get_or_create(&label).set(entries as i64);
        m.map_capacity
            .get_or_create(&label)
            .set(i64::from(capacity));
        fill.push(MapFill {
            map: name.into(),
            entries: entries as u64,
            capacity: u64::from(capacity),
        });
    }
    let dataplane = c.dataplane();
    let conntrack = dataplane.conntrack_len().unwrap_or(0) as u64;
    m.conntrack_entries.set(conntrack as i64);
    m.conntrack_capacity.set(i64::from(cap.conntrack));
    for (index, rule) in lowering.rules() {
        let label = match rule {
            RuleRef::Policy {
                tier,
                policy,
                index: i,
                action,
                ..
            } if *action == Action::Deny => RuleLabel {
                tier: tier.clone(),
                policy: policy.to_string(),
                rule: i.to_string(),
            },
            RuleRef::TierDefault { tier } => RuleLabel {
                tier: tier.clone(),
                policy: "tier-default".into(),
                rule: String::new(),
            },
            RuleRef::NoProfileMatch => RuleLabel {
                tier: String::new(),
                policy: "no-profile-match".into(),
                rule: String::new(),
            },
            _ => continue,
        };
        let Some(now) = dataplane.rule_packets(*index) else {
            continue;
        };
        let seen = drops_seen.entry(*index).or_insert(0);
        // A rule index reused by another rule starts again from its count.
        let grown = now.checked_sub(*seen).unwrap_or(now);
        *seen = now;
        if grown > 0 {
            m.policy_drops.get_or_create(&label).inc_by(grown);
        }
    }
    if let Some(stats) = dataplane.statistics() {
        for (s, now) in stats {
            let i = s.code() as usize;
            let grown = now.saturating_sub(stats_seen[i]);
            stats_seen[i] = now;
            m.datapath_packets
                .get_or_create(&StatisticLabel {
                    statistic: format!("{s:?}"),
                })
                .inc_by(grown);
        }
    }
    let cluster = c.compiler().cluster();
    let mut endpoints: Vec<LocalEndpointStatus> = node
        .view()
        .bindings()
        .iter()
        .map(|(iface, key)| LocalEndpointStatus {
            endpoint: key.to_string(),
            interface: iface.clone(),
            state: match node.pending().get(iface) {
                Some((_, why)) => format!("waiting: {why}"),
                None if c.interfaces().contains_key(iface) => "attached".into(),
                None => "not attached".into(),
            },
        })
        .collect();
    endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    m.local_endpoints
        .set(endpoints.iter().filter(|e| e.state == "attached").count() as i64);
    m.pending_interfaces.set(node.pending().len() as i64);
    let policies = cluster.policies().count();
    m.policies.set(policies as i64);
    let rejected: Vec<Problem> = node
        .view()
        .rejected()
        .map(|r| Problem {
            revision: r.revision,
            object: r.key.clone(),
            message: r.errors.clone(),
        })
        .collect();
    m.rejected_objects.set(rejected.len() as i64);
    let mut s = shared.status();
    // Last: a reader that sees the revision sees everything it brought.
    s.revision = node.revision();
    s.endpoints = endpoints;
    s.known_endpoints = cluster.endpoints().count();
    s.policies = policies;
    s.maps = fill;
    s.conntrack = ConntrackStatus {
        entries: conntrack,
        capacity: u64::from(cap.conntrack),
        sweeps: m.conntrack_sweeps.get(),
        expired: m.conntrack_expired.get(),
    };
    s.rejected = rejected;
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datastore::{StoredObject, Written};
    use policy_core::ObjectRef;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// A store that lists `revision`, and followers that play a script.
    struct Scripted {
        revision: Mutex<Revision>,
        script: Arc<Mutex<VecDeque<Result<Vec<StoreChange>, StoreError>>>>,
    }

    struct Player {
        after: Revision,
        script: Arc<Mutex<VecDeque<Result<Vec<StoreChange>, StoreError>>>>,
    }

    impl Datastore for Scripted {
        fn snapshot(&self) -> Result<Snapshot, StoreError> {
            Ok(Snapshot {
                revision: *self.revision.lock().unwrap(),
                objects: Vec::new(),
            })
        }
        fn apply_sources(&self, _: &[(String, String)]) -> Result<Written, StoreError> {
            Err(StoreError::Unavailable("read-only".into()))
        }
        fn delete(&self, _: &[ObjectRef]) -> Result<Written, StoreError> {
            Err(StoreError::Unavailable("read-only".into()))
        }
    }

    impl Follower for Player {
        fn revision(&self) -> Revision {
            self.after
        }
        fn next(&mut self, _: Option<Duration>) -> Result<Vec<StoreChange>, StoreError> {
            let next = self.script.lock().unwrap().pop_front();
            let r = next.unwrap_or_else(|| {
                std::thread::sleep(Duration::from_millis(5));
                Ok(Vec::new())
            });
            if let Ok(c) = &r
                && let Some(last) = c.last()
            {
                self.after = last.revision();
            }
            r
        }
    }

    fn put(revision: Revision) -> StoreChange {
        StoreChange::Put(StoredObject {
            key: format!("k{revision}"),
            object: ObjectRef::new("GlobalNetworkPolicy", None, "p"),
            revision,
            document: serde_json::Value::Null,
        })
    }

    #[test]
    fn the_watcher_resumes_after_a_loss_and_lists_again_after_a_compaction() {
        let script = Arc::new(Mutex::new(VecDeque::from([
            Ok(vec![put(6)]),
            Err(StoreError::Unavailable("connection reset".into())),
            Ok(vec![put(7)]),
            Err(StoreError::Compacted {
                after: 7,
                compacted: 9,
            }),
        ])));
        let store = Arc::new(Scripted {
            revision: Mutex::new(5),
            script: script.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher = {
            let store = store.clone();
            std::thread::spawn(move || {
                watch_loop(
                    &tx,
                    || {
                        // The second listing (after the compaction) is newer.
                        Ok(Scripted {
                            revision: Mutex::new(*store.revision.lock().unwrap()),
                            script: store.script.clone(),
                        })
                    },
                    |s, after| {
                        *store.revision.lock().unwrap() = 10;
                        Ok(Player {
                            after,
                            script: s.script.clone(),
                        })
                    },
                )
            })
        };
        let mut seen = Vec::new();
        while seen.len() < 6 {
            seen.push(match rx.recv().unwrap() {
                Input::Listing(s, _) => format!("listing {}", s.revision),
                Input::Changes(c, _) => format!("changes {}", c[0].revision()),
                Input::Lost(why) => format!("lost: {why}"),
                Input::Resumed(after) => format!("resumed after {after}"),
                Input::Stop => "stop".into(),
            });
        }
        drop(rx);
        watcher.join().unwrap();
        assert_eq!(
            seen,
            [
                "listing 5",
                "changes 6",
                "lost: connection reset",
                "resumed after 6",
                "changes 7",
                "listing 10",
            ]
        );
    }
}
