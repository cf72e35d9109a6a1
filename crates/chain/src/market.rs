//! The deployed `HotpotMarket`, as one wallet sees it: transactions sent
//! from the wallet one at a time (so nonces never race), each waited for
//! until mined, a revert decoded into the contract's reason.

use std::collections::BTreeSet;
use std::time::Duration;

use alloy::network::ReceiptResponse;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use serde::Serialize;

use crate::HotpotMarket::{self, HotpotMarketInstance};
use crate::signed::{SignedConviction, Voucher, sort_signatures};
use crate::{ChainError, Wallet};

/// How long one RPC exchange (sending, or waiting for a transaction to be
/// mined) may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// The contract's configuration, fixed at deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Seconds a stake stays slashable after `requestUnstake`.
    pub unbonding_delay_s: u64,
    /// Auditor signatures a slash needs.
    pub quorum: u64,
    /// The accuser's share of a slashed stake, parts per million.
    pub accuser_share_ppm: u32,
    /// Wei per micro-credit.
    pub wei_per_micro_credit: U256,
}

impl Default for Config {
    /// A week's unbonding, 2 auditors, half to the accuser, and one credit
    /// = 10^12 wei (10^-6 ETH).
    fn default() -> Self {
        Self { unbonding_delay_s: 7 * 24 * 3600, quorum: 2, accuser_share_ppm: 500_000, wei_per_micro_credit: U256::from(1_000_000u64) }
    }
}

/// A mined transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sent {
    pub tx: B256,
    pub gas_used: u64,
    /// What the sender paid for the gas, in wei.
    pub fee_wei: U256,
    pub block: u64,
}

impl Sent {
    fn of(r: &alloy::rpc::types::TransactionReceipt) -> Self {
        Self {
            tx: r.transaction_hash(),
            gas_used: r.gas_used(),
            fee_wei: U256::from(r.gas_used()) * U256::from(r.effective_gas_price()),
            block: r.block_number().unwrap_or(0),
        }
    }
}

/// One party's handle on the market contract.
#[derive(Clone)]
pub struct Market {
    contract: HotpotMarketInstance<DynProvider>,
    chain_id: u64,
    from: Address,
    /// One transaction at a time from this wallet.
    sending: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Market {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Market({} on chain {}, from {})", self.address(), self.chain_id, self.from)
    }
}

async fn timed<T, E: std::fmt::Display>(what: &str, f: impl IntoFuture<Output = Result<T, E>>) -> Result<T, ChainError> {
    match tokio::time::timeout(RPC_TIMEOUT, f.into_future()).await {
        Ok(r) => r.map_err(|e| ChainError::Rpc(format!("{what}: {e}"))),
        Err(_) => Err(ChainError::Rpc(format!("{what}: no answer within {} s", RPC_TIMEOUT.as_secs()))),
    }
}

fn provider(rpc: &str, wallet: &Wallet) -> Result<DynProvider, ChainError> {
    let url = rpc.parse().map_err(|e| ChainError::Invalid(format!("--chain-rpc {rpc:?}: {e}")))?;
    // Nonces are read from the chain for each transaction (sends are one
    // at a time per wallet): a cached nonce would be spent by a call that
    // reverts at gas estimation and leave a gap no later transaction fills.
    Ok(ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(wallet.signer().clone())
        .connect_http(url)
        .erased())
}

impl Market {
    /// The market at `address` on the chain at `rpc`, used from `wallet`.
    /// Fails when no contract is deployed there.
    pub async fn connect(rpc: &str, wallet: &Wallet, address: Address) -> Result<Self, ChainError> {
        let provider = provider(rpc, wallet)?;
        let chain_id = timed("eth_chainId", provider.get_chain_id()).await?;
        let code = timed("eth_getCode", provider.get_code_at(address)).await?;
        if code.is_empty() {
            return Err(ChainError::Invalid(format!("no contract at {address} on chain {chain_id} ({rpc})")));
        }
        Ok(Self { contract: HotpotMarket::new(address, provider), chain_id, from: wallet.address(), sending: Default::default() })
    }

