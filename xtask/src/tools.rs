//! Everything the commands need on a fresh machine, installed on first use.
//!
//! | what | how | where |
//! |---|---|---|
//! | rustfmt, clippy | `rustup component add` | the active toolchain |
//! | nightly, rust-src | `rustup toolchain install`, `rustup component add` | rustup |
//! | bpf-linker, cargo-fuzz | `rustup run <toolchain> cargo install --locked --root` | `target/tools/<name>-<version>/` |
//! | Debian packages | `apt-get update` then `apt-get install` | the system |
//!
//! Cargo tools live in a project-local root keyed by their version, so a
//! fresh clone (every CI run) builds them again: an install step that breaks
//! turns CI red instead of hiding behind a machine that already has the tool.
//! Toolchain-specific commands go through `rustup run`, never `cargo +nightly`
//! (only the rustup proxy understands `+toolchain`, and xtask runs the
//! toolchain's own cargo).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{have, root, run};

/// A cargo-installed tool kept under `target/tools/<name>-<version>/`.
#[derive(Debug, Clone, Copy)]
pub struct CargoTool {
    /// Crate name.
    pub name: &'static str,
    /// Exact version installed.
    pub version: &'static str,
    /// The binary it provides.
    pub bin: &'static str,
    /// Toolchain it is built with (`rustup run <toolchain>`).
    pub toolchain: &'static str,
    /// `--no-default-features --features ...`, when set.
    pub features: Option<&'static str>,
    /// What a first install costs, said before it starts.
    pub takes: &'static str,
}

/// The linker for the BPF target, built against nightly's own LLVM so that
/// it and rustc agree on the bitcode. `.cargo/config.toml` names its path
/// for the `bpfel-unknown-none` target (a test keeps the two equal).
pub const BPF_LINKER: CargoTool = CargoTool {
    name: "bpf-linker",
    version: "0.13.0",
    bin: "bpf-linker",
    toolchain: "nightly",
    features: Some("llvm-22,no-llvm-linking"),
    takes: "about 2 minutes on 2 cores",
};

/// libFuzzer driver for the fuzz targets.
pub const CARGO_FUZZ: CargoTool = CargoTool {
    name: "cargo-fuzz",
    version: "0.13.2",
    bin: "cargo-fuzz",
    toolchain: "stable",
    features: None,
    takes: "about 2 minutes on 2 cores",
};

/// Where xtask keeps the tools it builds.
pub fn tools_root() -> PathBuf {
    root().join("target/tools")
}

impl CargoTool {
    /// The install root of this version.
    pub fn dir(&self, tools: &Path) -> PathBuf {
        tools.join(format!("{}-{}", self.name, self.version))
    }

    /// The binary of this version.
    pub fn path(&self, tools: &Path) -> PathBuf {
        self.dir(tools).join("bin").join(self.bin)
    }

    /// Whether this exact version is installed under `tools` and runs.
    pub fn installed(&self, tools: &Path) -> bool {
        let path = self.path(tools);
        // cargo subcommands expect their own name as the first argument.
        let mut cmd = Command::new(&path);
        if let Some(sub) = self.bin.strip_prefix("cargo-") {
            cmd.arg(sub);
        }
        cmd.arg("--version").output().is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(self.version)
        })
    }

    /// Installs the tool into `tools` unless that version is already there.
    pub fn ensure(&self, tools: &Path) -> Result<PathBuf> {
        if self.installed(tools) {
            return Ok(self.path(tools));
        }
        if self.toolchain == "nightly" {
            ensure_nightly()?;
        }
        eprintln!(
            "installing {} {} into {} (builds from source, {}; once per checkout)",
            self.name,
            self.version,
            self.dir(tools).display(),
            self.takes
        );
        let started = Instant::now();
        let mut cmd = Command::new("rustup");
        cmd.args([
            "run",
            self.toolchain,
            "cargo",
            "install",
            "--locked",
            "--root",
        ])
        .arg(self.dir(tools))
        .arg(format!("{}@{}", self.name, self.version));
        if let Some(features) = self.features {
            cmd.args(["--no-default-features", "--features", features]);
        }
        if self.name == BPF_LINKER.name {
            cmd.env("RUSTFLAGS", nightly_llvm_rustflags()?);
        }
        // Each tool's own build directory, so an interrupted build resumes.
        cmd.env("CARGO_TARGET_DIR", tools.join("build").join(self.name));
        run(&mut cmd)?;
        if !self.installed(tools) {
            bail!(
                "{} {} was installed but {} does not answer --version with that version",
                self.name,
                self.version,
                self.path(tools).display()
            );
        }
        eprintln!(
            "installed {} {} in {:.0}s",
            self.name,
            self.version,
            started.elapsed().as_secs_f64()
        );
        Ok(self.path(tools))
    }
}

