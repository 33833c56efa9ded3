//! Kubernetes peers written into a Calico rule, rewritten as the Calico
//! rules that mean the same, so the error can say exactly what to write.
//! (The production practice's own example has `ingress: - from: -
//! namespaceSelector: ...` in a `projectcalico.org/v3` NetworkPolicy.)

use super::*;

/// The value at a field path such as `spec.ingress[0].from`.
fn value_at<'a>(doc: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut at = doc;
    for part in path.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            at = at.get(name)?;
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            at = at.get(index.trim_end_matches(']').parse::<usize>().ok()?)?;
        }
    }
    Some(at)
}

/// Double-quoted YAML scalar (selectors hold single quotes).
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One Kubernetes peer as a Calico entity rule, in YAML flow style.
fn peer_entity(peer: &netv1::NetworkPolicyPeer) -> Option<String> {
    let mut fields = Vec::new();
    if let Some(block) = &peer.ip_block {
        fields.push(format!("nets: [{}]", block.cidr));
        if let Some(except) = block.except.as_ref().filter(|e| !e.is_empty()) {
            fields.push(format!("notNets: [{}]", except.join(", ")));
        }
    }
    if let Some(ns) = &peer.namespace_selector {
        let text = k8s_selector_text(Some(ns), false, "namespaceSelector").ok()?;
        fields.push(format!("namespaceSelector: {}", quoted(&text)));
    }
    if let Some(pods) = &peer.pod_selector {
        let text = k8s_selector_text(Some(pods), false, "podSelector").ok()?;
        // An empty podSelector next to a namespaceSelector adds nothing.
        if !(text == "all()" && peer.namespace_selector.is_some()) {
            fields.push(format!("selector: {}", quoted(&text)));
        }
    }
    (!fields.is_empty()).then(|| format!("{{{}}}", fields.join(", ")))
}

/// For `from`/`to` found in a Calico rule: the Calico rules that say the
/// same (one per peer, as Kubernetes ORs its peers), or `None` when the
/// peers do not read as Kubernetes peers.
pub(super) fn calico_rules_for_k8s_peers(
    doc: &serde_json::Value,
    field_path: &str,
    field: &str,
) -> Option<String> {
    let side = match field {
        "from" => "source",
        "to" => "destination",
        _ => return None,
    };
    let peers: Vec<netv1::NetworkPolicyPeer> =
        serde_json::from_value(value_at(doc, field_path)?.clone()).ok()?;
    let rules: Vec<String> = peers
        .iter()
        .map(|p| peer_entity(p).map(|e| format!("`{{action: Allow, {side}: {e}}}`")))
        .collect::<Option<_>>()?;
    if rules.is_empty() {
        return None;
    }
    Some(format!(
        "`{field}` is networking.k8s.io/v1 syntax; in projectcalico.org/v3 write {} {} (or make the policy apiVersion networking.k8s.io/v1 and keep `{field}`)",
        if rules.len() == 1 {
            "the rule as"
        } else {
            "one rule per peer:"
        },
        rules.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_production_practice_example_gets_its_calico_form() {
        let doc = json!({"spec": {"ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"app": "frontend"}}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "db"}}},
        ]}]}});
        let help = calico_rules_for_k8s_peers(&doc, "spec.ingress[0].from", "from").unwrap();
        assert_eq!(
            help,
            "`from` is networking.k8s.io/v1 syntax; in projectcalico.org/v3 write one rule per peer: \
             `{action: Allow, source: {namespaceSelector: \"app == 'frontend'\"}}`, \
             `{action: Allow, source: {nets: [10.0.0.0/8], notNets: [10.1.0.0/16]}}`, \
             `{action: Allow, source: {namespaceSelector: \"all()\", selector: \"role == 'db'\"}}` \
             (or make the policy apiVersion networking.k8s.io/v1 and keep `from`)"
        );
    }

    #[test]
    fn anything_else_falls_back_to_the_general_hint() {
        let doc = json!({"spec": {"egress": [{"to": [{"nets": ["10.0.0.0/8"]}]}]}});
        // Calico fields inside `to` are not Kubernetes peers.
        assert_eq!(
            calico_rules_for_k8s_peers(&doc, "spec.egress[0].to", "to"),
            None
        );
        assert_eq!(
            calico_rules_for_k8s_peers(&doc, "spec.egress[1].to", "to"),
            None
        );
        assert_eq!(
            calico_rules_for_k8s_peers(&doc, "spec.egress[0].to", "ports"),
            None
        );
    }

    #[test]
    fn the_suggested_rules_are_valid_calico() {
        let doc = json!({"spec": {"ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"app": "frontend"}}, "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]}]}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
        ]}]}});
        let help = calico_rules_for_k8s_peers(&doc, "spec.ingress[0].from", "from").unwrap();
        let rules: Vec<&str> = help.split('`').skip(3).step_by(2).take(2).collect();
        assert_eq!(rules.len(), 2, "{help}");
        let yaml = format!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: backend}}\n\
             spec:\n  selector: app == 'api'\n  ingress:\n  - {}\n  - {}\n",
            rules[0], rules[1]
        );
        let loaded = crate::manifest::parse_manifests("suggested.yaml", &yaml)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(loaded.len(), 1);
    }
}
