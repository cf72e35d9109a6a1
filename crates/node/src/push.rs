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
//!
//! Between two nodes there is one push stream, shared by every session
//! they chain (sessions are named in each frame); the receiver works on
//! each forwarded step in its own task, so steps of different sessions
//! batch in the engine as they would from a gateway. The sender drops a
//! stream it has not used for [`LINK_IDLE`], before the receiver's idle
//! timeout could close it under a step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A push stream unused this long is opened afresh (well within a
/// receiver's idle timeout).
const LINK_IDLE: Duration = Duration::from_secs(30);

/// The pushed sessions open on this node, and the streams to the nodes
/// they forward to.
pub(crate) struct PushTable {
    network: Network,
    write: Duration,
    entries: Mutex<HashMap<SessionId, Arc<PushEntry>>>,
    links: Mutex<HashMap<PeerId, Arc<Link>>>,
}

/// One pushed session: who opened it, who may forward into it, where its
/// outputs go, and the outputs waiting for the opener.
pub(crate) struct PushEntry {
    owner: PeerId,
    upstream: Option<PeerId>,
    downstream: Option<Downstream>,
    results: mpsc::Sender<NodeMessage>,
    waiting: tokio::sync::Mutex<mpsc::Receiver<NodeMessage>>,
}

/// Where a session's outputs go: the next node's session, over the link
/// to that node.
struct Downstream {
    session: SessionId,
    link: Arc<Link>,
}

/// The push stream to one node, shared by every session forwarding to it.
struct Link {
    peer: PeerId,
    addrs: Mutex<Vec<Multiaddr>>,
    stream: tokio::sync::Mutex<Option<(Framed, Instant)>>,
}

impl PushTable {
    pub fn new(network: Network, write: Duration) -> Arc<Self> {
        Arc::new(Self { network, write, entries: Mutex::default(), links: Mutex::default() })
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
            Some(d) => {
                let peer = peer_id_of(&d.node).ok_or("the downstream node id is not an ed25519 key")?;
                let addrs: Vec<Multiaddr> = d.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let link = Arc::clone(
                    self.links
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(peer)
                        .or_insert_with(|| Arc::new(Link { peer, addrs: Mutex::new(Vec::new()), stream: tokio::sync::Mutex::default() })),
                );
                if !addrs.is_empty() {
                    *link.addrs.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
                }
                Some(Downstream { session: d.session, link })
            }
            None => None,
        };
        let (results, waiting) = mpsc::channel(WAITING_RESULTS);
        let entry = Arc::new(PushEntry { owner, upstream, downstream, results, waiting: tokio::sync::Mutex::new(waiting) });
        self.entries().insert(session, Arc::clone(&entry));
        if let Some(d) = &entry.downstream {
            // Open the stream now, so that the first step need not.
            let (table, link) = (Arc::clone(self), Arc::clone(&d.link));
            tokio::spawn(async move {
                let mut stream = link.stream.lock().await;
                table.fresh(&link, &mut stream).await;
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

    /// Makes sure `stream` is an open stream to the link's node that has
    /// not sat idle for long (opening one when needed).
    async fn fresh(&self, link: &Link, stream: &mut Option<(Framed, Instant)>) {
        if stream.as_ref().is_some_and(|(_, used)| used.elapsed() < LINK_IDLE) {
            return;
        }
        if let Some((mut old, _)) = stream.take() {
            old.close().await;
        }
        let addrs = link.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !addrs.is_empty() {
            let _ = self.network.add_addresses(link.peer, addrs).await;
        }
        match self.network.open_stream(link.peer, PROTOCOL_PUSH, LINK_OPEN_TIMEOUT).await {
            Ok(opened) => *stream = Some((Framed::new(link.peer, opened), Instant::now())),
            Err(e) => tracing::warn!(peer = %link.peer, error = %e, "cannot open the push stream to the next node"),
        }
    }

    /// Sends a computed output on to the next node (in the background: the
    /// answer to the gateway does not wait for it).
    pub fn forward(self: &Arc<Self>, entry: &Arc<PushEntry>, answer: &NodeMessage) {
        let (Some(downstream), NodeMessage::Output { hidden, commitment, .. }) = (&entry.downstream, answer) else { return };
        let (table, link) = (Arc::clone(self), Arc::clone(&downstream.link));
        let step = ClientMessage::Step(Step { session: downstream.session, pos: commitment.start_pos, hidden: hidden.clone() }).encode();
        tokio::spawn(async move {
            // The emulated delay is paid outside the lock, as on a wire
            // carrying many sessions' frames at once.
            let delay = hotpot_net::emulated_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut stream = link.stream.lock().await;
            table.fresh(&link, &mut stream).await;
            let Some((framed, used)) = stream.as_mut() else { return };
            match framed.send_undelayed(&step, table.write).await {
                Ok(()) => *used = Instant::now(),
                Err(e) => {
                    tracing::warn!(peer = %link.peer, error = %e, "cannot forward a step to the next node; the gateway will fall back");
                    *stream = None;
                }
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
/// chains, any number of sessions on one stream. A step is refused unless
/// its session was opened here with push links naming the sender as its
/// upstream: a session that is not (or no longer) pushed here gets an
/// `UnknownSession` answer, and a sender that is not the session's
/// upstream gets `NotYourSession` and loses the stream. Each accepted step
/// is worked on in its own task (holding its frame's memory budget).
pub(crate) async fn serve_push(peer: PeerId, stream: hotpot_net::Stream, table: Arc<PushTable>, jobs: Jobs, limits: StreamLimits, stop: CancellationToken) {
    let mut framed = Framed::new(peer, stream);
    loop {
        let received = tokio::select! {
            received = framed.recv_budgeted(limits.idle, limits.frame, &limits.budget) => received,
            () = stop.cancelled() => break,
        };
        let (frame, reserved) = match received {
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
            // A session that just closed, or never was: other sessions on
            // this stream carry on.
            tracing::debug!(%peer, session = %step.session, "refusing a forwarded step for a session not pushed here");
            let _ = framed.send(&NodeMessage::error(ErrorCode::UnknownSession, "no pushed session with this id is open here").encode(), limits.write).await;
            continue;
        };
        if entry.upstream != Some(peer) {
            tracing::warn!(%peer, session = %step.session, "refusing a forwarded step from a peer that is not the session's upstream");
            let _ = framed.send(&NodeMessage::error(ErrorCode::NotYourSession, "you are not this session's upstream node").encode(), limits.write).await;
            break;
        }
        let (table, jobs, stop) = (Arc::clone(&table), jobs.clone(), stop.clone());
        // Finished even if the stream ends meanwhile: its gateway waits for it.
        tokio::spawn(async move {
            let _reserved = reserved;
            let answer = match admission(&step, &jobs) {
                Some(refusal) => refusal,
                None => tokio::select! {
                    answer = jobs.ask(|reply| Job::Step { owner: entry.owner, step, rewind: true, reply }) => answer,
                    () = stop.cancelled() => return,
                },
            };
            table.forward(&entry, &answer);
            entry.keep(answer);
        });
    }
    framed.close().await;
}
