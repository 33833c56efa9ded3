//! The verbs. ADD is a sequence of steps, each undone in reverse when a
//! later one fails; DEL undoes what ADD did and is fine with any part of it
//! missing; CHECK compares; STATUS says whether ADD can work now; GC
//! removes this network's endpoints the runtime no longer holds.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use ipnet::IpNet;
use palisade_cni::protocol::{Reply, Request};
use palisade_cni::spec::{Attached, CniError, Command, ErrorCode, Invocation, NetConf};
use palisade_datastore::kubernetes::write::CONTAINER_ID;
use palisade_datastore::{Datastore, StoreError};
use palisade_ipam::cni::{CniRequest, PodInfo};
use palisade_ipam::{Ipam, IpamStore};
use palisade_network::NetError;
use palisade_network::netlink::Netlink;
use palisade_network::pod::{self, GATEWAY_V4, GATEWAY_V6, PodWiring, WireStep};
use policy_core::ObjectRef;
use serde_json::{Value, json};

use super::Server;

/// The annotation naming the network a workload endpoint was made for.
pub use palisade_datastore::stored_pods::NETWORK_ANNOTATION;

/// Who a call is for, and the names derived from it.
#[derive(Debug, Clone)]
struct Workload {
    namespace: String,
    /// The pod's name (`K8S_POD_NAME`), or the container ID.
    name: String,
    /// `k8s` when the runtime named a pod, `cni` otherwise.
    orchestrator: &'static str,
    host_ifname: String,
    /// The WorkloadEndpoint's name, as Calico forms it.
    endpoint: String,
}

fn plugin_error(msg: impl Into<String>, e: impl std::fmt::Display) -> CniError {
    CniError::new(ErrorCode::Plugin, msg, e.to_string())
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn workload(node: &str, inv: &Invocation, conf: &NetConf) -> Result<Workload, CniError> {
    let namespace = inv
        .arg("K8S_POD_NAMESPACE")
        .map(str::to_string)
        .or_else(|| conf.namespace.clone())
        .unwrap_or_else(|| "default".to_string());
    if !dns_label(&namespace) {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "invalid namespace",
            format!(
                "{namespace:?} (K8S_POD_NAMESPACE or the configuration's namespace) is not a DNS label"
            ),
        ));
    }
    let (name, orchestrator, host_key) = match inv.arg("K8S_POD_NAME") {
        Some(pod) => (pod.to_string(), "k8s", format!("{namespace}.{pod}")),
        None => (inv.container_id.clone(), "cni", inv.container_id.clone()),
    };
    let endpoint = palisade_datastore::kubernetes::workload_endpoint_name(
        node,
        orchestrator,
        &name,
        &inv.ifname,
    );
    Ok(Workload {
        namespace,
        name,
        orchestrator,
        host_ifname: pod::host_ifname(&host_key),
        endpoint,
    })
}

/// The container's network namespace (ADD and CHECK need it there).
fn container_netns(inv: &Invocation) -> Result<File, CniError> {
    let path = inv.netns.as_deref().unwrap_or_default();
    File::open(path).map_err(|e| {
        CniError::new(
            ErrorCode::UnknownContainer,
            format!("the container's network namespace {path} cannot be opened"),
            e.to_string(),
        )
    })
}

fn endpoint_ref(w: &Workload) -> ObjectRef {
    ObjectRef::new("WorkloadEndpoint", Some(&w.namespace), w.endpoint.clone())
}

impl Server {
    pub(super) fn handle(&self, request: &Request) -> Reply {
        let inv = &request.invocation;
        let conf = match serde_json::to_vec(&request.netconf)
            .map_err(|e| CniError::new(ErrorCode::Decode, "the configuration", e.to_string()))
            .and_then(|b| NetConf::parse(&b))
        {
            Ok(c) => c,
            Err(e) => return Reply::Failed(e),
        };
        let result = match inv.command {
            Command::Add => self.add(inv, &conf).map(Reply::Attached),
            Command::Del => self.del(inv, &conf).map(|()| Reply::Done),
            Command::Check => self.check(inv, &conf).map(|()| Reply::Done),
            Command::Status => self.status().map(|()| Reply::Done),
            Command::Gc => self.gc(&conf).map(|()| Reply::Done),
            Command::Version => Ok(Reply::Done),
        };
        result.unwrap_or_else(Reply::Failed)
    }

