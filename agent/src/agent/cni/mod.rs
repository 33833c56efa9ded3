//! The agent's half of CNI: a Unix socket only root can open, where
//! `palisade-cni` hands over each call (see `palisade_cni`). The agent
//! does the work because it owns what the work touches: IPAM and the
//! datastore it follows, the node's interfaces, and the policy that must
//! be in the kernel before ADD returns (the pod's first packet is judged).
//!
//! ```text
//!  runtime ─exec─▶ palisade-cni ─socket─▶ agent: one thread per call
//!                                          ADD: IPAM → veth (6 steps) → WorkloadEndpoint
//!                                               → wait until the writer attached it
//!                                          any failure: undone in reverse, nothing left
//! ```
//!
//! Calls run in parallel, each on its own thread; their netlink work runs
//! in the node's namespace (`--netns`), their datastore work in the
//! agent's. IPAM's compare-and-swap commits keep parallel ADDs apart.

mod handle;

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use palisade_cni::protocol::{Reply, Request};
use palisade_cni::spec::{CniError, ErrorCode};
use palisade_ipam::IpamStore;

use super::{AgentArgs, Shared};
use crate::store_cmd::StoreArgs;

/// What every call needs.
struct Server {
    node: String,
    store: StoreArgs,
    /// The node's namespace, when not the agent's own.
    netns: Option<PathBuf>,
    /// IPAM's records, opened once (the embedded file or etcd).
    ipam: Arc<dyn IpamStore>,
    /// What the node's allocations remember between calls, so that the
    /// common ADD is one checked commit (see `palisade_ipam::IpamCache`).
    ipam_cache: palisade_ipam::IpamCache,
    shared: Arc<Shared>,
    /// How long ADD waits for the writer to attach the pod's interface.
    attach_timeout: Duration,
    /// Test-only fault injection: the ADD step that fails.
    fail_at: Option<String>,
    /// Whether pods' namespaces are listed for the socket hooks.
    pod_connect_balancing: bool,
}

/// Opens the socket and starts serving calls.
pub fn spawn(args: &AgentArgs, ipam: Arc<dyn IpamStore>, shared: Arc<Shared>) -> Result<()> {
    let netns = args.netns.as_deref().map(super::netns_path);
    let (mtu, underlay) = in_node_ns(netns.as_deref(), || {
        // Pods reach each other and the world through the node.
        palisade_network::netlink::sysctl("net/ipv4/ip_forward", "1")?;
        let links = palisade_network::netlink::Netlink::here()?.links()?;
        Ok::<_, palisade_network::NetError>(palisade_network::mtu::underlay_mtu(&links))
    })
    .and_then(|r| r.map_err(anyhow::Error::new))
    .map(|underlay| {
        let mtu = match args.mtu {
            0 => underlay - palisade_network::mtu::VXLAN_OVERHEAD,
            m => m,
        };
        (mtu, underlay)
    })?;
    // Until the overlay's first pass (or without one), the underlay's.
    let _ = shared.pod_mtu.compare_exchange(
        0,
        mtu,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
    let listener = listen(&args.cni_socket)?;
    let server = Arc::new(Server {
        node: args.node.clone(),
        store: args.store.clone(),
        netns,
        ipam,
        ipam_cache: palisade_ipam::IpamCache::new(),
        shared,
        attach_timeout: Duration::from_secs(args.cni_attach_timeout_seconds.max(1)),
        fail_at: args.cni_fail_at.clone(),
        pod_connect_balancing: args.pod_connect_balancing
            == super::pod_sockets::PodConnectBalancing::Tcp
            && args.connect_hooks_cgroup.is_some(),
    });
    tracing::info!(socket = %args.cni_socket.display(), mtu, underlay, "CNI socket open");
    std::thread::Builder::new()
        .name("cni".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let server = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("cni-call".into())
                    .spawn(move || server.serve(conn));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "CNI: cannot start a call thread");
                }
            }
        })
        .context("starting the CNI thread")?;
    Ok(())
}

/// Binds the socket: its folder 0700 and the socket 0600, so only root
/// reaches the agent this way; a stale socket of an earlier agent goes.
fn listen(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the old {}", path.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Runs `f` on a thread in the node's namespace (or this one's).
fn in_node_ns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match netns {
        None => Ok(f()),
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("--netns: opening {}", path.display()))?;
            Ok(palisade_network::netlink::in_netns(&file, f)?)
        }
    }
}

impl Server {
    /// One call: read the request, answer, close. Never panics the agent:
    /// a call that fails is a CNI error for the runtime.
    fn serve(&self, mut conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut body = Vec::new();
        let reply = match conn.read_to_end(&mut body) {
            Err(e) => Reply::Failed(CniError::new(
                ErrorCode::Io,
                "reading the plugin's request",
                e.to_string(),
            )),
            Ok(_) => match serde_json::from_slice::<Request>(&body) {
                Err(e) => Reply::Failed(CniError::new(
                    ErrorCode::Decode,
                    "the plugin's request is not one this agent understands",
                    format!("{e} (plugin and agent of different versions?)"),
                )),
                Ok(request) => {
                    let started = std::time::Instant::now();
                    let command = request.invocation.command;
                    let reply = self.handle(&request);
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    match &reply {
                        Reply::Failed(e) => tracing::warn!(
                            ?command,
                            container = %request.invocation.container_id,
                            code = e.code.number(),
                            error = %e,
                            took_ms = ms,
                            "CNI call failed"
                        ),
                        _ => tracing::info!(
                            ?command,
                            container = %request.invocation.container_id,
                            took_ms = ms,
                            "CNI call done"
                        ),
                    }
                    reply
                }
            },
        };
        let text = serde_json::to_vec(&reply).unwrap_or_else(|e| {
            format!("{{\"Failed\":{{\"code\":\"Io\",\"msg\":\"encoding the reply\",\"details\":\"{e}\"}}}}")
                .into_bytes()
        });
        let _ = conn.write_all(&text);
    }
}
