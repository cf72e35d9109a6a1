//! The market on a chain (issue 15) with real processes: a real `anvil`
//! (the npm package the suite installs under `contracts/node_modules`),
//! the contract deployed and driven with `hotpot chain`, and `hotpot node`
//! and `hotpot gateway` processes that settle receipts and slash stakes
//! there.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hotpot_chain::{Address, LocalChain, Market, U256, Wallet};

struct Chain {
    rt: tokio::runtime::Runtime,
    local: LocalChain,
}

impl Chain {
    fn start(dir: &Path) -> Chain {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let contracts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contracts");
        let anvil = hotpot_chain::find_anvil(&contracts, false).expect("anvil (bash scripts/test.sh installs it: npm ci --prefix contracts)");
        let local = rt.block_on(LocalChain::start(&anvil, 0, &dir.join("anvil.log"))).expect("anvil starts");
        Chain { rt, local }
    }

    fn rpc(&self) -> &str {
        self.local.rpc()
    }

    /// A wallet file, created and funded with 100 coins.
    fn wallet(&self, dir: &Path, name: &str) -> (PathBuf, Wallet) {
        let path = dir.join(format!("{name}.wallet"));
        let (wallet, _) = Wallet::load_or_create(&path).expect("wallet");
        self.rt.block_on(self.local.fund(wallet.address(), hotpot_chain::parse_coin("100").expect("amount"))).expect("funded");
        (path, wallet)
    }

    fn market(&self, wallet: &Wallet, address: Address) -> Market {
        self.rt.block_on(Market::connect(self.rpc(), wallet, address)).expect("market")
    }
}

