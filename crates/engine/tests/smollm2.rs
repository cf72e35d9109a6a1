//! The engine against llama.cpp and a float64 reference, on the real
//! SmolLM2-135M Q4_1 model (pulled by `hotpot pull smollm2-135m`).

mod common;

use common::*;
use hotpot_engine::kernels::Isa;
use hotpot_engine::{ChatMessage, Device, HiddenStates, LocalChain, log_softmax};

#[test]
fn tokenizer_and_chat_template_match_llamacpp() {
    let file = open_model();
    let device = Device::cpu(1).expect("threads");
    let client = client(&file, &device);
    let fixture = fixture("smollm2-135m-q4_1.llamacpp.json");
    let cases = fixture["cases"].as_array().expect("cases");
    let mut rendered = 0;
    for case in cases {
        let text = case["prompt_text"].as_str().expect("prompt_text");
        let ours = client.tokenizer().encode(text).expect("encodes");
        assert_eq!(ours, ids(&case["prompt_ids"]), "token ids for case {}", case["id"]);
        if let Some(messages) = case["messages"].as_array() {
            let messages: Vec<ChatMessage> =
                messages.iter().map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content"))).collect();
            assert_eq!(client.chat_prompt(&messages).expect("renders").text, text, "chat rendering of case {}", case["id"]);
            rendered += 1;
        }
    }
    assert!(rendered >= 2, "the fixture has chat cases");
}

/// Teacher-forced over the float64 reference: at every generated position,
/// compare our log-softmax with the reference's top-5.
#[test]
fn accuracy_against_float64_reference() {
    let file = open_model();
    let device = Device::cpu(threads()).expect("threads");
    let client = client(&file, &device);
    let spans = load_spans(&file, &[(0, 30)], &device);
    let fixture = fixture("smollm2-135m-q4_1.f64.json");
    let (mut agree, mut total) = (0usize, 0usize);
    let mut deltas = Vec::new();
    for case in fixture["cases"].as_array().expect("cases") {
        let prompt = ids(&case["prompt_ids"]);
        let generated = ids(&case["token_ids"]);
        let tokens: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
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
                let reference = entry["logprob"].as_f64().expect("logprob");
                deltas.push((f64::from(ours[id]) - reference).abs());
            }
        }
    }
    deltas.sort_by(f64::total_cmp);
    let median = deltas[deltas.len() / 2];
    let agreement = agree as f64 / total as f64;
    println!(
        "accuracy vs float64: top-1 agreement {agree}/{total} = {:.1} %, median |Δ logprob| over reference top-5 = {median:.4} (llama.cpp: 93.9 %, 0.061)",
        100.0 * agreement
    );
    assert!(agreement >= 0.94, "top-1 agreement {agreement:.3} < 0.94");
    assert!(median <= 0.061, "median |Δ logprob| {median:.4} > 0.061");
}

/// Prefill the prompt, then decode 32 greedy steps; returns the final hidden
/// state of every position, in order.
fn run_chain(spans: &[hotpot_engine::Span], client: &hotpot_engine::ClientParts, prompt: &[u32]) -> Vec<Vec<f32>> {
    let mut chain = LocalChain::new(spans, prompt.len() + 40);
    let out = chain.forward(client.embed(prompt).expect("embeds"), 0).expect("prefill");
    let mut rows: Vec<Vec<f32>> = (0..out.rows()).map(|r| out.row(r).to_vec()).collect();
    let mut last = out.last_row();
    for step in 0..32 {
        let token = hotpot_engine::argmax(&client.logits(&last).expect("logits"));
        last = chain.forward(client.embed(&[token]).expect("embeds"), prompt.len() + step).expect("decode");
        rows.push(last.as_slice().to_vec());
    }
    rows
}

#[test]
fn composition_law_is_bit_exact() {
    let file = open_model();
    let device = Device::cpu(threads()).expect("threads");
    let client = client(&file, &device);
    let prompt = client.tokenizer().encode("The capital of France is").expect("encodes");
    let whole = run_chain(&load_spans(&file, &[(0, 30)], &device), &client, &prompt);
    for chain in [vec![(0, 12), (12, 30)], vec![(0, 1), (1, 30)], vec![(0, 10), (10, 20), (20, 30)]] {
        let split = run_chain(&load_spans(&file, &chain, &device), &client, &prompt);
        assert_eq!(whole.len(), split.len());
        for (pos, (a, b)) in whole.iter().zip(&split).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "chain {chain:?} differs from [0,30) at position {pos}");
        }
    }
}

/// Prefill computes all positions at once; decode one at a time. The engine
/// evaluates every element in the same order either way, so the measured
/// tolerance is zero: the hidden states must agree bit for bit.
#[test]
fn prefill_and_decode_agree() {
    let file = open_model();
    let device = Device::cpu(threads()).expect("threads");
    let client = client(&file, &device);
    let spans = load_spans(&file, &[(0, 30)], &device);
    let tokens = client.tokenizer().encode("Once upon a time, in a small village at the edge of a great forest").expect("encodes");
    let mut prefill = LocalChain::new(&spans, tokens.len());
    let all = prefill.forward(client.embed(&tokens).expect("embeds"), 0).expect("prefill");
    let mut decode = LocalChain::new(&spans, tokens.len());
    let mut max_diff = 0.0f32;
    for (pos, &token) in tokens.iter().enumerate() {
        let one = decode.forward(client.embed(&[token]).expect("embeds"), pos).expect("decode");
        for (a, b) in all.row(pos).iter().zip(one.as_slice()) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    println!("prefill vs decode over {} positions: max |Δ hidden| = {max_diff:e}", tokens.len());
    assert_eq!(max_diff, 0.0, "prefill and decode must agree exactly");
}

#[test]
fn threads_and_kernel_variants_do_not_change_results() {
    let file = open_model();
    let prompt = [504u32, 3575, 282, 4649, 314];
    let run = |threads, isa| {
        let device = Device::cpu_with(threads, isa).expect("threads");
        let client = client(&file, &device);
        run_chain(&load_spans(&file, &[(0, 30)], &device), &client, &prompt)
    };
    let reference = run(1, Isa::Scalar);
    for isa in Isa::available() {
        for threads in [1, 3] {
            let got = run(threads, isa);
            let same = reference.iter().flatten().zip(got.iter().flatten()).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{isa:?} with {threads} threads differs from scalar with 1 thread");
        }
    }
}
