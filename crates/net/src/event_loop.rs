//! The task that owns the libp2p swarm.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::core::ConnectedPoint;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, autonat, dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, tcp, yamux};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::relay_server::DirectOnly;
use crate::{Command, NetError, NetEvent, NetworkConfig, Reachability, Reserve, Route, Serve};

const KAD_PROTOCOL: &str = "/hotpot/kad/1.0.0";
const IDENTIFY_PROTOCOL: &str = "/hotpot/id/1";
/// A QUIC connection silent for this long is dead.
const QUIC_IDLE_TIMEOUT_MS: u32 = 4_000;
/// How often provider records are announced again (new peers learn them).
const REPROVIDE: Duration = Duration::from_secs(30);
/// The protocol a relay (circuit relay v2) serves reservations on.
const RELAY_HOP: &str = "/libp2p/circuit/relay/0.2.0/hop";

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<DirectOnly>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
}

/// A relay's limits, sized for hidden-state traffic: circuits as long and
/// as large as sessions are (the libp2p defaults, 2 minutes and 128 KiB,
/// are for signalling only), a few reservations per peer.
fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: 256,
        max_reservations_per_peer: 4,
        reservation_duration: Duration::from_secs(3600),
        max_circuits: 512,
        max_circuits_per_peer: 64,
        max_circuit_duration: Duration::from_secs(24 * 3600),
        max_circuit_bytes: 0,
        ..relay::Config::default()
    }
}

