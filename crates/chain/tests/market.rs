//! The market contract on a real `anvil` process (the npm package the
//! suite installs under `contracts/node_modules`), driven through
//! `hotpot-chain` as gateways, nodes and auditors use it.

use std::path::PathBuf;
use std::time::Duration;

use hotpot_chain::{B256, ChainError, Config, Kept, LocalChain, Market, Outbox, U256, Voucher, Wallet, find_anvil};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn chain(dir: &tempfile::TempDir) -> LocalChain {
    let anvil = find_anvil(&repo().join("contracts"), false).expect("anvil (bash scripts/test.sh installs it: npm ci --prefix contracts)");
    LocalChain::start(&anvil, 0, &dir.path().join("anvil.log")).await.expect("anvil starts")
}

fn wallet(seed: u8) -> Wallet {
    Wallet::from_hex(&format!("{seed:02x}").repeat(32)).unwrap()
}

const ETH: u128 = 1_000_000_000_000_000_000;

fn eth(n: u128) -> U256 {
    U256::from(n * ETH)
}

/// The owner deploys (unbonding `delay_s`, quorum 2, half to the accuser,
/// 10^6 wei per micro-credit) and registers `gateways`; everyone is funded.
async fn setup(chain: &LocalChain, delay_s: u64, gateways: &[&Wallet], others: &[&Wallet]) -> Market {
    let owner = wallet(0x01);
    for w in std::iter::once(&owner).chain(gateways.iter().copied()).chain(others.iter().copied()) {
        chain.fund(w.address(), eth(1000)).await.unwrap();
    }
    let config = Config { unbonding_delay_s: delay_s, quorum: 2, accuser_share_ppm: 500_000, wei_per_micro_credit: U256::from(1_000_000u64) };
    let (market, sent) = Market::deploy(chain.rpc(), &owner, &config).await.unwrap();
    assert!(sent.gas_used > 0);
    assert_eq!(market.config().await.unwrap(), config);
    for g in gateways {
        market.set_gateway(g.address(), true).await.unwrap();
    }
    market
}

async fn as_(chain: &LocalChain, market: &Market, w: &Wallet) -> Market {
    Market::connect(chain.rpc(), w, market.address()).await.unwrap()
}

fn id(n: u8) -> B256 {
    B256::repeat_byte(n)
}

