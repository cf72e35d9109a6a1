//! The gateway's side of the market: what a prepaid key's request holds,
//! the receipts each session's nodes countersign, how they are settled,
//! which nodes have enough at stake to be routed through, and what a
//! conviction costs the convicted node.
//!
//! ```text
//! request ─ hold (most it may cost) ─▶ sessions ─ receipts (gateway signs, node countersigns)
//!        ─▶ settle each receipt once (node: its price × positions) + the fee ─▶ release the rest
//! conviction ─▶ void that session's receipts (pay back the key) ─▶ slash the stake (accuser share + burn)
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hotpot_core::{Credits, NodeKey, Receipt, SessionId};
use hotpot_ledger::{Books, Holder, LedgerError, Payment, ReceiptBook, Settlement};
use hotpot_net::PeerId;

use crate::error::ApiError;
use crate::session::SessionRecord;

/// The books, the receipts and the rules of this gateway's market.
pub struct Market {
    pub books: Books,
    /// Where the receipts this gateway signed are kept.
    pub receipts: Option<Arc<ReceiptBook>>,
    /// The gateway's own price per 1,000 positions of a session.
    pub fee_per_1k: Credits,
    /// Nodes with less at stake are kept out of routes.
    pub min_stake: Credits,
    /// Parts per million of a slashed stake that go to the gateway whose
    /// audit convicted (the rest is burned).
    pub accuser_ppm: u32,
}

/// What a conviction cost the convicted node, written beside the evidence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Penalty {
    pub node: String,
    /// The evidence's BLAKE3 (hex).
    pub conviction: String,
    /// The convicted session's receipts, now void, and what went back to
    /// the keys that paid them.
    pub voided_receipts: Vec<String>,
    pub refunded: String,
    pub slashed: String,
    pub accuser_share: String,
    pub burned: String,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn unavailable(e: LedgerError) -> ApiError {
    tracing::error!(error = %e, "the books refused an operation");
    ApiError::Internal("the books are unavailable".into())
}

