//! Field checks shared by the Calico and Kubernetes conversions: names,
//! namespaces, labels, orders, selectors, protocols, ports, nets and ICMP.

use super::*;

pub(super) enum NameRule {
    /// DNS-1123 label (tiers).
    Label,
    /// DNS-1123 subdomain (most objects).
    Subdomain,
}

pub(super) fn object_name(meta: &ObjectMeta, rule: NameRule) -> Result<String, Error> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Error::invalid("metadata.name", "a name is required"));
    }
    let (ok, max, what) = match rule {
        NameRule::Label => (
            is_dns_label(&name),
            63,
            "a DNS-1123 label ([a-z0-9-], alphanumeric at both ends)",
        ),
        NameRule::Subdomain => (
            name.split('.').all(is_dns_label),
            253,
            "a DNS-1123 subdomain (dot-separated [a-z0-9-] labels)",
        ),
    };
    if name.len() > max {
        return Err(Error::invalid(
            "metadata.name",
            format!("{name:?} is longer than {max} characters"),
        ));
    }
    if !ok {
        return Err(Error::invalid(
            "metadata.name",
            format!("{name:?} is not {what}"),
        ));
    }
    Ok(name)
}

pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn namespace_of(meta: &ObjectMeta) -> Result<String, Error> {
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    if !is_dns_label(&ns) {
        return Err(Error::invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name"),
        ));
    }
    Ok(ns)
}

pub(super) fn labels_of(meta: &ObjectMeta, field: &str) -> Result<LabelMap, Error> {
    match &meta.labels {
        Some(l) => check_labels(l, field),
        None => Ok(LabelMap::new()),
    }
}

/// Label keys must be usable in selectors; values follow Kubernetes' rules.
pub fn check_labels(labels: &BTreeMap<String, String>, field: &str) -> Result<LabelMap, Error> {
    for (k, v) in labels {
        if !is_valid_label_key(k) {
            return Err(Error::invalid(
                format!("{field}[{k}]"),
                format!(
                    "{k:?} is not a valid label key: 1-{MAX_LABEL_LENGTH} characters of [A-Za-z0-9_./-]"
                ),
            ));
        }
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && (v.is_empty()
                || (v.as_bytes()[0].is_ascii_alphanumeric()
                    && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()));
        if !value_ok {
            return Err(Error::invalid(
                format!("{field}[{k}]"),
                format!(
                    "{v:?} is not a valid label value: at most 63 characters of [A-Za-z0-9-_.], alphanumeric at both ends"
                ),
            ));
        }
    }
    Ok(labels.clone())
}

pub(super) fn check_order(order: Option<f64>, field: &str) -> Result<Option<f64>, Error> {
    match order {
        Some(o) if !o.is_finite() => Err(Error::invalid(field, "order must be a finite number")),
        o => Ok(o),
    }
}

pub(super) fn check_staged_action(a: Option<&str>) -> Result<bool, Error> {
    match a {
        None | Some("Set") => Ok(false),
        Some("Delete") => Ok(true),
        Some(other) => Err(Error::new(ErrorKind::Invalid(
            format!("{other:?} is not a staged action: expected Set or Delete").into(),
        ))),
    }
}

/// Parses a selector field, enforcing Calico's length limit. Empty means absent.
pub(super) fn selector_field(text: Option<&str>, field: &str) -> Result<Option<Selector>, Error> {
    match text {
        None => Ok(None),
        Some("") => Ok(None),
        Some(t) => {
            if t.len() > limits::SELECTOR_LENGTH {
                return Err(Error::new(ErrorKind::Limit {
                    what: "characters in the selector",
                    count: t.len(),
                    limit: limits::SELECTOR_LENGTH,
                })
                .at(field));
            }
            Selector::parse(t)
                .map(Some)
                .map_err(|e| Error::new(ErrorKind::Selector(e)).at(field))
        }
    }
}

