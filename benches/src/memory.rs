//! How long a random cache-line read takes on this machine for a buffer of
//! a given size: the floor under any lookup whose line is not cached. The
//! datapath cost report prints it next to the conntrack sizes, so a reader
//! can tell the memory system's share from the programs'.
//!
//! ```
//! let ns = palisade_benches::memory::random_line_read_ns(1 << 16, 10_000);
//! assert!(ns > 0.0);
//! ```

use std::time::Instant;

/// Words per 64-byte line.
const LINE_WORDS: usize = 8;

/// Nanoseconds per read of a chain of dependent reads, each of a random
/// line of a `bytes`-long buffer (every line visited once per cycle of the
/// chain, in an order a prefetcher cannot follow): the latency of a line
/// of that buffer when it is not in a nearer cache.
pub fn random_line_read_ns(bytes: usize, reads: usize) -> f64 {
    let lines = (bytes / (LINE_WORDS * 8)).max(2);
    let buf = chain(lines);
    // One pass through the chain to fault the pages in and warm what fits.
    let mut at = 0;
    for _ in 0..lines.min(reads) {
        at = buf[at];
    }
    let start = Instant::now();
    for _ in 0..reads {
        at = buf[at];
    }
    let ns = start.elapsed().as_nanos() as f64 / reads.max(1) as f64;
    // Keep the chain's result alive so the loop is not removed.
    std::hint::black_box(at);
    ns
}

/// `lines` lines of words whose first word holds the index of the next
/// line's first word, in one random cycle through all of them (Sattolo's
/// shuffle, from a fixed xorshift so runs read the same chain).
fn chain(lines: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lines).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..lines).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % i as u64) as usize;
        order.swap(i, j);
    }
    let mut buf = vec![0usize; lines * LINE_WORDS];
    for w in 0..lines {
        buf[order[w] * LINE_WORDS] = order[(w + 1) % lines] * LINE_WORDS;
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_visits_every_line_once_per_cycle() {
        for lines in [2, 3, 64, 1000] {
            let buf = chain(lines);
            let mut seen = vec![false; lines];
            let mut at = 0;
            for _ in 0..lines {
                assert_eq!(at % LINE_WORDS, 0, "{lines} lines: not a line start");
                assert!(
                    !seen[at / LINE_WORDS],
                    "{lines} lines: line {} twice",
                    at / LINE_WORDS
                );
                seen[at / LINE_WORDS] = true;
                at = buf[at];
            }
            assert_eq!(at, 0, "{lines} lines: the chain is one cycle");
            // Not the identity order: consecutive reads jump around.
            if lines > 3 {
                assert!((0..lines).any(|l| buf[l * LINE_WORDS] != ((l + 1) % lines) * LINE_WORDS));
            }
        }
    }
}