    /// Deploys a new market from `wallet` (its owner) and returns it.
    pub async fn deploy(rpc: &str, wallet: &Wallet, config: &Config) -> Result<(Self, Sent), ChainError> {
        let provider = provider(rpc, wallet)?;
        let pending = timed(
            "deploying the market",
            HotpotMarket::deploy_builder(
                provider.clone(),
                U256::from(config.unbonding_delay_s),
                U256::from(config.quorum),
                U256::from(config.accuser_share_ppm),
                config.wei_per_micro_credit,
            )
            .send(),
        )
        .await?;
        let receipt = timed("waiting for the deployment", pending.get_receipt()).await?;
        let address = receipt.contract_address().filter(|_| receipt.status()).ok_or_else(|| ChainError::Reverted("the deployment failed".into()))?;
        Ok((Self::connect(rpc, wallet, address).await?, Sent::of(&receipt)))
    }

    pub fn address(&self) -> Address {
        *self.contract.address()
    }

    pub fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The wallet transactions are sent from.
    pub fn from(&self) -> Address {
        self.from
    }

    /// Sends one call and waits until it is mined.
    async fn send<D: alloy::contract::CallDecoder + Send + Sync>(
        &self,
        what: &str,
        call: alloy::contract::CallBuilder<&DynProvider, D>,
    ) -> Result<Sent, ChainError> {
        let _one = self.sending.lock().await;
        let pending = match tokio::time::timeout(RPC_TIMEOUT, call.send()).await {
            Ok(r) => r.map_err(ChainError::from_contract)?,
            Err(_) => return Err(ChainError::Rpc(format!("{what}: no answer within {} s", RPC_TIMEOUT.as_secs()))),
        };
        let receipt = timed(what, pending.get_receipt()).await?;
        if !receipt.status() {
            return Err(ChainError::Reverted(format!("{what}: transaction {} reverted", receipt.transaction_hash())));
        }
        Ok(Sent::of(&receipt))
    }

    /// Registers (or removes) a gateway/auditor (the owner only).
    pub async fn set_gateway(&self, gateway: Address, registered: bool) -> Result<Sent, ChainError> {
        self.send("setGateway", self.contract.setGateway(gateway, registered)).await
    }

    /// Adds `wei` to this wallet's gateway deposit.
    pub async fn deposit(&self, wei: U256) -> Result<Sent, ChainError> {
        self.send("deposit", self.contract.deposit().value(wei)).await
    }

    pub async fn request_deposit_withdrawal(&self, wei: U256) -> Result<Sent, ChainError> {
        self.send("requestDepositWithdrawal", self.contract.requestDepositWithdrawal(wei)).await
    }

    pub async fn withdraw_deposit(&self) -> Result<Sent, ChainError> {
        self.send("withdrawDeposit", self.contract.withdrawDeposit()).await
    }

    /// Adds `wei` to this wallet's node stake.
    pub async fn stake(&self, wei: U256) -> Result<Sent, ChainError> {
        self.send("stake", self.contract.stake().value(wei)).await
    }

    pub async fn request_unstake(&self, wei: U256) -> Result<Sent, ChainError> {
        self.send("requestUnstake", self.contract.requestUnstake(wei)).await
    }

    /// Pays out the unstaked amount once its delay has passed.
    pub async fn withdraw(&self) -> Result<Sent, ChainError> {
        self.send("withdraw", self.contract.withdraw()).await
    }

    /// Pays this wallet what it earned: what every gateway that paid it
    /// settled, and its shares as an accuser.
    pub async fn claim(&self) -> Result<Sent, ChainError> {
        let gateways = self.gateways_paying(self.from).await?;
        self.send("claim", self.contract.claim(gateways)).await
    }

