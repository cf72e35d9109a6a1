//! The relay server as Hotpot peers run it: libp2p's circuit relay v2
//! server, seeing only the external addresses that reach this peer
//! directly.
//!
//! libp2p's server offers its hop protocol (takes reservations) as soon as
//! the peer has a confirmed external address. A peer behind NAT has one
//! too — its own circuit address through another relay — and must not
//! offer to relay through a relay. So the server here never hears of
//! circuit addresses: it turns on once AutoNAT confirms an address from
//! outside (`Serve::WhenPublic`, nodes by default) or once the operator's
//! own listen addresses are taken as external (`Serve::Always`:
//! `hotpot relay`, `hotpot node --relay`).

use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::relay;
use libp2p::swarm::{ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm};
use libp2p::{Multiaddr, PeerId};

use crate::event_loop::is_circuit;

pub(crate) struct DirectOnly(pub(crate) relay::Behaviour);

impl NetworkBehaviour for DirectOnly {
    type ConnectionHandler = <relay::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = <relay::Behaviour as NetworkBehaviour>::ToSwarm;

    fn handle_pending_inbound_connection(&mut self, id: ConnectionId, local: &Multiaddr, remote: &Multiaddr) -> Result<(), ConnectionDenied> {
        self.0.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ExternalAddrConfirmed(e) if is_circuit(e.addr) => {}
            FromSwarm::ExternalAddrExpired(e) if is_circuit(e.addr) => {}
            event => self.0.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(&mut self, peer: PeerId, id: ConnectionId, event: THandlerOutEvent<Self>) {
        self.0.on_connection_handler_event(peer, id, event)
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}
