//! Structure checks of `cargo xtask test`: no source file longer than
//! [`MAX_LINES`], and no import cycle between sibling modules of a crate
//! (module `a` using `b` while `b` uses `a`), so each file stays small
//! enough to hold in one's head and the modules keep a direction.
//!
//! The cycle check reads `crate::`, `super::` and `self::` paths (in `use`
//! trees and inline) outside comments and outside a trailing `mod tests`;
//! a reference from module `a::x` to `b::y` is an edge `a -> b` between the
//! siblings under their common parent. Parents and children may refer to
//! each other (a `mod.rs` declares its children, which use its items).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The longest a source file may be.
pub const MAX_LINES: usize = 1000;

/// Runs both checks over the workspace at `root`; fails listing every finding.
pub fn check(root: &Path) -> Result<()> {
    let mut findings = Vec::new();
    let mut files = Vec::new();
    rust_files(root, &mut files)?;
    files.sort();
    for f in &files {
        let lines = std::fs::read_to_string(f)?.lines().count();
        if lines > MAX_LINES {
            findings.push(format!(
                "{}: {lines} lines (limit {MAX_LINES}): split it along its seams",
                rel(root, f)
            ));
        }
    }
    let mut crates = 0;
    for src in crate_sources(&files) {
        crates += 1;
        let mut modules = Vec::new();
        for f in files.iter().filter(|f| f.starts_with(&src)) {
            if let Some(path) = module_path(&src, f) {
                modules.push((path, std::fs::read_to_string(f)?, rel(root, f)));
            }
        }
        findings.extend(cycles(&modules));
    }
    if !findings.is_empty() {
        for f in &findings {
            eprintln!("  {f}");
        }
        bail!("{} structure finding(s)", findings.len());
    }
    eprintln!(
        "{} source files, none over {MAX_LINES} lines; no module import cycles in {crates} crates",
        files.len()
    );
    Ok(())
}

fn rel(root: &Path, f: &Path) -> String {
    f.strip_prefix(root).unwrap_or(f).display().to_string()
}

/// Every `.rs` file of the workspace, skipping build output and dot-entries.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        let ty = entry.file_type()?;
        if ty.is_dir() {
            rust_files(&entry.path(), out)?;
        } else if ty.is_file() && name.ends_with(".rs") {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// The `src/` folders that hold a `lib.rs` or `main.rs`.
fn crate_sources(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    files
        .iter()
        .filter(|f| {
            matches!(
                f.file_name().and_then(|n| n.to_str()),
                Some("lib.rs" | "main.rs")
            )
        })
        .filter_map(|f| f.parent())
        .filter(|d| d.file_name().is_some_and(|n| n == "src"))
        .map(Path::to_path_buf)
        .collect()
}

/// The module a file of `src` defines (`compile/mod.rs` -> `compile`);
/// `None` for the separate crates under `src/bin/`.
fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    let at_root = parts.is_empty() && matches!(stem, "lib" | "main");
    if stem != "mod" && !at_root {
        parts.push(stem.to_string());
    }
    Some(parts)
}

/// The code of a file without comments and without a trailing test module.
fn code_of(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other,
}

fn tokens(line: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_alphanumeric() || c == '_' => {
                let mut id = c.to_string();
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' {
                        id.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Ident(id));
            }
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                out.push(Token::PathSep);
            }
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ',' => out.push(Token::Comma),
            c if c.is_whitespace() => {}
            _ => out.push(Token::Other),
        }
    }
    out
}

/// Parses a path (with `{...}` groups) starting at `at`, pushing every full
/// path it names onto `out`; returns the index after it.
fn parse_tree(t: &[Token], mut at: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match t.get(at) {
            Some(Token::Ident(id)) => {
                if id != "self" || path.is_empty() {
                    path.push(id.clone());
                }
                at += 1;
                if t.get(at) == Some(&Token::PathSep) {
                    at += 1;
                    continue;
                }
                out.push(path);
                return at;
            }
            Some(Token::Open) => {
                at += 1;
                loop {
                    match t.get(at) {
                        Some(Token::Close) => return at + 1,
                        Some(Token::Comma) => at += 1,
                        None => return at,
                        Some(_) => {
                            let next = parse_tree(t, at, &path, out);
                            at = if next == at { at + 1 } else { next };
                        }
                    }
                }
            }
            _ => {
                out.push(path);
                return at;
            }
        }
    }
}

