//! `palisade ipam`: Calico IPAM from the command line, like `calicoctl
//! ipam` — pool use, a consistency check a person can act on, releasing
//! and assigning addresses, garbage collection, configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use ipnet::IpNet;
use palisade_datastore::{
    Datastore, EmbeddedIpamStore, EmbeddedStore, EtcdIpamStore, EtcdStore, SystemEnv, resources,
};
use palisade_ipam::gc::Live;
use palisade_ipam::{AssignIpArgs, AutoAssignArgs, Cluster, Ipam, IpamStore, Release, Use};

use crate::store_cmd::{DatastoreKind, StoreArgs};

#[derive(Subcommand, Debug)]
pub enum IpamCommand {
    /// Per pool: size, in use, free; blocks per node (--show-blocks: every block).
    Show {
        /// Every block: its pool, node and use.
        #[arg(long)]
        show_blocks: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Leaked addresses, blocks of deleted nodes, records that disagree;
    /// each with what to do. Exit 1 when there are findings.
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Release addresses (whatever holds them).
    Release {
        /// Addresses to release.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Assign addresses to a handle on a node, as a CNI ADD does; prints them.
    Assign {
        /// The node.
        #[arg(long)]
        node: String,
        /// The handle (a CNI ADD uses `<network>.<container id>`).
        #[arg(long)]
        handle: String,
        /// This address (AssignIP) instead of any free one.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// IPv4 addresses wanted.
        #[arg(long, default_value_t = 1)]
        ipv4: usize,
        /// IPv6 addresses wanted.
        #[arg(long, default_value_t = 0)]
        ipv6: usize,
        /// Only these pools (CIDRs).
        #[arg(long = "pool")]
        pools: Vec<IpNet>,
        /// Owner: namespace/pod (what garbage collection checks).
        #[arg(long)]
        pod: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Release everything a handle holds (a CNI DEL).
    ReleaseHandle {
        /// The handle.
        handle: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Release leaked addresses older than the grace period, blocks of
    /// deleted nodes once empty, and mend records.
    Gc {
        /// Addresses younger than this (seconds) are left alone: their pod
        /// may not be in the datastore yet.
        #[arg(long, default_value_t = 900)]
        grace_seconds: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Random assigns and releases, journaled, for concurrency, crash and
    /// throughput checks.
    #[command(hide = true)]
    Exercise(crate::ipam_exercise::ExerciseArgs),
    /// Set IPAM's configuration (unset flags keep their value).
    Configure {
        /// Hosts only take addresses from their own blocks.
        #[arg(long)]
        strict_affinity: Option<bool>,
        /// Hosts claim new blocks when theirs are full.
        #[arg(long)]
        auto_allocate_blocks: Option<bool>,
        /// Blocks a host may hold (0: 20).
        #[arg(long)]
        max_blocks_per_host: Option<u32>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// The IPAM records that go with a datastore: `<state-dir>/ipam.redb`, or
/// the same etcd.
pub fn open_ipam_store(args: &StoreArgs) -> Result<Box<dyn IpamStore>> {
    Ok(match args.datastore {
        DatastoreKind::Embedded => {
            std::fs::create_dir_all(&args.state_dir)
                .with_context(|| format!("creating {}", args.state_dir.display()))?;
            let path = args.state_dir.join("ipam.redb");
            Box::new(
                EmbeddedIpamStore::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )
        }
        DatastoreKind::Etcd => Box::new(
            EtcdIpamStore::connect(&args.etcd())
                .with_context(|| format!("connecting to {}", args.describe()))?,
        ),
        DatastoreKind::Kubernetes => Box::new(
            palisade_datastore::KubeIpamStore::connect(args.kube_client())
                .with_context(|| format!("connecting to {}", args.describe()))?,
        ),
    })
}

/// The cluster IPAM reads (pools, reservations, nodes, namespaces) and
/// what lives (pods, nodes), from the datastore.
pub fn cluster_of(args: &StoreArgs) -> Result<(Cluster, Live)> {
    let snapshot = match args.datastore {
        DatastoreKind::Embedded => EmbeddedStore::open(&args.state_dir)
            .with_context(|| format!("opening the datastore in {}", args.state_dir.display()))?
            .snapshot(),
        DatastoreKind::Etcd => EtcdStore::connect(&args.etcd())
            .with_context(|| format!("connecting to {}", args.describe()))?
            .snapshot(),
        DatastoreKind::Kubernetes => args.kubernetes()?.snapshot(),
    }
    .with_context(|| format!("reading {}", args.describe()))?;
    let cluster = resources::cluster(&snapshot.objects);
    // A workload endpoint stands for the pod it names.
    let pods = snapshot
        .objects
        .iter()
        .filter_map(|o| {
            let namespace = o.object.namespace.clone().unwrap_or_default();
            match o.object.kind.as_str() {
                "Pod" => Some((namespace, o.object.name.clone())),
                "WorkloadEndpoint" => Some((
                    namespace,
                    o.document["spec"]["pod"]
                        .as_str()
                        .unwrap_or(&o.object.name)
                        .to_string(),
                )),
                _ => None,
            }
        })
        .collect();
    let nodes = cluster.nodes.keys().cloned().collect();
    Ok((cluster, Live { pods, nodes }))
}

fn pct(used: u128, of: u128) -> String {
    if of == 0 {
        return "-".into();
    }
    format!("{:.1}%", used as f64 * 100.0 / of as f64)
}

pub fn run(command: IpamCommand) -> Result<std::process::ExitCode> {
    let store_args = match &command {
        IpamCommand::Exercise(a) => a.store.clone(),
        IpamCommand::Show { store, .. }
        | IpamCommand::Check { store }
        | IpamCommand::Release { store, .. }
        | IpamCommand::Assign { store, .. }
        | IpamCommand::ReleaseHandle { store, .. }
        | IpamCommand::Gc { store, .. }
        | IpamCommand::Configure { store, .. } => store.clone(),
    };
    let (cluster, live) = cluster_of(&store_args)?;
    let records = open_ipam_store(&store_args)?;
    let env = SystemEnv;
    let ipam = Ipam::new(records.as_ref(), &cluster, &env);
    let ok = std::process::ExitCode::SUCCESS;
    match command {
        IpamCommand::Exercise(args) => {
            crate::ipam_exercise::run(&args, &ipam)?;
            Ok(ok)
        }
        IpamCommand::Show { show_blocks, .. } => {
            show(&ipam, show_blocks)?;
            Ok(ok)
        }
        IpamCommand::Check { .. } => {
            let handles = palisade_ipam::gc::live_handles(&ipam, &live)?;
            let report = palisade_ipam::check::check(ipam.records(), &cluster, Some(&handles))?;
            outln!(
                "checked {} blocks, {} allocated addresses",
                report.blocks,
                report.allocated.len()
            )?;
            for f in &report.findings {
                outln!("- {f}")?;
            }
            outln!("{} findings", report.findings.len())?;
            Ok(if report.findings.is_empty() {
                ok
            } else {
                std::process::ExitCode::FAILURE
            })
        }
        IpamCommand::Release { ips, .. } => {
            let reqs: Vec<Release> = ips
                .iter()
                .map(|ip| Release {
                    address: *ip,
                    handle: None,
                    sequence: None,
                })
                .collect();
            let out = ipam.release_ips(&reqs)?;
            if let Some(e) = out.error {
                bail!(e);
            }
            let unallocated: BTreeSet<IpAddr> = out.unallocated.iter().copied().collect();
            for ip in &ips {
                if unallocated.contains(ip) {
                    outln!("{ip} was not allocated")?;
                } else {
                    outln!("{ip} released")?;
                }
            }
            Ok(ok)
        }
        IpamCommand::Assign {
            node,
            handle,
            ip,
            ipv4,
            ipv6,
            pools,
            pod,
            ..
        } => {
            let mut attrs = BTreeMap::new();
            if let Some(p) = &pod {
                let (ns, name) = p.split_once('/').context("--pod is namespace/name")?;
                attrs.insert("namespace".to_string(), ns.to_string());
                attrs.insert("pod".to_string(), name.to_string());
                attrs.insert("node".to_string(), node.clone());
                attrs.insert(
                    "timestamp".to_string(),
                    palisade_ipam::time::rfc3339(ipam.now().as_secs()),
                );
            }
            if let Some(ip) = ip {
                ipam.assign_ip(&AssignIpArgs {
                    ip,
                    hostname: node,
                    handle: Some(handle),
                    attrs,
                    intended_use: Some(Use::Workload),
                    max_alloc_per_handle: 0,
                    host_reserved: None,
                })?;
                outln!("{ip}")?;
                return Ok(ok);
            }
            let mut args = AutoAssignArgs::new(&node, ipv4, ipv6, Use::Workload);
            args.handle = Some(handle);
            args.attrs = attrs;
            args.ipv4_pools = pools
                .iter()
                .filter(|p| p.addr().is_ipv4())
                .copied()
                .collect();
            args.ipv6_pools = pools
                .iter()
                .filter(|p| p.addr().is_ipv6())
                .copied()
                .collect();
            let got = ipam.auto_assign(&args);
            for a in [&got.v4, &got.v6].into_iter().flatten() {
                for n in &a.ips {
                    outln!("{n}")?;
                }
                if let Some(short) = a.partial_fulfillment_error() {
                    bail!("{short} (node {node})");
                }
            }
            if let Some(e) = got.error {
                bail!(e);
            }
            Ok(ok)
        }
        IpamCommand::ReleaseHandle { handle, .. } => {
            ipam.release_by_handle(&handle)?;
            outln!("released {handle}")?;
            Ok(ok)
        }
        IpamCommand::Gc { grace_seconds, .. } => {
            let (done, _) = ipam.collect(&live, Duration::from_secs(grace_seconds))?;
            outln!(
                "released {} leaked addresses ({} younger than the grace period kept), {} blocks of deleted nodes; mended {} handles, {} affinities",
                done.released,
                done.waiting,
                done.blocks_released,
                done.handles_mended,
                done.affinities_mended
            )?;
            Ok(ok)
        }
        IpamCommand::Configure {
            strict_affinity,
            auto_allocate_blocks,
            max_blocks_per_host,
            ..
        } => {
            let mut c = ipam.get_config(false)?;
            if let Some(v) = strict_affinity {
                c.strict_affinity = v;
            }
            if let Some(v) = auto_allocate_blocks {
                c.auto_allocate_blocks = v;
            }
            if let Some(v) = max_blocks_per_host {
                c.max_blocks_per_host = v;
            }
            ipam.set_config(c)?;
            outln!(
                "strictAffinity {}, autoAllocateBlocks {}, maxBlocksPerHost {}",
                c.strict_affinity,
                c.auto_allocate_blocks,
                c.max_blocks_per_host
            )?;
            Ok(ok)
        }
    }
}

fn show(ipam: &Ipam<'_>, show_blocks: bool) -> Result<()> {
    let pools = ipam.utilization(&[])?;
    outln!(
        "{:<20} {:<22} {:>10} {:>8} {:>10} {:>7}",
        "POOL",
        "CIDR",
        "SIZE",
        "IN USE",
        "FREE",
        "USED"
    )?;
    let mut per_node: BTreeMap<String, (usize, u128)> = BTreeMap::new();
    for p in &pools {
        for b in &p.blocks {
            let e = per_node
                .entry(b.host.clone().unwrap_or_else(|| "(none)".into()))
                .or_default();
            e.0 += 1;
            e.1 += b.in_use;
        }
        if p.name == "orphaned allocation blocks" {
            if !p.blocks.is_empty() {
                outln!(
                    "{:<20} {:<22} {:>10} {:>8} {:>10} {:>7}",
                    "(no pool)",
                    "-",
                    "-",
                    p.in_use,
                    "-",
                    "-"
                )?;
            }
            continue;
        }
        outln!(
            "{:<20} {:<22} {:>10} {:>8} {:>10} {:>7}",
            p.name,
            p.cidr.to_string(),
            p.capacity,
            p.in_use,
            p.available,
            pct(p.in_use, p.capacity)
        )?;
    }
    outln!()?;
    outln!("{:<20} {:>7} {:>8}", "NODE", "BLOCKS", "IN USE")?;
    for (node, (blocks, in_use)) in &per_node {
        outln!("{node:<20} {blocks:>7} {in_use:>8}")?;
    }
    if show_blocks {
        outln!()?;
        outln!(
            "{:<26} {:<20} {:<20} {:>8} {:>8}",
            "BLOCK",
            "POOL",
            "NODE",
            "IN USE",
            "FREE"
        )?;
        for p in &pools {
            for b in &p.blocks {
                outln!(
                    "{:<26} {:<20} {:<20} {:>8} {:>8}",
                    b.cidr.to_string(),
                    p.name,
                    b.host.as_deref().unwrap_or("(none)"),
                    b.in_use,
                    b.available
                )?;
            }
        }
    }
    Ok(())
}
