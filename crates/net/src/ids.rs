//! Node ids (ed25519 public keys) and libp2p peer ids name the same thing.

use hotpot_core::NodeId;
use libp2p::PeerId;
use libp2p::identity::{PublicKey, ed25519};

/// The peer id of a node.
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let key = ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
    Some(PeerId::from_public_key(&PublicKey::from(key)))
}

/// The node id inside a peer id (ed25519 peer ids embed their public key).
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        // Not an identity multihash: the key is not embedded.
        return None;
    }
    let key = PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    Some(NodeId::from_bytes(key.try_into_ed25519().ok()?.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotpot_core::NodeKey;

    #[test]
    fn node_and_peer_ids_correspond() {
        let key = NodeKey::generate();
        let peer = peer_id_of(&key.id()).expect("valid key");
        assert_eq!(node_id_of(&peer), Some(key.id()));
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.secret_bytes()).expect("key");
        assert_eq!(keypair.public().to_peer_id(), peer);
    }
}
