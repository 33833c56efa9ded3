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

/// The candidate closest to `name`, if one is close enough to be a likely
/// typo: at most a third of the longer name's characters differ (and at
/// least one edit is always allowed). Ties go to the first candidate, so
/// callers that want a stable answer pass candidates in a stable order.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = name.chars().count();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = edit_distance(name, c);
        let budget = (len.max(c.chars().count()) / 3).max(1);
        if d <= budget && best.is_none_or(|(bd, _)| d < bd) {
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
