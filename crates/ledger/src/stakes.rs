//! The market operations both backends keep (DESIGN §13–14): a node's
//! stake with its unbonding delay, receipts paid once each by id, and
//! slashing with a share to the accuser and the rest burned.
//!
//! [`StakeBook`] is the one interface; the embedded books implement it
//! here ([`BooksStakes`]), the market contract on a chain in
//! `hotpot-chain`. [`conformance`] is the one set of behaviours both must
//! show; each backend's tests run it.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Account, Books, Credits, LedgerError, Payment, Posted, Settlement};

/// The part-1 market operations, over one backend. `Node` is how the
/// backend names a node (an account name in the books, a wallet on chain).
pub trait StakeBook {
    type Node: Clone + Send + Sync;
    type Error: std::fmt::Display + std::fmt::Debug;

    /// Locks `amount` against `node`'s honesty.
    fn stake(&self, node: &Self::Node, amount: Credits) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// What `node` has at stake (unbonding amounts not counted).
    fn stake_of(&self, node: &Self::Node) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// Starts taking `amount` out; it stays slashable for the delay.
    fn unbond(&self, node: &Self::Node, amount: Credits) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Pays out what finished unbonding; nothing (zero) before the delay.
    fn withdraw(&self, node: &Self::Node) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// Pays `node` `amount` for receipt `id`, once: true when paid now,
    /// false when that id was paid before.
    fn settle(&self, id: [u8; 32], node: &Self::Node, amount: Credits) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// What `node` was paid.
    fn earned(&self, node: &Self::Node) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// Slashes everything `node` has at stake (unbonding included) for
    /// `conviction`, once: what was taken (zero the second time).
    fn slash(&self, node: &Self::Node, conviction: [u8; 32]) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// The accuser's share of the slashes so far.
    fn accuser_earned(&self) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// Credits destroyed by slashing so far.
    fn burned(&self) -> impl Future<Output = Result<Credits, Self::Error>> + Send;
    /// The unbonding delay.
    fn unbonding(&self) -> Duration;
    /// The accuser's share of a slash, parts per million.
    fn accuser_ppm(&self) -> u32;
}

/// The embedded books as a [`StakeBook`]: receipts are paid from `payer`
/// (a key's account, prepaid), slashes share with the books' fees.
pub struct BooksStakes {
    pub books: Books,
    pub payer: String,
    pub accuser_ppm: u32,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl StakeBook for BooksStakes {
    type Node = String;
    type Error = LedgerError;

    async fn stake(&self, node: &String, amount: Credits) -> Result<(), LedgerError> {
        self.books.stake(node, amount, false).map(|_| ())
    }

    async fn stake_of(&self, node: &String) -> Result<Credits, LedgerError> {
        self.books.stake_of(node)
    }

    async fn unbond(&self, node: &String, amount: Credits) -> Result<(), LedgerError> {
        self.books.unbond(node, amount, now_ms()).map(|_| ())
    }

    async fn withdraw(&self, node: &String) -> Result<Credits, LedgerError> {
        self.books.withdraw_unbonded(node, now_ms())
    }

    async fn settle(&self, id: [u8; 32], node: &String, amount: Credits) -> Result<bool, LedgerError> {
        let settlement = Settlement {
            receipt: hex(&id),
            key: self.payer.clone(),
            request: hex(&id),
            payments: vec![Payment { node: node.clone(), amount }],
            fee: Credits::ZERO,
        };
        Ok(matches!(self.books.settle(&settlement)?, Posted::New(_)))
    }

    async fn earned(&self, node: &String) -> Result<Credits, LedgerError> {
        self.books.balance(&Account::Node(node.clone()))
    }

    async fn slash(&self, node: &String, conviction: [u8; 32]) -> Result<Credits, LedgerError> {
        self.books.slash(node, &hex(&conviction), self.accuser_ppm)
    }

    async fn accuser_earned(&self) -> Result<Credits, LedgerError> {
        self.books.balance(&Account::Fees)
    }

    async fn burned(&self) -> Result<Credits, LedgerError> {
        self.books.balance(&Account::Burned)
    }

    fn unbonding(&self) -> Duration {
        self.books.unbonding
    }

    fn accuser_ppm(&self) -> u32 {
        self.accuser_ppm
    }
}

/// The behaviours every [`StakeBook`] must show, on two fresh nodes `a`
/// and `b` with nothing staked or earned (and an accuser that has earned
/// nothing). Panics, naming the behaviour, on the first that fails.
pub mod conformance {
    use super::*;

