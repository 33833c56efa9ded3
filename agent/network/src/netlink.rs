//! The netlink edge: links, addresses, routes, neighbours and FDB entries of
//! one network namespace, through rtnetlink, as blocking calls.
//!
//! Invariants:
//! - A [`Netlink`] works on the namespace its socket was opened in, for its
//!   whole life: [`Netlink::here`] opens it in the calling thread's
//!   namespace, [`Netlink::in_netns`] in another one (a short-lived thread
//!   joins it to open the socket; the socket stays there).
//! - Each call runs the request to completion on the handle's own
//!   single-threaded runtime; nothing runs between calls.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::NetError;

/// The route protocol number Palisade marks its routes with (Calico's
/// felix uses 80 too), so a restarted agent finds exactly its own.
pub const PROTOCOL: u8 = 80;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Hardware address (empty for links without one).
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// For a VXLAN device: its VNI, source address, UDP port and underlay link.
    pub vxlan: Option<VxlanInfo>,
}

/// A VXLAN device's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    /// VNI.
    pub vni: u32,
    /// Source address.
    pub local: Option<std::net::Ipv4Addr>,
    /// UDP port.
    pub port: u16,
    /// The underlay link.
    pub parent: Option<u32>,
}

/// An address on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The link's index.
    pub index: u32,
    /// The address and prefix.
    pub addr: IpNet,
    /// Scope universe (not link or host).
    pub global: bool,
}

/// A route: destination, next hop, device, kind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Gateway, if any.
    pub via: Option<IpAddr>,
    /// Output interface index (none for a blackhole).
    pub dev: Option<u32>,
    /// Scope link (a directly attached destination).
    pub scope_link: bool,
    /// The gateway is on the link even without a matching prefix.
    pub onlink: bool,
    /// Drops what it matches (a block this node owns, unused addresses).
    pub blackhole: bool,
}

/// A permanent neighbour (IP to MAC) or FDB (MAC to remote IP) entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    /// Interface index.
    pub dev: u32,
    /// The IP address (neighbour) or the remote VTEP (FDB).
    pub ip: IpAddr,
    /// The hardware address.
    pub mac: [u8; 6],
}

/// A blocking netlink handle in one network namespace.
#[derive(Debug)]
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

fn bad(e: impl std::fmt::Display) -> NetError {
    NetError::Invalid(e.to_string())
}

fn failed(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let op = op.into();
    move |e| {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => -m.raw_code(),
            _ => 0,
        };
        NetError::Netlink {
            op,
            errno,
            message: e.to_string(),
        }
    }
}

/// Whether `e` is the kernel saying the object is not there.
pub fn is_missing(e: &NetError) -> bool {
    matches!(e, NetError::Netlink { errno, .. }
        if *errno == nix::libc::ENOENT || *errno == nix::libc::ENODEV || *errno == nix::libc::ESRCH)
}

/// Whether `e` is the kernel saying the object already exists.
pub fn is_exists(e: &NetError) -> bool {
    matches!(e, NetError::Netlink { errno, .. } if *errno == nix::libc::EEXIST)
}

