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

/// What a gateway signs for a node: the running total, in micro-credits,
/// of everything it has owed `node` on this market (each of Hotpot's
/// receipts raises it). Settling it pays what the total adds to what the
/// pair was paid before; a voucher whose total is already paid is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    pub node: Address,
    pub gateway: Address,
    /// Micro-credits (the contract converts at its `weiPerMicroCredit`).
    pub total: u64,
    /// 65 bytes: r, s, v.
    pub signature: Vec<u8>,
}

/// The key of a (gateway, node) pair, as the contract computes it: the
/// first 24 bytes of keccak256(gateway ‖ node).
pub fn pair_key(gateway: Address, node: Address) -> [u8; 24] {
    let hash = alloy::primitives::keccak256([gateway.as_slice(), node.as_slice()].concat());
    let mut key = [0u8; 24];
    key.copy_from_slice(&hash[..24]);
    key
}

/// A voucher's id, as the contract computes it: the pair's key, then the
/// total (8 bytes, big-endian).
pub fn voucher_id(gateway: Address, node: Address, total: u64) -> B256 {
    let mut id = [0u8; 32];
    id[..24].copy_from_slice(&pair_key(gateway, node));
    id[24..].copy_from_slice(&total.to_be_bytes());
    B256::from(id)
}

impl Voucher {
    /// Signs, with the gateway's `wallet`, that it has owed `node` `total`
    /// micro-credits in all.
    pub fn sign(wallet: &Wallet, chain_id: u64, market: Address, node: Address, total: u64) -> Result<Self, ChainError> {
        let body = HotpotMarket::Voucher { node, gateway: wallet.address(), total };
        let sig = wallet.sign_digest(&body.eip712_signing_hash(&domain(chain_id, market)))?;
        Ok(Self { node, gateway: wallet.address(), total, signature: sig.as_bytes().to_vec() })
    }

    /// The id the contract knows it by.
    pub fn id(&self) -> B256 {
        voucher_id(self.gateway, self.node, self.total)
    }

    /// Who signed it (checks nothing else): to report a forged voucher
    /// before sending it.
    pub fn signer(&self, chain_id: u64, market: Address) -> Result<Address, ChainError> {
        let sig = parse_signature(&self.signature)?;
        sig.recover_address_from_prehash(&self.body().eip712_signing_hash(&domain(chain_id, market)))
            .map_err(|e| ChainError::Invalid(format!("voucher {}: {e}", self.id())))
    }

    /// Checks it is signed by its own gateway (not that the gateway is
    /// registered: the contract knows that).
    pub fn verify(&self, chain_id: u64, market: Address) -> Result<(), ChainError> {
        match self.signer(chain_id, market)? {
            signer if signer == self.gateway => Ok(()),
            signer => Err(ChainError::Invalid(format!("voucher {} is signed by {signer}, not by its gateway {}", self.id(), self.gateway))),
        }
    }

    pub(crate) fn body(&self) -> HotpotMarket::Voucher {
        HotpotMarket::Voucher { node: self.node, gateway: self.gateway, total: self.total }
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
    HotpotMarket::Sig { r: B256::from(sig.r().to_be_bytes::<32>()), s: B256::from(sig.s().to_be_bytes::<32>()), v: 27 + u8::from(sig.v()) }
}
