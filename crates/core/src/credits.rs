//! Money: integer micro-credits, never floats.

use std::fmt;
use std::str::FromStr;

/// An amount of credits, counted in micro-credits (10⁻⁶ credit). Prices,
/// balances, stakes and fees are all `Credits`; arithmetic is checked (an
/// overflow or a negative result is an error, never a wrap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Credits(u64);

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;

impl Credits {
    pub const ZERO: Self = Self(0);

    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// Whole credits (`None` on overflow).
    pub fn from_credits(credits: u64) -> Option<Self> {
        credits.checked_mul(MICROS_PER_CREDIT).map(Self)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// What `count` units cost at `self` per `per` units, rounded up to the
    /// micro-credit (a node is never paid less than its price), `None` on
    /// overflow. `Credits::from_credits(2)?.per(1000, 1500)` = 3 credits.
    pub fn per(self, per: u64, count: u64) -> Option<Self> {
        if per == 0 {
            return None;
        }
        let total = u128::from(self.0) * u128::from(count);
        u64::try_from(total.div_ceil(u128::from(per))).ok().map(Self)
    }

    /// `parts` per million of this amount, rounded down (the rest stays
    /// with whoever it is taken from).
    pub fn share_ppm(self, parts: u32) -> Self {
        Self((u128::from(self.0) * u128::from(parts.min(1_000_000)) / 1_000_000) as u64)
    }
}

impl fmt::Display for Credits {
    /// `12.5`, `0.000001`, `3`: credits with as many decimals as needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / MICROS_PER_CREDIT, self.0 % MICROS_PER_CREDIT);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let digits = format!("{frac:06}");
            write!(f, "{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// Why a text is not an amount of credits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid amount of credits {0:?}: expected a non-negative decimal with at most 6 decimals, like 12 or 0.25")]
pub struct ParseCreditsError(String);

impl FromStr for Credits {
    type Err = ParseCreditsError;

    /// `"12"`, `"0.25"`, `"1.000001"`: exact, never through a float.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseCreditsError(s.to_string());
        let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
        if whole.is_empty() && frac.is_empty() || frac.len() > 6 || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        let frac: u64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().map_err(|_| bad())? };
        whole.checked_mul(MICROS_PER_CREDIT).and_then(|w| w.checked_add(frac)).map(Self).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_parse_and_print_exactly() {
        for (text, micros, shown) in [("12", 12_000_000, "12"), ("0.25", 250_000, "0.25"), ("1.000001", 1_000_001, "1.000001"), (".5", 500_000, "0.5")] {
            let c: Credits = text.parse().expect(text);
            assert_eq!((c.micros(), c.to_string()), (micros, shown.to_string()));
        }
        for bad in ["", ".", "-1", "1.0000001", "1e3", "abc", "1.2.3", "99999999999999999999"] {
            assert!(bad.parse::<Credits>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn prices_round_up_and_shares_round_down() {
        let two = Credits::from_credits(2).expect("fits");
        assert_eq!(two.per(1000, 1500), Some(Credits::from_credits(3).expect("fits")));
        assert_eq!(Credits::from_micros(1).per(1000, 1), Some(Credits::from_micros(1)), "a node is never paid less than its price");
        assert_eq!(Credits::from_micros(u64::MAX).per(1, 2), None);
        assert_eq!(Credits::from_micros(10).share_ppm(333_333), Credits::from_micros(3));
        assert_eq!(Credits::from_micros(10).checked_sub(Credits::from_micros(11)), None);
    }
}