    /// Runs `f` with a netlink handle in the node's namespace, on a thread
    /// that joined it (the host end's sysctls are written there); the call
    /// itself stays in the agent's namespace, where the datastore is.
    fn node_net<T: Send>(
        &self,
        f: impl FnOnce(&Netlink) -> Result<T, NetError> + Send,
    ) -> Result<T, NetError> {
        let run = || f(&Netlink::here()?);
        match &self.netns {
            None => run(),
            Some(path) => {
                let file = File::open(path).map_err(|e| {
                    NetError::Namespace(format!(
                        "opening the node's namespace {}: {e}",
                        path.display()
                    ))
                })?;
                palisade_network::netlink::in_netns(&file, run)?
            }
        }
    }

    fn fault(&self, step: &str) -> Result<(), CniError> {
        if self.fail_at.as_deref() == Some(step) {
            return Err(plugin_error(
                format!("injected failure at {step}"),
                "--cni-fail-at",
            ));
        }
        Ok(())
    }

    fn ipam<'a>(
        &'a self,
        cluster: &'a palisade_ipam::Cluster,
        env: &'a palisade_datastore::SystemEnv,
    ) -> Ipam<'a> {
        Ipam::new(self.ipam.as_ref() as &dyn IpamStore, cluster, env).with_cache(&self.ipam_cache)
    }

    fn ipam_request<'a>(
        &'a self,
        inv: &'a Invocation,
        conf: &'a NetConf,
        w: &Workload,
        cluster: &palisade_ipam::Cluster,
    ) -> Result<CniRequest<'a>, CniError> {
        let ip = match inv.arg("IP") {
            None => None,
            Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_ARGS IP",
                    format!("{text:?} is not an IP address"),
                )
            })?),
        };
        Ok(CniRequest {
            netconf: &conf.raw,
            container_id: &inv.container_id,
            ip,
            pod: (w.orchestrator == "k8s").then(|| PodInfo {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                namespace_annotations: cluster
                    .namespaces
                    .get(&w.namespace)
                    .cloned()
                    .unwrap_or_default(),
                // A stored Pod's own requests (pools, addresses).
                annotations: self.shared.ipam.pod_annotations(&w.namespace, &w.name),
            }),
            local_host: &self.node,
            reuse_existing: false,
        })
    }

    fn datastore(&self) -> Result<Box<dyn Datastore>, CniError> {
        crate::store_cmd::open(&self.store).map_err(|e| {
            CniError::new(
                ErrorCode::TryAgainLater,
                "the datastore is not reachable",
                format!("{e:#}"),
            )
        })
    }

    fn add(&self, inv: &Invocation, conf: &NetConf) -> Result<Attached, CniError> {
        if !self.shared.status().ready {
            return Err(CniError::new(
                ErrorCode::TryAgainLater,
                "the node agent is not synced with the datastore yet",
                "ADD waits until the node enforces the cluster's policy",
            ));
        }
        let w = workload(&self.node, inv, conf)?;
        let netns = container_netns(inv)?;
        let cluster = self.shared.ipam.cluster();
        let env = palisade_datastore::SystemEnv;
        let ipam = self.ipam(&cluster, &env);
        let req = self.ipam_request(inv, conf, &w, &cluster)?;

        let started = Instant::now();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        // 1. Addresses.
        self.fault("ipam")?;
        let assigned = palisade_ipam::cni::add(&ipam, &req).map_err(|e| {
            CniError::new(
                ErrorCode::Plugin,
                format!("no address for {}/{}", w.namespace, w.name),
                e.to_string(),
            )
        })?;
        let release = || {
            if let Err(e) = palisade_ipam::cni::del(&ipam, &req) {
                tracing::warn!(error = %e, handle = %req.handle(), "CNI: releasing after a failed ADD");
            }
        };
        let addrs: Vec<IpAddr> = assigned.ips.iter().map(IpNet::addr).collect();
        let ipam_ms = ms(started);
        let wire_started = Instant::now();
        let mtu = conf.mtu.unwrap_or_else(|| {
            self.shared
                .pod_mtu
                .load(std::sync::atomic::Ordering::Relaxed)
        });

        // 2. The veth, in its steps.
        let spec = PodWiring {
            host_ifname: &w.host_ifname,
            pod_ifname: &inv.ifname,
            netns: &netns,
            addrs: &addrs,
            mtu,
        };
        let fail_at = self.fail_at.as_deref();
        let wired = self.node_net(|host| {
            pod::wire(host, &spec, &mut |step: WireStep| {
                if fail_at == Some(step_name(step)) {
                    return Err(NetError::Injected(step_name(step).into()));
                }
                Ok(())
            })
        });
        let wired = match wired {
            Ok(w) => w,
            Err(e) => {
                release();
                return Err(plugin_error("wiring the pod's interface", e));
            }
        };
        let unwire = || {
            let done =
                self.node_net(|host| pod::unwire(host, &w.host_ifname, Some(&netns), &inv.ifname));
            if let Err(e) = done {
                tracing::warn!(error = %e, interface = %w.host_ifname, "CNI: unwiring after a failed ADD");
            }
        };
        let pod_mac = wired
            .pod_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");

        let wire_ms = ms(wire_started);
        // 3. The workload endpoint, then 4. the policy in the kernel.
        let endpoint_started = Instant::now();
        let endpoint = self.endpoint_document(inv, conf, &w, &assigned.ips, &pod_mac);
        let written = self.fault("endpoint").and_then(|()| {
            let ds = self.datastore()?;
            ds.apply_text("palisade-cni", &endpoint.to_string())
                .map_err(|e| plugin_error("writing the workload endpoint", e))
        });
        if let Err(e) = written {
            unwire();
            release();
            return Err(e);
        }
        let endpoint_ms = ms(endpoint_started);
        let attach_started = Instant::now();
        if let Err(e) = self.fault("policy").and_then(|()| self.wait_attached(&w)) {
            if let Err(d) = self.datastore().and_then(|ds| {
                ds.delete(&[endpoint_ref(&w)])
                    .map_err(|e| plugin_error("deleting", e))
            }) {
                tracing::warn!(error = %d, endpoint = %w.endpoint, "CNI: deleting the endpoint after a failed ADD");
            }
            unwire();
            release();
            return Err(e);
        }

        if self.pod_connect_balancing {
            // Best effort: a pod not listed is balanced per packet.
            match super::super::pod_sockets::PodSockets::listed(
                &w.host_ifname,
                Path::new(inv.netns.as_deref().unwrap_or_default()),
                &addrs,
            ) {
                Ok(listed) => self.shared.pod_sockets.push(listed),
                Err(e) => {
                    tracing::warn!(error = %e, pod = %w.name, "CNI: the pod's TCP stays balanced per packet")
                }
            }
        }
        tracing::info!(
            pod = %format!("{}/{}", w.namespace, w.name),
            ipam_ms,
            wire_ms,
            endpoint_ms,
            attach_ms = ms(attach_started),
            "CNI ADD steps"
        );
        let mut routes = Vec::new();
        if addrs.iter().any(IpAddr::is_ipv4) {
            routes.push((
                IpNet::new(IpAddr::from([0, 0, 0, 0]), 0).map_err(|e| plugin_error("route", e))?,
                IpAddr::V4(GATEWAY_V4),
            ));
        }
        if addrs.iter().any(IpAddr::is_ipv6) {
            routes.push((
                IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
                    .map_err(|e| plugin_error("route", e))?,
                IpAddr::V6(GATEWAY_V6),
            ));
        }
        Ok(Attached {
            host_ifname: w.host_ifname.clone(),
            pod_ifname: inv.ifname.clone(),
            pod_mac,
            sandbox: inv.netns.clone().unwrap_or_default(),
            ips: addrs.iter().map(|a| IpNet::from(*a)).collect(),
            routes,
            mtu,
        })
    }

    fn endpoint_document(
        &self,
        inv: &Invocation,
        conf: &NetConf,
        w: &Workload,
        ips: &[IpNet],
        mac: &str,
    ) -> Value {
        let mut labels = serde_json::Map::new();
        for (k, v) in &conf.labels {
            labels.insert(k.clone(), json!(v));
        }
        let nets: Vec<String> = ips
            .iter()
            .map(|i| IpNet::from(i.addr()).to_string())
            .collect();
        json!({
            "apiVersion": "projectcalico.org/v3",
            "kind": "WorkloadEndpoint",
            "metadata": {
                "name": w.endpoint,
                "namespace": w.namespace,
                "labels": labels,
                "annotations": {NETWORK_ANNOTATION: conf.name},
            },
            "spec": {
                "orchestrator": w.orchestrator,
                "node": self.node,
                "containerID": inv.container_id,
                "pod": w.name,
                "endpoint": inv.ifname,
                "interfaceName": w.host_ifname,
                "mac": mac,
                "ipNetworks": nets,
                "profiles": [format!("kns.{}", w.namespace)],
            },
        })
    }

    /// Waits until the writer has the pod's interface attached (its policy
    /// is in the kernel).
    fn wait_attached(&self, w: &Workload) -> Result<(), CniError> {
        let started = Instant::now();
        loop {
            let state = self
                .shared
                .status()
                .endpoints
                .iter()
                .find(|e| e.interface == w.host_ifname)
                .map(|e| e.state.clone());
            if state.as_deref() == Some("attached") {
                return Ok(());
            }
            if started.elapsed() >= self.attach_timeout {
                return Err(CniError::new(
                    ErrorCode::TryAgainLater,
                    format!(
                        "the pod's policy was not in the kernel within {} s",
                        self.attach_timeout.as_secs()
                    ),
                    format!(
                        "interface {}: {}",
                        w.host_ifname,
                        state.unwrap_or_else(|| "not seen by the writer".into())
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn del(&self, inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
        let w = workload(&self.node, inv, conf)?;
        let mut first: Option<CniError> = None;
        let mut note = |e: CniError| {
            first.get_or_insert(e);
        };
        // The endpoint first: its policy goes before its addresses can be
        // handed to another pod. A stored Pod annotated for another
        // container (a newer sandbox) keeps its endpoint: this DEL is for
        // an older one (Calico's plugin compares the same annotation).
        let newer_sandbox = self
            .shared
            .ipam
            .pod_annotations(&w.namespace, &w.name)
            .get(CONTAINER_ID)
            .is_some_and(|c| *c != inv.container_id);
        match self.datastore() {
            Ok(_) if newer_sandbox => {}
            Ok(ds) => match ds.delete(&[endpoint_ref(&w)]) {
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(e) => note(plugin_error("deleting the workload endpoint", e)),
            },
            Err(e) => note(e),
        }
        let cluster = self.shared.ipam.cluster();
        let env = palisade_datastore::SystemEnv;
        let ipam = self.ipam(&cluster, &env);
        match self.ipam_request(inv, conf, &w, &cluster) {
            Ok(req) => {
                if let Err(e) = palisade_ipam::cni::del(&ipam, &req) {
                    note(plugin_error("releasing the addresses", e));
                }
            }
            Err(e) => note(e),
        }
        // The namespace may be gone already (the spec allows it). The
        // host interface is named by the pod, not the container: a newer
        // sandbox's stays.
        let netns = inv.netns.as_deref().and_then(|p| File::open(p).ok());
        if self.pod_connect_balancing && !newer_sandbox {
            self.shared
                .pod_sockets
                .push(super::super::pod_sockets::PodSockets::Gone {
                    interface: w.host_ifname.clone(),
                });
        }
        let unwired = if newer_sandbox {
            Ok(())
        } else {
            self.node_net(|host| pod::unwire(host, &w.host_ifname, netns.as_ref(), &inv.ifname))
        };
        if let Err(e) = unwired {
            note(plugin_error("removing the pod's interface", e));
        }
        first.map_or(Ok(()), Err)
    }

    fn check(&self, inv: &Invocation, conf: &NetConf) -> Result<(), CniError> {
        let w = workload(&self.node, inv, conf)?;
        let netns = container_netns(inv)?;
        let cluster = self.shared.ipam.cluster();
        let env = palisade_datastore::SystemEnv;
        let ipam = self.ipam(&cluster, &env);
        let req = self.ipam_request(inv, conf, &w, &cluster)?;
        let held = ipam
            .ips_by_handle(&req.handle())
            .map_err(|e| plugin_error(format!("IPAM handle {}", req.handle()), e))?;
        let addrs: Vec<IpAddr> = held.iter().map(IpNet::addr).collect();
        let mut problems = Vec::new();
        if addrs.is_empty() {
            problems.push(format!("IPAM holds no address for {}", req.handle()));
        }
        // What the runtime recorded must be what IPAM holds.
        if let Some(prev) = conf.raw["prevResult"]["ips"].as_array() {
            for ip in prev.iter().filter_map(|i| i["address"].as_str()) {
                let ok = ip.parse::<IpNet>().is_ok_and(|n| addrs.contains(&n.addr()));
                if !ok {
                    problems.push(format!(
                        "prevResult has {ip}, which IPAM does not hold for it"
                    ));
                }
            }
        }
        problems.extend(
            self.node_net(|host| pod::check(host, &w.host_ifname, &netns, &inv.ifname, &addrs))
                .map_err(|e| plugin_error("reading the pod's interface", e))?,
        );
        let attached = self
            .shared
            .status()
            .endpoints
            .iter()
            .any(|e| e.interface == w.host_ifname && e.state == "attached");
        if !attached {
            problems.push(format!("policy is not attached to {}", w.host_ifname));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Plugin,
                "the attachment is not as ADD left it",
                problems.join("; "),
            ))
        }
    }

    fn status(&self) -> Result<(), CniError> {
        let s = self.shared.status();
        if !s.ready {
            return Err(CniError::new(
                ErrorCode::NotAvailable,
                "the node agent is not ready",
                format!(
                    "{:?}: {}",
                    s.sync,
                    s.datastore_error.clone().unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }

    /// Deletes this network's endpoints on this node (and their addresses
    /// and interfaces) whose attachment the runtime no longer lists.
    fn gc(&self, conf: &NetConf) -> Result<(), CniError> {
        let Some(valid) = &conf.valid_attachments else {
            return Ok(());
        };
        let ds = self.datastore()?;
        let snapshot = ds
            .snapshot()
            .map_err(|e| plugin_error("listing the workload endpoints", e))?;
        for o in &snapshot.objects {
            let d = &o.document;
            let annotations = &d["metadata"]["annotations"];
            if annotations[NETWORK_ANNOTATION] != conf.name.as_str() {
                continue;
            }
            // This network's attachments on this node: its endpoints, and
            // stored Pods holding one (on Calico's `eth0`).
            let (container, ifname, pod) = match d["kind"].as_str() {
                Some("WorkloadEndpoint") if d["spec"]["node"] == self.node.as_str() => (
                    d["spec"]["containerID"].as_str().unwrap_or_default(),
                    d["spec"]["endpoint"].as_str().unwrap_or_default(),
                    d["spec"]["pod"].as_str().unwrap_or_default(),
                ),
                Some("Pod") if d["spec"]["nodeName"] == self.node.as_str() => (
                    annotations[CONTAINER_ID].as_str().unwrap_or_default(),
                    "eth0",
                    d["metadata"]["name"].as_str().unwrap_or_default(),
                ),
                _ => continue,
            };
            if valid
                .iter()
                .any(|a| a.container_id == container && a.ifname == ifname)
            {
                continue;
            }
            let mut args = Vec::new();
            if d["kind"] == "Pod" || d["spec"]["orchestrator"] == "k8s" {
                args.push((
                    "K8S_POD_NAMESPACE".to_string(),
                    d["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ));
                args.push(("K8S_POD_NAME".to_string(), pod.to_string()));
            }
            let inv = Invocation {
                command: Command::Del,
                container_id: container.to_string(),
                netns: None,
                ifname: ifname.to_string(),
                args,
            };
            tracing::info!(container, ifname, network = %conf.name, "CNI GC: removing a stale attachment");
            self.del(&inv, conf)?;
        }
        Ok(())
    }
}

/// The fault-injection names of the wiring steps.
fn step_name(step: WireStep) -> &'static str {
    match step {
        WireStep::CreateVeth => "veth",
        WireStep::HostEnd => "host-end",
        WireStep::MoveToPod => "move",
        WireStep::PodEnd => "pod-end",
        WireStep::PodRoutes => "pod-routes",
        WireStep::HostRoutes => "host-routes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_calico() {
        let inv = Invocation {
            command: Command::Add,
            container_id: "c0ffee".into(),
            netns: None,
            ifname: "eth0".into(),
            args: vec![("K8S_POD_NAME".into(), "web-0".into())],
        };
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"frontend","type":"palisade-cni","namespace":"shop"}"#,
        )
        .unwrap();
        let w = workload("node-1", &inv, &conf).unwrap();
        assert_eq!(w.endpoint, "node--1-k8s-web--0-eth0");
        assert_eq!(w.namespace, "shop");
        assert_eq!(w.host_ifname, pod::host_ifname("shop.web-0"));
        let bad = Invocation {
            args: vec![("K8S_POD_NAMESPACE".into(), "Not_A_Label".into())],
            ..inv
        };
        assert!(
            workload("n", &bad, &conf)
                .unwrap_err()
                .details
                .contains("Not_A_Label")
        );
        // The names tests inject failures at (`--cni-fail-at`).
        let names: Vec<&str> = WireStep::ALL.iter().map(|s| step_name(*s)).collect();
        assert_eq!(
            names,
            [
                "veth",
                "host-end",
                "move",
                "pod-end",
                "pod-routes",
                "host-routes"
            ]
        );
    }
}
