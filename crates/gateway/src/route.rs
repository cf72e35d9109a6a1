//! Route planning: the cheapest chain of nodes that covers a range of
//! blocks. Each node can run any part of its span; the cost of a hop is its
//! round trip, plus the compute time of the blocks it runs, plus a penalty
//! for its queue. Shortest path over block boundaries (Dijkstra).

use std::time::Duration;

use hotpot_core::LayerSpan;
use hotpot_core::placement::{Served, gaps};
use hotpot_net::PeerId;

/// A node the planner may use.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub peer: PeerId,
    pub span: LayerSpan,
    /// Decode tokens/s over its whole span.
    pub throughput: f32,
    pub queue: u32,
    pub rtt: Duration,
    /// Cost multiplier from the node's audit history (1: clean).
    pub penalty: f64,
}

/// One hop of a route: `peer` runs blocks `span`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub peer: PeerId,
    pub span: LayerSpan,
}

/// Blocks no usable node serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no node serves blocks {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
pub struct MissingBlocks(pub Vec<LayerSpan>);

/// Assumed round trip when none was measured.
const DEFAULT_RTT: Duration = Duration::from_millis(2);

fn hop_cost(c: &Candidate, blocks: u32) -> f64 {
    let per_block = 1.0 / (f64::from(c.throughput.max(1e-3)) * f64::from(c.span.len()));
    let compute = per_block * f64::from(blocks);
    let rtt = if c.rtt.is_zero() { DEFAULT_RTT } else { c.rtt }.as_secs_f64();
    (rtt + compute * (1.0 + f64::from(c.queue))) * c.penalty.max(1.0)
}

/// The cheapest chain of hops covering `range` exactly, in order.
pub fn plan(range: LayerSpan, candidates: &[Candidate]) -> Result<Vec<Hop>, MissingBlocks> {
    let (start, end) = (range.start(), range.end());
    let n = (end - start) as usize;
    let mut best = vec![f64::INFINITY; n + 1];
    let mut came_from: Vec<Option<(usize, Hop)>> = vec![None; n + 1];
    let mut done = vec![false; n + 1];
    best[0] = 0.0;
    // Dense Dijkstra: the graph has at most a few hundred vertices.
    for _ in 0..=n {
        let Some(u) = (0..=n).filter(|&i| !done[i] && best[i].is_finite()).min_by(|&a, &b| best[a].total_cmp(&best[b])) else {
            break;
        };
        done[u] = true;
        let at = start + u as u32;
        for c in candidates {
            if !c.span.contains(at) {
                continue;
            }
            for stop in (at + 1)..=c.span.end().min(end) {
                let v = (stop - start) as usize;
                let cost = best[u] + hop_cost(c, stop - at);
                if cost < best[v] {
                    best[v] = cost;
                    came_from[v] = Some((u, Hop { peer: c.peer, span: LayerSpan::new(at, stop).expect("non-empty") }));
                }
            }
        }
    }
    if !best[n].is_finite() {
        let served: Vec<Served> = candidates
            .iter()
            .filter_map(|c| {
                let (a, b) = (c.span.start().max(start), c.span.end().min(end));
                LayerSpan::new(a - start, b - start).ok().map(|span| Served { span, throughput: c.throughput })
            })
            .collect();
        let missing = gaps(end - start, &served).into_iter().map(|g| LayerSpan::new(g.start() + start, g.end() + start).expect("non-empty")).collect();
        return Err(MissingBlocks(missing));
    }
    let mut hops = Vec::new();
    let mut v = n;
    while let Some((u, hop)) = came_from[v] {
        hops.push(hop);
        v = u;
    }
    hops.reverse();
    Ok(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(peer: PeerId, a: u32, b: u32, throughput: f32) -> Candidate {
        Candidate { peer, span: LayerSpan::new(a, b).expect("span"), throughput, queue: 0, rtt: Duration::from_millis(1), penalty: 1.0 }
    }

    fn span(a: u32, b: u32) -> LayerSpan {
        LayerSpan::new(a, b).expect("span")
    }

    #[test]
    fn chains_three_nodes() {
        let (x, y, z) = (PeerId::random(), PeerId::random(), PeerId::random());
        let route = plan(span(0, 30), &[c(z, 20, 30, 100.0), c(x, 0, 10, 100.0), c(y, 10, 20, 100.0)]).expect("covered");
        assert_eq!(route, vec![Hop { peer: x, span: span(0, 10) }, Hop { peer: y, span: span(10, 20) }, Hop { peer: z, span: span(20, 30) }]);
    }

    #[test]
    fn prefers_fewer_faster_hops() {
        let (whole, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let route = plan(span(0, 30), &[c(a, 0, 15, 100.0), c(b, 15, 30, 100.0), c(whole, 0, 30, 100.0)]).expect("covered");
        assert_eq!(route, vec![Hop { peer: whole, span: span(0, 30) }]);
    }

    #[test]
    fn uses_parts_of_overlapping_spans() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let route = plan(span(10, 20), &[c(a, 0, 15, 100.0), c(b, 12, 30, 100.0)]).expect("covered");
        assert_eq!(route.first().map(|h| h.span.start()), Some(10));
        assert_eq!(route.last().map(|h| h.span.end()), Some(20));
        assert!(route.windows(2).all(|w| w[0].span.end() == w[1].span.start()));
    }

    #[test]
    fn failed_audits_push_routes_elsewhere() {
        let (doubtful, clean) = (PeerId::random(), PeerId::random());
        let mut suspect = c(doubtful, 0, 30, 120.0);
        suspect.penalty = 3.0;
        let route = plan(span(0, 30), &[suspect, c(clean, 0, 30, 100.0)]).expect("covered");
        assert_eq!(route[0].peer, clean);
    }

    #[test]
    fn names_the_missing_blocks() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let err = plan(span(0, 30), &[c(a, 0, 10, 1.0), c(b, 20, 30, 1.0)]).expect_err("gap");
        assert_eq!(err, MissingBlocks(vec![span(10, 20)]));
        assert_eq!(err.to_string(), "no node serves blocks 10..20");
        assert_eq!(plan(span(0, 5), &[]).expect_err("empty").0, vec![span(0, 5)]);
    }
}