impl Netlink {
    /// A handle in the calling thread's network namespace.
    pub fn here() -> Result<Netlink, NetError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| NetError::io("starting the netlink runtime", e))?;
        let (connection, handle, _) = {
            let _guard = runtime.enter();
            rtnetlink::new_connection().map_err(|e| NetError::io("opening a netlink socket", e))?
        };
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// A handle in the namespace `ns` (an open `/run/netns/...` or
    /// `/proc/PID/ns/net`).
    pub fn in_netns(ns: &File) -> Result<Netlink, NetError> {
        in_netns(ns, Netlink::here)?
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }

    /// Every link.
    pub fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> = self
            .block(self.handle.link().get().execute().try_collect())
            .map_err(failed("listing links"))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// The link named `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        let r: Result<Vec<LinkMessage>, _> = self.block(
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_collect(),
        );
        match r.map_err(failed(format!("reading link {name}"))) {
            Ok(m) => Ok(m.first().map(link_of)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair, both ends here.
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        self.block(
            self.handle
                .link()
                .add(LinkVeth::new(name, peer).build())
                .execute(),
        )
        .map_err(failed(format!("creating veth {name}/{peer}")))
    }

    /// Creates a VXLAN device: `vni`, UDP `port`, source address `local`
    /// on underlay link `parent`, learning off (the agent writes every
    /// neighbour and FDB entry itself).
    pub fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: std::net::Ipv4Addr,
        parent: u32,
        mtu: u32,
    ) -> Result<(), NetError> {
        let msg = LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .dev(parent)
            .learning(false)
            .mtu(mtu)
            .build();
        self.block(self.handle.link().add(msg).execute())
            .map_err(failed(format!("creating VXLAN device {name}")))
    }

    /// Changes a link: any of name, MTU, MAC, up, namespace (an open
    /// namespace file; the link leaves this handle's namespace).
    pub fn set_link(&self, index: u32, set: LinkSettings<'_>) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(name) = set.name {
            b = b.name(name);
        }
        if let Some(mtu) = set.mtu {
            b = b.mtu(mtu);
        }
        if let Some(mac) = set.mac {
            b = b.address(mac.to_vec());
        }
        if set.up {
            b = b.up();
        }
        if let Some(ns) = set.netns {
            b = b.setns_by_fd(ns.as_raw_fd());
        }
        self.block(self.handle.link().set(b.build()).execute())
            .map_err(failed(format!("setting link {index}")))
    }

    /// Deletes a link (a veth takes its peer with it).
    pub fn delete_link(&self, index: u32) -> Result<(), NetError> {
        self.block(self.handle.link().del(index).execute())
            .map_err(failed(format!("deleting link {index}")))
    }

    /// Every address of every link.
    pub fn addresses(&self) -> Result<Vec<Address>, NetError> {
        let msgs: Vec<AddressMessage> = self
            .block(self.handle.address().get().execute().try_collect())
            .map_err(failed("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let ip = ip.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })?;
                Some(Address {
                    index: m.header.index,
                    addr: IpNet::new(ip, m.header.prefix_len).ok()?,
                    global: m.header.scope == AddressScope::Universe,
                })
            })
            .collect())
    }

    /// Removes an address from a link.
    pub fn delete_address(&self, index: u32, addr: IpNet) -> Result<(), NetError> {
        let mut msgs: Vec<AddressMessage> = self
            .block(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .set_address_filter(addr.addr())
                    .execute()
                    .try_collect(),
            )
            .map_err(failed(format!("finding {addr} on link {index}")))?;
        let Some(msg) = msgs.pop() else {
            return Ok(());
        };
        self.block(self.handle.address().del(msg).execute())
            .map_err(failed(format!("removing {addr} from link {index}")))
    }

    /// Adds an address to a link.
    pub fn add_address(&self, index: u32, addr: IpNet) -> Result<(), NetError> {
        self.block(
            self.handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .execute(),
        )
        .map_err(failed(format!("adding {addr} to link {index}")))
    }

    fn route_message(&self, r: &Route) -> Result<RouteMessage, NetError> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr(), r.dst.prefix_len())
            .map_err(bad)?
            .protocol(RouteProtocol::Other(PROTOCOL));
        if let Some(via) = r.via {
            b = b.gateway(via).map_err(bad)?;
        }
        if let Some(dev) = r.dev {
            b = b.output_interface(dev);
        }
        if r.scope_link {
            b = b.scope(RouteScope::Link);
        }
        if r.onlink {
            b = b.onlink();
        }
        if r.blackhole {
            b = b.kind(RouteType::BlackHole);
        }
        Ok(b.build())
    }

    /// Adds a route (replacing one to the same destination).
    pub fn replace_route(&self, r: &Route) -> Result<(), NetError> {
        let msg = self.route_message(r)?;
        self.block(self.handle.route().add(msg).replace().execute())
            .map_err(failed(format!("adding route to {}", r.dst)))
    }

    /// Deletes a route.
    pub fn delete_route(&self, r: &Route) -> Result<(), NetError> {
        let msg = self.route_message(r)?;
        self.block(self.handle.route().del(msg).execute())
            .map_err(failed(format!("deleting route to {}", r.dst)))
    }

    /// The main table's routes marked with [`PROTOCOL`], both families.
    pub fn palisade_routes(&self) -> Result<Vec<Route>, NetError> {
        let mut out = Vec::new();
        for family in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .block(self.handle.route().get(family).execute().try_collect())
                .map_err(failed("listing routes"))?;
            out.extend(
                msgs.iter()
                    .filter(|m| m.header.protocol == RouteProtocol::Other(PROTOCOL))
                    .filter_map(route_of),
            );
        }
        out.sort();
        Ok(out)
    }

    /// Writes a permanent neighbour entry (replacing one for the same IP).
    pub fn replace_neighbour(&self, n: &Neighbour) -> Result<(), NetError> {
        self.block(
            self.handle
                .neighbours()
                .add(n.dev, n.ip)
                .link_layer_address(&n.mac)
                .replace()
                .execute(),
        )
        .map_err(failed(format!("adding neighbour {} on {}", n.ip, n.dev)))
    }

    /// Writes a permanent FDB entry: frames for `mac` go to VTEP `ip`.
    pub fn replace_fdb(&self, n: &Neighbour) -> Result<(), NetError> {
        let mut req = self
            .handle
            .neighbours()
            .add_bridge(n.dev, &n.mac)
            // NTF_SELF: the device's own table (a VXLAN device has no
            // bridge above it).
            .flags(NeighbourFlags::Own)
            .replace();
        let dst = match n.ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        };
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Destination(dst));
        self.block(req.execute()).map_err(failed(format!(
            "adding FDB entry for {:02x?} on {}",
            n.mac, n.dev
        )))
    }

    /// Permanent neighbour entries (`bridge`: FDB entries) of link `dev`
    /// that carry both an IP and a MAC.
    pub fn neighbours(&self, dev: u32, bridge: bool) -> Result<Vec<Neighbour>, NetError> {
        let mut req = self.handle.neighbours().get();
        if bridge {
            req = req.set_address_family(AddressFamily::Bridge);
        }
        let msgs: Vec<NeighbourMessage> = self
            .block(req.execute().try_collect())
            .map_err(failed("listing neighbours"))?;
        let mut out: Vec<Neighbour> = msgs
            .iter()
            .filter(|m| m.header.ifindex == dev)
            .filter(|m| !bridge || m.header.family == AddressFamily::Bridge)
            .filter(|m| bridge || m.header.state == NeighbourState::Permanent)
            .filter_map(|m| neighbour_of(dev, m))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes a neighbour (`bridge`: FDB) entry.
    pub fn delete_neighbour(&self, n: &Neighbour, bridge: bool) -> Result<(), NetError> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = n.dev;
        let ip = match n.ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        };
        if bridge {
            msg.header.family = AddressFamily::Bridge;
            msg.header.flags = NeighbourFlags::Own;
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(n.mac.to_vec()));
            msg.attributes.push(NeighbourAttribute::Destination(ip));
        } else {
            msg.header.family = match n.ip {
                IpAddr::V4(_) => AddressFamily::Inet,
                IpAddr::V6(_) => AddressFamily::Inet6,
            };
            msg.attributes.push(NeighbourAttribute::Destination(ip));
        }
        self.block(self.handle.neighbours().del(msg).execute())
            .map_err(failed(format!("deleting neighbour {} on {}", n.ip, n.dev)))
    }
}

