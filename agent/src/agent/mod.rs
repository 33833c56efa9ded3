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
//!
//! Files: `watcher.rs` (the watcher thread), `sync.rs` (the pure core),
//! `publish.rs` (logs, metrics, status after each batch), `http.rs`,
//! `metrics.rs`, `status.rs`; the writer loop is here.

mod cni;
mod health_checks;
mod http;
mod ipam;
pub mod metrics;
pub mod overlay;
pub mod pod_sockets;
mod publish;
pub mod services;
pub mod status;
pub mod sync;
mod watcher;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use palisade_controller::{AyaDataplane, Dataplane};
use palisade_datastore::{Revision, Snapshot, StoreChange};
use palisade_services::Family;

use crate::store_cmd::StoreArgs;
use metrics::Metrics;
use publish::{Seen, Telemetry, count_events, publish, report};
use status::{Status, SyncState};
use sync::NodeSync;
use watcher::spawn_watcher;

/// `palisade agent` flags.
/// `--healthz-bind-address`: an address, or `off`.
#[derive(Debug, Clone, Copy)]
pub struct HealthzAddress(pub Option<SocketAddr>);

impl std::str::FromStr for HealthzAddress {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(HealthzAddress(None));
        }
        s.parse().map(|a| HealthzAddress(Some(a)))
    }
}

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
    /// kube-proxy's health server (`/healthz`, `/livez`), which cloud load
    /// balancers probe for Services with `externalTrafficPolicy: Cluster`;
    /// bound in the node's namespace; `off` for none.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: HealthzAddress,
    /// The network namespace of the node's interfaces (a name under
    /// /run/netns or a path), when it is not the agent's own: the dataplane
    /// writer works there while the datastore and /metrics stay in the
    /// agent's namespace (labs that run several nodes on one machine).
    #[arg(long)]
    pub netns: Option<String>,
    /// Seconds between conntrack sweeps.
    #[arg(long, default_value_t = 10)]
    pub conntrack_sweep_seconds: u64,
    /// Seconds between reads of the IPAM records for the pool headroom
    /// metrics (0: not read).
    #[arg(long, default_value_t = 15)]
    pub ipam_metrics_seconds: u64,
    /// Seconds between IPAM garbage collections by this agent (0: none;
    /// one node collecting is enough, several are safe).
    #[arg(long, default_value_t = 0)]
    pub ipam_gc_seconds: u64,
    /// Addresses younger than this are never collected: their pod may not
    /// be in the datastore yet.
    #[arg(long, default_value_t = 900)]
    pub ipam_gc_grace_seconds: u64,
    /// The Unix socket `palisade-cni` reaches the agent on (created 0600
    /// in a 0700 folder: root only); empty: no CNI on this node.
    #[arg(long, default_value = palisade_cni::spec::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// The pods' MTU; 0: the underlay's (the smallest MTU of the node's
    /// own links that are up) less VXLAN's 50 bytes.
    #[arg(long, default_value_t = 0)]
    pub mtu: u32,
    /// How long a CNI ADD waits for the pod's policy to be in the kernel
    /// before it fails (and undoes itself).
    #[arg(long, default_value_t = 15)]
    pub cni_attach_timeout_seconds: u64,
    /// The VXLAN overlay between nodes (`none`: routes between nodes are
    /// someone else's, as on a single node).
    #[arg(long, value_enum, default_value = "vxlan")]
    pub overlay: OverlayKind,
    /// This node's underlay address (default: the first global IPv4
    /// address of a link that is up and not Palisade's).
    #[arg(long)]
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// Milliseconds between overlay passes (each reads the kernel back and
    /// repairs what differs).
    #[arg(long, default_value_t = 1000)]
    pub overlay_millis: u64,
    #[command(flatten)]
    pub proxy: services::ProxyArgs,
    /// Node interfaces that also get the service program (the uplink: for
    /// NodePorts and external IPs reached from outside the node); pod
    /// interfaces always get it.
    #[arg(long = "service-interface", value_delimiter = ',')]
    pub service_interfaces: Vec<String>,
    /// A cgroup v2 directory whose processes' `connect()` calls are
    /// load-balanced to Services' backends (the node's own traffic to
    /// ClusterIPs and NodePorts); its root (`/sys/fs/cgroup`, or
    /// `/sys/fs/cgroup/unified` on hybrid hosts) for every process. Not
    /// set: the node's own traffic is not load-balanced by Palisade.
    #[arg(long)]
    pub connect_hooks_cgroup: Option<PathBuf>,
    /// Pods' TCP connections to Services balanced at `connect()` by the
    /// socket hooks (Calico's `bpfConnectTimeLoadBalancing`): `tcp` lists
    /// each pod's network namespace as the CNI plugin networks it (the
    /// hooks' cgroup must hold the pods' processes); `off` leaves pods to
    /// the service program's per-packet NAT, kube-proxy's exact behaviour.
    #[arg(long, value_enum, default_value = "off")]
    pub pod_connect_balancing: pod_sockets::PodConnectBalancing,
    /// Fault injection for tests: the CNI ADD step that fails.
    #[arg(long, hide = true)]
    pub cni_fail_at: Option<String>,
    /// Log filter (tracing's syntax: `info`, `palisade=debug`, ...).
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// Overlays.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// Calico's VXLAN overlay (`vxlan.calico`, VNI 4096).
    Vxlan,
    /// None.
    None,
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
    /// The IPAM objects seen (for the pool headroom metrics).
    pub ipam: ipam::IpamView,
    status: Mutex<Status>,
    /// The writer's last sign of life (seconds since the epoch).
    heartbeat: AtomicU64,
    /// The pods' MTU (the overlay keeps it equal to the underlay's less
    /// VXLAN's overhead unless `--mtu` fixes it).
    pub pod_mtu: AtomicU32,
    /// Pods' namespaces for the socket hooks, from the CNI side.
    pub pod_sockets: pod_sockets::PodSocketQueue,
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
            ipam: ipam::IpamView::default(),
            status: Mutex::new(status),
            heartbeat: AtomicU64::new(now_s()),
            pod_mtu: AtomicU32::new(0),
            pod_sockets: pod_sockets::PodSocketQueue::default(),
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
    if args.ipam_metrics_seconds > 0 || args.ipam_gc_seconds > 0 {
        let every = |s: u64| Duration::from_secs(s.max(1));
        let schedule = ipam::Schedule {
            metrics: every(if args.ipam_metrics_seconds > 0 {
                args.ipam_metrics_seconds
            } else {
                args.ipam_gc_seconds
            }),
            gc: (args.ipam_gc_seconds > 0).then(|| every(args.ipam_gc_seconds)),
            grace: Duration::from_secs(args.ipam_gc_grace_seconds),
        };
        ipam::spawn(args.store.clone(), schedule, shared.clone())
            .context("starting the IPAM thread")?;
    }
    let cni = !args.cni_socket.as_os_str().is_empty();
    if cni || args.overlay != OverlayKind::None {
        let ipam_store: Arc<dyn palisade_ipam::IpamStore> =
            Arc::from(crate::ipam_cmd::open_ipam_store(&args.store).context("opening IPAM")?);
        if cni {
            cni::spawn(&args, ipam_store.clone(), shared.clone()).context("starting CNI")?;
        }
        if args.overlay != OverlayKind::None {
            overlay::spawn(&args, ipam_store, shared.clone())?;
        }
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let writer = {
        let shared = shared.clone();
        let args = args.clone();
        let runtime = runtime.handle().clone();
        std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || {
                let r = write_loop(&args, rx, &shared, runtime);
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

/// The writer: owns the dataplane; applies what the watcher sends, ticks
/// every second (pending interfaces, telemetry, conntrack sweeps).
fn write_loop(
    args: &AgentArgs,
    rx: Receiver<Input>,
    shared: &Arc<Shared>,
    runtime: tokio::runtime::Handle,
) -> Result<()> {
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
    let mut seen = Seen::default();
    let mut services = services::ServiceSource::default();
    let mut service_interfaces_attached = args.service_interfaces.is_empty();
    let mut connect_hooks_attached = args.connect_hooks_cgroup.is_none();
    let mut socket_hooks_ok = false;
    let mut pod_socket_table = pod_sockets::PodSocketTable::default();
    let mut health_checks = health_checks::HealthCheckServers::new(
        runtime,
        shared.clone(),
        args.proxy.node_port_addresses.clone(),
        args.healthz_bind_address.0,
        &args.node,
    );
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
                    shared.ipam.changes(&c);
                    services.changes(&c);
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
                            shared.ipam.listing(&snapshot);
                            services.listing(&snapshot);
                            listing(&mut node, shared, &snapshot, at, &mut seen)?;
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
        if services.take_dirty() {
            health_checks.sync(write_services(&mut node, &services, args, shared));
        } else {
            health_checks.retry();
        }
        if !service_interfaces_attached {
            service_interfaces_attached = attach_service_interfaces(&mut node, args);
        }
        if let (false, Some(cgroup)) = (connect_hooks_attached, &args.connect_hooks_cgroup) {
            // Once: a cgroup that cannot take the hook will not later.
            connect_hooks_attached = true;
            match node.dataplane_mut().attach_socket_hooks(cgroup) {
                Ok(()) => {
                    socket_hooks_ok = true;
                    tracing::info!(cgroup = %cgroup.display(), "socket-time service balancing attached (connect, sendmsg, recvmsg, getpeername)")
                }
                Err(e) => {
                    tracing::warn!(cgroup = %cgroup.display(), error = %e, "socket-time service balancing not attached");
                    shared.metrics.service_errors.inc();
                    shared.status().record(sync::Problem {
                        revision: node.revision(),
                        object: format!("cgroup {}", cgroup.display()),
                        message: e.to_string(),
                    });
                }
            }
        }
        if connect_hooks_attached && socket_hooks_ok {
            let (listed, failed) =
                pod_socket_table.apply(&shared.pod_sockets, node.dataplane_mut());
            shared.metrics.pods_balanced_at_connect.set(listed as i64);
            for (interface, error) in failed {
                tracing::warn!(%interface, %error, "a pod's TCP stays balanced per packet");
                shared.metrics.service_errors.inc();
            }
        }
        for ifname in node.retry_pending() {
            tracing::info!(interface = %ifname, "attached (its interface appeared)");
            publish::settle_host_side(&ifname);
        }
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            match node.expire_conntrack() {
                Ok(n) => {
                    shared.metrics.conntrack_sweeps.inc();
                    shared.metrics.conntrack_expired.inc_by(n);
                }
                Err(e) => tracing::warn!(error = %e, "conntrack sweep"),
            }
            check_kube_proxy(shared);
            if let (true, Some(cgroup)) = (socket_hooks_ok, &args.connect_hooks_cgroup) {
                check_socket_hooks(node.controller().dataplane(), cgroup, shared);
            }
        }
        publish(&node, shared, &mut seen);
    }
}

/// Looks for kube-proxy's rules on this node (the writer's namespace):
/// found, they are in the status and the metric, and a change is logged.
fn check_kube_proxy(shared: &Shared) {
    let found = match palisade_network::nft::kube_proxy_footprint() {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "looking for kube-proxy's rules");
            return;
        }
    };
    shared.metrics.kube_proxy_tables.set(found.len() as i64);
    let mut s = shared.status();
    if s.kube_proxy != found {
        if found.is_empty() {
            tracing::info!("kube-proxy's rules are gone from this node");
        } else {
            tracing::warn!(found = %found.join(", "), "kube-proxy is active on this node: it and Palisade both load-balance Services; turn kube-proxy off");
        }
        s.kube_proxy = found;
    }
}

