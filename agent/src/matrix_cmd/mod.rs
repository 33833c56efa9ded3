//! `palisade matrix`: connectivity of pod pairs, with both directions'
//! deciding rule per cell.
//!
//! The default engine answers from the compiled decision programs
//! ([`policy_core::matrix::CompiledMatrix`]), rows in parallel; every format
//! is written row by row as rows are computed, so memory does not grow with
//! the number of cells. Large sets default to a namespace-by-namespace
//! summary (text, Markdown, SVG); JSON is JSON lines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use palisade_testing::netns_engine::{EventReport, NetnsEngine};
use policy_bpf::lower::Capacity;
use policy_core::compile::{CompileOptions, Compiler, Leaf};
use policy_core::connection::{ConnectionSpec, Peer, flow_between};
use policy_core::flow::{DecidedBy, Decision};
use policy_core::matrix::{Cell, CompiledMatrix};
use policy_core::net::Protocol;
use policy_core::{Cluster, EndpointKey, Engine, EngineError};
use rayon::prelude::*;

use crate::explain_cmd::decision_json;
use crate::load::load_cluster;
use crate::resolve::PodFilter;
use crate::verify_cmd::{EngineKind, build_engine};

mod summary;
use summary::{Summary, write_summary};

/// Above this many cells, text, Markdown and SVG show the namespace
/// summary unless `--full` is given.
pub const SUMMARY_ABOVE_CELLS: usize = 40_000;
/// At most this many columns are drawn as a grid; more become a list.
pub const GRID_COLUMNS: usize = 30;
/// SVG draws one square per pod pair up to this many pods a side.
pub const SVG_PODS: usize = 300;

/// Output formats of `matrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MatrixFormat {
    /// For people: a grid (few servers), a list, or the namespace summary.
    Text,
    /// JSON lines: a header object, then one object per cell (or per
    /// namespace pair with --summary).
    Json,
    /// Markdown tables.
    Markdown,
    /// An SVG heatmap: pod by pod, or namespace by namespace for large sets.
    Svg,
}

/// `palisade matrix` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct MatrixArgs {
    /// Manifest files or folders.
    #[arg(short = 'f', long = "file", required = true)]
    pub files: Vec<PathBuf>,
    /// Destination port.
    #[arg(long, default_value_t = 80)]
    pub port: u16,
    /// Protocol.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: MatrixFormat,
    /// Engine answering each cell (`compiled`: the decision programs, fast;
    /// `reference`: rules evaluated one by one, slow at scale; `netns`: real
    /// connections through the kernel programs, drop events printed as they
    /// happen; `lab`: real TCP connections over a two-node cluster, agents
    /// and VXLAN, the Pods added through CNI).
    #[arg(long, value_enum, default_value = "compiled")]
    pub engine: EngineKind,
    /// Clients: namespace/pod, a namespace, or a Calico selector over pod
    /// labels ("what can X reach"). Repeat to add more.
    #[arg(long)]
    pub from: Vec<String>,
    /// Servers, as --from ("who can reach X").
    #[arg(long)]
    pub to: Vec<String>,
    /// Namespace-by-namespace counts of allowed and denied pod pairs
    /// (the default for text, Markdown and SVG above 40,000 cells).
    #[arg(long, conflicts_with = "full")]
    pub summary: bool,
    /// Every cell, however many (text, Markdown, SVG).
    #[arg(long)]
    pub full: bool,
}

