//! Node-to-node push: a pushed session's outputs go straight to the next
//! node of the chain (over `/hotpot/push/1`) instead of back through the
//! gateway, so a step crosses one network leg per stage instead of two.
//!
//! The gateway that opens a pushed session names, in its `Open`, the one
//! node allowed to forward steps into it (`upstream`) and the next node's
//! session (`downstream`). The session stays the gateway's: forwarded
//! steps run as the gateway's, and every output (with its signed
//! commitment) also answers the gateway's `Collect` on the session stream,
//! so the gateway checks every stage's commitment, keeps what audits and
//! failover replay need, and can fall back to sending steps itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotpot_core::SessionId;
use hotpot_net::{Framed, Multiaddr, Network, PeerId, peer_id_of};
use hotpot_wire::{ClientMessage, ErrorCode, NodeMessage, PROTOCOL_PUSH, PushLinks, Step};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::serve::{StreamLimits, admission};
use crate::worker::{Job, Jobs};

/// Outputs of forwarded steps waiting for the gateway's `Collect`, per
/// session (more means the gateway stopped collecting: the oldest go).
const WAITING_RESULTS: usize = 4;

/// Deadline to open the stream to the next node.
const LINK_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The pushed sessions open on this node.
pub(crate) struct PushTable {
    network: Network,
    write: Duration,
    entries: Mutex<HashMap<SessionId, Arc<PushEntry>>>,
}

/// One pushed session: who opened it, who may forward into it, where its
/// outputs go, and the outputs waiting for the opener.
pub(crate) struct PushEntry {
    owner: PeerId,
    upstream: Option<PeerId>,
    downstream: Option<Link>,
    results: mpsc::Sender<NodeMessage>,
    waiting: tokio::sync::Mutex<mpsc::Receiver<NodeMessage>>,
}

/// The stream to the next node's session, opened once.
struct Link {
    peer: PeerId,
    session: SessionId,
    addrs: Vec<Multiaddr>,
    framed: tokio::sync::Mutex<Option<Framed>>,
}

