//! The rules kube-proxy writes for a set of Services, in its iptables mode
//! (`iptables-restore` input: KUBE-SERVICES → KUBE-SVC-* with statistic
//! probabilities → KUBE-SEP-* DNAT, masquerade marks) and its nftables
//! mode (`nft -f` input: the `service-ips` verdict map → `service-*`
//! chains with `numgen random mod N vmap` → `endpoint-*` DNAT chains),
//! full syncs and the partial sync of one changed Service, so the
//! benchmarks program the same Services three ways. Chain names are
//! built the way kube-proxy builds them (a hash of the port name and
//! protocol, base32).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use palisade_services::{FrontendKind, ServiceTable};
use sha2::{Digest, Sha256};

/// One Service port as kube-proxy programs it (ClusterIP and NodePort,
/// Cluster traffic policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpService {
    /// `namespace/name:port`.
    pub name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddr>,
}

/// A node's service table as kube-proxy's Services: each Service port
/// with its ClusterIP frontend, NodePort and cluster endpoints.
pub fn kp_services(table: &ServiceTable) -> Vec<KpService> {
    let mut out: Vec<KpService> = table
        .services
        .iter()
        .map(|b| KpService {
            name: b.name.to_string(),
            protocol: "tcp",
            cluster_ip: "0.0.0.0".parse().expect("ip"),
            port: 0,
            node_port: None,
            endpoints: b.cluster.clone(),
        })
        .collect();
    for ((ip, _, port), (kind, idx)) in &table.frontends {
        if *kind == FrontendKind::ClusterIp {
            out[*idx].cluster_ip = *ip;
            out[*idx].port = *port;
        }
    }
    for ((_, port), idx) in &table.node_ports {
        out[*idx].node_port = Some(*port);
    }
    out
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The first `n` base32 characters of SHA-256(`s`).
fn hash(s: &str, n: usize) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in digest.iter() {
        acc = (acc << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 && out.len() < n {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

impl KpService {
    fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash(&format!("{}{}", self.name, self.protocol), 16)
        )
    }

    fn sep_chain(&self, ep: &SocketAddr) -> String {
        format!(
            "KUBE-SEP-{}",
            hash(&format!("{}{}{ep}", self.name, self.protocol), 16)
        )
    }

    /// `ns/svc/proto/port`, the readable part of nftables chain names.
    fn nft_id(&self) -> String {
        let (ns_svc, port) = self.name.split_once(':').unwrap_or((&self.name, ""));
        format!("{ns_svc}/{}/{port}", self.protocol)
    }

    fn nft_service_chain(&self) -> String {
        format!("service-{}-{}", hash(&self.nft_id(), 8), self.nft_id())
    }

    fn nft_endpoint_chain(&self, ep: &SocketAddr) -> String {
        let id = format!("{}__{}/{}", self.nft_id(), ep.ip(), ep.port());
        format!("endpoint-{}-{id}", hash(&id, 8))
    }
}

fn iptables_service(s: &KpService, cluster_cidr: &str, chains: &mut String, rules: &mut String) {
    let svc = s.svc_chain();
    let _ = writeln!(chains, ":{svc} - [0:0]");
    let p = s.protocol;
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {svc}",
        s.name, s.cluster_ip, s.port
    );
    if let Some(np) = s.node_port {
        let _ = writeln!(
            rules,
            "-A KUBE-NODEPORTS -m comment --comment {} -m {p} -p {p} --dport {np} -j KUBE-EXT-{}",
            s.name,
            &svc[9..]
        );
        let _ = writeln!(chains, ":KUBE-EXT-{} - [0:0]", &svc[9..]);
        let _ = writeln!(
            rules,
            "-A KUBE-EXT-{} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
            &svc[9..],
            s.name
        );
        let _ = writeln!(rules, "-A KUBE-EXT-{} -j {svc}", &svc[9..]);
    }
    let _ = writeln!(
        rules,
        "-A {svc} ! -s {cluster_cidr} -d {}/32 -m comment --comment \"{} cluster IP\" -m {p} -p {p} --dport {} -j KUBE-MARK-MASQ",
        s.cluster_ip, s.name, s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = s.sep_chain(ep);
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let left = n - i;
        if left > 1 {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {ep}\" -m statistic --mode random --probability {:.10} -j {sep}",
                s.name,
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{} -> {ep}\" -j {sep}",
                s.name
            );
        }
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {} -s {}/32 -j KUBE-MARK-MASQ",
            s.name,
            ep.ip()
        );
        let _ = writeln!(
            rules,
            "-A {sep} -m comment --comment {} -m {p} -p {p} -j DNAT --to-destination {ep}",
            s.name
        );
    }
}

