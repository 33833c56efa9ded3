//! The VXLAN overlay in the agent, as calico-node runs it: every pass
//! (each `--overlay-seconds`) finds the underlay, makes sure this node has
//! a tunnel address from IPAM (handle `vxlan-tunnel-addr-<node>`, use
//! Tunnel) and a `vxlan.calico` device, publishes both in its Node
//! object, and makes the kernel's routes, neighbours and FDB entries equal
//! to the plan `palisade_network::overlay` derives from the Node objects
//! and the IPAM blocks. Each pass reads the kernel back, so a restarted
//! agent sweeps what is stale and leaves what is right (traffic goes on).
//!
//! The same pass keeps the pools' `natOutgoing` table (`nft`, as Calico's
//! eBPF mode leaves that SNAT to netfilter): written when the pools change,
//! and read back every [`NAT_VERIFY`] so a table someone removed returns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ipnet::IpNet;
use palisade_ipam::assign::AutoAssignArgs;
use palisade_ipam::pool::{Encapsulation, Use};
use palisade_ipam::{Ipam, IpamStore};
use palisade_network::mtu::VXLAN_OVERHEAD;
use palisade_network::natout::{self, NatOutgoing, NatSettings, PoolNat};
use palisade_network::netlink::Netlink;
use palisade_network::overlay::{self, Block, DEVICE, Input, Mode, Node, device_mac, mac_text};
use palisade_network::{nft, vxlan};
use serde_json::{Value, json};

use super::status::{OverlayNodeStatus, OverlayStatus};
use super::{AgentArgs, Shared};
use crate::store_cmd::StoreArgs;

/// The handle of a node's VXLAN tunnel address (Calico's).
pub fn tunnel_handle(node: &str) -> String {
    format!("vxlan-tunnel-addr-{node}")
}

struct Overlay {
    node: String,
    node_ip: Option<Ipv4Addr>,
    /// The pods' MTU when given (`--mtu`); else it follows the underlay.
    fixed_mtu: Option<u32>,
    store: StoreArgs,
    ipam: Arc<dyn IpamStore>,
    shared: Arc<Shared>,
    /// The Node document this agent wrote last (until the datastore's
    /// copy reaches the writer, the same write is not repeated).
    published: std::sync::Mutex<Option<Value>>,
    /// The node's namespace (`--netns`), where `nft` must run.
    netns: Option<PathBuf>,
    /// The natOutgoing plan the kernel was last seen or made to hold, and
    /// when it was last read back.
    nat: std::sync::Mutex<Option<(NatOutgoing, Instant)>>,
}

/// How often the natOutgoing table is read back when the pools are quiet.
pub const NAT_VERIFY: Duration = Duration::from_secs(10);

/// Starts the overlay thread (in the node's namespace).
pub fn spawn(args: &AgentArgs, ipam: Arc<dyn IpamStore>, shared: Arc<Shared>) -> Result<()> {
    let o = Overlay {
        node: args.node.clone(),
        node_ip: args.node_ip,
        fixed_mtu: (args.mtu > 0).then_some(args.mtu),
        store: args.store.clone(),
        ipam,
        shared,
        published: std::sync::Mutex::new(None),
        netns: args.netns.as_deref().map(super::netns_path),
        nat: std::sync::Mutex::new(None),
    };
    let netns = o.netns.clone();
    let every = Duration::from_millis(args.overlay_millis.max(50));
    std::thread::Builder::new()
        .name("overlay".into())
        .spawn(move || {
            // The netlink socket in the node's namespace; this thread (and
            // its datastore connections) in the agent's.
            let open = || match &netns {
                None => Netlink::here(),
                Some(path) => std::fs::File::open(path)
                    .map_err(|e| {
                        palisade_network::NetError::Namespace(format!("{}: {e}", path.display()))
                    })
                    .and_then(|f| Netlink::in_netns(&f)),
            };
            let mut nl = None;
            let mut last_error = String::new();
            loop {
                if nl.is_none() {
                    match open() {
                        Ok(n) => nl = Some(n),
                        Err(e) => tracing::warn!(error = %e, "overlay: netlink"),
                    }
                }
                if let Some(nl) = &nl {
                    match o.pass(nl) {
                        Ok(status) => {
                            last_error.clear();
                            o.shared.status().overlay = status;
                        }
                        Err(e) => {
                            let e = format!("{e:#}");
                            if e != last_error {
                                tracing::warn!(error = %e, "overlay");
                                last_error = e.clone();
                            }
                            o.shared.metrics.overlay_errors.inc();
                            if let Some(s) = o.shared.status().overlay.as_mut() {
                                s.error = Some(e);
                            }
                        }
                    }
                }
                std::thread::sleep(every);
            }
        })
        .context("starting the overlay thread")?;
    Ok(())
}

