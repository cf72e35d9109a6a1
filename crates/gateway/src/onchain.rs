//! The gateway's market on a chain (DESIGN §14): the second backend of the
//! market beside the embedded books.
//!
//! Users' keys stay credits in this gateway's books; what the gateway owes
//! nodes, and what nodes stake, live on the chain:
//!
//! ```text
//! session ends ─▶ receipt per stage ─▶ counted into the node's running total; the new total
//!                 signed for the contract (a voucher, EIP-712), sent with the receipt to its node
//!                 (which keeps the latest) and kept here (gateway-chain-receipts.sqlite)
//!             ─▶ once a node's voucher covers --settle-every receipts not settled (or one is
//!                 --settle-after seconds old): one settle() transaction with every such voucher,
//!                 paying what each total adds, from this gateway's deposit to the node
//! routing     ─▶ a node's stake read from the contract (refreshed every few seconds)
//! conviction  ─▶ signed (node wallet, model, evidence hash), gossiped; gateways that confirm it
//!                 with their own audit sign too; the accuser submits slash() once the quorum signed
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hotpot_chain::{Address, B256, Market, Outbox, SignedConviction, U256, Wallet, WalletBinding};
use hotpot_core::{Credits, ModelId, NodeId, Receipt};
use hotpot_wire::{ChainPayment, ConvictionSignature, WalletProof};

use crate::directory::SharedDirectory;

/// How often stakes are read again from the chain.
const STAKES_EVERY: Duration = Duration::from_secs(2);

/// What a gateway needs to use a market on a chain.
#[derive(Debug, Clone)]
pub struct OnChainConfig {
    pub rpc: String,
    pub market: Address,
    pub wallet: Wallet,
    /// Where the vouchers signed for the contract are kept until settled.
    pub receipts: PathBuf,
    /// A node's voucher is settled once it covers this many receipts not
    /// settled yet.
    pub settle_every: usize,
    /// A voucher with a receipt this old not settled is settled even if
    /// it covers fewer.
    pub settle_after: Duration,
    /// Nodes with less at stake on chain are kept out of routes.
    pub min_stake: Credits,
}

