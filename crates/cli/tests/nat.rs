//! Nodes behind real NATs (issue 16), in the network namespaces of
//! `scripts/natbed.sh` (root only; the test command runs as root and
//! installs nftables): an "internet" with a relay, a public node and a
//! gateway, two homes behind NAT routers, one endpoint-independent and one
//! symmetric, each with a node, a third home (symmetric) and a fourth
//! (endpoint-independent), each with a gateway. A 3-node chain through
//! both homes must serve the official `openai` client the same tokens as
//! one process; the homes' nodes must find themselves unreachable (AutoNAT)
//! and listen through the relay; the public gateway's routes must end up
//! direct; the fourth home's gateway must hole punch to the first home's
//! node (no other way to a direct route there); the third home's gateway
//! must reach the symmetric home's node only through the relay, and still
//! be answered; answers must go on when the relay dies mid-answer; and the
//! public node, found reachable by AutoNAT, must relay by itself for a home
//! node that knows only it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The namespaces, torn down on drop.
struct Bed {
    name: String,
}

impl Bed {
    fn up() -> Bed {
        let name = format!("hp{}", std::process::id() % 100_000);
        let out = output_within(Command::new("bash").args([&script(), "up", &name]), Duration::from_secs(60));
        assert!(out.status.success(), "the NAT test bed did not come up (root and nftables needed):\n{}{}", text(&out.stdout), text(&out.stderr));
        Bed { name }
    }

    fn ns(&self, which: &str) -> String {
        format!("{}-{which}", self.name)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("bash").args([&script(), "down", &self.name]).status();
    }
}

fn script() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/natbed.sh").to_string_lossy().into_owned()
}

