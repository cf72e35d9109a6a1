//! Tool calls: offering functions through the model's own chat template,
//! forcing a call when a request requires one (a grammar, through
//! [`crate::constrain`]), and reading the calls back out of the text the
//! model wrote.
//!
//! Models trained on the Hermes convention (Qwen 2.5 and most others whose
//! template takes `tools`) write each call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`.

use crate::openai::{FunctionCall, Tool, ToolCallOut};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// What the model wrote, split into its text and its calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<FunctionCall>,
}

/// Splits `text` into content and tool calls: Hermes `<tool_call>` blocks,
/// or — as llama.cpp also reads them — an answer that is nothing but a
/// call object (`{"name": …, "arguments": …}`, or a list of them), bare or
/// in a ```json fence, naming one of `names`. A block that does not parse
/// as a call stays text.
pub fn parse(text: &str, names: &[String]) -> Parsed {
    if !text.contains(OPEN)
        && let Some(calls) = whole_answer_calls(text, names)
    {
        return Parsed { content: None, calls };
    }
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let body_start = start + OPEN.len();
        let (body, after) = match rest[body_start..].find(CLOSE) {
            Some(end) => (&rest[body_start..body_start + end], &rest[body_start + end + CLOSE.len()..]),
            None => (&rest[body_start..], ""),
        };
        match serde_json::from_str::<serde_json::Value>(body.trim()).ok().and_then(|v| call(&v)) {
            Some(c) => calls.push(c),
            None => content.push_str(&rest[start..rest.len() - after.len()]),
        }
        rest = after;
    }
    content.push_str(rest);
    let content = content.trim();
    Parsed { content: (!content.is_empty()).then(|| content.to_string()), calls }
}

/// The calls of an answer that is only a call object or a list of them
/// (bare or fenced), each naming an offered tool.
fn whole_answer_calls(text: &str, names: &[String]) -> Option<Vec<FunctionCall>> {
    let mut body = text.trim();
    if let Some(fenced) = body.strip_prefix("```") {
        let fenced = fenced.strip_suffix("```")?;
        // Past the fence's language tag line.
        body = fenced.split_once('\n').map_or(fenced, |(tag, rest)| if tag.trim().chars().all(|c| c.is_ascii_alphanumeric()) { rest } else { fenced }).trim();
    }
    if !body.starts_with(['{', '[']) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let items = match &value {
        serde_json::Value::Array(items) => items.iter().collect::<Vec<_>>(),
        one => vec![one],
    };
    let calls: Vec<FunctionCall> = items.into_iter().map(call).collect::<Option<_>>()?;
    (!calls.is_empty() && calls.iter().all(|c| names.contains(&c.name))).then_some(calls)
}

fn call(value: &serde_json::Value) -> Option<FunctionCall> {
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(serde_json::Value::Null) => "{}".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(FunctionCall { name, arguments })
}

/// The calls as OpenAI returns them, with fresh ids.
pub fn outs(calls: Vec<FunctionCall>, indexed: bool) -> Vec<ToolCallOut> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, function)| ToolCallOut {
            index: indexed.then_some(i as u32),
            id: format!("call_{:024x}", rand::random::<u128>() >> 32),
            kind: "function",
            function,
        })
        .collect()
}

