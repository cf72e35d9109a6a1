//! Paying nodes (issue 13): three nodes priced 1, 2 and 3 credits per
//! 1,000 positions and a gateway fee; a prepaid key's requests are paid
//! from its account in the books, each node gets exactly its price for
//! the positions it computed, and the books balance.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn post(base_url: &str, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "-H", &format!("Authorization: Bearer {key}")])
        .args(["-d", &body.to_string(), &format!("{base_url}{path}")])
        .output()
        .expect("curl runs");
    let body = text(&out.stdout);
    let (json, status) = body.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status"), serde_json::from_str(json).unwrap_or(Value::Null))
}

/// Waits until `key` holds no credits: an answer is out before its
/// sessions are settled and its hold released.
fn holds_released(base_url: &str, key: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out =
            Command::new("curl").args(["-s", "-H", &format!("Authorization: Bearer {key}"), &format!("{base_url}/hotpot/key")]).output().expect("curl runs");
        let status: Value = serde_json::from_str(&text(&out.stdout)).unwrap_or(Value::Null);
        if status["credits_held"] == "0" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the requests' holds were never released: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A gateway's arguments, with prepaid keys and books, joined at `join`,
/// plus `extra`.
fn paid_gateway(join: &str, keys: &std::path::Path, store: &str, extra: &[&str]) -> Vec<String> {
    let base = ["gateway", "--join", join, "--listen", "127.0.0.1:0", "--api-keys", keys.to_str().expect("utf-8"), "--init-store", "--ledger", store];
    base.iter().chain(extra).chain(&["--no-audits", "-t", "1"]).map(|s| s.to_string()).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn micros(credits: f64) -> i128 {
    (credits * 1e6).round() as i128
}

/// What a price per 1,000 positions costs for `positions`, rounded up.
fn cost(price_micros: i128, positions: i128) -> i128 {
    (price_micros * positions + 999) / 1000
}

#[test]
fn nodes_are_paid_their_price_for_the_positions_they_computed() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let (keys, ledger, log) = (dir.path().join("keys.json"), dir.path().join("ledger.sqlite"), dir.path().join("sessions.jsonl"));
    std::fs::write(&keys, r#"{"keys": [{"key": "sk-alice", "name": "alice", "prepaid": true}, {"key": "sk-bob", "name": "bob", "prepaid": true}]}"#)
        .expect("keys");
    let store = ledger.to_str().expect("utf-8");
    let out = hotpot(&["ledger", "--store", store, "--init-store", "deposit", "alice", "100"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = hotpot(&["ledger", "--store", store, "deposit", "bob", "0.000001"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let a = NodeProc::start("0..10", None, &["--price", "1"]);
    let _b = NodeProc::start("10..20", Some(&a.addr), &["--price", "2"]);
    let _c = NodeProc::start("20..30", Some(&a.addr), &["--price", "3"]);
    let gateway = serve(&strs(&paid_gateway(&a.addr, &keys, store, &["--fee", "0.5", "--session-log", log.to_str().expect("utf-8")])));
    let url = &gateway.base_url;
    let chat = serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8});
    let (status, answer) = post(url, "/chat/completions", "sk-alice", &chat);
    assert_eq!(status, 200, "{answer}");
    let completions = serde_json::json!({"model": "smollm2-135m", "prompt": ["Once upon a time", "The sky is"], "max_tokens": 6, "n": 2, "temperature": 0.7});
    let (status, answer) = post(url, "/completions", "sk-alice", &completions);
    assert_eq!(status, 200, "{answer}");
    // A key whose credits cannot cover a request's most is refused before anything runs.
    let (status, answer) = post(url, "/chat/completions", "sk-bob", &chat);
    assert_eq!((status, answer["error"]["code"].as_str()), (429, Some("insufficient_quota")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap_or_default().contains("credits"), "{answer}");
    // Prices: /v1/models shows the cheapest full route plus the fee (1 + 2
    // + 3 + 0.5); a request capped below it is refused before anything
    // runs, one capped above it is served; a malformed cap is a 400.
    let out = Command::new("curl").args(["-s", "-H", "Authorization: Bearer sk-alice", &format!("{url}/models")]).output().expect("curl runs");
    let models: Value = serde_json::from_str(&text(&out.stdout)).expect("json");
    assert_eq!(models["data"][0]["hotpot"]["price_per_1k"], "6.5", "{models}");
    let capped = |cap: Value| {
        let mut body = chat.clone();
        body["hotpot"] = serde_json::json!({"max_price": cap});
        post(url, "/chat/completions", "sk-alice", &body)
    };
    let (status, answer) = capped(Value::from(5));
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("max_price_too_low")), "{answer}");
    for bad in [Value::from("lots"), Value::from(-1), serde_json::json!([1])] {
        let (status, answer) = capped(bad.clone());
        assert_eq!(status, 400, "max_price {bad}: {answer}");
    }
    let (status, answer) = capped(Value::from("7"));
    assert_eq!(status, 200, "{answer}");

    // What the sessions did, as the gateway recorded them (every session
    // is recorded before its request's hold is released).
    holds_released(url, "sk-alice");
    let records: Vec<Value> = std::fs::read_to_string(&log).expect("session log").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(records.len(), 6, "2 chats + 2 prompts × 2 choices");
    let mut paid: HashMap<String, i128> = HashMap::new();
    let mut fees = 0;
    for record in &records {
        let route = record["route"].as_array().expect("route");
        assert_eq!(route.len(), 3, "{record}");
        for stage in route {
            let peer = stage["peer"].as_str().expect("peer").to_string();
            let (price, positions) = (stage["price_per_1k"].as_i64().expect("price") as i128, stage["positions"].as_i64().expect("positions") as i128);
            *paid.entry(peer).or_default() += cost(price, positions);
        }
        let positions = route.iter().map(|s| s["positions"].as_i64().expect("positions") as i128).max().expect("stages");
        fees += cost(micros(0.5), positions);
    }
    drop(gateway);

    let out = hotpot(&["ledger", "--store", store, "--json"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let books: Value = serde_json::from_str(&text(&out.stdout)).expect("json");
    let balances: HashMap<String, i128> = books["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| (a["account"].as_str().expect("name").to_string(), a["micro_credits"].as_i64().expect("micros") as i128))
        .collect();
    println!("books: {balances:?}");
    assert_eq!(paid.len(), 3);
    for (peer, expected) in &paid {
        assert_eq!(balances.get(&format!("node:{peer}")).copied().unwrap_or(0), *expected, "node {peer}");
    }
    // Every node computed every position: the one priced 1 got a third of
    // what the one priced 3 got (up to rounding each session up).
    let (cheap, dear) = (paid[&a.peer_id], paid.iter().map(|(_, v)| *v).max().expect("paid"));
    assert!(cheap > 0 && (dear - 3 * cheap).abs() <= 3 * records.len() as i128, "{paid:?}");
    let total: i128 = paid.values().sum::<i128>() + fees;
    assert_eq!(balances.get("fees").copied().unwrap_or(0), fees);
    assert_eq!(balances.get("key:alice").copied().unwrap_or(0), micros(100.0) - total, "alice paid exactly the nodes and the fee");
    assert_eq!(balances.get("key:bob").copied().unwrap_or(0), 1, "bob's refused request cost nothing");
    assert!(!balances.keys().any(|a| a.starts_with("held:")), "every hold was released: {balances:?}");
    let out = hotpot(&["ledger", "--store", store, "check"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The receipts: every stage of every session has one, countersigned by
    // its node, kept by the node and by the gateway; the sums the nodes
    // hold are what the books paid them.
    let node_of: HashMap<String, String> = records
        .iter()
        .flat_map(|r| r["route"].as_array().expect("route").iter())
        .map(|s| (s["node"].as_str().expect("node").to_string(), s["peer"].as_str().expect("peer").to_string()))
        .collect();
    let export = |args: &[&str]| -> Value {
        let out = hotpot(&[&["receipts", "--json"], args].concat(), Duration::from_secs(30));
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(&text(&out.stdout)).expect("json")
    };
    let gateway_receipts = dir.path().join("receipts.sqlite");
    let kept = export(&["--store", gateway_receipts.to_str().expect("utf-8")]);
    let receipts = kept["receipts"].as_array().expect("receipts");
    assert_eq!(receipts.len(), 18, "6 sessions × 3 stages");
    assert!(receipts.iter().all(|r| r["holder"] == "gateway" && r["node_signature"].is_string()), "all countersigned: {kept}");
    // What the nodes themselves kept (their default store, shared by every node of this machine).
    let on_nodes = export(&[]);
    for (node, peer) in &node_of {
        let held: i128 = on_nodes["receipts"]
            .as_array()
            .expect("receipts")
            .iter()
            .filter(|r| r["holder"] == "node" && r["node"] == node.as_str())
            .map(|r| r["amount"].as_i64().expect("amount") as i128)
            .sum();
        assert_eq!(held, balances[&format!("node:{peer}")], "node {peer}: its receipts sum to what the books paid it");
        assert_eq!(kept["totals"][node].as_i64().map(i128::from), Some(held), "the gateway's receipts say the same");
    }
    // Offline: the export verifies against the session log; a changed amount does not.
    let file = dir.path().join("receipts.json");
    std::fs::write(&file, kept.to_string()).expect("writes");
    let verify = |file: &std::path::Path| {
        hotpot(
            &["receipts", "verify", file.to_str().expect("utf-8"), "--session-log", log.to_str().expect("utf-8"), "--countersigned"],
            Duration::from_secs(30),
        )
    };
    let out = verify(&file);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let mut forged = kept.clone();
    forged["receipts"][0]["positions"] = Value::from(forged["receipts"][0]["positions"].as_i64().expect("positions") + 1000);
    std::fs::write(&file, forged.to_string()).expect("writes");
    let out = verify(&file);
    assert!(!out.status.success(), "a changed receipt verifies: {}", text(&out.stdout));
    let mut unsigned = kept.clone();
    unsigned["receipts"][1]["node_signature"] = Value::Null;
    std::fs::write(&file, unsigned.to_string()).expect("writes");
    let out = verify(&file);
    assert!(!out.status.success() && text(&out.stdout).contains("not countersigned"), "{}", text(&out.stdout));
}

/// Acceptance 3: the gateway is killed (SIGKILL) while 20 paid requests
/// run; after a restart the books open, balance, hold nothing for the dead
/// requests, and the key has paid exactly what its nodes and the fee got.
#[test]
fn a_gateway_killed_mid_requests_loses_and_doubles_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let (keys, ledger) = (dir.path().join("keys.json"), dir.path().join("ledger.sqlite"));
    std::fs::write(&keys, r#"{"keys": [{"key": "sk-alice", "name": "alice", "prepaid": true}]}"#).expect("keys");
    let store = ledger.to_str().expect("utf-8");
    let out = hotpot(&["ledger", "--store", store, "--init-store", "deposit", "alice", "100"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a = NodeProc::start("0..10", None, &["--price", "1"]);
    let _b = NodeProc::start("10..20", Some(&a.addr), &["--price", "2"]);
    let _c = NodeProc::start("20..30", Some(&a.addr), &["--price", "3"]);
    let args = paid_gateway(&a.addr, &keys, store, &["--fee", "0.5"]);
    let args = strs(&args);
    let mut gateway = serve(&args);
    let url = format!("{}/chat/completions", gateway.base_url);
    // Short requests (settled before the kill) and long ones (cut by it).
    let clients: Vec<std::process::Child> = (0..20)
        .map(|i| {
            let chat = serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": if i % 2 == 0 { 2 } else { 200 }});
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-alice", "-d", &chat.to_string(), &url])
                .spawn()
                .expect("curl starts")
        })
        .collect();
    // Kill it while the requests run: some sessions settled, others not.
    std::thread::sleep(Duration::from_millis(3000));
    gateway.child.kill().expect("SIGKILL");
    let _ = gateway.child.wait();
    for mut client in clients {
        let _ = client.wait();
    }
    let balances = |store: &str| -> HashMap<String, i128> {
        let out = hotpot(&["ledger", "--store", store, "--json"], Duration::from_secs(30));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let books: Value = serde_json::from_str(&text(&out.stdout)).expect("json");
        books["accounts"]
            .as_array()
            .expect("accounts")
            .iter()
            .map(|a| (a["account"].as_str().expect("name").to_string(), a["micro_credits"].as_i64().expect("micros") as i128))
            .collect()
    };
    let killed = balances(store);
    println!("books after the kill: {killed:?}");
    assert!(killed.keys().any(|a| a.starts_with("held:")), "the kill left requests holding credits (or the test killed too late): {killed:?}");
    assert!(killed.keys().any(|a| a.starts_with("node:")), "some sessions were paid before the kill (or the test killed too early): {killed:?}");

    // The restarted gateway releases the dead requests' holds, and serves
    // (once it has heard of every block again).
    let gateway = serve(&args);
    wait_until_covered(&gateway.base_url, Duration::from_secs(60));
    let (status, answer) = post(
        &gateway.base_url,
        "/chat/completions",
        "sk-alice",
        &serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{answer}");
    // The answer is out before its session is settled and its hold released.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out =
            Command::new("curl").args(["-s", "-H", "Authorization: Bearer sk-alice", &format!("{}/hotpot/key", gateway.base_url)]).output().expect("curl runs");
        let key: Value = serde_json::from_str(&text(&out.stdout)).unwrap_or(Value::Null);
        if key["credits_held"] == "0" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the request's hold was never released: {key}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(gateway);
    let after = balances(store);
    println!("books after the restart: {after:?}");
    assert!(!after.keys().any(|a| a.starts_with("held:")), "a dead request still holds credits: {after:?}");
    let earned: i128 = after.iter().filter(|(a, _)| a.starts_with("node:") || a.as_str() == "fees").map(|(_, b)| *b).sum();
    assert!(earned > 0, "some sessions were paid: {after:?}");
    assert_eq!(after.get("key:alice").copied().unwrap_or(0) + earned, micros(100.0), "the key paid exactly what the nodes and the fee got: {after:?}");
    // No receipt was settled twice or lost: the nodes earned exactly what
    // the receipts the gateway kept say.
    let out = hotpot(&["receipts", "--json", "--store", dir.path().join("receipts.sqlite").to_str().expect("utf-8")], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kept: Value = serde_json::from_str(&text(&out.stdout)).expect("json");
    let nodes: i128 = after.iter().filter(|(a, _)| a.starts_with("node:")).map(|(_, b)| *b).sum();
    assert_eq!(kept["total"].as_i64().map(i128::from), Some(nodes), "receipts {kept}");
    let out = hotpot(&["ledger", "--store", store, "check"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A node can refuse a gateway that owes it receipts: a gateway killed
/// while its sessions ran never handed their receipts over; restarted with
/// the same identity, it is refused by the node (and says why), while
/// another gateway is served.
#[test]
fn a_node_refuses_a_gateway_that_owes_it_receipts() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = NodeProc::start("0..15", None, &["--price", "1", "--max-owed-receipts", "2"]);
    let _b = NodeProc::start("15..30", Some(&a.addr), &["--price", "1"]);
    let key = dir.path().join("gateway.key");
    let args = ["gateway", "--join", &a.addr, "--listen", "127.0.0.1:0", "--key", key.to_str().expect("utf-8"), "--no-audits", "-t", "1"];
    let mut gateway = serve(&args);
    let url = format!("{}/chat/completions", gateway.base_url);
    let clients: Vec<std::process::Child> = (0..3)
        .map(|_| {
            // Long enough on any machine to be cut by the kill below: the
            // end tokens (<|endoftext|> 0, <|im_end|> 2) are banned.
            let chat = serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story."}],
                                          "max_tokens": 3000, "logit_bias": {"0": -100, "2": -100}});
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-H", "Content-Type: application/json", "-d", &chat.to_string(), &url])
                .spawn()
                .expect("curl starts")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    gateway.child.kill().expect("SIGKILL");
    let _ = gateway.child.wait();
    for mut client in clients {
        let _ = client.wait();
    }
    let chat = serde_json::json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let gateway = serve(&args);
    let (status, answer) = post(&gateway.base_url, "/chat/completions", "none", &chat);
    let message = answer["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(status == 429 || status == 503, "the owing gateway was served: {status} {answer}");
    assert!(message.contains("receipt"), "the refusal says why: {answer}");
    drop(gateway);
    // Another gateway owes nothing and is served.
    let other = dir.path().join("other.key");
    let fresh = ["gateway", "--join", &a.addr, "--listen", "127.0.0.1:0", "--key", other.to_str().expect("utf-8"), "--no-audits", "-t", "1"];
    let gateway = serve(&fresh);
    let (status, answer) = post(&gateway.base_url, "/chat/completions", "none", &chat);
    assert_eq!(status, 200, "{answer}");
}

/// Acceptance 5 and 6, with the official openai client (agent_keys.py): a
/// prepaid root key mints children and grandchildren; none spends past its
/// own or an ancestor's limit; a model outside a key's list is 403;
/// revoking a parent stops its children at once; a child's spend log
/// verifies offline and fails once changed, cut, or reordered.
#[test]
fn keys_an_agent_can_carry() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temp dir");
    let (keys, ledger) = (dir.path().join("keys.json"), dir.path().join("ledger.sqlite"));
    std::fs::write(&keys, r#"{"keys": [{"key": "sk-root", "name": "root", "prepaid": true}]}"#).expect("keys");
    let store = ledger.to_str().expect("utf-8");
    let out = hotpot(&["ledger", "--store", store, "--init-store", "deposit", "root", "100"], Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let a = NodeProc::start("0..15", None, &["--price", "0.1"]);
    let _b = NodeProc::start("15..30", Some(&a.addr), &["--price", "0.1"]);
    let key = dir.path().join("gateway.key");
    let gateway = serve(&strs(&paid_gateway(&a.addr, &keys, store, &["--key", key.to_str().expect("utf-8")])));
    let peer = gateway.stdout.iter().find_map(|l| l.strip_prefix("gateway peer id: ")).expect("the gateway prints its peer id").to_string();
    let out = python("agent_keys.py", &[&gateway.base_url, "sk-root", &peer, HOTPOT, dir.path().to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success() && stdout.contains("all agent key checks passed"), "{stdout}{}", text(&out.stderr));
}
