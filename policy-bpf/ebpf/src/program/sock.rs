//! The node's own sockets (cgroup/connect4 and connect6): connect-time
//! load balancing over the service maps `palisade_service` reads, as
//! Calico's and Cilium's eBPF modes do it. A connection to a frontend is
//! pointed at its backend before it exists, so its packets need no NAT.

use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::bpf_set_retval;
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;

use super::service::{Client, Maps, PALISADE_SVC_ADDRESSES, PALISADE_SVC_SOURCE_RANGES, pick};
use super::*;

/// The service maps with the tries' keys on the stack, for the socket
/// hooks: they run in process context, where a softirq's TC program may
/// take this CPU's key memory in the middle of a lookup.
struct SockMaps;

impl ServiceMaps for SockMaps {
    #[inline(always)]
    fn frontend(&self, key: &FrontendKey) -> Option<FrontendValue> {
        Maps.frontend(key)
    }

    #[inline(always)]
    fn service(&self, index: u32) -> Option<ServiceValue> {
        Maps.service(index)
    }

    #[inline(always)]
    fn config(&self) -> ServiceConfig {
        Maps.config()
    }

    #[inline(always)]
    fn address_flags(&self, family: u8, addr: &[u8; 16]) -> u32 {
        let key = Key::new(
            ADDR_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 },
            SvcAddrKey {
                family,
                pad: [0; 3],
                addr: *addr,
            },
        );
        PALISADE_SVC_ADDRESSES.get(&key).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn source_range(&self, service: u32, family: u8, addr: &[u8; 16]) -> u8 {
        let key = Key::new(
            RANGE_KEY_BITS + if family == FAMILY_V4 { 32 } else { 128 },
            SvcRangeKey {
                service: service.to_be_bytes(),
                family,
                pad: [0; 3],
                addr: *addr,
            },
        );
        PALISADE_SVC_SOURCE_RANGES.get(&key).copied().unwrap_or(0)
    }
}

/// `connect()` of the node's own sockets (cgroup/connect4 and connect6):
/// connect-time load balancing, as Calico's and Cilium's eBPF modes do
/// it. A connection to a frontend is pointed at its backend before it
/// exists, so its packets need no NAT (the socket's peer is the backend;
/// `getpeername()` says so). REJECT fails `connect()` with
/// ECONNREFUSED, as kube-proxy's ICMP would; DROP with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn palisade_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V4)
}

/// [`palisade_connect4`] for IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn palisade_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, FAMILY_V6)
}

/// `connect()` allowed, with the address as it is now.
const SOCK_ALLOW: i32 = 1;
/// `connect()` refused.
const SOCK_REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// The address a socket connects to, as 16 map bytes. The context allows
/// only 4-byte accesses to these fields: one volatile read per word.
#[inline(always)]
fn sock_destination(sa: *mut bpf_sock_addr, family: u8) -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: the kernel's context of this run; its address fields are
    // readable in connect4/6, word by word.
    unsafe {
        if family == FAMILY_V4 {
            let w = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            out[..4].copy_from_slice(&w.to_ne_bytes());
        } else {
            for i in 0..4 {
                let w = core::ptr::read_volatile(&raw const (*sa).user_ip6[i]);
                out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
    }
    out
}

/// Points the socket at `b` (address and port, both in network order).
#[inline(always)]
fn sock_redirect(sa: *mut bpf_sock_addr, family: u8, b: &BackendValue) {
    let word =
        |i: usize| u32::from_ne_bytes([b.addr[i], b.addr[i + 1], b.addr[i + 2], b.addr[i + 3]]);
    // SAFETY: connect4/6 may write the address and port they connect to,
    // word by word.
    unsafe {
        if family == FAMILY_V4 {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, word(0));
        } else {
            for i in 0..4 {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], word(i * 4));
            }
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(b.port.to_be()));
    }
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, family: u8) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `sock_destination`.
    let (port, protocol) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*sa).user_port),
            core::ptr::read_volatile(&raw const (*sa).protocol),
        )
    };
    let config = Maps.config();
    if config.flags & CONFIG_ENABLED == 0 {
        return SOCK_ALLOW;
    }
    // The kernel has not chosen the source yet: the node's primary
    // address stands for it (the address the backend will see).
    let source = if family == FAMILY_V4 {
        config.primary_v4
    } else {
        config.primary_v6
    };
    let packet = ServicePacket {
        family,
        source,
        destination: sock_destination(sa, family),
        protocol: protocol as u8,
        // `user_port` holds the port in network order in its low bytes.
        port: u16::from_be(port as u16),
    };
    match service_decide(&packet, &SockMaps) {
        ServiceAction::Forward {
            service,
            first,
            count,
            affinity_seconds,
            ..
        } => {
            let mut affinity = AffinityKey::default();
            let mut chosen = AffinityValue::default();
            let client = Client {
                family,
                addr: source,
            };
            pick(
                &mut affinity,
                &mut chosen,
                service,
                &client,
                first,
                count,
                affinity_seconds,
            );
            if chosen.value.family != family {
                return SOCK_ALLOW;
            }
            sock_redirect(sa, family, &chosen.value);
            stat(Statistic::ServiceTranslated);
            SOCK_ALLOW
        }
        ServiceAction::Reject(_) => {
            // SAFETY: a helper cgroup programs may call; the error
            // `connect()` returns instead of EPERM.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            stat(Statistic::ServiceReject);
            SOCK_REFUSE
        }
        ServiceAction::Drop(_) => {
            stat(Statistic::ServiceDrop);
            SOCK_REFUSE
        }
        ServiceAction::Pass => SOCK_ALLOW,
    }
}
