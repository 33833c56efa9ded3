//! Service health checks, as kube-proxy serves them: for each LoadBalancer
//! Service with `externalTrafficPolicy: Local`, an HTTP listener on its
//! `healthCheckNodePort` answering 200 while this node runs one of its
//! ready endpoints (and the agent is healthy), else 503, with kube-proxy's
//! JSON body and `X-Load-Balancing-Endpoint-Weight` header. Cloud load
//! balancers probe it to send such a Service's traffic only to nodes that
//! can serve it. What to answer is `palisade_services::health`'s; this
//! module listens.
//!
//! With them, kube-proxy's own health server (`--healthz-bind-address`,
//! 0.0.0.0:10256): `/healthz` and `/livez`, which cloud load balancers
//! probe for Services with `externalTrafficPolicy: Cluster`.
//!
//! The listeners are bound by the writer thread, in the node's network
//! namespace, and served on the agent's runtime. A port that cannot be
//! bound (another process holds it) is reported and tried again each tick.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use palisade_services::health::{HealthCheck, answer, proxy_health_answer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::Shared;

/// One Service's listeners.
struct Serving {
    port: u16,
    local_endpoints: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The health check listeners this node serves, kept to the Services'.
pub struct HealthCheckServers {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    /// Where to listen: every address (None), or the node's addresses in
    /// `--node-port-address`, as kube-proxy narrows its listeners.
    node_port_addresses: Vec<IpNet>,
    serving: BTreeMap<(String, String), Serving>,
    /// The last checks asked for; some could not be bound yet.
    wanted: Vec<HealthCheck>,
    unbound: usize,
    /// kube-proxy's health server: where, and its task once bound.
    proxy_healthz: Option<SocketAddr>,
    /// This node's name (whether its Node is being deleted).
    node: String,
    proxy_healthz_task: Option<JoinHandle<()>>,
    /// When the service table was last written (since the epoch).
    last_written: Arc<std::sync::Mutex<Duration>>,
}

impl HealthCheckServers {
    pub fn new(
        runtime: tokio::runtime::Handle,
        shared: Arc<Shared>,
        node_port_addresses: Vec<IpNet>,
        proxy_healthz: Option<SocketAddr>,
        node: &str,
    ) -> Self {
        let mut servers = HealthCheckServers {
            runtime,
            shared,
            node_port_addresses,
            serving: BTreeMap::new(),
            wanted: Vec::new(),
            unbound: 0,
            proxy_healthz,
            node: node.to_string(),
            proxy_healthz_task: None,
            last_written: Arc::new(std::sync::Mutex::new(since_epoch())),
        };
        servers.open_proxy_healthz(true);
        servers
    }

