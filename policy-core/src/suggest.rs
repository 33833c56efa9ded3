//! "Did you mean ...?": the closest known name to a misspelt one.

/// The candidate closest to `name` by edit distance (insertions, deletions,
/// substitutions and swaps of adjacent characters; letter case ignored), if
/// it is close enough to be a plausible misspelling: at most one edit for
/// names of up to four characters, two up to eight, three beyond. Ties go to
/// the earliest candidate; an exact match is returned as is.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = match name.chars().count() {
        0 => return None,
        1..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = distance(name, c);
        if d <= limit && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal string alignment distance over lower-cased characters.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    // Three rows: two back (for swaps), previous, current.
    let mut two_back = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(two_back[j - 2] + 1);
            }
            cur[j] = d;
        }
        std::mem::swap(&mut two_back, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
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