/// `hotpot chain ARGS…`, which must succeed; its stdout.
fn chain_ok(args: &[&str]) -> String {
    let out = hotpot(&[&["chain"], args].concat(), Duration::from_secs(60));
    assert!(out.status.success(), "hotpot chain {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// `hotpot chain ARGS…`, which must fail; its stderr.
fn chain_err(args: &[&str]) -> String {
    let out = hotpot(&[&["chain"], args].concat(), Duration::from_secs(60));
    assert!(!out.status.success(), "hotpot chain {args:?} should fail: {}", text(&out.stdout));
    text(&out.stderr)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// Deploys a market owned by `owner` and registers `gateways`.
fn deploy(chain: &Chain, owner: &Path, delay_s: u64, gateways: &[&Wallet]) -> String {
    let out = chain_ok(&["deploy", "--rpc", chain.rpc(), "--wallet", s(owner), "--unbonding-delay", &delay_s.to_string(), "--quorum", "2"]);
    let market = out.lines().last().expect("the address").trim().to_string();
    for g in gateways {
        chain_ok(&["register", "--rpc", chain.rpc(), "--wallet", s(owner), "--market", &market, &g.address().to_string()]);
    }
    market
}

struct GatewayProc {
    child: std::process::Child,
    url: String,
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(join: &str, dir: &Path, name: &str, extra: &[&str]) -> GatewayProc {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let store = dir.join(format!("{name}-chain.sqlite"));
    let own_store = if extra.contains(&"--chain-receipts") { vec![] } else { vec!["--chain-receipts", s(&store)] };
    let child = Command::new(HOTPOT)
        .args(["-v", "gateway", "--join", join, "--listen", &listen, "-t", "1"])
        .args(["--key", s(&dir.join(format!("{name}.key"))), "--evidence-dir", s(&dir.join(format!("{name}-evidence")))])
        .args(own_store)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("gateway starts");
    let gw = GatewayProc { child, url: format!("http://{listen}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&["-sf", &format!("{}/health", gw.url)]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the gateway {name} did not come up: {}",
            std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gw
}

fn curl(args: &[&str]) -> String {
    text(&Command::new("curl").args(args).output().expect("curl runs").stdout)
}

/// A completion, retried while the gateway has not read the node's stake yet.
fn complete(gw: &GatewayProc, prompt: &str) -> String {
    let body = serde_json::json!({"model": "smollm2-135m", "prompt": prompt, "max_tokens": 4, "temperature": 0}).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = curl(&["-s", &format!("{}/v1/completions", gw.url), "-H", "Content-Type: application/json", "-d", &body]);
        if answer.contains("\"choices\"") || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn status(chain: &Chain, market: &str) -> serde_json::Value {
    serde_json::from_str(&chain_ok(&["status", "--rpc", chain.rpc(), "--market", market, "--json"])).expect("status json")
}

fn u256(v: &serde_json::Value) -> U256 {
    let t = v.as_str().expect("a number as a string");
    t.parse::<U256>().unwrap_or_else(|_| panic!("{t:?}"))
}

#[test]
fn a_node_is_paid_on_chain_exactly_its_receipts_and_unbonds_after_the_delay() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let chain = Chain::start(d);
    let (owner, _) = chain.wallet(d, "owner");
    let (gw_path, gw_wallet) = chain.wallet(d, "gw");
    let (node_path, node_wallet) = chain.wallet(d, "node");
    let market = deploy(&chain, &owner, 4, &[&gw_wallet]);
    let on = |w: &Path| vec!["--rpc".to_string(), chain.rpc().to_string(), "--wallet".into(), s(w).to_string(), "--market".into(), market.clone()];
    let with = |w: &Path, args: &[&str]| [strs(&on(w)), args.to_vec()].concat().iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let run = |sub: &str, w: &Path, args: &[&str]| chain_ok(&[&[sub], strs(&with(w, args)).as_slice()].concat());
    run("deposit", &gw_path, &["10"]);
    run("stake", &node_path, &["1"]);

    let node_store = d.join("node-chain.sqlite");
    let chain_args = |w: &Path, store: &Path| {
        vec!["--wallet", s(w), "--chain-rpc", chain.rpc(), "--market", &market, "--chain-receipts", s(store)].iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let node_chain_args = chain_args(&node_path, &node_store);
    let node_args = [strs(&node_chain_args), vec!["--price", "1"]].concat();
    let node = NodeProc::start("0..30", None, &node_args);
    // Stakes come from the chain: --min-stake 1000 credits is 0.001 coin.
    let gw_store = d.join("gw-chain.sqlite");
    let gw_args = |settle_after: &str| {
        [strs(&chain_args(&gw_path, &gw_store)), vec!["--no-audits", "--min-stake", "1000", "--settle-every", "1000", "--settle-after", settle_after]]
            .concat()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    let mut gw = gateway(&node.addr, d, "gw", &strs(&gw_args("3600")));
    for prompt in ["The capital of France is", "One, two, three,", "Hello"] {
        let answer = complete(&gw, prompt);
        assert!(answer.contains("\"choices\""), "{answer}");
    }
    // The gateway dies before settling (it waits for 1,000 receipts or an hour).
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    // Each store holds one voucher for the (gateway, node) pair: the
    // running total of the three receipts.
    let wait_pending = |store: &Path, receipts: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let chain_market = chain.market(&node_wallet, market.parse().expect("address"));
            let pending = hotpot_chain::Outbox::open(store).expect("store").pending(chain_market.chain_id(), chain_market.address()).expect("pending");
            if pending.iter().map(|p| p.unsettled_receipts).sum::<u64>() >= receipts || Instant::now() > deadline {
                return pending;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let kept_by_node = wait_pending(&node_store, 3);
    assert_eq!(kept_by_node.len(), 1, "the node keeps the latest voucher of its one gateway");
    assert_eq!(kept_by_node[0].unsettled_receipts, 3, "the voucher covers the three receipts");
    let kept_by_gateway = wait_pending(&gw_store, 3);
    assert_eq!(kept_by_gateway.len(), 1, "the gateway keeps what it owes");
    assert_eq!(kept_by_gateway[0].voucher, kept_by_node[0].voucher, "both hold the same voucher");
    let owed = kept_by_node[0].voucher.total;
    assert!(owed > 0);
    assert_eq!(kept_by_node[0].unsettled_micros, owed);
    assert_eq!((kept_by_node[0].voucher.node, kept_by_node[0].voucher.gateway), (node_wallet.address(), gw_wallet.address()));

    // A voucher with an altered total: refused by the contract, and said so.
    let forged = d.join("forged.sqlite");
    std::fs::copy(&node_store, &forged).expect("copy");
    let _ = std::fs::copy(node_store.with_extension("sqlite-wal"), forged.with_extension("sqlite-wal"));
    {
        let conn = rusqlite::Connection::open(&forged).expect("opens");
        let changed = conn.execute("UPDATE pairs SET total = total * 1000", []).expect("updates");
        assert_eq!(changed, 1);
    }
    let err = chain_err(&[&["settle"], strs(&with(&node_path, &["--store", s(&forged)])).as_slice()].concat());
    assert!(err.contains("the market contract refused") && err.contains("altered or forged"), "{err}");
    assert_eq!(status(&chain, &market)["market"]["settlements"], 0, "the forged voucher paid nothing");
    let unsettled =
        serde_json::from_str::<serde_json::Value>(&chain_ok(&["status", "--rpc", chain.rpc(), "--market", &market, "--store", s(&gw_store), "--json"]))
            .expect("status json");
    assert_eq!(unsettled["unsettled"][0]["receipts"], 3, "status shows what the gateway still owes: {unsettled}");

    // Restarted, the gateway settles what it owed, once.
    let gw = gateway(&node.addr, d, "gw2", &strs(&gw_args("0")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&chain, &market)["market"]["settlements"] != 1 {
        assert!(Instant::now() < deadline, "the restarted gateway did not settle: {}", status(&chain, &market));
        std::thread::sleep(Duration::from_millis(300));
    }
    // The node's own settlement finds it settled and sends nothing.
    let out = chain_ok(&[&["settle"], strs(&with(&node_path, &["--store", s(&node_store)])).as_slice()].concat());
    assert!(out.contains("0 receipt(s) settled now") && out.contains("1 voucher(s) already settled"), "{out}");
    // A second restart sends nothing again either.
    drop(gw);
    let _gw = gateway(&node.addr, d, "gw3", &strs(&gw_args("0")));
    std::thread::sleep(Duration::from_secs(3));
    let view = status(&chain, &market);
    assert_eq!(view["market"]["settlements"], 1, "nothing settled twice: {view}");
    let m = chain.market(&node_wallet, market.parse().expect("address"));
    assert_eq!(chain.rt.block_on(m.paid_to(gw_wallet.address(), node_wallet.address())).expect("paid"), owed);

    // The node is paid exactly the sum of its receipts.
    let wei = U256::from(owed) * U256::from(1_000_000u64);
    assert_eq!(chain.rt.block_on(m.earnings_of(node_wallet.address())).expect("earnings"), wei);
    let before = chain.rt.block_on(m.balance(node_wallet.address())).expect("balance");
    let claim = chain.rt.block_on(m.claim()).expect("claims");
    assert_eq!(chain.rt.block_on(m.balance(node_wallet.address())).expect("balance"), before + wei - claim.fee_wei);
    assert_eq!(u256(&view["market"]["gateways"][0]["deposit_wei"]), hotpot_chain::parse_coin("10").expect("amount") - wei);

    // Unbonding: not before the delay, and after it.
    run("unstake", &node_path, &["0.5"]);
    let err = chain_err(&[&["withdraw"], strs(&on(&node_path)).as_slice()].concat());
    assert!(err.contains("not withdrawable before"), "{err}");
    std::thread::sleep(Duration::from_secs(5));
    run("withdraw", &node_path, &[]);
    assert_eq!(chain.rt.block_on(m.stake_of(node_wallet.address())).expect("stake"), hotpot_chain::parse_coin("0.5").expect("amount"));
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[cfg(feature = "redteam")]
#[test]
fn a_stake_is_slashed_on_chain_once_two_of_three_gateways_signed() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let chain = Chain::start(d);
    let (owner, _) = chain.wallet(d, "owner");
    let (g1_path, g1) = chain.wallet(d, "g1");
    let (g2_path, g2) = chain.wallet(d, "g2");
    let (g3_path, g3) = chain.wallet(d, "g3");
    let (cheater_path, cheater_wallet) = chain.wallet(d, "cheater");
    // The accuser (g1) is not registered at first.
    let market = deploy(&chain, &owner, 3600, &[&g2, &g3]);
    chain_ok(&["stake", "--rpc", chain.rpc(), "--wallet", s(&cheater_path), "--market", &market, "2"]);

    let node_chain = |w: &Path, name: &str| {
        vec!["--wallet", s(w), "--chain-rpc", chain.rpc(), "--market", &market, "--chain-receipts", s(&d.join(format!("{name}.sqlite")))]
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    let cheater_args = node_chain(&cheater_path, "cheater");
    let cheater = NodeProc::start("0..15", None, &[strs(&cheater_args), vec!["--redteam", "noise"]].concat());
    let _honest = NodeProc::start("15..30", Some(&cheater.addr), &[]);
    let gw_chain = |w: &Path| {
        vec!["--wallet", s(w), "--chain-rpc", chain.rpc(), "--market", &market, "--accusations-every", "2"].iter().map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let accuser = gateway(&cheater.addr, d, "g1", &strs(&gw_chain(&g1_path)));
    // The third registered gateway runs without audits: it never signs, so
    // the slash below is 2 of the 3.
    let _third = gateway(&cheater.addr, d, "g3", &[strs(&gw_chain(&g3_path)), vec!["--no-audits"]].concat());
    let m = chain.market(&g1, market.parse().expect("address"));
    let stake = || chain.rt.block_on(m.stake_of(cheater_wallet.address())).expect("stake");

    let answer = complete(&accuser, "Once upon a time, in a small village at the edge of a great forest, there lived");
    assert!(answer.contains("\"choices\""), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&accuser.url, "hotpot_cheats_total", "") < 1.0 {
        assert!(Instant::now() < deadline, "the accuser did not convict");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One auditor's signature is not a quorum: the stake stays.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stake(), hotpot_chain::parse_coin("2").expect("amount"), "slashed on one signature");

    // A registered gateway hears the accusation, audits the evidence
    // itself and co-signs; but the accuser is not registered, so its slash
    // is refused and the stake stays.
    let _second = gateway(&cheater.addr, d, "g2", &strs(&gw_chain(&g2_path)));
    let log = || std::fs::read_to_string(d.join("g1.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !log().contains("is not a registered gateway") {
        assert!(Instant::now() < deadline, "the unregistered accuser never tried to slash; its log:\n{}", log());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(stake(), hotpot_chain::parse_coin("2").expect("amount"), "slashed by an unregistered accuser");

    // Once the owner registers it, the accuser tries again and slashes with
    // 2 of the 3 registered gateways' signatures (its own and g2's).
    chain_ok(&["register", "--rpc", chain.rpc(), "--wallet", s(&owner), "--market", &market, &g1.address().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while stake() != U256::ZERO {
        assert!(
            Instant::now() < deadline,
            "not slashed after a second signature; accuser log:\n{}",
            std::fs::read_to_string(d.join("g1.log")).unwrap_or_default().lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let half = hotpot_chain::parse_coin("1").expect("amount");
    assert_eq!(chain.rt.block_on(m.earnings_of(g1.address())).expect("share"), half, "the accuser's share");
    assert_eq!(chain.rt.block_on(m.burned()).expect("burned"), half, "the rest is burned");
}
