//! The swarm as this gateway sees it, for people and for programs:
//! `GET /v1/hotpot/swarm` (JSON, documented in the README) and the
//! dashboard at `/` (one static page embedded in the binary, no CDN) that
//! polls it every second and draws it.
//!
//! What it shows comes from what the gateway already keeps: the directory
//! (each node's latest info, bans, busy marks, audit reputation), the chain
//! (stakes) and the books (what each node earned), plus [`Activity`]: the
//! recent routes, audits and convictions and the tokens streamed, kept in
//! small rings here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use hotpot_core::placement::{Served, gaps, node_counts};
use hotpot_core::{LayerSpan, NodeId};
use hotpot_net::PeerId;
use serde::Serialize;

use crate::session::SessionRecord;

/// The page served at `/`.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// Routes, audits and convictions kept for the view (the latest of each).
const ROUTES_KEPT: usize = 20;
const AUDITS_KEPT: usize = 50;
const CONVICTIONS_KEPT: usize = 200;
/// Tokens per second are averaged over this many whole seconds.
const RATE_WINDOW_S: u64 = 10;
/// Minutes of traffic history kept (tokens and sessions per minute).
const HISTORY_MINUTES: u64 = 60;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One hop of a route: the node and the blocks it ran.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub peer: Option<String>,
    pub span: [u32; 2],
    pub positions: usize,
}

/// A session's route through the swarm.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub started_ms: u64,
    pub model_name: String,
    pub hops: Vec<Hop>,
    pub tokens: usize,
    pub failovers: usize,
    /// How it ended: "stop", "length", "error: …".
    pub finish: String,
}

/// One first audit of a node's session.
#[derive(Debug, Clone, Serialize)]
pub struct AuditView {
    pub time_ms: u64,
    pub node_peer: String,
    pub node: NodeId,
    pub span: [u32; 2],
    /// "passed", "failed" (not confirmed by re-audits) or "cheat".
    pub verdict: &'static str,
}

/// A node this gateway holds convicted.
#[derive(Debug, Clone, Serialize)]
pub struct ConvictionView {
    pub time_ms: u64,
    pub node_peer: String,
    pub node: NodeId,
    pub span: [u32; 2],
    /// "own audit", "confirmed accusation" or "earlier run".
    pub how: &'static str,
    /// Where the evidence file can be fetched (`/v1/hotpot/evidence/…`),
    /// when it was written.
    pub evidence: Option<String>,
}

#[derive(Default)]
struct Inner {
    /// Tokens streamed per whole second (Unix seconds), the last minute.
    tokens: VecDeque<(u64, u64)>,
    tokens_total: u64,
    sessions_total: u64,
    running: u64,
    /// Per Unix minute (newest first), the last hour.
    minutes: VecDeque<Minute>,
    routes: VecDeque<RouteView>,
    audits: VecDeque<AuditView>,
    convictions: VecDeque<ConvictionView>,
}

/// What the gateway did recently, for the view.
#[derive(Default)]
pub struct Activity {
    inner: std::sync::Arc<Mutex<Inner>>,
}

/// Traffic in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// The minute's start, milliseconds since the Unix epoch.
    pub minute_ms: u64,
    /// Tokens streamed, and sessions started, in that minute.
    pub tokens: u64,
    pub sessions: u64,
}

impl Inner {
    /// The current minute's entry.
    fn minute(&mut self) -> &mut Minute {
        let minute_ms = now_ms() / 60_000 * 60_000;
        if self.minutes.front().is_none_or(|m| m.minute_ms != minute_ms) {
            push(&mut self.minutes, Minute { minute_ms, ..Minute::default() }, HISTORY_MINUTES as usize);
        }
        &mut self.minutes[0]
    }

    /// Every minute of the last hour, oldest first, the current one last
    /// (minutes without traffic as zeros).
    fn history(&self) -> Vec<Minute> {
        let current = now_ms() / 60_000;
        (current + 1 - HISTORY_MINUTES..=current)
            .map(|m| {
                let minute_ms = m * 60_000;
                self.minutes.iter().find(|x| x.minute_ms == minute_ms).copied().unwrap_or(Minute { minute_ms, ..Minute::default() })
            })
            .collect()
    }
}

