//! The market contract as a [`StakeBook`]: the second backend of the
//! market operations the embedded books keep (`hotpot_ledger`), and the
//! one the same conformance tests run against.

use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use hotpot_core::Credits;
use hotpot_ledger::StakeBook;

use crate::{ChainError, Market, Outbox, Wallet};

/// The market at `market` on the chain at `rpc`, operated by a registered
/// gateway (which signs and pays receipts from its deposit) and a quorum
/// of registered auditors (the first is the accuser); nodes are wallets.
pub struct ChainStakes {
    rpc: String,
    gateway: Market,
    gateway_wallet: Wallet,
    auditors: Vec<(Wallet, Market)>,
    /// The gateway's vouchers (receipt ids counted once into each total).
    outbox: Outbox,
    wei_per_micro: U256,
    unbonding: Duration,
    accuser_ppm: u32,
}

impl ChainStakes {
    pub async fn new(rpc: &str, market: Address, gateway: Wallet, auditors: Vec<Wallet>) -> Result<Self, ChainError> {
        if auditors.is_empty() {
            return Err(ChainError::Invalid("a slash needs at least one auditor".into()));
        }
        let gateway_market = Market::connect(rpc, &gateway, market).await?;
        let config = gateway_market.config().await?;
        let mut with_markets = Vec::new();
        for a in auditors {
            let m = Market::connect(rpc, &a, market).await?;
            with_markets.push((a, m));
        }
        Ok(Self {
            rpc: rpc.to_string(),
            gateway: gateway_market,
            gateway_wallet: gateway,
            auditors: with_markets,
            outbox: Outbox::in_memory()?,
            wei_per_micro: config.wei_per_micro_credit,
            unbonding: Duration::from_secs(config.unbonding_delay_s),
            accuser_ppm: config.accuser_share_ppm,
        })
    }

    async fn as_node(&self, node: &Wallet) -> Result<Market, ChainError> {
        Market::connect(&self.rpc, node, self.gateway.address()).await
    }

    fn wei(&self, c: Credits) -> U256 {
        self.wei_per_micro * U256::from(c.micros())
    }

    fn credits(&self, wei: U256) -> Credits {
        Credits::from_micros((wei / self.wei_per_micro).saturating_to())
    }
}

/// A revert whose reason contains `what`, as `Ok(value)`.
fn tolerate<T>(r: Result<T, ChainError>, what: &[&str], value: T) -> Result<T, ChainError> {
    match r {
        Err(ChainError::Reverted(m)) if what.iter().any(|w| m.contains(w)) => Ok(value),
        other => other,
    }
}

impl StakeBook for ChainStakes {
    type Node = Wallet;
    type Error = ChainError;

    async fn stake(&self, node: &Wallet, amount: Credits) -> Result<(), ChainError> {
        self.as_node(node).await?.stake(self.wei(amount)).await.map(|_| ())
    }

    async fn stake_of(&self, node: &Wallet) -> Result<Credits, ChainError> {
        Ok(self.credits(self.gateway.stake_of(node.address()).await?))
    }

    async fn unbond(&self, node: &Wallet, amount: Credits) -> Result<(), ChainError> {
        self.as_node(node).await?.request_unstake(self.wei(amount)).await.map(|_| ())
    }

    async fn withdraw(&self, node: &Wallet) -> Result<Credits, ChainError> {
        let (wei, _) = self.gateway.unstaking(node.address()).await?;
        let paid = self.as_node(node).await?.withdraw().await.map(|_| self.credits(wei));
        tolerate(paid, &["not withdrawable before", "nothing to do"], Credits::ZERO)
    }

    async fn settle(&self, id: [u8; 32], node: &Wallet, amount: Credits) -> Result<bool, ChainError> {
        let (chain_id, market, gateway) = (self.gateway.chain_id(), self.gateway.address(), self.gateway_wallet.address());
        let paid = if self.outbox.has_pair(chain_id, market, gateway, node.address())? { 0 } else { self.gateway.paid_to(gateway, node.address()).await? };
        let voucher = self.outbox.issue(&self.gateway, &self.gateway_wallet, B256::from(id), node.address(), amount.micros(), paid)?;
        tolerate(self.gateway.settle(&[voucher]).await.map(|_| true), &["already settled"], false)
    }

    async fn earned(&self, node: &Wallet) -> Result<Credits, ChainError> {
        Ok(self.credits(self.gateway.earnings_of(node.address()).await?))
    }

    async fn slash(&self, node: &Wallet, conviction: [u8; 32]) -> Result<Credits, ChainError> {
        let at_stake = self.gateway.stake_of(node.address()).await? + self.gateway.unstaking(node.address()).await?.0;
        let signed =
            self.auditors.iter().map(|(w, m)| m.sign_conviction(w, node.address(), B256::ZERO, B256::from(conviction))).collect::<Result<Vec<_>, _>>()?;
        let accuser = &self.auditors[0].1;
        tolerate(accuser.slash(&signed).await.map(|_| self.credits(at_stake)), &["already slashed", "nothing to do"], Credits::ZERO)
    }

    async fn accuser_earned(&self) -> Result<Credits, ChainError> {
        Ok(self.credits(self.gateway.earnings_of(self.auditors[0].0.address()).await?))
    }

    async fn burned(&self) -> Result<Credits, ChainError> {
        Ok(self.credits(self.gateway.burned().await?))
    }

    fn unbonding(&self) -> Duration {
        self.unbonding
    }

    fn accuser_ppm(&self) -> u32 {
        self.accuser_ppm
    }
}