/// The pods on one side of the matrix, after filters and skipping pods
/// without an address.
fn side(
    cluster: &Cluster,
    values: &[String],
    flag: &str,
    skipped: &mut Vec<(EndpointKey, String)>,
) -> Result<Vec<EndpointKey>> {
    let mut chosen: Vec<EndpointKey> = if values.is_empty() {
        cluster.endpoints().map(|e| e.key.clone()).collect()
    } else {
        let mut all = Vec::new();
        for v in values {
            let filter = PodFilter::parse(v, flag)?;
            let pods = filter.pods(cluster, flag)?;
            if let PodFilter::Pod(k) = &filter
                && cluster.endpoint(k).is_some_and(|e| e.ips.is_empty())
            {
                bail!(
                    "{flag}: pod {k} has no IP address (no status.podIP): nothing can connect to or from it"
                );
            }
            all.extend(pods);
        }
        // The cluster's order, each pod once.
        let wanted: std::collections::HashSet<EndpointKey> = all.into_iter().collect();
        cluster
            .endpoints()
            .filter(|e| wanted.contains(&e.key))
            .map(|e| e.key.clone())
            .collect()
    };
    chosen.retain(|k| {
        let has_ip = cluster.endpoint(k).is_some_and(|e| !e.ips.is_empty());
        if !has_ip && !skipped.iter().any(|(s, _)| s == k) {
            skipped.push((
                k.clone(),
                "no IP address (no status.podIP: not scheduled or not running yet)".into(),
            ));
        }
        has_ip
    });
    Ok(chosen)
}

/// Where cells come from.
enum Source<'a> {
    Compiled(CompiledMatrix<'a>),
    /// Any engine, one connection at a time; rule ids of the cells index
    /// `deciders`.
    Engine {
        engine: Box<dyn Engine + 'a>,
        cluster: &'a Cluster,
        spec: ConnectionSpec,
        from: &'a [EndpointKey],
        to: &'a [EndpointKey],
        deciders: Vec<DecidedBy>,
        ids: HashMap<DecidedBy, u32>,
    },
}

impl Source<'_> {
    fn name(&self) -> &'static str {
        match self {
            Source::Compiled(_) => "compiled",
            Source::Engine { engine, .. } => engine.name(),
        }
    }

    /// Rows `start..end`, computed in parallel where the engine allows.
    fn rows(&mut self, start: usize, end: usize) -> Result<Vec<Vec<Option<Cell>>>> {
        match self {
            Source::Compiled(m) => Ok((start..end).into_par_iter().map(|i| m.row(i)).collect()),
            Source::Engine {
                engine,
                cluster,
                spec,
                from,
                to,
                deciders,
                ids,
            } => {
                let mut intern = |d: Option<Decision>| {
                    d.map(|d| {
                        let next = deciders.len() as u32;
                        let rule = *ids.entry(d.decided_by.clone()).or_insert_with(|| {
                            deciders.push(d.decided_by.clone());
                            next
                        });
                        Leaf {
                            verdict: d.verdict,
                            rule,
                            logged: d.logged,
                        }
                    })
                };
                let mut rows = Vec::with_capacity(end - start);
                for i in start..end {
                    let mut row = Vec::with_capacity(to.len());
                    for (j, b) in to.iter().enumerate() {
                        let (p, q) = (Peer::Endpoint(from[i].clone()), Peer::Endpoint(b.clone()));
                        let Ok(flow) = flow_between(cluster, &p, &q, *spec, None, None) else {
                            row.push(None);
                            continue;
                        };
                        match engine.connection(cluster, &p, &q, &flow) {
                            Ok(out) => row.push(Some(Cell {
                                allowed: out.allowed,
                                egress: intern(out.egress),
                                ingress: intern(out.ingress),
                            })),
                            Err(EngineError::Unavailable(why)) => {
                                // A pod talking to itself never leaves its namespace.
                                if from[i] != to[j] {
                                    eprintln!("  {p} -> {q}: not run: {why}");
                                }
                                row.push(None);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    rows.push(row);
                }
                Ok(rows)
            }
        }
    }

    fn decision(&self, leaf: Leaf) -> Decision {
        let decided_by = match self {
            Source::Compiled(m) => m
                .rule(leaf.rule)
                .map(|r| r.decided_by())
                .unwrap_or(DecidedBy::NoProfileMatch),
            Source::Engine { deciders, .. } => deciders[leaf.rule as usize].clone(),
        };
        Decision {
            verdict: leaf.verdict,
            decided_by,
            logged: leaf.logged,
        }
    }
}

/// Text and JSON of each distinct leaf, rendered once.
#[derive(Default)]
struct Names {
    rendered: HashMap<Leaf, (String, String)>,
    letters: HashMap<Leaf, usize>,
    legend: Vec<String>,
}

impl Names {
    fn get(&mut self, source: &Source, leaf: Leaf) -> &(String, String) {
        self.rendered.entry(leaf).or_insert_with(|| {
            let d = source.decision(leaf);
            (d.to_string(), decision_json(&d).to_string())
        })
    }

    /// Renders both leaves of a cell, for [`Names::text`] and [`Names::json`].
    fn render(&mut self, source: &Source, c: &Cell) {
        for l in [c.egress, c.ingress].into_iter().flatten() {
            self.get(source, l);
        }
    }

    /// A rendered leaf's text (after [`Names::render`]).
    fn text(&self, l: Option<Leaf>) -> &str {
        l.and_then(|l| self.rendered.get(&l))
            .map_or("not evaluated", |r| r.0.as_str())
    }

    /// A rendered leaf's JSON (after [`Names::render`]).
    fn json(&self, l: Option<Leaf>) -> &str {
        l.and_then(|l| self.rendered.get(&l))
            .map_or("null", |r| r.1.as_str())
    }

    /// A short code per distinct decision, legend entries in order of first use.
    fn letter(&mut self, source: &Source, leaf: Option<Leaf>) -> String {
        let Some(leaf) = leaf else {
            return "-".into();
        };
        if let Some(i) = self.letters.get(&leaf) {
            return letter(*i);
        }
        let text = self.get(source, leaf).0.clone();
        let i = self.legend.len();
        self.legend.push(text);
        self.letters.insert(leaf, i);
        letter(i)
    }
}

/// A, B, ..., Z, AA, AB, ... (bijective base 26, no limit).
fn letter(mut i: usize) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b'A' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII")
}

fn mark(c: &Option<Cell>) -> &'static str {
    match c {
        None => "-",
        Some(c) if c.allowed => "✓",
        Some(_) => "✗",
    }
}

