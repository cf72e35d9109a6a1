//! Conservation: whatever sequence of operations the market makes, every
//! transaction balances, no account but external goes below zero, credits
//! are neither made nor lost, and a receipt or conviction counts once.

use std::sync::Arc;
use std::time::Duration;

use hotpot_ledger::{Account, Books, Credits, Ledger, LedgerError, Payment, Posted, Settlement, SqliteLedger};
use proptest::prelude::*;

const KEYS: [&str; 2] = ["alice", "bob"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

#[derive(Debug, Clone)]
enum Op {
    Deposit { key: usize, micros: u64 },
    Hold { key: usize, request: u8, micros: u64 },
    Settle { key: usize, request: u8, receipt: u8, paid: [u64; 3], fee: u64 },
    Release { key: usize, request: u8 },
    Stake { node: usize, micros: u64, from_earnings: bool },
    Unbond { node: usize, micros: u64 },
    Withdraw { node: usize, advance_ms: u64 },
    WithdrawEarnings { node: usize, micros: u64 },
    Slash { node: usize, conviction: u8, ppm: u32 },
    Void { receipt: u8, node: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let amount = 0u64..5_000;
    prop_oneof![
        (0..2usize, amount.clone()).prop_map(|(key, micros)| Op::Deposit { key, micros }),
        (0..2usize, 0..4u8, amount.clone()).prop_map(|(key, request, micros)| Op::Hold { key, request, micros }),
        (0..2usize, 0..4u8, 0..6u8, any::<[u16; 3]>(), 0..200u64).prop_map(|(key, request, receipt, paid, fee)| Op::Settle {
            key,
            request,
            receipt,
            paid: paid.map(|p| u64::from(p) % 1500),
            fee
        }),
        (0..2usize, 0..4u8).prop_map(|(key, request)| Op::Release { key, request }),
        (0..3usize, amount.clone(), any::<bool>()).prop_map(|(node, micros, from_earnings)| Op::Stake { node, micros, from_earnings }),
        (0..3usize, amount.clone()).prop_map(|(node, micros)| Op::Unbond { node, micros }),
        (0..3usize, 0..2_000u64).prop_map(|(node, advance_ms)| Op::Withdraw { node, advance_ms }),
        (0..3usize, amount).prop_map(|(node, micros)| Op::WithdrawEarnings { node, micros }),
        (0..3usize, 0..3u8, 0..=1_000_000u32).prop_map(|(node, conviction, ppm)| Op::Slash { node, conviction, ppm }),
        (0..6u8, 0..3usize).prop_map(|(receipt, node)| Op::Void { receipt, node }),
    ]
}

fn total(ledger: &SqliteLedger) -> i128 {
    ledger.balances().expect("balances").iter().map(|(_, b)| *b).sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_sequence_of_operations_conserves_credits(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = Arc::new(SqliteLedger::open(&dir.path().join("ledger.sqlite"), true).expect("creates"));
        let books = Books::new(Arc::clone(&ledger) as Arc<dyn Ledger>, Duration::from_millis(1000));
        let mut now = 1_000_000u64;
        let mut settled: std::collections::HashMap<u8, ()> = std::collections::HashMap::new();
        for op in ops {
            let before = ledger.balances().expect("balances");
            let result: Result<(), LedgerError> = match &op {
                Op::Deposit { key, micros } => books.deposit(KEYS[*key], Credits::from_micros(*micros), None).map(drop),
                Op::Hold { key, request, micros } => books.hold(KEYS[*key], &format!("r{request}"), Credits::from_micros(*micros)).map(drop),
                Op::Settle { key, request, receipt, paid, fee } => {
                    let payments = NODES.iter().zip(paid).map(|(n, p)| Payment { node: n.to_string(), amount: Credits::from_micros(*p) }).collect();
                    let s = Settlement { receipt: format!("receipt-{receipt}"), key: KEYS[*key].into(), request: format!("r{request}"), payments, fee: Credits::from_micros(*fee) };
                    let posted = books.settle(&s);
                    if let Ok(p) = &posted {
                        // A receipt settles once: the second time moves nothing.
                        prop_assert_eq!(matches!(p, Posted::Already(_)), settled.contains_key(receipt), "receipt {} posted as {:?}", receipt, p);
                        settled.insert(*receipt, ());
                        if matches!(p, Posted::Already(_)) {
                            prop_assert_eq!(ledger.balances().expect("balances"), before.clone());
                        }
                    }
                    posted.map(drop)
                }
                Op::Release { key, request } => books.release(KEYS[*key], &format!("r{request}")).map(drop),
                Op::Stake { node, micros, from_earnings } => books.stake(NODES[*node], Credits::from_micros(*micros), *from_earnings).map(drop),
                Op::Unbond { node, micros } => books.unbond(NODES[*node], Credits::from_micros(*micros), now).map(drop),
                Op::Withdraw { node, advance_ms } => {
                    now += advance_ms;
                    books.withdraw_unbonded(NODES[*node], now).map(drop)
                }
                Op::WithdrawEarnings { node, micros } => books.withdraw_earnings(NODES[*node], Credits::from_micros(*micros)).map(drop),
                Op::Slash { node, conviction, ppm } => {
                    let staked: i128 = before.iter().filter(|(a, _)| matches!(a, Account::Stake(n) | Account::Unbonding { node: n, .. } if n == NODES[*node])).map(|(_, b)| *b).sum();
                    let slashed = books.slash(NODES[*node], &format!("c{conviction}"), *ppm);
                    if let Ok(taken) = &slashed && taken.micros() > 0 {
                        prop_assert_eq!(i128::from(taken.micros()), staked, "a slash takes the whole stake, unbonding included");
                        prop_assert_eq!(books.stake_of(NODES[*node]).expect("stake"), Credits::ZERO);
                    }
                    slashed.map(drop)
                }
                Op::Void { receipt, node } => {
                    // What goes back never exceeds what the receipt paid the node.
                    let reference = format!("receipt-{receipt}");
                    let paid: i128 = ledger.entries(&reference).expect("entries").unwrap_or_default().iter()
                        .filter(|(a, _)| *a == Account::Node(NODES[*node].into())).map(|(_, b)| *b).sum();
                    let back = books.void(&reference, NODES[*node]);
                    if let Ok(back) = &back {
                        prop_assert!(i128::from(back.micros()) <= paid.max(0), "voided {} of a receipt that paid {}", back, paid);
                        prop_assert_eq!(books.void(&reference, NODES[*node]).expect("again"), Credits::ZERO, "a receipt is voided once");
                    }
                    back.map(drop)
                }
            };
            match result {
                Ok(()) => {}
                // Refused whole: nothing moved.
                Err(LedgerError::Insufficient { .. }) => prop_assert_eq!(ledger.balances().expect("balances"), before),
                Err(e) => prop_assert!(false, "{op:?} failed: {e}"),
            }
            // Every transaction balances, balances are the sums of their
            // entries, nobody but external is below zero, nothing is made.
            ledger.verify().map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
            prop_assert_eq!(total(&ledger), 0);
            for (account, balance) in ledger.balances().expect("balances") {
                prop_assert!(balance >= 0 || account == Account::External, "{} at {}", account, balance);
            }
        }
        // Holds released at a restart go back to their keys, all of them.
        books.release_all_holds().expect("releases");
        let holds_left = ledger.balances().expect("balances").iter().any(|(a, _)| matches!(a, Account::Held { .. }));
        prop_assert!(!holds_left, "a hold survived release_all_holds");
        ledger.verify().expect("still whole");
    }
}

/// A withdrawal before the unbonding delay pays nothing; after it, all.
#[test]
fn unbonded_stake_waits_out_its_delay_and_stays_slashable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(&dir.path().join("l.sqlite"), true).expect("creates"));
    let books = Books::new(ledger, Duration::from_secs(60));
    let c = |n: u64| Credits::from_credits(n).expect("fits");
    books.stake("n1", c(10), false).expect("stakes");
    let ready = books.unbond("n1", c(4), 1_000).expect("unbonds");
    assert_eq!(ready, 61_000);
    assert_eq!(books.withdraw_unbonded("n1", 60_999).expect("too early"), Credits::ZERO);
    assert_eq!(books.stake_of("n1").expect("stake"), c(6));
    // Caught while unbonding: the unbonding part is slashed too.
    assert_eq!(books.slash("n1", "conviction-1", 100_000).expect("slashes"), c(10));
    assert_eq!(books.slash("n1", "conviction-1", 100_000).expect("once"), Credits::ZERO);
    assert_eq!(books.balance(&Account::Fees).expect("fees"), c(1));
    assert_eq!(books.balance(&Account::Burned).expect("burned"), c(9));
    assert_eq!(books.withdraw_unbonded("n1", 61_000).expect("nothing left"), Credits::ZERO);
}