fn push<T>(ring: &mut VecDeque<T>, item: T, keep: usize) {
    ring.push_front(item);
    ring.truncate(keep);
}

fn span(s: LayerSpan) -> [u32; 2] {
    [s.start(), s.end()]
}

/// Counts a session as running until dropped.
pub struct Running(std::sync::Weak<Mutex<Inner>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            let mut inner = lock(&inner);
            inner.running = inner.running.saturating_sub(1);
        }
    }
}

impl Activity {
    /// `n` tokens streamed now.
    pub fn tokens(&self, n: u64) {
        let second = now_ms() / 1000;
        let mut inner = lock(&self.inner);
        inner.tokens_total += n;
        inner.minute().tokens += n;
        match inner.tokens.front_mut() {
            Some((s, count)) if *s == second => *count += n,
            _ => push(&mut inner.tokens, (second, n), 60),
        }
    }

    /// Tokens per second over the last whole seconds.
    pub fn tokens_per_s(&self) -> f64 {
        let now = now_ms() / 1000;
        let inner = lock(&self.inner);
        let sum: u64 = inner.tokens.iter().filter(|(s, _)| *s < now && now - s <= RATE_WINDOW_S).map(|(_, n)| n).sum();
        sum as f64 / RATE_WINDOW_S as f64
    }

    /// A session starts; it counts as running until the guard drops.
    pub fn session(&self) -> Running {
        let mut inner = lock(&self.inner);
        inner.running += 1;
        inner.sessions_total += 1;
        inner.minute().sessions += 1;
        Running(std::sync::Arc::downgrade(&self.inner))
    }

    /// A session ended: its route is kept.
    pub fn route(&self, record: &SessionRecord) {
        let finish = match &record.finish {
            crate::session::Finish::Error(message) => format!("error: {message}"),
            other => format!("{other:?}").to_lowercase(),
        };
        let view = RouteView {
            started_ms: record.started_ms,
            model_name: record.model.clone(),
            hops: record.route.iter().map(|s| Hop { peer: s.peer.clone(), span: span(s.span), positions: s.positions }).collect(),
            tokens: record.completion_tokens,
            failovers: record.failovers,
            finish,
        };
        push(&mut lock(&self.inner).routes, view, ROUTES_KEPT);
    }

    /// A first audit of `peer`'s session on `blocks` found `verdict`.
    pub fn audit(&self, peer: &PeerId, node: NodeId, blocks: LayerSpan, verdict: &'static str) {
        let view = AuditView { time_ms: now_ms(), node_peer: peer.to_string(), node, span: span(blocks), verdict };
        push(&mut lock(&self.inner).audits, view, AUDITS_KEPT);
    }

    /// `peer` is held convicted; `evidence` is the evidence file's name in
    /// the evidence directory, when written.
    pub fn conviction(&self, peer: &PeerId, node: NodeId, blocks: LayerSpan, how: &'static str, evidence: Option<String>) {
        let mut inner = lock(&self.inner);
        let peer = peer.to_string();
        if inner.convictions.iter().any(|c| c.node_peer == peer) {
            return;
        }
        let view = ConvictionView {
            time_ms: now_ms(),
            node_peer: peer,
            node,
            span: span(blocks),
            how,
            evidence: evidence.map(|name| format!("/v1/hotpot/evidence/{name}")),
        };
        push(&mut inner.convictions, view, CONVICTIONS_KEPT);
    }

    fn snapshot(&self) -> (Traffic, Vec<RouteView>, Vec<AuditView>, Vec<ConvictionView>) {
        let rate = self.tokens_per_s();
        let inner = lock(&self.inner);
        let traffic = Traffic {
            tokens_per_s: rate,
            tokens_total: inner.tokens_total,
            sessions_total: inner.sessions_total,
            sessions_running: inner.running,
            history: inner.history(),
        };
        (traffic, inner.routes.iter().cloned().collect(), inner.audits.iter().cloned().collect(), inner.convictions.iter().cloned().collect())
    }
}

