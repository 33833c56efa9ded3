//! Which programs a cgroup's socket hooks run: asked of the kernel
//! (`BPF_PROG_QUERY`) for one cgroup, so that counting one node's hooks
//! does not depend on what other processes load or attach meanwhile.

use std::os::fd::AsRawFd;
use std::path::Path;

use super::*;

/// The socket hooks the programs of [`SOCKET_PROGRAMS`] attach to, by
/// their kernel attach types (`BPF_CGROUP_INET4_CONNECT` and on).
const SOCKET_HOOKS: [(&str, u32); 8] = [
    ("connect4", 10),
    ("connect6", 11),
    ("sendmsg4", 14),
    ("sendmsg6", 15),
    ("recvmsg4", 19),
    ("recvmsg6", 20),
    ("getpeername4", 29),
    ("getpeername6", 30),
];

const BPF_PROG_QUERY: libc::c_long = 16;

/// The leading fields of `union bpf_attr` for `BPF_PROG_QUERY`; the
/// kernel zero-fills the fields after `prog_cnt` that a shorter attribute
/// leaves out.
#[repr(C)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    /// The kernel's unnamed 32 bits after `prog_cnt`, zeroed here rather
    /// than left as padding.
    hole: u32,
}

/// The programs attached directly to `cgroup` at each socket hook (not
/// those it inherits from its parents), by hook name (`connect4`, ...):
/// this node's balancers, and anything else a second CNI or a
/// kube-proxy replacement put there.
pub fn cgroup_socket_hooks(cgroup: &Path) -> Result<Vec<(&'static str, Vec<u32>)>, DatapathError> {
    let query_err = |message: String| DatapathError::Attach {
        interface: format!("cgroup {}", cgroup.display()),
        message,
    };
    let file = std::fs::File::open(cgroup).map_err(|e| query_err(e.to_string()))?;
    let mut hooks = Vec::with_capacity(SOCKET_HOOKS.len());
    for (hook, attach_type) in SOCKET_HOOKS {
        // 64 programs on one hook of one cgroup is the kernel's limit.
        let mut ids = vec![0u32; 64];
        let mut attr = ProgQuery {
            target_fd: file.as_raw_fd() as u32,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            hole: 0,
        };
        // SAFETY: `attr` is a valid prefix of `bpf_attr` for
        // BPF_PROG_QUERY, its size passed with it; the kernel writes at
        // most `prog_cnt` u32s at `prog_ids`, which `ids` holds and
        // outlives the call, and the count back into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &raw mut attr,
                std::mem::size_of::<ProgQuery>() as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(query_err(format!(
                "querying the {hook} hook: {}",
                std::io::Error::last_os_error()
            )));
        }
        ids.truncate(attr.prog_cnt as usize);
        hooks.push((hook, ids));
    }
    Ok(hooks)
}

/// How many programs `cgroup`'s socket hooks run, counted over
/// [`cgroup_socket_hooks`]: a node whose agent restarted has one set
/// ([`SOCKET_PROGRAMS`]' length), not two.
pub fn attached_socket_hooks(cgroup: &Path) -> Result<usize, DatapathError> {
    Ok(cgroup_socket_hooks(cgroup)?
        .iter()
        .map(|(_, ids)| ids.len())
        .sum())
}

/// A program on one of a cgroup's socket hooks that a [`Datapath`] did
/// not load: another kube-proxy replacement (Cilium's or Calico's socket
/// load balancer), or a second Palisade, balancing the same `connect()`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignSocketHook {
    /// The hook (`connect4`, ...).
    pub hook: &'static str,
    /// The program's kernel id.
    pub program_id: u32,
    /// Its name as the kernel keeps it (cut to 15 bytes; empty when it
    /// went meanwhile).
    pub program_name: String,
}

impl std::fmt::Display for ForeignSocketHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: program {}", self.hook, self.program_id)?;
        if !self.program_name.is_empty() {
            write!(f, " ({})", self.program_name)?;
        }
        Ok(())
    }
}

impl Datapath {
    /// The programs on `cgroup`'s socket hooks that this datapath did not
    /// load (see [`ForeignSocketHook`]); empty when its hooks are alone.
    pub fn foreign_socket_hooks(
        &self,
        cgroup: &Path,
    ) -> Result<Vec<ForeignSocketHook>, DatapathError> {
        let own: std::collections::BTreeSet<u32> = self
            .ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok().map(|i| i.id()))
            .collect();
        let foreign: Vec<(&'static str, u32)> = cgroup_socket_hooks(cgroup)?
            .into_iter()
            .flat_map(|(hook, ids)| ids.into_iter().map(move |id| (hook, id)))
            .filter(|(_, id)| !own.contains(id))
            .collect();
        if foreign.is_empty() {
            return Ok(Vec::new());
        }
        // Names for the report only: a program unloaded meanwhile has none.
        let names: std::collections::BTreeMap<u32, String> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| foreign.iter().any(|(_, id)| *id == p.id()))
            .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_string()))
            .collect();
        Ok(foreign
            .into_iter()
            .map(|(hook, program_id)| ForeignSocketHook {
                hook,
                program_id,
                program_name: names.get(&program_id).cloned().unwrap_or_default(),
            })
            .collect())
    }
}
