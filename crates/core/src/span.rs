use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A contiguous, non-empty range `[start, end)` of a model's transformer
/// blocks: what a node serves and what one pipeline stage computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "(u32, u32)", into = "(u32, u32)")]
pub struct LayerSpan {
    start: u32,
    end: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSpanError {
    #[error("a span must look like `a..b` (for example `0..12`), got `{0}`")]
    Syntax(String),
    #[error("span {start}..{end} is empty or reversed: the end must be greater than the start")]
    Empty { start: u32, end: u32 },
}

impl LayerSpan {
    pub fn new(start: u32, end: u32) -> Result<Self, ParseSpanError> {
        if end <= start {
            return Err(ParseSpanError::Empty { start, end });
        }
        Ok(Self { start, end })
    }

    /// Every block of a model with `n_blocks` blocks.
    pub fn full(n_blocks: u32) -> Result<Self, ParseSpanError> {
        Self::new(0, n_blocks)
    }

    pub fn start(&self) -> u32 {
        self.start
    }

    pub fn end(&self) -> u32 {
        self.end
    }

    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Always false: a span holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, block: u32) -> bool {
        (self.start..self.end).contains(&block)
    }

    pub fn blocks(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }

    /// Whether the span lies inside a model of `n_blocks` blocks.
    pub fn fits(&self, n_blocks: u32) -> bool {
        self.end <= n_blocks
    }

    /// Parses a comma-separated chain such as `0..12,12..30`.
    pub fn parse_chain(text: &str) -> Result<Vec<Self>, ParseSpanError> {
        text.split(',').map(|part| part.trim().parse()).collect()
    }

    /// Splits `[0, n_blocks)` into `parts` contiguous spans whose sizes differ
    /// by at most one block. Returns `None` when there are more parts than
    /// blocks.
    pub fn split_even(n_blocks: u32, parts: u32) -> Option<Vec<Self>> {
        if parts == 0 || parts > n_blocks {
            return None;
        }
        let (base, extra) = (n_blocks / parts, n_blocks % parts);
        let mut start = 0;
        let spans = (0..parts)
            .map(|i| {
                let end = start + base + u32::from(i < extra);
                let span = Self { start, end };
                start = end;
                span
            })
            .collect();
        Some(spans)
    }
}

impl fmt::Display for LayerSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerSpan {
    type Err = ParseSpanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ParseSpanError::Syntax(s.to_string());
        let (a, b) = s.trim().split_once("..").ok_or_else(syntax)?;
        let start = a.trim().parse().map_err(|_| syntax())?;
        let end = b.trim().parse().map_err(|_| syntax())?;
        Self::new(start, end)
    }
}

impl TryFrom<(u32, u32)> for LayerSpan {
    type Error = ParseSpanError;

    fn try_from((start, end): (u32, u32)) -> Result<Self, Self::Error> {
        Self::new(start, end)
    }
}

impl From<LayerSpan> for (u32, u32) {
    fn from(span: LayerSpan) -> Self {
        (span.start, span.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let span: LayerSpan = "3..12".parse().expect("valid span");
        assert_eq!((span.start(), span.end(), span.len()), (3, 12, 9));
        assert_eq!(span.to_string(), "3..12");
        assert!(span.contains(3) && span.contains(11) && !span.contains(12));
    }

    #[test]
    fn rejects_bad_text() {
        assert!(matches!("12..3".parse::<LayerSpan>(), Err(ParseSpanError::Empty { .. })));
        assert!(matches!("5..5".parse::<LayerSpan>(), Err(ParseSpanError::Empty { .. })));
        for bad in ["", "3", "a..b", "1..2..3", "-1..4", "0-4"] {
            assert!(bad.parse::<LayerSpan>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn parses_chains() {
        let chain = LayerSpan::parse_chain("0..12, 12..30").expect("valid chain");
        assert_eq!(chain, vec![LayerSpan::new(0, 12).expect("valid"), LayerSpan::new(12, 30).expect("valid")]);
    }

    #[test]
    fn splits_evenly() {
        let spans = LayerSpan::split_even(30, 4).expect("4 <= 30");
        let lens: Vec<u32> = spans.iter().map(LayerSpan::len).collect();
        assert_eq!(lens, vec![8, 8, 7, 7]);
        assert_eq!(spans.first().map(LayerSpan::start), Some(0));
        assert_eq!(spans.last().map(LayerSpan::end), Some(30));
        assert!(spans.windows(2).all(|w| w[0].end() == w[1].start()));
        assert!(LayerSpan::split_even(3, 4).is_none());
        assert!(LayerSpan::split_even(3, 0).is_none());
    }

    #[test]
    fn serde_rejects_empty_spans() {
        let ok: LayerSpan = serde_json::from_str("[0,4]").expect("valid");
        assert_eq!(ok.len(), 4);
        assert!(serde_json::from_str::<LayerSpan>("[4,4]").is_err());
    }
}
