//! The `hotpot` binary as a user runs it: real processes, the real model
//! (pulled into the store by `hotpot pull smollm2-135m`), tiny generated
//! models for bad input.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use hotpot_engine::testing::TinyModel;

mod common;

/// Runs `hotpot` with `args` (and `HOTPOT_HOME=home`), killing it after `limit`.
fn hotpot_with(args: &[&str], home: Option<&Path>, limit: Duration) -> Output {
    let mut cmd = Command::new(common::HOTPOT);
    cmd.args(args);
    if let Some(home) = home {
        cmd.env("HOTPOT_HOME", home);
    }
    common::output_within(&mut cmd, limit)
}

fn hotpot(args: &[&str]) -> Output {
    hotpot_with(args, None, Duration::from_secs(120))
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "hotpot failed: {}", stderr(&out));
    out
}

/// A failing command: non-zero exit, a message containing `needle`, no panic.
fn fails_with(out: Output, needle: &str) {
    let err = stderr(&out);
    assert!(!out.status.success(), "expected a failure mentioning {needle:?}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "hotpot panicked: {err}");
    assert!(err.starts_with("error:") || err.contains("\nerror:"), "not a clear error line: {err}");
}

#[test]
fn pull_is_a_noop_when_present_and_models_lists_it() {
    let out = ok(hotpot(&["pull", "smollm2-135m"]));
    assert!(stderr(&out).contains("already pulled"), "{}", stderr(&out));
    let list = stdout(&ok(hotpot(&["models"])));
    let line = list.lines().find(|l| l.starts_with("smollm2-135m")).expect("listed");
    for field in ["hp1-", "llama", "30", "Q4_1", "MiB"] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[test]
fn pull_registers_a_local_file() {
    let home = tempfile::tempdir().expect("tempdir");
    let path = home.path().join("tiny-model.gguf");
    TinyModel::default().write(&path).expect("writes");
    let path_text = path.to_str().expect("utf-8 path");
    let out = ok(hotpot_with(&["pull", path_text], Some(home.path()), Duration::from_secs(60)));
    assert!(stdout(&out).starts_with("tiny-model\thp1-"), "{}", stdout(&out));
    let list = stdout(&ok(hotpot_with(&["models"], Some(home.path()), Duration::from_secs(60))));
    assert!(list.lines().any(|l| l.starts_with("tiny-model") && l.contains(" 4 ")), "{list}");
    // And it runs by name.
    ok(hotpot_with(&["run", "tiny-model", "the", "-n", "4", "--temperature", "0"], Some(home.path()), Duration::from_secs(60)));
}

const CAPITAL: &str = "The capital of France is";

#[test]
fn greedy_run_and_span_chains_give_the_same_text() {
    let whole = stdout(&ok(hotpot(&["run", "smollm2-135m", CAPITAL, "--temperature", "0", "-n", "16", "-q"])));
    assert!(whole.starts_with(" Paris."), "{whole:?}");
    for chain in ["0..12,12..30", "0..10,10..20,20..30"] {
        let split = stdout(&ok(hotpot(&["run", "smollm2-135m", CAPITAL, "--temperature", "0", "-n", "16", "-q", "--spans", chain])));
        assert_eq!(split, whole, "--spans {chain}");
    }
}

#[test]
fn same_seed_same_text() {
    let run = |seed: &str| stdout(&ok(hotpot(&["run", "smollm2-135m", "Once upon a time", "--temperature", "1.0", "--seed", seed, "-n", "24", "-q"])));
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
}

#[test]
fn stop_strings_cut_the_output_exactly() {
    let out = stdout(&ok(hotpot(&["run", "smollm2-135m", CAPITAL, "--temperature", "0", "-n", "16", "-q", "--stop", "."])));
    assert_eq!(out, " Paris\n");
}

#[test]
fn chat_mode_answers() {
    let out = ok(hotpot(&["run", "smollm2-135m", "What is the capital of France?", "--chat", "--temperature", "0", "-n", "24"]));
    assert!(stdout(&out).contains("Paris"), "{}", stdout(&out));
    assert!(stderr(&out).contains("tok/s"), "timings are printed: {}", stderr(&out));
}

#[test]
fn tokenize_matches_llamacpp() {
    let out = stdout(&ok(hotpot(&["tokenize", "smollm2-135m", CAPITAL])));
    assert_eq!(out.trim(), "[504,3575,282,4649,314]");
    let json: serde_json::Value = serde_json::from_str(&stdout(&ok(hotpot(&["tokenize", "smollm2-135m", "Hi", "--chat", "--json"])))).expect("json");
    let pieces = json.as_array().expect("array");
    assert_eq!(pieces[0]["piece"], "<|im_start|>");
    assert!(pieces.iter().any(|p| p["piece"] == "Hi"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.gguf");
    TinyModel::default().write(&good).expect("writes");
    let bytes = std::fs::read(&good).expect("reads");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).expect("writes");
    fails_with(hotpot(&["run", truncated.to_str().expect("utf-8"), "hi"]), "truncated");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a model at all").expect("writes");
    fails_with(hotpot(&["run", garbage.to_str().expect("utf-8"), "hi"]), "not a valid GGUF file");

    let alien = dir.path().join("alien.gguf");
    TinyModel { architecture: "mamba9".into(), ..Default::default() }.write(&alien).expect("writes");
    fails_with(hotpot(&["run", alien.to_str().expect("utf-8"), "hi"]), "unsupported model architecture `mamba9`");

    fails_with(hotpot(&["run", "smollm2-135m", "hi", "--spans", "0..12,12..31"]), "outside the model's 30 blocks");
    fails_with(hotpot(&["run", "smollm2-135m", "hi", "--spans", "0..12,14..30"]), "uncovered");
    fails_with(hotpot(&["run", "smollm2-135m", "hi", "--spans", "0..x"]), "--spans");
    let long = "word ".repeat(40);
    fails_with(hotpot(&["run", "smollm2-135m", &long, "--ctx-size", "16"]), "more than the context");
    fails_with(hotpot(&["run", "no-such-model-anywhere", "hi"]), "unknown model `no-such-model-anywhere`");
    fails_with(hotpot(&["run", "smollm2-135m", "hi", "--top-p", "2"]), "--top-p");
}
