//! Builds the TC programs (policy-bpf-ebpf) for the BPF target with aya-build:
//! nightly cargo with `-Z build-std=core` and bpf-linker. `cargo xtask` installs
//! both; without them this build fails with the command to run.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if which::which("bpf-linker").is_err() && std::env::var_os("AYA_BUILD_SKIP").is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed; run `cargo xtask test` (or `cargo xtask setup`) to install the eBPF toolchain"
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
