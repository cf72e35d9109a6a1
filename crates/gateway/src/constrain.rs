//! Constrained decoding: the gateway samples every token, so it can mask
//! the tokens a grammar forbids before each draw, and the output always
//! parses. The grammar engine is `llguidance` (JSON schemas and Lark
//! grammars compiled against the model's token trie); this module only
//! connects it to the model's vocabulary and to the session driver.
//!
//! ```text
//! response_format ─▶ Grammar (per request) ─▶ Constraint (per session):
//!     mask(logits) ─▶ sampler ─▶ commit(token) … until the grammar accepts and an end token is drawn
//! ```

use std::sync::Arc;

use hotpot_engine::ClientParts;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};

/// The model's vocabulary as llguidance sees it.
struct Vocabulary {
    trie: TokTrie,
    client: Arc<ClientParts>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        // Grammars tokenize only forced text (literals), which is UTF-8 in
        // every grammar a request can send; anything else the trie splits.
        match std::str::from_utf8(s).ok().and_then(|t| self.client.tokenizer().encode_with(t, hotpot_engine::ControlTokens::AsText).ok()) {
            Some(tokens) => tokens,
            None => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles grammars for one model; built once per gateway (the trie of a
/// 150k vocabulary takes a moment).
pub struct Grammars {
    factory: Arc<ParserFactory>,
    /// Tokens that end a generation (any of them ends a constrained one
    /// once the grammar accepts).
    ends: Vec<u32>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

/// A compiled grammar, shared by the sessions of one request.
#[derive(Clone)]
pub struct Grammar {
    factory: Arc<ParserFactory>,
    grammar: TopLevelGrammar,
    ends: Vec<u32>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

/// One session's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    ends: Vec<u32>,
    eos: u32,
}

impl Grammars {
    pub fn new(client: &Arc<ClientParts>) -> Result<Self, String> {
        let tokenizer = client.tokenizer();
        let n = tokenizer.vocab_size();
        let ends: Vec<u32> = (0..n as u32).filter(|&t| tokenizer.is_end_of_generation(t)).collect();
        let eos = *ends.first().ok_or("the model names no end-of-generation token")?;
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|t| {
                if tokenizer.is_control(t) {
                    // Control tokens are special: the trie marks them.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_text(t).unwrap_or_default().as_bytes());
                    w
                } else {
                    tokenizer.token_bytes(t).to_vec()
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, eos), &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, client: Arc::clone(client) });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.set_stderr_log_level(0);
        Ok(Self { factory: Arc::new(factory), ends })
    }

    /// A grammar for compact JSON (`, ` and `: ` between items, no other
    /// whitespace) that validates against `schema`; with `strict`, an
    /// object schema that does not say otherwise allows no properties
    /// beyond its own (OpenAI's strict mode).
    pub fn json_schema(&self, mut schema: serde_json::Value, strict: bool) -> Result<Grammar, String> {
        if strict {
            close_objects(&mut schema, 0);
        }
        if let Some(root) = schema.as_object_mut() {
            root.insert("x-guidance".into(), serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
    }

    /// A grammar for a Lark grammar text.
    pub fn lark(&self, grammar: &str) -> Result<Grammar, String> {
        self.compile(TopLevelGrammar::from_lark(grammar.to_string()))
    }

    /// Compiles `grammar` once (so that a bad one is refused before
    /// anything runs).
    fn compile(&self, grammar: TopLevelGrammar) -> Result<Grammar, String> {
        let g = Grammar { factory: Arc::clone(&self.factory), grammar, ends: self.ends.clone() };
        g.start()?;
        Ok(g)
    }
}

/// Sets `additionalProperties: false` on every object schema with
/// `properties` that does not set it (bounded depth: schemas are input).
fn close_objects(schema: &mut serde_json::Value, depth: usize) {
    if depth > 64 {
        return;
    }
    match schema {
        serde_json::Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), serde_json::Value::Bool(false));
            }
            for (key, value) in map.iter_mut() {
                if key != "enum" && key != "const" && key != "default" && key != "examples" {
                    close_objects(value, depth + 1);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| close_objects(v, depth + 1)),
        _ => {}
    }
}

impl Grammar {
    /// A fresh constraint at the grammar's start.
    pub fn start(&self) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(self.grammar.clone()).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constraint { matcher, ends: self.ends.clone(), eos: self.ends[0] })
    }
}

impl Constraint {
    /// `logits` with every token the grammar forbids here at −∞ (an end
    /// token is allowed once the grammar accepts).
    pub fn mask(&mut self, logits: &[f32]) -> Result<Vec<f32>, String> {
        // A finished grammar allows only the end.
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| e.to_string())?;
        let end_allowed = mask.is_allowed(self.eos);
        let mut out = vec![f32::NEG_INFINITY; logits.len()];
        let mut any = false;
        for (t, (o, &l)) in out.iter_mut().zip(logits).enumerate() {
            let t = t as u32;
            if mask.is_allowed(t) || (end_allowed && self.ends.contains(&t)) {
                *o = l;
                any = true;
            }
        }
        if !any {
            return Err("the grammar allows no token here".into());
        }
        Ok(out)
    }

    /// Moves past `token` (drawn from a masked row).
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        if self.ends.contains(&token) {
            // The generation ends here; a finished grammar takes nothing more.
            return if self.matcher.is_stopped() { Ok(()) } else { self.matcher.consume_token(self.eos).map_err(|e| e.to_string()) };
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}
