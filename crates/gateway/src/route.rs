//! Route planning: the cheapest chain of nodes that covers a range of
//! blocks. Each node can run any part of its span; the cost of a hop is its
//! round trip, plus the compute time of the blocks it runs, plus a penalty
//! for its queue, plus its price weighed as time ([`SECONDS_PER_CREDIT`]).
//! Shortest path over block boundaries (Dijkstra). A route capped in price
//! ([`plan_within`]) that the fastest route exceeds is planned again by
//! price alone.

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
    /// What the node asks per 1,000 positions (micro-credits).
    pub price_per_1k: u64,
}

/// How much one credit per 1,000 positions weighs in a route's cost, in
/// seconds per token: a node that asks one credit more must be a
/// millisecond per token faster to be chosen.
pub const SECONDS_PER_CREDIT: f64 = 1e-3;

/// The cheapest route within a price cap costs more than the cap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cheapest route costs {cheapest} credits per 1,000 positions, above the cap of {cap}")]
pub struct OverPrice {
    pub cheapest: hotpot_core::Credits,
    pub cap: hotpot_core::Credits,
}

/// Why no route was planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    #[error(transparent)]
    Missing(#[from] MissingBlocks),
    #[error(transparent)]
    OverPrice(#[from] OverPrice),
}

/// What the nodes of `route` ask together per 1,000 positions (each node
/// is paid its price once, whatever part of its span it runs).
pub fn route_price(route: &[Hop], candidates: &[Candidate]) -> u64 {
    route.iter().filter_map(|h| candidates.iter().find(|c| c.peer == h.peer)).map(|c| c.price_per_1k).fold(0, u64::saturating_add)
}

/// [`plan`], with the route's price capped at `cap` micro-credits per
/// 1,000 positions: nodes dearer than the cap alone are left out, and a
/// fastest route over the cap gives way to the cheapest one.
pub fn plan_within(range: LayerSpan, candidates: &[Candidate], cap: Option<u64>) -> Result<Vec<Hop>, NoRoute> {
    let Some(cap) = cap else { return Ok(plan(range, candidates)?) };
    let affordable: Vec<Candidate> = candidates.iter().filter(|c| c.price_per_1k <= cap).cloned().collect();
    let fastest = plan(range, &affordable)?;
    if route_price(&fastest, &affordable) <= cap {
        return Ok(fastest);
    }
    let cheapest = plan_by(range, &affordable, |c, blocks| c.price_per_1k as f64 + 1e-6 * hop_cost(c, blocks))?;
    let price = route_price(&cheapest, &affordable);
    if price <= cap {
        Ok(cheapest)
    } else {
        Err(OverPrice { cheapest: hotpot_core::Credits::from_micros(price), cap: hotpot_core::Credits::from_micros(cap) }.into())
    }
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
    let price = c.price_per_1k as f64 / hotpot_core::MICROS_PER_CREDIT as f64 * SECONDS_PER_CREDIT;
    (rtt + compute * (1.0 + f64::from(c.queue)) + price) * c.penalty.max(1.0)
}

/// The cheapest chain of hops covering `range` exactly, in order.
pub fn plan(range: LayerSpan, candidates: &[Candidate]) -> Result<Vec<Hop>, MissingBlocks> {
    plan_by(range, candidates, hop_cost)
}

/// The chain of hops covering `range` of least total `cost(candidate, blocks)`.
fn plan_by(range: LayerSpan, candidates: &[Candidate], cost: impl Fn(&Candidate, u32) -> f64) -> Result<Vec<Hop>, MissingBlocks> {
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
                let cost = best[u] + cost(c, stop - at);
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
        Candidate { peer, span: LayerSpan::new(a, b).expect("span"), throughput, queue: 0, rtt: Duration::from_millis(1), penalty: 1.0, price_per_1k: 0 }
    }

    #[test]
    fn price_weighs_and_caps() {
        let (fast, cheap) = (PeerId::random(), PeerId::random());
        let mut dear = c(fast, 0, 30, 100.0);
        dear.price_per_1k = 3_000_000;
        let mut thrifty = c(cheap, 0, 30, 80.0);
        thrifty.price_per_1k = 1_000_000;
        // 100 vs 80 tok/s is 2.5 ms a token: worth more than 2 credits.
        assert_eq!(plan(span(0, 30), &[dear.clone(), thrifty.clone()]).expect("covered")[0].peer, fast);
        // Capped at 2 credits, the dear node is out.
        assert_eq!(plan_within(span(0, 30), &[dear.clone(), thrifty.clone()], Some(2_000_000)).expect("within")[0].peer, cheap);
        let over = plan_within(span(0, 30), &[dear, thrifty], Some(500_000)).expect_err("too cheap a cap");
        assert!(matches!(over, NoRoute::Missing(_)), "no node fits a cap below every price: {over:?}");
        // Two cheap halves together over the cap; a dearer whole one under it.
        let (a, b, whole) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut halves = [c(a, 0, 15, 1000.0), c(b, 15, 30, 1000.0)];
        halves.iter_mut().for_each(|h| h.price_per_1k = 1_500_000);
        let mut one = c(whole, 0, 30, 10.0);
        one.price_per_1k = 2_000_000;
        let candidates = [halves[0].clone(), halves[1].clone(), one];
        assert_eq!(plan(span(0, 30), &candidates).expect("covered").len(), 2, "the fast halves");
        let capped = plan_within(span(0, 30), &candidates, Some(2_500_000)).expect("the whole node fits");
        assert_eq!(capped, vec![Hop { peer: whole, span: span(0, 30) }]);
        assert_eq!(route_price(&capped, &candidates), 2_000_000);
        let err = plan_within(span(0, 30), &candidates, Some(1_900_000)).expect_err("over");
        assert!(matches!(err, NoRoute::OverPrice(OverPrice { .. })), "{err:?}");
        assert_eq!(err.to_string(), "the cheapest route costs 3 credits per 1,000 positions, above the cap of 1.9");
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