/// Links bpf-linker against the LLVM shared library nightly ships.
fn nightly_llvm_rustflags() -> Result<String> {
    let lib = nightly_sysroot()?.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| format!("nightly ships no libLLVM-*.so in {}", lib.display()))?;
    let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let l = lib.display();
    Ok(format!(
        "-C link-arg=-L{l} -C link-arg=-l{llvm} -C link-arg=-Wl,-rpath,{l}"
    ))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup run nightly rustc --print sysroot")?;
    if !out.status.success() {
        bail!(
            "rustup run nightly rustc failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The nightly toolchain with rust-src (the kernel programs build `core`
/// for the BPF target). An installed nightly is kept as it is: updating it
/// could change the LLVM that bpf-linker was built against.
pub fn ensure_nightly() -> Result<()> {
    if !have("rustup", &["run", "nightly", "rustc", "--version"]) {
        eprintln!("installing the nightly toolchain (a download of about 100 MB)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !nightly_sysroot()?
        .join("lib/rustlib/src/rust/library")
        .exists()
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// rustfmt and clippy for the active toolchain.
pub fn ensure_lint_tools() -> Result<()> {
    for (probe, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if !have("cargo", &[probe, "--version"]) {
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    // The kernel program is linted for its own target, which needs nightly.
    ensure_nightly()?;
    if !have(
        "rustup",
        &["run", "nightly", "cargo", "clippy", "--version"],
    ) {
        run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// A command the project runs, and the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deb {
    /// A command to probe with (`<command> --version` or `-V` must exit 0)
    /// or an absolute path that must exist.
    pub probe: &'static str,
    /// Debian package name.
    pub package: &'static str,
}

const fn deb(probe: &'static str, package: &'static str) -> Deb {
    Deb { probe, package }
}

/// Network namespaces, veth pairs and TC (netns engine, kernel tests).
pub const NETNS_DEBS: &[Deb] = &[deb("ip", "iproute2"), deb("ping", "iputils-ping")];
/// Building the workspace: the etcd client's gRPC code is generated with protoc.
pub const BUILD_DEBS: &[Deb] = &[
    deb("protoc", "protobuf-compiler"),
    deb(
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
];
/// The etcd datastore's tests and the agents' clusters: etcd members on
/// loopback, etcdctl, and openssl for their TLS certificates.
pub const ETCD_DEBS: &[Deb] = &[
    deb("etcd", "etcd-server"),
    deb("/usr/bin/etcdctl", "etcd-client"),
    deb("/usr/bin/openssl", "openssl"),
];
/// A real container runtime on the CNI plugin: podman with runc, and a
/// static busybox for the containers' image; iperf3 for the overlay
/// benchmark.
pub const PODMAN_DEBS: &[Deb] = &[
    deb("podman", "podman"),
    deb("runc", "runc"),
    deb("/bin/busybox", "busybox-static"),
    deb("iperf3", "iperf3"),
];
/// The C ABI tests: compilers, valgrind, and unshare for a private netns.
pub const FFI_DEBS: &[Deb] = &[
    deb("cc", "gcc"),
    deb("c++", "g++"),
    deb("valgrind", "valgrind"),
    deb("unshare", "util-linux"),
];
/// The veth report's iptables lab (Calico's iptables layout).
pub const VETH_REPORT_DEBS: &[Deb] = &[deb("ipset", "ipset"), deb("iptables-restore", "iptables")];

/// `nft`: the agent's natOutgoing table (as Calico's eBPF mode, the pools'
/// masquerade is netfilter's), and the services report's kube-proxy rules.
pub const NFT_DEBS: &[Deb] = &[deb("nft", "nftables")];

/// Every package any command may install: CI checks they all resolve from
/// freshly updated package lists.
pub fn all_debs() -> Vec<Deb> {
    let mut all: Vec<Deb> = [
        NETNS_DEBS,
        BUILD_DEBS,
        ETCD_DEBS,
        PODMAN_DEBS,
        FFI_DEBS,
        VETH_REPORT_DEBS,
        NFT_DEBS,
    ]
    .concat();
    all.sort_by_key(|d| d.package);
    all.dedup_by_key(|d| d.package);
    all
}

fn deb_present(d: &Deb) -> bool {
    if d.probe.starts_with('/') {
        return Path::new(d.probe).exists();
    }
    have(d.probe, &["--version"]) || have(d.probe, &["-V"])
}

/// Installs the packages whose probe is missing. The package lists are
/// updated first: a fresh machine may never have fetched them.
pub fn ensure_debs(debs: &[Deb]) -> Result<()> {
    let missing: Vec<&str> = debs
        .iter()
        .filter(|d| !deb_present(d))
        .map(|d| d.package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    if !crate::is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root: apt-get install {}",
            missing.join(" ")
        );
    }
    run(apt_get().arg("update"))?;
    run(apt_get()
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))?;
    if let Some(d) = debs.iter().find(|d| !deb_present(d)) {
        bail!(
            "{} is installed but `{}` still does not run",
            d.package,
            d.probe
        );
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The install paths, checked from nothing into scratch roots: the cargo
/// tools are built into `target/tools` of this checkout (empty on a fresh
/// clone), and every Debian package any command may install must resolve
/// from package lists fetched into an empty directory, as on a machine whose
/// lists were never updated.
pub fn check_debian_install_path() -> Result<()> {
    let scratch = tools_root().join("apt-lists");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(scratch.join("partial"))?;
    let lists = OsString::from(format!("Dir::State::Lists={}", scratch.display()));
    run(apt_get().arg("-o").arg(&lists).args(["-q", "update"]))?;
    let packages: Vec<&str> = all_debs().iter().map(|d| d.package).collect();
    let out = apt_get()
        .arg("-o")
        .arg(&lists)
        .args(["install", "--simulate", "--no-install-recommends"])
        .args(&packages)
        .output()
        .context("apt-get install --simulate")?;
    if !out.status.success() {
        bail!(
            "from fresh package lists, apt cannot install {}: {}",
            packages.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!(
        "from fresh package lists, apt can install all {} packages: {}",
        packages.len(),
        packages.join(" ")
    );
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// PATH for every command xtask runs: the tools it built come first.
pub fn search_path(tools: &Path) -> OsString {
    let mut dirs: Vec<PathBuf> = [BPF_LINKER, CARGO_FUZZ]
        .iter()
        .map(|t| t.dir(tools).join("bin"))
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BPF target's linker path in `.cargo/config.toml` is the one
    /// xtask installs.
    #[test]
    fn cargo_config_names_the_installed_linker() {
        let config = std::fs::read_to_string(root().join(".cargo/config.toml")).unwrap();
        let relative = BPF_LINKER
            .path(Path::new("target/tools"))
            .display()
            .to_string();
        assert!(
            config.contains(&format!("linker = \"{relative}\"")),
            ".cargo/config.toml must set the bpfel-unknown-none linker to {relative}"
        );
    }
}