pub(crate) fn build_swarm(config: &NetworkConfig) -> Result<(Swarm<Behaviour>, libp2p_stream::Control), NetError> {
    let err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(config.key.secret_bytes()).map_err(|e| err(&e))?;
    let mdns_on = config.mdns;
    let dht_server = config.dht_server;
    let serve_relay = config.relay.serve;
    let answers_autonat = serve_relay != Serve::Never;
    let mut swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .map_err(|e| err(&e))?
        .with_quic_config(|mut quic| {
            // Notice a vanished peer within seconds (a killed node must not
            // stall a session for long), while keeping idle links alive.
            quic.max_idle_timeout = QUIC_IDLE_TIMEOUT_MS;
            quic.keep_alive_interval = Duration::from_secs(1);
            quic
        })
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| err(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config.set_query_timeout(Duration::from_secs(10));
            let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
            kad.set_mode(Some(if dht_server { kad::Mode::Server } else { kad::Mode::Client }));
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_secs(1))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(64 * 1024)
                .build()
                .map_err(|e| Box::new(std::io::Error::other(e.to_string())) as Box<dyn std::error::Error + Send + Sync>)?;
            let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)
                .map_err(|e| Box::new(std::io::Error::other(e)) as Box<dyn std::error::Error + Send + Sync>)?;
            // A new listen address (a relay circuit once reserved) is pushed
            // to connected peers at once, so that a relay's DHT hands out
            // a home node's circuit address, not only its unreachable ones.
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("hotpot/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true),
            );
            let mdns = if mdns_on { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
            // Every peer asks whether it is reachable, and asks relays only
            // (peers offering the hop protocol: reachable by design; a
            // dial-back is a second connection, which peers otherwise take
            // for a restarted peer). Peers that may relay answer. Private
            // address ranges count: test beds and LANs use them.
            let serving = if answers_autonat { autonat::Config::default().throttle_clients_global_max } else { 0 };
            let autonat = autonat::Behaviour::new(
                peer_id,
                autonat::Config {
                    boot_delay: Duration::from_secs(2),
                    retry_interval: Duration::from_secs(10),
                    refresh_interval: Duration::from_secs(60),
                    only_global_ips: false,
                    use_connected: false,
                    throttle_clients_global_max: serving,
                    throttle_clients_peer_max: if answers_autonat { autonat::Config::default().throttle_clients_peer_max } else { 0 },
                    ..autonat::Config::default()
                },
            );
            Ok(Behaviour {
                kad,
                gossipsub,
                identify,
                ping: ping::Behaviour::default(),
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                relay_client,
                relay: Toggle::from((serve_relay != Serve::Never).then(|| DirectOnly(relay::Behaviour::new(peer_id, relay_config())))),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat,
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    let control = swarm.behaviour().stream.new_control();
    Ok((swarm, control))
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NetEvent>,
    expect_listen: bool,
    listen_addrs: Vec<Multiaddr>,
    waiting_for_listen: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<(), NetError>>>,
    provider_queries: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<HashSet<PeerId>>)>,
    provided: Vec<String>,
    /// The `--join` addresses, and the peers found behind them: kept
    /// connected (redialed after a reset or a restart).
    join: Vec<Multiaddr>,
    join_peers: HashMap<PeerId, Multiaddr>,
    redials: Vec<(tokio::time::Instant, PeerId, Multiaddr)>,
    /// When to listen through a relay, and what AutoNAT found.
    reserve: Reserve,
    serve: Serve,
    reachability: Reachability,
    /// Connected relays (peers serving the hop protocol), at the address
    /// we reach them on.
    relays: HashMap<PeerId, Multiaddr>,
    /// The relay we listen through, and its listener.
    reserved: Option<(PeerId, libp2p::core::transport::ListenerId)>,
    /// Every open connection per peer, and whether it is relayed.
    connections: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// The address each peer was last dialed at (not relayed).
    dialed: HashMap<PeerId, Multiaddr>,
    /// When each peer was last connected through a relay.
    relayed_at: HashMap<PeerId, tokio::time::Instant>,
    /// Peers dialed through a relay and not yet reached directly.
    punches: HashMap<PeerId, Punch>,
}

/// `addr` without a trailing `/p2p/…`.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_))).collect()
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

/// How long after a relayed connection a second, direct one is taken for a
/// hole punch (not for a restarted peer).
const PUNCH_WINDOW: Duration = Duration::from_secs(60);

/// A hole punch that failed (DCUtR gives up after three dials in quick
/// succession, which a loaded machine can miss) is tried again this long
/// after the relayed connection, then after twice as long each time.
const PUNCH_RETRY: Duration = Duration::from_secs(8);
/// Hole punch rounds after the first, per relayed peer.
const PUNCH_RETRIES: u32 = 3;

/// A peer this one reached through a relay, whose hole punch may be tried
/// again: over a fresh relayed connection, which starts a new DCUtR round.
struct Punch {
    circuit: Multiaddr,
    retries: u32,
    next: tokio::time::Instant,
}

/// How soon a dropped join peer is dialed again.
const REDIAL: Duration = Duration::from_millis(300);

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        events: broadcast::Sender<NetEvent>,
        config: &NetworkConfig,
    ) -> Result<Self, NetError> {
        Ok(Self {
            swarm,
            commands,
            events,
            expect_listen: !config.listen.is_empty(),
            listen_addrs: Vec::new(),
            waiting_for_listen: Vec::new(),
            pending_dials: HashMap::new(),
            provider_queries: HashMap::new(),
            provided: Vec::new(),
            join: config.join.clone(),
            join_peers: HashMap::new(),
            redials: Vec::new(),
            reserve: config.relay.reserve,
            serve: config.relay.serve,
            reachability: Reachability::Unknown,
            relays: HashMap::new(),
            reserved: None,
            connections: HashMap::new(),
            dialed: HashMap::new(),
            relayed_at: HashMap::new(),
            punches: HashMap::new(),
        })
    }

    pub(crate) async fn run(mut self) {
        let mut reprovide = tokio::time::interval(REPROVIDE);
        reprovide.tick().await;
        let mut redial = tokio::time::interval(REDIAL);
        let mut punch = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = futures::StreamExt::select_next_some(&mut self.swarm) => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    None | Some(Command::Shutdown) => break,
                    Some(command) => self.on_command(command),
                },
                _ = reprovide.tick() => self.announce(),
                _ = redial.tick(), if !self.redials.is_empty() => self.redial_due(),
                _ = punch.tick(), if !self.punches.is_empty() => self.punch_again(),
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn local_addrs(&self) -> Vec<Multiaddr> {
        let me = *self.swarm.local_peer_id();
        self.listen_addrs.iter().map(|a| a.clone().with_p2p(me).unwrap_or_else(|a| a)).collect()
    }

    fn redial_due(&mut self) {
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.redials.drain(..).partition(|(at, ..)| *at <= now);
        self.redials = later;
        for (_, peer, addr) in due {
            tracing::debug!(%addr, "dialing a join peer again");
            let opts = DialOpts::peer_id(peer).addresses(vec![addr]).condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing).build();
            let _ = self.swarm.dial(opts);
        }
    }

    /// Dials the peers still reached only through a relay once more through
    /// it, when their retry is due: the peer behind the relay starts a new
    /// hole punch on the new relayed connection (the old one stays, it may
    /// carry streams, and closes with the rest once the punch works).
    fn punch_again(&mut self) {
        let now = tokio::time::Instant::now();
        let connections = &self.connections;
        // A peer with no retry left is kept until its next time would have
        // come: the last retry's own relayed connection must not start a
        // fresh series (`ConnectionEstablished` adds peers not in the map).
        self.punches.retain(|peer, punch| {
            connections.get(peer).is_some_and(|c| !c.is_empty() && c.values().all(|relayed| *relayed)) && (punch.retries < PUNCH_RETRIES || punch.next > now)
        });
        let due: Vec<(PeerId, Multiaddr)> = self.punches.iter().filter(|(_, p)| p.next <= now).map(|(peer, p)| (*peer, p.circuit.clone())).collect();
        for (peer, circuit) in due {
            let Some(punch) = self.punches.get_mut(&peer) else { continue };
            punch.retries += 1;
            punch.next = now + PUNCH_RETRY * (1 << punch.retries);
            tracing::info!(%peer, round = punch.retries + 1, "the route is still relayed: trying the hole punch again");
            let opts = DialOpts::peer_id(peer).addresses(vec![circuit]).condition(libp2p::swarm::dial_opts::PeerCondition::Always).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "cannot dial through the relay again");
            }
        }
    }

    /// Whether this peer relays circuits now (libp2p's relay server turns
    /// itself on with the first confirmed direct external address).
    fn relaying(&self) -> bool {
        match self.serve {
            Serve::Always => true,
            Serve::WhenPublic => self.reachability == Reachability::Public,
            Serve::Never => false,
        }
    }

    /// Listens through a relay when this peer should (it listens, and it is
    /// told to or AutoNAT found it unreachable) and does not yet.
    fn maybe_reserve(&mut self) {
        let wanted = self.expect_listen
            && match self.reserve {
                Reserve::Always => true,
                Reserve::WhenPrivate => self.reachability == Reachability::Private,
                Reserve::Never => false,
            };
        if !wanted || self.reserved.is_some() {
            return;
        }
        let Some((relay, addr)) = self.relays.iter().next().map(|(p, a)| (*p, a.clone())) else { return };
        let circuit = without_peer(&addr).with(libp2p::multiaddr::Protocol::P2p(relay)).with(libp2p::multiaddr::Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
            Ok(listener) => {
                tracing::info!(%circuit, reachability = %self.reachability, "reserving a slot on a relay: reachable through it");
                self.reserved = Some((relay, listener));
            }
            Err(e) => {
                tracing::warn!(%circuit, error = %e, "cannot listen through a relay");
                self.relays.remove(&relay);
            }
        }
    }

    fn routes(&self) -> HashMap<PeerId, Route> {
        self.connections
            .iter()
            .filter(|(_, conns)| !conns.is_empty())
            .map(|(peer, conns)| (*peer, if conns.values().any(|relayed| !relayed) { Route::Direct } else { Route::Relayed }))
            .collect()
    }

    fn announce(&mut self) {
        for key in &self.provided {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(kad::RecordKey::new(key)) {
                tracing::warn!(%key, error = %e, "cannot store a provider record");
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                if self.listen_addrs.is_empty() && self.expect_listen {
                    self.waiting_for_listen.push(reply);
                } else {
                    let _ = reply.send(self.local_addrs());
                }
            }
            Command::Dial(addr, reply) => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial { addr, reason: e.to_string() }));
                    }
                }
            }
            Command::DialPeer(peer) => {
                if !self.swarm.is_connected(&peer) {
                    let _ = self.swarm.dial(peer);
                }
            }
            Command::AddAddresses(peer, addrs) => {
                for addr in addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                }
            }
            Command::Provide(keys) => {
                self.provided.extend(keys);
                self.announce();
            }
            Command::Providers(key, reply) => {
                let id = self.swarm.behaviour_mut().kad.get_providers(kad::RecordKey::new(&key));
                self.provider_queries.insert(id, (HashSet::new(), reply));
            }
            Command::Bootstrap => {
                let _ = self.swarm.behaviour_mut().kad.bootstrap();
            }
            Command::Subscribe(topic) => {
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&gossipsub::IdentTopic::new(topic)) {
                    tracing::warn!(error = %e, "cannot subscribe");
                }
            }
            Command::Publish(topic, data) => match self.swarm.behaviour_mut().gossipsub.publish(gossipsub::IdentTopic::new(topic), data) {
                Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                Err(e) => tracing::debug!(error = %e, "gossip publish failed"),
            },
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::KnownPeers(reply) => {
                let mut peers: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
                for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
                    for entry in bucket.iter() {
                        peers.insert(*entry.node.key.preimage());
                    }
                }
                let _ = reply.send(peers.into_iter().collect());
            }
            Command::Routes(reply) => {
                let _ = reply.send(self.routes());
            }
            Command::Reachability(reply) => {
                let _ = reply.send(self.reachability);
            }
            Command::Shutdown => {}
        }
    }

    fn emit(&self, event: NetEvent) {
        let _ = self.events.send(event);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::debug!(%address, "listening");
                // A relay offers its hop protocol only on addresses it
                // knows are reachable: a relay is run where it is, so its
                // own listen addresses are taken as such.
                if self.serve == Serve::Always && !is_circuit(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                // A slot on a relay is how others reach this peer: the
                // address goes into its provider records and identify.
                if is_circuit(&address) {
                    let me = *self.swarm.local_peer_id();
                    self.swarm.add_external_address(address.clone().with_p2p(me).unwrap_or_else(|a| a));
                }
                self.listen_addrs.push(address);
                let addrs = self.local_addrs();
                for reply in self.waiting_for_listen.drain(..) {
                    let _ = reply.send(addrs.clone());
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                let relayed = endpoint.is_relayed();
                if relayed {
                    let now = tokio::time::Instant::now();
                    self.relayed_at.insert(peer_id, now);
                    if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                        self.punches.entry(peer_id).or_insert_with(|| Punch { circuit: address.clone(), retries: 0, next: now + PUNCH_RETRY });
                    }
                }
                // A second connection is expected around a relay: the
                // reservation's own dial to the relay, the hole punch (a
                // direct connection beside the relayed one, from either
                // side, sometimes two).
                let near_relay =
                    self.relaying() || self.relays.contains_key(&peer_id) || self.relayed_at.get(&peer_id).is_some_and(|t| t.elapsed() < PUNCH_WINDOW);
                self.connections.entry(peer_id).or_default().insert(connection_id, relayed);
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !relayed
                {
                    self.dialed.insert(peer_id, address.clone());
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, address.clone());
                    let bare = without_peer(address);
                    if let Some(join) = self.join.iter().find(|j| without_peer(j) == bare) {
                        self.join_peers.insert(peer_id, join.clone());
                    }
                }
                if num_established.get() == 1 {
                    self.emit(NetEvent::Connected(peer_id));
                } else if near_relay {
                    // Both kept; a relayed one closes once a hole punch
                    // made a direct one.
                } else {
                    // A second connection from one peer is, in practice, a
                    // process restarted with the same key while its old
                    // connection has not timed out yet. Gossipsub greets
                    // only a peer's first connection, so the new process
                    // would never learn our subscriptions: start over with
                    // no connection (the dialer redials its join peers).
                    tracing::debug!(peer = %peer_id, "a peer connected again while an old connection was open; resetting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let addr = match &error {
                        libp2p::swarm::DialError::Transport(attempts) => attempts.first().map(|(a, _)| a.clone()),
                        _ => None,
                    };
                    let _ = reply.send(Err(NetError::Dial { addr: addr.unwrap_or_else(Multiaddr::empty), reason: error.to_string() }));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                }
                if num_established > 0 {
                    return;
                }
                self.connections.remove(&peer_id);
                if self.relays.remove(&peer_id).is_some() {
                    self.swarm.behaviour_mut().autonat.remove_server(&peer_id);
                    tracing::info!(relay = %peer_id, "lost the connection to a relay");
                }
                self.emit(NetEvent::Disconnected(peer_id));
                if let Some(addr) = self.join_peers.get(&peer_id)
                    && !self.redials.iter().any(|(_, p, _)| *p == peer_id)
                {
                    self.redials.push((tokio::time::Instant::now() + REDIAL, peer_id, addr.clone()));
                }
            }
            SwarmEvent::ListenerClosed { listener_id, addresses, .. } => {
                self.listen_addrs.retain(|a| !addresses.contains(a));
                if self.reserved.is_some_and(|(_, l)| l == listener_id) {
                    tracing::warn!("the relay we listened through is gone; reserving on another");
                    if let Some((relay, _)) = self.reserved.take() {
                        self.relays.remove(&relay);
                    }
                    self.maybe_reserve();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
                if info.protocols.iter().any(|p| p.as_ref() == RELAY_HOP)
                    && let Some(addr) = self.dialed.get(&peer_id).cloned().or_else(|| info.listen_addrs.iter().find(|a| !is_circuit(a)).cloned())
                {
                    self.swarm.behaviour_mut().autonat.add_server(peer_id, Some(addr.clone()));
                    self.relays.insert(peer_id, addr);
                    self.maybe_reserve();
                }
                for addr in info.listen_addrs {
                    if speaks_kad {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                    }
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. }) => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) => {
                    for peer in &providers {
                        // Connect while the query still knows the addresses.
                        if !self.swarm.is_connected(peer) && peer != self.swarm.local_peer_id() {
                            let _ = self.swarm.dial(*peer);
                        }
                    }
                    if let Some((found, _)) = self.provider_queries.get_mut(&id) {
                        found.extend(providers);
                    }
                    if step.last {
                        self.finish_provider_query(id);
                    }
                }
                kad::QueryResult::GetProviders(_) => self.finish_provider_query(id),
                _ => {}
            },
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                self.emit(NetEvent::Gossip { topic: message.topic.to_string(), source: message.source, data: message.data });
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic, .. }) => {
                // A relay carries every topic its peers use: nodes behind NAT
                // and their gateways may have no other peer in common.
                if self.relaying()
                    && let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&gossipsub::IdentTopic::new(topic.as_str()))
                {
                    tracing::debug!(error = %e, "a relay cannot follow a topic");
                }
                self.emit(NetEvent::Subscribed { peer: peer_id, topic: topic.to_string() });
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.reachability = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                tracing::info!(reachability = %self.reachability, "AutoNAT: reachability changed");
                if self.serve == Serve::WhenPublic && self.reachability == Reachability::Public {
                    tracing::info!("reachable from outside: relaying circuits for peers behind NAT (--no-relay turns this off)");
                }
                self.maybe_reserve();
            }
            BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result }) => match result {
                Ok(direct) => {
                    // The hole punch worked: traffic moves to the direct
                    // connection, the relayed ones close.
                    let relayed: Vec<ConnectionId> = self
                        .connections
                        .get(&remote_peer_id)
                        .map(|c| c.iter().filter(|(id, relayed)| **relayed && **id != direct).map(|(id, _)| *id).collect())
                        .unwrap_or_default();
                    tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection replaces the relayed one");
                    for id in relayed {
                        self.swarm.close_connection(id);
                    }
                }
                Err(e) => tracing::info!(peer = %remote_peer_id, error = %e, "no hole punch (the NATs do not allow it): the route stays relayed"),
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    self.swarm.add_peer_address(peer, addr);
                    let _ = self.swarm.dial(peer);
                }
            }
            _ => {}
        }
    }

    fn finish_provider_query(&mut self, id: kad::QueryId) {
        if let Some((found, reply)) = self.provider_queries.remove(&id) {
            let _ = reply.send(found);
        }
    }
}
