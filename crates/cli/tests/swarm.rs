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
    for (i, (prompt, n)) in fixture_cases().into_iter().enumerate() {
        let n_text = n.to_string();
        let expected = local_greedy(&prompt, n);
        // Node-to-node push (the default), and for one prompt a star: the
        // client relaying every step itself.
        let modes: &[&[&str]] = if i == 0 { &[&[], &["--no-push"]] } else { &[&[]] };
        for extra in modes {
            let mut args = vec!["run", "smollm2-135m", &prompt, "--temperature", "0", "-n", &n_text, "--join", &a.addr, "--show-route"];
            args.extend_from_slice(extra);
            let out = hotpot(&args, Duration::from_secs(120));
            assert!(out.status.success(), "swarm run failed: {}", text(&out.stderr));
            let route = text(&out.stderr);
            assert!(route.contains("route: [0..10]") && route.contains("[10..20]") && route.contains("[20..30]"), "{route}");
            let mode = if extra.is_empty() { "(pushed node to node)" } else { "(relayed through this process)" };
            assert!(route.contains(mode), "{route}");
            assert_eq!(text(&out.stdout), expected, "prompt {prompt:?} {extra:?}");
        }
    }
}

/// How a test stops a node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill,
    /// SIGTERM: the node tells its sessions it is going, so the client
    /// fails over at once.
    Term,
}