/// The store fails closed and survives being reopened.
#[test]
fn the_store_fails_closed_and_persists() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("l.sqlite");
    assert!(matches!(SqliteLedger::open(&path, false), Err(LedgerError::Missing { .. })));
    {
        let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(&path, true).expect("creates"));
        Books::new(ledger, Duration::ZERO).deposit("alice", Credits::from_micros(7), Some("d1".into())).expect("deposits");
    }
    let ledger = SqliteLedger::open(&path, false).expect("reopens");
    assert_eq!(ledger.balance(&Account::Key("alice".into())).expect("balance"), 7);
    assert!(ledger.posted("d1").expect("query"));
    drop(ledger);
    // Tampered: a balance that is not the sum of the entries is caught.
    rusqlite_tamper(&path);
    assert!(matches!(SqliteLedger::open(&path, false), Err(LedgerError::Corrupt(_))));
    std::fs::write(&path, b"").expect("empties");
    assert!(matches!(SqliteLedger::open(&path, true), Err(LedgerError::Corrupt(_))));
}

fn rusqlite_tamper(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).expect("opens");
    conn.execute("UPDATE balances SET balance = balance + 5 WHERE account = 'key:alice'", []).expect("tampers");
}

/// The books keep the market operations both backends share
/// (`hotpot_ledger::conformance`; the chain backend runs the same).
#[tokio::test]
async fn the_books_keep_the_shared_market_operations() {
    use hotpot_ledger::{BooksStakes, conformance};
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(&dir.path().join("l.sqlite"), true).expect("creates"));
    let books = Books::new(ledger, Duration::from_secs(2));
    books.deposit("gateway", Credits::from_credits(100).expect("fits"), None).expect("deposits");
    let book = BooksStakes { books, payer: "gateway".into(), accuser_ppm: 500_000 };
    conformance::stakes_unbond_after_the_delay(&book, &"n1".to_string()).await;
    conformance::receipts_are_paid_once_by_id(&book, &"n2".to_string(), &"n3".to_string()).await;
    conformance::a_slash_takes_everything_at_stake_once(&book, &"n4".to_string(), &"n5".to_string()).await;
}
