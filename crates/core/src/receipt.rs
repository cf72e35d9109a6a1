//! Receipts: what a gateway owes a node for one session, signed by both.
//!
//! When a session ends the gateway signs one receipt per stage of its
//! route: which node ran which blocks of which model for how many
//! positions, at what price, for what amount, and the root of every
//! commitment the node signed in that session. The node checks it against
//! its own count and its own root, countersigns it and keeps it; the
//! gateway settles it in its books once, by its id. A receipt carries
//! everything needed to check it offline: both public keys, both
//! signatures, and `amount = price_per_1k × positions / 1000` (rounded
//! up to the micro-credit).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, NodeId, NodeKey, Signature};
use crate::{Commitment, Credits, LayerSpan, ModelId, SessionId, hash};

const GATEWAY_DOMAIN: &[u8] = b"hotpot-receipt/1 gateway\0";
const NODE_DOMAIN: &[u8] = b"hotpot-receipt/1 node\0";

/// One stage of one session, as its gateway owes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The node's session (the id the gateway opened it with).
    #[serde(with = "hex_session")]
    pub session: SessionId,
    pub model: ModelId,
    pub node: NodeId,
    pub span: LayerSpan,
    /// Positions the node holds at the end of the session (after
    /// rollbacks): what is paid for.
    pub positions: u64,
    pub price_per_1k: Credits,
    pub amount: Credits,
    /// BLAKE3 over the signatures of every commitment the node signed in
    /// the session, in order ([`commitments_root`]).
    #[serde(with = "hex_bytes")]
    pub commitments_root: [u8; 32],
    pub gateway: NodeId,
    /// Milliseconds since the Unix epoch when the gateway signed it.
    pub time_ms: u64,
    #[serde(with = "hex_signature")]
    pub gateway_signature: Signature,
    /// The node's countersignature (none: the node has not accepted it).
    #[serde(default, with = "hex_signature_opt", skip_serializing_if = "Option::is_none")]
    pub node_signature: Option<Signature>,
}

/// Why a receipt does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("the gateway's signature does not verify: {0}")]
    Gateway(KeyError),
    #[error("the node's countersignature does not verify: {0}")]
    Node(KeyError),
    #[error("the node has not countersigned it")]
    NotCountersigned,
    #[error("its amount {amount} is not {positions} positions at {price} per 1,000 ({expected})")]
    Amount { amount: Credits, positions: u64, price: Credits, expected: String },
}

/// The root of a session's commitments: BLAKE3 over their signatures in
/// the order they were signed (rolled-back steps included).
pub fn commitments_root<'a>(commitments: impl IntoIterator<Item = &'a Commitment>) -> [u8; 32] {
    let mut root = RootBuilder::default();
    for c in commitments {
        root.add(&c.signature);
    }
    root.finish()
}

/// Builds [`commitments_root`] one signature at a time.
#[derive(Default, Clone)]
pub struct RootBuilder(blake3::Hasher);

impl RootBuilder {
    pub fn add(&mut self, signature: &Signature) {
        self.0.update(&signature.0);
    }

    pub fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

impl fmt::Debug for RootBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootBuilder")
    }
}

impl Receipt {
    /// A receipt for `positions` at `price_per_1k`, signed by `gateway`.
    #[allow(clippy::too_many_arguments)]
    pub fn sign(
        gateway: &NodeKey,
        session: SessionId,
        model: ModelId,
        node: NodeId,
        span: LayerSpan,
        positions: u64,
        price_per_1k: Credits,
        commitments_root: [u8; 32],
        time_ms: u64,
    ) -> Self {
        let amount = price_per_1k.per(1000, positions).unwrap_or(Credits::from_micros(u64::MAX));
        let mut r = Self {
            session,
            model,
            node,
            span,
            positions,
            price_per_1k,
            amount,
            commitments_root,
            gateway: gateway.id(),
            time_ms,
            gateway_signature: Signature([0; 64]),
            node_signature: None,
        };
        r.gateway_signature = gateway.sign(&r.message(GATEWAY_DOMAIN));
        r
    }

    /// What both parties sign (and what the id hashes).
    fn body(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(200);
        m.extend_from_slice(&self.session.0);
        m.extend_from_slice(self.model.as_bytes());
        m.extend_from_slice(self.node.as_bytes());
        m.extend_from_slice(&self.span.start().to_le_bytes());
        m.extend_from_slice(&self.span.end().to_le_bytes());
        m.extend_from_slice(&self.positions.to_le_bytes());
        m.extend_from_slice(&self.price_per_1k.micros().to_le_bytes());
        m.extend_from_slice(&self.amount.micros().to_le_bytes());
        m.extend_from_slice(&self.commitments_root);
        m.extend_from_slice(self.gateway.as_bytes());
        m.extend_from_slice(&self.time_ms.to_le_bytes());
        m
    }

    fn message(&self, domain: &[u8]) -> Vec<u8> {
        let mut m = domain.to_vec();
        m.extend_from_slice(&self.body());
        m
    }

    fn node_message(&self) -> Vec<u8> {
        let mut m = self.message(NODE_DOMAIN);
        m.extend_from_slice(&self.gateway_signature.0);
        m
    }