/// Looks for programs another balancer put on the socket hooks' cgroup
/// (Cilium's or Calico's socket load balancer, a second agent): found,
/// they are in the status and the metric, and a change is logged.
fn check_socket_hooks(dataplane: &AyaDataplane, cgroup: &std::path::Path, shared: &Shared) {
    let found: Vec<String> = match dataplane.foreign_socket_hooks(cgroup) {
        Ok(f) => f.iter().map(ToString::to_string).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "listing the socket hooks' programs");
            return;
        }
    };
    shared.metrics.foreign_socket_hooks.set(found.len() as i64);
    let mut s = shared.status();
    if s.foreign_socket_hooks != found {
        if found.is_empty() {
            tracing::info!(cgroup = %cgroup.display(), "the socket hooks' cgroup holds only Palisade's programs again");
        } else {
            tracing::warn!(cgroup = %cgroup.display(), found = %found.join(", "), "another balancer's programs are on the socket hooks: two balancers rewrite the node's connect() calls; turn the other off");
        }
        s.foreign_socket_hooks = found;
    }
}

/// Builds this node's service table from what the writer has seen and
/// writes it; a table that does not fit is refused whole (the previous
/// one stays), and skipped documents are reported, never fatal. Returns
/// the health checks this node serves.
fn write_services(
    node: &mut NodeSync<AyaDataplane>,
    source: &services::ServiceSource,
    args: &AgentArgs,
    shared: &Shared,
) -> Vec<palisade_services::health::HealthCheck> {
    let cluster = shared.ipam.cluster();
    let node_ips = services::node_addresses(args.node_ip);
    let configs = [Family::V4, Family::V6]
        .into_iter()
        .map(|family| {
            let pools = cluster
                .pools()
                .iter()
                .filter(|p| !p.disabled && family.holds(&p.cidr.addr()))
                .map(|p| p.cidr)
                .collect();
            args.proxy
                .config(family, &args.node, node_ips.clone(), pools)
        })
        .collect();
    let services::Built {
        tables,
        skipped,
        health_checks,
    } = source.build(configs);
    let revision = node.revision();
    let mut problems = Vec::new();
    for (object, message) in skipped {
        tracing::warn!(%object, %message, "service input skipped");
        problems.push(sync::Problem {
            revision,
            object,
            message,
        });
    }
    let started = Instant::now();
    match node.dataplane_mut().set_services(&tables) {
        Ok(()) => tracing::info!(
            services = source.service_count(),
            frontends = tables
                .iter()
                .map(|t| t.frontends.len() + t.node_ports.len())
                .sum::<usize>(),
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "service table written"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "service table refused; the previous one stays in force");
            problems.push(sync::Problem {
                revision,
                object: "services".into(),
                message: e.to_string(),
            });
        }
    }
    shared.metrics.service_errors.inc_by(problems.len() as u64);
    let mut s = shared.status();
    for p in problems {
        s.record(p);
    }
    health_checks
}

