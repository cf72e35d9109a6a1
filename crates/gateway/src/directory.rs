//! What the gateway knows about the swarm: each node's latest info, how
//! fast it answered, which nodes are banned for a while after failing, and
//! which are busy for a moment. Busy is load, never failure: a busy node is
//! skipped until its retry hint passes, and nothing counts against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_core::ModelId;
use hotpot_net::{NetEvent, Network, PeerId, model_topic, node_id_of};
use hotpot_verify::Reputation;
use hotpot_wire::NodeInfo;

/// A node as last heard of.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    pub peer: PeerId,
    pub info: NodeInfo,
    pub seen: Instant,
    /// Round trip of the last info request, when we made one.
    pub rtt: Option<Duration>,
    /// Our connection to it closed and none has opened since: not routed
    /// to until it is heard of again.
    pub disconnected: bool,
}

#[derive(Debug, Clone, Copy)]
struct Ban {
    until: Instant,
    strikes: u32,
}

/// First ban, doubled at each new failure up to [`MAX_BAN`].
const FIRST_BAN: Duration = Duration::from_secs(2);
const MAX_BAN: Duration = Duration::from_secs(300);
/// Nodes not heard of for this long are not routed to (heartbeats come
/// every 10 s).
const STALE: Duration = Duration::from_secs(25);
/// Least time between two direct searches of the swarm.
const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// Bounds on how long a node's `Busy` keeps it out of routing.
const BUSY_MIN: Duration = Duration::from_millis(50);
const BUSY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Directory {
    nodes: HashMap<PeerId, NodeRecord>,
    bans: HashMap<PeerId, Ban>,
    /// Nodes that answered `Busy`, until when.
    busy: HashMap<PeerId, Instant>,
    /// Audit history per node (feeds routing and the audit rate).
    reputations: HashMap<PeerId, Reputation>,
}

impl Directory {
    /// Records `info` from `peer`, unless it claims to be another node.
    pub fn update(&mut self, peer: PeerId, info: NodeInfo, rtt: Option<Duration>) -> bool {
        if node_id_of(&peer) != Some(info.node) {
            tracing::warn!(%peer, "ignoring node info signed for another node id");
            return false;
        }
        // A heartbeat relayed by others does not prove we can reach the
        // node; a direct answer (`rtt`) or a new connection does.
        let disconnected = rtt.is_none() && self.nodes.get(&peer).is_some_and(|r| r.disconnected);
        let rtt = rtt.or_else(|| self.nodes.get(&peer).and_then(|r| r.rtt));
        self.nodes.insert(peer, NodeRecord { peer, info, seen: Instant::now(), rtt, disconnected });
        true
    }

    /// Bans `peer` with exponential backoff; returns how long.
    /// What `peer` last said about itself.
    pub fn info(&self, peer: &PeerId) -> Option<NodeInfo> {
        self.nodes.get(peer).map(|r| r.info.clone())
    }

    pub fn ban(&mut self, peer: PeerId) -> Duration {
        let strikes = self.bans.get(&peer).map_or(0, |b| b.strikes + 1);
        let length = FIRST_BAN.saturating_mul(1 << strikes.min(16)).min(MAX_BAN);
        self.bans.insert(peer, Ban { until: Instant::now() + length, strikes });
        length
    }

    /// `peer` did its work: its failures are forgiven (the next one bans
    /// it for the shortest time again).
    pub fn succeeded(&mut self, peer: &PeerId) {
        if self.bans.get(peer).is_some_and(|b| b.until <= Instant::now()) {
            self.bans.remove(peer);
        }
    }

    /// `peer` answered `Busy`: skip it for `retry_after` (bounded).
    pub fn mark_busy(&mut self, peer: PeerId, retry_after: Duration) {
        let until = Instant::now() + retry_after.clamp(BUSY_MIN, BUSY_MAX);
        let entry = self.busy.entry(peer).or_insert(until);
        *entry = (*entry).max(until);
    }

    pub fn is_busy(&self, peer: &PeerId) -> bool {
        self.busy.get(peer).is_some_and(|&until| until > Instant::now())
    }

    /// When the earliest busy mark among `model`'s fresh nodes ends.
    pub fn busy_ends(&self, model: &ModelId) -> Option<tokio::time::Instant> {
        let now = Instant::now();
        self.fresh(model).filter_map(|r| self.busy.get(&r.peer).copied().filter(|&u| u > now)).min().map(tokio::time::Instant::from_std)
    }

