//! SentencePiece-style vocabularies (GGUF `tokenizer.ggml.model = llama`:
//! Llama 2, Mistral, Gemma), tokenized as llama.cpp does so that the ids
//! match its own:
//!
//! 1. control, user-defined and unknown tokens written in the text are cut
//!    out first, longest first ([`crate::tokenizer`] does this for every
//!    vocabulary; runs of spaces and newlines are user-defined tokens in
//!    Gemma's);
//! 2. each remaining fragment gets a leading space when the vocabulary asks
//!    for one (`add_space_prefix`, after the start or a special token), and
//!    spaces become `▁`;
//! 3. starting from single characters, the adjacent pair whose
//!    concatenation is the highest-scoring token is merged, repeatedly
//!    (ties: leftmost first);
//! 4. a piece that is not a token is spelled out as its UTF-8 bytes
//!    (`<0xXX>` tokens).
//!
//! Reference: llama.cpp `src/llama-vocab.cpp` (`llm_tokenizer_spm_session`,
//! `tokenizer_st_partition`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::error::ModelError;

/// GGUF token types (`tokenizer.ggml.token_type`).
pub(crate) const TOKEN_UNKNOWN: i64 = 2;
pub(crate) const TOKEN_CONTROL: i64 = 3;
pub(crate) const TOKEN_USER_DEFINED: i64 = 4;
pub(crate) const TOKEN_BYTE: i64 = 6;

const SPACE: &str = "\u{2581}";

/// A SentencePiece vocabulary and its tokenizer.
pub(crate) struct Spm {
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    bytes: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// A piece of text between merges: a run of bytes of the escaped text.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// Higher score first; on a tie, the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    /// Builds the vocabulary from the GGUF's token texts, scores and types.
    pub fn new(texts: &[String], scores: Vec<f32>, types: &[i64], add_space_prefix: bool) -> Result<Self, ModelError> {
        if scores.len() != texts.len() {
            return Err(ModelError::Tokenizer(format!("{} scores for {} tokens", scores.len(), texts.len())));
        }
        if scores.iter().any(|s| !s.is_finite()) {
            return Err(ModelError::Tokenizer("token scores must be finite".into()));
        }
        let mut ids = HashMap::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            // Like llama.cpp's map, the last token with a given text wins.
            ids.insert(text.clone(), i as u32);
        }
        let mut bytes = [None; 256];
        for (i, (text, &t)) in texts.iter().zip(types).enumerate() {
            if t == TOKEN_BYTE
                && let Some(hex) = text.strip_prefix("<0x").and_then(|r| r.strip_suffix('>'))
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                bytes[b as usize] = Some(i as u32);
            }
        }
        Ok(Self { ids, scores, bytes, add_space_prefix })
    }

    /// Token ids of a fragment of text between special tokens (no BOS);
    /// `after_special`: it starts the text or follows a special token.
    pub fn encode_fragment(&self, fragment: &str, after_special: bool, out: &mut Vec<u32>) {
        let mut escaped = String::with_capacity(fragment.len() + 3);
        if self.add_space_prefix && after_special {
            escaped.push_str(SPACE);
        }
        escaped.push_str(&fragment.replace(' ', SPACE));
        self.merge(&escaped, out);
    }

    /// Merges one escaped fragment and appends its tokens.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            let next = if start + len < text.len() { Some(i + 1) } else { None };
            symbols.push(Symbol { start, len, prev: i.checked_sub(1), next });
        }
        let mut queue = BinaryHeap::new();
        let candidate = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| -> Option<Bigram> {
            let (left, right) = (left?, right?);
            let (l, r) = (symbols[left], symbols[right]);
            let piece = &text[l.start..r.start + r.len];
            let id = *self.ids.get(piece)?;
            Some(Bigram { score: self.scores[id as usize], left, right, len: piece.len() })
        };
        for i in 1..symbols.len() {
            queue.extend(candidate(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.len {
                continue; // one side merged since this candidate was queued
            }
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(bigram.left);
            }
            queue.extend(candidate(&symbols, symbols[bigram.left].prev, Some(bigram.left)));
            queue.extend(candidate(&symbols, Some(bigram.left), symbols[bigram.left].next));
        }
        let mut i = if symbols.is_empty() { None } else { Some(0) };
        while let Some(at) = i {
            let s = symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize])),
            }
            i = s.next;
        }
    }
}

/// The bytes a SentencePiece token stands for in generated text.
pub(crate) fn token_bytes(text: &str, kind: i64) -> Vec<u8> {
    match kind {
        TOKEN_CONTROL => Vec::new(),
        TOKEN_BYTE => text
            .strip_prefix("<0x")
            .and_then(|r| r.strip_suffix('>'))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .map_or_else(|| text.as_bytes().to_vec(), |b| vec![b]),
        _ => text.replace(SPACE, " ").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, f32, i64)], prefix: bool) -> Spm {
        let texts: Vec<String> = tokens.iter().map(|t| t.0.to_string()).collect();
        let scores = tokens.iter().map(|t| t.1).collect();
        let types: Vec<i64> = tokens.iter().map(|t| t.2).collect();
        Spm::new(&texts, scores, &types, prefix).expect("vocab")
    }

    impl Spm {
        fn encode(&self, text: &str) -> Vec<u32> {
            let mut out = Vec::new();
            self.encode_fragment(text, true, &mut out);
            out
        }
    }

    fn bytes_vocab() -> Vec<(String, f32, i64)> {
        (0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, TOKEN_BYTE)).collect()
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        let mut tokens: Vec<(String, f32, i64)> = bytes_vocab();
        for (t, s) in [("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -5.0), ("bc", -2.0), ("abc", -3.0), ("\u{2581}", -1.0), ("\u{2581}a", -4.0)] {
            tokens.push((t.into(), s, 1));
        }
        let refs: Vec<(&str, f32, i64)> = tokens.iter().map(|(t, s, k)| (t.as_str(), *s, *k)).collect();
        let spm = vocab(&refs, false);
        let id = |t: &str| spm.ids[t];
        // "bc" (−2) beats "ab" (−5); then "a"+"bc" = "abc" exists.
        assert_eq!(spm.encode("abc"), vec![id("abc")]);
        assert_eq!(spm.encode("cab"), vec![id("c"), id("ab")]);
        // Unknown characters fall back to their UTF-8 bytes.
        assert_eq!(spm.encode("é"), vec![0xC3, 0xA9]);
        assert_eq!(spm.encode(" a"), vec![id("\u{2581}a")]);
        let prefixed = vocab(&refs, true);
        assert_eq!(prefixed.encode("a"), vec![id("\u{2581}a")]);
    }

    #[test]
    fn decoding_restores_spaces_and_bytes() {
        assert_eq!(token_bytes("\u{2581}the", 1), b" the");
        assert_eq!(token_bytes("<0x0A>", TOKEN_BYTE), b"\n");
        assert!(token_bytes("<eos>", TOKEN_CONTROL).is_empty());
    }

    #[test]
    fn a_vocabulary_without_scores_is_refused() {
        let texts = vec!["a".to_string(), "b".to_string()];
        assert!(Spm::new(&texts, vec![0.0], &[1, 1], false).is_err());
    }
}
