//! The operations of the market on any [`Ledger`] backend: deposits,
//! holds while a request runs, settlement of what its sessions used,
//! stakes, unbonding, withdrawals and slashing.

use std::sync::Arc;
use std::time::Duration;

use crate::{Account, Credits, Kind, Ledger, LedgerError, Posted, Transaction};

/// The books, and the rules that move credits in them.
#[derive(Clone)]
pub struct Books {
    ledger: Arc<dyn Ledger>,
    /// How long unbonded stake stays slashable before it can be withdrawn.
    pub unbonding: Duration,
}

/// What one node is paid for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub node: String,
    pub amount: Credits,
}

/// What a session cost, settled once (by `receipt`) from the request's
/// hold — and from the key itself for anything beyond the hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub receipt: String,
    pub key: String,
    pub request: String,
    pub payments: Vec<Payment>,
    pub fee: Credits,
}

impl Settlement {
    pub fn total(&self) -> Option<Credits> {
        self.payments.iter().try_fold(self.fee, |sum, p| sum.checked_add(p.amount))
    }
}

fn credits(balance: i128) -> Credits {
    Credits::from_micros(u64::try_from(balance.max(0)).unwrap_or(u64::MAX))
}

impl Books {
    pub fn new(ledger: Arc<dyn Ledger>, unbonding: Duration) -> Self {
        Self { ledger, unbonding }
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// Posts `tx`; one that moves nothing and names no reference is not
    /// written at all.
    fn post(&self, tx: Transaction) -> Result<Posted, LedgerError> {
        if tx.entries.is_empty() && tx.reference.is_none() {
            return Ok(Posted::Nothing);
        }
        self.ledger.post(&tx)
    }

    /// What `account` holds (external: 0 when below).
    pub fn balance(&self, account: &Account) -> Result<Credits, LedgerError> {
        Ok(credits(self.ledger.balance(account)?))
    }

    /// Credits come into the books for `key` (a prepayment).
    pub fn deposit(&self, key: &str, amount: Credits, reference: Option<String>) -> Result<Posted, LedgerError> {
        self.post(Transaction::new(Kind::Deposit, reference).transfer(Account::External, Account::Key(key.into()), amount))
    }

    /// A request of `key` holds `amount` while it runs (refused whole when
    /// the key does not have it).
    pub fn hold(&self, key: &str, request: &str, amount: Credits) -> Result<Posted, LedgerError> {
        let held = Account::Held { key: key.into(), request: request.into() };
        self.post(Transaction::new(Kind::Hold, Some(format!("hold:{key}:{request}"))).transfer(Account::Key(key.into()), held, amount))
    }

    /// Pays a session's nodes and the gateway's fee, once per receipt:
    /// from the request's hold first, then from the key.
    pub fn settle(&self, s: &Settlement) -> Result<Posted, LedgerError> {
        let total = s.total().ok_or(LedgerError::Overflow)?;
        let held = Account::Held { key: s.key.clone(), request: s.request.clone() };
        let from_hold = credits(self.ledger.balance(&held)?).min(total);
        let from_key = total.saturating_sub(from_hold);
        let mut tx = Transaction::new(Kind::Settle, Some(s.receipt.clone()));
        let micros = |c: Credits| i128::from(c.micros());
        if !from_hold.is_zero() {
            tx.entries.push((held, -micros(from_hold)));
        }
        if !from_key.is_zero() {
            tx.entries.push((Account::Key(s.key.clone()), -micros(from_key)));
        }
        for p in s.payments.iter().filter(|p| !p.amount.is_zero()) {
            tx.entries.push((Account::Node(p.node.clone()), micros(p.amount)));
        }
        if !s.fee.is_zero() {
            tx.entries.push((Account::Fees, micros(s.fee)));
        }
        self.post(tx)
    }

    /// Gives back what is left of a request's hold to its key.
    pub fn release(&self, key: &str, request: &str) -> Result<Credits, LedgerError> {
        let held = Account::Held { key: key.into(), request: request.into() };
        let left = credits(self.ledger.balance(&held)?);
        self.post(Transaction::new(Kind::Release, None).transfer(held, Account::Key(key.into()), left))?;
        Ok(left)
    }

    /// Releases every hold (at start: the requests that held them died
    /// with the process). Returns how many.
    pub fn release_all_holds(&self) -> Result<usize, LedgerError> {
        let mut released = 0;
        for (account, _) in self.ledger.balances()? {
            if let Account::Held { key, request } = account {
                self.release(&key, &request)?;
                released += 1;
            }
        }
        Ok(released)
    }

    /// What the running requests of `key` hold.
    pub fn held_by(&self, key: &str) -> Result<Credits, LedgerError> {
        let held: i128 = self.ledger.balances()?.iter().filter(|(a, _)| matches!(a, Account::Held { key: k, .. } if k == key)).map(|(_, b)| *b).sum();
        Ok(credits(held))
    }

    /// Voids the settlement posted as `receipt` for `node` (a conviction
    /// proved the work false): what the node was paid goes back to the
    /// key that paid it, from the node's earnings and, where those no
    /// longer hold it, from its stake; once per receipt. Returns what went
    /// back.
    pub fn void(&self, receipt: &str, node: &str) -> Result<Credits, LedgerError> {
        let Some(entries) = self.ledger.entries(receipt)? else { return Ok(Credits::ZERO) };
        let paid = entries.iter().filter(|(a, _)| *a == Account::Node(node.into())).map(|(_, b)| *b).sum::<i128>();
        let payer = entries.iter().find_map(|(a, b)| match a {
            Account::Held { key, .. } | Account::Key(key) if *b < 0 => Some(key.clone()),
            _ => None,
        });
        let (Some(key), true) = (payer, paid > 0) else { return Ok(Credits::ZERO) };
        let paid = credits(paid);
        let from_earnings = self.balance(&Account::Node(node.into()))?.min(paid);
        let from_stake = self.balance(&Account::Stake(node.into()))?.min(paid.saturating_sub(from_earnings));
        let back = from_earnings.checked_add(from_stake).ok_or(LedgerError::Overflow)?;
        let tx = Transaction::new(Kind::Void, Some(format!("void:{receipt}")))
            .transfer(Account::Node(node.into()), Account::Key(key.clone()), from_earnings)
            .transfer(Account::Stake(node.into()), Account::Key(key), from_stake);
        match self.post(tx)? {
            Posted::Already(_) => Ok(Credits::ZERO),
            _ => Ok(back),
        }
    }

    /// Locks `amount` against `node`'s honesty: deposited by its operator
    /// (`from_earnings: false`) or taken from what it earned.
    pub fn stake(&self, node: &str, amount: Credits, from_earnings: bool) -> Result<Posted, LedgerError> {
        let from = if from_earnings { Account::Node(node.into()) } else { Account::External };
        self.post(Transaction::new(Kind::Stake, None).transfer(from, Account::Stake(node.into()), amount))
    }

    /// Starts taking `amount` of `node`'s stake out: it stays slashable
    /// for [`Books::unbonding`] and is withdrawable after.
    pub fn unbond(&self, node: &str, amount: Credits, now_ms: u64) -> Result<u64, LedgerError> {
        let ready_ms = now_ms.saturating_add(self.unbonding.as_millis() as u64);
        let to = Account::Unbonding { node: node.into(), ready_ms };
        self.post(Transaction::new(Kind::Unbond, None).transfer(Account::Stake(node.into()), to, amount))?;
        Ok(ready_ms)
    }

    /// Pays out the unbonded stake of `node` whose delay has passed.
    pub fn withdraw_unbonded(&self, node: &str, now_ms: u64) -> Result<Credits, LedgerError> {
        let mut tx = Transaction::new(Kind::Withdraw, None);
        let mut total = Credits::ZERO;
        for (account, balance) in self.ledger.balances()? {
            if let Account::Unbonding { node: n, ready_ms } = &account
                && n == node
                && *ready_ms <= now_ms
            {
                total = total.checked_add(credits(balance)).ok_or(LedgerError::Overflow)?;
                tx = tx.transfer(account.clone(), Account::External, credits(balance));
            }
        }
        self.post(tx)?;
        Ok(total)
    }

    /// Pays `amount` of `node`'s earnings out of the books.
    pub fn withdraw_earnings(&self, node: &str, amount: Credits) -> Result<Posted, LedgerError> {
        self.post(Transaction::new(Kind::Withdraw, None).transfer(Account::Node(node.into()), Account::External, amount))
    }

    /// What `node` has at stake (unbonding stake not counted).
    pub fn stake_of(&self, node: &str) -> Result<Credits, LedgerError> {
        self.balance(&Account::Stake(node.into()))
    }

    /// Slashes everything `node` has at stake (unbonding included), once
    /// per `conviction`: `accuser_ppm` parts per million to the gateway
    /// whose audit convicted it (its fees), the rest burned. Returns what
    /// was taken.
    pub fn slash(&self, node: &str, conviction: &str, accuser_ppm: u32) -> Result<Credits, LedgerError> {
        let mut taken: Vec<(Account, Credits)> = Vec::new();
        for (account, balance) in self.ledger.balances()? {
            let at_stake = match &account {
                Account::Stake(n) => n == node,
                Account::Unbonding { node: n, .. } => n == node,
                _ => false,
            };
            if at_stake {
                taken.push((account, credits(balance)));
            }
        }
        let total = taken.iter().try_fold(Credits::ZERO, |sum, (_, c)| sum.checked_add(*c)).ok_or(LedgerError::Overflow)?;
        let share = total.share_ppm(accuser_ppm);
        let burned = total.saturating_sub(share);
        let mut tx = Transaction::new(Kind::Slash, Some(format!("slash:{conviction}")));
        for (account, amount) in taken {
            tx.entries.push((account, -i128::from(amount.micros())));
        }
        if !share.is_zero() {
            tx.entries.push((Account::Fees, i128::from(share.micros())));
        }
        if !burned.is_zero() {
            tx.entries.push((Account::Burned, i128::from(burned.micros())));
        }
        match self.post(tx)? {
            Posted::New(_) | Posted::Nothing => Ok(total),
            Posted::Already(_) => Ok(Credits::ZERO),
        }
    }
}
