//! The red team against real processes: a cheating node serving blocks
//! 0..15 next to an honest one serving 15..30, a gateway that audits every
//! session of new nodes. Every cheat must end in a conviction with evidence
//! that `hotpot verify` confirms; honest nodes with other thread counts and
//! kernel variants must pass their audits.
//!
//! The cheats exist only in builds with the `redteam` feature, which the
//! test command (`scripts/test.sh`) turns on.
#![cfg(feature = "redteam")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hotpot_engine::testing::tamper::{Change, GgmlDType, rewrite};

struct Gateway {
    child: std::process::Child,
    url: String,
    /// The peer id it printed (its identity, from its key file).
    peer_id: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(join: &str, evidence: &std::path::Path) -> Gateway {
    gateway_with(join, evidence, &[])
}

fn gateway_with(join: &str, evidence: &std::path::Path, extra: &[&str]) -> Gateway {
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        socket.local_addr().expect("addr").port()
    };
    let listen = format!("127.0.0.1:{port}");
    // Each gateway's identity lives beside its evidence, so a restart on
    // the same evidence is the same gateway.
    let key = evidence.with_extension("key");
    let mut child = Command::new(HOTPOT)
        .args(["gateway", "--join", join, "--listen", &listen, "--evidence-dir", evidence.to_str().expect("utf-8"), "-t", "1"])
        .args(["--key", key.to_str().expect("utf-8")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(id) = line.strip_prefix("gateway peer id: ") {
                let _ = tx.send(id.to_string());
            }
        }
    });
    let mut gateway = Gateway { child, url: format!("http://{listen}"), peer_id: String::new() };
    gateway.peer_id = rx.recv_timeout(Duration::from_secs(60)).expect("the gateway prints its peer id");
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&["-sf", &format!("{}/health", gateway.url)]).is_empty() {
        assert!(Instant::now() < deadline, "the gateway did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    gateway
}

fn curl(args: &[&str]) -> String {
    text(&Command::new("curl").args(args).output().expect("curl runs").stdout)
}

fn complete(gateway: &Gateway, prompt: &str, tokens: u32) -> String {
    let body = serde_json::json!({"model": "smollm2-135m", "prompt": prompt, "max_tokens": tokens, "temperature": 0}).to_string();
    curl(&["-s", &format!("{}/v1/completions", gateway.url), "-H", "Content-Type: application/json", "-d", &body])
}

fn metric(gateway: &Gateway, name: &str, label: &str) -> u64 {
    common::metric(&gateway.url, name, label) as u64
}

fn wait_for(gateway: &Gateway, name: &str, label: &str, at_least: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if metric(gateway, name, label) >= at_least {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Long enough (prompt + 70 tokens) that the 64-position attention window
/// cheat is in effect.
const PROMPT: &str = "Once upon a time, in a small village at the edge of a great forest, there lived";

#[test]
fn every_cheat_is_caught_and_honest_variants_pass() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    // Another model file with the same shapes, for the `weights:` cheat.
    let model = {
        let out = hotpot(&["pull", "smollm2-135m"], Duration::from_secs(300));
        text(&out.stdout).trim().split('\t').nth(2).expect("model path").to_string()
    };
    let other = dir.path().join("other.gguf");
    rewrite(std::path::Path::new(&model), &other, 0..30, Some(Change::Requantize(GgmlDType::Q8_0)), 0).expect("writes another model");
    let other_weights = format!("weights:{}", other.display());

    let cheats =
        ["requantize-q4_0", "requantize-q8_0", "noise", "skip-block", "attention-window", "replay", "other-span", "alter-input", other_weights.as_str()];
    for cheat in cheats {
        let evidence = dir.path().join(format!("evidence-{}", cheat.split(':').next().unwrap_or(cheat)));
        let cheater = NodeProc::start("0..15", None, &["--redteam", cheat]);
        let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
        let gw = gateway(&cheater.addr, &evidence);
        let answer = complete(&gw, PROMPT, 70);
        assert!(answer.contains("\"choices\""), "{cheat}: {answer}");
        assert!(wait_for(&gw, "hotpot_cheats_total", "", 1), "{cheat} was not caught; metrics:\n{}", curl(&["-s", &format!("{}/metrics", gw.url)]));
        assert_eq!(metric(&gw, "hotpot_audits_total", "result=\"fail\""), 1, "{cheat}: one failed first audit");
        let files: Vec<_> = std::fs::read_dir(&evidence).expect("evidence dir").filter_map(Result::ok).map(|e| e.path()).collect();
        assert_eq!(files.len(), 1, "{cheat}: one evidence file");
        let check = hotpot(&["verify", files[0].to_str().expect("utf-8"), "-t", "1"], Duration::from_secs(120));
        let verdict = text(&check.stdout);
        assert!(check.status.success() && verdict.contains("verdict: CHEAT"), "{cheat}: {verdict}{}", text(&check.stderr));
        // The cheat is banned: the gateway no longer routes through it.
        let after = complete(&gw, "Hello", 4);
        assert!(after.contains("no node serves blocks 0..15"), "{cheat}: still routed after conviction: {after}");
    }

    // Honest nodes on other thread counts and kernel variants pass.
    let evidence = dir.path().join("evidence-honest");
    let mut first = NodeProc::start("0..15", None, &["-t", "1"]);
    let mut nodes = Vec::new();
    for (kernels, threads) in [("avx2", "2"), ("scalar", "1")] {
        let mut cmd_node = NodeProc::start_with_env("15..30", Some(&first.addr), &["-t", threads], &[("HOTPOT_KERNELS", kernels)]);
        let gw = gateway(&first.addr, &evidence);
        for i in 0..3 {
            let answer = complete(&gw, &format!("{PROMPT} {i}"), 12);
            assert!(answer.contains("\"choices\""), "{answer}");
        }
        assert!(wait_for(&gw, "hotpot_audits_total", "result=\"pass\"", 6), "honest audits did not all pass");
        assert_eq!(metric(&gw, "hotpot_audits_total", "result=\"fail\""), 0);
        assert_eq!(metric(&gw, "hotpot_cheats_total", ""), 0);
        cmd_node.kill();
        nodes.push(cmd_node);
    }
    first.kill();
    assert!(std::fs::read_dir(&evidence).map_or(true, |mut d| d.next().is_none()), "no evidence against honest nodes");
}

#[test]
fn a_conviction_reaches_other_gateways_that_check_it_themselves() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let cheater = NodeProc::start("0..15", None, &["--redteam", "noise"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let accuser = gateway(&cheater.addr, &dir.path().join("accuser"));
    let listener = gateway(&cheater.addr, &dir.path().join("listener"));
    let answer = complete(&accuser, PROMPT, 8);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&accuser, "hotpot_cheats_total", "", 1), "the accuser did not convict");
    // The other gateway served no session: it learns of the cheat from the
    // accusation, fetches the evidence and convicts only after auditing it.
    assert!(
        wait_for(&listener, "hotpot_accusations_total", "result=\"confirmed\"", 1),
        "the accusation was not confirmed; metrics:\n{}",
        curl(&["-s", &format!("{}/metrics", listener.url)])
    );
    assert_eq!(metric(&listener, "hotpot_cheats_total", ""), 1);
    assert_eq!(metric(&listener, "hotpot_audits_total", "result=\"fail\""), 1, "its own audit failed the node");
    let after = complete(&listener, "Hello", 4);
    assert!(after.contains("no node serves blocks 0..15"), "still routed after the accusation: {after}");
    let evidence: Vec<_> = std::fs::read_dir(dir.path().join("listener")).expect("own evidence").collect();
    assert_eq!(evidence.len(), 1, "the listener keeps evidence of its own");
}

#[test]
fn a_gateway_that_joins_later_hears_of_earlier_convictions() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let cheater = NodeProc::start("0..15", None, &["--redteam", "skip-block"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let accuser = gateway_with(&cheater.addr, &dir.path().join("accuser"), &["--accusations-every", "1"]);
    let answer = complete(&accuser, PROMPT, 8);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&accuser, "hotpot_cheats_total", "", 1), "the accuser did not convict");
    // This gateway starts after the conviction was first gossiped; the
    // accuser's repeats reach it, and it audits the evidence itself.
    let late = gateway(&cheater.addr, &dir.path().join("late"));
    assert!(
        wait_for(&late, "hotpot_accusations_total", "result=\"confirmed\"", 1),
        "the late gateway did not hear of the conviction; metrics:\n{}",
        curl(&["-s", &format!("{}/metrics", late.url)])
    );
    assert_eq!(metric(&late, "hotpot_cheats_total", ""), 1);
    let after = complete(&late, "Hello", 4);
    assert!(after.contains("no node serves blocks 0..15"), "still routed after the accusation: {after}");
}