/// Replaces every `all()` in a tree (Calico does this with a string replace
/// on namespace selectors, so `all()` there means "any namespace").
pub(super) fn replace_all(expr: &Expr, with: &Expr) -> Expr {
    match expr {
        Expr::All => with.clone(),
        Expr::Not(e) => Expr::Not(Box::new(replace_all(e, with))),
        Expr::And(es) => Expr::And(es.iter().map(|e| replace_all(e, with)).collect()),
        Expr::Or(es) => Expr::Or(es.iter().map(|e| replace_all(e, with)).collect()),
        other => other.clone(),
    }
}

pub(super) fn replace_global(expr: &Expr, with: &Expr) -> Expr {
    match expr {
        Expr::Global => with.clone(),
        Expr::Not(e) => Expr::Not(Box::new(replace_global(e, with))),
        Expr::And(es) => Expr::And(es.iter().map(|e| replace_global(e, with)).collect()),
        Expr::Or(es) => Expr::Or(es.iter().map(|e| replace_global(e, with)).collect()),
        other => other.clone(),
    }
}

pub(super) fn has_namespace() -> Expr {
    Expr::Has(LABEL_NAMESPACE.to_string())
}

pub(super) fn contains_global(expr: &Expr) -> bool {
    match expr {
        Expr::Global => true,
        Expr::Not(e) => contains_global(e),
        Expr::And(es) | Expr::Or(es) => es.iter().any(contains_global),
        _ => false,
    }
}

pub(super) fn and2(a: Expr, b: Expr) -> Expr {
    Expr::And(vec![a, b])
}

pub(super) fn protocol_field(p: &NumOrString, field: &str) -> Result<Protocol, Error> {
    match p {
        NumOrString::Num(n) => Protocol::from_number(*n),
        NumOrString::Str(s) => Protocol::parse(s),
    }
    .map_err(|m| Error::invalid(field, m))
}

pub(super) fn ports_field(ports: &[NumOrString], field: &str) -> Result<Vec<PortMatch>, Error> {
    if ports.len() > limits::PORTS {
        return Err(Error::new(ErrorKind::Limit {
            what: "ports",
            count: ports.len(),
            limit: limits::PORTS,
        })
        .at(field));
    }
    ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            match p {
                NumOrString::Num(n) => PortMatch::number(*n),
                NumOrString::Str(s) => PortMatch::parse(s),
            }
            .map_err(|m| Error::invalid(format!("{field}[{i}]"), m))
        })
        .collect()
}

pub(super) fn nets_field(nets: &[String], field: &str) -> Result<Vec<IpNet>, Error> {
    if nets.len() > limits::NETS {
        return Err(Error::new(ErrorKind::Limit {
            what: "CIDRs",
            count: nets.len(),
            limit: limits::NETS,
        })
        .at(field));
    }
    nets.iter()
        .enumerate()
        .map(|(i, n)| parse_cidr_or_ip(n).map_err(|m| Error::invalid(format!("{field}[{i}]"), m)))
        .collect()
}

pub(super) fn icmp_field(icmp: &IcmpSpec, field: &str) -> Result<IcmpMatch, Error> {
    let Some(t) = icmp.icmp_type else {
        return Err(Error::invalid(
            field,
            if icmp.code.is_some() {
                "ICMP code specified without an ICMP type"
            } else {
                "an ICMP match needs a type"
            },
        ));
    };
    if !(0..=254).contains(&t) {
        return Err(Error::invalid(
            format!("{field}.type"),
            format!("ICMP type {t} is out of range 0-254"),
        ));
    }
    let code = match icmp.code {
        None => None,
        Some(c) if (0..=255).contains(&c) => Some(c as u8),
        Some(c) => {
            return Err(Error::invalid(
                format!("{field}.code"),
                format!("ICMP code {c} is out of range 0-255"),
            ));
        }
    };
    Ok(IcmpMatch {
        icmp_type: t as u8,
        code,
    })
}
