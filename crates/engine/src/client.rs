//! What the gateway (the client of a swarm) holds: tokenizer, chat template,
//! embedding table, final norm and head. Nodes never see tokens; the client
//! turns tokens into hidden states and hidden states back into logits.

use crate::chat::{ChatMessage, ChatPrompt, ChatTemplate};
use crate::error::{ForwardError, ModelError};
use crate::kernels::{ActivationBits, MatmulInput, Matrix, matmul, ops};
use crate::model::{ModelConfig, ModelFile};
use crate::profile::{self, Phase};
use crate::sampling::SamplingParams;
use crate::span::{Device, HiddenStates};
use crate::tokenizer::Tokenizer;

pub struct ClientParts {
    config: ModelConfig,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    embedding: Matrix,
    output_norm: Vec<f32>,
    /// `None` when the head is tied to the embedding table.
    output: Option<Matrix>,
    device: Device,
    /// What the model file recommends for sampling.
    sampling: SamplingParams,
}

impl std::fmt::Debug for ClientParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientParts").field("vocab", &self.config.vocab_size).field("tied", &self.output.is_none()).finish()
    }
}

impl ClientParts {
    /// Loads the tokenizer, template, embedding, final norm and head (and no block).
    pub fn load(file: &ModelFile, device: &Device) -> Result<Self, ModelError> {
        let c = file.config().clone();
        let tokenizer = Tokenizer::from_gguf(file)?;
        let template = ChatTemplate::from_gguf(file, &tokenizer)?;
        let output = if file.has_tensor("output.weight") { Some(file.load_matrix("output.weight", c.vocab_size, c.dim)?) } else { None };
        Ok(Self {
            embedding: file.load_matrix("token_embd.weight", c.vocab_size, c.dim)?,
            output_norm: file.load_vector("output_norm.weight", c.dim)?,
            output,
            tokenizer,
            template,
            sampling: SamplingParams::recommended(file.metadata()),
            config: c,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The sampling the model file recommends (`general.sampling.*`), else
    /// llama.cpp's defaults.
    pub fn recommended_sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A conversation rendered with the model's own chat template, ending
    /// where the assistant's reply begins, and its tokens (control tokens
    /// only from the template).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<ChatPrompt, ModelError> {
        self.chat_prompt_with_tools(messages, None)
    }

    /// [`ClientParts::chat_prompt`], offering `tools` (OpenAI's list) to
    /// a model whose template supports them.
    pub fn chat_prompt_with_tools(&self, messages: &[ChatMessage], tools: Option<&serde_json::Value>) -> Result<ChatPrompt, ModelError> {
        let template = self.template.as_ref().ok_or_else(|| ModelError::Template("the model file has no chat template".into()))?;
        template.prompt_with_tools(&self.tokenizer, messages, tools, true)
    }

    /// Whether the model's chat template can offer tools.
    pub fn supports_tools(&self) -> bool {
        self.template.as_ref().is_some_and(ChatTemplate::supports_tools)
    }

    /// The embedding rows of `tokens`: the input of block 0.
    pub fn embed(&self, tokens: &[u32]) -> Result<HiddenStates, ForwardError> {
        profile::time(Phase::Embed, || {
            let dim = self.config.dim;
            let mut data = vec![0.0f32; tokens.len() * dim];
            for (&token, row) in tokens.iter().zip(data.chunks_exact_mut(dim)) {
                if token as usize >= self.config.vocab_size {
                    return Err(ForwardError::Token { token, vocab: self.config.vocab_size });
                }
                self.embedding.dequantize_row(token as usize, row);
                if let Some(scale) = self.config.recipe.embedding_scale {
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            }
            HiddenStates::new(tokens.len(), dim, data)
        })
    }

    /// Logits for every row of `hidden` (the output of the last block):
    /// `rows × vocab`, row-major.
    pub fn logits(&self, hidden: &HiddenStates) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        if hidden.dim() != c.dim {
            return Err(ForwardError::Width { expected: c.dim, got: hidden.dim() });
        }
        if !hidden.as_slice().iter().all(|v| v.is_finite()) {
            return Err(ForwardError::NotFinite);
        }
        profile::time(Phase::Head, || Ok(self.head(hidden)))
    }

    fn head(&self, hidden: &HiddenStates) -> Vec<f32> {
        let c = &self.config;
        let rows = hidden.rows();
        let mut normed = vec![0.0f32; rows * c.dim];
        let cpu = self.device.kernels();
        ops::rms_norm(cpu.isa, hidden.as_slice(), &self.output_norm, c.rms_eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        let mut input = MatmulInput::default();
        // 8-bit where the head's format reads them (see `kernels::quant`).
        input.prepare(cpu, &normed, rows, c.dim, [head.format()], ActivationBits::Eight);
        let mut logits = vec![0.0f32; rows * c.vocab_size];
        matmul(cpu, head, &input, &mut logits, c.vocab_size, 0);
        if let Some(cap) = c.recipe.logit_softcap {
            logits.iter_mut().for_each(|l| *l = cap * ops::tanh(*l / cap));
        }
        logits
    }
}