/// The module paths a file refers to, resolved against its own path `me`,
/// with the line of each reference.
fn references(me: &[String], text: &str) -> Vec<(usize, Vec<String>)> {
    let code = code_of(text);
    // Tokens of the whole file, each tagged with its line, so use trees
    // spanning lines parse whole.
    let mut toks = Vec::new();
    let mut line_of = Vec::new();
    for (n, l) in &code {
        for t in tokens(l) {
            toks.push(t);
            line_of.push(*n);
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < toks.len() {
        let starts = matches!(&toks[at], Token::Ident(id) if id == "crate" || id == "super" || id == "self")
            && toks.get(at + 1) == Some(&Token::PathSep)
            && (at == 0 || toks[at - 1] != Token::PathSep);
        if !starts {
            at += 1;
            continue;
        }
        let mut paths = Vec::new();
        let end = parse_tree(&toks, at, &[], &mut paths);
        for p in paths {
            if let Some(abs) = resolve(me, &p) {
                out.push((line_of[at], abs));
            }
        }
        at = end.max(at + 1);
    }
    out
}

fn resolve(me: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut segs = path.iter().peekable();
    let mut base: Vec<String> = match segs.next()?.as_str() {
        "crate" => Vec::new(),
        "self" => me.to_vec(),
        "super" => me.get(..me.len().checked_sub(1)?)?.to_vec(),
        _ => return None,
    };
    while segs.peek().is_some_and(|s| *s == "super") {
        segs.next();
        base.pop()?;
    }
    base.extend(segs.cloned());
    Some(base)
}

/// Cycles between sibling modules: `(path, text, shown name)` per file.
fn cycles(modules: &[(Vec<String>, String, String)]) -> Vec<String> {
    let known: BTreeSet<&[String]> = modules.iter().map(|(p, _, _)| p.as_slice()).collect();
    // parent -> (from child, to child) -> first evidence
    let mut edges: BTreeMap<Vec<String>, BTreeMap<(String, String), String>> = BTreeMap::new();
    for (me, text, shown) in modules {
        for (line, target) in references(me, text) {
            let common = me.iter().zip(&target).take_while(|(a, b)| a == b).count();
            let (Some(from), Some(to)) = (me.get(common), target.get(common)) else {
                continue; // a parent and its descendant
            };
            let mut sibling = target[..common].to_vec();
            sibling.push(to.clone());
            if !known.contains(sibling.as_slice()) {
                continue; // an item of the parent, not a module
            }
            edges
                .entry(target[..common].to_vec())
                .or_default()
                .entry((from.clone(), to.clone()))
                .or_insert_with(|| format!("{shown}:{line} uses {}", target.join("::")));
        }
    }
    let mut found = Vec::new();
    for (parent, e) in &edges {
        let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, b) in e.keys() {
            graph.entry(a).or_default().push(b);
        }
        for scc in strongly_connected(&graph) {
            let members: BTreeSet<&str> = scc.iter().copied().collect();
            let evidence: Vec<&str> = e
                .iter()
                .filter(|((a, b), _)| members.contains(a.as_str()) && members.contains(b.as_str()))
                .map(|(_, ev)| ev.as_str())
                .collect();
            let under = if parent.is_empty() {
                "crate root".to_string()
            } else {
                parent.join("::")
            };
            found.push(format!(
                "import cycle under {under} between {}: {}",
                scc.join(", "),
                evidence.join("; ")
            ));
        }
    }
    found
}

/// Tarjan's algorithm; returns the components with more than one member.
fn strongly_connected<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Vec<Vec<&'a str>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(v: &'a str, g: &BTreeMap<&'a str, Vec<&'a str>>, s: &mut State<'a>) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in g.get(v).map(Vec::as_slice).unwrap_or_default() {
            if !s.index.contains_key(w) {
                visit(w, g, s);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort_unstable();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(v, graph, &mut s);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str, text: &str) -> (Vec<String>, String, String) {
        let p: Vec<String> = path
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        (p, text.to_string(), format!("{path}.rs"))
    }

    #[test]
    fn use_trees_resolve_against_the_file() {
        let me = vec!["compile".to_string(), "index".to_string()];
        let text = "use crate::{flow::{Flow, Verdict}, net::Protocol};\nuse super::bits::Bit;\nfn f() { self::g(); }\n";
        let refs: Vec<String> = references(&me, text)
            .into_iter()
            .map(|(_, p)| p.join("::"))
            .collect();
        assert_eq!(
            refs,
            [
                "flow::Flow",
                "flow::Verdict",
                "net::Protocol",
                "compile::bits::Bit",
                "compile::index::g"
            ]
        );
    }

    #[test]
    fn comments_and_trailing_tests_do_not_count() {
        let text = "/// see [`crate::b::X`]\nuse crate::c::Y; // crate::d\n#[cfg(test)]\nmod tests {\n    use crate::e::Z;\n}\n";
        let refs: Vec<String> = references(&["a".to_string()], text)
            .into_iter()
            .map(|(_, p)| p.join("::"))
            .collect();
        assert_eq!(refs, ["c::Y"]);
    }

    #[test]
    fn a_sibling_cycle_is_found_and_a_parent_child_pair_is_not() {
        let mods = [
            m("", "mod a; mod b; mod c;"),
            m("a", "use crate::b::X;"),
            m("b", "use crate::a::Y; use crate::c::Z;"),
            m("c", "pub struct Z;"),
            m("c::inner", "use super::Z; use crate::c::W;"),
        ];
        let found = cycles(&mods);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("between a, b"), "{}", found[0]);
        assert!(found[0].contains("a.rs:1 uses b::X"), "{}", found[0]);
    }

    #[test]
    fn a_longer_cycle_and_a_nested_one() {
        let mods = [
            m("x", ""),
            m("x::p", "use super::q::A;"),
            m("x::q", "use super::r::B;"),
            m("x::r", "use crate::x::p::C;"),
            m("y", "use crate::x::p::C;"),
        ];
        let found = cycles(&mods);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("import cycle under x between p, q, r"));
    }

    #[test]
    fn module_paths_of_files() {
        let src = Path::new("/w/c/src");
        let mp = |f: &str| module_path(src, &src.join(f)).map(|p| p.join("::"));
        assert_eq!(mp("lib.rs").as_deref(), Some(""));
        assert_eq!(mp("compile/mod.rs").as_deref(), Some("compile"));
        assert_eq!(mp("compile/index.rs").as_deref(), Some("compile::index"));
        assert_eq!(mp("bin/report.rs"), None);
    }
}
