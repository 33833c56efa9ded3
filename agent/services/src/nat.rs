//! NAT state per connection, as conntrack holds it: the first packet is
//! decided by the table and picks a backend (with session affinity); later
//! packets of the connection keep that backend for as long as the endpoint
//! is still listed, whatever happens to the other endpoints; when the
//! table changes, connections to endpoints no longer listed are forgotten
//! (their next packet is a new decision).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::affinity::Balancer;
use crate::decide::{Packet, Verdict};
use crate::objects::{PortName, Protocol};
use crate::table::ServiceTable;

/// A connection by its original (pre-NAT) tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub protocol: Protocol,
}

impl Connection {
    fn packet(&self) -> Packet {
        Packet {
            source: self.source.ip(),
            destination: self.destination.ip(),
            protocol: self.protocol,
            port: self.destination.port(),
        }
    }
}

#[derive(Debug, Clone)]
struct NatEntry {
    service: PortName,
    backend: SocketAddr,
    masquerade: bool,
}

/// What happens to one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatOutcome {
    /// A new connection, sent to `backend`.
    New {
        backend: SocketAddr,
        masquerade: bool,
    },
    /// A packet of a tracked connection, to the backend it already has.
    Established {
        backend: SocketAddr,
        masquerade: bool,
    },
    /// The table's verdict for a new connection that is not forwarded.
    NotForwarded(Verdict),
}

/// Per-connection NAT state of one node.
#[derive(Debug, Clone, Default)]
pub struct NatTable {
    entries: HashMap<Connection, NatEntry>,
    balancer: Balancer,
}

impl NatTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a packet of `conn`; `now` and `random` are injected.
    pub fn packet(
        &mut self,
        table: &ServiceTable,
        conn: &Connection,
        now: Duration,
        random: u64,
    ) -> NatOutcome {
        if let Some(e) = self.entries.get(conn) {
            return NatOutcome::Established {
                backend: e.backend,
                masquerade: e.masquerade,
            };
        }
        let verdict = table.decide(&conn.packet());
        let Some(backend) = self.balancer.pick(&verdict, conn.source.ip(), now, random) else {
            return NatOutcome::NotForwarded(verdict);
        };
        let Verdict::Forward { service, .. } = &verdict else {
            return NatOutcome::NotForwarded(verdict);
        };
        let masquerade = verdict.masquerades_to(conn.source.ip(), backend);
        self.entries.insert(
            *conn,
            NatEntry {
                service: service.clone(),
                backend,
                masquerade,
            },
        );
        NatOutcome::New {
            backend,
            masquerade,
        }
    }

    /// After `table` changed: forgets connections whose endpoint is no
    /// longer listed by their Service, and UDP flows whose endpoint no
    /// longer serves (kube-proxy's conntrack cleanup); returns how many.
    pub fn resync(&mut self, table: &ServiceTable) -> usize {
        let before = self.entries.len();
        self.entries.retain(|c, e| {
            table.service(&e.service).is_some_and(|b| {
                if c.protocol == Protocol::Udp {
                    b.serving.contains(&e.backend)
                } else {
                    b.present.contains(&e.backend)
                }
            })
        });
        before - self.entries.len()
    }

    /// Ends a connection (FIN/RST seen, or idle).
    pub fn close(&mut self, conn: &Connection) {
        self.entries.remove(conn);
    }

    /// Tracked connections (a metric).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Live session-affinity entries (a metric).
    pub fn affinity_entries(&self) -> usize {
        self.balancer.len()
    }

    /// The backend a connection from `client` to `service` has, if any.
    pub fn backend_of(&self, client: IpAddr, service: &PortName) -> Vec<SocketAddr> {
        self.entries
            .iter()
            .filter(|(c, e)| c.source.ip() == client && &e.service == service)
            .map(|(_, e)| e.backend)
            .collect()
    }
}
