//! The swarm under load and abuse (issue 17's acceptance): real `hotpot`
//! processes on 127.0.0.1, driven by `tests/load.py`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn findings(out: &std::process::Output) -> Value {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "load.py failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// 200 concurrent mixed requests: each is answered 200, or 429/503 with
/// `Retry-After`; Busy never bans a node; the next request is served.
#[test]
fn a_burst_of_mixed_requests_gets_answers_or_retry_hints() {
    let _serial = serial();
    let up = serve(&["up", "--nodes", "3", "--port", "0", "--queue-timeout", "5", "--no-audits"]);
    let found = findings(&python("load.py", &["burst", &up.base_url]));
    let statuses = found["statuses"].as_object().expect("statuses");
    for (status, count) in statuses {
        assert!(["200", "429+retry-after", "503+retry-after"].contains(&status.as_str()), "{count} answers were {status}: {}", found["odd"]);
    }
    assert!(statuses.get("200").and_then(Value::as_u64).unwrap_or(0) >= 20, "most of the burst should still be served: {statuses:?}");
    assert_eq!(metric(&up.base_url, "hotpot_bans_total", ""), 0.0, "a node was banned:\n{}", up.warnings());
    assert_eq!(found["after_status"], 200, "{}", found["after_text"]);
    assert!(found["after_text"].as_str().unwrap_or_default().contains("Paris"), "{}", found["after_text"]);
}

/// While a ~3,000-token prompt is prefilled, another stream's longest gap
/// between tokens stays within 1 s (chunked prefill between decode steps).
#[test]
fn a_long_prefill_does_not_stall_other_streams() {
    let _serial = serial();
    let up = serve(&["up", "--nodes", "3", "--port", "0", "--no-audits"]);
    let found = findings(&python("load.py", &["gap", &up.base_url]));
    assert_eq!(found["long_status"], 200, "{found}");
    assert!(found["long_prompt_tokens"].as_u64().unwrap_or(0) >= 2800, "{found}");
    assert_eq!(found["overlap"], true, "the long prompt ran during the stream: {found}");
    let gap = found["max_gap"].as_f64().expect("gap");
    assert!(gap <= 1.0, "a stream stalled {gap:.2} s behind a long prefill");
}

/// Four 4 MB prompts are refused before any tokenizing (they cannot fit
/// the context), a running stream does not notice, and the gateway's
/// memory returns to where it was.
#[test]
fn huge_prompts_do_not_stall_streams_or_keep_memory() {
    let _serial = serial();
    let node = NodeProc::start("0..30", None, &[]);
    let gateway = serve(&["gateway", "--join", &node.addr, "--listen", "127.0.0.1:0", "--max-body-mb", "8", "--no-audits", "-t", "1"]);
    let pid = gateway.child.id().to_string();
    let found = findings(&python("load.py", &["huge", &gateway.base_url, &pid]));
    for status in found["statuses"].as_array().expect("statuses") {
        assert_eq!(status, 400, "{found}");
    }
    let gap = found["max_gap"].as_f64().expect("gap");
    assert!(gap <= 1.0, "a stream stalled {gap:.2} s while huge prompts arrived");
    let (before, after) = (found["rss_before_kib"].as_f64().expect("rss"), found["rss_after_kib"].as_f64().expect("rss"));
    assert!(after <= before * 1.2, "the gateway's RSS went from {before} KiB to {after} KiB and stayed");
}

/// 10,000 idle or slow connections: /health and a chat still answer within
/// 2 s; slow headers and slow bodies are closed after the read timeout.
#[test]
fn idle_and_slow_connections_do_not_lock_clients_out() {
    let _serial = serial();
    let up = serve(&["up", "--nodes", "1", "--port", "0", "--read-timeout", "2", "--no-audits"]);
    let found = findings(&python("load.py", &["conns", &up.base_url]));
    assert!(found["opened"].as_u64().unwrap_or(0) + found["refused"].as_u64().unwrap_or(0) >= 10_000, "{found}");
    assert_eq!(found["health_status"], 200);
    assert!(found["health_seconds"].as_f64().expect("s") <= 2.0, "{found}");
    assert_eq!(found["chat_status"], 200);
    assert!(found["chat_seconds"].as_f64().expect("s") <= 2.0, "{found}");
    for what in ["slow_header", "slow_body"] {
        let closed = found[format!("{what}_closed_after")].as_f64().expect("s");
        assert!((1.5..=6.0).contains(&closed), "a {what} was closed after {closed} s (read timeout 2 s): {found}");
    }
    assert!(found["slow_body_answer"].as_str().unwrap_or_default().contains("408"), "{found}");
}

