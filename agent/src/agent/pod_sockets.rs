//! Pods' TCP balanced at `connect()` (`--pod-connect-balancing tcp`,
//! Calico's `bpfConnectTimeLoadBalancing: TCP`): the CNI side lists each
//! pod's network namespace (by the kernel's cookie) with its addresses as
//! it networks the pod, and takes it off at DEL; the writer, which owns
//! the dataplane, applies the changes once the socket hooks are attached.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;

use palisade_controller::AyaDataplane;
use policy_bpf::datapath::SocketNetns;

/// Whether pods' TCP is balanced at `connect()`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodConnectBalancing {
    /// Pods' connections are translated per packet by the service
    /// program, as kube-proxy's DNAT does (the default).
    #[default]
    Off,
    /// A pod's TCP `connect()` to a Service goes straight to a backend
    /// where kube-proxy would only DNAT it; UDP, masqueraded and hairpin
    /// connections stay per packet.
    Tcp,
}

/// A change the CNI side hands the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodSockets {
    /// The pod behind host interface `interface` lives in network
    /// namespace `cookie` with these addresses.
    Listed {
        interface: String,
        cookie: u64,
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
    },
    /// The pod behind `interface` is gone.
    Gone { interface: String },
}

impl PodSockets {
    /// The listing of a pod networked in the namespace at `netns`, or an
    /// error naming it.
    pub fn listed(interface: &str, netns: &Path, addrs: &[IpAddr]) -> Result<Self, String> {
        let cookie = policy_bpf::datapath::netns_cookie(netns)
            .map_err(|e| format!("network namespace {}: {e}", netns.display()))?;
        Ok(PodSockets::Listed {
            interface: interface.to_string(),
            cookie,
            v4: addrs.iter().find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }),
            v6: addrs.iter().find_map(|a| match a {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            }),
        })
    }
}

/// Changes waiting for the writer.
#[derive(Debug, Default)]
pub struct PodSocketQueue(Mutex<Vec<PodSockets>>);

impl PodSocketQueue {
    pub fn push(&self, change: PodSockets) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(change);
    }

    fn take(&self) -> Vec<PodSockets> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The writer's side: which namespace each listed pod's interface has.
#[derive(Debug, Default)]
pub struct PodSocketTable {
    listed: HashMap<String, u64>,
}

impl PodSocketTable {
    /// Applies the waiting changes to the dataplane; each failure is
    /// returned with the interface it was for (the pod's connections then
    /// stay per packet). The number of pods listed after.
    pub fn apply(
        &mut self,
        queue: &PodSocketQueue,
        dataplane: &mut AyaDataplane,
    ) -> (usize, Vec<(String, String)>) {
        let mut failed = Vec::new();
        for change in queue.take() {
            match change {
                PodSockets::Listed {
                    interface,
                    cookie,
                    v4,
                    v6,
                } => {
                    // A pod re-added on the same interface: its earlier
                    // namespace goes.
                    if let Some(old) = self.listed.remove(&interface)
                        && old != cookie
                    {
                        let _ = dataplane.remove_socket_netns(old);
                    }
                    match dataplane.set_socket_netns(cookie, SocketNetns::Pod { v4, v6 }) {
                        Ok(()) => {
                            self.listed.insert(interface, cookie);
                        }
                        Err(e) => failed.push((interface, e.to_string())),
                    }
                }
                PodSockets::Gone { interface } => {
                    if let Some(cookie) = self.listed.remove(&interface)
                        && let Err(e) = dataplane.remove_socket_netns(cookie)
                    {
                        failed.push((interface, e.to_string()));
                    }
                }
            }
        }
        (self.listed.len(), failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_names_the_namespace_it_cannot_read() {
        let err =
            PodSockets::listed("cali0", Path::new("/run/netns/no-such-pod"), &[]).unwrap_err();
        assert!(err.contains("/run/netns/no-such-pod"), "{err}");
    }

    #[test]
    fn a_listing_takes_one_address_of_each_family() {
        // This process's own namespace: any cookie, the addresses sorted out.
        let Ok(listed) = PodSockets::listed(
            "cali0",
            Path::new("/proc/self/ns/net"),
            &[
                "fd10::5".parse().unwrap(),
                "10.0.0.5".parse().unwrap(),
                "10.0.0.6".parse().unwrap(),
            ],
        ) else {
            // Joining a namespace needs CAP_SYS_ADMIN; CI has it.
            assert!(
                std::env::var_os("PALISADE_REQUIRE_PRIVILEGED").is_none_or(|v| v == "0"),
                "joining this process's network namespace needs root"
            );
            return;
        };
        let PodSockets::Listed {
            interface, v4, v6, ..
        } = listed
        else {
            panic!("{listed:?}");
        };
        assert_eq!(interface, "cali0");
        assert_eq!(v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(v6, Some("fd10::5".parse().unwrap()));
    }
}
