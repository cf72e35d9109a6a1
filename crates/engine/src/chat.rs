//! The chat template stored in a GGUF file (`tokenizer.chat_template`),
//! rendered with minijinja the way Hugging Face's `apply_chat_template` does
//! (trimmed blocks, Python string methods, `raise_exception`), with a
//! limit on the work and the output of one rendering (a template is part
//! of a downloaded file, and a conversation is a stranger's input).
//!
//! Message content is text: control tokens come only from the template.
//! `<|im_end|>` written in a message is tokenized as the characters it is
//! made of, as OpenAI does, so a user cannot forge a turn.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::model::ModelFile;
use crate::tokenizer::{ControlTokens, Tokenizer};

/// Template instructions one rendering may run: far more than any real
/// chat template needs for a long conversation, and a fraction of a second.
const FUEL: u64 = 5_000_000;
/// Bytes one rendering may produce beyond the messages' own.
const OUTPUT_SLACK: usize = 1 << 20;

/// A conversation rendered with the template, and its token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatPrompt {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's tool calls, as templates read them: `[{id, type,
    /// function: {name, arguments}}]` with `arguments` a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool message's call id, and the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None, name: None }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template reads `tools` (it can offer functions to the model).
    tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` are exposed to the template.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| -> String {
            let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
            strftime_date(&format, days as i64)
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| ModelError::Template(e.to_string()))?;
        let tools = source.contains("tools");
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), tools })
    }

    /// The template stored in `file`, if it has one.
    pub fn from_gguf(file: &ModelFile, tokenizer: &Tokenizer) -> Result<Option<Self>, ModelError> {
        let token = |key: &str| file.meta_u32(key).and_then(|id| tokenizer.token_text(id)).unwrap_or("").to_string();
        file.meta_str("tokenizer.chat_template")
            .map(|source| Self::new(source, &token("tokenizer.ggml.bos_token_id"), &token("tokenizer.ggml.eos_token_id")))
            .transpose()
    }

    /// Whether the template can offer tools (it reads `tools`).
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where
    /// the assistant's reply begins. A template that runs too long or
    /// writes far more than the messages hold is an error.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ModelError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`], offering `tools` (OpenAI's `tools` list).
    pub fn render_with_tools(&self, messages: &[ChatMessage], tools: Option<&serde_json::Value>, add_generation_prompt: bool) -> Result<String, ModelError> {
        let template = self.env.get_template(NAME).map_err(|e| ModelError::Template(e.to_string()))?;
        let calls = |m: &ChatMessage| m.tool_calls.as_ref().map_or(0, |c| c.to_string().len());
        let content: usize = messages.iter().map(|m| m.content.len() + m.role.len() + calls(m)).sum::<usize>() + tools.map_or(0, |t| t.to_string().len());
        let mut out = Capped { bytes: Vec::new(), cap: 2 * content + OUTPUT_SLACK };
        let context = minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        match template.render_captured_to(context, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| ModelError::Template("the template wrote invalid UTF-8".into())),
            Err(_) if out.bytes.len() > out.cap => Err(ModelError::Template(format!("the chat template wrote more than {} bytes; refusing it", out.cap))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => {
                Err(ModelError::Template(format!("the chat template ran more than {FUEL} instructions without finishing; refusing it")))
            }
            Err(e) => Err(ModelError::Template(e.to_string())),
        }
    }

    /// Renders `messages` and tokenizes the result, control tokens only
    /// where the template wrote them: the template is rendered a second
    /// time with every control token inside a message masked, and control
    /// tokens are recognised only where that rendering still has them.
    pub fn prompt(&self, tokenizer: &Tokenizer, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<ChatPrompt, ModelError> {
        self.prompt_with_tools(tokenizer, messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::prompt`], offering `tools`.
    pub fn prompt_with_tools(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<ChatPrompt, ModelError> {
        let text = self.render_with_tools(messages, tools, add_generation_prompt)?;
        let masked: Vec<Option<String>> = messages.iter().map(|m| tokenizer.mask_control_tokens(&m.content)).collect();
        if masked.iter().all(Option::is_none) {
            let tokens = tokenizer.encode(&text)?;
            return Ok(ChatPrompt { text, tokens });
        }
        let shadow: Vec<ChatMessage> =
            messages.iter().zip(masked).map(|(m, masked)| ChatMessage { content: masked.unwrap_or_else(|| m.content.clone()), ..m.clone() }).collect();
        let shadow = self.render_with_tools(&shadow, tools, add_generation_prompt)?;
        if shadow.len() != text.len() {
            return Err(ModelError::Template(
                "a message contains a control token's text, and this model's chat template changes messages in a way that cannot keep it as plain text; remove it".into(),
            ));
        }
        let at = tokenizer.control_token_offsets(&shadow);
        let tokens = tokenizer.encode_with(&text, ControlTokens::At(&at))?;
        Ok(ChatPrompt { text, tokens })
    }
}

/// A writer that refuses to grow past `cap` bytes.
struct Capped {
    bytes: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        if self.bytes.len() > self.cap {
            return Err(std::io::Error::other("the rendering is too long"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// The date `days` after 1970-01-01 formatted with the strftime directives
/// chat templates use (`%d %m %Y %y %b %B %%`); other directives stay as they are.
fn strftime_date(format: &str, days: i64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(strftime_date("%d %b %Y", 0), "01 Jan 1970");
        // 2024-07-26 is day 19930 of the Unix epoch.
        assert_eq!(strftime_date("%Y-%m-%d (%B, %y) %%", 19_930), "2024-07-26 (July, 24) %");
        assert_eq!(strftime_date("29 Feb? %d %m", 19_782), "29 Feb? 29 02");
    }

    #[test]
    fn renders_chatml() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
        let text = t.render(&[ChatMessage::new("user", " hi ")], true).expect("renders");
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_exceptions() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
                      {{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(source, "", "").expect("compiles");
        assert_eq!(t.render(&[ChatMessage::new("user", " x ")], false).expect("renders"), "X");
        let err = t.render(&[ChatMessage::new("system", "x")], false).expect_err("raises");
        assert!(err.to_string().contains("first must be user"));
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(ChatTemplate::new("{% for %}", "", ""), Err(ModelError::Template(_))));
    }
}