/// A `hotpot` process inside a namespace, its output in a log file; killed
/// on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(ns: &str, args: &[&str], log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, HOTPOT])
            .args(args)
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("ip netns exec runs");
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`; returns it.
    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "no {needle:?} within {limit:?} in {}:\n{}", self.log.display(), self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The peer id the process printed ("peer id: …", or "gateway peer
    /// id: …"), waiting up to `limit` for it.
    fn peer_id(&self, limit: Duration) -> String {
        let line = self.wait_for("peer id:", limit);
        line.rsplit(' ').next().unwrap_or_default().trim().to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// curl inside namespace `ns`.
fn curl_in(ns: &str, args: &[&str]) -> String {
    let out = output_within(Command::new("ip").args(["netns", "exec", ns, "curl"]).args(args), Duration::from_secs(120));
    text(&out.stdout)
}

fn completion(ns: &str, url: &str, body: serde_json::Value) -> serde_json::Value {
    let answer = curl_in(ns, &["-s", &format!("{url}/v1/completions"), "-H", "Content-Type: application/json", "-d", &body.to_string()]);
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// The official `openai` client inside namespace `ns`: a greedy streamed
/// completion of `prompt`, `tokens` long; returns its text, or the error
/// the client raised (`ERROR <status> <message>`).
fn openai_in(ns: &str, url: &str, prompt: &str, tokens: usize) -> String {
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=120)
try:
    stream = client.completions.create(model="smollm2-135m", prompt=sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0, stream=True)
    print("".join(chunk.choices[0].text for chunk in stream if chunk.choices), end="")
except openai.APIStatusError as e:
    print(f"ERROR {e.status_code} {e.message}", end="")
"#;
    let out =
        output_within(Command::new("ip").args(["netns", "exec", ns, "python3", "-c", script, url, prompt, &tokens.to_string()]), Duration::from_secs(150));
    assert!(out.status.success(), "the openai client failed: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Asks through the `openai` client until the answer is not a 503 (the
/// gateway has not yet heard of every block), for up to `limit`.
fn openai_when_covered(ns: &str, url: &str, prompt: &str, tokens: usize, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let answer = openai_in(ns, url, prompt, tokens);
        if !answer.starts_with("ERROR 503") || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The gateway's view of the swarm (`GET /v1/hotpot/swarm`).
fn swarm_in(ns: &str, url: &str) -> serde_json::Value {
    let body = curl_in(ns, &["-s", &format!("{url}/v1/hotpot/swarm")]);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Field `field` ("route", "reachability") of the node serving the span
/// starting at `start`, in a view of the swarm.
fn of_node(view: &serde_json::Value, start: u64, field: &str) -> String {
    let nodes = view.as_array().or(view["nodes"].as_array()).expect("nodes");
    nodes.iter().find(|n| n["span"][0] == start).map_or("absent".into(), |n| n[field].as_str().unwrap_or("?").to_string())
}

/// Starts a gateway in `ns` on a free port; returns it and its URL once it
/// sees every block.
fn gateway_in(ns: &str, join: &str, dir: &Path, name: &str) -> (Proc, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("addr").port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let key = dir.join(format!("{name}.key"));
    let gateway = Proc::start(
        ns,
        &["-v", "gateway", "--join", join, "--listen", &listen, "-t", "1", "--no-audits", "--key", key.to_str().expect("utf-8")],
        log_path(dir, name),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !curl_in(ns, &["-s", &format!("{url}/health")]).contains("\"ok\"") {
        assert!(Instant::now() < deadline, "{name} never saw every block: {}\n{}", curl_in(ns, &["-s", &format!("{url}/health")]), gateway.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    (gateway, url)
}

fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

#[test]
fn nodes_behind_nat_serve_through_a_relay_and_hole_punch() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let bed = Bed::up();
    let (inet, home1, home2, home3, home4) = (bed.ns("inet"), bed.ns("h1"), bed.ns("h2"), bed.ns("h3"), bed.ns("h4"));

    let key = d.join("relay.key");
    let mut relay = Proc::start(&inet, &["relay", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1", "--key", key.to_str().expect("utf-8")], log_path(d, "relay"));
    let relay_id = relay.peer_id(Duration::from_secs(30));
    let via = |ip: &str| format!("/ip4/{ip}/udp/4001/quic-v1/p2p/{relay_id}");
    let node_on = |ns: &str, blocks: &str, listen: &str, join: String, name: &str, extra: &[&str]| {
        let mut args = vec!["node", "--blocks", blocks, "--listen", listen, "--join", &join, "-t", "1"];
        args.extend_from_slice(extra);
        Proc::start(ns, &args, log_path(d, name))
    };
    let node = |ns: &str, blocks: &str, join: String, name: &str| node_on(ns, blocks, "/ip4/0.0.0.0/udp/0/quic-v1", join, name, &[]);
    // Home 1 (endpoint-independent NAT), the internet, home 2 (symmetric).
    let first = node(&home1, "0..10", via("10.77.1.1"), "home1");
    let middle = node_on(&inet, "10..20", "/ip4/0.0.0.0/udp/4002/quic-v1", via("10.77.2.1"), "public", &[]);
    let mut last = node(&home2, "20..30", via("10.77.2.1"), "home2");
    for home in [&first, &last] {
        home.wait_for("reachability changed reachability=private", Duration::from_secs(60));
        home.wait_for("reserving a slot on a relay", Duration::from_secs(30));
    }

    let (gateway, url) = gateway_in(&inet, &via("10.77.1.1"), d, "gateway");

    // The same tokens as one process, to the official client. A node's
    // connection sometimes closes once while the hole punches settle (the
    // gateway hears of it again within a heartbeat): a 503 in that moment
    // is retried.
    let prompt = "The capital of France is";
    // `hotpot run` ends its output with a newline.
    let local = local_greedy(prompt, 8);
    let expected = local.strip_suffix('\n').unwrap_or(&local);
    assert_eq!(openai_when_covered(&inet, &url, prompt, 8, Duration::from_secs(30)), expected, "{}", gateway.log());

    // The public gateway's routes to the homes' nodes end up direct: a hole
    // punch through the endpoint-independent NAT, and the symmetric home's
    // node dialing the (public) gateway back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = swarm_in(&inet, &url);
        let routes: Vec<&str> = view["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["route"].as_str()).collect();
        if routes.len() == 3 && routes.iter().all(|r| *r == "direct") {
            break;
        }
        assert!(Instant::now() < deadline, "routes not direct: {routes:?}\n{view}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The homes' nodes say they are private (they listen through the relay),
    // the public one that it is public, to the gateway and to `hotpot swarm
    // status`, which also says how it reached each one.
    let view = swarm_in(&inet, &url);
    let reach = |view: &serde_json::Value| [0, 10, 20].map(|start| of_node(view, start, "reachability"));
    assert_eq!(reach(&view), ["private", "public", "private"], "{view}");
    // `swarm status` reports the nodes it heard from within its wait; on a
    // loaded machine a relayed node can miss one window (seen once in a
    // full suite run, 2026-12-04), so a status without all three is asked
    // again, up to three times.
    let mut status = serde_json::Value::Null;
    for _ in 0..3 {
        let out = output_within(
            Command::new("ip").args(["netns", "exec", &inet, HOTPOT, "swarm", "status", "--json", "--wait", "4", "--join", &via("10.77.1.1")]),
            Duration::from_secs(60),
        );
        status = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
        if !reach(&status).contains(&"absent".to_string()) {
            break;
        }
    }
    assert_eq!(reach(&status), ["private", "public", "private"], "{status}");
    for start in [0, 10, 20] {
        assert!(["direct", "relayed"].contains(&of_node(&status, start, "route").as_str()), "{status}");
    }

    // A gateway in the fourth home, behind an endpoint-independent NAT like
    // the first home's: neither can dial the other, so the route between
    // them turns direct only by a hole punch, which DCUtR reports on
    // whichever side finished it first. (The public gateway's direct routes
    // above may come from a home node dialing it, with no hole punch.)
    let (punching, punching_url) = gateway_in(&home4, &via("10.77.4.1"), d, "home4-gateway");
    let punching_id = punching.peer_id(Duration::from_secs(1));
    let first_id = first.peer_id(Duration::from_secs(1));
    assert_eq!(openai_when_covered(&home4, &punching_url, prompt, 8, Duration::from_secs(30)), expected, "{}", punching.log());
    let deadline = Instant::now() + Duration::from_secs(70);
    loop {
        let route = of_node(&swarm_in(&home4, &punching_url), 0, "route");
        let reported = [(&punching, &first_id), (&first, &punching_id)]
            .iter()
            .any(|(p, peer)| p.log().lines().any(|l| l.contains("hole punched") && l.contains(peer.as_str())));
        if route == "direct" && reported {
            break;
        }
        assert!(Instant::now() < deadline, "no hole punch between homes 1 and 4 (route {route}, reported {reported}):\n{}\n{}", punching.log(), first.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(openai_in(&home4, &punching_url, prompt, 8), expected, "{}", punching.log());
    drop(punching);

    // A gateway behind the third home's symmetric NAT: no hole punch can
    // work between it and the symmetric home's node, so that route stays
    // relayed, and answers still come, the same tokens.
    let (home_gateway, home_url) = gateway_in(&home3, &via("10.77.3.1"), d, "home-gateway");
    assert_eq!(openai_when_covered(&home3, &home_url, prompt, 8, Duration::from_secs(30)), expected, "{}", home_gateway.log());
    let long = openai_in(&home3, &home_url, "Once upon a time", 64);
    assert!(!long.starts_with("ERROR"), "{long}\n{}", home_gateway.log());
    // It stays relayed once the hole punches have had their time.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(of_node(&swarm_in(&home3, &home_url), 20, "route"), "relayed", "{}", home_gateway.log());
    assert_eq!(openai_in(&home3, &home_url, prompt, 8), expected, "{}", home_gateway.log());
    assert_eq!(of_node(&swarm_in(&home3, &home_url), 20, "route"), "relayed");
    drop(home_gateway);

    // The relay dies mid-answer: the answer goes on over the direct routes.
    let long = serde_json::json!({"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0,
        "logit_bias": {"0": -100, "2": -100}});
    let (ns, u) = (inet.clone(), url.clone());
    let running = std::thread::spawn(move || completion(&ns, &u, long));
    std::thread::sleep(Duration::from_millis(700));
    relay.kill();
    let answer = running.join().expect("the request thread");
    assert_eq!(answer["usage"]["completion_tokens"], 300, "the answer did not survive the relay's death: {answer}");
    let again = completion(&inet, &url, serde_json::json!({"model": "smollm2-135m", "prompt": prompt, "max_tokens": 8, "temperature": 0}));
    assert_eq!(again["choices"][0]["text"].as_str(), Some(expected), "{again}");

    // A node that AutoNAT found reachable relays too (no --relay needed):
    // with the relay gone, a new node in the symmetric home, joining only
    // the public node, listens through it, and the chain is served
    // through it.
    middle.wait_for("relaying circuits for peers behind NAT", Duration::from_secs(10));
    let middle_id = middle.peer_id(Duration::from_secs(1));
    last.kill();
    let through_middle = format!("/ip4/10.77.2.1/udp/4002/quic-v1/p2p/{middle_id}");
    let again = node_on(&home2, "20..30", "/ip4/0.0.0.0/udp/0/quic-v1", through_middle, "home2-again", &["--reserve", "always"]);
    let reserved = again.wait_for("reserving a slot on a relay", Duration::from_secs(30));
    assert!(reserved.contains(&format!("{middle_id}/p2p-circuit")), "{reserved}");
    assert_eq!(openai_when_covered(&inet, &url, prompt, 8, Duration::from_secs(60)), expected, "{}\n{}", gateway.log(), again.log());
}
