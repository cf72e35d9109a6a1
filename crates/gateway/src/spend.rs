//! A key's spend log: every charge, hash-chained and signed by the
//! gateway, so that whoever holds the key (an agent, its owner, an
//! auditor) can check offline what was charged and that nothing was
//! changed, removed or reordered since.
//!
//! Entry `n` holds `prev_hash` = the hash of entry `n − 1` (zeros for the
//! first); its `hash` covers every field but the signature, and the
//! gateway signs the hash. `GET /v1/hotpot/spend` returns the entries with
//! a signed head (how many entries there are and the last hash, signed
//! when served), so that cutting entries off the end is caught too.
//! `hotpot spend verify FILE --gateway PEER_ID` checks all of it.

use hotpot_core::{Credits, NodeId, NodeKey, Signature, hex, unhex};
use serde::{Deserialize, Serialize};

const ENTRY_DOMAIN: &[u8] = b"hotpot-spend/1 entry\0";
const HEAD_DOMAIN: &[u8] = b"hotpot-spend/1 head\0";

/// One charge to one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendEntry {
    /// The key's name.
    pub key: String,
    /// 1, 2, 3, … per key.
    pub seq: u64,
    pub time_ms: u64,
    /// The session charged (`<request id>/<choice>`).
    pub session: String,
    pub model: String,
    /// Positions the session ran through the swarm (prompt and generated).
    pub positions: u64,
    /// Tokens billed (prompt once per prompt, plus generated).
    pub tokens: u64,
    /// Credits charged (0 for a key that does not pay in credits).
    pub amount: Credits,
    /// What the key had left after the charge, when it has a credit limit
    /// or prepaid credits.
    pub balance_after: Option<Credits>,
    pub prev_hash: String,
    pub hash: String,
    pub signature: String,
}

/// The log's end, signed when served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpendHead {
    pub key: String,
    pub entries: u64,
    pub last_hash: String,
    pub signature: String,
}

/// What `GET /v1/hotpot/spend` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpendLog {
    /// The gateway's peer id (its public key).
    pub gateway: String,
    pub entries: Vec<SpendEntry>,
    pub head: SpendHead,
}

/// What a new entry says.
#[derive(Debug, Clone)]
pub struct Charge {
    pub session: String,
    pub model: String,
    pub positions: u64,
    pub tokens: u64,
    pub amount: Credits,
    pub balance_after: Option<Credits>,
}

fn zeros() -> String {
    hex(&[0; 32])
}

fn text_bytes(m: &mut Vec<u8>, text: &str) {
    m.extend_from_slice(&(text.len() as u64).to_le_bytes());
    m.extend_from_slice(text.as_bytes());
}

impl SpendEntry {
    /// The entry after `previous` (none: the first) for `charge`, signed.
    pub fn sign(gateway: &NodeKey, key: &str, previous: Option<&SpendEntry>, time_ms: u64, charge: Charge) -> Self {
        let mut e = Self {
            key: key.to_string(),
            seq: previous.map_or(1, |p| p.seq + 1),
            time_ms,
            session: charge.session,
            model: charge.model,
            positions: charge.positions,
            tokens: charge.tokens,
            amount: charge.amount,
            balance_after: charge.balance_after,
            prev_hash: previous.map_or_else(zeros, |p| p.hash.clone()),
            hash: String::new(),
            signature: String::new(),
        };
        e.hash = hex(&e.compute_hash());
        e.signature = hex(&gateway.sign(&Self::signed(&e.hash)).0);
        e
    }

    fn compute_hash(&self) -> [u8; 32] {
        let mut m = ENTRY_DOMAIN.to_vec();
        text_bytes(&mut m, &self.key);
        m.extend_from_slice(&self.seq.to_le_bytes());
        m.extend_from_slice(&self.time_ms.to_le_bytes());
        text_bytes(&mut m, &self.session);
        text_bytes(&mut m, &self.model);
        m.extend_from_slice(&self.positions.to_le_bytes());
        m.extend_from_slice(&self.tokens.to_le_bytes());
        m.extend_from_slice(&self.amount.micros().to_le_bytes());
        match self.balance_after {
            Some(b) => {
                m.push(1);
                m.extend_from_slice(&b.micros().to_le_bytes());
            }
            None => m.push(0),
        }
        text_bytes(&mut m, &self.prev_hash);
        hotpot_core::hash(&m)
    }

    fn signed(hash: &str) -> Vec<u8> {
        [ENTRY_DOMAIN, hash.as_bytes()].concat()
    }
}

impl SpendHead {
    pub fn sign(gateway: &NodeKey, key: &str, entries: &[SpendEntry]) -> Self {
        let last_hash = entries.last().map_or_else(zeros, |e| e.hash.clone());
        let n = entries.len() as u64;
        let signature = hex(&gateway.sign(&Self::signed(key, n, &last_hash)).0);
        Self { key: key.to_string(), entries: n, last_hash, signature }
    }