fn reverted(e: ChainError, needle: &str) {
    match e {
        ChainError::Reverted(m) => assert!(m.contains(needle), "{m:?} does not say {needle:?}"),
        other => panic!("expected a revert saying {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_node_stakes_is_paid_its_receipts_exactly_and_unbonds_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let (gw, node) = (wallet(0x10), wallet(0x20));
    let market = setup(&chain, 3, &[&gw], &[&node]).await;
    let g = as_(&chain, &market, &gw).await;
    let n = as_(&chain, &market, &node).await;

    g.deposit(eth(10)).await.unwrap();
    n.stake(eth(5)).await.unwrap();
    assert_eq!(n.stake_of(node.address()).await.unwrap(), eth(5));
    assert_eq!(n.deposit_of(gw.address()).await.unwrap(), eth(10));

    // Three receipts raise the gateway's running total for the node; each
    // new total is a voucher. The node settles the first itself (the
    // contract checks the gateway's signature), the gateway the last (its
    // own transaction, no signature read): the node is paid exactly the
    // receipts' sum, and every voucher up to the last is settled.
    let amounts = [1_234u64, 99_999, 1];
    let mut total = 0;
    let vouchers: Vec<Voucher> = amounts
        .iter()
        .map(|a| {
            total += a;
            g.sign_voucher(&gw, node.address(), total).unwrap()
        })
        .collect();
    assert_eq!(n.voucher_signer(&vouchers[0]).unwrap(), gw.address());
    n.settle(&vouchers[..1]).await.unwrap();
    assert_eq!(n.paid_to(gw.address(), node.address()).await.unwrap(), 1_234);
    assert!(!n.settled(vouchers[1].id()).await.unwrap());
    g.settle(&vouchers[2..]).await.unwrap();
    let sum = U256::from(amounts.iter().sum::<u64>()) * U256::from(1_000_000u64);
    assert_eq!(n.earnings_of(node.address()).await.unwrap(), sum);
    assert_eq!(n.deposit_of(gw.address()).await.unwrap(), eth(10) - sum);
    for v in &vouchers {
        assert!(n.settled(v.id()).await.unwrap());
    }
    assert_eq!(n.gateways_paying(node.address()).await.unwrap(), vec![gw.address()]);
    // Claiming moves exactly the sum to the node's wallet (less its gas).
    let before = n.balance(node.address()).await.unwrap();
    let claim = n.claim().await.unwrap();
    let after = n.balance(node.address()).await.unwrap();
    assert_eq!(after, before + sum - claim.fee_wei);
    assert_eq!(n.earnings_of(node.address()).await.unwrap(), U256::ZERO);
    reverted(n.claim().await.unwrap_err(), "nothing to do");

    // Unbonding: not before the delay, and after it.
    n.request_unstake(eth(2)).await.unwrap();
    assert_eq!(n.stake_of(node.address()).await.unwrap(), eth(3));
    reverted(n.withdraw().await.unwrap_err(), "not withdrawable before");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = n.balance(node.address()).await.unwrap();
    let withdrawal = n.withdraw().await.unwrap();
    assert_eq!(n.balance(node.address()).await.unwrap(), before + eth(2) - withdrawal.fee_wei);
    reverted(n.withdraw().await.unwrap_err(), "nothing to do");
}

#[tokio::test]
async fn double_unregistered_and_altered_receipts_revert_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let (gw, rogue, node) = (wallet(0x10), wallet(0x11), wallet(0x20));
    let market = setup(&chain, 3, &[&gw], &[&rogue, &node]).await;
    let g = as_(&chain, &market, &gw).await;
    let r = as_(&chain, &market, &rogue).await;
    let n = as_(&chain, &market, &node).await;
    g.deposit(eth(1)).await.unwrap();
    r.deposit(eth(1)).await.unwrap();

    let good = g.sign_voucher(&gw, node.address(), 500).unwrap();
    n.settle(std::slice::from_ref(&good)).await.unwrap();
    // Settled twice: once alone, once inside a batch with a fresh one
    // (the whole batch reverts, the fresh one stays unsettled); and an
    // older voucher (a lower total) of the same pair.
    reverted(n.settle(std::slice::from_ref(&good)).await.unwrap_err(), "already settled");
    let fresh = g.sign_voucher(&gw, node.address(), 507).unwrap();
    reverted(n.settle(&[fresh.clone(), good.clone()]).await.unwrap_err(), "already settled");
    assert!(!n.settled(fresh.id()).await.unwrap());
    let older = g.sign_voucher(&gw, node.address(), 300).unwrap();
    reverted(n.settle(&[older]).await.unwrap_err(), "already settled");

    // Signed by a wallet that is not a registered gateway, sent by the node
    // or by that wallet itself; and a voucher naming its sender as gateway.
    let unregistered = r.sign_voucher(&rogue, node.address(), 500).unwrap();
    reverted(n.settle(std::slice::from_ref(&unregistered)).await.unwrap_err(), "is not a registered gateway");
    reverted(r.settle(&[unregistered]).await.unwrap_err(), "is not a registered gateway");
    let mut self_made = g.sign_voucher(&gw, node.address(), 900).unwrap();
    self_made.gateway = node.address();
    reverted(n.settle(&[self_made]).await.unwrap_err(), "is not a registered gateway");

    // An altered amount: the signature no longer recovers to the gateway.
    let mut altered = g.sign_voucher(&gw, node.address(), 600).unwrap();
    altered.total = 500_000;
    reverted(n.settle(&[altered]).await.unwrap_err(), "altered or forged");
    // An altered payee, the same.
    let mut redirected = g.sign_voucher(&gw, node.address(), 600).unwrap();
    redirected.node = rogue.address();
    reverted(n.settle(&[redirected]).await.unwrap_err(), "altered or forged");
    // More than the deposit holds.
    let huge = g.sign_voucher(&gw, node.address(), u64::MAX).unwrap();
    reverted(n.settle(&[huge]).await.unwrap_err(), "wei of deposit");

    // Only the first voucher was ever paid.
    assert_eq!(n.earnings_of(node.address()).await.unwrap(), U256::from(500u64 * 1_000_000));
    n.settle(&[fresh]).await.unwrap();
    assert_eq!(n.earnings_of(node.address()).await.unwrap(), U256::from(507u64 * 1_000_000));
}

/// The outbox counts each receipt once into its pair's running total,
/// keeps the latest voucher, and a settling round neither loses nor sends
/// twice: a voucher someone else settled meanwhile is only marked.
#[tokio::test]
async fn the_outbox_counts_receipts_once_and_settles_each_total_once() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let (gw, a, b) = (wallet(0x10), wallet(0x20), wallet(0x21));
    let market = setup(&chain, 3, &[&gw], &[&a, &b]).await;
    let g = as_(&chain, &market, &gw).await;
    let na = as_(&chain, &market, &a).await;
    g.deposit(eth(1)).await.unwrap();
    let (cid, addr) = (g.chain_id(), g.address());
    let gateway_box = Outbox::open(&dir.path().join("gateway.sqlite")).unwrap();
    let node_box = Outbox::open(&dir.path().join("node.sqlite")).unwrap();

    let v1 = gateway_box.issue(&g, &gw, id(1), a.address(), 100, 0).unwrap();
    let v2 = gateway_box.issue(&g, &gw, id(2), a.address(), 20, 0).unwrap();
    let again = gateway_box.issue(&g, &gw, id(2), a.address(), 20, 0).unwrap();
    assert_eq!((v1.total, v2.total, again.total), (100, 120, 120), "a receipt id is counted once");
    gateway_box.issue(&g, &gw, id(3), b.address(), 7, 0).unwrap();
    // The node keeps the vouchers in whatever order they arrive.
    assert_eq!(node_box.keep(cid, addr, &v2, id(2), 20).unwrap(), Kept { new: true, short: 0 });
    assert_eq!(node_box.keep(cid, addr, &v1, id(1), 100).unwrap(), Kept { new: true, short: 0 });
    assert!(!node_box.keep(cid, addr, &v1, id(1), 100).unwrap().new);
    let pending = node_box.pending(cid, addr).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].voucher, v2, "the node keeps the highest total");
    // A gateway whose new voucher does not cover a receipt it handed over.
    let stale = g.sign_voucher(&gw, a.address(), 120).unwrap();
    assert_eq!(node_box.keep(cid, addr, &stale, id(4), 5).unwrap().short, 5);

    // The node settles its voucher itself; the gateway's round then only
    // marks that pair and sends b's.
    let done = node_box.settle(&na, 10, node_box.pending(cid, addr).unwrap()).await.unwrap();
    assert_eq!((done.sent.len(), done.already), (1, 0));
    let pending = gateway_box.pending(cid, addr).unwrap();
    assert_eq!(pending.iter().map(|p| p.unsettled_receipts).sum::<u64>(), 3);
    let done = gateway_box.settle(&g, 10, pending).await.unwrap();
    assert_eq!((done.sent.len(), done.already, done.receipts, done.micros), (1, 1, 1, 7));
    assert!(gateway_box.pending(cid, addr).unwrap().is_empty());
    assert_eq!(na.paid_to(gw.address(), a.address()).await.unwrap(), 120);
    assert_eq!(na.paid_to(gw.address(), b.address()).await.unwrap(), 7);

    // A new receipt after the settlement continues from the total.
    let v5 = gateway_box.issue(&g, &gw, id(5), a.address(), 30, 0).unwrap();
    assert_eq!(v5.total, 150);
    // A gateway that lost its store starts a pair from what the chain paid.
    let fresh_box = Outbox::in_memory().unwrap();
    let paid = g.paid_to(gw.address(), a.address()).await.unwrap();
    assert_eq!(fresh_box.issue(&g, &gw, id(6), a.address(), 1, paid).unwrap().total, 121);
}

