use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What a model *is*: the BLAKE3 hash of its architecture metadata and tensor
/// data, independent of the file's name. Two nodes holding the same weights
/// agree on the id without talking to each other.
///
/// Printed as `hp1-` and the first 16 hex digits (`hp1-1a2b…`); the full
/// 64-digit form ([`ModelId::to_full_string`]) is what files and the wire use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId([u8; 32]);

const PREFIX: &str = "hp1-";
const SHORT_HEX: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a full model id is `hp1-` followed by 64 hex digits, got `{0}`")]
pub struct ParseModelIdError(String);

impl ModelId {
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// `hp1-` followed by all 64 hex digits.
    pub fn to_full_string(&self) -> String {
        format!("{PREFIX}{}", hex(&self.0))
    }

    /// Whether `text` names this id: the short form, the full form, or any
    /// prefix of the full form with at least 8 hex digits.
    pub fn matches(&self, text: &str) -> bool {
        let Some(digits) = text.strip_prefix(PREFIX) else {
            return false;
        };
        digits.len() >= 8 && hex(&self.0).starts_with(&digits.to_ascii_lowercase())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", &hex(&self.0)[..SHORT_HEX])
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({self})")
    }
}

impl FromStr for ModelId {
    type Err = ParseModelIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseModelIdError(s.to_string());
        let digits = s.strip_prefix(PREFIX).ok_or_else(err)?;
        if digits.len() != 64 || !digits.is_ascii() {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Self(bytes))
    }
}

impl Serialize for ModelId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_full_string())
    }
}

impl<'de> Deserialize<'de> for ModelId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelId {
        ModelId::from_bytes(*blake3::hash(b"weights").as_bytes())
    }

    #[test]
    fn short_and_full_forms() {
        let id = sample();
        let short = id.to_string();
        assert_eq!(short.len(), 4 + 16);
        assert!(short.starts_with("hp1-"));
        let full = id.to_full_string();
        assert_eq!(full.parse::<ModelId>().expect("full form parses"), id);
        assert!(full.starts_with(&short));
        assert!(id.matches(&short));
        assert!(id.matches(&full.to_uppercase().replace("HP1-", "hp1-")));
        assert!(!id.matches("hp1-1234"), "too short to be a safe prefix");
        assert!(!id.matches(&short.replace("hp1-", "hp2-")));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "hp1-", "hp1-zz", "1234", &format!("hp1-{}", "g".repeat(64))] {
            assert!(bad.parse::<ModelId>().is_err(), "{bad:?}");
        }
        let multibyte = format!("hp1-{}é", "0".repeat(62));
        assert!(multibyte.parse::<ModelId>().is_err());
    }

    #[test]
    fn serde_round_trip() {
        let id = sample();
        let json = serde_json::to_string(&id).expect("serializes");
        assert_eq!(serde_json::from_str::<ModelId>(&json).expect("parses"), id);
    }
}