/// Attaches the service program to `--service-interface`s; false while
/// one is missing (retried every tick).
fn attach_service_interfaces(node: &mut NodeSync<AyaDataplane>, args: &AgentArgs) -> bool {
    let mut all = true;
    for ifname in &args.service_interfaces {
        match node.dataplane_mut().attach_service(ifname) {
            // A NodePort connection masqueraded at this interface's
            // ingress carries the node's address into routing.
            Ok(()) => publish::settle_host_side(ifname),
            Err(e) => {
                tracing::warn!(interface = %ifname, error = %e, "service program not attached yet");
                all = false;
            }
        }
    }
    all
}

/// Moves the calling thread into a network namespace (only this thread:
/// interface lookups and attaches happen there).
fn enter_netns(ns: &str) -> Result<()> {
    let path = netns_path(ns);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("--netns: opening {}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("--netns: entering {}", path.display()))
}

/// `--netns`: a name under /run/netns, or a path.
fn netns_path(ns: &str) -> PathBuf {
    if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        PathBuf::from("/run/netns").join(ns)
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
    seen: &mut Seen,
) -> Result<()> {
    let first = !node.started();
    let started = Instant::now();
    let out = node.sync(snapshot).context("loading the dataplane")?;
    let took = started.elapsed();
    if !first {
        shared.metrics.datastore_resyncs.inc();
    }
    report(node, shared, &out, arrived, took);
    // The status holds this listing before it says ready.
    publish(node, shared, seen);
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
