//! `palisade apply`, `get` and `delete`: the datastore as calicoctl shows it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use palisade_datastore::{
    Datastore, EmbeddedStore, EtcdConfig, EtcdStore, KubeClient, KubeOptions, KubeStore,
    StoreError, StoredObject, Written, kind_named,
};
use policy_core::ObjectRef;

use crate::load::collect_files;

/// Which datastore, and where (the etcd flags read calicoctl's variables).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// The datastore: `embedded` (a state directory on this node), `etcd`,
    /// or `kubernetes` (the cluster's API, read-only).
    #[arg(
        long,
        value_enum,
        default_value = "embedded",
        env = "PALISADE_DATASTORE"
    )]
    pub datastore: DatastoreKind,
    /// State directory of the embedded datastore.
    #[arg(long, default_value = "/var/lib/palisade")]
    pub state_dir: PathBuf,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) etcd's certificates are checked against.
    #[arg(long, env = "ETCD_CA_CERT_FILE")]
    pub etcd_ca_cert_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client certificate authentication.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// kubeconfig of the Kubernetes datastore (default: the in-cluster
    /// ServiceAccount, else `~/.kube/config`).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

impl StoreArgs {
    /// The etcd connection the flags describe.
    pub fn etcd(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            ca_file: self.etcd_ca_cert_file.clone(),
            cert_file: self.etcd_cert_file.clone(),
            key_file: self.etcd_key_file.clone(),
        }
    }

    /// Which store, for messages.
    pub fn describe(&self) -> String {
        match self.datastore {
            DatastoreKind::Embedded => format!("embedded {}", self.state_dir.display()),
            DatastoreKind::Etcd => format!("etcd {}", self.etcd_endpoints.join(",")),
            DatastoreKind::Kubernetes => match &self.kubeconfig {
                Some(path) => format!("kubernetes ({})", path.display()),
                None => "kubernetes (in-cluster or ~/.kube/config)".into(),
            },
        }
    }

    /// The Kubernetes datastore the flags describe, started (its watches
    /// run until the last handle goes).
    pub fn kubernetes(&self) -> Result<KubeStore> {
        KubeStore::start(self.kube_client(), KubeOptions::default())
            .with_context(|| format!("starting {}", self.describe()))
    }

    /// How to reach the Kubernetes API: `--kubeconfig`, else inferred.
    pub fn kube_client(&self) -> KubeClient {
        match &self.kubeconfig {
            Some(path) => KubeClient::Kubeconfig(path.clone()),
            None => KubeClient::Infer,
        }
    }
}

/// Datastore backends.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatastoreKind {
    /// A state directory with an append-only change log (one node).
    Embedded,
    /// etcd v3, in Calico's key layout (several nodes).
    Etcd,
    /// A cluster's API server, as Calico's Kubernetes datastore (read-only:
    /// objects are written with kubectl).
    Kubernetes,
}

/// `get` output formats.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetFormat {
    /// A table of names.
    Table,
    /// The table with more columns (revision, key).
    Wide,
    /// The stored documents as YAML.
    Yaml,
    /// The stored documents as JSON.
    Json,
}

pub(crate) fn open(args: &StoreArgs) -> Result<Box<dyn Datastore>> {
    Ok(match args.datastore {
        DatastoreKind::Embedded => {
            Box::new(EmbeddedStore::open(&args.state_dir).with_context(|| {
                format!("opening the datastore in {}", args.state_dir.display())
            })?)
        }
        DatastoreKind::Etcd => Box::new(
            EtcdStore::connect(&args.etcd())
                .with_context(|| format!("connecting to {}", args.describe()))?,
        ),
        // Watches start on the first read: a writer lists nothing.
        DatastoreKind::Kubernetes => {
            Box::new(KubeStore::new(args.kube_client(), KubeOptions::default()))
        }
    })
}

fn rejected(e: StoreError) -> anyhow::Error {
    match e {
        // Every error of the apply, one per line (see `main`).
        StoreError::Rejected(errors) => anyhow::Error::new(errors),
        other => anyhow::Error::new(other),
    }
}