/// Starts a client generating `tokens` tokens, stops the node serving
/// `victim_span` once at least 8 tokens have arrived, and checks the
/// generation still ends with exactly the uninterrupted tokens.
/// Runs a greedy answer through the swarm, stops the node in use for
/// `victim_span` mid-answer, checks the tokens; returns the client's log.
fn failover_case(nodes: &mut [NodeProc], bootstrap: &str, victim_span: &str, stop: Stop, extra: &[&str]) -> String {
    let prompt = "Once upon a time";
    let tokens = 160;
    let expected = local_greedy(prompt, tokens);
    let first_eight = local_greedy(prompt, 8);
    let n_text = tokens.to_string();
    let mut client = Command::new(HOTPOT)
        .args(["run", "smollm2-135m", prompt, "--temperature", "0", "-n", &n_text, "--join", bootstrap, "--show-route"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client starts");
    let (err_tx, err_rx) = mpsc::channel();
    let stderr = client.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send((Instant::now(), line));
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
        let (_, line) = err_rx.recv_timeout(Duration::from_secs(60)).expect("the client prints its route");
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
    let stopped_at = Instant::now();
    match stop {
        Stop::Kill => victim.kill(),
        Stop::Term => victim.terminate(),
    }
    let killed_after = got.len();
    if stop == Stop::Term {
        // The client reroutes within 2 s of the signal, and the node exits cleanly.
        let deadline = stopped_at + Duration::from_secs(5);
        let failed_over = loop {
            let (at, line) = err_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the client reports a failover");
            log.push(line.clone());
            if line.contains("failover") {
                break at;
            }
        };
        let took = failed_over.duration_since(stopped_at);
        println!("SIGTERM to failover: {took:?}");
        assert!(took < Duration::from_secs(2), "the failover took {took:?}");
        let status = victim.wait_exit(Duration::from_secs(10)).expect("the node exits after SIGTERM");
        assert!(status.success(), "the node's exit: {status}");
    }

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
    log.extend(err_rx.try_iter().map(|(_, line)| line));
    let log = log.join("\n");
    assert!(status.success(), "client failed: {log}");
    assert!(killed_after < expected.len(), "the node was killed before the end of the generation");
    assert_eq!(String::from_utf8_lossy(&got), expected, "tokens differ after failover; log:\n{log}");
    assert!(log.contains("failover"), "the failover is visible in the client's log:\n{log}");
    assert!(log.contains("1 failovers") || log.contains("2 failovers"), "{log}");
    log
}

#[test]
fn failover_when_the_node_in_use_dies() {
    let _serial = serial();
    // Two nodes for the first span.
    let first = NodeProc::start("0..15", None, &[]);
    let addr = first.addr.clone();
    let mut nodes = vec![first, NodeProc::start("0..15", Some(&addr), &[]), NodeProc::start("15..30", Some(&addr), &[])];
    let bootstrap = nodes[2].addr.clone();
    let log = failover_case(&mut nodes, &bootstrap, "0..15", Stop::Kill, &[]);
    assert!(log.contains("(pushed node to node)") && log.contains("relaying every step from now on"), "push falls back to a star:\n{log}");
    drop(nodes);

    // Two nodes for the middle span, the client relaying every step (a star).
    let head = NodeProc::start("0..10", None, &[]);
    let addr = head.addr.clone();
    let mut nodes =
        vec![head, NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("20..30", Some(&addr), &[])];
    let log = failover_case(&mut nodes, &addr, "10..20", Stop::Kill, &["--no-push"]);
    assert!(log.contains("(relayed through this process)"), "{log}");
}

#[test]
fn failover_when_the_node_in_use_is_stopped() {
    let _serial = serial();
    let head = NodeProc::start("0..10", None, &[]);
    let addr = head.addr.clone();
    let mut nodes =
        vec![head, NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("20..30", Some(&addr), &[])];
    failover_case(&mut nodes, &addr, "10..20", Stop::Term, &[]);
}

/// Speculation through three nodes (n-gram drafts, so every pass is
/// several positions wide and refusals roll the nodes back) with the
/// middle node SIGKILLed mid-answer: the same greedy tokens.
#[test]
fn failover_with_speculation_gives_the_same_tokens() {
    let _serial = serial();
    let head = NodeProc::start("0..10", None, &[]);
    let addr = head.addr.clone();
    let mut nodes =
        vec![head, NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("20..30", Some(&addr), &[])];
    let report = |log: &str| -> Vec<usize> {
        let line = log.lines().find(|l| l.starts_with("[speculation: ")).unwrap_or_else(|| panic!("no speculation report:\n{log}"));
        println!("{line}");
        line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect()
    };
    let log = failover_case(&mut nodes, &addr, "10..20", Stop::Kill, &["--draft", "ngram"]);
    let numbers = report(&log);
    assert!(numbers[1] > 0 && numbers[1] < numbers[0], "drafts were kept and refused: {log}");
    drop(nodes);

    // A draft model (the same small model here: the point is the
    // machinery) drafting the next window while the chain checks one.
    let head = NodeProc::start("0..10", None, &[]);
    let addr = head.addr.clone();
    let mut nodes =
        vec![head, NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("10..20", Some(&addr), &[]), NodeProc::start("20..30", Some(&addr), &[])];
    let log = failover_case(&mut nodes, &addr, "10..20", Stop::Kill, &["--draft", "smollm2-135m"]);
    let numbers = report(&log);
    assert!(numbers[1] > 0, "{log}");
}

#[test]
fn gaps_fail_fast_and_auto_nodes_fill_them() {
    let _serial = serial();
    let a = NodeProc::start("0..10", None, &["--price", "1"]);
    let _c = NodeProc::start("20..30", Some(&a.addr), &["--price", "0.5"]);
    let started = Instant::now();
    let out = hotpot(&["run", "smollm2-135m", "hello", "-n", "4", "--join", &a.addr], Duration::from_secs(60));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no node serves blocks 10..20"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "failing took {:?}", started.elapsed());

    let b = NodeProc::start("auto", Some(&a.addr), &["--num-blocks", "10", "--price", "2.25"]);
    assert_eq!(b.span, "10..20", "the auto node takes the gap");
    let out = hotpot(&["run", "smollm2-135m", "The capital of France is", "--temperature", "0", "-n", "12", "-q", "--join", &a.addr], Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), local_greedy("The capital of France is", 12));

    let status = hotpot(&["swarm", "status", "--join", &a.addr, "--wait", "2"], Duration::from_secs(60));
    let shown = text(&status.stdout);
    assert!(shown.contains("every block is served") && shown.contains("10..20") && shown.contains(&b.peer_id), "{shown}");
    assert!(shown.contains("the cheapest full route costs 3.75 credits per 1,000 positions"), "{shown}");
}

/// A remote chain rolls back: every node forgets the positions after the
/// cut (`Truncate`), and computing them again gives the same bits — what
/// speculative decoding and failover replay rely on.
#[test]
fn remote_chains_roll_back_on_every_node() {
    use hotpot_core::NodeKey;
    use hotpot_engine::{ClientParts, Device, ModelFile};
    use hotpot_gateway::{ChainConfig, ChainContext, RemoteChain, SharedDirectory};
    use hotpot_net::{Network, NetworkConfig};

    let _serial = serial();
    let a = NodeProc::start("0..12", None, &[]);
    let _b = NodeProc::start("12..30", Some(&a.addr), &[]);
    let file = ModelFile::open(common::model_path()).expect("model");
    let model = file.model_id().expect("id");
    let config = file.config().clone();
    let client = ClientParts::load(&file, &Device::cpu(1).expect("threads")).expect("client");
    let tokens = client.tokenizer().encode("The capital of France is Paris, and the capital of Italy is").expect("encodes");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let network = Network::start(NetworkConfig {
            key: NodeKey::generate(),
            listen: vec![],
            join: vec![a.addr.parse().expect("addr")],
            dht_server: false,
            mdns: false,
            relay: Default::default(),
        })
        .await
        .expect("joins");
        let directory = SharedDirectory::follow(&network, model).await;
        directory.refresh(&network, &model, config.n_blocks, Duration::from_secs(3)).await;
        let context = ChainContext {
            network: network.clone(),
            directory,
            model,
            n_blocks: config.n_blocks,
            dim: config.dim,
            observer: None,
            selector: None,
            eligible: None,
        };
        // Relayed (each node told by `Truncate`) and pushed (the rollback
        // rides on the next step, which every node forwards).
        for push in [false, true] {
            let mut chain = RemoteChain::open(context.clone(), ChainConfig { max_len: 64, push, ..ChainConfig::default() }).await.expect("route");
            assert_eq!((chain.route().len(), chain.pushed()), (2, push));
            let rows = |range: std::ops::Range<usize>| client.embed(&tokens[range]).expect("embeds");
            let prefill = chain.forward(rows(0..6), 0).await.expect("prefill").into_vec();
            let mut decoded = Vec::new();
            for pos in 6..tokens.len() {
                decoded.push(chain.forward(rows(pos..pos + 1), pos).await.expect("decode").into_vec());
            }
            // Back to 8 positions: the nodes accept position 8 again, and give the same bits.
            chain.truncate(8).await.expect("rolls back");
            assert_eq!(chain.len(), 8);
            for pos in 8..tokens.len() {
                let again = chain.forward(rows(pos..pos + 1), pos).await.expect("recompute").into_vec();
                assert!(again.iter().zip(&decoded[pos - 6]).all(|(x, y)| x.to_bits() == y.to_bits()), "position {pos} differs after the rollback");
            }
            // A step that skips positions is refused: the caches really are at the end.
            assert!(chain.forward(rows(0..1), tokens.len() + 1).await.is_err());
            assert!(!prefill.is_empty());
            let records = chain.stage_records();
            assert!(records.iter().all(|r| r.positions == tokens.len()), "{:?}", records.iter().map(|r| r.positions).collect::<Vec<_>>());
            chain.close().await;
        }
        network.shutdown().await;
    });
}