impl PushTable {
    pub fn new(network: Network, write: Duration) -> Arc<Self> {
        Arc::new(Self { network, write, entries: Mutex::default() })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<PushEntry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session `owner` opened with push `links`, and starts
    /// opening the stream to the next node (so the first step need not).
    pub fn register(self: &Arc<Self>, session: SessionId, owner: PeerId, links: &PushLinks) -> Result<(), String> {
        let upstream = match &links.upstream {
            Some(node) => Some(peer_id_of(node).ok_or("the upstream node id is not an ed25519 key")?),
            None => None,
        };
        let downstream = match &links.downstream {
            Some(d) => Some(Link {
                peer: peer_id_of(&d.node).ok_or("the downstream node id is not an ed25519 key")?,
                session: d.session,
                addrs: d.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                framed: tokio::sync::Mutex::default(),
            }),
            None => None,
        };
        let (results, waiting) = mpsc::channel(WAITING_RESULTS);
        let entry = Arc::new(PushEntry { owner, upstream, downstream, results, waiting: tokio::sync::Mutex::new(waiting) });
        self.entries().insert(session, Arc::clone(&entry));
        if entry.downstream.is_some() {
            let table = Arc::clone(self);
            tokio::spawn(async move {
                if let Some(link) = &entry.downstream {
                    let mut framed = link.framed.lock().await;
                    if framed.is_none() {
                        *framed = table.connect(link).await;
                    }
                }
            });
        }
        Ok(())
    }

    pub fn remove(&self, session: &SessionId) {
        self.entries().remove(session);
    }

    pub fn get(&self, session: &SessionId) -> Option<Arc<PushEntry>> {
        self.entries().get(session).cloned()
    }

    async fn connect(&self, link: &Link) -> Option<Framed> {
        if !link.addrs.is_empty() {
            let _ = self.network.add_addresses(link.peer, link.addrs.clone()).await;
        }
        match self.network.open_stream(link.peer, PROTOCOL_PUSH, LINK_OPEN_TIMEOUT).await {
            Ok(stream) => Some(Framed::new(link.peer, stream)),
            Err(e) => {
                tracing::warn!(peer = %link.peer, error = %e, "cannot open the push stream to the next node");
                None
            }
        }
    }

    /// Sends a computed output on to the next node (in the background: the
    /// answer to the gateway does not wait for it).
    pub fn forward(self: &Arc<Self>, entry: &Arc<PushEntry>, answer: &NodeMessage) {
        let (Some(_), NodeMessage::Output { hidden, commitment, .. }) = (&entry.downstream, answer) else { return };
        let (table, entry) = (Arc::clone(self), Arc::clone(entry));
        let (pos, hidden) = (commitment.start_pos, hidden.clone());
        tokio::spawn(async move {
            let Some(link) = &entry.downstream else { return };
            let step = ClientMessage::Step(Step { session: link.session, pos, hidden }).encode();
            let mut framed = link.framed.lock().await;
            if framed.is_none() {
                *framed = table.connect(link).await;
            }
            let Some(stream) = framed.as_mut() else { return };
            if let Err(e) = stream.send(&step, table.write).await {
                tracing::warn!(peer = %link.peer, error = %e, "cannot forward a step to the next node; the gateway will fall back");
                *framed = None;
            }
        });
    }
}

impl PushEntry {
    /// The output of the forwarded step at `pos` (or the refusal of it),
    /// once computed.
    pub async fn collect(&self, pos: u32, timeout: Duration) -> NodeMessage {
        let mut waiting = self.waiting.lock().await;
        let wait = async {
            loop {
                match waiting.recv().await {
                    // An output from before a rollback nobody collected.
                    Some(NodeMessage::Output { commitment, .. }) if commitment.start_pos < pos => continue,
                    Some(answer) => return answer,
                    None => return NodeMessage::error(ErrorCode::Internal, "the session ended"),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| NodeMessage::error(ErrorCode::UnknownSession, format!("no step at position {pos} was forwarded to this session in time")))
    }

    /// Keeps a forwarded step's answer for the gateway's `Collect`.
    fn keep(&self, answer: NodeMessage) {
        if let Err(mpsc::error::TrySendError::Full(answer)) = self.results.try_send(answer) {
            // Nobody collects: drop the oldest, keep the newest.
            if let Ok(mut waiting) = self.waiting.try_lock() {
                let _ = waiting.try_recv();
            }
            let _ = self.results.try_send(answer);
        }
    }
}

/// `/hotpot/push/1`: steps forwarded by the previous node of pushed
/// chains. A step is refused unless its session was opened here with push
/// links naming the sender as its upstream.
pub(crate) async fn serve_push(peer: PeerId, stream: hotpot_net::Stream, table: Arc<PushTable>, jobs: Jobs, limits: StreamLimits, stop: CancellationToken) {
    let mut framed = Framed::new(peer, stream);
    loop {
        let received = tokio::select! {
            received = framed.recv_budgeted(limits.idle, limits.frame, &limits.budget) => received,
            () = stop.cancelled() => break,
        };
        let (frame, _reserved) = match received {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let step = match ClientMessage::decode(&frame) {
            Ok(ClientMessage::Step(step)) => step,
            Ok(_) => {
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, "only forwarded Steps go over /hotpot/push/1").encode(), limits.write).await;
                break;
            }
            Err(e) => {
                let _ = framed.send(&NodeMessage::error(ErrorCode::BadRequest, e.to_string()).encode(), limits.write).await;
                break;
            }
        };
        let Some(entry) = table.get(&step.session) else {
            tracing::debug!(%peer, session = %step.session, "refusing a forwarded step for a session not pushed here");
            let _ = framed.send(&NodeMessage::error(ErrorCode::UnknownSession, "no pushed session with this id is open here").encode(), limits.write).await;
            break;
        };
        if entry.upstream != Some(peer) {
            tracing::warn!(%peer, session = %step.session, "refusing a forwarded step from a peer that is not the session's upstream");
            let _ = framed.send(&NodeMessage::error(ErrorCode::NotYourSession, "you are not this session's upstream node").encode(), limits.write).await;
            break;
        }
        let answer = match admission(&step, &jobs) {
            Some(refusal) => refusal,
            None => tokio::select! {
                answer = jobs.ask(|reply| Job::Step { owner: entry.owner, step, rewind: true, reply }) => answer,
                () = stop.cancelled() => break,
            },
        };
        table.forward(&entry, &answer);
        entry.keep(answer);
    }
    framed.close().await;
}
