//! Hotpot's market on an EVM chain (DESIGN §14).
//!
//! The `HotpotMarket` contract (`contracts/HotpotMarket.sol`, compiled by
//! the pinned solcjs into `contracts/HotpotMarket.json`, which this crate
//! embeds) holds gateway deposits and node stakes in the chain's native
//! coin, pays nodes what gateways signed they owe them (vouchers: a running
//! total per gateway and node, each total once), and
//! slashes a node's stake when `quorum` registered auditors sign the same
//! conviction. This crate is the Rust side:
//!
//! - [`Wallet`]: a secp256k1 key in a file, created on first use, and its
//!   binding to a node's ed25519 identity;
//! - [`Voucher`] / [`Conviction`]: what gateways and auditors sign
//!   (EIP-712 typed data under the deployed contract's domain);
//! - [`Market`]: deploy, deposit, stake, unstake, withdraw, settle, claim,
//!   slash and the views, with reverts decoded into [`ChainError`]s that
//!   name the cause;
//! - [`Outbox`]: vouchers kept until seen settled, settled in batches
//!   without sending any twice;
//! - [`LocalChain`]: a local `anvil` (from the npm package
//!   `@foundry-rs/anvil-linux-amd64`) for tests and `hotpot up --chain`.

mod anvil;
mod market;
mod outbox;
mod signed;
mod stakes;
mod wallet;

pub use alloy::primitives::{Address, B256, U256};
pub use anvil::{ANVIL_PACKAGE, LocalChain, find_anvil, fund_on_anvil};
pub use market::{Config, GatewayRow, Market, MarketView, NodeRow, Sent};
pub use outbox::{Kept, MAX_BATCH, OUTBOX_SCHEMA_VERSION, Outbox, Pending, Settled};
pub use signed::{Conviction, SignedConviction, Voucher, pair_key, sort_signatures, voucher_id};
pub use stakes::ChainStakes;
pub use wallet::{Wallet, WalletBinding};

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    HotpotMarket,
    "../../contracts/HotpotMarket.json"
);

/// An amount of the chain's coin ("1.5") in wei.
pub fn parse_coin(text: &str) -> Result<U256, ChainError> {
    alloy::primitives::utils::parse_ether(text.trim()).map_err(|e| ChainError::Invalid(format!("{text:?}: {e}")))
}

/// Why a chain operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The contract refused the transaction (it reverted); the message
    /// names the contract's reason.
    #[error("the market contract refused: {0}")]
    Reverted(String),
    #[error("chain RPC: {0}")]
    Rpc(String),
    #[error("wallet {path}: {reason}")]
    Wallet { path: std::path::PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("anvil: {0}")]
    Anvil(String),
}

impl ChainError {
    /// Reads a contract call's failure: a revert with one of the
    /// contract's errors becomes [`ChainError::Reverted`] with that error
    /// in words, anything else [`ChainError::Rpc`].
    pub(crate) fn from_contract(e: alloy::contract::Error) -> Self {
        use HotpotMarket::HotpotMarketErrors as E;
        if let Some(decoded) = e.as_decoded_interface_error::<E>() {
            return Self::Reverted(describe(&decoded));
        }
        match e.as_revert_data() {
            Some(data) => Self::Reverted(format!("revert data 0x{}", alloy::primitives::hex::encode(&data))),
            None => {
                let text = e.to_string();
                if text.contains("revert") { Self::Reverted(text) } else { Self::Rpc(text) }
            }
        }
    }

    pub(crate) fn rpc(e: impl std::fmt::Display) -> Self {
        Self::Rpc(e.to_string())
    }
}

/// One of the contract's errors in words.
fn describe(e: &HotpotMarket::HotpotMarketErrors) -> String {
    use HotpotMarket::HotpotMarketErrors as E;
    match e {
        E::NotOwner(_) => "only the contract's owner may register gateways".into(),
        E::NotGateway(x) => format!("{} is not a registered gateway (auditor)", x.who),
        E::AlreadySettled(x) => format!("voucher {} is already settled (its total is paid)", x.id),
        E::BadSignature(x) => {
            format!("the signature on {} is not its gateway's (it recovers to {}): altered or forged", x.id, x.signer)
        }
        E::InsufficientDeposit(x) => {
            format!("gateway {} has {} wei of deposit, {} are needed", x.gateway, x.available, x.needed)
        }
        E::LengthMismatch(_) => "vouchers and signatures differ in number".into(),
        E::NotReady(x) => format!("not withdrawable before Unix time {} (unbonding delay)", x.readyAt),
        E::Nothing(_) => "nothing to do (zero amount)".into(),
        E::TooMuch(x) => format!("asked for {} wei, only {} available", x.asked, x.available),
        E::UnsortedSigners(_) => "conviction signatures are not sorted by signer (or one signer signed twice)".into(),
        E::TooFewSignatures(x) => format!("{} auditor signatures, the quorum is {}", x.valid, x.needed),
        E::AlreadySlashed(x) => format!("conviction {} was already slashed", x.conviction),
        E::TransferFailed(_) => "the transfer to the receiver failed".into(),
    }
}