/// `--emulate-delay-ms` delays every message a process sends to a peer:
/// with it on a node and on the client, each step of a one-node chain
/// pays two one-way delays, and the tokens do not change.
#[test]
fn emulated_delay_is_paid_on_every_hop() {
    let _serial = serial();
    let run = |join: &str, delay: &str| {
        let started = Instant::now();
        let out = hotpot(
            &["run", "smollm2-135m", "The capital of France is", "--temperature", "0", "-n", "6", "-t", "1", "--join", join, "--emulate-delay-ms", delay],
            Duration::from_secs(120),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout), started.elapsed())
    };
    let plain = NodeProc::start("0..30", None, &[]);
    let (fast_text, fast) = run(&plain.addr, "0");
    drop(plain);
    let slow_node = NodeProc::start("0..30", None, &["--emulate-delay-ms", "150"]);
    let (slow_text, slow) = run(&slow_node.addr, "150");
    assert_eq!(fast_text, slow_text, "the delay changed the tokens");
    // Open, the prefill and 5 decode steps: 7 round trips of 2 × 150 ms.
    let extra = slow.saturating_sub(fast);
    println!("6 tokens in {fast:?} without delay, {slow:?} with 150 ms each way");
    assert!(extra >= Duration::from_millis(7 * 300 - 100), "only {extra:?} more with 150 ms on each of two legs");
}
