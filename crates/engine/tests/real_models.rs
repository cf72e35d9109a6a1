//! The engine on the real models people run — Qwen2.5-Coder 1.5B and 0.5B
//! (Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0) and Gemma 3 270M (SentencePiece,
//! sliding windows) — against llama.cpp's tokenization and a float64
//! forward pass, and the determinism audits rely on. The models are pulled
//! by `hotpot pull` (the test command does it).

mod common;

use common::*;
use hotpot_core::LayerSpan;
use hotpot_engine::kernels::Isa;
use hotpot_engine::{ChatMessage, ClientParts, Device, HiddenStates, LocalChain, ModelFile, Span, log_softmax};

struct Model {
    alias: &'static str,
    file: &'static str,
    fixture: &'static str,
    /// Blocks the determinism test runs (a few, so the scalar kernels stay
    /// quick), and split points inside them.
    blocks: (u32, u32),
    splits: &'static [u32],
}

const QWEN_1_5B: Model = Model {
    alias: "qwen2.5-coder-1.5b",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    fixture: "qwen2.5-coder-1.5b-q4_k_m",
    blocks: (0, 3),
    splits: &[1, 2],
};

const QWEN_0_5B: Model =
    Model { alias: "qwen2.5-coder-0.5b", file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", fixture: "qwen2.5-coder-0.5b-q4_k_m", blocks: (0, 4), splits: &[2] };

/// Blocks 4..6: a local (sliding-window) layer and the first global one.
const GEMMA_270M: Model = Model { alias: "gemma3-270m", file: "gemma-3-270m-q4_k_m.gguf", fixture: "gemma3-270m-q4_k_m", blocks: (4, 6), splits: &[5] };

fn open(m: &Model) -> ModelFile {
    ModelFile::open(pulled(m.alias, m.file)).expect("the pulled model opens")
}

fn tokenizer_matches_llamacpp(m: &Model) {
    let file = open(m);
    let client = client(&file, &Device::cpu(1).expect("threads"));
    let fixture = fixture(&format!("{}.llamacpp.json", m.fixture));
    for case in fixture["cases"].as_array().expect("cases") {
        let text = case["prompt_text"].as_str().expect("prompt_text");
        assert_eq!(client.tokenizer().encode(text).expect("encodes"), ids(&case["prompt_ids"]), "{}: token ids of case {}", m.alias, case["id"]);
        if let Some(messages) = case["messages"].as_array() {
            let messages: Vec<ChatMessage> =
                messages.iter().map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content"))).collect();
            let prompt = client.chat_prompt(&messages).expect("renders");
            assert_eq!(prompt.text, text, "{}: chat rendering of case {}", m.alias, case["id"]);
            assert_eq!(prompt.tokens, ids(&case["prompt_ids"]), "{}: chat tokens of case {}", m.alias, case["id"]);
        }
    }
}

/// llama.cpp's own figures from its fixture: its greedy token against the
/// float64 top-1, and |Δ logprob| over the reference top-5 entries that
/// are among llama.cpp's top-5.
fn llamacpp_figures(m: &Model) -> (usize, usize, f64) {
    let llama = fixture(&format!("{}.llamacpp.json", m.fixture));
    let reference = fixture(&format!("{}.f64.json", m.fixture));
    let (mut agree, mut total, mut deltas) = (0, 0, Vec::new());
    for (l, r) in llama["cases"].as_array().expect("cases").iter().zip(reference["cases"].as_array().expect("cases")) {
        for (g, step) in l["greedy"].as_array().expect("greedy").iter().zip(r["steps"].as_array().expect("steps")) {
            let top = step["top"].as_array().expect("top");
            agree += usize::from(g["id"] == top[0]["id"]);
            total += 1;
            let theirs = g["top"].as_array().expect("top");
            for entry in &top[..5] {
                if let Some(t) = theirs.iter().find(|t| t["id"] == entry["id"]) {
                    deltas.push((t["logprob"].as_f64().expect("logprob") - entry["logprob"].as_f64().expect("logprob")).abs());
                }
            }
        }
    }
    deltas.sort_by(f64::total_cmp);
    (agree, total, deltas[deltas.len() / 2])
}

/// Teacher-forced over the float64 reference: at every generated position,
/// our top-1 and log-softmax against the reference's top-5; at least as
/// close as llama.cpp.
fn accuracy_against_float64(m: &Model) {
    let file = open(m);
    let device = Device::cpu(threads()).expect("threads");
    let client = client(&file, &device);
    let spans = vec![Span::load(&file, file.config().full_span(), &device).expect("loads")];
    let fixture = fixture(&format!("{}.f64.json", m.fixture));
    let (mut agree, mut total, mut deltas) = (0usize, 0usize, Vec::new());
    for case in fixture["cases"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        let tokens: Vec<u32> = prompt.iter().chain(&ids(&case["token_ids"])).copied().collect();
        let mut chain = LocalChain::new(&spans, tokens.len());
        let hidden = chain.forward(client.embed(&tokens).expect("embeds"), 0).expect("forward");
        for (i, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
            let pos = prompt.len() - 1 + i;
            assert_eq!(step["input_id"].as_u64(), Some(u64::from(tokens[pos])));
            let row = HiddenStates::new(1, hidden.dim(), hidden.row(pos).to_vec()).expect("row");
            let ours = log_softmax(&client.logits(&row).expect("logits"));
            let top = step["top"].as_array().expect("top");
            let best = ours.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u64);
            agree += usize::from(best == top[0]["id"].as_u64());
            total += 1;
            for entry in &top[..5] {
                let id = entry["id"].as_u64().expect("id") as usize;
                deltas.push((f64::from(ours[id]) - entry["logprob"].as_f64().expect("logprob")).abs());
            }
        }
    }
    deltas.sort_by(f64::total_cmp);
    let median = deltas[deltas.len() / 2];
    let (l_agree, l_total, l_median) = llamacpp_figures(m);
    let (ours, theirs) = (agree as f64 / total as f64, l_agree as f64 / l_total as f64);
    println!(
        "accuracy vs float64, {}: hotpot top-1 {agree}/{total} = {:.1} %, median |Δ logprob| {median:.4}; llama.cpp {l_agree}/{l_total} = {:.1} %, {l_median:.4}",
        m.alias,
        100.0 * ours,
        100.0 * theirs
    );
    assert!(ours >= theirs, "{}: top-1 agreement {ours:.3} below llama.cpp's {theirs:.3}", m.alias);
    assert!(median <= l_median, "{}: median |Δ logprob| {median:.4} above llama.cpp's {l_median:.4}", m.alias);
}