    /// Binds kube-proxy's health server if it is wanted and not bound;
    /// `first` logs a failure (later ones are the same).
    fn open_proxy_healthz(&mut self, first: bool) {
        let Some(at) = self.proxy_healthz else {
            return;
        };
        if self.proxy_healthz_task.is_some() {
            return;
        }
        let listener = match bind(at) {
            Ok(l) => l,
            Err(e) => {
                if first {
                    tracing::warn!(%at, error = %e, "kube-proxy's health server (--healthz-bind-address) not bound; trying again each second");
                    self.shared.metrics.service_errors.inc();
                }
                return;
            }
        };
        let _runtime = self.runtime.enter();
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        tracing::info!(%at, "kube-proxy's health server serving /healthz and /livez");
        let (shared, last_written) = (self.shared.clone(), self.last_written.clone());
        let node = Arc::new(self.node.clone());
        self.proxy_healthz_task = Some(self.runtime.spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let (shared, last_written) = (shared.clone(), last_written.clone());
                let node = node.clone();
                tokio::spawn(async move {
                    let reply = async {
                        let Some(head) = super::http::read_head(&mut stream).await? else {
                            return Ok(());
                        };
                        let line = String::from_utf8_lossy(&head);
                        let target = line.split_whitespace().nth(1).unwrap_or("");
                        let path = target.split('?').next().unwrap_or("");
                        let last = *last_written.lock().unwrap_or_else(|e| e.into_inner());
                        let (status, body) = proxy_health_answer(
                            path,
                            shared.healthy().is_ok(),
                            shared.ipam.node_eligible(&node),
                            (last.as_secs(), last.subsec_nanos()),
                            {
                                let now = since_epoch();
                                (now.as_secs(), now.subsec_nanos())
                            },
                        );
                        let content_type = if status == 404 {
                            "text/plain; charset=utf-8"
                        } else {
                            "application/json"
                        };
                        write_answer(&mut stream, status, content_type, &[], &body).await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(10), reply).await;
                });
            }
        }));
    }

    /// Serves exactly `checks`: listeners of Services gone (or whose port
    /// changed) close, new ones open, counts update in place.
    pub fn sync(&mut self, checks: Vec<HealthCheck>) {
        *self.last_written.lock().unwrap_or_else(|e| e.into_inner()) = since_epoch();
        self.serve(checks);
    }

    fn serve(&mut self, checks: Vec<HealthCheck>) {
        let keep: BTreeMap<(String, String), u16> = checks
            .iter()
            .map(|c| ((c.namespace.clone(), c.name.clone()), c.port))
            .collect();
        self.serving
            .retain(|key, s| keep.get(key).is_some_and(|port| *port == s.port));
        let mut unbound = 0;
        for c in &checks {
            let key = (c.namespace.clone(), c.name.clone());
            if let Some(s) = self.serving.get(&key) {
                s.local_endpoints
                    .store(c.local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open(c) {
                Ok(serving) => {
                    tracing::info!(service = %format!("{}/{}", c.namespace, c.name), port = c.port, local_endpoints = c.local_endpoints, "health check node port serving");
                    self.serving.insert(key, serving);
                }
                Err(e) => {
                    unbound += 1;
                    if self.unbound == 0 {
                        tracing::warn!(service = %format!("{}/{}", c.namespace, c.name), port = c.port, error = %e, "health check node port not bound; trying again each second");
                        self.shared.metrics.service_errors.inc();
                    }
                }
            }
        }
        self.unbound = unbound;
        self.wanted = checks;
    }

    /// Tries again the listeners that could not be bound.
    pub fn retry(&mut self) {
        self.open_proxy_healthz(false);
        if self.unbound > 0 {
            self.serve(self.wanted.clone());
        }
    }

    fn addresses(&self) -> Vec<IpAddr> {
        if self.node_port_addresses.is_empty() {
            return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        }
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
            return Vec::new();
        };
        let mut ips: Vec<IpAddr> = addrs
            .filter_map(|a| {
                let a = a.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .filter(|ip| self.node_port_addresses.iter().any(|n| n.contains(ip)))
            .collect();
        ips.sort();
        ips.dedup();
        ips
    }

    fn open(&self, c: &HealthCheck) -> std::io::Result<Serving> {
        let local_endpoints = Arc::new(AtomicUsize::new(c.local_endpoints));
        let mut tasks = Vec::new();
        let addresses = self.addresses();
        if addresses.is_empty() {
            return Err(std::io::Error::other(
                "no node address is in --node-port-address",
            ));
        }
        for ip in addresses {
            let listener = match bind(SocketAddr::new(ip, c.port)) {
                Ok(l) => l,
                // No IPv6 in this namespace: every IPv4 address instead.
                Err(_) if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
                    bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), c.port))?
                }
                Err(e) => return Err(e),
            };
            let _runtime = self.runtime.enter();
            let listener = TcpListener::from_std(listener)?;
            let (namespace, name) = (c.namespace.clone(), c.name.clone());
            let (count, shared) = (local_endpoints.clone(), self.shared.clone());
            tasks.push(self.runtime.spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (namespace, name) = (namespace.clone(), name.clone());
                    let (count, shared) = (count.clone(), shared.clone());
                    tokio::spawn(async move {
                        let reply = async {
                            let n = count.load(Ordering::Relaxed);
                            let healthy = shared.healthy().is_ok();
                            respond(stream, &namespace, &name, n, healthy).await
                        };
                        // A client that stalls is dropped, never waited on.
                        let _ = tokio::time::timeout(Duration::from_secs(10), reply).await;
                    });
                }
            }));
        }
        Ok(Serving {
            port: c.port,
            local_endpoints,
            tasks,
        })
    }
}

/// A listening socket on `at` (IPv6's unspecified address takes IPv4 too,
/// as kube-proxy's listener does), non-blocking for the runtime.
fn bind(at: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(at)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Reads the request's head (any method and path: kube-proxy answers all)
/// and writes the answer.
async fn respond(
    mut stream: TcpStream,
    namespace: &str,
    name: &str,
    local_endpoints: usize,
    healthy: bool,
) -> std::io::Result<()> {
    if super::http::read_head(&mut stream).await?.is_none() {
        return Ok(());
    }
    let (status, body) = answer(namespace, name, local_endpoints, healthy);
    let weight = local_endpoints.to_string();
    write_answer(
        &mut stream,
        status,
        "application/json",
        &[("X-Load-Balancing-Endpoint-Weight", &weight)],
        &body,
    )
    .await
}

/// An HTTP/1.1 answer with kube-proxy's headers, then the connection's end.
async fn write_answer(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\n"
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}