    /// The receipt's id: BLAKE3 of what it says (signatures aside), so
    /// each session's stage is paid once whoever presents it.
    pub fn id(&self) -> [u8; 32] {
        hash(&self.body())
    }

    /// The id as 64 hex digits.
    pub fn id_hex(&self) -> String {
        hex(&self.id())
    }

    /// The node countersigns (its key must be the receipt's node).
    pub fn countersign(&mut self, node: &NodeKey) {
        self.node_signature = Some(node.sign(&self.node_message()));
    }

    /// Checks the amount and the gateway's signature, and the node's when
    /// there is one.
    pub fn check(&self) -> Result<(), ReceiptError> {
        let expected = self.price_per_1k.per(1000, self.positions);
        if expected != Some(self.amount) {
            return Err(ReceiptError::Amount {
                amount: self.amount,
                positions: self.positions,
                price: self.price_per_1k,
                expected: expected.map_or_else(|| "an overflow".into(), |c| c.to_string()),
            });
        }
        self.gateway.verify(&self.message(GATEWAY_DOMAIN), &self.gateway_signature).map_err(ReceiptError::Gateway)?;
        if let Some(signature) = &self.node_signature {
            self.node.verify(&self.node_message(), signature).map_err(ReceiptError::Node)?;
        }
        Ok(())
    }

    /// [`Receipt::check`], and the node must have countersigned.
    pub fn check_countersigned(&self) -> Result<(), ReceiptError> {
        self.check()?;
        if self.node_signature.is_none() {
            return Err(ReceiptError::NotCountersigned);
        }
        Ok(())
    }
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of `text` in hex, exactly `N` of them.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn bad_hex<E: serde::de::Error>(n: usize) -> E {
    E::custom(format!("expected {} hex digits", 2 * n))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        super::unhex(&String::deserialize(d)?).ok_or_else(|| super::bad_hex(32))
    }
}

mod hex_session {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::SessionId;

    pub fn serialize<S: Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(&id.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        super::unhex(&String::deserialize(d)?).map(SessionId).ok_or_else(|| super::bad_hex(16))
    }
}

mod hex_signature {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Signature;

    pub fn serialize<S: Serializer>(sig: &Signature, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(&sig.0))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signature, D::Error> {
        super::unhex(&String::deserialize(d)?).map(Signature).ok_or_else(|| super::bad_hex(64))
    }
}

mod hex_signature_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Signature;

    pub fn serialize<S: Serializer>(sig: &Option<Signature>, s: S) -> Result<S::Ok, S::Error> {
        match sig {
            Some(sig) => s.serialize_str(&super::hex(&sig.0)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Signature>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => super::unhex(&text).map(|b| Some(Signature(b))).ok_or_else(|| super::bad_hex(64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(gateway: &NodeKey, node: &NodeKey) -> Receipt {
        let model: ModelId = "hp1-0000000000000000000000000000000000000000000000000000000000000001".parse().expect("id");
        Receipt::sign(
            gateway,
            SessionId([7; 16]),
            model,
            node.id(),
            LayerSpan::new(0, 15).expect("span"),
            1234,
            Credits::from_micros(2_500_000),
            [9; 32],
            1_700_000_000_000,
        )
    }

    #[test]
    fn receipts_sign_countersign_and_round_trip() {
        let (gateway, node) = (NodeKey::generate(), NodeKey::generate());
        let mut r = receipt(&gateway, &node);
        assert_eq!(r.amount, Credits::from_micros(3_085_000), "1234 positions at 2.5 per 1,000");
        r.check().expect("the gateway's signature holds");
        assert_eq!(r.check_countersigned(), Err(ReceiptError::NotCountersigned));
        let id = r.id();
        r.countersign(&node);
        r.check_countersigned().expect("both signatures hold");
        assert_eq!(r.id(), id, "the id does not depend on the signatures");
        let json = serde_json::to_string(&r).expect("serializes");
        let back: Receipt = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, r);
        back.check_countersigned().expect("still holds");
    }

    #[test]
    fn any_change_breaks_a_receipt() {
        let (gateway, node) = (NodeKey::generate(), NodeKey::generate());
        let mut r = receipt(&gateway, &node);
        r.countersign(&node);
        let mut more = r.clone();
        more.positions += 1;
        assert!(matches!(more.check(), Err(ReceiptError::Amount { .. })));
        more.amount = more.price_per_1k.per(1000, more.positions).expect("fits");
        assert!(matches!(more.check(), Err(ReceiptError::Gateway(_))), "a changed count is not the gateway's");
        let mut root = r.clone();
        root.commitments_root[0] ^= 1;
        assert!(root.check().is_err());
        let mut stranger = r.clone();
        stranger.countersign(&NodeKey::generate());
        assert!(matches!(stranger.check(), Err(ReceiptError::Node(_))), "only the named node countersigns");
        let mut forged = receipt(&NodeKey::generate(), &node);
        forged.gateway = gateway.id();
        assert!(matches!(forged.check(), Err(ReceiptError::Gateway(_))));
    }
}
