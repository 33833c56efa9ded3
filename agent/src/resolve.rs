//! Turning the names people type (pods, namespaces, selectors) into the
//! cluster's pods, with "did you mean" for names that are not there.

use std::collections::BTreeSet;

use anyhow::{Result, anyhow, bail};
use policy_core::suggest::closest;
use policy_core::{Cluster, EndpointKey, Selector};

/// " (did you mean X?)" when a known name is close to `name`.
fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, known)
        .map(|c| format!("; did you mean {c}?"))
        .unwrap_or_default()
}

/// Checks that a pod is in the cluster; the error names it and the closest
/// pod that is.
pub fn known_pod(cluster: &Cluster, key: &EndpointKey, flag: &str) -> Result<()> {
    if cluster.endpoint(key).is_some() {
        return Ok(());
    }
    let names: Vec<String> = cluster.endpoints().map(|e| e.key.to_string()).collect();
    let mut hint = did_you_mean(&key.to_string(), names.iter().map(String::as_str));
    if hint.is_empty() {
        // The right name in the wrong namespace (`shop/api` for `shop-backend/api`).
        let same_name: Vec<String> = cluster
            .endpoints()
            .filter(|e| e.key.name == key.name)
            .map(|e| e.key.to_string())
            .collect();
        if !same_name.is_empty() {
            hint = format!("; did you mean {}?", same_name.join(" or "));
        }
    }
    bail!("{flag}: no pod {key} in the manifests{hint}")
}

/// Namespaces that exist: declared ones and those pods live in.
fn namespaces(cluster: &Cluster) -> BTreeSet<&str> {
    cluster
        .namespaces()
        .map(|n| n.name.as_str())
        .chain(cluster.endpoints().map(|e| e.key.namespace.as_str()))
        .collect()
}

/// A `--from`/`--to` value: `namespace/pod`, a namespace, or a Calico
/// selector over the pods' labels (with Calico's implicit labels, so
/// `projectcalico.org/namespace == 'shop'` works too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodFilter {
    /// One pod.
    Pod(EndpointKey),
    /// Every pod of a namespace.
    Namespace(String),
    /// Every pod the selector matches.
    Selector(Selector),
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

impl PodFilter {
    /// Reads a value: `ns/pod` when both halves are names, a bare name is a
    /// namespace, anything else is parsed as a selector.
    pub fn parse(value: &str, flag: &str) -> Result<PodFilter> {
        if let Some((ns, pod)) = value.split_once('/')
            && is_name(ns)
            && is_name(pod)
        {
            return Ok(PodFilter::Pod(EndpointKey::new(ns, pod)));
        }
        if is_name(value) {
            return Ok(PodFilter::Namespace(value.to_string()));
        }
        Selector::parse(value)
            .map(PodFilter::Selector)
            .map_err(|e| {
                anyhow!(
                    "{flag}: {value:?} is neither namespace/pod, a namespace nor a selector: {e}"
                )
            })
    }

    /// The pods the filter names, in the cluster's order; an unknown pod or
    /// namespace, or a selector that matches nothing, is an error.
    pub fn pods(&self, cluster: &Cluster, flag: &str) -> Result<Vec<EndpointKey>> {
        Ok(match self {
            PodFilter::Pod(k) => {
                known_pod(cluster, k, flag)?;
                vec![k.clone()]
            }
            PodFilter::Namespace(ns) => {
                let pods: Vec<EndpointKey> = cluster
                    .endpoints()
                    .filter(|e| e.key.namespace == *ns)
                    .map(|e| e.key.clone())
                    .collect();
                if pods.is_empty() {
                    let known = namespaces(cluster);
                    if known.contains(ns.as_str()) {
                        bail!("{flag}: namespace {ns} has no pods");
                    }
                    bail!(
                        "{flag}: no namespace {ns} in the manifests{}",
                        did_you_mean(ns, known)
                    );
                }
                pods
            }
            PodFilter::Selector(sel) => {
                let pods: Vec<EndpointKey> = cluster
                    .endpoints()
                    .filter(|e| sel.matches(&cluster.endpoint_labels(e)))
                    .map(|e| e.key.clone())
                    .collect();
                if pods.is_empty() {
                    bail!("{flag}: selector {} matches no pod", sel.canonical());
                }
                pods
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_as_pods_namespaces_or_selectors() {
        assert_eq!(
            PodFilter::parse("shop/web", "--from").unwrap(),
            PodFilter::Pod(EndpointKey::new("shop", "web"))
        );
        assert_eq!(
            PodFilter::parse("kube-system", "--from").unwrap(),
            PodFilter::Namespace("kube-system".into())
        );
        assert!(matches!(
            PodFilter::parse("app == 'web'", "--from").unwrap(),
            PodFilter::Selector(_)
        ));
        assert!(matches!(
            PodFilter::parse("has(app)", "--from").unwrap(),
            PodFilter::Selector(_)
        ));
        let err = PodFilter::parse("app == ", "--to").unwrap_err().to_string();
        assert!(err.starts_with("--to: "), "{err}");
    }
}
