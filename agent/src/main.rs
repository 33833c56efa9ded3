//! `palisade`: the Palisade CLI and agent.
//!
//! ```text
//! palisade selector parse "app == 'web' && has(tier)"
//! palisade selector test ../shared/conformance/selectors.jsonl
//! palisade verify --engine reference ../shared/conformance/kubernetes
//! palisade matrix -f examples/zero-trust --port 8080
//! palisade matrix -f cluster/ --to shop/db --port 5432   # who can reach shop/db
//! palisade matrix -f cluster/ --summary -o svg > matrix.svg
//! sudo palisade matrix -f examples/zero-trust --port 8080 --engine netns
//! palisade explain -f examples/zero-trust --from analytics/reporting --to shop-backend/api --port 8080
//! ```

/// `println!` that hands back the write error instead of panicking, so a
/// reader that went away (`palisade matrix | head`) ends the run quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod agent;
mod compile_cmd;
mod explain_cmd;
mod ipam_cmd;
mod ipam_exercise;
mod ipam_verify;
mod lab_cmd;
mod lab_engine;
mod lint_cmd;
mod load;
mod matrix_cmd;
mod progress;
mod resolve;
mod selector_cmd;
mod services_cmd;
mod services_netns;
mod services_verify;
mod store_cmd;
mod verify_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Passed/failed/skipped counts, printed as the closing line tools rely on.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// Why probes were skipped, with counts.
    pub skip_reasons: std::collections::BTreeMap<String, usize>,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
        for (r, n) in &o.skip_reasons {
            *self.skip_reasons.entry(r.clone()).or_insert(0) += n;
        }
    }

    fn finish(self) -> std::io::Result<ExitCode> {
        for (reason, n) in &self.skip_reasons {
            outln!("skipped {n}: {reason}")?;
        }
        outln!(
            "{} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped
        )?;
        if self.passed + self.failed == 0 {
            // A check that checked nothing must not read as green in CI.
            eprintln!(
                "error: nothing was checked: no cases or probes ran (see the skip lines above)"
            );
            return Ok(ExitCode::FAILURE);
        }
        Ok(if self.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Network-policy engine and zero-trust compiler"
)]
struct Cli {
    /// Say more: every case and skipped probe (verify, selector test), every
    /// manifest document skipped because Palisade does not act on its kind.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with Calico selectors.
    Selector {
        #[command(subcommand)]
        command: SelectorCommand,
    },
    /// Run conformance cases through an engine; ends with "N passed, N failed, N skipped".
    Verify {
        /// Engine that answers the probes.
        #[arg(long, value_enum, default_value = "reference")]
        engine: verify_cmd::EngineKind,
        /// Case files or folders of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Where IPAM scenarios keep their state (each starts empty).
        #[arg(long, value_enum, default_value = "embedded")]
        store: ipam_verify::StoreKind,
        /// etcd client URLs for `--store etcd` (its IPAM keys are wiped
        /// before each scenario).
        #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
    },
    /// Explain who decides a connection, rule by rule.
    Explain {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        connection: explain_cmd::ConnectionArgs,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: explain_cmd::Format,
        /// Also run the connection for real through the kernel programs
        /// (`netns`) and report what they did: events, rule counters.
        #[arg(long, value_enum, default_value = "reference")]
        engine: verify_cmd::EngineKind,
    },
    /// Compile manifests: statistics, decision programs (JSON or Graphviz).
    Compile {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Compile only the endpoints of this node.
        #[arg(long)]
        node: Option<String>,
        /// Only the programs of this endpoint (namespace/pod).
        #[arg(long)]
        endpoint: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "summary")]
        output: compile_cmd::CompileFormat,
    },
    /// Policies that are valid but will not do what they say: selecting
    /// nothing, peers matching nothing, DNS cut off by a default deny.
    /// Exit 1 when there are findings.
    Lint {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
    },
    /// Connectivity matrix of pod pairs, with both directions' deciding rule per cell.
    Matrix(matrix_cmd::MatrixArgs),
    /// A node's service table (kube-proxy's semantics): frontends, traffic
    /// policies, the backends each traffic class reaches, map fill; with
    /// --probe, one connection's fate on the model and the maps.
    Services(services_cmd::ServicesArgs),
    /// Validate manifests and write them to the datastore as one batch (all or nothing).
    Apply {
        /// Manifest files or folders.
        #[arg(short = 'f', long = "file", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        store: store_cmd::StoreArgs,
    },
    /// Show stored objects of a kind (`globalnetworkpolicies`, `networkpolicies`, `gnp`, ...).
    Get {
        /// Kind: plural, singular or short name.
        kind: String,
        /// Only this object.
        name: Option<String>,
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: store_cmd::GetFormat,
        #[command(flatten)]
        store: store_cmd::StoreArgs,
    },
    /// Delete stored objects (all named, or none).
    Delete {
        /// Kind: plural, singular or short name.
        kind: String,
        /// Names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Namespace, for namespaced kinds.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[command(flatten)]
        store: store_cmd::StoreArgs,
    },
    /// Calico IPAM: pool use, checks, release, assignment, garbage collection.
    Ipam {
        #[command(subcommand)]
        command: ipam_cmd::IpamCommand,
    },
    /// Run the node agent: follow the datastore and keep this node's
    /// dataplane equal to it (/metrics, /healthz, /readyz, /status).
    Agent(Box<agent::AgentArgs>),
    /// Run manifests on a cluster of this machine (root): nodes as network
    /// namespaces over VXLAN, an agent each, a local etcd; the Pods join
    /// through CNI; shows the real matrix beside the reference engine's,
    /// the kernel's drops, the overlay and the metrics; then removes it all.
    Lab(lab_cmd::LabArgs),
    /// Show a running agent's view: sync state, local endpoints, map fill,
    /// conntrack, last errors. Exit 0 when it is ready.
    Status {
        /// The agent's --metrics-addr.
        #[arg(long, default_value = "127.0.0.1:9091")]
        metrics_addr: std::net::SocketAddr,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: StatusFormat,
    },
}

