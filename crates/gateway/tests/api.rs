//! The HTTP handlers in process (axum `oneshot`), on a tiny generated model
//! and a swarm with no nodes: validation and error mapping.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use hotpot_core::NodeKey;
use hotpot_engine::testing::TinyModel;
use hotpot_engine::{ClientParts, Device, ModelFile};
use hotpot_gateway::{Gateway, GatewayConfig, KeyStore, router};
use hotpot_net::{Network, NetworkConfig};
use tower::ServiceExt;

struct Kit {
    app: axum::Router,
    _dir: tempfile::TempDir,
}

async fn kit(keys: Option<&str>) -> Kit {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    TinyModel { context: 64, ..Default::default() }.write(&path).expect("writes");
    let file = ModelFile::open(&path).expect("opens");
    let client = Arc::new(ClientParts::load(&file, &Device::cpu(1).expect("threads")).expect("loads"));
    let network =
        Network::start(NetworkConfig { key: NodeKey::generate(), listen: vec![], join: vec![], dht_server: false, mdns: false, relay: Default::default() })
            .await
            .expect("network");
    let mut config = GatewayConfig::new("tiny");
    config.max_body_bytes = 4096;
    config.keys = keys.map(|k| Arc::new(KeyStore::parse(k).expect("keys")));
    let gateway = Gateway::new(client, file.model_id().expect("id"), network, config).await;
    Kit { app: router(gateway), _dir: dir }
}

async fn call(kit: &Kit, method: &str, uri: &str, body: &str, key: Option<&str>) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = kit.app.clone().oneshot(request.body(Body::from(body.to_string())).expect("request")).await.expect("responds");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

fn assert_error(got: &(StatusCode, serde_json::Value), status: StatusCode, kind: &str, code: Option<&str>) {
    assert_eq!(got.0, status, "{}", got.1);
    let error = &got.1["error"];
    assert_eq!(error["type"], kind, "{}", got.1);
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", got.1);
    if let Some(code) = code {
        assert_eq!(error["code"], code, "{}", got.1);
    }
    assert!(error.get("param").is_some(), "param is always present: {}", got.1);
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_validated_with_openai_errors() {
    let kit = kit(None).await;
    let bad = call(&kit, "POST", CHAT, "{not json", None).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let wrong_type = call(&kit, "POST", CHAT, r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#, None).await;
    assert_error(&wrong_type, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert!(wrong_type.1["error"]["message"].as_str().is_some_and(|m| m.contains("temperature") || m.contains("f32")));
    let missing = call(&kit, "POST", CHAT, r#"{"model":"tiny"}"#, None).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let huge = format!(r#"{{"model":"tiny","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(10_000));
    assert_error(&call(&kit, "POST", CHAT, &huge, None).await, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None);
    let unknown = call(&kit, "POST", CHAT, r#"{"model":"gpt-9","messages":[{"role":"user","content":"hi"}]}"#, None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"));
    let long = format!(r#"{{"model":"tiny","messages":[{{"role":"user","content":"{}"}}]}}"#, "the ".repeat(100));
    assert_error(&call(&kit, "POST", CHAT, &long, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", Some("context_length_exceeded"));
    let too_many = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":200}"#;
    assert_error(&call(&kit, "POST", CHAT, too_many, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", Some("context_length_exceeded"));
    let hot = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"temperature":3}"#;
    assert_error(&call(&kit, "POST", CHAT, hot, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let role = r#"{"model":"tiny","messages":[{"role":"wizard","content":"hi"}]}"#;
    assert_error(&call(&kit, "POST", CHAT, role, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let image = r#"{"model":"tiny","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
    assert_error(&call(&kit, "POST", CHAT, image, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let tokens = r#"{"model":"tiny","prompt":[999999],"max_tokens":1}"#;
    assert_error(&call(&kit, "POST", "/v1/completions", tokens, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    let empty = r#"{"model":"tiny","prompt":[],"max_tokens":1}"#;
    assert_error(&call(&kit, "POST", "/v1/completions", empty, None).await, StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert_error(&call(&kit, "GET", "/v1/nothing", "", None).await, StatusCode::NOT_FOUND, "invalid_request_error", None);
    for bias in [r#"{"abc":1}"#, r#"{"999999":1}"#, r#"{"1":150}"#] {
        let body = format!(r#"{{"model":"tiny","messages":[{{"role":"user","content":"hi"}}],"logit_bias":{bias}}}"#);
        let got = call(&kit, "POST", CHAT, &body, None).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request_error", None);
        assert_eq!(got.1["error"]["param"], "logit_bias", "{}", got.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_without_the_blocks_is_503_naming_them() {
    let kit = kit(None).await;
    let ok = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let got = call(&kit, "POST", CHAT, ok, None).await;
    assert_error(&got, StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("model_not_covered"));
    assert!(got.1["error"]["message"].as_str().is_some_and(|m| m.contains("no node serves blocks 0..4")), "{}", got.1);
    let (status, models) = call(&kit, "GET", "/v1/models", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"].as_array().map(Vec::len), Some(0), "an uncovered model is not listed");
    let (status, health) = call(&kit, "GET", "/health", "", None).await;
    assert_eq!((status, health["status"].as_str()), (StatusCode::OK, Some("degraded")));
    let metrics = kit.app.clone().oneshot(Request::get("/metrics").body(Body::empty()).expect("request")).await.expect("responds");
    let text = String::from_utf8(axum::body::to_bytes(metrics.into_body(), 1 << 20).await.expect("body").to_vec()).expect("utf-8");
    assert!(text.contains("hotpot_requests_total{endpoint=\"/v1/chat/completions\",status=\"503\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_required_and_limited() {
    let kit = kit(Some(r#"{"keys": [{"key": "sk-good", "name": "alice"}, {"key": "sk-slow", "requests_per_minute": 1}]}"#)).await;
    let body = r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    assert_error(&call(&kit, "POST", CHAT, body, None).await, StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"));
    assert_error(&call(&kit, "POST", CHAT, body, Some("sk-bad")).await, StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"));
    assert_error(&call(&kit, "GET", "/v1/models", "", None).await, StatusCode::UNAUTHORIZED, "authentication_error", None);
    assert_eq!(call(&kit, "GET", "/v1/models", "", Some("sk-good")).await.0, StatusCode::OK);
    // Admitted (then 503: no swarm), then over its rate.
    assert_eq!(call(&kit, "POST", CHAT, body, Some("sk-slow")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_error(&call(&kit, "POST", CHAT, body, Some("sk-slow")).await, StatusCode::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"));
    assert_eq!(call(&kit, "GET", "/health", "", None).await.0, StatusCode::OK, "health needs no key");
}
