//! "Did you mean ...?": the closest known name to a mistyped one, by edit
//! distance, for error messages that name an unknown pod, namespace or
//! object.
//!
//! ```
//! use policy_core::suggest::closest;
//! let pods = ["shop/web", "shop/db", "analytics/reporting"];
//! assert_eq!(closest("shop/wbe", pods), Some("shop/web"));
//! assert_eq!(closest("kube-system/coredns", pods), None);
//! ```

/// Edit distance between two strings, over characters: insertions,
/// deletions, substitutions and swaps of two neighbours (the optimal
/// string alignment distance), each costing one, since swapped letters are
/// the commonest typo.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate closest to `name` by [`edit_distance`] with letter case
/// ignored, if it is close enough to be a plausible misspelling: at most one
/// edit for names of up to four characters, two up to eight, three beyond.
/// Ties go to the earliest candidate; an exact match is returned as is.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = match name.chars().count() {
        0 => return None,
        1..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    let lower = name.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = edit_distance(&lower, &c.to_lowercase());
        if d <= limit && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("shop/web", "shop/wbe"), 1);
        assert_eq!(edit_distance("shop/db", "shop/wbe"), 2);
        assert_eq!(edit_distance("naïve", "naive"), 1);
    }

    #[test]
    fn closest_prefers_the_nearest_and_the_first_on_ties() {
        let names = ["ns-1/pod-10", "ns-1/pod-11", "ns-2/pod-1"];
        assert_eq!(closest("ns-1/pod-1", names), Some("ns-1/pod-10"));
        assert_eq!(closest("ns-2/pod-1", names), Some("ns-2/pod-1"));
        assert_eq!(closest("ns-2/pod1", names), Some("ns-2/pod-1"));
        // A swap is one edit, nearer than two substitutions.
        assert_eq!(
            closest("shop/wbe", ["shop/db", "shop/web"]),
            Some("shop/web")
        );
    }

    #[test]
    fn nothing_close_means_no_suggestion() {
        assert_eq!(closest("nosuch/pod", ["shop/web", "shop/db"]), None);
        assert_eq!(closest("x", std::iter::empty()), None);
        // One edit is always allowed, even for short names.
        assert_eq!(closest("db", ["dc"]), Some("dc"));
    }
}

#[cfg(test)]
mod field_name_tests {
    use super::*;

    const PEER: [&str; 3] = ["ipBlock", "namespaceSelector", "podSelector"];

    #[test]
    fn typos_find_the_field() {
        assert_eq!(closest("podSelecter", PEER), Some("podSelector"));
        assert_eq!(closest("podselector", PEER), Some("podSelector"));
        assert_eq!(closest("ipblock", PEER), Some("ipBlock"));
        assert_eq!(closest("ingres", ["ingress", "egress"]), Some("ingress"));
        assert_eq!(
            closest("matchLabel", ["matchExpressions", "matchLabels"]),
            Some("matchLabels")
        );
        assert_eq!(closest("sorce", ["source", "destination"]), Some("source"));
        // A swap of two letters is one edit.
        assert_eq!(closest("egrses", ["ingress", "egress"]), Some("egress"));
    }

    #[test]
    fn unrelated_names_have_no_suggestion() {
        assert_eq!(closest("selector", PEER), None);
        assert_eq!(closest("action", ["from", "ports"]), None);
        assert_eq!(closest("", PEER), None);
        assert_eq!(closest("x", Vec::<&str>::new()), None);
        // Short names need to be very close.
        assert_eq!(closest("to", ["from"]), None);
        assert_eq!(closest("tos", ["to"]), Some("to"));
    }

    #[test]
    fn exact_and_ties() {
        assert_eq!(closest("from", ["from", "to"]), Some("from"));
        assert_eq!(closest("ab", ["ac", "ad"]), Some("ac"));
    }
}