    fn fresh<'a>(&'a self, model: &'a ModelId) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        self.nodes.values().filter(move |r| &r.info.model == model && r.seen.elapsed() < STALE)
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.bans.get(peer).is_some_and(|b| b.until > Instant::now()) || self.reputations.get(peer).is_some_and(|r| r.cheat)
    }

    /// The audit history of `peer`.
    pub fn reputation(&mut self, peer: PeerId) -> &mut Reputation {
        self.reputations.entry(peer).or_default()
    }

    /// Bans `peer` from routing for good: it was proven to cheat.
    pub fn mark_cheat(&mut self, peer: PeerId) {
        self.reputation(peer).cheat = true;
    }

    /// How much more a route through `peer` costs because of failed audits.
    pub fn penalty(&self, peer: &PeerId) -> f64 {
        self.reputations.get(peer).map_or(1.0, Reputation::penalty)
    }

    /// When the earliest ban ends among the banned nodes of `model` that
    /// would serve part of `blocks` (none: no banned node would help).
    pub fn ban_ends_covering(&self, model: &ModelId, blocks: &[hotpot_core::LayerSpan]) -> Option<tokio::time::Instant> {
        self.fresh(model)
            .filter(|r| blocks.iter().any(|b| r.info.span.start() < b.end() && b.start() < r.info.span.end()))
            .filter_map(|r| self.bans.get(&r.peer).filter(|b| b.until > Instant::now()).map(|b| b.until))
            .min()
            .map(tokio::time::Instant::from_std)
    }

    /// Fresh, connected, unbanned nodes serving `model`, busy or not.
    pub fn usable(&self, model: &ModelId) -> Vec<NodeRecord> {
        self.fresh(model).filter(|r| !r.disconnected && !self.is_banned(&r.peer)).cloned().collect()
    }

    /// Our last connection to `peer` closed (or a new one opened).
    pub fn set_connected(&mut self, peer: &PeerId, connected: bool) {
        if let Some(record) = self.nodes.get_mut(peer) {
            record.disconnected = !connected;
        }
        if !connected {
            self.busy.remove(peer);
        }
    }

    /// Nodes of any model heard of within the heartbeat expiry, banned or
    /// not (what the swarm view shows).
    pub fn live(&self) -> Vec<NodeRecord> {
        self.nodes.values().filter(|r| r.seen.elapsed() < STALE).cloned().collect()
    }

    /// Every node heard of, banned or not.
    pub fn all(&self) -> Vec<NodeRecord> {
        self.nodes.values().cloned().collect()
    }
}

/// A directory kept up to date from the model's heartbeats.
#[derive(Debug, Clone)]
pub struct SharedDirectory {
    inner: Arc<Mutex<Directory>>,
    /// When the swarm was last asked directly: one search at a time, and
    /// none again within [`REFRESH_EVERY`] (a DHT search costs CPU).
    refreshed: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// Woken when a session closes somewhere (a slot may have freed).
    freed: Arc<tokio::sync::Notify>,
}

