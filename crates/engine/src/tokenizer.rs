//! The tokenizer stored in a GGUF file (`tokenizer.ggml.*`), so that our
//! token ids match llama.cpp's: GPT-2-style byte-level BPE (`gpt2`) rebuilt
//! as a `tokenizers` BPE model with the pre-tokenizer llama.cpp uses for
//! the file's `tokenizer.ggml.pre`, or a SentencePiece vocabulary
//! (`llama`) tokenized by [`crate::spm`].

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use crate::error::ModelError;
use crate::model::ModelFile;

use crate::spm::{Spm, TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED};

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How fragments of text between special tokens become token ids.
enum Model {
    Bpe(Box<tokenizers::Tokenizer>),
    Spm(Box<Spm>),
}

/// Text ↔ token ids for one model.
pub struct Tokenizer {
    model: Model,
    /// The bytes each token stands for (empty for control tokens).
    bytes: Vec<Vec<u8>>,
    /// The token strings as stored in the file.
    texts: Vec<String>,
    control: Vec<bool>,
    /// Control, user-defined and unknown tokens written in text.
    specials: Option<Specials>,
    bos: Option<u32>,
    add_bos: bool,
    end_of_generation: HashSet<u32>,
    /// The most bytes of text one token can stand for.
    widest: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.texts.len()).finish()
    }
}

fn split(regex: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(split.into())
}

/// llama.cpp's pre-tokenizer for a `tokenizer.ggml.pre` value, in
/// `tokenizers` terms.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, ModelError> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, use_regex));
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            Sequence::new(vec![split(r"\p{N}")?, split(GPT2_REGEX)?, byte_level(false)]).into()
        }
        "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" => Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into(),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into(),
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => Sequence::new(vec![split(GPT2_REGEX)?, byte_level(false)]).into(),
        other => {
            tracing::warn!(pre = other, "unknown pre-tokenizer; using GPT-2's rules");
            Sequence::new(vec![split(GPT2_REGEX)?, byte_level(false)]).into()
        }
    })
}

/// GPT-2's byte-to-character map: the character that stands for each byte
/// in a byte-level token (printable bytes stand for themselves, the others
/// for code points from U+0100 on, in byte order).
pub(crate) fn byte_level_chars() -> [char; 256] {
    let mut next = 256u32;
    std::array::from_fn(|b| {
        let b = b as u8;
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are valid code points")
        }
    })
}

/// [`byte_level_chars`] inverted: which byte each character stands for.
fn byte_level_decoder() -> std::collections::HashMap<char, u8> {
    byte_level_chars().into_iter().zip(0..=255u8).collect()
}

