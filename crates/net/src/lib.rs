//! Hotpot's peer-to-peer layer: a libp2p swarm (QUIC, with TCP + Noise +
//! Yamux as fallback) run by one event-loop task, driven through a cheap,
//! cloneable [`Network`] handle.
//!
//! ```text
//!  Network (handle) ──commands──▶ event loop ──▶ Swarm { kademlia, gossipsub, identify, ping, streams,
//!                                                        relay (server, client), dcutr, autonat }
//!        ▲                             │
//!        └──────── NetEvent (broadcast)┘
//! ```
//!
//! Discovery: `--join` addresses bootstrap Kademlia; nodes announce provider
//! records `hotpot/<model>/block/<i>` and gossip heartbeats on
//! `hotpot/<model>`. Sessions and info requests are plain libp2p streams
//! (`/hotpot/infer/1`, `/hotpot/info/1`) opened through the handle.
//!
//! NAT traversal, with libp2p's own parts: AutoNAT asks connected peers to
//! dial back and so learns whether this peer is reachable; a peer that is
//! not (or that is told to, [`Reserve::Always`]) reserves a slot on a relay
//! it is connected to (a peer speaking the circuit relay v2 hop protocol:
//! `hotpot relay`, a node with `--relay`, or any node AutoNAT found
//! public) and listens through it, so
//! its announced addresses include `…/p2p/RELAY/p2p-circuit/p2p/ME`. A
//! peer dialing that address reaches it through the relay; DCUtR then
//! tries a hole punch (tried again over a fresh relayed connection while
//! the route stays relayed, three times), and when it succeeds the relayed
//! connection is closed, so traffic goes direct. Where the NATs forbid it (symmetric on
//! both sides) the route stays relayed. [`Network::routes`] says which.

mod event_loop;
mod ids;
mod relay_server;
mod rpc;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
pub use hotpot_core::{ModelId, NodeId, NodeKey};
pub use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use ids::{node_id_of, peer_id_of};
pub use rpc::{Framed, emulated_delay, set_emulated_delay};

/// How the local peer takes part.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub key: NodeKey,
    /// Addresses to listen on (none for a pure client).
    pub listen: Vec<Multiaddr>,
    /// Peers to bootstrap from.
    pub join: Vec<Multiaddr>,
    /// Serve DHT records (nodes do; clients need not).
    pub dht_server: bool,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Relays: serving as one, and reserving a slot on one.
    pub relay: RelayConfig,
}

/// How the local peer uses relays (NAT traversal).
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayConfig {
    /// When to relay circuits for peers behind NAT, with limits sized for
    /// hidden-state traffic.
    pub serve: Serve,
    /// When to listen through a relay.
    pub reserve: Reserve,
}

/// When a peer relays circuits for others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Serve {
    /// Never (clients, gateways, `hotpot node --no-relay`).
    #[default]
    Never,
    /// Once AutoNAT confirms it reachable from outside (nodes by default).
    WhenPublic,
    /// From the start, on its listen addresses (`hotpot relay`, `hotpot
    /// node --relay`); such a peer also answers other peers' AutoNAT
    /// dial-backs.
    Always,
}

/// When a peer that listens reserves a slot on a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reserve {
    /// Once AutoNAT finds this peer unreachable from outside.
    #[default]
    WhenPrivate,
    /// From the start (a node known to sit behind NAT).
    Always,
    /// Never.
    Never,
}

/// How this peer reaches another right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over a connection of its own (dialed, accepted or hole-punched).
    Direct,
    /// Only through a relay.
    Relayed,
}

impl Route {
    /// "direct" or "relayed".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether this peer can be dialed from outside, as AutoNAT last found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    Unknown,
    Public,
    /// Behind NAT or a firewall.
    Private,
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Private => "private",
        })
    }
}

/// Something the swarm saw.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A gossip message on a subscribed topic, from its original publisher.
    Gossip {
        topic: String,
        source: Option<PeerId>,
        data: Vec<u8>,
    },
    /// A peer subscribed to one of our topics.
    Subscribed {
        peer: PeerId,
        topic: String,
    },
    Connected(PeerId),
    Disconnected(PeerId),
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("cannot open a stream to {peer}: {reason}")]
    Stream { peer: PeerId, reason: String },
    #[error("the network task has stopped")]
    Stopped,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Wire(String),
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NetError>>),
    DialPeer(PeerId),
    AddAddresses(PeerId, Vec<Multiaddr>),
    Provide(Vec<String>),
    Providers(String, oneshot::Sender<HashSet<PeerId>>),
    Bootstrap,
    Subscribe(String),
    Publish(String, Vec<u8>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    KnownPeers(oneshot::Sender<Vec<PeerId>>),
    Routes(oneshot::Sender<std::collections::HashMap<PeerId, Route>>),
    Reachability(oneshot::Sender<Reachability>),
    Shutdown,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    events: broadcast::Sender<NetEvent>,
    peer_id: PeerId,
    key: NodeKey,
}