/// Live traffic through this gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    /// Tokens streamed per second, over the last 10 whole seconds.
    pub tokens_per_s: f64,
    pub tokens_total: u64,
    /// Sessions (one per prompt and choice) started, and running now.
    pub sessions_total: u64,
    pub sessions_running: u64,
    /// Tokens and sessions per minute, the last hour, oldest first.
    pub history: Vec<Minute>,
}

/// A model as the swarm serves it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    pub id: String,
    pub name: String,
    pub n_blocks: u32,
    /// How many live nodes serve each block.
    pub coverage: Vec<u32>,
    /// Block ranges no live node serves, as [start, end).
    pub gaps: Vec<[u32; 2]>,
}

/// A node as this gateway sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub peer: String,
    pub node: NodeId,
    pub model: String,
    pub model_name: String,
    pub span: [u32; 2],
    /// "ok", "busy", "banned", "disconnected" or "convicted".
    pub state: &'static str,
    /// How this gateway reaches it: "direct", "relayed" (only through a
    /// relay) or "not connected".
    pub route: &'static str,
    /// "private" (it listens through a relay: behind NAT) or "public".
    pub reachability: &'static str,
    pub throughput: f32,
    /// Sessions open on it, of `max_sessions`.
    pub sessions: u32,
    pub max_sessions: u32,
    pub queue: u32,
    /// Credits per 1,000 positions.
    pub price_per_1k: String,
    /// Credits at stake on the chain, when this gateway reads a chain.
    pub stake: Option<String>,
    /// Credits this gateway's books owe or paid it, when it keeps books.
    pub earned: Option<String>,
    pub audits: AuditCounts,
    pub convicted: bool,
    pub heard_ms_ago: u64,
    pub rtt_ms: Option<f64>,
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct AuditCounts {
    pub passed: u64,
    pub failed: u64,
}

