use std::fmt;

use serde::{Deserialize, Serialize};

use crate::keys::{KeyError, NodeId, NodeKey, Signature};
use crate::{LayerSpan, ModelId};

/// One inference session between a client and a node, named by the client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// BLAKE3 of some bytes.
pub fn hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// A node's signed statement about one step of one session: "for these
/// exact input bytes at these positions, blocks `span` of model `model`
/// gave these exact output bytes", plus sketches of the outputs (opaque
/// here; `hotpot-verify` makes and checks them) so that a third party can
/// check the work without the full tensors. It costs two hashes and a
/// signature, and it is what audits, evidence and receipts are built on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commitment {
    pub session: SessionId,
    pub model: ModelId,
    pub span: LayerSpan,
    pub start_pos: u32,
    pub rows: u32,
    pub input_hash: [u8; 32],
    pub output_hash: [u8; 32],
    pub node: NodeId,
    /// Encoded output sketches completed by this step (often none).
    pub sketches: Vec<Vec<u8>>,
    pub signature: Signature,
}

/// What a commitment says, before it is signed.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord<'a> {
    pub session: SessionId,
    pub model: ModelId,
    pub span: LayerSpan,
    pub start_pos: u32,
    pub rows: u32,
    pub input: &'a [u8],
    pub output: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitmentError {
    #[error("the commitment's signature does not verify: {0}")]
    Signature(#[from] KeyError),
    #[error("the commitment does not describe this step: {0}")]
    Mismatch(&'static str),
}

const DOMAIN: &[u8] = b"hotpot-commitment/2\0";

impl Commitment {
    pub fn sign(key: &NodeKey, step: StepRecord<'_>, sketches: Vec<Vec<u8>>) -> Self {
        let mut c = Self {
            session: step.session,
            model: step.model,
            span: step.span,
            start_pos: step.start_pos,
            rows: step.rows,
            input_hash: hash(step.input),
            output_hash: hash(step.output),
            node: key.id(),
            sketches,
            signature: Signature([0; 64]),
        };
        c.signature = key.sign(&c.signed_message());
        c
    }

    /// The exact bytes the signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(DOMAIN.len() + 160);
        m.extend_from_slice(DOMAIN);
        m.extend_from_slice(&self.session.0);
        m.extend_from_slice(self.model.as_bytes());
        m.extend_from_slice(&self.span.start().to_le_bytes());
        m.extend_from_slice(&self.span.end().to_le_bytes());
        m.extend_from_slice(&self.start_pos.to_le_bytes());
        m.extend_from_slice(&self.rows.to_le_bytes());
        m.extend_from_slice(&self.input_hash);
        m.extend_from_slice(&self.output_hash);
        m.extend_from_slice(self.node.as_bytes());
        m.extend_from_slice(&(self.sketches.len() as u32).to_le_bytes());
        for sketch in &self.sketches {
            m.extend_from_slice(&(sketch.len() as u32).to_le_bytes());
            m.extend_from_slice(sketch);
        }
        m
    }

    /// Checks the signature, and that the commitment describes `step`
    /// signed by `node`.
    pub fn check(&self, node: NodeId, step: StepRecord<'_>) -> Result<(), CommitmentError> {
        if self.node != node {
            return Err(CommitmentError::Mismatch("signed by another node"));
        }
        self.node.verify(&self.signed_message(), &self.signature)?;
        let fields = [
            (self.session == step.session, "session"),
            (self.model == step.model, "model"),
            (self.span == step.span, "span"),
            (self.start_pos == step.start_pos && self.rows == step.rows, "positions"),
            (self.input_hash == hash(step.input), "input bytes"),
            (self.output_hash == hash(step.output), "output bytes"),
        ];
        match fields.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(CommitmentError::Mismatch(what)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step<'a>(input: &'a [u8], output: &'a [u8]) -> StepRecord<'a> {
        StepRecord {
            session: SessionId([7; 16]),
            model: ModelId::from_bytes([1; 32]),
            span: LayerSpan::new(0, 10).expect("span"),
            start_pos: 5,
            rows: 1,
            input,
            output,
        }
    }

    #[test]
    fn signed_commitments_check_out() {
        let key = NodeKey::generate();
        let c = Commitment::sign(&key, step(b"in", b"out"), vec![vec![1, 2, 3]]);
        assert_eq!(c.check(key.id(), step(b"in", b"out")), Ok(()));
        assert_eq!(c.check(key.id(), step(b"in!", b"out")), Err(CommitmentError::Mismatch("input bytes")));
        assert_eq!(c.check(key.id(), step(b"in", b"ou")), Err(CommitmentError::Mismatch("output bytes")));
        assert!(c.check(NodeKey::generate().id(), step(b"in", b"out")).is_err());
        let mut forged = c.clone();
        forged.start_pos = 6;
        assert!(matches!(forged.check(key.id(), step(b"in", b"out")), Err(CommitmentError::Signature(_))));
        let mut resketched = c.clone();
        resketched.sketches[0][0] = 9;
        assert!(matches!(resketched.check(key.id(), step(b"in", b"out")), Err(CommitmentError::Signature(_))));
    }
}