    fn signed(key: &str, entries: u64, last_hash: &str) -> Vec<u8> {
        let mut m = HEAD_DOMAIN.to_vec();
        text_bytes(&mut m, key);
        m.extend_from_slice(&entries.to_le_bytes());
        text_bytes(&mut m, last_hash);
        m
    }
}

fn check_signature(gateway: &NodeId, message: &[u8], signature: &str) -> Result<(), String> {
    let bytes: [u8; 64] = unhex(signature).ok_or("a signature is not 128 hex digits")?;
    gateway.verify(message, &Signature(bytes)).map_err(|e| e.to_string())
}

/// Checks a whole log against the gateway's public key: every entry's
/// hash and signature, the chain (sequence and previous hashes), one key
/// throughout, and the signed head. Returns the total charged.
pub fn verify(log: &SpendLog, gateway: &NodeId) -> Result<Credits, String> {
    let mut previous: Option<&SpendEntry> = None;
    let mut total = Credits::ZERO;
    for (i, e) in log.entries.iter().enumerate() {
        let at = |what: &str| format!("entry {} (seq {}): {what}", i + 1, e.seq);
        if e.key != log.head.key {
            return Err(at("belongs to another key"));
        }
        if e.seq != previous.map_or(1, |p| p.seq + 1) {
            return Err(at("out of sequence (an entry was removed or moved)"));
        }
        if e.prev_hash != previous.map_or_else(zeros, |p| p.hash.clone()) {
            return Err(at("does not follow the entry before it"));
        }
        if e.hash != hex(&e.compute_hash()) {
            return Err(at("its hash does not match what it says (it was changed)"));
        }
        check_signature(gateway, &SpendEntry::signed(&e.hash), &e.signature).map_err(|why| at(&format!("the gateway's signature does not hold: {why}")))?;
        if previous.is_some_and(|p| p.time_ms > e.time_ms) {
            return Err(at("earlier than the entry before it"));
        }
        total = total.checked_add(e.amount).ok_or_else(|| at("the amounts overflow"))?;
        previous = Some(e);
    }
    let head = &log.head;
    check_signature(gateway, &SpendHead::signed(&head.key, head.entries, &head.last_hash), &head.signature)
        .map_err(|why| format!("the head's signature does not hold: {why}"))?;
    if head.entries != log.entries.len() as u64 || head.last_hash != previous.map_or_else(zeros, |p| p.hash.clone()) {
        return Err(format!(
            "the signed head names {} entries ending in {}…; the log has {}",
            head.entries,
            &head.last_hash[..12.min(head.last_hash.len())],
            log.entries.len()
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(gateway: &NodeKey, n: usize) -> SpendLog {
        let mut entries: Vec<SpendEntry> = Vec::new();
        for i in 0..n {
            let charge = Charge {
                session: format!("chatcmpl-{i}/0"),
                model: "m".into(),
                positions: 10 + i as u64,
                tokens: 5,
                amount: Credits::from_micros(1000 * (i as u64 + 1)),
                balance_after: Some(Credits::from_micros(1_000_000 - 1000 * (i as u64 + 1))),
            };
            let entry = SpendEntry::sign(gateway, "alice", entries.last(), 1000 + i as u64, charge);
            entries.push(entry);
        }
        let head = SpendHead::sign(gateway, "alice", &entries);
        SpendLog { gateway: String::new(), entries, head }
    }

    #[test]
    fn logs_verify_and_every_tampering_is_caught() {
        let gateway = NodeKey::generate();
        let good = log(&gateway, 4);
        assert_eq!(verify(&good, &gateway.id()), Ok(Credits::from_micros(10_000)));
        assert!(verify(&good, &NodeKey::generate().id()).is_err(), "another gateway's key");
        let mut changed = good.clone();
        changed.entries[1].amount = Credits::from_micros(1);
        assert!(verify(&changed, &gateway.id()).unwrap_err().contains("changed"));
        let mut removed = good.clone();
        removed.entries.remove(2);
        assert!(verify(&removed, &gateway.id()).is_err());
        let mut reordered = good.clone();
        reordered.entries.swap(0, 1);
        assert!(verify(&reordered, &gateway.id()).is_err());
        let mut cut = good.clone();
        cut.entries.pop();
        assert!(verify(&cut, &gateway.id()).unwrap_err().contains("head"), "cutting the end is caught by the head");
        let mut resigned = good;
        resigned.entries[3].amount = Credits::ZERO;
        resigned.entries[3].hash = hex(&resigned.entries[3].compute_hash());
        assert!(verify(&resigned, &gateway.id()).unwrap_err().contains("signature"), "a recomputed hash is not the gateway's");
    }
}