#[tokio::test]
async fn a_slash_needs_a_quorum_of_registered_auditors() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let (a1, a2, a3, outsider, node) = (wallet(0x10), wallet(0x11), wallet(0x12), wallet(0x13), wallet(0x20));
    let market = setup(&chain, 3, &[&a1, &a2, &a3], &[&outsider, &node]).await;
    let m1 = as_(&chain, &market, &a1).await;
    let mo = as_(&chain, &market, &outsider).await;
    let n = as_(&chain, &market, &node).await;
    n.stake(eth(4)).await.unwrap();
    n.request_unstake(eth(1)).await.unwrap(); // still slashable

    let (model, evidence) = (B256::repeat_byte(0xaa), B256::repeat_byte(0xee));
    let s1 = m1.sign_conviction(&a1, node.address(), model, evidence).unwrap();
    let s2 = m1.sign_conviction(&a2, node.address(), model, evidence).unwrap();
    let s_out = m1.sign_conviction(&outsider, node.address(), model, evidence).unwrap();
    m1.domain_matches(&s2).unwrap();

    // One auditor alone (even twice) is not enough.
    reverted(m1.slash(std::slice::from_ref(&s1)).await.unwrap_err(), "the quorum is 2");
    reverted(m1.slash(&[s1.clone(), s1.clone()]).await.unwrap_err(), "the quorum is 2");
    // A signature from outside the registered auditors does not count.
    reverted(m1.slash(&[s1.clone(), s_out.clone()]).await.unwrap_err(), "is not a registered gateway");
    // An accuser that is not registered cannot slash, even with a quorum.
    reverted(mo.slash(&[s1.clone(), s2.clone()]).await.unwrap_err(), "is not a registered gateway");
    assert_eq!(n.stake_of(node.address()).await.unwrap(), eth(3));

    // Two registered auditors: the whole stake (unstaking included) goes,
    // half to the accuser, half burned; once only.
    m1.slash(&[s2.clone(), s1.clone()]).await.unwrap();
    assert_eq!(n.stake_of(node.address()).await.unwrap(), U256::ZERO);
    assert_eq!(n.unstaking(node.address()).await.unwrap().0, U256::ZERO);
    assert_eq!(n.earnings_of(a1.address()).await.unwrap(), eth(2));
    assert_eq!(n.burned().await.unwrap(), eth(2));
    reverted(m1.slash(&[s1, s2]).await.unwrap_err(), "already slashed");
    let view = n.view().await.unwrap();
    assert_eq!(view.gateways.iter().filter(|g| g.registered).count(), 3);
    assert_eq!(view.nodes.len(), 1);
}