impl Market {
    /// Holds `most` of `key`'s credits for `request`, or refuses with 429
    /// `insufficient_quota`.
    pub(crate) fn hold(self: &Arc<Self>, key: &str, request: &str, most: Credits) -> Result<CreditHold, ApiError> {
        match self.books.hold(key, request, most) {
            Ok(_) => Ok(CreditHold { market: Arc::clone(self), key: key.to_string(), request: request.to_string() }),
            Err(LedgerError::Insufficient { balance, .. }) => Err(ApiError::RateLimited {
                message: format!("this request may cost up to {most} credits and this key has {balance} (lower max_tokens or n, or deposit credits)"),
                code: "insufficient_quota",
            }),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Whether `peer` has enough at stake to be routed through.
    pub fn staked_enough(&self, peer: &PeerId) -> bool {
        if self.min_stake.is_zero() {
            return true;
        }
        match self.books.stake_of(&peer.to_string()) {
            Ok(stake) => stake >= self.min_stake,
            Err(e) => {
                tracing::error!(error = %e, "cannot read a node's stake; keeping it out of routes");
                false
            }
        }
    }

    /// A prepaid key's credits and what its running requests hold.
    pub(crate) fn credits_of(&self, key: &str) -> Result<(Credits, Credits), ApiError> {
        let credits = self.books.balance(&hotpot_ledger::Account::Key(key.into())).map_err(unavailable)?;
        Ok((credits, self.books.held_by(key).map_err(unavailable)?))
    }

    /// Keeps the receipts of a finished session and, when a prepaid key's
    /// hold pays for it, settles each once (by its id) and the fee.
    /// Returns what the session cost.
    pub(crate) fn settle(&self, record: &SessionRecord, receipts: &[Receipt], hold: Option<&CreditHold>) -> Credits {
        if let Some(book) = &self.receipts {
            for r in receipts {
                if let Err(e) = book.keep_paid(Holder::Gateway, r, hold.map(|h| (h.key.as_str(), h.request.as_str()))) {
                    tracing::error!(session = %record.id, error = %e, "cannot keep a receipt");
                }
            }
        }
        let Some(hold) = hold else { return Credits::ZERO };
        let mut cost = Credits::ZERO;
        for r in receipts {
            cost = cost.checked_add(self.settle_receipt(r, &hold.key, &hold.request)).unwrap_or(cost);
        }
        let positions = record.route.iter().map(|s| s.positions).max().unwrap_or(0);
        let fee = self.fee_per_1k.per(1000, positions as u64).unwrap_or(Credits::ZERO);
        let settlement = Settlement { receipt: format!("fee:{}", record.id), key: hold.key.clone(), request: hold.request.clone(), payments: Vec::new(), fee };
        match self.books.settle(&settlement) {
            Ok(hotpot_ledger::Posted::New(_)) => cost.checked_add(fee).unwrap_or(cost),
            Ok(_) => cost,
            Err(e) => {
                tracing::error!(session = %record.id, error = %e, "cannot settle the fee in the books");
                cost
            }
        }
    }

    /// Pays `receipt`'s node from `key` (its request's hold first), once
    /// per receipt id. Returns what was paid now.
    fn settle_receipt(&self, receipt: &Receipt, key: &str, request: &str) -> Credits {
        let Some(peer) = hotpot_net::peer_id_of(&receipt.node) else { return Credits::ZERO };
        let settlement = Settlement {
            receipt: receipt.id_hex(),
            key: key.to_string(),
            request: request.to_string(),
            payments: vec![Payment { node: peer.to_string(), amount: receipt.amount }],
            fee: Credits::ZERO,
        };
        match self.books.settle(&settlement) {
            Ok(hotpot_ledger::Posted::New(_)) => receipt.amount,
            Ok(_) => Credits::ZERO,
            Err(e) => {
                tracing::error!(receipt = %receipt.id_hex(), error = %e, "cannot settle a receipt in the books");
                Credits::ZERO
            }
        }
    }

    /// At start: releases the holds of requests that died with the last
    /// process, then settles the receipts it kept but had not settled yet
    /// (from their keys), so that a kill between the two loses nothing.
    pub(crate) fn recover(&self) {
        match self.books.release_all_holds() {
            Ok(0) => {}
            Ok(n) => tracing::info!(holds = n, "released the credit holds of requests that did not finish before the last stop"),
            Err(e) => tracing::error!(error = %e, "cannot release old credit holds"),
        }
        let Some(book) = &self.receipts else { return };
        let pending = match book.payers() {
            Ok(all) => all.into_iter().filter(|(r, _, _)| !self.books.ledger().posted(&r.id_hex()).unwrap_or(true)).collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the kept receipts");
                return;
            }
        };
        for (receipt, key, request) in &pending {
            self.settle_receipt(receipt, key, request);
        }
        if !pending.is_empty() {
            tracing::info!(receipts = pending.len(), "settled the receipts kept but not settled before the last stop");
        }
    }

    /// A conviction's cost to `peer`: the convicted session's receipts are
    /// voided (what they paid goes back to the keys), then everything it
    /// has at stake is slashed, a share to this gateway, the rest burned.
    pub(crate) fn punish(&self, peer: &PeerId, node: &hotpot_core::NodeId, session: Option<SessionId>, conviction: &str) -> Penalty {
        let account = peer.to_string();
        let mut voided = Vec::new();
        let mut refunded = Credits::ZERO;
        if let (Some(book), Some(session)) = (&self.receipts, session) {
            match book.void_session(node, &session, conviction) {
                Ok(receipts) => {
                    for r in receipts {
                        match self.books.void(&r.id_hex(), &account) {
                            Ok(back) => refunded = refunded.checked_add(back).unwrap_or(refunded),
                            Err(e) => tracing::error!(error = %e, "cannot void a receipt's settlement"),
                        }
                        voided.push(r.id_hex());
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot void the convicted session's receipts"),
            }
        }
        let slashed = self.books.slash(&account, conviction, self.accuser_ppm).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot slash a convicted node's stake");
            Credits::ZERO
        });
        let share = slashed.share_ppm(self.accuser_ppm);
        tracing::warn!(%peer, %slashed, %refunded, receipts = voided.len(), "the convicted node's stake is slashed and its session's receipts are void");
        Penalty {
            node: account,
            conviction: conviction.to_string(),
            voided_receipts: voided,
            refunded: refunded.to_string(),
            slashed: slashed.to_string(),
            accuser_share: share.to_string(),
            burned: slashed.saturating_sub(share).to_string(),
        }
    }
}

/// Receipts for a session's remote stages, signed by the gateway: each
/// node's positions at the price it asked when its stage connected.
pub fn receipts_for(key: &NodeKey, record: &SessionRecord) -> Vec<Receipt> {
    let time_ms = now_ms();
    record
        .route
        .iter()
        .filter(|s| s.positions > 0 && s.peer.is_some())
        .filter_map(|s| {
            let (node, session) = (s.node?, s.commitments.first()?.session);
            Some(Receipt::sign(
                key,
                session,
                record.model_id,
                node,
                s.span,
                s.positions as u64,
                Credits::from_micros(s.price_per_1k),
                hotpot_core::commitments_root(&s.commitments),
                time_ms,
            ))
        })
        .collect()
}

/// Where a conviction's penalty is written: beside its evidence.
pub(crate) fn penalty_path(evidence: &std::path::Path) -> PathBuf {
    evidence.with_extension("penalty.json")
}

/// Credits a request holds in the books; what is left when the request's
/// last session ends goes back to the key.
pub(crate) struct CreditHold {
    market: Arc<Market>,
    key: String,
    request: String,
}

impl Drop for CreditHold {
    fn drop(&mut self) {
        if let Err(e) = self.market.books.release(&self.key, &self.request) {
            tracing::error!(key = %self.key, error = %e, "cannot release a credit hold (it is released at the next start)");
        }
    }
}