/// `status` output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFormat {
    /// The human view.
    Table,
    /// The agent's /status document.
    Json,
}

#[derive(Subcommand)]
enum SelectorCommand {
    /// Parse a selector: canonical form, Calico selector ID, label restrictions.
    Parse {
        selector: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a selector against labels given as key=value (exit 1 on no match).
    Eval {
        selector: String,
        labels: Vec<String>,
    },
    /// Run selector vectors (selectors.jsonl format); ends with "N passed, N failed, N skipped".
    Test { file: PathBuf },
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    load::VERBOSE.store(verbose, std::sync::atomic::Ordering::Relaxed);
    match cli.command {
        Command::Selector { command } => match command {
            SelectorCommand::Parse { selector, json } => {
                selector_cmd::parse(&selector, json)?;
                Ok(ExitCode::SUCCESS)
            }
            SelectorCommand::Eval { selector, labels } => {
                selector_cmd::eval(&selector, &labels)?;
                Ok(ExitCode::SUCCESS)
            }
            SelectorCommand::Test { file } => Ok(selector_cmd::test(&file, verbose)?.finish()?),
        },
        Command::Ipam { command } => ipam_cmd::run(command),
        Command::Verify {
            engine,
            paths,
            store,
            etcd_endpoints,
        } => {
            let etcd = (!etcd_endpoints.is_empty()).then_some(palisade_datastore::EtcdConfig {
                endpoints: etcd_endpoints,
                ca_file: None,
                cert_file: None,
                key_file: None,
            });
            let mut stores = ipam_verify::StoreFactory::new(store, etcd)?;
            Ok(verify_cmd::verify(engine, &paths, &mut stores, verbose)?.finish()?)
        }
        Command::Explain {
            files,
            connection,
            output,
            engine,
        } => {
            let allowed = explain_cmd::explain(&files, &connection, output, engine)?;
            Ok(if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Compile {
            files,
            node,
            endpoint,
            output,
        } => {
            compile_cmd::compile(&files, node, endpoint.as_deref(), output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lint { files } => Ok(if lint_cmd::run(&files)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }),
        Command::Matrix(args) => {
            matrix_cmd::matrix(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Services(args) => {
            services_cmd::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { files, store } => {
            store_cmd::apply(&store, &files)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind,
            name,
            namespace,
            output,
            store,
        } => {
            store_cmd::get(&store, &kind, name.as_deref(), namespace.as_deref(), output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            kind,
            names,
            namespace,
            store,
        } => {
            store_cmd::delete(&store, &kind, &names, namespace.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(args) => {
            agent::run(*args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Lab(args) => lab_cmd::run(args),
        Command::Status {
            metrics_addr,
            output,
        } => Ok(
            if agent::status::show(metrics_addr, output == StatusFormat::Json)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            },
        ),
    }
}

/// Whether the error is stdout's reader having gone away (EPIPE).
fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        // As `grep` or `cat` under `| head`: nobody is reading, nothing to say.
        Err(e) if is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<policy_core::Errors>() {
                // Every error of a load, one per line.
                Some(errors) => {
                    for line in errors.to_string().lines() {
                        if line.starts_with("... ") {
                            eprintln!("{line}");
                        } else {
                            eprintln!("error: {line}");
                        }
                    }
                }
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}