/// Runs `chain` over `inputs` as one prefill of `prefill` positions, then
/// one position at a time; returns every output row.
fn run(chain: &[Span], inputs: &HiddenStates, prefill: usize) -> Vec<f32> {
    let mut local = LocalChain::new(chain, inputs.rows());
    let dim = inputs.dim();
    let mut out = local.forward(HiddenStates::new(prefill, dim, inputs.as_slice()[..prefill * dim].to_vec()).expect("rows"), 0).expect("prefill").into_vec();
    for pos in prefill..inputs.rows() {
        let row = HiddenStates::new(1, dim, inputs.row(pos).to_vec()).expect("row");
        out.extend(local.forward(row, pos).expect("decode").into_vec());
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The same hidden states, bit for bit, whatever the split of the blocks
/// into spans, prefill or decode, the thread count and the kernel variant:
/// the tolerance audits use stays 0 on this model's formats.
fn deterministic(m: &Model, positions: usize) {
    let file = open(m);
    let (a, b) = m.blocks;
    let span = |a, b| LayerSpan::new(a, b).expect("span");
    let load = |device: &Device, cuts: &[u32]| -> Vec<Span> {
        let points: Vec<u32> = [a].into_iter().chain(cuts.iter().copied()).chain([b]).collect();
        points.windows(2).map(|w| Span::load(&file, span(w[0], w[1]), device).expect("loads")).collect()
    };
    let device = Device::cpu(2).expect("threads");
    let client = ClientParts::load(&file, &device).expect("client");
    // Real token embeddings (scaled as the model does) feed the first block.
    let text = "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n".repeat(positions / 20 + 1);
    let tokens: Vec<u32> = client.tokenizer().encode(&text).expect("encodes").into_iter().take(positions).collect();
    assert_eq!(tokens.len(), positions, "the test text is long enough");
    let inputs = client.embed(&tokens).expect("embeds");
    let whole = load(&device, &[]);
    let reference = bits(&run(&whole, &inputs, positions));
    assert_eq!(bits(&run(&whole, &inputs, 1)), reference, "{}: decode differs from prefill", m.alias);
    assert_eq!(bits(&run(&whole, &inputs, positions / 2)), reference, "{}: a half prefill differs", m.alias);
    assert_eq!(bits(&run(&load(&device, m.splits), &inputs, positions / 3)), reference, "{}: split spans differ from one span", m.alias);
    for isa in Isa::available() {
        for threads in if isa == Isa::Scalar { vec![1] } else { vec![1, 3] } {
            let device = Device::cpu_with(threads, isa).expect("threads");
            assert_eq!(bits(&run(&load(&device, &[]), &inputs, positions)), reference, "{}: {isa:?} with {threads} threads differs", m.alias);
        }
    }
    println!("{}: blocks {a}..{b}, {positions} positions bit-identical across spans, prefill/decode, threads and {:?}", m.alias, Isa::available());
}

#[test]
fn qwen_1_5b_tokenizer_and_chat_match_llamacpp() {
    tokenizer_matches_llamacpp(&QWEN_1_5B);
}

#[test]
fn qwen_1_5b_accuracy_against_float64() {
    accuracy_against_float64(&QWEN_1_5B);
}

#[test]
fn qwen_1_5b_is_deterministic() {
    deterministic(&QWEN_1_5B, 24);
}

#[test]
fn qwen_0_5b_tokenizer_and_chat_match_llamacpp() {
    tokenizer_matches_llamacpp(&QWEN_0_5B);
}

#[test]
fn qwen_0_5b_accuracy_against_float64() {
    accuracy_against_float64(&QWEN_0_5B);
}

#[test]
fn qwen_0_5b_is_deterministic() {
    deterministic(&QWEN_0_5B, 24);
}

#[test]
fn gemma3_tokenizer_matches_llamacpp() {
    tokenizer_matches_llamacpp(&GEMMA_270M);
}

#[test]
fn gemma3_accuracy_against_float64() {
    accuracy_against_float64(&GEMMA_270M);
}

/// Past the 512-position sliding window, so the local layer's mask is
/// exercised in prefill and in decode.
#[test]
fn gemma3_is_deterministic_past_its_window() {
    deterministic(&GEMMA_270M, 540);
}
