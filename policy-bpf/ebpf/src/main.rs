//! Palisade's TC programs. `palisade_from_pod` runs on the host side of a
//! pod's veth at TC ingress (the pod's egress policy); `palisade_to_pod` at TC
//! egress (the pod's ingress policy). A packet from a pod that its egress
//! policy allows, addressed to a local endpoint, goes on by tail call to
//! `palisade_to_pod_local`: the receiver's ingress policy, judged as on the
//! receiver's interface, then straight into the receiving pod
//! (`bpf_redirect_peer`), past the node's forwarding.
//!
//! Per packet: look up the interface (unmanaged ones pass untouched, managed
//! ones give the endpoint's zone); parse the headers in place;
//! established connections pass on one conntrack lookup. A new flow finds
//! the endpoint slot for (interface, direction, local address) — a missing
//! one means a spoofed source — classifies its peer with one LPM lookup,
//! reads where the membership rows are (two words), walks the slot's
//! decision program (array reads, at most MAX_WALK; a membership test reads
//! one word of the peer's identity row and at most one of its class row), counts
//! the rule, records the connection, and reports drops (and sampled allows)
//! on a ring buffer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// Rust's BPF target offers no compare-and-swap or fetch-or through its
// atomic types; the intrinsics lower to BPF's atomic instructions.
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod program;

/// On the host the crate builds as an empty binary, so workspace-wide checks
/// and tests work; the programs exist only for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