impl Tokenizer {
    pub fn from_gguf(file: &ModelFile) -> Result<Self, ModelError> {
        let kind = file.meta_str("tokenizer.ggml.model").unwrap_or("gpt2");
        if kind != "gpt2" && kind != "llama" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model `{kind}` is not supported (supported: gpt2-style byte-level BPE, llama-style SentencePiece)"
            )));
        }
        let texts: Vec<String> = file.meta_strings("tokenizer.ggml.tokens")?.into_iter().map(str::to_owned).collect();
        let types = match file.meta_ints("tokenizer.ggml.token_type") {
            Ok(types) => types,
            Err(ModelError::MissingMetadata { .. }) => vec![1; texts.len()],
            Err(e) => return Err(e),
        };
        if types.len() != texts.len() {
            return Err(ModelError::Tokenizer(format!("{} token types for {} tokens", types.len(), texts.len())));
        }
        let control: Vec<bool> = types.iter().map(|&t| t == TOKEN_CONTROL).collect();
        let (model, bytes) = if kind == "llama" {
            let scores = match file.meta_floats("tokenizer.ggml.scores") {
                Ok(scores) => scores,
                Err(ModelError::MissingMetadata { .. }) => {
                    return Err(ModelError::Tokenizer("a SentencePiece vocabulary needs tokenizer.ggml.scores, and this file has none".into()));
                }
                Err(e) => return Err(e),
            };
            let add_space_prefix = file.meta_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let spm = Spm::new(&texts, scores, &types, add_space_prefix)?;
            let bytes = texts.iter().zip(&types).map(|(t, &k)| crate::spm::token_bytes(t, k)).collect();
            (Model::Spm(Box::new(spm)), bytes)
        } else {
            (Model::Bpe(Box::new(Self::bpe(file, &texts)?)), Self::byte_level_bytes(&texts, &control))
        };

        let vocab_size = texts.len() as u32;
        let id = |key: &str| file.meta_u32(key).filter(|&id| id < vocab_size);
        let mut end_of_generation: HashSet<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].into_iter().filter_map(id).collect();
        // Like llama.cpp: control tokens that end a turn in common templates.
        for (i, text) in texts.iter().enumerate() {
            let ends_turn = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "</s>"].contains(&text.as_str());
            if ends_turn && control[i] {
                end_of_generation.insert(i as u32);
            }
        }
        // SentencePiece vocabularies start with BOS unless they say otherwise (as in llama.cpp).
        let add_bos = file.meta_bool("tokenizer.ggml.add_bos_token").unwrap_or(kind == "llama");
        let specials = Specials::new(&texts, &types)?;
        let widest = bytes.iter().map(Vec::len).chain(texts.iter().map(String::len)).max().unwrap_or(1).max(1);
        Ok(Self { model, bytes, texts, control, specials, bos: id("tokenizer.ggml.bos_token_id"), add_bos, end_of_generation, widest })
    }

    /// The byte-level BPE model; special tokens are cut out before it runs.
    fn bpe(file: &ModelFile, texts: &[String]) -> Result<tokenizers::Tokenizer, ModelError> {
        let merges: Vec<(String, String)> = file
            .meta_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| ModelError::Tokenizer(format!("merge `{m}` is not two tokens")))
            })
            .collect::<Result<_, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = texts.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(file.meta_str("tokenizer.ggml.pre").unwrap_or("default"))?));
        Ok(inner)
    }

    /// The bytes of byte-level BPE tokens (empty for control tokens).
    fn byte_level_bytes(texts: &[String], control: &[bool]) -> Vec<Vec<u8>> {
        let decoder = byte_level_decoder();
        texts
            .iter()
            .zip(control)
            .map(|(text, &is_control)| {
                if is_control {
                    return Vec::new();
                }
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match decoder.get(&c) {
                        Some(&b) => out.push(b),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            })
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The fewest tokens `bytes` bytes of text can become: what a
    /// context check can know before tokenizing.
    pub fn min_tokens(&self, bytes: usize) -> usize {
        bytes / self.widest
    }

    /// Token ids for `text`. Control tokens written in the text (such as
    /// `<|im_start|>`) become their ids, as in llama.cpp with special-token
    /// parsing on; BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.encode_with(text, ControlTokens::Parsed)
    }

    /// Token ids for `text`, with control tokens recognised only where
    /// `controls` says; elsewhere their text is ordinary text.
    /// User-defined tokens are always recognised (as in llama.cpp).
    pub fn encode_with(&self, text: &str, controls: ControlTokens<'_>) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        let mut at = 0;
        let mut after_special = true;
        if let Some(specials) = &self.specials {
            for m in specials.automaton.find_iter(text) {
                let pattern = m.pattern().as_usize();
                if specials.control[pattern] && !controls.allows(m.start()) {
                    continue;
                }
                if m.start() > at {
                    self.encode_fragment(&text[at..m.start()], after_special, &mut ids)?;
                }
                ids.push(specials.ids[pattern]);
                after_special = true;
                at = m.end();
            }
        }
        if at < text.len() {
            self.encode_fragment(&text[at..], after_special, &mut ids)?;
        }
        Ok(ids)
    }

    /// Where control tokens are written in `text` (byte offsets).
    pub fn control_token_offsets(&self, text: &str) -> Vec<usize> {
        let Some(specials) = &self.specials else { return Vec::new() };
        specials.automaton.find_iter(text).filter(|m| specials.control[m.pattern().as_usize()]).map(|m| m.start()).collect()
    }

    /// `text` with the text of every control token in it replaced by as
    /// many bytes of filler (`None`: it has none).
    pub fn mask_control_tokens(&self, text: &str) -> Option<String> {
        let specials = self.specials.as_ref()?;
        let mut masked: Option<String> = None;
        let mut at = 0;
        for m in specials.automaton.find_iter(text).filter(|m| specials.control[m.pattern().as_usize()]) {
            let out = masked.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[at..m.start()]);
            out.extend(std::iter::repeat_n('x', m.end() - m.start()));
            at = m.end();
        }
        masked.map(|mut out| {
            out.push_str(&text[at..]);
            out
        })
    }

    fn encode_fragment(&self, fragment: &str, after_special: bool, ids: &mut Vec<u32>) -> Result<(), ModelError> {
        match &self.model {
            Model::Bpe(inner) => {
                let encoding = inner.encode_fast(fragment, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Model::Spm(spm) => spm.encode_fragment(fragment, after_special, ids),
        }
        Ok(())
    }

    /// Whether `encode` starts with the BOS token.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// The bytes token `id` contributes to generated text (nothing for
    /// control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// A printable form of one token, control tokens included.
    pub fn piece(&self, id: u32) -> String {
        match self.control.get(id as usize) {
            Some(true) => self.texts[id as usize].clone(),
            Some(false) => String::from_utf8_lossy(&self.bytes[id as usize]).into_owned(),
            None => String::new(),
        }
    }

    /// The text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` is a control token (it stands for no text).
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The text of a control token by id, such as the BOS string templates use.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
}

/// Where control tokens written in text are recognised.
#[derive(Debug, Clone, Copy)]
pub enum ControlTokens<'a> {
    /// Everywhere (raw prompts, as llama.cpp's `parse_special`).
    Parsed,
    /// Nowhere: their text is ordinary text.
    AsText,
    /// Only where one starts at one of these byte offsets (sorted).
    At(&'a [usize]),
}

impl ControlTokens<'_> {
    fn allows(&self, offset: usize) -> bool {
        match self {
            Self::Parsed => true,
            Self::AsText => false,
            Self::At(offsets) => offsets.binary_search(&offset).is_ok(),
        }
    }
}

/// Control, user-defined and unknown tokens, found in text longest first
/// at each position (llama.cpp's `tokenizer_st_partition`).
struct Specials {
    automaton: AhoCorasick,
    ids: Vec<u32>,
    /// Per pattern: a control or unknown token (only recognised where the
    /// caller allows), or user-defined (always).
    control: Vec<bool>,
}

impl Specials {
    fn new(texts: &[String], types: &[i64]) -> Result<Option<Self>, ModelError> {
        let ids: Vec<u32> = (0..texts.len() as u32)
            .filter(|&i| matches!(types[i as usize], TOKEN_CONTROL | TOKEN_USER_DEFINED | TOKEN_UNKNOWN) && !texts[i as usize].is_empty())
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let patterns: Vec<&str> = ids.iter().map(|&i| texts[i as usize].as_str()).collect();
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?;
        let control = ids.iter().map(|&i| types[i as usize] != TOKEN_USER_DEFINED).collect();
        Ok(Some(Self { automaton, ids, control }))
    }
}