impl SharedDirectory {
    /// Subscribes to `model`'s heartbeats on `network` and records them.
    pub async fn follow(network: &Network, model: ModelId) -> Self {
        let directory = Self {
            inner: Arc::new(Mutex::new(Directory::default())),
            refreshed: Arc::new(tokio::sync::Mutex::new(None)),
            freed: Arc::new(tokio::sync::Notify::new()),
        };
        let mut events = network.events();
        let topic = model_topic(&model);
        let _ = network.subscribe(topic.clone()).await;
        let shared = directory.clone();
        let net = network.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NetEvent::Gossip { topic: t, source: Some(source), data }) if t == topic => {
                        if let Ok(info) = NodeInfo::decode(&data) {
                            let addrs = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                            if shared.with(|d| d.update(source, info, None)) {
                                let _ = net.add_addresses(source, addrs).await;
                            }
                        }
                    }
                    // A node whose connection closed leaves routing at once;
                    // a new connection, its next heartbeat or a refresh
                    // brings it back.
                    Ok(NetEvent::Disconnected(peer)) => {
                        if shared.with(|d| d.nodes.contains_key(&peer)) {
                            tracing::info!(%peer, "a node's connection closed; it leaves routing until heard of again");
                            shared.with(|d| d.set_connected(&peer, false));
                        }
                    }
                    Ok(NetEvent::Connected(peer)) => shared.with(|d| d.set_connected(&peer, true)),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        directory
    }

    /// A session closed: wake one request waiting for capacity.
    pub fn session_closed(&self) {
        self.freed.notify_one();
    }

    /// What requests waiting for capacity wait on.
    pub fn freed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.freed)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Directory) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks the swarm directly (DHT providers and known peers), timing each
    /// answer, and records what it hears. A search that started after this
    /// call is its answer; otherwise the next search waits until
    /// [`REFRESH_EVERY`] after the last one (a request that finds blocks
    /// missing right after another search still gets a fresh one, and a
    /// flood of them costs one search per period).
    pub async fn refresh(&self, network: &Network, model: &ModelId, n_blocks: u32, timeout: Duration) {
        let asked = Instant::now();
        let mut last = self.refreshed.lock().await;
        if last.is_some_and(|t| t >= asked) {
            return;
        }
        if let Some(next) = last.map(|t| t + REFRESH_EVERY)
            && next > Instant::now()
        {
            tokio::time::sleep_until(next.into()).await;
        }
        let started = Instant::now();
        *last = Some(started);
        let found = network.discover(Some(model), n_blocks, timeout).await;
        let rtt = started.elapsed() / 4;
        self.with(|d| {
            for (peer, info) in found {
                d.update(peer, info, Some(rtt));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotpot_core::{LayerSpan, NodeKey};

    fn info(key: &NodeKey) -> NodeInfo {
        NodeInfo {
            node: key.id(),
            model: ModelId::from_bytes([1; 32]),
            model_name: "m".into(),
            n_blocks: 30,
            span: LayerSpan::new(0, 10).expect("span"),
            throughput: 100.0,
            free_slots: 4,
            max_sessions: 4,
            queue: 0,
            price_per_1k: 0,
            version: "0".into(),
            addrs: vec![],
            timestamp_ms: 0,
            features: 0,
            wallet: None,
        }
    }

    #[test]
    fn bans_back_off_exponentially() {
        let mut d = Directory::default();
        let key = NodeKey::generate();
        let peer = hotpot_net::peer_id_of(&key.id()).expect("peer");
        assert!(d.update(peer, info(&key), None));
        assert_eq!(d.usable(&ModelId::from_bytes([1; 32])).len(), 1);
        assert_eq!(d.ban(peer), Duration::from_secs(2));
        assert_eq!(d.ban(peer), Duration::from_secs(4));
        assert_eq!(d.ban(peer), Duration::from_secs(8));
        assert!(d.is_banned(&peer));
        assert!(d.usable(&ModelId::from_bytes([1; 32])).is_empty());
        // A ban still running is not lifted by a success…
        d.succeeded(&peer);
        assert!(d.is_banned(&peer));
        // …but once it ran out, a success forgives the strikes.
        d.bans.get_mut(&peer).expect("banned").until = Instant::now();
        d.succeeded(&peer);
        assert_eq!(d.ban(peer), Duration::from_secs(2));
    }

    #[test]
    fn busy_is_not_a_ban() {
        let mut d = Directory::default();
        let key = NodeKey::generate();
        let peer = hotpot_net::peer_id_of(&key.id()).expect("peer");
        d.update(peer, info(&key), None);
        d.mark_busy(peer, Duration::from_millis(200));
        assert!(d.is_busy(&peer) && !d.is_banned(&peer));
        assert_eq!(d.usable(&ModelId::from_bytes([1; 32])).len(), 1);
        assert!(d.busy_ends(&ModelId::from_bytes([1; 32])).is_some());
        d.mark_busy(peer, Duration::from_secs(3600));
        let left = d.busy_ends(&ModelId::from_bytes([1; 32])).expect("busy").duration_since(tokio::time::Instant::now());
        assert!(left <= BUSY_MAX, "a retry hint is bounded: {left:?}");
    }

    #[test]
    fn cheats_stay_banned_and_failures_cost() {
        let mut d = Directory::default();
        let key = NodeKey::generate();
        let peer = hotpot_net::peer_id_of(&key.id()).expect("peer");
        d.update(peer, info(&key), None);
        assert_eq!(d.penalty(&peer), 1.0);
        d.reputation(peer).failed_audits = 2;
        assert_eq!(d.penalty(&peer), 3.0);
        d.mark_cheat(peer);
        assert!(d.is_banned(&peer) && d.usable(&ModelId::from_bytes([1; 32])).is_empty());
    }

    #[test]
    fn refuses_info_about_another_node() {
        let mut d = Directory::default();
        let (key, other) = (NodeKey::generate(), NodeKey::generate());
        let peer = hotpot_net::peer_id_of(&key.id()).expect("peer");
        assert!(!d.update(peer, info(&other), None));
        assert!(d.all().is_empty());
    }
}
