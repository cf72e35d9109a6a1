//! What gateways and auditors sign for the contract: EIP-712 typed data
//! under the deployed market's domain (name "Hotpot Market", version "1",
//! the chain id, the contract's address), so a signature is good for one
//! contract on one chain only.

use alloy::primitives::{Address, B256, Signature as EcdsaSignature};
use alloy::sol_types::{Eip712Domain, SolStruct, eip712_domain};
use serde::{Deserialize, Serialize};

use crate::HotpotMarket;
use crate::{ChainError, Wallet};

alloy::sol! {
    /// What auditors co-sign to slash a node (the contract's
    /// `Conviction(address node,bytes32 model,bytes32 evidence)`).
    #[derive(Debug)]
    struct Conviction {
        address node;
        bytes32 model;
        bytes32 evidence;
    }
}

/// The domain signatures for the market at `market` on `chain_id` are made
/// under.
pub(crate) fn domain(chain_id: u64, market: Address) -> Eip712Domain {
    eip712_domain! {
        name: "Hotpot Market",
        version: "1",
        chain_id: chain_id,
        verifying_contract: market,
    }
}

/// A receipt as the contract pays it: `amount` micro-credits of
/// `gateway`'s deposit to `node`, once, under Hotpot's receipt id `id`,
/// with the gateway's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReceipt {
    pub id: B256,
    pub node: Address,
    pub gateway: Address,
    /// Micro-credits (the contract converts at its `weiPerMicroCredit`).
    pub amount: u64,
    /// 65 bytes: r, s, v.
    pub signature: Vec<u8>,
}

impl ChainReceipt {
    /// Signs a receipt for `node` with the gateway's `wallet`.
    pub fn sign(wallet: &Wallet, chain_id: u64, market: Address, id: B256, node: Address, amount: u64) -> Result<Self, ChainError> {
        let body = HotpotMarket::Receipt { id, node, gateway: wallet.address(), amount };
        let sig = wallet.sign_digest(&body.eip712_signing_hash(&domain(chain_id, market)))?;
        Ok(Self { id, node, gateway: wallet.address(), amount, signature: sig.as_bytes().to_vec() })
    }

    /// Who signed it (checks nothing else): to report a forged receipt
    /// before sending it.
    pub fn signer(&self, chain_id: u64, market: Address) -> Result<Address, ChainError> {
        let sig = parse_signature(&self.signature)?;
        sig.recover_address_from_prehash(&self.body().eip712_signing_hash(&domain(chain_id, market)))
            .map_err(|e| ChainError::Invalid(format!("receipt {}: {e}", self.id)))
    }

    pub(crate) fn body(&self) -> HotpotMarket::Receipt {
        HotpotMarket::Receipt { id: self.id, node: self.node, gateway: self.gateway, amount: self.amount }
    }

    pub(crate) fn sig(&self) -> Result<HotpotMarket::Sig, ChainError> {
        Ok(to_sig(&parse_signature(&self.signature)?))
    }
}

/// A conviction with one auditor's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedConviction {
    pub node: Address,
    pub model: B256,
    pub evidence: B256,
    pub auditor: Address,
    pub signature: Vec<u8>,
}

impl SignedConviction {
    /// `wallet` (an auditor) signs that `node` cheated on `model`, as the
    /// evidence file hashing to `evidence` shows.
    pub fn sign(wallet: &Wallet, chain_id: u64, market: Address, node: Address, model: B256, evidence: B256) -> Result<Self, ChainError> {
        let body = Conviction { node, model, evidence };
        let sig = wallet.sign_digest(&body.eip712_signing_hash(&domain(chain_id, market)))?;
        Ok(Self { node, model, evidence, auditor: wallet.address(), signature: sig.as_bytes().to_vec() })
    }

    /// Checks the signature is the named auditor's on this conviction.
    pub fn verify(&self, chain_id: u64, market: Address) -> Result<(), ChainError> {
        let body = Conviction { node: self.node, model: self.model, evidence: self.evidence };
        let signer = parse_signature(&self.signature)?
            .recover_address_from_prehash(&body.eip712_signing_hash(&domain(chain_id, market)))
            .map_err(|e| ChainError::Invalid(format!("conviction signature: {e}")))?;
        if signer != self.auditor {
            return Err(ChainError::Invalid(format!("the conviction signature is {signer}'s, not {}'s", self.auditor)));
        }
        Ok(())
    }
}

/// The signatures of several auditors on one conviction, sorted by
/// auditor address with duplicates dropped, as `slash` takes them.
pub fn sort_signatures(signed: &[SignedConviction]) -> Result<Vec<HotpotMarket::Sig>, ChainError> {
    let mut by_auditor: Vec<&SignedConviction> = signed.iter().collect();
    by_auditor.sort_by_key(|s| s.auditor);
    by_auditor.dedup_by_key(|s| s.auditor);
    by_auditor.into_iter().map(|s| Ok(to_sig(&parse_signature(&s.signature)?))).collect()
}

fn parse_signature(bytes: &[u8]) -> Result<EcdsaSignature, ChainError> {
    EcdsaSignature::try_from(bytes).map_err(|e| ChainError::Invalid(format!("a signature is 65 bytes (r, s, v): {e}")))
}

fn to_sig(sig: &EcdsaSignature) -> HotpotMarket::Sig {
    HotpotMarket::Sig {
        r: B256::from(sig.r().to_be_bytes::<32>()),
        s: B256::from(sig.s().to_be_bytes::<32>()),
        v: 27 + u8::from(sig.v()),
    }
}