    /// Settles a batch of gateway-signed vouchers (all or none).
    pub async fn settle(&self, vouchers: &[Voucher]) -> Result<Sent, ChainError> {
        if vouchers.is_empty() {
            return Err(ChainError::Invalid("no vouchers to settle".into()));
        }
        let bodies = vouchers.iter().map(Voucher::body).collect::<Vec<_>>();
        // The contract does not read the signatures on a gateway's own
        // vouchers (its transaction is signed): zeros cost less calldata.
        let sigs = vouchers
            .iter()
            .map(|v| if v.gateway == self.from { Ok(HotpotMarket::Sig { r: B256::ZERO, s: B256::ZERO, v: 0 }) } else { v.sig() })
            .collect::<Result<Vec<_>, _>>()?;
        self.send("settle", self.contract.settle(bodies, sigs)).await
    }

    /// Slashes `node` for a conviction signed by several auditors (this
    /// wallet is the accuser).
    pub async fn slash(&self, signed: &[SignedConviction]) -> Result<Sent, ChainError> {
        let first = signed.first().ok_or_else(|| ChainError::Invalid("no conviction signatures".into()))?;
        if signed.iter().any(|s| (s.node, s.model, s.evidence) != (first.node, first.model, first.evidence)) {
            return Err(ChainError::Invalid("the signatures are not all on the same conviction".into()));
        }
        let sigs = sort_signatures(signed)?;
        self.send("slash", self.contract.slash(first.node, first.model, first.evidence, sigs)).await
    }

    /// Signs, as gateway `wallet`, that it has owed `node` `total`
    /// micro-credits in all.
    pub fn sign_voucher(&self, wallet: &Wallet, node: Address, total: u64) -> Result<Voucher, ChainError> {
        Voucher::sign(wallet, self.chain_id, self.address(), node, total)
    }

    /// Signs a conviction as an auditor.
    pub fn sign_conviction(&self, wallet: &Wallet, node: Address, model: B256, evidence: B256) -> Result<SignedConviction, ChainError> {
        SignedConviction::sign(wallet, self.chain_id, self.address(), node, model, evidence)
    }

    /// Who signed `voucher` under this market's domain.
    pub fn voucher_signer(&self, voucher: &Voucher) -> Result<Address, ChainError> {
        voucher.signer(self.chain_id, self.address())
    }

    pub fn domain_matches(&self, signed: &SignedConviction) -> Result<(), ChainError> {
        signed.verify(self.chain_id, self.address())
    }

    // ---- views

    pub async fn stake_of(&self, node: Address) -> Result<U256, ChainError> {
        timed("stakeOf", self.contract.stakeOf(node).call()).await
    }

    pub async fn deposit_of(&self, gateway: Address) -> Result<U256, ChainError> {
        timed("depositOf", self.contract.depositOf(gateway).call()).await
    }

    /// What `who` can claim: settled pay from every gateway that paid it,
    /// and its shares as an accuser.
    pub async fn earnings_of(&self, who: Address) -> Result<U256, ChainError> {
        let gateways = self.gateways_paying(who).await?;
        timed("claimable", self.contract.claimable(who, gateways).call()).await
    }

    /// The gateways that ever settled a voucher to `node` (from the
    /// contract's `Settled` events).
    pub async fn gateways_paying(&self, node: Address) -> Result<Vec<Address>, ChainError> {
        let events = timed("Settled events", self.contract.Settled_filter().topic2(node.into_word()).from_block(0u64).query()).await?;
        Ok(events.into_iter().map(|(e, _)| e.gateway).collect::<BTreeSet<_>>().into_iter().collect())
    }

    /// Whether the voucher `id` is paid.
    pub async fn settled(&self, id: B256) -> Result<bool, ChainError> {
        timed("settled", self.contract.settled(id).call()).await
    }

    /// Micro-credits paid so far from `gateway` to `node`.
    pub async fn paid_to(&self, gateway: Address, node: Address) -> Result<u64, ChainError> {
        timed("paidTo", self.contract.paidTo(gateway, node).call()).await
    }

    pub async fn is_gateway(&self, who: Address) -> Result<bool, ChainError> {
        timed("isGateway", self.contract.isGateway(who).call()).await
    }

    /// Stake on its way out: (wei, withdrawable from this Unix time).
    pub async fn unstaking(&self, node: Address) -> Result<(U256, u64), ChainError> {
        let p = timed("unstaking", self.contract.unstaking(node).call()).await?;
        Ok((p.amount, p.readyAt.saturating_to()))
    }