/// What [`Netlink::set_link`] changes (unset fields stay).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkSettings<'a> {
    /// A new name.
    pub name: Option<&'a str>,
    /// A new MTU.
    pub mtu: Option<u32>,
    /// A new hardware address.
    pub mac: Option<[u8; 6]>,
    /// Bring it up.
    pub up: bool,
    /// Move it to this namespace.
    pub netns: Option<&'a File>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(a) => l.mac = a.clone(),
            LinkAttribute::Mtu(m) => l.mtu = *m,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
                        let mut info = VxlanInfo::default();
                        for x in v {
                            match x {
                                InfoVxlan::Id(id) => info.vni = *id,
                                InfoVxlan::Local(a) => info.local = Some(*a),
                                InfoVxlan::Port(p) => info.port = *p,
                                InfoVxlan::Link(i) => info.parent = Some(*i),
                                _ => {}
                            }
                        }
                        l.vxlan = Some(info);
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut via = None;
    let mut dev = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = ip_of(d),
            RouteAttribute::Gateway(g) => via = ip_of(g),
            RouteAttribute::Oif(i) => dev = Some(*i),
            _ => {}
        }
    }
    let len = m.header.destination_prefix_length;
    let dst = match dst {
        Some(d) => IpNet::new(d, len).ok()?,
        None if m.header.address_family == AddressFamily::Inet6 => {
            IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), len).ok()?
        }
        None => IpNet::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), len).ok()?,
    };
    Some(Route {
        dst,
        via,
        dev,
        scope_link: m.header.scope == RouteScope::Link,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        blackhole: m.header.kind == RouteType::BlackHole,
    })
}

fn neighbour_of(dev: u32, m: &NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            // An FDB entry's destination: the parser cannot tell its family.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                ip = <[u8; 4]>::try_from(b.as_slice())
                    .map(IpAddr::from)
                    .or_else(|_| <[u8; 16]>::try_from(b.as_slice()).map(IpAddr::from))
                    .ok()
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour {
        dev,
        ip: ip?,
        mac: mac?,
    })
}

/// Runs `f` on a short-lived thread that joined namespace `ns` (sockets
/// it opens and `/proc/sys/net` files it writes belong to `ns`); the
/// calling thread's namespace never changes.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::Namespace(format!("joining a network namespace: {e}")))?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetError::Namespace("a namespace thread panicked".into()))?
    })
}

/// Writes a `/proc/sys` file in the calling thread's network namespace.
pub fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(format!("/proc/sys/{path}"), value)
        .map_err(|e| NetError::io(format!("writing {value} to /proc/sys/{path}"), e))
}