#[test]
fn a_restarted_gateway_keeps_its_convictions() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let evidence = dir.path().join("evidence");
    let cheater = NodeProc::start("0..15", None, &["--redteam", "replay"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let first = gateway(&cheater.addr, &evidence);
    let answer = complete(&first, PROMPT, 8);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&first, "hotpot_cheats_total", "", 1), "the gateway did not convict");
    let first_id = first.peer_id.clone();
    drop(first);
    // The evidence is signed by the gateway, and `hotpot verify` says so.
    let file = std::fs::read_dir(&evidence)
        .expect("evidence dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("an evidence file");
    let verified = hotpot(&["verify", file.to_str().expect("utf-8"), "-t", "1"], Duration::from_secs(120));
    let said = text(&verified.stdout);
    assert!(
        verified.status.success() && said.contains(&format!("accused by gateway {first_id}")) && said.contains("CHEAT"),
        "{said}{}",
        text(&verified.stderr)
    );
    // Restarted on the same evidence: it serves nothing and audits nothing,
    // yet another gateway hears of the conviction from it, and it does not
    // route through the cheater.
    let restarted = gateway_with(&cheater.addr, &evidence, &["--accusations-every", "1"]);
    assert_eq!(restarted.peer_id, first_id, "a restarted gateway keeps its identity");
    let other = gateway(&cheater.addr, &dir.path().join("other"));
    assert!(
        wait_for(&other, "hotpot_accusations_total", "result=\"confirmed\"", 1),
        "the restarted gateway did not repeat its conviction; metrics:\n{}",
        curl(&["-s", &format!("{}/metrics", other.url)])
    );
    let after = complete(&restarted, "Hello", 4);
    assert!(after.contains("no node serves blocks 0..15"), "the restarted gateway routed through the cheater: {after}");
    assert_eq!(metric(&restarted, "hotpot_audits_total", ""), 0, "the ban came from its own earlier evidence, not a new audit");
}

