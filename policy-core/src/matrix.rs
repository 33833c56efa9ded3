//! Connectivity matrices at cluster scale: every (client, server) pod pair,
//! answered from the compiled decision programs.
//!
//! A cell costs two program walks (the client's egress, the server's
//! ingress) over membership bits computed once per pod, so a matrix costs
//! pods × pods walks and no per-cell lookups, allocations or flow building.
//! Rows are independent: callers compute them in any order (in parallel) and
//! write them out as they come, so memory does not grow with the number of
//! cells.
//!
//! ```
//! use policy_core::compile::{CompileOptions, Compiler};
//! use policy_core::connection::ConnectionSpec;
//! use policy_core::manifest::parse_manifests;
//! use policy_core::matrix::CompiledMatrix;
//! use policy_core::net::Protocol;
//! use policy_core::{Cluster, EndpointKey, Verdict};
//!
//! let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a, labels: {app: web}}\nstatus: {podIP: 10.0.0.1}\n---\n\
//! apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: a, labels: {app: db}}\nstatus: {podIP: 10.0.0.2}\n---\n\
//! apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: db, namespace: a}\n\
//! spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n";
//! let objects = parse_manifests("x.yaml", yaml).unwrap();
//! let cluster = Cluster::from_objects(objects.into_iter().map(|l| l.object)).unwrap();
//! let (compiler, _) = Compiler::from_cluster(&cluster, CompileOptions::default()).unwrap();
//! let pods = [EndpointKey::new("a", "web"), EndpointKey::new("a", "db")];
//! let spec = ConnectionSpec { protocol: Protocol::TCP, dst_port: Some(5432), src_port: None, icmp: None, ip_version: None };
//! let m = CompiledMatrix::new(&compiler, &pods, &pods, spec).unwrap();
//! // db to itself: its own egress is open, its ingress only admits web.
//! let db_to_db = m.cell(1, 1).unwrap();
//! assert!(!db_to_db.allowed);
//! assert_eq!(db_to_db.egress.unwrap().verdict, Verdict::Allow);
//! assert_eq!(db_to_db.ingress.unwrap().verdict, Verdict::Deny);
//! let web_to_db = m.cell(0, 1).unwrap();
//! let rule = m.rule(web_to_db.ingress.unwrap().rule).unwrap();
//! assert_eq!(rule.decided_by().to_string(), "tier default, np:a/db, rule 0 (allow)");
//! ```

use std::net::IpAddr;

use crate::compile::{Bits, Compiler, Leaf, Program, RuleId, RuleRef, Slot, flow_features};
use crate::connection::{ConnectionError, ConnectionSpec, flow_for};
use crate::flow::Verdict;
use crate::model::{Direction, EndpointKey};
use crate::net::IpVersion;

/// Why a matrix could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MatrixError {
    /// The pod is not in the compiled cluster.
    #[error("pod {0} is not in the cluster")]
    UnknownPod(EndpointKey),
    /// The pod has no address (no `status.podIP`): nothing can reach it.
    #[error("pod {0} has no IP address")]
    NoAddress(EndpointKey),
    /// The compiler holds no program for one of the pod's addresses (it
    /// compiled another node's view).
    #[error("no {1} program is compiled for pod {0} (compiled for another node?)")]
    NotCompiled(EndpointKey, Direction),
    /// The connection spec cannot make a flow (a protocol with ports and no port).
    #[error("{0}")]
    InvalidSpec(ConnectionError),
}

/// One cell: whether the connection succeeds and both deciding leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// Both the client's egress and the server's ingress allow it.
    pub allowed: bool,
    /// The client's egress decision (rule ids name [`RuleRef`]s).
    pub egress: Option<Leaf>,
    /// The server's ingress decision.
    pub ingress: Option<Leaf>,
}

/// One address of a pod as the matrix uses it: the program enforcing the
/// pod's side there, and the membership bits its peers' programs test.
#[derive(Debug)]
struct Side<'c> {
    ip: IpAddr,
    program: &'c Program,
    bits: Bits,
}

