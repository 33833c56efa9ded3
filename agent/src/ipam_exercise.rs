//! `palisade ipam exercise` (hidden): one allocator doing random assigns
//! and releases, as many CNI ADDs and DELs would, for the concurrency,
//! crash and throughput checks. Every acknowledged step is journaled
//! (fsynced) before the next one starts, so a checker can tell exactly
//! what a process killed at any point had been promised.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_ipam::{AutoAssignArgs, Ipam, IpamCache, Use};
use serde_json::json;

use crate::store_cmd::StoreArgs;

#[derive(clap::Args, Debug)]
pub struct ExerciseArgs {
    /// The node allocating.
    #[arg(long)]
    pub node: String,
    /// Operations to run.
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Seed of the assign/release choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of operations that release (0..1) while handles are held.
    #[arg(long, default_value_t = 0.4)]
    pub release_share: f64,
    /// Journal (JSON lines, appended, fsynced per step).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Release everything held at the end.
    #[arg(long)]
    pub drain: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

struct Journal(Option<std::fs::File>);

impl Journal {
    /// Appends a step with the wall clock (nanoseconds), so steps of
    /// several processes can be ordered.
    fn write(&mut self, mut v: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.0 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            v["t"] = json!(t);
            writeln!(f, "{v}")?;
            f.sync_data()?;
        }
        Ok(())
    }
}

fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let at = |q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map_or(0, |d| d.as_micros() as u64)
    };
    let total: Duration = v.iter().sum();
    json!({"count": v.len(), "p50_us": at(0.5), "p99_us": at(0.99),
           "mean_us": if v.is_empty() { 0 } else { (total / v.len() as u32).as_micros() as u64 }})
}

pub fn run(args: &ExerciseArgs, ipam: &Ipam<'_>) -> Result<()> {
    // A long-running allocator, as a CNI daemon or the agent would be.
    let cache = IpamCache::new();
    let ipam = &ipam.with_cache(&cache);
    let mut journal = Journal(match &args.journal {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    });
    let mut rng = args.seed | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    let tag = format!("{}-{}", args.node, std::process::id());
    let mut held: Vec<String> = Vec::new();
    let (mut assigns, mut releases) = (Vec::new(), Vec::new());
    let started = Instant::now();
    for i in 0..args.ops {
        let release = !held.is_empty() && (next(1000) as f64) < args.release_share * 1000.0;
        if release {
            let h = held.swap_remove(next(held.len() as u64) as usize);
            journal.write(json!({"op": "releasing", "handle": h}))?;
            let t = Instant::now();
            ipam.release_by_handle(&h)
                .with_context(|| format!("releasing {h}"))?;
            releases.push(t.elapsed());
            journal.write(json!({"op": "released", "handle": h}))?;
        } else {
            let h = format!("{tag}-{i}");
            let mut a = AutoAssignArgs::new(&args.node, 1, 0, Use::Workload);
            a.handle = Some(h.clone());
            a.attrs = [
                ("namespace".to_string(), "exercise".to_string()),
                ("pod".to_string(), h.clone()),
                ("node".to_string(), args.node.clone()),
            ]
            .into();
            let t = Instant::now();
            let got = ipam.auto_assign(&a);
            assigns.push(t.elapsed());
            if let Some(e) = got.error {
                anyhow::bail!("assigning {h}: {e}");
            }
            let ips: Vec<String> = got
                .v4
                .iter()
                .flat_map(|x| x.ips.iter().map(|n| n.addr().to_string()))
                .collect();
            if ips.is_empty() {
                anyhow::bail!("assigning {h}: the pools are full");
            }
            journal.write(json!({"op": "assigned", "handle": h, "ips": ips}))?;
            held.push(h);
        }
    }
    if args.drain {
        for h in held.drain(..) {
            journal.write(json!({"op": "releasing", "handle": h}))?;
            let t = Instant::now();
            ipam.release_by_handle(&h)?;
            releases.push(t.elapsed());
            journal.write(json!({"op": "released", "handle": h}))?;
        }
    }
    outln!(
        "{}",
        json!({"node": args.node, "seconds": started.elapsed().as_secs_f64(),
               "assign": summary(assigns), "release": summary(releases)})
    )?;
    Ok(())
}