/// The whole view (`GET /v1/hotpot/swarm`).
#[derive(Debug, Clone, Serialize)]
pub struct SwarmView {
    pub object: &'static str,
    pub time_ms: u64,
    pub gateway: GatewayView,
    pub models: Vec<ModelView>,
    pub nodes: Vec<NodeView>,
    pub routes: Vec<RouteView>,
    pub traffic: Traffic,
    pub audits: Vec<AuditView>,
    pub convictions: Vec<ConvictionView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayView {
    pub peer: String,
    pub version: &'static str,
}

/// What the view needs to know of each node beyond the directory.
pub struct NodeExtras {
    /// How this gateway reaches it now (none: no connection).
    pub route: Option<hotpot_net::Route>,
    pub stake: Option<String>,
    pub earned: Option<String>,
}

/// Builds the view of `directory`'s live nodes (heard of within the
/// heartbeat expiry), with `extras(peer)` for each.
pub fn view(gateway: &PeerId, directory: &crate::directory::SharedDirectory, activity: &Activity, mut extras: impl FnMut(&PeerId) -> NodeExtras) -> SwarmView {
    let rows = directory.with(|d| {
        d.live()
            .into_iter()
            .map(|r| {
                let reputation = d.reputation(r.peer).clone();
                let state = if reputation.cheat {
                    "convicted"
                } else if d.is_banned(&r.peer) {
                    "banned"
                } else if r.disconnected {
                    "disconnected"
                } else if d.is_busy(&r.peer) {
                    "busy"
                } else {
                    "ok"
                };
                (r, reputation, state)
            })
            .collect::<Vec<_>>()
    });
    // Each model, with the spans its live, unconvicted nodes serve.
    let mut models: Vec<(ModelView, Vec<Served>)> = Vec::new();
    let mut nodes = Vec::new();
    for (r, reputation, state) in rows {
        let i = &r.info;
        let model = i.model.to_string();
        if !models.iter().any(|(m, _)| m.id == model) {
            let view = ModelView { id: model.clone(), name: i.model_name.clone(), n_blocks: i.n_blocks, coverage: vec![], gaps: vec![] };
            models.push((view, Vec::new()));
        }
        if let Some((_, served)) = models.iter_mut().find(|(m, _)| m.id == model)
            && state != "convicted"
        {
            served.push(Served { span: i.span, throughput: i.throughput });
        }
        let extra = extras(&r.peer);
        nodes.push(NodeView {
            peer: r.peer.to_string(),
            node: i.node,
            model,
            model_name: i.model_name.clone(),
            span: span(i.span),
            state,
            route: extra.route.map_or("not connected", hotpot_net::Route::as_str),
            reachability: i.reachability(),
            throughput: i.throughput,
            sessions: i.max_sessions.saturating_sub(i.free_slots),
            max_sessions: i.max_sessions,
            queue: i.queue,
            price_per_1k: hotpot_core::Credits::from_micros(i.price_per_1k).to_string(),
            stake: extra.stake,
            earned: extra.earned,
            audits: AuditCounts { passed: reputation.audits.saturating_sub(reputation.failed_audits), failed: reputation.failed_audits },
            convicted: reputation.cheat,
            heard_ms_ago: r.seen.elapsed().as_millis() as u64,
            rtt_ms: r.rtt.map(|d| d.as_secs_f64() * 1000.0),
            addrs: i.addrs.clone(),
        });
    }
    let models = models
        .into_iter()
        .map(|(m, served)| ModelView { coverage: node_counts(m.n_blocks, &served), gaps: gaps(m.n_blocks, &served).into_iter().map(span).collect(), ..m })
        .collect();
    nodes.sort_by(|a, b| (a.model.as_str(), a.span, a.peer.as_str()).cmp(&(b.model.as_str(), b.span, b.peer.as_str())));
    let (traffic, routes, audits, convictions) = activity.snapshot();
    SwarmView {
        object: "hotpot.swarm",
        time_ms: now_ms(),
        gateway: GatewayView { peer: gateway.to_string(), version: env!("CARGO_PKG_VERSION") },
        models,
        nodes,
        routes,
        traffic,
        audits,
        convictions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_per_second_counts_whole_seconds_only() {
        let a = Activity::default();
        a.tokens(50);
        // The current second is not whole yet: not counted.
        assert_eq!(a.tokens_per_s(), 0.0);
        let mut inner = lock(&a.inner);
        let second = now_ms() / 1000;
        inner.tokens.push_back((second - 1, 30));
        inner.tokens.push_back((second - 30, 1_000));
        drop(inner);
        assert_eq!(a.tokens_per_s(), 3.0, "30 tokens a second ago, over 10 s; the one 30 s ago is out of the window");
        let guard = a.session();
        assert_eq!((a.snapshot().0.sessions_running, a.snapshot().0.sessions_total), (1, 1));
        drop(guard);
        assert_eq!((a.snapshot().0.sessions_running, a.snapshot().0.sessions_total), (0, 1));
    }

    #[test]
    fn history_has_every_minute_of_the_last_hour() {
        let a = Activity::default();
        a.tokens(7);
        let _guard = a.session();
        a.tokens(5);
        let mut inner = lock(&a.inner);
        let current = now_ms() / 60_000 * 60_000;
        // Twenty minutes ago, and two hours ago (past the hour: left out).
        inner.minutes.push_back(Minute { minute_ms: current - 20 * 60_000, tokens: 100, sessions: 2 });
        inner.minutes.push_back(Minute { minute_ms: current - 120 * 60_000, tokens: 9, sessions: 9 });
        drop(inner);
        let history = a.snapshot().0.history;
        assert_eq!(history.len(), 60);
        // A minute may turn between the calls above; what counts is that
        // the entries are whole minutes, in order, ending now.
        assert!(history.windows(2).all(|w| w[1].minute_ms == w[0].minute_ms + 60_000));
        assert!(history[59].minute_ms >= current);
        assert_eq!(history.iter().map(|m| m.tokens).sum::<u64>(), 112);
        assert_eq!(history.iter().map(|m| m.sessions).sum::<u64>(), 3);
        assert!(history.iter().any(|m| m.minute_ms == current - 20 * 60_000 && m.tokens == 100));
    }
}