    pub async fn burned(&self) -> Result<U256, ChainError> {
        timed("burned", self.contract.burned().call()).await
    }

    /// The wallet balance of `who` in wei (native coin).
    pub async fn balance(&self, who: Address) -> Result<U256, ChainError> {
        timed("eth_getBalance", self.contract.provider().get_balance(who)).await
    }

    pub async fn config(&self) -> Result<Config, ChainError> {
        let c = &self.contract;
        Ok(Config {
            unbonding_delay_s: timed("unbondingDelay", c.unbondingDelay().call()).await?.saturating_to(),
            quorum: timed("quorum", c.quorum().call()).await?.saturating_to(),
            accuser_share_ppm: timed("accuserSharePpm", c.accuserSharePpm().call()).await?.saturating_to(),
            wei_per_micro_credit: timed("weiPerMicroCredit", c.weiPerMicroCredit().call()).await?,
        })
    }

    /// Wei for `micros` micro-credits.
    pub async fn wei(&self, micros: u64) -> Result<U256, ChainError> {
        Ok(self.config().await?.wei_per_micro_credit * U256::from(micros))
    }

    /// Everything the market holds, for `hotpot chain status`: gateways
    /// and nodes are found from the contract's events.
    pub async fn view(&self) -> Result<MarketView, ChainError> {
        let c = &self.contract;
        let mut gateways = BTreeSet::new();
        for (e, _) in timed("GatewaySet events", c.GatewaySet_filter().from_block(0u64).query()).await? {
            gateways.insert(e.gateway);
        }
        for (e, _) in timed("Deposited events", c.Deposited_filter().from_block(0u64).query()).await? {
            gateways.insert(e.gateway);
        }
        let mut nodes = BTreeSet::new();
        for (e, _) in timed("Staked events", c.Staked_filter().from_block(0u64).query()).await? {
            nodes.insert(e.node);
        }
        let mut settlements = 0u64;
        let mut settled_wei = U256::ZERO;
        for (e, _) in timed("Settled events", c.Settled_filter().from_block(0u64).query()).await? {
            nodes.insert(e.node);
            settlements += 1;
            settled_wei += e.amount;
        }
        let mut gateway_rows = Vec::new();
        for g in gateways {
            gateway_rows.push(GatewayRow {
                address: g,
                registered: self.is_gateway(g).await?,
                deposit_wei: self.deposit_of(g).await?,
                earnings_wei: self.earnings_of(g).await?,
            });
        }
        let mut node_rows = Vec::new();
        for n in nodes {
            let (unstaking_wei, ready_at) = self.unstaking(n).await?;
            node_rows.push(NodeRow {
                address: n,
                stake_wei: self.stake_of(n).await?,
                unstaking_wei,
                unstaking_ready_at: ready_at,
                earnings_wei: self.earnings_of(n).await?,
            });
        }
        Ok(MarketView {
            address: self.address(),
            chain_id: self.chain_id,
            config: self.config().await?,
            gateways: gateway_rows,
            nodes: node_rows,
            settlements,
            settled_wei,
            burned_wei: self.burned().await?,
        })
    }
}

/// What `hotpot chain status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct MarketView {
    pub address: Address,
    pub chain_id: u64,
    pub config: Config,
    pub gateways: Vec<GatewayRow>,
    pub nodes: Vec<NodeRow>,
    /// Vouchers paid (each pays one pair what its total added).
    pub settlements: u64,
    pub settled_wei: U256,
    pub burned_wei: U256,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayRow {
    pub address: Address,
    pub registered: bool,
    pub deposit_wei: U256,
    /// Accusers' shares of slashes, not yet claimed.
    pub earnings_wei: U256,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    pub address: Address,
    pub stake_wei: U256,
    pub unstaking_wei: U256,
    pub unstaking_ready_at: u64,
    /// Settled pay, not yet claimed.
    pub earnings_wei: U256,
}