#[test]
fn a_false_accusation_is_rejected_and_the_honest_node_keeps_serving() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = NodeProc::start("0..15", None, &[]);
    let _second = NodeProc::start("15..30", Some(&first.addr), &[]);
    let liar = gateway_with(&first.addr, &dir.path().join("liar"), &["--redteam-accuse-everyone"]);
    let listener = gateway(&first.addr, &dir.path().join("listener"));
    let answer = complete(&liar, PROMPT, 8);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&liar, "hotpot_cheats_total", "", 2), "the lying gateway did not accuse both nodes");
    assert!(
        wait_for(&listener, "hotpot_accusations_total", "result=\"rejected\"", 1),
        "the false accusation was not rejected; metrics:\n{}",
        curl(&["-s", &format!("{}/metrics", listener.url)])
    );
    assert_eq!(metric(&listener, "hotpot_cheats_total", ""), 0, "no honest node convicted");
    assert_eq!(metric(&listener, "hotpot_accusations_total", "result=\"confirmed\""), 0);
    let after = complete(&listener, PROMPT, 4);
    assert!(after.contains("\"choices\""), "the honest nodes still serve: {after}");
}

/// Speculative sessions (n-gram drafts through the API, so steps are
/// several positions wide and refusals roll the nodes back) are audited
/// like any other: honest nodes pass, a cheater is convicted, and its
/// evidence — rolled-back steps included — convicts again in `hotpot verify`.
#[test]
fn speculative_sessions_are_audited() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = ["--draft", "ngram"];
    let prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,";

    let first = NodeProc::start("0..15", None, &[]);
    let _second = NodeProc::start("15..30", Some(&first.addr), &[]);
    let evidence = dir.path().join("evidence-honest");
    let gw = gateway_with(&first.addr, &evidence, &spec);
    for i in 0..3 {
        let answer = complete(&gw, &format!("{prompt} {i}"), 40);
        assert!(answer.contains("\"choices\""), "{answer}");
    }
    let (drafted, accepted) = (metric(&gw, "hotpot_draft_tokens_total", ""), metric(&gw, "hotpot_draft_tokens_accepted_total", ""));
    println!("speculative sessions through 2 honest nodes: {drafted} drafted, {accepted} accepted");
    assert!(accepted > 0 && accepted < drafted, "drafts were kept and refused (rollbacks happened): {accepted}/{drafted}");
    assert!(wait_for(&gw, "hotpot_audits_total", "result=\"pass\"", 6), "honest speculative sessions did not pass their audits");
    assert_eq!(metric(&gw, "hotpot_audits_total", "result=\"fail\""), 0);
    drop(gw);
    drop(_second);
    drop(first);

    let evidence = dir.path().join("evidence-noise");
    let cheater = NodeProc::start("0..15", None, &["--redteam", "noise"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let gw = gateway_with(&cheater.addr, &evidence, &spec);
    let answer = complete(&gw, prompt, 40);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&gw, "hotpot_cheats_total", "", 1), "the cheat in a speculative session was not caught");
    let files: Vec<_> = std::fs::read_dir(&evidence).expect("evidence dir").filter_map(Result::ok).map(|e| e.path()).collect();
    assert_eq!(files.len(), 1, "one evidence file");
    let check = hotpot(&["verify", files[0].to_str().expect("utf-8"), "-t", "1"], Duration::from_secs(120));
    let verdict = text(&check.stdout);
    assert!(check.status.success() && verdict.contains("verdict: CHEAT"), "{verdict}{}", text(&check.stderr));
}