/// A handle on the running swarm. Clone it freely.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("peer_id", &self.inner.peer_id).finish()
    }
}

impl Network {
    /// Builds the swarm, starts listening and dialing the `join` peers, and
    /// spawns the event loop on the current tokio runtime.
    pub async fn start(config: NetworkConfig) -> Result<Self, NetError> {
        let (swarm, control) = event_loop::build_swarm(&config)?;
        let peer_id = *swarm.local_peer_id();
        let (commands, receiver) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        let event_loop = event_loop::EventLoop::new(swarm, receiver, events.clone(), &config)?;
        tokio::spawn(event_loop.run());
        let network = Self { inner: Arc::new(Inner { commands, control, events, peer_id, key: config.key.clone() }) };
        for addr in &config.join {
            network.dial(addr.clone()).await?;
        }
        Ok(network)
    }

    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.key.id()
    }

    /// The key this peer runs with; nodes sign commitments with it too.
    pub fn key(&self) -> &NodeKey {
        &self.inner.key
    }

    async fn send(&self, command: Command) -> Result<(), NetError> {
        self.inner.commands.send(command).await.map_err(|_| NetError::Stopped)
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The addresses we listen on (with our peer id appended), once known.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(Command::ListenAddrs).await
    }

    /// Connects to `addr` and waits until the connection is up.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|tx| Command::Dial(addr, tx)).await?
    }

    /// Connects to a peer whose addresses the swarm knows.
    pub async fn dial_peer(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::DialPeer(peer)).await
    }

    /// Remembers addresses of a peer (learned from a heartbeat, say).
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        self.send(Command::AddAddresses(peer, addrs)).await
    }

    /// Announces provider records for `keys` in the DHT (and keeps them fresh).
    pub async fn provide(&self, keys: Vec<String>) -> Result<(), NetError> {
        self.send(Command::Provide(keys)).await
    }

    /// Peers that provide `key`, found within `timeout`.
    pub async fn providers(&self, key: String, timeout: Duration) -> Result<HashSet<PeerId>, NetError> {
        tokio::time::timeout(timeout, self.ask(|tx| Command::Providers(key, tx))).await.map_err(|_| NetError::Timeout(timeout))?
    }

    /// Refreshes the DHT routing table (finds the peers near us).
    pub async fn bootstrap(&self) -> Result<(), NetError> {
        self.send(Command::Bootstrap).await
    }

    pub async fn subscribe(&self, topic: String) -> Result<(), NetError> {
        self.send(Command::Subscribe(topic)).await
    }

    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::Publish(topic, data)).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(Command::ConnectedPeers).await
    }

    /// Every peer in the DHT routing table or connected.
    pub async fn known_peers(&self) -> Result<Vec<PeerId>, NetError> {
        self.ask(Command::KnownPeers).await
    }

    /// How each connected peer is reached: direct, or only through a relay.
    pub async fn routes(&self) -> Result<std::collections::HashMap<PeerId, Route>, NetError> {
        self.ask(Command::Routes).await
    }

    /// Whether this peer can be dialed from outside, as AutoNAT last found.
    pub async fn reachability(&self) -> Result<Reachability, NetError> {
        self.ask(Command::Reachability).await
    }

    pub fn events(&self) -> broadcast::Receiver<NetEvent> {
        self.inner.events.subscribe()
    }

    /// Opens a stream of `protocol` to `peer` (dialing it if needed).
    pub async fn open_stream(&self, peer: PeerId, protocol: &'static str, timeout: Duration) -> Result<Stream, NetError> {
        let mut control = self.inner.control.clone();
        let open = control.open_stream(peer, StreamProtocol::new(protocol));
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(NetError::Stream { peer, reason: e.to_string() }),
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    /// Incoming streams of `protocol`, as `(peer, stream)`.
    pub fn accept(&self, protocol: &'static str) -> Result<impl futures::Stream<Item = (PeerId, Stream)> + use<>, NetError> {
        let mut control = self.inner.control.clone();
        let incoming = control
            .accept(StreamProtocol::new(protocol))
            .map_err(|_| NetError::Stream { peer: self.inner.peer_id, reason: format!("{protocol} is already registered") })?;
        Ok(incoming.map(|(peer, stream)| (peer, stream)))
    }

    /// Stops the event loop (connections close).
    pub async fn shutdown(&self) {
        let _ = self.send(Command::Shutdown).await;
    }
}

/// The DHT key under which nodes serving block `block` of `model` announce themselves.
pub fn block_key(model: &ModelId, block: u32) -> String {
    format!("hotpot/{}/block/{block}", model.to_full_string())
}

/// The gossip topic of a model's heartbeats.
pub fn model_topic(model: &ModelId) -> String {
    format!("hotpot/{}", model.to_full_string())
}

/// The gossip topic where gateways publish accusations against nodes of
/// `model` (nodes subscribe too, so that accusations travel through them).
pub fn cheats_topic(model: &ModelId) -> String {
    format!("hotpot/{}/cheats", model.to_full_string())
}
