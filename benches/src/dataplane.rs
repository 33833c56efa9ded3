//! The policy set the datapath benchmarks share: one server pod that `n`
//! Calico NetworkPolicies all select, in order. Every policy allows ingress
//! from its own peer group on its own port, so none matches the benchmark
//! traffic except the last, which allows the client (TCP 8080, UDP
//! 9000-9015). A rule-by-rule dataplane (iptables) walks every policy for
//! each new flow; a compiled one should not care how many there are.

use std::fmt::Write as _;
use std::net::IpAddr;

use policy_core::Cluster;
use policy_core::manifest::parse_manifests;

/// Client address (pod `bench/client`).
pub const CLIENT: &str = "10.77.0.1";
/// Server address (pod `bench/server`).
pub const SERVER: &str = "10.77.0.2";
/// Peer groups the non-matching policies allow (pods `bench/peer-<i>`).
pub const PEER_GROUPS: usize = 50;
/// The allowed TCP port.
pub const TCP_PORT: u16 = 8080;
/// The allowed UDP ports: `UDP_PORT..UDP_PORT + UDP_PORTS`.
pub const UDP_PORT: u16 = 9000;
/// How many UDP ports.
pub const UDP_PORTS: u16 = 64;
/// Policy counts the benchmarks sweep.
pub const SIZES: [usize; 4] = [10, 100, 1000, 5000];
/// Peer sets of the wide policy set ([`manifests_with_peer_sets`]).
pub const PEER_SETS: usize = 10_000;

/// Pod address of a peer group.
pub fn peer_ip(i: usize) -> IpAddr {
    format!("10.77.1.{}", i + 1).parse().expect("ip")
}

/// The manifests (YAML) of the policy set with `n` policies.
pub fn manifests(n: usize) -> String {
    let mut y = String::new();
    let pod = |y: &mut String, name: &str, labels: &str, ip: &str| {
        let _ = writeln!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{{labels}}}}}\nstatus: {{podIP: {ip}}}"
        );
    };
    y.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    pod(&mut y, "client", "app: client", CLIENT);
    pod(&mut y, "server", "app: server", SERVER);
    for i in 0..PEER_GROUPS {
        pod(
            &mut y,
            &format!("peer-{i}"),
            &format!("app: peer, group: g{i}"),
            &peer_ip(i).to_string(),
        );
    }
    for i in 0..n.saturating_sub(1) {
        let _ = writeln!(
            y,
            "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: bench}}\n\
             spec:\n  order: {i}\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  \
             - action: Allow\n    protocol: TCP\n    source: {{selector: group == 'g{}'}}\n    destination: {{ports: [{}]}}",
            i % PEER_GROUPS,
            10000 + i % 50000
        );
    }
    let _ = writeln!(
        y,
        "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: bench}}\n\
         spec:\n  order: {n}\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  \
         - action: Allow\n    protocol: TCP\n    source: {{selector: app == 'client'}}\n    destination: {{ports: [{TCP_PORT}]}}\n  \
         - action: Allow\n    protocol: UDP\n    source: {{selector: app == 'client'}}\n    destination: {{ports: ['{UDP_PORT}:{}']}}",
        UDP_PORT + UDP_PORTS - 1
    );
    y
}

/// The policy set with `n` policies, after policies ordered before them
/// whose `sets` rules (1,000 a policy) each allow one peer group over UDP
/// on a port of its own by a selector of its own: `sets` more peer sets
/// (membership bits), every peer identity holding `sets / PEER_GROUPS` of
/// them, so membership rows are `sets / 64` words wide.
pub fn manifests_with_peer_sets(n: usize, sets: usize) -> String {
    let mut y = manifests(n);
    // 1,000 rules a policy (the manifest limit is 1,024), in order.
    for k in 0..sets {
        if k % 1_000 == 0 {
            let _ = writeln!(
                y,
                "---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: wide{}, namespace: bench}}\n\
                 spec:\n  order: {}\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:",
                k / 1_000,
                -1 - (sets / 1_000 - k / 1_000) as i64
            );
        }
        let _ = writeln!(
            y,
            "  - action: Allow\n    protocol: UDP\n    source: {{selector: group == 'g{}' || set == 's{k}'}}\n    destination: {{ports: [{}]}}",
            k % PEER_GROUPS,
            20000 + k % 40000
        );
    }
    y
}