/// Issue 13, acceptance 4: a red-team node with a stake is convicted; its
/// stake is slashed (half to the gateway whose audit convicted it, half
/// burned), the convicted session's receipts are void and what they paid
/// goes back to the key, the penalty is written beside the evidence; and
/// under `--min-stake` an unstaked node is kept out of routes until it stakes.
#[test]
fn a_convicted_node_loses_its_stake_and_its_receipts() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let (keys, ledger, evidence) = (dir.path().join("keys.json"), dir.path().join("ledger.sqlite"), dir.path().join("evidence"));
    std::fs::write(&keys, r#"{"keys": [{"key": "sk-alice", "name": "alice", "prepaid": true}]}"#).expect("keys");
    let store = ledger.to_str().expect("utf-8");
    let ledger_cmd = |args: &[&str]| {
        let out = hotpot(&[&["ledger", "--store", store], args].concat(), Duration::from_secs(30));
        assert!(out.status.success(), "ledger {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    ledger_cmd(&["--init-store", "deposit", "alice", "100"]);
    let cheater = NodeProc::start("0..15", None, &["--redteam", "noise", "--price", "1"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &["--price", "1"]);
    let spare = NodeProc::start("0..15", Some(&cheater.addr), &["--price", "1"]);
    ledger_cmd(&["stake", &cheater.peer_id, "20"]);
    ledger_cmd(&["stake", &_honest.peer_id, "20"]);
    let gw = gateway_with(
        &cheater.addr,
        &evidence,
        &["--api-keys", keys.to_str().expect("utf-8"), "--init-store", "--ledger", store, "--min-stake", "10", "--fee", "0.5"],
    );
    let ask = || {
        let body = serde_json::json!({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).to_string();
        let url = format!("{}/v1/completions", gw.url);
        curl(&["-s", &url, "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-alice", "-d", &body])
    };
    // The unstaked spare is kept out: the route runs through the staked cheater.
    let answer = ask();
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&gw, "hotpot_cheats_total", "", 1), "the cheat was not caught");

    let files: Vec<std::path::PathBuf> = std::fs::read_dir(&evidence).expect("evidence dir").filter_map(Result::ok).map(|e| e.path()).collect();
    let penalty = files.iter().find(|p| p.to_string_lossy().ends_with(".penalty.json")).expect("a penalty beside the evidence");
    let penalty: serde_json::Value = serde_json::from_slice(&std::fs::read(penalty).expect("reads")).expect("json");
    println!("penalty: {penalty}");
    assert_eq!(penalty["node"], cheater.peer_id.as_str());
    assert_eq!((penalty["slashed"].as_str(), penalty["accuser_share"].as_str(), penalty["burned"].as_str()), (Some("20"), Some("10"), Some("10")));
    let voided: Vec<&str> = penalty["voided_receipts"].as_array().expect("receipts").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(voided.len(), 1, "the convicted session's receipt for the cheater: {penalty}");

    let books: serde_json::Value = serde_json::from_str(&ledger_cmd(&["--json"])).expect("json");
    let balance = |account: &str| {
        books["accounts"].as_array().expect("accounts").iter().find(|a| a["account"] == account).map_or(0, |a| a["micro_credits"].as_i64().expect("micros"))
    };
    assert_eq!(balance(&format!("stake:{}", cheater.peer_id)), 0, "the stake is gone: {books}");
    assert_eq!(balance("burned"), 10_000_000, "{books}");
    assert_eq!(balance(&format!("node:{}", cheater.peer_id)), 0, "the void took back what the cheater earned: {books}");
    assert_eq!(balance(&format!("stake:{}", _honest.peer_id)), 20_000_000, "the honest node keeps its stake");
    let honest_earned = balance(&format!("node:{}", _honest.peer_id));
    assert!(honest_earned > 0);
    // The key paid the honest node and the fee only.
    let fee = balance("fees") - 10_000_000;
    assert_eq!(balance("key:alice"), 100_000_000 - honest_earned - fee, "{books}");

    let out = hotpot(&["receipts", "--json", "--store", dir.path().join("receipts.sqlite").to_str().expect("utf-8")], Duration::from_secs(30));
    let kept: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("json");
    let void: Vec<&str> = kept["receipts"].as_array().expect("receipts").iter().filter(|r| r["void"].is_string()).filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(void, voided, "the gateway's copy of the receipt is void: {kept}");
    assert_eq!(kept["total"].as_i64(), Some(honest_earned), "the valid receipts are what the books paid");

    // The spare, once staked, serves (the cheater is out of routes).
    ledger_cmd(&["stake", &spare.peer_id, "20"]);
    let answer = ask();
    assert!(answer.contains("\"choices\""), "{answer}");
    // The answer is out before its receipts are settled and its hold released.
    let deadline = Instant::now() + Duration::from_secs(20);
    let books = loop {
        let books: serde_json::Value = serde_json::from_str(&ledger_cmd(&["--json"])).expect("json");
        let holding = books["accounts"].as_array().expect("accounts").iter().any(|a| a["account"].as_str().is_some_and(|n| n.starts_with("held:")));
        if !holding || Instant::now() > deadline {
            break books;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let spare_earned = books["accounts"].as_array().expect("accounts").iter().any(|a| a["account"] == format!("node:{}", spare.peer_id).as_str());
    assert!(spare_earned, "the staked spare served the next request: {books}");
    let check = ledger_cmd(&["check"]);
    assert!(!check.is_empty());
}

/// The headless browser the dashboard test drives (`chromium-headless-shell`
/// from Debian, which the test command installs; `HOTPOT_CHROMIUM` names
/// another).
fn chromium() -> String {
    let name = std::env::var("HOTPOT_CHROMIUM").unwrap_or_else(|_| "chromium-headless-shell".into());
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "{name} is not installed (bash scripts/test.sh installs it: apt-get install chromium-headless-shell)");
    name
}

/// The dashboard as the browser renders it, after its script ran.
fn rendered(chromium: &str, url: &str) -> String {
    let out =
        output_within(Command::new(chromium).args(["--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url]), Duration::from_secs(60));
    text(&out.stdout)
}

/// Renders the page until `ok` holds (or a minute passes); returns the last
/// rendering and how long it took.
fn rendered_until(chromium: &str, url: &str, ok: impl Fn(&str) -> bool) -> (String, Duration) {
    let started = Instant::now();
    loop {
        let dom = rendered(chromium, url);
        if ok(&dom) || started.elapsed() > Duration::from_secs(60) {
            return (dom, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The dashboard in a real browser: it shows every node and the coverage
/// bar as `/v1/hotpot/swarm` has them, a node SIGKILLed disappears within
/// the heartbeat expiry (25 s), and a conviction appears, with a link to
/// its evidence, once the red-team node is caught. The screenshot is kept
/// at `target/dashboard.png`.
#[test]
fn the_dashboard_shows_the_swarm_in_a_browser() {
    let _serial = serial();
    let browser = chromium();
    let dir = tempfile::tempdir().expect("tempdir");
    let cheater = NodeProc::start("0..15", None, &["--redteam", "noise"]);
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let mut spare = NodeProc::start("0..15", Some(&cheater.addr), &[]);
    let gateway = gateway(&cheater.addr, &dir.path().join("evidence"));
    let page = format!("{}/", gateway.url);
    let row = |peer: &str, state: &str| format!("data-peer=\"{peer}\" data-state=\"{state}\"");

    // Every node, as the JSON has it, and no gap in the bar.
    let (dom, _) = rendered_until(&browser, &page, |dom| dom.matches("<tr class=\"node\"").count() == 3);
    let swarm: serde_json::Value = serde_json::from_str(&curl(&["-s", &format!("{}/v1/hotpot/swarm", gateway.url)])).expect("swarm json");
    let nodes = swarm["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{swarm}");
    for n in nodes {
        let (peer, state) = (n["peer"].as_str().expect("peer"), n["state"].as_str().expect("state"));
        assert!(dom.contains(&row(peer, state)), "the page does not show {peer} as {state}:\n{dom}");
        assert_eq!((&n["route"], &n["reachability"]), (&"direct".into(), &"public".into()), "{n}");
    }
    assert_eq!(swarm["models"][0]["gaps"], serde_json::json!([]), "{swarm}");
    assert!(dom.contains("data-gaps=\"0\"") && dom.contains("every block served"), "{dom}");

    // A node killed without a word leaves the page within the heartbeat
    // expiry.
    spare.kill();
    let (dom, took) = rendered_until(&browser, &page, |dom| !dom.contains(&spare.peer_id));
    assert!(!dom.contains(&spare.peer_id), "the killed node is still shown after {took:?}");
    assert!(took < Duration::from_secs(40), "the killed node stayed {took:?}");

    // The red-team node, now the only one on blocks 0..15, is caught.
    let answer = complete(&gateway, PROMPT, 8);
    assert!(answer.contains("\"choices\""), "{answer}");
    assert!(wait_for(&gateway, "hotpot_cheats_total", "", 1), "the cheater was not convicted");
    let (dom, _) = rendered_until(&browser, &page, |dom| dom.contains("class=\"conviction\""));
    assert!(dom.contains(&format!("class=\"conviction\" data-peer=\"{}\"", cheater.peer_id)), "no conviction shown:\n{dom}");
    assert!(dom.contains(&row(&cheater.peer_id, "convicted")), "{dom}");
    assert!(dom.contains("data-gaps=\"1\"") && dom.contains("missing blocks 0..15"), "the convicted node's blocks are not shown missing:\n{dom}");
    let swarm: serde_json::Value = serde_json::from_str(&curl(&["-s", &format!("{}/v1/hotpot/swarm", gateway.url)])).expect("swarm json");
    let link = swarm["convictions"][0]["evidence"].as_str().expect("an evidence link").to_string();
    assert!(dom.contains(&format!("href=\"{link}\"")), "{dom}");
    let evidence: serde_json::Value = serde_json::from_str(&curl(&["-s", &format!("{}{link}", gateway.url)])).expect("the evidence is JSON");
    assert!(evidence["node"].is_string(), "{evidence}");
    assert!(curl(&["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("{}/v1/hotpot/evidence/..%2Fkey", gateway.url)]).starts_with("404"));
    // The hour's traffic, drawn a bar per minute, is the JSON's.
    let history = &swarm["traffic"]["history"];
    let tokens: u64 = history.as_array().expect("history").iter().map(|m| m["tokens"].as_u64().expect("tokens")).sum();
    assert!(tokens >= 8, "{history}");
    assert!(
        dom.contains("id=\"history\"") && dom.contains(&format!("data-tokens=\"{tokens}\"")),
        "the page's history is not the JSON's {tokens} tokens:\n{dom}"
    );

    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard.png");
    let out = output_within(
        Command::new(&browser)
            .args(["--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=3000"])
            .arg(format!("--screenshot={}", shot.display()))
            .arg(&page),
        Duration::from_secs(60),
    );
    assert!(shot.metadata().is_ok_and(|m| m.len() > 10_000), "no screenshot: {}", text(&out.stderr));
}