/// A full `iptables-restore` of the nat table for `services`.
pub fn iptables_full(services: &[KpService], cluster_cidr: &str) -> String {
    let mut chains = String::from(
        ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for s in services {
        iptables_service(s, cluster_cidr, &mut chains, &mut rules);
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// kube-proxy's partial sync after `old` became `new` (same Service):
/// `iptables-restore --noflush` input rewriting its chains only.
pub fn iptables_change(old: &KpService, new: &KpService, cluster_cidr: &str) -> String {
    let (mut chains, mut rules) = (String::new(), String::new());
    let svc = new.svc_chain();
    let _ = writeln!(chains, ":{svc} - [0:0]");
    // The Service's own rules, rewritten (declaring the chain flushes it).
    let mut all = String::new();
    let mut decl = String::new();
    iptables_service(new, cluster_cidr, &mut decl, &mut all);
    for line in all
        .lines()
        .filter(|l| !l.starts_with("-A KUBE-SERVICES") && !l.starts_with("-A KUBE-NODEPORTS"))
    {
        rules.push_str(line);
        rules.push('\n');
    }
    for line in decl.lines().filter(|l| !l.starts_with(&format!(":{svc}"))) {
        chains.push_str(line);
        chains.push('\n');
    }
    // A stale chain is declared (which flushes it), then deleted.
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(chains, ":{} - [0:0]", old.sep_chain(ep));
        let _ = writeln!(rules, "-X {}", old.sep_chain(ep));
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

fn nft_service(s: &KpService, cluster_cidr: &str, out: &mut String) {
    let chain = s.nft_service_chain();
    let p = s.protocol;
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} {p} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
        s.cluster_ip, s.port
    );
    let mut vmap = Vec::new();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let ec = s.nft_endpoint_chain(ep);
        let _ = writeln!(out, "add chain ip kube-proxy {ec}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} ip saddr {} jump mark-for-masquerade",
            ep.ip()
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {ec} meta l4proto {p} dnat to {ep}"
        );
        vmap.push(format!("{i} : goto {ec}"));
    }
    if !vmap.is_empty() {
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(" , ")
        );
    }
}

/// A full `nft -f` transaction for `services`.
pub fn nft_full(services: &[KpService], cluster_cidr: &str) -> String {
    let mut out = String::from(
        "add table ip kube-proxy\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority srcnat ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n",
    );
    let mut ips = Vec::new();
    let mut node_ports = Vec::new();
    for s in services {
        nft_service(s, cluster_cidr, &mut out);
        ips.push(format!(
            "{} . {} . {} : goto {}",
            s.cluster_ip,
            s.protocol,
            s.port,
            s.nft_service_chain()
        ));
        if let Some(np) = s.node_port {
            node_ports.push(format!(
                "{} . {np} : goto {}",
                s.protocol,
                s.nft_service_chain()
            ));
        }
    }
    // Elements in batches, as knftables writes them.
    for chunk in ips.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} }}",
            chunk.join(" , ")
        );
    }
    for chunk in node_ports.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-nodeports {{ {} }}",
            chunk.join(" , ")
        );
    }
    out
}

/// kube-proxy's partial sync after `old` became `new`: the Service chain
/// flushed and refilled, new endpoint chains added, gone ones deleted.
pub fn nft_change(old: &KpService, new: &KpService, cluster_cidr: &str) -> String {
    let mut out = String::new();
    let chain = new.nft_service_chain();
    let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    let mut body = String::new();
    nft_service(new, cluster_cidr, &mut body);
    for line in body.lines() {
        // Existing endpoint chains keep their rules; only new ones are filled.
        let is_new_endpoint = new
            .endpoints
            .iter()
            .filter(|e| !old.endpoints.contains(e))
            .any(|e| line.contains(&new.nft_endpoint_chain(e)) && !line.contains("vmap"));
        if line.contains(&format!("kube-proxy {chain} ")) || is_new_endpoint {
            out.push_str(line);
            out.push('\n');
        }
    }
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy {}",
            old.nft_endpoint_chain(ep)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(eps: &[&str]) -> KpService {
        KpService {
            name: "ns1/svc1:p80".into(),
            protocol: "tcp",
            cluster_ip: "172.30.0.41".parse().unwrap(),
            port: 80,
            node_port: Some(30001),
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn names_and_probabilities_as_kube_proxy_writes_them() {
        let s = svc(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]);
        let text = iptables_full(std::slice::from_ref(&s), "10.0.0.0/8");
        let svc_chain = s.svc_chain();
        assert_eq!(svc_chain.len(), "KUBE-SVC-".len() + 16);
        assert!(text.contains("--probability 0.3333333333"), "{text}");
        assert!(text.contains("--probability 0.5000000000"), "{text}");
        assert_eq!(text.matches("-j DNAT").count(), 3);
        let nft = nft_full(std::slice::from_ref(&s), "10.0.0.0/8");
        assert!(nft.contains("numgen random mod 3 vmap"), "{nft}");
        assert!(nft.contains(&s.nft_service_chain()));
        let changed = svc(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.9:8080"]);
        let delta = nft_change(&s, &changed, "10.0.0.0/8");
        assert!(delta.starts_with("flush chain"), "{delta}");
        assert!(delta.contains(&format!(
            "delete chain ip kube-proxy {}",
            s.nft_endpoint_chain(&s.endpoints[2])
        )));
        let delta = iptables_change(&s, &changed, "10.0.0.0/8");
        assert!(
            delta.contains(&format!("-X {}", s.sep_chain(&s.endpoints[2]))),
            "{delta}"
        );
        assert_eq!(delta.matches("-j DNAT").count(), 3);
    }
}
