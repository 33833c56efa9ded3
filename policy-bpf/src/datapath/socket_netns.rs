//! Which network namespaces the socket hooks balance: the node's, from its
//! primary address, and pods', whose TCP connections are pointed at a
//! backend at `connect()` from the pod's own address (Calico's
//! `bpfConnectTimeLoadBalancing: TCP`). The kernel names a namespace by a
//! cookie (`bpf_get_netns_cookie`), read here from a socket made in it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::*;

/// Whose sockets a network namespace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketNetns {
    /// The node's: its processes connect from the node's addresses.
    Node,
    /// A pod's, with its addresses: its TCP connections to a Service are
    /// balanced at `connect()` where kube-proxy would only DNAT them (no
    /// masquerade, not back to the pod itself); the rest stays with the TC
    /// program.
    Pod {
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
    },
}

impl SocketNetns {
    fn entry(self) -> SockNetns {
        let mut e = SockNetns::default();
        match self {
            SocketNetns::Node => e.kind = SOCK_NETNS_NODE,
            SocketNetns::Pod { v4, v6 } => {
                e.kind = SOCK_NETNS_POD;
                if let Some(v4) = v4 {
                    e.families |= SOCK_NETNS_HAS_V4;
                    e.v4[..4].copy_from_slice(&v4.octets());
                }
                if let Some(v6) = v6 {
                    e.families |= SOCK_NETNS_HAS_V6;
                    e.v6 = v6.octets();
                }
            }
        }
        e
    }
}

/// The cookie of the network namespace this thread is in.
pub fn current_netns_cookie() -> Result<u64, DatapathError> {
    let fd: OwnedFd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| DatapathError::Load(format!("a socket for the netns cookie: {e}")))?;
    u64_socket_option(fd.as_fd(), libc::SO_NETNS_COOKIE).map_err(|e| {
        DatapathError::Load(format!(
            "reading the netns cookie (SO_NETNS_COOKIE needs Linux 5.14): {e}"
        ))
    })
}

/// The kernel's cookie of `socket` (`SO_COOKIE`), as the hooks'
/// `bpf_get_socket_cookie` reads it: the key of its UDP flows.
pub fn socket_cookie(socket: &impl AsFd) -> std::io::Result<u64> {
    u64_socket_option(socket.as_fd(), libc::SO_COOKIE)
}

/// A socket option of `SOL_SOCKET` whose value is a u64.
fn u64_socket_option(fd: BorrowedFd<'_>, option: libc::c_int) -> std::io::Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor for the call; the kernel writes
    // at most `len` bytes (a u64) into `value` and the length back into
    // `len`, both live for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// The cookie of the network namespace at `path` (`/run/netns/NAME`, a
/// CNI sandbox, `/proc/PID/ns/net`), read on a thread that joins it.
pub fn netns_cookie(path: &Path) -> Result<u64, DatapathError> {
    let file = std::fs::File::open(path)
        .map_err(|e| DatapathError::Load(format!("netns {}: {e}", path.display())))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                DatapathError::Load(format!("joining netns {}: {e}", path.display()))
            })?;
            current_netns_cookie()
        })
        .join()
        .unwrap_or_else(|_| Err(DatapathError::Load("the netns thread panicked".into())))
    })
}

impl Datapath {
    /// Lets the socket hooks balance the sockets of the network namespace
    /// `cookie` (see [`netns_cookie`]) as `who`'s; replaces what was said of
    /// it before. Namespaces never listed are left to the TC program.
    pub fn set_socket_netns(&mut self, cookie: u64, who: SocketNetns) -> Result<(), DatapathError> {
        let mut map: BpfHashMap<&mut MapData, u64, SockNetns> =
            BpfHashMap::try_from(self.map_mut(map_names::SOCK_NETNS)?)
                .map_err(map_err(map_names::SOCK_NETNS))?;
        map.insert(cookie, who.entry(), 0)
            .map_err(map_err(map_names::SOCK_NETNS))
    }

    /// Stops balancing the sockets of network namespace `cookie` (a pod
    /// that went); nothing if it was not listed.
    pub fn remove_socket_netns(&mut self, cookie: u64) -> Result<(), DatapathError> {
        let mut map: BpfHashMap<&mut MapData, u64, SockNetns> =
            BpfHashMap::try_from(self.map_mut(map_names::SOCK_NETNS)?)
                .map_err(map_err(map_names::SOCK_NETNS))?;
        match map.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::SOCK_NETNS)(e)),
        }
    }

    /// The network namespaces the socket hooks balance.
    pub fn socket_netns(&self) -> Result<Vec<(u64, SocketNetns)>, DatapathError> {
        let map = self
            .ebpf
            .map(map_names::SOCK_NETNS)
            .ok_or_else(|| DatapathError::Load(format!("map {} missing", map_names::SOCK_NETNS)))?;
        let map: BpfHashMap<&MapData, u64, SockNetns> =
            BpfHashMap::try_from(map).map_err(map_err(map_names::SOCK_NETNS))?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(cookie, e)| {
                let who = match e.kind {
                    SOCK_NETNS_NODE => SocketNetns::Node,
                    SOCK_NETNS_POD => SocketNetns::Pod {
                        v4: (e.families & SOCK_NETNS_HAS_V4 != 0)
                            .then(|| Ipv4Addr::new(e.v4[0], e.v4[1], e.v4[2], e.v4[3])),
                        v6: (e.families & SOCK_NETNS_HAS_V6 != 0).then(|| Ipv6Addr::from(e.v6)),
                    },
                    _ => return None,
                };
                Some((cookie, who))
            })
            .collect())
    }
}
