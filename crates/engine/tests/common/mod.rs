//! Shared helpers for the tests that run real models pulled by `hotpot pull`.
#![allow(dead_code)]

use std::path::PathBuf;

use hotpot_core::LayerSpan;
use hotpot_engine::{ClientParts, Device, ModelFile, Span};

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model `hotpot pull ALIAS` placed in the store as `file`:
/// `$HOTPOT_HOME/models/…`, else `~/.cache/hotpot/models/…`. A missing
/// model fails the test: these tests are the engine's proof.
pub fn pulled(alias: &str, file: &str) -> PathBuf {
    let home =
        std::env::var("HOTPOT_HOME").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/hotpot"));
    let path = home.join("models").join(file);
    assert!(path.exists(), "{} is missing: run `hotpot pull {alias}` first", path.display());
    path
}

/// SmolLM2-135M (`$HOTPOT_TEST_MODEL` overrides).
pub fn model_path() -> PathBuf {
    if let Ok(path) = std::env::var("HOTPOT_TEST_MODEL") {
        return PathBuf::from(path);
    }
    pulled("smollm2-135m", MODEL_FILE)
}

pub fn open_model() -> ModelFile {
    ModelFile::open(model_path()).expect("the pulled model opens")
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().expect("an id list").iter().map(|v| v.as_u64().expect("an id") as u32).collect()
}

pub fn threads() -> usize {
    std::env::var("HOTPOT_TEST_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2)
}

pub fn load_spans(file: &ModelFile, chain: &[(u32, u32)], device: &Device) -> Vec<Span> {
    chain.iter().map(|&(a, b)| Span::load(file, LayerSpan::new(a, b).expect("valid span"), device).expect("span loads")).collect()
}

pub fn client(file: &ModelFile, device: &Device) -> ClientParts {
    ClientParts::load(file, device).expect("client parts load")
}