/// The gateway's handle on the market contract.
pub struct OnChain {
    pub market: Market,
    wallet: Wallet,
    outbox: Outbox,
    settle_every: usize,
    settle_after: Duration,
    min_stake_wei: U256,
    wei_per_micro: U256,
    quorum: usize,
    /// Stakes last read from the chain, by the peer whose wallet holds it
    /// (read by routing, which must not wait on the chain or the directory).
    stakes: Mutex<HashMap<hotpot_net::PeerId, U256>>,
    /// Nodes' verified wallet bindings.
    wallets: Mutex<HashMap<NodeId, (WalletProof, Address)>>,
    /// Conviction signatures collected for this gateway's own convictions.
    convictions: Mutex<HashMap<(Address, [u8; 32]), Collected>>,
    /// Serializes settlement rounds.
    settling: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Collected {
    signatures: Vec<SignedConviction>,
    /// Slashed on chain (by this gateway or anyone).
    done: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl OnChain {
    /// Connects to the market and starts settling (a task on the current
    /// runtime, ending when the handle is dropped).
    pub async fn start(config: OnChainConfig) -> Result<Arc<Self>, hotpot_chain::ChainError> {
        let market = Market::connect(&config.rpc, &config.wallet, config.market).await?;
        let chain_config = market.config().await?;
        if !market.is_gateway(config.wallet.address()).await? {
            tracing::warn!(wallet = %config.wallet.address(), market = %config.market,
                "this gateway's wallet is not registered with the market: nodes cannot settle its receipts and it cannot co-sign convictions until the owner registers it");
        }
        let outbox = Outbox::open(&config.receipts)?;
        let this = Arc::new(Self {
            wei_per_micro: chain_config.wei_per_micro_credit,
            min_stake_wei: chain_config.wei_per_micro_credit * U256::from(config.min_stake.micros()),
            quorum: chain_config.quorum as usize,
            market,
            wallet: config.wallet,
            outbox,
            settle_every: config.settle_every.max(1),
            settle_after: config.settle_after,
            stakes: Mutex::default(),
            wallets: Mutex::default(),
            convictions: Mutex::default(),
            settling: tokio::sync::Mutex::new(()),
        });
        tracing::info!(market = %this.market.address(), chain = this.market.chain_id(), wallet = %this.wallet.address(), "settling on chain");
        this.spawn_settler();
        Ok(this)
    }

    pub fn wallet(&self) -> Address {
        self.wallet.address()
    }

    /// The wallet `node` announced, when its binding verifies.
    pub fn wallet_of(&self, directory: &SharedDirectory, node: &NodeId) -> Option<Address> {
        let proof = directory.with(|d| d.all().into_iter().find(|r| r.info.node == *node).and_then(|r| r.info.wallet))?;
        if let Some((known, address)) = lock(&self.wallets).get(node)
            && *known == proof
        {
            return Some(*address);
        }
        let binding = WalletBinding {
            address: Address::from(proof.address),
            node: *node,
            node_signature: proof.node_signature.0.to_vec(),
            wallet_signature: proof.wallet_signature.to_vec(),
        };
        match binding.verify() {
            Ok(()) => {
                lock(&self.wallets).insert(*node, (proof, binding.address));
                Some(binding.address)
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "a node's wallet binding does not verify; it is not paid or routed on chain");
                None
            }
        }
    }

    /// Counts `receipt` into what this gateway owes `node`'s wallet and
    /// signs the new total for the contract (a voucher, kept until settled),
    /// for the node. A pair this gateway has no voucher for starts from what
    /// the chain says it was paid.
    pub async fn payment(&self, receipt: &Receipt, node: Address) -> Option<ChainPayment> {
        if receipt.amount.is_zero() {
            return None;
        }
        let (chain_id, market, gateway) = (self.market.chain_id(), self.market.address(), self.wallet.address());
        let issued = async {
            let paid = if self.outbox.has_pair(chain_id, market, gateway, node)? { 0 } else { self.market.paid_to(gateway, node).await? };
            self.outbox.issue(&self.market, &self.wallet, B256::from(receipt.id()), node, receipt.amount.micros(), paid)
        };
        let voucher = match issued.await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(receipt = %receipt.id_hex(), error = %e, "cannot sign or keep a voucher for the chain");
                return None;
            }
        };
        let signature: [u8; 65] = voucher.signature.as_slice().try_into().ok()?;
        Some(ChainPayment { chain_id, market: market.into_array(), node: node.into_array(), gateway: gateway.into_array(), total: voucher.total, signature })
    }

    /// Whether routes need a stake at all.
    pub fn needs_stake(&self) -> bool {
        !self.min_stake_wei.is_zero()
    }

    /// What `peer`'s wallet has at stake, in credits, as last read from
    /// the chain.
    pub fn stake_of(&self, peer: &hotpot_net::PeerId) -> Option<Credits> {
        let wei = *lock(&self.stakes).get(peer)?;
        Some(Credits::from_micros((wei / self.wei_per_micro).saturating_to()))
    }

    /// Whether `peer` has enough at stake (as last read from the chain; a
    /// node without a verified wallet has none).
    pub fn staked_enough(&self, peer: &hotpot_net::PeerId) -> bool {
        !self.needs_stake() || lock(&self.stakes).get(peer).is_some_and(|s| *s >= self.min_stake_wei)
    }

    /// Settles what is due: each node's latest voucher once it covers
    /// `settle_every` receipts not settled yet, or one older than
    /// `settle_after` (`force`: every voucher pending), all in one
    /// transaction. Returns the receipts settled.
    pub async fn settle_due(&self, force: bool) -> Result<u64, hotpot_chain::ChainError> {
        let _one = self.settling.lock().await;
        let now = crate::market::now_ms();
        let due: Vec<_> = self
            .outbox
            .pending(self.market.chain_id(), self.market.address())?
            .into_iter()
            .filter(|p| force || p.unsettled_receipts >= self.settle_every as u64 || now.saturating_sub(p.since_ms) >= self.settle_after.as_millis() as u64)
            .collect();
        if due.is_empty() {
            return Ok(0);
        }
        let done = self.outbox.settle(&self.market, hotpot_chain::MAX_BATCH, due).await?;
        for tx in &done.sent {
            tracing::info!(tx = %tx.tx, gas = tx.gas_used, receipts = done.receipts, micros = done.micros, "settled vouchers on chain");
        }
        if done.already > 0 {
            tracing::info!(vouchers = done.already, "vouchers were already settled on chain (by their nodes, or just before a restart)");
        }
        Ok(done.receipts)
    }

    fn spawn_settler(self: &Arc<Self>) {
        let this: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                tokio::time::sleep(Duration::from_secs(1) * (1 << failures.min(5))).await;
                let Some(this) = this.upgrade() else { return };
                match this.settle_due(false).await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::error!(error = %e, "settling vouchers on chain failed; they stay pending and are tried again");
                    }
                }
            }
        });
    }

    /// Reads the stakes of `directory`'s nodes from the chain every few
    /// seconds, for routing.
    pub fn follow(self: &Arc<Self>, directory: SharedDirectory) {
        let this: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = this.upgrade() else { return };
                let nodes: Vec<(hotpot_net::PeerId, NodeId)> = directory.with(|d| d.all().into_iter().map(|r| (r.peer, r.info.node)).collect());
                for (peer, node) in nodes {
                    let Some(wallet) = me.wallet_of(&directory, &node) else { continue };
                    match me.market.stake_of(wallet).await {
                        Ok(stake) => {
                            lock(&me.stakes).insert(peer, stake);
                        }
                        Err(e) => tracing::debug!(%wallet, error = %e, "cannot read a stake"),
                    }
                }
                drop(me);
                tokio::time::sleep(STAKES_EVERY).await;
            }
        });
    }

    /// Signs a conviction (as its accuser when `accuser`: this gateway
    /// then collects the others' signatures and submits the slash).
    pub fn sign_conviction(&self, node: Address, model: &ModelId, evidence: [u8; 32], accuser: bool) -> Option<ConvictionSignature> {
        let signed = match self.market.sign_conviction(&self.wallet, node, B256::from(*model.as_bytes()), B256::from(evidence)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a conviction");
                return None;
            }
        };
        if accuser {
            let mut all = lock(&self.convictions);
            let entry = all.entry((node, evidence)).or_default();
            if !entry.signatures.iter().any(|s| s.auditor == signed.auditor) {
                entry.signatures.push(signed.clone());
            }
        }
        Some(ConvictionSignature {
            chain_id: self.market.chain_id(),
            market: self.market.address().into_array(),
            node: node.into_array(),
            model: *model,
            evidence,
            auditor: signed.auditor.into_array(),
            signature: signed.signature.as_slice().try_into().ok()?,
        })
    }

    /// Takes another auditor's signature on one of this gateway's
    /// convictions; submits the slash once the quorum is in.
    pub async fn on_signature(&self, message: ConvictionSignature) {
        if message.chain_id != self.market.chain_id() || Address::from(message.market) != self.market.address() {
            return;
        }
        let signed = SignedConviction {
            node: Address::from(message.node),
            model: B256::from(*message.model.as_bytes()),
            evidence: B256::from(message.evidence),
            auditor: Address::from(message.auditor),
            signature: message.signature.to_vec(),
        };
        if let Err(e) = self.market.domain_matches(&signed) {
            tracing::warn!(auditor = %signed.auditor, error = %e, "ignoring a conviction signature that does not verify");
            return;
        }
        let key = (signed.node, message.evidence);
        {
            let mut all = lock(&self.convictions);
            // Only this gateway's own convictions are collected.
            let Some(entry) = all.get_mut(&key) else { return };
            if entry.done || entry.signatures.iter().any(|s| s.auditor == signed.auditor) {
                return;
            }
            tracing::info!(node = %signed.node, auditor = %signed.auditor, "an auditor co-signed our conviction");
            entry.signatures.push(signed);
        }
        self.try_slash(key).await;
    }

    /// Submits again every slash of this gateway's own convictions that
    /// has the quorum's signatures and is not done.
    pub async fn retry_slashes(&self) {
        let due: Vec<_> = lock(&self.convictions).iter().filter(|(_, c)| !c.done && c.signatures.len() >= self.quorum).map(|(k, _)| *k).collect();
        for key in due {
            self.try_slash(key).await;
        }
    }

    /// Submits the slash of a conviction once it has the quorum's
    /// signatures.
    pub async fn try_slash(&self, key: (Address, [u8; 32])) {
        let signatures = {
            let all = lock(&self.convictions);
            match all.get(&key) {
                Some(c) if !c.done && c.signatures.len() >= self.quorum => c.signatures.clone(),
                _ => return,
            }
        };
        match self.market.slash(&signatures).await {
            Ok(sent) => {
                tracing::warn!(node = %key.0, tx = %sent.tx, auditors = signatures.len(), "the convicted node's stake is slashed on chain");
                if let Some(c) = lock(&self.convictions).get_mut(&key) {
                    c.done = true;
                }
            }
            Err(hotpot_chain::ChainError::Reverted(reason)) if reason.contains("already slashed") || reason.contains("nothing to do") => {
                if let Some(c) = lock(&self.convictions).get_mut(&key) {
                    c.done = true;
                }
            }
            Err(e) => tracing::error!(node = %key.0, error = %e, "the slash was refused; waiting for more signatures"),
        }
    }

    /// Credits as wei on this market.
    pub fn wei(&self, credits: Credits) -> U256 {
        self.wei_per_micro * U256::from(credits.micros())
    }
}
