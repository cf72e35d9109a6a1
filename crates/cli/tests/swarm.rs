//! The swarm end to end: real `hotpot node` processes on 127.0.0.1, the real
//! SmolLM2 model, a real client.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn fixture_cases() -> Vec<(String, usize)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/smollm2-135m-q4_1.llamacpp.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| (c["prompt_text"].as_str().expect("text").to_string(), c["greedy"].as_array().expect("greedy").len()))
        .collect()
}

#[test]
fn three_nodes_give_the_tokens_of_one_process() {
    let _serial = serial();
    let a = NodeProc::start("0..10", None, &[]);
    let _b = NodeProc::start("10..20", Some(&a.addr), &[]);
    let _c = NodeProc::start("20..30", Some(&a.addr), &[]);
    for (prompt, n) in fixture_cases() {
        let n_text = n.to_string();
        let out = hotpot(&["run", "smollm2-135m", &prompt, "--temperature", "0", "-n", &n_text, "--join", &a.addr, "--show-route"], Duration::from_secs(120));
        assert!(out.status.success(), "swarm run failed: {}", text(&out.stderr));
        let route = text(&out.stderr);
        assert!(route.contains("route: [0..10]") && route.contains("[10..20]") && route.contains("[20..30]"), "{route}");
        assert_eq!(text(&out.stdout), local_greedy(&prompt, n), "prompt {prompt:?}");
    }
}

/// Starts a client generating `tokens` tokens, kills the node serving
/// `victim_span` once at least 8 tokens have arrived, and checks the
/// generation still ends with exactly the uninterrupted tokens.
fn failover_case(nodes: &mut [NodeProc], bootstrap: &str, victim_span: &str) {
    let prompt = "Once upon a time";
    let tokens = 160;
    let expected = local_greedy(prompt, tokens);
    let first_eight = local_greedy(prompt, 8);
    let n_text = tokens.to_string();
    let mut client = Command::new(HOTPOT)
        .args(["run", "smollm2-135m", prompt, "--temperature", "0", "-n", &n_text, "--join", bootstrap, "--show-route"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    let (err_tx, err_rx) = mpsc::channel();
    let stderr = client.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(line);
        }
    });
    let mut stdout = client.stdout.take().expect("stdout");
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || out_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });

    // Which node does the route use for the victim span?
    let mut log = Vec::new();
    let route = loop {
        let line = err_rx.recv_timeout(Duration::from_secs(60)).expect("the client prints its route");
        log.push(line.clone());
        if line.starts_with("route: ") {
            break line;
        }
    };
    let hop = route.split(" → ").find(|h| h.contains(&format!("[{victim_span}]"))).expect("the route covers the victim span");
    let used_peer = hop.split_whitespace().last().expect("peer").trim_start_matches("route:").to_string();
    let victim = nodes.iter_mut().find(|n| n.peer_id == used_peer).expect("the used node is one of ours");

    // Kill it after at least 8 tokens.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < first_eight.len() {
        let chunk = out_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("tokens arrive");
        got.extend(chunk);
    }
    victim.kill();
    let killed_after = got.len();

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match out_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => got.extend(chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                assert!(Instant::now() < deadline, "the client did not finish")
            }
        }
    }
    let status = client.wait().expect("client exits");
    log.extend(err_rx.try_iter());
    let log = log.join("\n");
    assert!(status.success(), "client failed: {log}");
    assert!(killed_after < expected.len(), "the node was killed before the end of the generation");
    assert_eq!(String::from_utf8_lossy(&got), expected, "tokens differ after failover; log:\n{log}");
    assert!(log.contains("failover"), "the failover is visible in the client's log:\n{log}");
    assert!(log.contains("1 failovers") || log.contains("2 failovers"), "{log}");
}

#[test]
fn failover_when_the_node_in_use_dies() {
    let _serial = serial();
    // Two nodes for the first span.
    let first = NodeProc::start("0..15", None, &[]);
    let addr = first.addr.clone();
    let mut nodes = vec![first, NodeProc::start("0..15", Some(&addr), &[]), NodeProc::start("15..30", Some(&addr), &[])];
    let bootstrap = nodes[2].addr.clone();
    failover_case(&mut nodes, &bootstrap, "0..15");
    drop(nodes);

    // Two nodes for the middle span.
    let head = NodeProc::start("0..10", None, &[]);
    let addr = head.addr.clone();
    let mut nodes =
        vec![head, NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("20..30", Some(&addr), &[])];
    failover_case(&mut nodes, &addr, "10..20");
}

#[test]
fn gaps_fail_fast_and_auto_nodes_fill_them() {
    let _serial = serial();
    let a = NodeProc::start("0..10", None, &[]);
    let _c = NodeProc::start("20..30", Some(&a.addr), &[]);
    let started = Instant::now();
    let out = hotpot(&["run", "smollm2-135m", "hello", "-n", "4", "--join", &a.addr], Duration::from_secs(60));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no node serves blocks 10..20"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "failing took {:?}", started.elapsed());

    let b = NodeProc::start("auto", Some(&a.addr), &["--num-blocks", "10"]);
    assert_eq!(b.span, "10..20", "the auto node takes the gap");
    let out = hotpot(&["run", "smollm2-135m", "The capital of France is", "--temperature", "0", "-n", "12", "-q", "--join", &a.addr], Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), local_greedy("The capital of France is", 12));

    let status = hotpot(&["swarm", "status", "--join", &a.addr, "--wait", "2"], Duration::from_secs(60));
    let shown = text(&status.stdout);
    assert!(shown.contains("every block is served") && shown.contains("10..20") && shown.contains(&b.peer_id), "{shown}");
}