/// A matrix over the compiled state: clients (rows) × servers (columns).
#[derive(Debug)]
pub struct CompiledMatrix<'c> {
    compiler: &'c Compiler,
    spec: ConnectionSpec,
    /// Per client, every address with its egress program.
    clients: Vec<Vec<Side<'c>>>,
    /// Per server, the address a connection goes to (its first, as
    /// [`crate::connection::flow_between`] picks) with its ingress program.
    servers: Vec<Side<'c>>,
}

impl<'c> CompiledMatrix<'c> {
    /// Prepares the matrix: programs and membership bits of every pod.
    /// Every pod must be in the compiled cluster, with an address.
    pub fn new(
        compiler: &'c Compiler,
        clients: &[EndpointKey],
        servers: &[EndpointKey],
        spec: ConnectionSpec,
    ) -> Result<Self, MatrixError> {
        let side = |key: &EndpointKey, ip: IpAddr, direction| -> Result<Side<'c>, MatrixError> {
            let program = compiler
                .program(&Slot {
                    endpoint: key.clone(),
                    addr: ip,
                    direction,
                })
                .ok_or_else(|| MatrixError::NotCompiled(key.clone(), direction))?;
            Ok(Side {
                ip,
                program,
                bits: compiler.peer_bits(&ip),
            })
        };
        let addresses = |key: &EndpointKey| -> Result<Vec<IpAddr>, MatrixError> {
            let ep = compiler
                .cluster()
                .endpoint(key)
                .ok_or_else(|| MatrixError::UnknownPod(key.clone()))?;
            if ep.ips.is_empty() {
                return Err(MatrixError::NoAddress(key.clone()));
            }
            Ok(ep.ips.clone())
        };
        let clients = clients
            .iter()
            .map(|k| {
                addresses(k)?
                    .into_iter()
                    .map(|ip| side(k, ip, Direction::Egress))
                    .collect()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let servers = servers
            .iter()
            .map(|k| side(k, addresses(k)?[0], Direction::Ingress))
            .collect::<Result<Vec<_>, _>>()?;
        // Checks the spec once (a port for protocols with ports).
        let probe: IpAddr = [0, 0, 0, 0].into();
        flow_for(probe, probe, spec).map_err(MatrixError::InvalidSpec)?;
        Ok(Self {
            compiler,
            spec,
            clients,
            servers,
        })
    }

    /// Rows (clients).
    pub fn rows(&self) -> usize {
        self.clients.len()
    }

    /// Columns (servers).
    pub fn columns(&self) -> usize {
        self.servers.len()
    }

    /// One cell; `None` when the client has no address of the server's
    /// family (no connection can be made).
    pub fn cell(&self, row: usize, column: usize) -> Option<Cell> {
        let server = &self.servers[column];
        let version = IpVersion::of(&server.ip);
        let client = self.clients[row]
            .iter()
            .find(|s| IpVersion::of(&s.ip) == version)?;
        // The spec was checked in `new`; addresses of one family always make a flow.
        let flow = flow_for(client.ip, server.ip, self.spec).ok()?;
        let (_, _, egress_features) = flow_features(&flow, Direction::Egress);
        let (_, _, ingress_features) = flow_features(&flow, Direction::Ingress);
        let (egress, _) = client
            .program
            .evaluate(&egress_features, |b| server.bits.get(b));
        let (ingress, _) = server
            .program
            .evaluate(&ingress_features, |b| client.bits.get(b));
        Some(Cell {
            allowed: egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow,
            egress: Some(egress),
            ingress: Some(ingress),
        })
    }

    /// A whole row, in column order.
    pub fn row(&self, row: usize) -> Vec<Option<Cell>> {
        (0..self.servers.len()).map(|j| self.cell(row, j)).collect()
    }

    /// What a leaf's rule id stands for.
    pub fn rule(&self, id: RuleId) -> Option<&'c RuleRef> {
        self.compiler.rule(id)
    }
}
