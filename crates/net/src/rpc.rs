//! Typed exchanges over raw streams: frames with deadlines, node info, and
//! finding the nodes of a model.

use std::collections::HashSet;
use std::time::Duration;

use futures::AsyncWriteExt;
use hotpot_core::ModelId;
use hotpot_wire::{InfoRequest, MAX_FRAME, NodeInfo, PROTOCOL_INFO, read_frame, read_frame_len, read_payload, write_frame};
use libp2p::{PeerId, Stream};

use crate::{NetError, Network, block_key};

/// Benchmarks on hosts without `tc netem`: a one-way delay this process
/// adds to every frame it sends to a peer (microseconds; 0: none), so
/// that a chain of processes pays it on every hop, as on a WAN.
static EMULATED_DELAY_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the one-way delay this process adds to every frame it sends.
pub fn set_emulated_delay(delay: Duration) {
    EMULATED_DELAY_US.store(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
}

/// The one-way delay this process adds to every frame it sends.
pub fn emulated_delay() -> Duration {
    Duration::from_micros(EMULATED_DELAY_US.load(std::sync::atomic::Ordering::Relaxed))
}

/// A stream that carries length-prefixed frames, each read or write bounded
/// by a deadline.
pub struct Framed {
    stream: Stream,
    peer: PeerId,
}

impl std::fmt::Debug for Framed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed").field("peer", &self.peer).finish()
    }
}

impl Framed {
    pub fn new(peer: PeerId, stream: Stream) -> Self {
        Self { stream, peer }
    }

    pub fn peer(&self) -> PeerId {
        self.peer
    }

    pub async fn send(&mut self, payload: &[u8], timeout: Duration) -> Result<(), NetError> {
        let delay = emulated_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.send_undelayed(payload, timeout).await
    }

    /// [`Framed::send`] without the emulated delay, for a caller that
    /// waited it out already (before taking a lock shared by many
    /// senders, say).
    pub async fn send_undelayed(&mut self, payload: &[u8], timeout: Duration) -> Result<(), NetError> {
        match tokio::time::timeout(timeout, write_frame(&mut self.stream, payload)).await {
            Ok(result) => result.map_err(|e| NetError::Wire(e.to_string())),
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    /// The next frame, `None` when the peer closed the stream.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, NetError> {
        match tokio::time::timeout(timeout, read_frame(&mut self.stream, MAX_FRAME)).await {
            Ok(result) => result.map_err(|e| NetError::Wire(e.to_string())),
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    /// The next frame of at most `max` bytes.
    pub async fn recv_limited(&mut self, timeout: Duration, max: usize) -> Result<Option<Vec<u8>>, NetError> {
        match tokio::time::timeout(timeout, read_frame(&mut self.stream, max)).await {
            Ok(result) => result.map_err(|e| NetError::Wire(e.to_string())),
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    /// The next frame of at most `max` bytes, whose payload memory is
    /// first reserved from `budget` (one permit per KiB, waited for within
    /// the deadline); the permit is held until dropped, so frames being
    /// read or worked on never take more memory than the budget allows.
    pub async fn recv_budgeted(
        &mut self,
        timeout: Duration,
        max: usize,
        budget: &std::sync::Arc<tokio::sync::Semaphore>,
    ) -> Result<Option<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>, NetError> {
        let read = async {
            let Some(len) = read_frame_len(&mut self.stream, max).await.map_err(|e| NetError::Wire(e.to_string()))? else {
                return Ok(None);
            };
            let kib = u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
            let permit = std::sync::Arc::clone(budget).acquire_many_owned(kib).await.map_err(|_| NetError::Wire("the frame budget is closed".into()))?;
            let payload = read_payload(&mut self.stream, len).await.map_err(|e| NetError::Wire(e.to_string()))?;
            Ok(Some((payload, permit)))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.close()).await;
    }
}

impl Network {
    /// Asks `peer` to describe itself.
    pub async fn query_info(&self, peer: PeerId, timeout: Duration) -> Result<NodeInfo, NetError> {
        let stream = self.open_stream(peer, PROTOCOL_INFO, timeout).await?;
        let mut framed = Framed::new(peer, stream);
        framed.send(&InfoRequest.encode(), timeout).await?;
        let reply = framed.recv(timeout).await?.ok_or(NetError::Wire("closed before answering".into()))?;
        framed.close().await;
        NodeInfo::decode(&reply).map_err(|e| NetError::Wire(e.to_string()))
    }

    /// Every node serving `model` that can be found within `timeout`: the
    /// DHT's providers of each block, plus the peers we already know, each
    /// asked for its info.
    pub async fn discover(&self, model: Option<&ModelId>, n_blocks: u32, timeout: Duration) -> Vec<(PeerId, NodeInfo)> {
        let mut peers: HashSet<PeerId> = self.known_peers().await.unwrap_or_default().into_iter().collect();
        if !peers.is_empty() {
            let _ = self.bootstrap().await;
        }
        if let Some(model) = model {
            let queries = (0..n_blocks).map(|block| self.providers(block_key(model, block), timeout));
            for found in futures::future::join_all(queries).await.into_iter().flatten() {
                peers.extend(found);
            }
        }
        peers.remove(&self.peer_id());
        let infos = peers.into_iter().map(|peer| async move { (peer, self.query_info(peer, timeout).await) });
        futures::future::join_all(infos)
            .await
            .into_iter()
            .filter_map(|(peer, info)| info.ok().map(|info| (peer, info)))
            .filter(|(_, info)| model.is_none_or(|m| &info.model == m))
            .collect()
    }
}