/// The policy set with `n` policies behind `anps` AdminNetworkPolicies
/// and the BaselineAdminNetworkPolicy, all selecting the server: each
/// admin policy denies one peer group on a TCP port of its own and Passes
/// another, so none decides the client, whose packets cross the whole
/// kube-admin tier before the default tier allows them.
pub fn manifests_with_admin(n: usize, anps: usize) -> String {
    let mut y = manifests(n);
    for i in 0..anps {
        let _ = writeln!(
            y,
            "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {{name: guard{i}}}\n\
             spec:\n  priority: {}\n  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: server}}}}}}}}\n  ingress:\n  \
             - {{action: Deny, from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{group: g{}}}}}}}}}], ports: [{{portNumber: {{port: {}}}}}]}}\n  \
             - {{action: Pass, from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: bench}}}}}}], ports: [{{portNumber: {{protocol: UDP, port: {}}}}}]}}",
            i % 1001,
            i % PEER_GROUPS,
            30000 + i % 30000,
            20000 + i % 30000
        );
    }
    y.push_str(
        "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: BaselineAdminNetworkPolicy\nmetadata: {name: default}\n\
         spec:\n  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n",
    );
    y
}

/// The policy set of [`manifests_with_admin`].
pub fn cluster_with_admin(n: usize, anps: usize) -> Cluster {
    parse(&manifests_with_admin(n, anps))
}

/// The policy set of [`manifests_with_peer_sets`].
pub fn cluster_with_peer_sets(n: usize, sets: usize) -> Cluster {
    parse(&manifests_with_peer_sets(n, sets))
}

/// The policy set with `n` policies.
pub fn cluster(n: usize) -> Cluster {
    parse(&manifests(n))
}

fn parse(manifests: &str) -> Cluster {
    let objects = parse_manifests("bench.yaml", manifests)
        .expect("benchmark manifests are valid")
        .into_iter()
        .map(|l| l.object);
    Cluster::from_objects(objects).expect("benchmark cluster is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_core::connection::{Peer, evaluate_connection};
    use policy_core::net::Protocol;
    use policy_core::{Flow, ReferenceEngine};

    #[test]
    fn admin_policies_leave_the_client_to_the_default_tier() {
        let c = cluster_with_admin(10, 20);
        let r = ReferenceEngine::new(&c);
        let server = Peer::Endpoint("bench/server".parse().unwrap());
        let ask = |from: &str, src: IpAddr, port: u16| {
            let f = Flow::ports(src, SERVER.parse().unwrap(), Protocol::TCP, 40000, port);
            evaluate_connection(&r, &c, &Peer::Endpoint(from.parse().unwrap()), &server, &f)
                .unwrap()
        };
        assert!(ask("bench/client", CLIENT.parse().unwrap(), TCP_PORT).allowed);
        // The first admin policy denies group g0 on its own port.
        let o = ask("bench/peer-0", peer_ip(0), 30000);
        assert!(!o.allowed);
        let decider = o.ingress.map(|d| d.to_string()).unwrap_or_default();
        assert!(decider.contains("kanp:guard0"), "{decider}");
    }

    #[test]
    fn only_the_client_gets_in() {
        let c = cluster(100);
        assert_eq!(c.policies().count(), 100);
        let r = ReferenceEngine::new(&c);
        let server = Peer::Endpoint("bench/server".parse().unwrap());
        let ask = |from: &str, src: IpAddr, proto: Protocol, port: u16| {
            let f = Flow::ports(src, SERVER.parse().unwrap(), proto, 40000, port);
            evaluate_connection(&r, &c, &Peer::Endpoint(from.parse().unwrap()), &server, &f)
                .unwrap()
                .allowed
        };
        let client: IpAddr = CLIENT.parse().unwrap();
        assert!(ask("bench/client", client, Protocol::TCP, TCP_PORT));
        assert!(ask("bench/client", client, Protocol::UDP, UDP_PORT + 3));
        assert!(!ask("bench/client", client, Protocol::TCP, 10000));
        assert!(!ask("bench/peer-0", peer_ip(0), Protocol::TCP, TCP_PORT));
        assert!(ask("bench/peer-0", peer_ip(0), Protocol::TCP, 10000));
    }
}
