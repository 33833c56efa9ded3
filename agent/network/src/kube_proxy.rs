//! kube-proxy's rules on a node, read from `nft -j list chains`: with
//! Palisade load-balancing Services too, both would rewrite the same
//! connections ("kube-proxy and BPF must never both be active"). Pure: the
//! listing in, what was found out.
//!
//! | found | kube-proxy mode |
//! |---|---|
//! | a table named `kube-proxy` (family `ip` or `ip6`) | nftables |
//! | a chain `KUBE-SERVICES` (iptables-nft's `nat` table) | iptables |
//!
//! ```
//! use palisade_network::kube_proxy::footprint;
//! let listing = serde_json::json!({"nftables": [
//!     {"chain": {"family": "ip", "table": "kube-proxy", "name": "services"}},
//!     {"chain": {"family": "ip", "table": "nat", "name": "KUBE-SERVICES"}}]});
//! assert_eq!(footprint(&listing), [
//!     "table ip kube-proxy (nftables mode)",
//!     "chain KUBE-SERVICES in table ip nat (iptables mode)",
//! ]);
//! ```

use std::collections::BTreeSet;

use serde_json::Value;

/// What of kube-proxy the listing holds, one line per table (empty: none).
pub fn footprint(listing: &Value) -> Vec<String> {
    let mut found = BTreeSet::new();
    for item in listing["nftables"].as_array().into_iter().flatten() {
        let chain = &item["chain"];
        let (Some(family), Some(table), Some(name)) = (
            chain["family"].as_str(),
            chain["table"].as_str(),
            chain["name"].as_str(),
        ) else {
            continue;
        };
        if table == "kube-proxy" {
            found.insert((0, format!("table {family} kube-proxy (nftables mode)")));
        } else if name == "KUBE-SERVICES" {
            found.insert((
                1,
                format!("chain KUBE-SERVICES in table {family} {table} (iptables mode)"),
            ));
        }
    }
    found.into_iter().map(|(_, line)| line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_modes_are_found_once_per_table_and_nothing_else_counts() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "services"}},
            {"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-prerouting"}},
            {"chain": {"family": "ip6", "table": "kube-proxy", "name": "services"}},
            {"chain": {"family": "ip", "table": "nat", "name": "KUBE-SERVICES"}},
            {"chain": {"family": "inet", "table": "palisade", "name": "nat-outgoing"}},
            {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING"}}]});
        assert_eq!(
            footprint(&listing),
            [
                "table ip kube-proxy (nftables mode)",
                "table ip6 kube-proxy (nftables mode)",
                "chain KUBE-SERVICES in table ip nat (iptables mode)",
            ]
        );
        assert!(footprint(&json!({"nftables": []})).is_empty());
    }
}
