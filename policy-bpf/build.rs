//! Builds the TC programs (policy-bpf-ebpf) for the BPF target with aya-build:
//! nightly cargo with `-Z build-std=core`, linked by the bpf-linker that
//! `.cargo/config.toml` names (built by `cargo xtask setup`, or by any other
//! xtask command, into `target/tools/`). Without it this build fails with the
//! command to run.

use std::path::Path;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("policy-bpf lives in the workspace")?;
    let linker = bpf_linker(workspace)?;
    println!("cargo:rerun-if-changed={}", linker.display());
    if !linker.exists() && std::env::var_os("AYA_BUILD_SKIP").is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed at {}; run `cargo xtask setup` (it builds it, about 2 minutes)",
            linker.display()
        ));
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "policy-bpf-ebpf")
        .ok_or_else(|| anyhow!("policy-bpf-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// The BPF target's linker as `.cargo/config.toml` names it.
fn bpf_linker(workspace: &Path) -> anyhow::Result<std::path::PathBuf> {
    let config_path = workspace.join(".cargo/config.toml");
    println!("cargo:rerun-if-changed={}", config_path.display());
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let linker = config
        .lines()
        .skip_while(|l| l.trim() != "[target.bpfel-unknown-none]")
        .find_map(|l| l.trim().strip_prefix("linker = "))
        .ok_or_else(|| {
            anyhow!(
                "{} sets no linker for [target.bpfel-unknown-none]",
                config_path.display()
            )
        })?;
    Ok(workspace.join(linker.trim_matches('"')))
}