/// A node with a spare is SIGKILLed: the next request is served within 2 s.
#[test]
fn a_killed_node_with_a_spare_costs_the_next_request_little() {
    let _serial = serial();
    let mut first = NodeProc::start("0..30", None, &[]);
    let _spare = NodeProc::start("0..30", Some(&first.addr), &[]);
    let gateway = serve(&["gateway", "--join", &first.addr, "--listen", "127.0.0.1:0", "--no-audits", "-t", "1"]);
    let url = format!("{}/chat/completions", gateway.base_url);
    let body = r#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4, "temperature": 0}"#;
    let ask = || {
        let started = Instant::now();
        let out = output_within(
            Command::new("curl").args(["-s", "-w", "\n%{http_code}", &url, "-H", "Content-Type: application/json", "-d", body]),
            Duration::from_secs(60),
        );
        (text(&out.stdout), started.elapsed())
    };
    for _ in 0..3 {
        assert!(ask().0.ends_with("200"));
    }
    first.kill();
    let (answer, took) = ask();
    assert!(answer.ends_with("200"), "{answer}");
    assert!(took <= Duration::from_secs(2), "the first request after the kill took {took:?}");
}

/// The keys' spending store fails closed: deleted, emptied or not a
/// database, the gateway refuses to start and says why; a half-written
/// evidence file is reported at start.
#[test]
fn damaged_stores_refuse_to_start_and_damaged_evidence_is_reported() {
    let _serial = serial();
    let node = NodeProc::start("0..30", None, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys.json");
    std::fs::write(&keys, r#"{"keys": [{"key": "sk-a", "name": "a", "token_budget": 100}]}"#).expect("writes");
    let evidence = dir.path().join("evidence");
    std::fs::create_dir_all(&evidence).expect("dir");
    std::fs::write(evidence.join("node-1.json"), br#"{"model": "hp1-0000", "node": "#).expect("half-written evidence");
    let key = dir.path().join("gateway.key");
    let gateway = |extra: &[&str]| {
        let mut args = vec![
            "gateway",
            "--join",
            &node.addr,
            "--listen",
            "127.0.0.1:0",
            "--api-keys",
            keys.to_str().expect("utf-8"),
            "--key",
            key.to_str().expect("utf-8"),
            "-t",
            "1",
        ];
        args.extend_from_slice(extra);
        output_within(Command::new(HOTPOT).args(&args).stdin(Stdio::null()), Duration::from_secs(60))
    };
    let store = dir.path().join("keys.spending.sqlite");
    // Missing.
    let out = gateway(&[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("does not exist") && text(&out.stderr).contains("--init-store"), "{}", text(&out.stderr));
    // Empty, and not a database.
    for (content, says) in [(&b""[..], "empty"), (&b"this is not a database at all, only text"[..], "not an SQLite database")] {
        std::fs::write(&store, content).expect("writes");
        let out = gateway(&["--init-store"]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    }
    // Created on request; the damaged evidence is reported when it starts.
    std::fs::remove_file(&store).expect("removes");
    let mut child = Command::new(HOTPOT)
        .args(["gateway", "--join", &node.addr, "--listen", "127.0.0.1:0", "--api-keys", keys.to_str().expect("utf-8"), "--init-store", "-t", "1"])
        .args(["--evidence-dir", evidence.to_str().expect("utf-8"), "--key", key.to_str().expect("utf-8")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let reported = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("damaged") && line.contains("node-1.json") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(reported, "the damaged evidence file was not reported: {seen:?}");
    assert!(store.exists());
}
