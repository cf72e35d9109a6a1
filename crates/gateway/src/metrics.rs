//! `GET /metrics`: what the gateway did, in Prometheus text format.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub peer: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub tokens_in: Counter,
    pub tokens_out: Counter,
    pub time_to_first_token: Histogram,
    pub token_latency: Histogram,
    pub failovers: Counter,
    /// `Busy` answers from nodes (load, never a ban).
    pub node_busy: Counter,
    /// Node failures that banned the node for a while.
    pub bans: Counter,
    /// Sessions this gateway holds open on nodes right now.
    pub node_sessions: Gauge,
    pub node_steps: Family<PeerLabels, Counter>,
    pub node_bytes_sent: Family<PeerLabels, Counter>,
    pub node_bytes_received: Family<PeerLabels, Counter>,
    pub key_tokens: Family<KeyLabels, Counter>,
    /// First audits of a node's session, by result.
    pub audits: Family<AuditLabels, Counter>,
    /// Nodes proven to cheat.
    pub cheats: Counter,
    /// Other gateways' accusations, by what this gateway's own check found.
    pub accusations: Family<ResultLabels, Counter>,
    /// Speculative decoding: tokens drafted, drafts kept, pipeline passes.
    pub drafted: Counter,
    pub draft_accepted: Counter,
    pub decode_passes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hotpot");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by endpoint and status", requests.clone());
        let tokens_in = Counter::default();
        registry.register("tokens_in", "prompt tokens processed", tokens_in.clone());
        let tokens_out = Counter::default();
        registry.register("tokens_out", "tokens generated", tokens_out.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("time_to_first_token_seconds", "time from request to first token", time_to_first_token.clone());
        let token_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("token_latency_seconds", "time between generated tokens", token_latency.clone());
        let failovers = Counter::default();
        registry.register("failovers", "node failures survived by rerouting", failovers.clone());
        let drafted = Counter::default();
        registry.register("draft_tokens", "tokens drafted for speculative decoding", drafted.clone());
        let draft_accepted = Counter::default();
        registry.register("draft_tokens_accepted", "drafted tokens the model confirmed", draft_accepted.clone());
        let decode_passes = Counter::default();
        registry.register("decode_passes", "passes through the pipeline of speculating sessions", decode_passes.clone());
        let node_busy = Counter::default();
        registry.register("node_busy", "Busy answers from nodes (load: the node is skipped for a moment, never banned)", node_busy.clone());
        let bans = Counter::default();
        registry.register("bans", "node failures that banned the node for a while", bans.clone());
        let node_sessions = Gauge::default();
        registry.register("node_sessions_open", "sessions this gateway holds on nodes", node_sessions.clone());
        let node_steps = Family::<PeerLabels, Counter>::default();
        registry.register("node_steps", "steps sent to each node", node_steps.clone());
        let node_bytes_sent = Family::<PeerLabels, Counter>::default();
        registry.register("node_bytes_sent", "hidden-state bytes sent to each node", node_bytes_sent.clone());
        let node_bytes_received = Family::<PeerLabels, Counter>::default();
        registry.register("node_bytes_received", "hidden-state bytes received from each node", node_bytes_received.clone());
        let key_tokens = Family::<KeyLabels, Counter>::default();
        registry.register("key_tokens", "tokens spent per API key (only with --metrics-per-key)", key_tokens.clone());
        let audits = Family::<AuditLabels, Counter>::default();
        registry.register("audits", "audits of node work, by the first audit's result", audits.clone());
        let cheats = Counter::default();
        registry.register("cheats", "nodes proven to cheat (banned, evidence stored)", cheats.clone());
        let accusations = Family::<ResultLabels, Counter>::default();
        registry.register("accusations", "other gateways' accusations, by this gateway's own finding", accusations.clone());
        Self {
            registry: Mutex::new(registry),
            requests,
            tokens_in,
            tokens_out,
            time_to_first_token,
            token_latency,
            failovers,
            node_busy,
            bans,
            node_sessions,
            node_steps,
            node_bytes_sent,
            node_bytes_received,
            key_tokens,
            audits,
            cheats,
            accusations,
            drafted,
            draft_accepted,
            decode_passes,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn record_traffic(&self, peer: &hotpot_net::PeerId, sent: usize, received: usize) {
        let labels = PeerLabels { peer: peer.to_string() };
        self.node_steps.get_or_create(&labels).inc();
        self.node_bytes_sent.get_or_create(&labels).inc_by(sent as u64);
        self.node_bytes_received.get_or_create(&labels).inc_by(received as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.requests.get_or_create(&RequestLabels { endpoint: "/v1/chat/completions".into(), status: 200 }).inc();
        m.tokens_out.inc_by(7);
        m.time_to_first_token.observe(0.02);
        m.node_sessions.set(3);
        let text = m.render();
        assert!(text.contains("hotpot_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("hotpot_tokens_out_total 7"), "{text}");
        assert!(text.contains("hotpot_time_to_first_token_seconds_count 1"), "{text}");
        assert!(text.contains("hotpot_node_sessions_open 3"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