/// How the cells are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Grid,
    List,
    Summary,
    /// SVG, one square per pod pair.
    PodHeatmap,
    /// SVG, one square per namespace pair.
    NamespaceHeatmap,
}

fn choose_view(args: &MatrixArgs, rows: usize, columns: usize) -> View {
    let cells = rows.saturating_mul(columns);
    let big = cells > SUMMARY_ABOVE_CELLS;
    match args.output {
        MatrixFormat::Json if args.summary => View::Summary,
        MatrixFormat::Json => View::List,
        MatrixFormat::Svg => {
            if args.summary || (!args.full && (rows > SVG_PODS || columns > SVG_PODS)) {
                View::NamespaceHeatmap
            } else {
                View::PodHeatmap
            }
        }
        MatrixFormat::Text | MatrixFormat::Markdown => {
            if args.summary || (big && !args.full) {
                View::Summary
            } else if columns <= GRID_COLUMNS {
                View::Grid
            } else {
                View::List
            }
        }
    }
}

fn progress(rows: usize, message: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(rows as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} rows, {elapsed} (eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn spinner(message: &str) -> ProgressBar {
    let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    s.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
    s.set_message(message.to_string());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Runs `palisade matrix`.
pub fn matrix(args: &MatrixArgs) -> Result<()> {
    // The lab runs first: the cluster is then what it runs (its addresses).
    let mut lab = (args.engine == EngineKind::Lab)
        .then(|| crate::lab_engine::LabEngine::start(&args.files, &[args.port]))
        .transpose()?;
    let files = match &lab {
        Some(l) => vec![l.model()?],
        None => args.files.clone(),
    };
    let loading = spinner("loading manifests");
    let cluster = load_cluster(&files)?;
    crate::lint_cmd::warn(&cluster);
    loading.finish_and_clear();
    let protocol = Protocol::parse(&args.protocol).map_err(|e| anyhow!("--protocol: {e}"))?;
    let spec = ConnectionSpec {
        protocol,
        dst_port: protocol.has_ports().then_some(args.port),
        src_port: None,
        icmp: None,
        ip_version: None,
    };
    let mut skipped = Vec::new();
    let from = side(&cluster, &args.from, "--from", &mut skipped)?;
    let to = side(&cluster, &args.to, "--to", &mut skipped)?;
    if !skipped.is_empty() {
        let mut reasons: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (k, why) in &skipped {
            reasons.entry(why).or_default().push(k.to_string());
        }
        for (why, pods) in reasons {
            let shown = pods.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            let more = pods.len().saturating_sub(10);
            eprintln!(
                "skipped {} pod{}: {why}: {shown}{}",
                pods.len(),
                if pods.len() == 1 { "" } else { "s" },
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    if from.is_empty() || to.is_empty() {
        if skipped.is_empty() {
            bail!("no pods to show: the manifests hold no Pod (or endpoint) objects");
        }
        bail!(
            "no pods left to show: {} of the selected pods were skipped (see above)",
            skipped.len()
        );
    }

    let compiled;
    let mut source = match args.engine {
        EngineKind::Compiled => {
            let s = spinner("compiling");
            compiled = Compiler::from_cluster(&cluster, CompileOptions::default())?.0;
            s.finish_and_clear();
            Source::Compiled(CompiledMatrix::new(&compiled, &from, &to, spec)?)
        }
        kind => {
            let engine: Box<dyn Engine + '_> = if kind == EngineKind::Netns {
                let e = NetnsEngine::new(&cluster, Capacity::default())?;
                eprintln!(
                    "{} pods are network namespaces on one node; the TC programs are attached to their host veths",
                    e.pods()
                );
                // Drops are printed the moment the kernel reports them.
                e.set_listener(Box::new(|r: &EventReport| {
                    if !r.allowed() {
                        eprintln!(
                            "  drop  {} at {} {} by {}",
                            r.tuple(),
                            r.endpoint
                                .as_ref()
                                .map_or("?".to_string(), ToString::to_string),
                            r.direction,
                            r.decided_by
                        );
                    }
                }))?;
                Box::new(e)
            } else if kind == EngineKind::Lab {
                let e = lab.take().context("the lab engine was started above")?;
                eprintln!("{}", e.describe());
                Box::new(e)
            } else {
                build_engine(kind, &cluster)?
            };
            Source::Engine {
                engine,
                cluster: &cluster,
                spec,
                from: &from,
                to: &to,
                deciders: Vec::new(),
                ids: HashMap::new(),
            }
        }
    };

    let view = choose_view(args, from.len(), to.len());
    let cells = from.len() * to.len();
    if view == View::Summary && !args.summary && args.output != MatrixFormat::Json {
        eprintln!(
            "{cells} pod pairs: showing counts per namespace pair (--full for every cell, --from/--to to narrow)"
        );
    }
    let what = if protocol.has_ports() {
        format!("{protocol}/{}", args.port)
    } else {
        protocol.to_string()
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut names = Names::default();
    let from_names: Vec<String> = from.iter().map(ToString::to_string).collect();
    let to_names: Vec<String> = to.iter().map(ToString::to_string).collect();
    let quoted = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|n| serde_json::Value::from(n.as_str()).to_string())
            .collect()
    };
    let (from_json, to_json) = (quoted(&from_names), quoted(&to_names));
    let mut summary =
        matches!(view, View::Summary | View::NamespaceHeatmap).then(|| Summary::new(&from, &to));
    let engine_name = source.name();

    // Header.
    let grid_width = to_names
        .iter()
        .enumerate()
        .map(|(j, _)| format!("[{}]", j + 1).len())
        .max()
        .unwrap_or(3)
        .max(6);
    let row_label_width = from_names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("[{}] {n}", i + 1).chars().count())
        .max()
        .unwrap_or(0);
    let svg_cell = 12usize;
    let svg_label = 14
        + 7 * from_names
            .iter()
            .chain(&to_names)
            .map(String::len)
            .max()
            .unwrap_or(0);
    match (args.output, view) {
        (MatrixFormat::Json, _) => {
            let header = serde_json::json!({"matrix": {
                "protocol": protocol.to_string(),
                "port": protocol.has_ports().then_some(args.port),
                "engine": engine_name,
                "clients": from.len(), "servers": to.len(),
                "view": if view == View::Summary { "summary" } else { "cells" },
                "skipped": skipped.iter().map(|(k, why)| serde_json::json!({"pod": k.to_string(), "reason": why})).collect::<Vec<_>>(),
            }});
            writeln!(out, "{header}")?;
        }
        (MatrixFormat::Text, View::Grid) => {
            writeln!(
                out,
                "connectivity for {what} by the {engine_name} engine (rows: client, columns: server; ✓ allowed, ✗ denied; egress/ingress deciders by letter)"
            )?;
            let header: Vec<String> = (1..=to.len())
                .map(|j| format!("{:>grid_width$}", format!("[{j}]")))
                .collect();
            writeln!(out, "{} {}", " ".repeat(row_label_width), header.join(" "))?;
        }
        (MatrixFormat::Text, View::List) => {
            writeln!(
                out,
                "connectivity for {what} by the {engine_name} engine (✓ allowed, ✗ denied; egress decided at the client, ingress at the server)"
            )?;
        }
        (MatrixFormat::Markdown, View::Grid) => {
            writeln!(out, "| from \\ to | {} |", to_names.join(" | "))?;
            writeln!(out, "|---|{}", "---|".repeat(to_names.len()))?;
        }
        (MatrixFormat::Markdown, View::List) => {
            writeln!(out, "| from | to | allowed | egress | ingress |")?;
            writeln!(out, "|---|---|---|---|---|")?;
        }
        (MatrixFormat::Svg, View::PodHeatmap) => {
            let top = svg_label;
            let w = svg_label + svg_cell * to.len() + 20;
            let h = top + svg_cell * from.len() + 60;
            writeln!(
                out,
                r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">"#
            )?;
            writeln!(
                out,
                r#"<title>connectivity for {what} by the {engine_name} engine</title>"#
            )?;
            for (j, n) in to_names.iter().enumerate() {
                let x = svg_label + j * svg_cell + svg_cell / 2 + 3;
                writeln!(
                    out,
                    r#"<text transform="translate({x},{}) rotate(-90)">{}</text>"#,
                    top - 4,
                    esc(n)
                )?;
            }
        }
        _ => {}
    }

    let chunk = 64usize;
    let bar = progress(from.len(), "computing");
    let mut start = 0;
    while start < from.len() {
        let end = (start + chunk).min(from.len());
        let rows = source.rows(start, end)?;
        for (k, row) in rows.iter().enumerate() {
            let i = start + k;
            if let Some(s) = summary.as_mut() {
                s.add_row(i, row);
                continue;
            }
            match (args.output, view) {
                (MatrixFormat::Json, _) => {
                    for (j, c) in row.iter().enumerate() {
                        let Some(c) = c else { continue };
                        names.render(&source, c);
                        writeln!(
                            out,
                            r#"{{"from":{},"to":{},"allowed":{},"egress":{},"ingress":{}}}"#,
                            from_json[i],
                            to_json[j],
                            c.allowed,
                            names.json(c.egress),
                            names.json(c.ingress),
                        )?;
                    }
                }
                (MatrixFormat::Text, View::Grid) => {
                    let label = format!("[{}] {}", i + 1, from_names[i]);
                    let mut line = format!(
                        "{label}{}",
                        " ".repeat(row_label_width - label.chars().count())
                    );
                    for c in row {
                        let text = match c {
                            None => "-".to_string(),
                            Some(c) => format!(
                                "{}{}/{}",
                                mark(&Some(*c)),
                                names.letter(&source, c.egress),
                                names.letter(&source, c.ingress)
                            ),
                        };
                        let pad = grid_width.saturating_sub(text.chars().count());
                        let _ = write!(line, " {}{text}", " ".repeat(pad));
                    }
                    writeln!(out, "{line}")?;
                }
                (MatrixFormat::Markdown, View::Grid) => {
                    let cells: Vec<String> = row
                        .iter()
                        .map(|c| match c {
                            None => "-".to_string(),
                            Some(c) => format!(
                                "{}{}/{}",
                                mark(&Some(*c)),
                                names.letter(&source, c.egress),
                                names.letter(&source, c.ingress)
                            ),
                        })
                        .collect();
                    writeln!(out, "| {} | {} |", from_names[i], cells.join(" | "))?;
                }
                (MatrixFormat::Text | MatrixFormat::Markdown, _) => {
                    for (j, c) in row.iter().enumerate() {
                        let Some(c) = c else { continue };
                        names.render(&source, c);
                        let (e, g) = (names.text(c.egress), names.text(c.ingress));
                        if args.output == MatrixFormat::Text {
                            writeln!(
                                out,
                                "{} -> {}  {}  egress: {e}; ingress: {g}",
                                from_names[i],
                                to_names[j],
                                mark(&Some(*c))
                            )?;
                        } else {
                            writeln!(
                                out,
                                "| {} | {} | {} | {e} | {g} |",
                                from_names[i],
                                to_names[j],
                                mark(&Some(*c))
                            )?;
                        }
                    }
                }
                (MatrixFormat::Svg, _) => {
                    let y = svg_label + i * svg_cell;
                    writeln!(
                        out,
                        r#"<text x="4" y="{}">{}</text>"#,
                        y + svg_cell - 2,
                        esc(&from_names[i])
                    )?;
                    for (j, c) in row.iter().enumerate() {
                        let x = svg_label + j * svg_cell;
                        let (fill, tip) = match c {
                            None => (
                                "#cccccc",
                                "no connection (no address of that family)".into(),
                            ),
                            Some(c) => {
                                names.render(&source, c);
                                let (e, g) = (names.text(c.egress), names.text(c.ingress));
                                (
                                    if c.allowed { "#4caf50" } else { "#e53935" },
                                    format!("egress: {e}; ingress: {g}"),
                                )
                            }
                        };
                        writeln!(
                            out,
                            r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{fill}"><title>{} -&gt; {}: {}</title></rect>"#,
                            svg_cell - 1,
                            svg_cell - 1,
                            esc(&from_names[i]),
                            esc(&to_names[j]),
                            esc(&tip)
                        )?;
                    }
                }
            }
        }
        bar.inc((end - start) as u64);
        start = end;
    }
    bar.finish_and_clear();

    // Trailer.
    match (args.output, view) {
        (MatrixFormat::Text, View::Grid) => {
            writeln!(out)?;
            for (j, n) in to_names.iter().enumerate() {
                writeln!(out, "  [{}] {n}", j + 1)?;
            }
            writeln!(out)?;
            for (i, l) in names.legend.iter().enumerate() {
                writeln!(out, "  {} = {l}", letter(i))?;
            }
        }
        (MatrixFormat::Markdown, View::Grid) => {
            writeln!(out)?;
            writeln!(
                out,
                "Cells: ✓ allowed, ✗ denied, then the client's egress and the server's ingress decider."
            )?;
            writeln!(out)?;
            for (i, l) in names.legend.iter().enumerate() {
                writeln!(out, "- **{}**: {l}", letter(i))?;
            }
        }
        (MatrixFormat::Svg, View::PodHeatmap) => {
            let y = svg_label + svg_cell * from.len() + 20;
            writeln!(
                out,
                "<text x=\"4\" y=\"{y}\">rows: client, columns: server; green allowed, red denied, grey no connection ({})</text>\n</svg>",
                esc(&what)
            )?;
        }
        _ => {}
    }
    if let Some(s) = &summary {
        write_summary(
            &mut out,
            args.output,
            s,
            &source,
            &mut names,
            &what,
            engine_name,
        )?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_never_run_out() {
        assert_eq!(letter(0), "A");
        assert_eq!(letter(25), "Z");
        assert_eq!(letter(26), "AA");
        assert_eq!(letter(27), "AB");
        assert_eq!(letter(701), "ZZ");
        assert_eq!(letter(702), "AAA");
    }
}