    fn c(micros: u64) -> Credits {
        Credits::from_micros(micros)
    }

    /// Stakes, then unbonding: nothing before the delay, all after it.
    pub async fn stakes_unbond_after_the_delay<B: StakeBook>(book: &B, a: &B::Node) {
        book.stake(a, c(5_000_000)).await.expect("stakes");
        book.stake(a, c(1_000_000)).await.expect("stakes more");
        assert_eq!(book.stake_of(a).await.expect("stake"), c(6_000_000), "stakes add up");
        book.unbond(a, c(2_000_000)).await.expect("unbonds");
        assert_eq!(book.stake_of(a).await.expect("stake"), c(4_000_000), "unbonding leaves the stake");
        assert_eq!(book.withdraw(a).await.expect("withdraws"), Credits::ZERO, "nothing is withdrawable before the delay");
        tokio::time::sleep(book.unbonding() + Duration::from_millis(1500)).await;
        assert_eq!(book.withdraw(a).await.expect("withdraws"), c(2_000_000), "all of it after the delay");
        assert_eq!(book.withdraw(a).await.expect("withdraws"), Credits::ZERO, "and only once");
        assert_eq!(book.stake_of(a).await.expect("stake"), c(4_000_000));
    }

    /// Receipts pay their node exactly their amounts, each id once.
    pub async fn receipts_are_paid_once_by_id<B: StakeBook>(book: &B, a: &B::Node, b: &B::Node) {
        let amounts = [(1u8, 1_234u64), (2, 99_999), (3, 1)];
        for (id, amount) in amounts {
            assert!(book.settle([id; 32], a, c(amount)).await.expect("settles"), "receipt {id} is paid");
        }
        assert!(!book.settle([2; 32], a, c(99_999)).await.expect("settles"), "a receipt is paid once");
        assert!(!book.settle([2; 32], b, c(99_999)).await.expect("settles"), "even to another node");
        assert!(book.settle([4; 32], b, c(10)).await.expect("settles"));
        assert_eq!(book.earned(a).await.expect("earned"), c(amounts.iter().map(|(_, a)| a).sum()), "exactly the sum");
        assert_eq!(book.earned(b).await.expect("earned"), c(10));
    }

    /// A slash takes the whole stake, unbonding included, once: the
    /// accuser's share and the rest burned; other nodes keep theirs.
    pub async fn a_slash_takes_everything_at_stake_once<B: StakeBook>(book: &B, a: &B::Node, b: &B::Node) {
        book.stake(a, c(3_000_000)).await.expect("stakes");
        book.stake(b, c(1_000_000)).await.expect("stakes");
        book.unbond(a, c(1_000_000)).await.expect("unbonds");
        let (burned, earned) = (book.burned().await.expect("burned"), book.accuser_earned().await.expect("share"));
        assert_eq!(book.slash(a, [9; 32]).await.expect("slashes"), c(3_000_000), "stake and unbonding");
        assert_eq!(book.slash(a, [9; 32]).await.expect("slashes"), Credits::ZERO, "once per conviction");
        let share = c(3_000_000).share_ppm(book.accuser_ppm());
        assert_eq!(book.accuser_earned().await.expect("share"), earned.checked_add(share).expect("fits"), "the accuser's share");
        assert_eq!(book.burned().await.expect("burned"), burned.checked_add(c(3_000_000).saturating_sub(share)).expect("fits"), "the rest burned");
        assert_eq!(book.stake_of(a).await.expect("stake"), Credits::ZERO);
        tokio::time::sleep(book.unbonding() + Duration::from_millis(1500)).await;
        assert_eq!(book.withdraw(a).await.expect("withdraws"), Credits::ZERO, "the unbonding part went too");
        assert_eq!(book.stake_of(b).await.expect("stake"), c(1_000_000), "another node keeps its stake");
    }
}
