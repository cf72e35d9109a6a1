//! Which blocks a swarm covers, and where a joining node helps most.

use crate::LayerSpan;

/// One node's share of a model: the blocks it serves and its measured
/// decode speed over them (tokens/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Served {
    pub span: LayerSpan,
    pub throughput: f32,
}

/// For every block, the summed throughput of the nodes serving it.
pub fn coverage(n_blocks: u32, served: &[Served]) -> Vec<f32> {
    let mut total = vec![0.0f32; n_blocks as usize];
    for s in served {
        for block in s.span.blocks().filter(|&b| b < n_blocks) {
            total[block as usize] += s.throughput.max(0.0);
        }
    }
    total
}

/// How many nodes serve each block.
pub fn node_counts(n_blocks: u32, served: &[Served]) -> Vec<u32> {
    let mut count = vec![0u32; n_blocks as usize];
    for s in served {
        for block in s.span.blocks().filter(|&b| b < n_blocks) {
            count[block as usize] += 1;
        }
    }
    count
}

/// Runs of blocks nobody serves.
pub fn gaps(n_blocks: u32, served: &[Served]) -> Vec<LayerSpan> {
    let counts = node_counts(n_blocks, served);
    let mut gaps = Vec::new();
    let mut start = None;
    for (i, &c) in counts.iter().enumerate() {
        match (c == 0, start) {
            (true, None) => start = Some(i as u32),
            (false, Some(s)) => {
                gaps.push(LayerSpan::new(s, i as u32).expect("non-empty"));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        gaps.push(LayerSpan::new(s, n_blocks).expect("non-empty"));
    }
    gaps
}

/// Petals' rule for a node joining with room for `len` blocks: the window
/// whose weakest block has the least throughput (then the least total, then
/// the earliest), so that new capacity goes where the swarm is thinnest.
pub fn weakest_window(n_blocks: u32, len: u32, served: &[Served]) -> LayerSpan {
    let len = len.clamp(1, n_blocks.max(1));
    let cover = coverage(n_blocks, served);
    let mut best: Option<(f32, f32, u32)> = None;
    for start in 0..=(n_blocks - len) {
        let window = &cover[start as usize..(start + len) as usize];
        let min = window.iter().copied().fold(f32::INFINITY, f32::min);
        let sum: f32 = window.iter().sum();
        let better = match best {
            None => true,
            Some((m, s, _)) => min < m || (min == m && sum < s),
        };
        if better {
            best = Some((min, sum, start));
        }
    }
    let start = best.map_or(0, |(_, _, s)| s);
    LayerSpan::new(start, start + len).expect("len >= 1")
}

/// The price of the cheapest route over all `n_blocks` blocks: every
/// position of a session goes through every hop, so a route costs the sum
/// of its hops' prices (per 1,000 positions, in micro-credits). A node may
/// serve any part of its span. `None` when some block is not served.
pub fn cheapest_route_price(n_blocks: u32, priced: &[(LayerSpan, u64)]) -> Option<u64> {
    let n = n_blocks as usize;
    // cheapest[b]: the cheapest way to cover blocks 0..b.
    let mut cheapest: Vec<Option<u64>> = vec![None; n + 1];
    cheapest[0] = Some(0);
    for b in 0..n {
        let Some(so_far) = cheapest[b] else { continue };
        for (span, price) in priced {
            if (span.start() as usize) <= b && b < span.end() as usize {
                let end = (span.end() as usize).min(n);
                let cost = so_far.saturating_add(*price);
                for reach in cheapest.iter_mut().take(end + 1).skip(b + 1) {
                    if reach.is_none_or(|c| cost < c) {
                        *reach = Some(cost);
                    }
                }
            }
        }
    }
    cheapest[n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cheapest_route_sums_its_hops() {
        let s = |a, b| LayerSpan::new(a, b).expect("span");
        // 0..10 at 1, 10..30 at 5, or 0..30 at 4 in one hop.
        assert_eq!(cheapest_route_price(30, &[(s(0, 10), 1), (s(10, 30), 5)]), Some(6));
        assert_eq!(cheapest_route_price(30, &[(s(0, 10), 1), (s(10, 30), 5), (s(0, 30), 4)]), Some(4));
        // Overlaps may be cut anywhere.
        assert_eq!(cheapest_route_price(30, &[(s(0, 20), 1), (s(5, 30), 2)]), Some(3));
        assert_eq!(cheapest_route_price(30, &[(s(0, 10), 1), (s(20, 30), 1)]), None);
    }

    fn served(a: u32, b: u32, throughput: f32) -> Served {
        Served { span: LayerSpan::new(a, b).expect("span"), throughput }
    }

    #[test]
    fn finds_gaps_and_fills_them() {
        let swarm = [served(0, 10, 100.0), served(20, 30, 100.0)];
        assert_eq!(gaps(30, &swarm), vec![LayerSpan::new(10, 20).expect("span")]);
        assert_eq!(weakest_window(30, 10, &swarm), LayerSpan::new(10, 20).expect("span"));
        assert_eq!(gaps(30, &[served(0, 30, 1.0)]), vec![]);
        assert_eq!(gaps(5, &[]), vec![LayerSpan::new(0, 5).expect("span")]);
    }

    #[test]
    fn prefers_the_thinnest_coverage() {
        let swarm = [served(0, 15, 50.0), served(15, 30, 200.0), served(0, 30, 10.0)];
        let cover = coverage(30, &swarm);
        assert_eq!(cover[0], 60.0);
        assert_eq!(cover[29], 210.0);
        assert_eq!(weakest_window(30, 15, &swarm), LayerSpan::new(0, 15).expect("span"));
        assert_eq!(node_counts(30, &swarm)[14], 2);
        // A window larger than the model is clamped to the model.
        assert_eq!(weakest_window(30, 99, &swarm), LayerSpan::new(0, 30).expect("span"));
    }
}