/// `palisade apply -f`: every file as one batch; exit 0 only when it was
/// written (or already there).
pub fn apply(args: &StoreArgs, files: &[PathBuf]) -> Result<()> {
    let store = open(args)?;
    let mut sources = Vec::new();
    for f in collect_files(files, &["yaml", "yml", "json"])? {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        sources.push((f.display().to_string(), text));
    }
    if sources.is_empty() {
        bail!("no manifest files (.yaml, .yml, .json) under the given paths");
    }
    let written = store.apply_sources(&sources).map_err(rejected)?;
    report(&written)
}

fn report(w: &Written) -> Result<()> {
    for (verb, list) in [
        ("created", &w.created),
        ("replaced", &w.replaced),
        ("unchanged", &w.unchanged),
        ("deleted", &w.deleted),
    ] {
        for r in list {
            outln!("{} {verb}", describe(r))?;
        }
    }
    outln!("revision {}", w.revision)?;
    Ok(())
}

fn describe(r: &ObjectRef) -> String {
    match &r.namespace {
        Some(ns) => format!("{} {ns}/{}", r.kind, r.name),
        None => format!("{} {}", r.kind, r.name),
    }
}

/// `palisade get KIND [NAME]`.
pub fn get(
    args: &StoreArgs,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    format: GetFormat,
) -> Result<()> {
    let info = kind_named(kind)?;
    let store = open(args)?;
    let snapshot = store.snapshot()?;
    let found: Vec<&StoredObject> = snapshot
        .objects
        .iter()
        .filter(|o| o.object.kind == info.kind)
        .filter(|o| name.is_none_or(|n| o.object.name == n))
        .filter(|o| namespace.is_none_or(|ns| o.object.namespace.as_deref() == Some(ns)))
        .collect();
    if let Some(n) = name
        && found.is_empty()
    {
        bail!("{} {n} not found", info.plural);
    }
    match format {
        GetFormat::Table | GetFormat::Wide => {
            let wide = format == GetFormat::Wide;
            let mut header = Vec::new();
            if info.namespaced {
                header.push("NAMESPACE");
            }
            header.push("NAME");
            if wide {
                header.extend(["REVISION", "KEY"]);
            }
            let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
            for o in &found {
                let mut row = Vec::new();
                if info.namespaced {
                    row.push(o.object.namespace.clone().unwrap_or_default());
                }
                row.push(o.object.name.clone());
                if wide {
                    row.push(o.revision.to_string());
                    row.push(o.key.clone());
                }
                rows.push(row);
            }
            let widths: Vec<usize> = (0..rows[0].len())
                .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
                .collect();
            for r in rows {
                let line: Vec<String> = r
                    .iter()
                    .zip(&widths)
                    .map(|(cell, w)| format!("{cell:<w$}"))
                    .collect();
                outln!("{}", line.join("   ").trim_end())?;
            }
        }
        GetFormat::Json => {
            let docs: Vec<&serde_json::Value> = found.iter().map(|o| &o.document).collect();
            let value = if name.is_some() && docs.len() == 1 {
                docs[0].clone()
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs})
            };
            outln!("{}", serde_json::to_string_pretty(&value)?)?;
        }
        GetFormat::Yaml => {
            for (i, o) in found.iter().enumerate() {
                if i > 0 {
                    outln!("---")?;
                }
                out!("{}", serde_norway::to_string(&o.document)?)?;
            }
        }
    }
    Ok(())
}

/// `palisade delete KIND NAME`.
pub fn delete(
    args: &StoreArgs,
    kind: &str,
    names: &[String],
    namespace: Option<&str>,
) -> Result<()> {
    let info = kind_named(kind)?;
    if info.namespaced && namespace.is_none() {
        bail!(
            "{} are namespaced: say which namespace with -n/--namespace",
            info.plural
        );
    }
    let refs: Vec<ObjectRef> = names
        .iter()
        .map(|n| ObjectRef::new(info.kind, namespace.filter(|_| info.namespaced), n.clone()))
        .collect();
    let store = open(args)?;
    let written = store.delete(&refs).map_err(rejected)?;
    report(&written)
}
