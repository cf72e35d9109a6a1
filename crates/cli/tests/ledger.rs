//! `hotpot ledger`: the books a gateway keeps, driven as an operator would.

mod common;

use std::time::Duration;

use common::*;

fn ledger(store: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["ledger", "--store", store.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    hotpot(&all, Duration::from_secs(30))
}

#[test]
fn an_operator_keeps_the_books() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = dir.path().join("ledger.sqlite");
    // No books yet: an error that says how to create them, never empty books.
    let out = ledger(&store, &[]);
    assert!(!out.status.success() && text(&out.stderr).contains("--init-store"), "{}", text(&out.stderr));
    let out = ledger(&store, &["deposit", "alice", "12.5", "--init-store"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("12.5"), "{}", text(&out.stdout));
    for args in [&["stake", "node-a", "3"][..], &["unbond", "node-a", "1", "--unbonding-secs", "0"], &["withdraw", "node-a"]] {
        let out = ledger(&store, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    // Amounts are exact decimals, never floats; bad ones are refused.
    let out = ledger(&store, &["deposit", "alice", "0.1234567"]);
    assert!(!out.status.success() && text(&out.stderr).contains("at most 6 decimals"), "{}", text(&out.stderr));
    let out = ledger(&store, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("json");
    let balance =
        |name: &str| json["accounts"].as_array().expect("accounts").iter().find(|a| a["account"] == name).map(|a| a["micro_credits"].as_i64().expect("micros"));
    assert_eq!(balance("key:alice"), Some(12_500_000));
    assert_eq!(balance("stake:node-a"), Some(2_000_000));
    // Everything in the books came from outside them: external is minus the rest.
    assert_eq!(balance("external"), Some(-14_500_000));
    let out = ledger(&store, &["check"]);
    assert!(out.status.success() && text(&out.stdout).contains("the books balance"), "{}", text(&out.stderr));
    // Not enough stake to unbond: refused whole, with the numbers.
    let out = ledger(&store, &["unbond", "node-a", "5"]);
    assert!(!out.status.success() && text(&out.stderr).contains("stake:node-a holds 2 credits, 5 are needed"), "{}", text(&out.stderr));
}