#[tokio::test]
async fn a_wrong_rpc_or_address_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let w = wallet(0x10);
    let e = Market::connect(chain.rpc(), &w, hotpot_chain::Address::repeat_byte(7)).await.unwrap_err().to_string();
    assert!(e.contains("no contract at"), "{e}");
    let e = Market::connect("http://127.0.0.1:9", &w, hotpot_chain::Address::repeat_byte(7)).await.unwrap_err().to_string();
    assert!(e.contains("chain RPC"), "{e}");
}

/// The contract keeps the market operations the embedded books keep: the
/// same conformance tests (`hotpot_ledger::conformance`) pass on both.
#[tokio::test]
async fn the_chain_keeps_the_shared_market_operations() {
    use hotpot_chain::ChainStakes;
    use hotpot_ledger::conformance;
    let dir = tempfile::tempdir().unwrap();
    let chain = chain(&dir).await;
    let (gw, auditor) = (wallet(0x10), wallet(0x11));
    let nodes: Vec<Wallet> = (0x20..0x25).map(wallet).collect();
    let market = setup(&chain, 2, &[&gw, &auditor], &nodes.iter().collect::<Vec<_>>()).await;
    as_(&chain, &market, &gw).await.deposit(eth(100)).await.unwrap();
    let book = ChainStakes::new(chain.rpc(), market.address(), gw.clone(), vec![gw.clone(), auditor.clone()]).await.unwrap();
    conformance::stakes_unbond_after_the_delay(&book, &nodes[0]).await;
    conformance::receipts_are_paid_once_by_id(&book, &nodes[1], &nodes[2]).await;
    conformance::a_slash_takes_everything_at_stake_once(&book, &nodes[3], &nodes[4]).await;
}
