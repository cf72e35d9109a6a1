use std::fmt;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

/// A node's signing key (ed25519). The same key is the node's libp2p
/// identity, so its [`NodeId`] and its peer id name the same machine.
#[derive(Clone)]
pub struct NodeKey(ed25519_dalek::SigningKey);

/// A node's public key: who signed a commitment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(#[serde(with = "hex32")] [u8; 32]);

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a node key is 32 secret bytes, got {0}")]
    Length(usize),
    #[error("{0:?} is not a valid ed25519 public key")]
    PublicKey(NodeId),
    #[error("the signature does not verify")]
    BadSignature,
}

impl NodeKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&bytes)))
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn id(&self) -> NodeId {
        NodeId(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.id())
    }
}

impl NodeId {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Checks that `signature` is this node's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::PublicKey(*self))?;
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify(message, &signature).map_err(|_| KeyError::BadSignature)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("expected 64 hex digits");
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let key = NodeKey::generate();
        let sig = key.sign(b"hidden states");
        assert!(key.id().verify(b"hidden states", &sig).is_ok());
        assert_eq!(key.id().verify(b"hidden state", &sig), Err(KeyError::BadSignature));
        let other = NodeKey::generate();
        assert!(other.id().verify(b"hidden states", &sig).is_err());
        let restored = NodeKey::from_secret_bytes(&key.secret_bytes()).expect("32 bytes");
        assert_eq!(restored.id(), key.id());
        assert!(NodeKey::from_secret_bytes(&[0; 31]).is_err());
    }

    #[test]
    fn ids_serialize_as_hex() {
        let id = NodeKey::generate().id();
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<NodeId>(&json).expect("parses"), id);
    }
}
