//! Wallets: a secp256k1 key in a file (`--wallet FILE`), created on first
//! use, and its binding to a node's ed25519 identity.
//!
//! The file holds the private key as `0x` + 64 hex digits and one newline,
//! readable by its owner only, written whole or not at all. Anything else
//! in it is refused with a clear error, never replaced.

use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256, Signature as EcdsaSignature};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use hotpot_core::{NodeId, NodeKey, Signature};
use serde::{Deserialize, Serialize};

use crate::ChainError;

const BINDING_DOMAIN: &[u8] = b"hotpot-wallet/1 node\0";

/// A secp256k1 key that signs transactions, receipts and convictions.
#[derive(Clone)]
pub struct Wallet {
    signer: PrivateKeySigner,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Wallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wallet({})", self.address())
    }
}

impl Wallet {
    /// The wallet in `path`, created there (mode 0600) when the file does
    /// not exist. Returns it and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), ChainError> {
        let bad = |reason: String| ChainError::Wallet { path: path.to_path_buf(), reason };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let hex = text.trim().strip_prefix("0x").unwrap_or(text.trim());
                let bytes: B256 = hex.parse().map_err(|_| bad("is not a wallet (expected 0x and 64 hex digits: a secp256k1 private key)".into()))?;
                let signer = PrivateKeySigner::from_bytes(&bytes).map_err(|e| bad(format!("not a valid key: {e}")))?;
                Ok((Self { signer, path: Some(path.to_path_buf()) }, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let signer = PrivateKeySigner::random();
                let text = format!("0x{}\n", alloy::primitives::hex::encode(signer.to_bytes()));
                write_private(path, text.as_bytes()).map_err(|e| bad(format!("cannot create it: {e}")))?;
                Ok((Self { signer, path: Some(path.to_path_buf()) }, true))
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// A fresh random wallet, kept nowhere (for this run only).
    pub fn random() -> Self {
        Self { signer: PrivateKeySigner::random(), path: None }
    }

    /// A wallet from a private key (hex, with or without 0x).
    pub fn from_hex(hex: &str) -> Result<Self, ChainError> {
        let bytes: B256 = hex.trim().trim_start_matches("0x").parse().map_err(|_| ChainError::Invalid("a private key is 64 hex digits".into()))?;
        let signer = PrivateKeySigner::from_bytes(&bytes).map_err(|e| ChainError::Invalid(e.to_string()))?;
        Ok(Self { signer, path: None })
    }

    pub fn address(&self) -> Address {
        self.signer.address()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(crate) fn signer(&self) -> &PrivateKeySigner {
        &self.signer
    }

    /// Signs a 32-byte digest (an EIP-712 signing hash).
    pub fn sign_digest(&self, digest: &B256) -> Result<EcdsaSignature, ChainError> {
        self.signer.sign_hash_sync(digest).map_err(|e| ChainError::Invalid(format!("signing: {e}")))
    }

    /// Binds this wallet to `node`: each key signs the other's public
    /// identity, so neither can be claimed by someone who holds only the
    /// other.
    pub fn bind(&self, node: &NodeKey) -> Result<WalletBinding, ChainError> {
        let address = self.address();
        let node_signature = node.sign(&binding_message(&address));
        let wallet_signature = self.signer.sign_message_sync(node.id().as_bytes()).map_err(|e| ChainError::Invalid(format!("signing: {e}")))?;
        Ok(WalletBinding { address, node: node.id(), node_signature: node_signature.0.to_vec(), wallet_signature: wallet_signature.as_bytes().to_vec() })
    }
}

fn binding_message(address: &Address) -> Vec<u8> {
    let mut m = BINDING_DOMAIN.to_vec();
    m.extend_from_slice(address.as_slice());
    m
}

/// A node's payout address, signed both ways: by the node's ed25519 key
/// (this address is mine) and by the wallet (this node is mine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletBinding {
    pub address: Address,
    pub node: NodeId,
    /// ed25519, 64 bytes.
    pub node_signature: Vec<u8>,
    /// secp256k1 (EIP-191 personal message over the node id), 65 bytes.
    pub wallet_signature: Vec<u8>,
}

impl WalletBinding {
    /// Checks both signatures.
    pub fn verify(&self) -> Result<(), ChainError> {
        let sig: [u8; 64] =
            self.node_signature.as_slice().try_into().map_err(|_| ChainError::Invalid("a wallet binding's node signature is 64 bytes".into()))?;
        self.node
            .verify(&binding_message(&self.address), &Signature(sig))
            .map_err(|e| ChainError::Invalid(format!("the node's signature on its wallet: {e}")))?;
        let wallet =
            EcdsaSignature::try_from(self.wallet_signature.as_slice()).map_err(|e| ChainError::Invalid(format!("a wallet binding's wallet signature: {e}")))?;
        let signer =
            wallet.recover_address_from_msg(self.node.as_bytes()).map_err(|e| ChainError::Invalid(format!("the wallet's signature on its node: {e}")))?;
        if signer != self.address {
            return Err(ChainError::Invalid(format!("the wallet signature is {signer}'s, not {}'s", self.address)));
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` whole, readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".wallet.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // Never replace a wallet that appeared meanwhile.
        std::fs::hard_link(&tmp, path)?;
        std::fs::remove_file(&tmp)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wallet_is_created_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w/wallet");
        let (a, created) = Wallet::load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = Wallet::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.address(), b.address());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, "not a key").unwrap();
        let e = Wallet::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("is not a wallet"), "{e}");
    }

    #[test]
    fn a_binding_verifies_and_a_swapped_one_does_not() {
        let wallet = Wallet::from_hex(&"11".repeat(32)).unwrap();
        let node = NodeKey::generate();
        let binding = wallet.bind(&node).unwrap();
        binding.verify().unwrap();
        // Someone else's address claimed by this node.
        let mut stolen = binding.clone();
        stolen.address = Wallet::from_hex(&"22".repeat(32)).unwrap().address();
        assert!(stolen.verify().is_err());
        // This wallet claimed for another node.
        let mut other = binding;
        other.node = NodeKey::generate().id();
        assert!(other.verify().is_err());
    }
}