fn mode(e: Encapsulation) -> Mode {
    match e {
        Encapsulation::Always => Mode::Vxlan,
        Encapsulation::CrossSubnet => Mode::CrossSubnet,
        Encapsulation::Never => Mode::Direct,
    }
}

/// A Node object's overlay fields.
fn node_of(name: &str, doc: &Value) -> Option<Node> {
    let spec = &doc["spec"];
    let underlay = spec["bgp"]["ipv4Address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    let tunnel = spec["ipv4VXLANTunnelAddr"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .zip(
            spec["vxlanTunnelMACAddr"]
                .as_str()
                .and_then(overlay::parse_mac),
        );
    Some(Node {
        name: name.to_string(),
        underlay,
        tunnel,
    })
}

impl Overlay {
    /// Felix's natOutgoing settings for this node: `node.<name>` over
    /// `default` (the store validated both; one that does not read counts
    /// as unset).
    fn nat_settings(&self) -> NatSettings {
        let documents = self.shared.ipam.documents("FelixConfiguration");
        let named = |name: &str| {
            documents
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, d)| NatSettings::from_document(d).ok())
                .unwrap_or_default()
        };
        named(&format!("node.{}", self.node)).over(named("default"))
    }

    /// One pass; the status it leads to (None: nothing to do yet).
    fn pass(&self, nl: &Netlink) -> Result<Option<OverlayStatus>> {
        let Some(cluster) = self.shared.ipam.listed_cluster() else {
            return Ok(None);
        };
        let underlay = vxlan::detect_underlay(nl, self.node_ip)?;
        let device_mtu = underlay.link.mtu.saturating_sub(VXLAN_OVERHEAD);
        self.shared
            .pod_mtu
            .store(self.fixed_mtu.unwrap_or(device_mtu), Ordering::Relaxed);
        let env = palisade_datastore::SystemEnv;
        let ipam = Ipam::new(self.ipam.as_ref(), &cluster, &env);
        let vxlan_pools: Vec<IpNet> = cluster
            .pools()
            .iter()
            .filter(|p| p.vxlan != Encapsulation::Never && p.cidr.addr().is_ipv4() && !p.disabled)
            .map(|p| p.cidr)
            .collect();

        let mac = device_mac(&self.node);
        // IPAM assigns only to nodes it knows: the Node object first; the
        // next pass, once the writer has seen it, goes on.
        if !cluster.nodes.contains_key(&self.node) {
            self.publish_node(&underlay.addr, None, mac)?;
            return Ok(None);
        }
        // This node's tunnel (only where some pool uses VXLAN).
        let mut tunnel = None;
        let mut device = None;
        if !vxlan_pools.is_empty() {
            let handle = tunnel_handle(&self.node);
            let mut held = ipam.ips_by_handle(&handle).unwrap_or_default();
            held.retain(|n| n.addr().is_ipv4());
            let addr = match held.first() {
                Some(a) => a.addr(),
                None => {
                    let mut args = AutoAssignArgs::new(&self.node, 1, 0, Use::Tunnel);
                    args.handle = Some(handle.clone());
                    args.ipv4_pools = vxlan_pools.clone();
                    args.attrs.insert("node".into(), self.node.clone());
                    args.attrs
                        .insert("type".into(), "vxlanTunnelAddress".into());
                    let got = ipam.auto_assign(&args);
                    if let Some(e) = got.error {
                        return Err(anyhow!("assigning the VXLAN tunnel address: {e}"));
                    }
                    let a = got
                        .v4
                        .and_then(|a| a.ips.first().map(IpNet::addr))
                        .ok_or_else(|| {
                            anyhow!("no VXLAN tunnel address: the VXLAN pools are full")
                        })?;
                    tracing::info!(address = %a, %handle, "VXLAN tunnel address assigned");
                    a
                }
            };
            let IpAddr::V4(v4) = addr else {
                return Err(anyhow!("the tunnel address {addr} is not IPv4"));
            };
            device = Some(vxlan::ensure_device(nl, &underlay, v4, mac, device_mtu)?);
            tunnel = Some(v4);
        }
        self.publish_node(&underlay.addr, tunnel, mac)?;

        // The plan from the Node objects and the blocks.
        let nodes: Vec<Node> = self
            .shared
            .ipam
            .documents("Node")
            .iter()
            .filter_map(|(name, doc)| node_of(name, doc))
            .collect();
        let pools: BTreeMap<IpNet, Mode> = cluster
            .pools()
            .iter()
            .map(|p| (p.cidr, mode(p.vxlan)))
            .collect();
        let mut blocks = Vec::new();
        for p in ipam.utilization(&[]).context("reading the IPAM blocks")? {
            let Some(m) = pools.get(&p.cidr) else {
                continue;
            };
            for b in p.blocks {
                if let Some(host) = b.host {
                    blocks.push(Block {
                        cidr: b.cidr,
                        node: host,
                        mode: *m,
                    });
                }
            }
        }
        let hosts: Vec<IpAddr> = nodes.iter().map(|n| IpAddr::V4(n.underlay)).collect();
        let nat = natout::plan_with(
            &cluster
                .pools()
                .iter()
                .map(|p| PoolNat {
                    cidr: p.cidr,
                    nat_outgoing: p.nat_outgoing,
                    load_balancer_only: p.allowed_uses == [Use::LoadBalancer],
                })
                .collect::<Vec<_>>(),
            &self.nat_settings(),
            &hosts,
        );
        let nat_error = self.sync_nat(&nat).err().map(|e| {
            self.shared.metrics.overlay_errors.inc();
            format!("natOutgoing: {e:#}")
        });
        let input = Input {
            node: self.node.clone(),
            subnet: underlay.addr.trunc(),
            device: device.unwrap_or(0),
            nodes: nodes.clone(),
            blocks: blocks.clone(),
        };
        let want = overlay::wanted(&input);
        let have = match device {
            Some(d) => vxlan::observe(nl, d)?,
            None => overlay::State {
                routes: nl
                    .palisade_routes()?
                    .into_iter()
                    .filter(overlay::overlay_route)
                    .collect(),
                ..Default::default()
            },
        };
        let ops = overlay::diff(&want, &have);
        if !ops.is_empty() {
            let failures = vxlan::apply(nl, &ops);
            tracing::info!(
                routes_added = ops.add_routes.len(),
                routes_deleted = ops.del_routes.len(),
                neighbours_added = ops.add_neighbours.len(),
                neighbours_deleted = ops.del_neighbours.len(),
                fdb_added = ops.add_fdb.len(),
                fdb_deleted = ops.del_fdb.len(),
                failed = failures.len(),
                "overlay reconciled"
            );
            if let Some(e) = failures.first() {
                return Err(anyhow!(
                    "{} overlay operations failed, first: {e}",
                    failures.len()
                ));
            }
        }
        let m = &self.shared.metrics;
        m.overlay_routes.set(want.routes.len() as i64);
        m.overlay_remote_nodes.set(want.fdb.len() as i64);
        Ok(Some(OverlayStatus {
            device: device.map(|_| DEVICE.to_string()),
            device_mtu,
            pod_mtu: self.shared.pod_mtu.load(Ordering::Relaxed),
            underlay: format!("{} {}", underlay.link.name, underlay.addr),
            underlay_mtu: underlay.link.mtu,
            tunnel: tunnel.map(|t| t.to_string()),
            routes: want.routes.len(),
            nodes: nodes
                .iter()
                .filter(|n| n.name != self.node)
                .map(|n| OverlayNodeStatus {
                    node: n.name.clone(),
                    underlay: n.underlay.to_string(),
                    tunnel: n.tunnel.map(|(t, _)| t.to_string()).unwrap_or_default(),
                    blocks: blocks.iter().filter(|b| b.node == n.name).count(),
                })
                .collect(),
            nat_outgoing: nat.masquerade.iter().map(IpNet::to_string).collect(),
            error: nat_error,
        }))
    }

    /// Makes the kernel's natOutgoing table hold `want`: written when it
    /// differs from what was last applied, read back (and written again
    /// if it drifted) every [`NAT_VERIFY`]. A restarted agent reads first,
    /// so a table that is right is left as it is.
    fn sync_nat(&self, want: &NatOutgoing) -> Result<()> {
        let mut last = self.nat.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((applied, at)) = last.as_ref()
            && applied == want
            && at.elapsed() < NAT_VERIFY
        {
            return Ok(());
        }
        let work = || -> Result<()> {
            let have = nft::read()?;
            let right = match &have {
                None => want.is_empty(),
                Some(h) => h == want,
            };
            if !right {
                nft::apply(want)?;
                tracing::info!(
                    masquerading = ?want.masquerade,
                    pools = want.pools.len(),
                    "natOutgoing table written"
                );
            }
            Ok(())
        };
        match &self.netns {
            None => work()?,
            Some(path) => {
                let f = std::fs::File::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                palisade_network::netlink::in_netns(&f, work)??;
            }
        }
        *last = Some((want.clone(), Instant::now()));
        Ok(())
    }

    /// Writes this node's underlay address, tunnel address and MAC into
    /// its Node object (created if missing) when they differ.
    fn publish_node(
        &self,
        underlay: &ipnet::Ipv4Net,
        tunnel: Option<Ipv4Addr>,
        mac: [u8; 6],
    ) -> Result<()> {
        let current = self
            .shared
            .ipam
            .documents("Node")
            .into_iter()
            .find(|(n, _)| *n == self.node)
            .map(|(_, d)| d);
        let mut doc = current.clone().unwrap_or_else(|| {
            json!({"apiVersion": "projectcalico.org/v3", "kind": "Node",
                   "metadata": {"name": self.node}, "spec": {}})
        });
        doc["spec"]["bgp"]["ipv4Address"] = json!(underlay.to_string());
        match tunnel {
            Some(t) => {
                doc["spec"]["ipv4VXLANTunnelAddr"] = json!(t.to_string());
                doc["spec"]["vxlanTunnelMACAddr"] = json!(mac_text(&mac));
            }
            None => {
                if let Some(spec) = doc["spec"].as_object_mut() {
                    spec.remove("ipv4VXLANTunnelAddr");
                    spec.remove("vxlanTunnelMACAddr");
                }
            }
        }
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref() == Some(&doc) || published.as_ref() == Some(&doc) {
            return Ok(());
        }
        *published = Some(doc.clone());
        // The server-side fields go; apply writes the rest.
        if let Some(meta) = doc["metadata"].as_object_mut() {
            meta.retain(|k, _| matches!(k.as_str(), "name" | "labels" | "annotations"));
        }
        let ds = crate::store_cmd::open(&self.store)?;
        ds.apply_text("palisade-agent", &doc.to_string())
            .with_context(|| format!("publishing Node {}", self.node))?;
        tracing::info!(node = %self.node, underlay = %underlay, tunnel = ?tunnel, "Node published");
        Ok(())
    }
}