/// A Lark grammar (llguidance's dialect) that makes the model call one of
/// `tools` (several in a row when `parallel`), arguments valid against
/// each function's schema.
pub fn required_grammar(tools: &[&Tool], parallel: bool) -> String {
    let options: Vec<serde_json::Value> = tools
        .iter()
        .map(|t| {
            let parameters = t.function.parameters.clone().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = serde_json::json!({"anyOf": options, "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}});
    let repeat = if parallel { " (\"\\n\" call)*" } else { "" };
    format!("start: call{repeat}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {schema}\n")
}

/// Streams a choice's text while holding back what may be a tool call:
/// an answer that opens with `{`, `[` or a ``` fence is held whole (it
/// may be nothing but a call); otherwise text before `<tool_call>` goes out
/// at once (less any tail that could be its beginning), and everything from
/// it on is kept for [`parse`] at the end.
#[derive(Debug, Default)]
pub struct Splitter {
    pending: String,
    /// Holding everything from here on.
    holding: bool,
    /// Some text went out (the answer's start is decided).
    started: bool,
    names: Vec<String>,
}

impl Splitter {
    pub fn new(names: Vec<String>) -> Self {
        Self { names, ..Self::default() }
    }

    /// The text that can go out now.
    pub fn push(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        if self.holding {
            return String::new();
        }
        if !self.started {
            let lead = self.pending.trim_start();
            if lead.is_empty() || "```".starts_with(lead) {
                return String::new();
            }
            if lead.starts_with(['{', '[']) || lead.starts_with("```") {
                self.holding = true;
                return String::new();
            }
            self.started = true;
        }
        if let Some(at) = self.pending.find(OPEN) {
            self.holding = true;
            let out = self.pending[..at].to_string();
            self.pending.drain(..at);
            return out;
        }
        // Keep the longest tail that is a beginning of `<tool_call>`.
        let keep = (1..OPEN.len().min(self.pending.len()) + 1)
            .rev()
            .find(|&n| self.pending.is_char_boundary(self.pending.len() - n) && OPEN.starts_with(&self.pending[self.pending.len() - n..]))
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// At the end: the text still held back, and the calls in it.
    pub fn finish(self) -> Parsed {
        parse(&self.pending, &self.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_out_of_the_text() {
        let text = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let names = vec!["get_weather".to_string(), "time".to_string()];
        let parsed = parse(text, &names);
        assert_eq!(parsed.content.as_deref(), Some("Let me look."));
        assert_eq!(parsed.calls.len(), 2);
        assert_eq!(parsed.calls[0].name, "get_weather");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&parsed.calls[0].arguments).expect("json"), serde_json::json!({"city": "Paris"}));
        // A broken block stays text; plain text has no calls.
        assert_eq!(parse("<tool_call>\nnot json\n</tool_call>", &names).calls, vec![]);
        assert_eq!(parse("no calls", &names).content.as_deref(), Some("no calls"));
        // Cut off before its end tag, a complete call still counts.
        assert_eq!(parse("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}", &names).calls.len(), 1);
        // An answer that is only a call, fenced or bare, naming an offered tool.
        let fenced = "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\"city\": \"Paris\"}\n}\n```";
        assert_eq!(parse(fenced, &names).calls.len(), 1);
        assert_eq!(parse("{\"name\": \"time\", \"arguments\": {}}", &names).calls.len(), 1);
        assert!(parse("{\"name\": \"unknown\", \"arguments\": {}}", &names).calls.is_empty(), "only offered tools");
        assert!(parse("{\"city\": \"Paris\"}", &names).calls.is_empty());
    }

    #[test]
    fn the_splitter_holds_back_only_what_may_be_a_call() {
        let mut s = Splitter::new(vec!["f".into()]);
        let mut out = String::new();
        for piece in ["Sure", ", <to", "ol", "_call>", "\n{\"name\": \"f\", \"arguments\": {}}", "\n</tool_call>"] {
            out.push_str(&s.push(piece));
        }
        assert_eq!(out, "Sure, ");
        let parsed = s.finish();
        assert_eq!(parsed.calls.len(), 1);
        let mut s = Splitter::new(vec!["f".into()]);
        assert_eq!(s.push("a <b"), "a <b");
        assert_eq!(s.push(" <"), " ");
        assert_eq!(s.finish().content.as_deref(), Some("<"));
        // An answer opening with a fence is held whole, and is a call.
        let mut s = Splitter::new(vec!["f".into()]);
        for piece in ["``", "`json\n{\"name\": \"f\",", " \"arguments\": {}}\n```"] {
            assert_eq!(s.push(piece), "");
        }
        assert_eq!(s.finish().calls.len(), 1);
    }

    #[test]
    fn required_grammars_name_every_tool() {
        let tool: Tool = serde_json::from_value(serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})).expect("tool");
        let g = required_grammar(&[&tool], false);
        assert!(g.contains("get_weather") && g.starts_with("start: call\n"), "{g}");
        assert!(required_grammar(&[&tool], true).contains("(\"\\n\" call)*"));
    }
}
