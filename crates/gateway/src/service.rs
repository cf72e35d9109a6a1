//! The gateway's core: turns a planned request into sessions over the
//! swarm — reserve the key's budget, open every choice's route, drive each
//! session — and hands every session's record to its sinks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_core::ModelId;
use hotpot_core::placement::{Served, gaps};
use hotpot_engine::ClientParts;
use hotpot_net::Network;
use tokio::sync::mpsc;

use crate::audit::{AuditConfig, Auditor};
use crate::chain::{ChainConfig, ChainContext, ChainEvent, Observer, RemoteChain};
use crate::directory::SharedDirectory;
use crate::error::ApiError;
use crate::keys::{Caller, CreditReservation, KeyStore, Reservation};
use crate::market::{CreditHold, Market};
use crate::metrics::{KeyLabels, Metrics};
use crate::session::{ChoiceJob, EventSink, Finish, RecordSink, SessionContext, SessionEvent, SessionRecord, drive};
use crate::speculate::Speculation;

/// How the gateway runs.
pub struct GatewayConfig {
    /// The name clients use for the model (its alias).
    pub model_name: String,
    /// Audits of node work (`None`: no audits).
    pub audit: Option<AuditConfig>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    pub chain: ChainConfig,
    pub keys: Option<Arc<KeyStore>>,
    /// Most choices per request (`n`).
    pub max_choices: u32,
    /// Most sessions (prompts × choices) one request runs at a time; the
    /// rest start as those finish.
    pub parallel_sessions: usize,
    /// Most sessions (prompts × choices) one request may ask for.
    pub max_sessions_per_request: usize,
    /// Whether `/metrics` lists each key's name and spending.
    pub metrics_per_key: bool,
    /// Limits on HTTP clients.
    pub http: crate::http::HttpLimits,
    /// Where every session's record goes besides billing, audits and
    /// metrics (the `--session-log` JSONL file).
    pub record_sinks: Vec<Arc<dyn RecordSink>>,
    /// Speculative decoding for every session (`--draft`).
    pub speculation: Option<Speculation>,
    /// The books prepaid keys pay from and nodes are paid into, the
    /// receipts, the fee and the stakes (`--ledger`).
    pub market: Option<Arc<Market>>,
    /// The market on a chain: node receipts settled there, stakes read
    /// from there, convictions co-signed and slashed there.
    pub onchain: Option<Arc<crate::onchain::OnChain>>,
    /// Uploaded files (`/v1/files`; `None`: no file routes).
    pub files: Option<Arc<crate::files::FileStore>>,
    /// Batches (`/v1/batches`; needs `files`).
    pub batches: Option<Arc<crate::batch::BatchStore>>,
}

impl GatewayConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            audit: None,
            max_body_bytes: 4 << 20,
            chain: ChainConfig::default(),
            keys: None,
            max_choices: 8,
            parallel_sessions: 4,
            max_sessions_per_request: 256,
            metrics_per_key: false,
            http: crate::http::HttpLimits::default(),
            record_sinks: Vec::new(),
            speculation: None,
            market: None,
            onchain: None,
            files: None,
            batches: None,
        }
    }
}

/// How long a later session of an admitted request waits for capacity.
const ADMITTED_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The model the gateway serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    pub id: ModelId,
    pub n_blocks: u32,
    pub dim: usize,
    pub context: usize,
}

pub struct Gateway {
    pub(crate) model: ServedModel,
    pub(crate) client: Arc<ClientParts>,
    network: Network,
    directory: SharedDirectory,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: GatewayConfig,
    pub(crate) fingerprint: String,
    auditor: Option<Arc<Auditor>>,
    pub(crate) prep: crate::prep::Prep,
    /// The model's vocabulary for constrained decoding, built on first use.
    grammars: std::sync::OnceLock<Result<crate::constrain::Grammars, String>>,
    /// Interactive requests waiting for their first token (batch sessions
    /// hold their steps meanwhile).
    interactive: Arc<Yield>,
    /// Every session's logits, computed together.
    heads: Option<Arc<crate::heads::Heads>>,
    /// Recent routes, audits, convictions and tokens, for the swarm view.
    pub(crate) activity: Arc<crate::swarm::Activity>,
}

/// A request, planned: who pays, the sessions to run, and the most tokens
/// they may use together.
pub(crate) struct RequestPlan {
    pub id: String,
    pub caller: Option<Caller>,
    pub jobs: Vec<ChoiceJob>,
    pub reserve: u64,
    /// Most the request pays per 1,000 positions, nodes and fee together.
    pub max_price: Option<hotpot_core::Credits>,
    /// How nodes schedule its sessions (batch lines run behind interactive
    /// requests).
    pub priority: hotpot_wire::Priority,
    /// Charges wait for this (a batch line's answer kept on disk first).
    pub commit: Option<Commit>,
}

impl RequestPlan {
    /// An interactive request's plan.
    pub(crate) fn new(id: String, caller: Option<Caller>, jobs: Vec<ChoiceJob>, reserve: u64, max_price: Option<hotpot_core::Credits>) -> Self {
        Self { id, caller, jobs, reserve, max_price, priority: hotpot_wire::Priority::Interactive, commit: None }
    }

    /// The same plan as a batch line: its id, batch priority, charges held
    /// until `commit`.
    pub(crate) fn batch_line(self, id: &str, commit: Commit) -> Self {
        Self { id: id.to_string(), priority: hotpot_wire::Priority::Batch, commit: Some(commit), ..self }
    }
}

/// Holds a request's charges until its answer is kept: a batch line is
/// charged only once its answer is on disk, so a crash in between loses
/// no charge of an answer that is kept, and charges no answer that is lost
/// (the line runs again).
pub(crate) struct Commit {
    /// Becomes true once the answer is kept; dropped without that, the
    /// sessions close without charging.
    pub kept: tokio::sync::watch::Receiver<bool>,
    /// Dropped once every session of the request has been charged.
    pub charged: tokio::sync::oneshot::Sender<()>,
}

/// What a request's sessions report, in the order they report it.
pub(crate) type RequestEvents = mpsc::Receiver<Result<SessionEvent, ApiError>>;

impl Gateway {
    /// A gateway for `client`'s model over `network`; follows the model's
    /// heartbeats and asks the swarm for its nodes once.
    pub async fn new(client: Arc<ClientParts>, model_id: ModelId, network: Network, config: GatewayConfig) -> Arc<Self> {
        let c = client.config();
        let model = ServedModel { name: config.model_name.clone(), id: model_id, n_blocks: c.n_blocks, dim: c.dim, context: c.context_length };
        let directory = SharedDirectory::follow(&network, model_id).await;
        directory.refresh(&network, &model_id, model.n_blocks, Duration::from_secs(3)).await;
        let fingerprint = format!("hotpot-{}-{}", env!("CARGO_PKG_VERSION"), &model_id.to_full_string()[4..12]);
        let metrics = Arc::new(Metrics::default());
        let activity = Arc::new(crate::swarm::Activity::default());
        let auditor = config.audit.clone().map(|audit| {
            let findings = crate::audit::Findings {
                metrics: Arc::clone(&metrics),
                market: config.market.clone(),
                onchain: config.onchain.clone(),
                activity: Arc::clone(&activity),
            };
            Auditor::new(network.clone(), directory.clone(), model.clone(), audit, findings)
        });
        if let Some(onchain) = &config.onchain {
            onchain.follow(directory.clone());
        }
        if let Some(market) = &config.market {
            market.recover();
        }
        if let Some(keys) = &config.keys {
            keys.set_signer(network.key().clone());
        }
        let gateway = Arc::new(Self {
            model,
            client: Arc::clone(&client),
            network,
            directory,
            metrics,
            config,
            fingerprint,
            auditor,
            prep: crate::prep::Prep::start(),
            grammars: std::sync::OnceLock::new(),
            interactive: Arc::default(),
            activity,
            heads: crate::heads::Heads::start(Arc::clone(&client))
                .map(Arc::new)
                .map_err(|e| tracing::warn!(error = %e, "no head thread; each session computes its own logits"))
                .ok(),
        });
        if let (Some(batches), Some(files)) = (&gateway.config.batches, &gateway.config.files) {
            tokio::spawn(crate::batch::run(Arc::clone(&gateway), Arc::clone(batches), Arc::clone(files)));
        }
        gateway
    }

    /// Grammars over the model's vocabulary (built on first use).
    pub(crate) fn grammars(&self) -> Result<&crate::constrain::Grammars, String> {
        self.grammars.get_or_init(|| crate::constrain::Grammars::new(&self.client)).as_ref().map_err(Clone::clone)
    }

    /// This gateway's peer id (its public key).
    pub fn peer_id(&self) -> String {
        self.network.peer_id().to_string()
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn model(&self) -> &ServedModel {
        &self.model
    }

    /// The swarm as this gateway sees it (`GET /v1/hotpot/swarm`): stakes
    /// from the chain or the books, earnings from the books.
    pub async fn swarm_view(&self) -> crate::swarm::SwarmView {
        let routes = self.network.routes().await.unwrap_or_default();
        crate::swarm::view(&self.network.peer_id(), &self.directory, &self.activity, |peer| {
            let books = self.config.market.as_ref();
            let stake = match (&self.config.onchain, books) {
                (Some(onchain), _) => onchain.stake_of(peer),
                (None, Some(market)) => market.books.stake_of(&peer.to_string()).ok(),
                (None, None) => None,
            };
            let earned = books.and_then(|m| m.books.balance(&hotpot_ledger::Account::Node(peer.to_string())).ok());
            crate::swarm::NodeExtras { route: routes.get(peer).copied(), stake: stake.map(|c| c.to_string()), earned: earned.map(|c| c.to_string()) }
        })
    }

    /// Where this gateway writes evidence of cheating, if it audits.
    pub fn evidence_dir(&self) -> Option<&std::path::Path> {
        self.config.audit.as_ref().and_then(|a| a.evidence_dir.as_deref())
    }

    /// Blocks no usable node serves right now.
    pub fn missing_blocks(&self) -> Vec<hotpot_core::LayerSpan> {
        let served: Vec<Served> = self
            .directory
            .with(|d| d.usable(&self.model.id))
            .iter()
            .filter(|r| r.info.n_blocks == self.model.n_blocks)
            .map(|r| Served { span: r.info.span, throughput: r.info.throughput })
            .collect();
        gaps(self.model.n_blocks, &served)
    }

    /// What the cheapest route over every block asks per 1,000 positions
    /// now (`None`: some block is not served).
    pub fn cheapest_route_price(&self) -> Option<hotpot_core::Credits> {
        let priced: Vec<(hotpot_core::LayerSpan, u64)> = self.directory.with(|d| {
            d.usable(&self.model.id)
                .iter()
                .filter(|r| r.info.n_blocks == self.model.n_blocks)
                .filter(|r| self.config.market.as_ref().is_none_or(|m| m.staked_enough(&r.peer)))
                .map(|r| (r.info.span, r.info.price_per_1k))
                .collect()
        });
        hotpot_core::placement::cheapest_route_price(self.model.n_blocks, &priced).map(hotpot_core::Credits::from_micros)
    }

    /// Whether `name` names the served model (its alias or its id).
    pub fn serves(&self, name: &str) -> bool {
        name == self.model.name || self.model.id.matches(name)
    }

    fn observer(&self) -> Observer {
        let metrics = Arc::clone(&self.metrics);
        Arc::new(move |event: ChainEvent<'_>| match event {
            ChainEvent::SessionOpened(_) => {
                metrics.node_sessions.inc();
            }
            ChainEvent::SessionClosed(_) => {
                metrics.node_sessions.dec();
            }
            ChainEvent::Step { peer, sent, received } => metrics.record_traffic(peer, sent, received),
            ChainEvent::Failover => {
                metrics.failovers.inc();
            }
            ChainEvent::Busy(_) => {
                metrics.node_busy.inc();
            }
            ChainEvent::Banned(_) => {
                metrics.bans.inc();
            }
        })
    }

    /// Which nodes have enough at stake to be routed through: on the chain
    /// when there is one, else in the books (`None`: every node).
    fn eligible(&self) -> Option<crate::chain::Eligible> {
        if let Some(onchain) = &self.config.onchain {
            let onchain = Arc::clone(onchain);
            // Called while the directory is locked: reads only what the
            // stake reader last found.
            return onchain.needs_stake().then(|| Arc::new(move |peer: &hotpot_net::PeerId| onchain.staked_enough(peer)) as crate::chain::Eligible);
        }
        self.config.market.as_ref().filter(|m| !m.min_stake.is_zero()).map(|m| {
            let market = Arc::clone(m);
            Arc::new(move |peer: &hotpot_net::PeerId| market.staked_enough(peer)) as crate::chain::Eligible
        })
    }

    /// Opens a route over the swarm for one session of `max_len` positions.
    async fn open_chain(&self, max_len: usize, admitted: bool, node_price_cap: Option<u64>, priority: hotpot_wire::Priority) -> Result<RemoteChain, ApiError> {
        let context = ChainContext {
            network: self.network.clone(),
            directory: self.directory.clone(),
            model: self.model.id,
            n_blocks: self.model.n_blocks,
            dim: self.model.dim,
            observer: Some(self.observer()),
            selector: self.auditor.as_ref().map(Auditor::selector),
            eligible: self.eligible(),
        };
        let mut config = ChainConfig { max_len: max_len + 1, max_price_per_1k: node_price_cap, priority, ..self.config.chain.clone() };
        if admitted {
            // A later session of a request already being answered waits
            // its turn rather than fail the answer part-way.
            config.queue_timeout = config.queue_timeout.max(ADMITTED_QUEUE_TIMEOUT);
        }
        Ok(RemoteChain::open(context, config).await?)
    }

    /// Starts a planned request: reserves what it may spend, opens the
    /// first session's route (so that a swarm that cannot serve the model
    /// fails the request before anything streams), then runs each session
    /// in its own task, at most `parallel_sessions` at a time; later ones
    /// open as earlier ones finish, as an admitted request's (they wait
    /// their turn). A request is admitted on one free slot whatever its
    /// number of sessions: under load, asking for several at once would
    /// starve prompt arrays and `n` > 1 behind single-session requests.
    /// The sessions finish — and are billed and recorded — whether or not
    /// anyone still reads the events.
    pub(crate) async fn start(self: &Arc<Self>, plan: RequestPlan) -> Result<RequestEvents, ApiError> {
        let started = Instant::now();
        let waiting = (plan.priority == hotpot_wire::Priority::Interactive).then(|| self.interactive.hold());
        let reservation = match (&plan.caller, &self.config.keys) {
            (Some(caller), Some(keys)) => Some(keys.reserve(caller, plan.reserve)?),
            _ => None,
        };
        let cap = self.node_price_cap(&plan)?;
        let (credits, credit_limits) = self.hold_credits(&plan, cap)?.unzip();
        let slots = Arc::new(tokio::sync::Semaphore::new(self.config.parallel_sessions.max(1)));
        let mut jobs = plan.jobs.into_iter();
        let first: Vec<ChoiceJob> = jobs.by_ref().take(1).collect();
        let opened = futures::future::join_all(first.iter().map(|job| self.open_chain(self.session_len(job), false, cap, plan.priority))).await;
        let chains = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
        let priority = plan.priority;
        let (kept, charged) = plan.commit.map(|c| (c.kept, c.charged)).unzip();
        let request = Arc::new(RequestRun {
            id: plan.id,
            caller: plan.caller,
            reservation,
            credits,
            credit_limits,
            started,
            priority,
            first_token: Arc::new(Mutex::new(waiting)),
            kept,
            _charged: charged,
        });
        // Small buffers: a listener that leaves is noticed within a token or two.
        let (tx, rx) = mpsc::channel(4);
        for (job, chain) in first.into_iter().zip(chains) {
            let permit = Arc::clone(&slots).try_acquire_owned().expect("one slot per first session");
            let (gateway, tx, request) = (Arc::clone(self), tx.clone(), Arc::clone(&request));
            tokio::spawn(async move { gateway.run_session(job, chain, &request, tx, permit).await });
        }
        let rest: Vec<ChoiceJob> = jobs.collect();
        if !rest.is_empty() {
            let gateway = Arc::clone(self);
            tokio::spawn(async move {
                for job in rest {
                    let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
                    if tx.is_closed() {
                        return;
                    }
                    match gateway.open_chain(gateway.session_len(&job), true, cap, priority).await {
                        Ok(chain) => {
                            let (gateway, tx, request) = (Arc::clone(&gateway), tx.clone(), Arc::clone(&request));
                            tokio::spawn(async move { gateway.run_session(job, chain, &request, tx, permit).await });
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            });
        }
        Ok(rx)
    }

    /// What the nodes of a route may ask together per 1,000 positions:
    /// the lower of the request's and its key's price caps, less the
    /// gateway's fee.
    fn node_price_cap(&self, plan: &RequestPlan) -> Result<Option<u64>, ApiError> {
        let key_cap = plan.caller.as_ref().zip(self.config.keys.as_ref()).and_then(|(c, keys)| keys.max_price(c));
        let Some(cap) = [plan.max_price, key_cap].into_iter().flatten().min() else { return Ok(None) };
        let fee = self.config.market.as_ref().map_or(hotpot_core::Credits::ZERO, |m| m.fee_per_1k);
        match cap.checked_sub(fee) {
            Some(left) => Ok(Some(left.micros())),
            None => Err(ApiError::BadRequest {
                message: format!("the price cap {cap} is below this gateway's own fee of {fee} per 1,000 positions"),
                param: Some("hotpot.max_price".into()),
                code: Some("max_price_too_low"),
            }),
        }
    }

    /// A prepaid key's request holds, in the books, the most it may cost:
    /// every session's prompt plus `max_tokens` through every node that
    /// could be on its route (a route uses each node at most once; at most
    /// the request's price cap), plus the gateway's fee; refused (429
    /// `insufficient_quota`) when the account it pays from (its root key's)
    /// does not have it, or the key's credit limits (or an ancestor's) do
    /// not allow it.
    fn hold_credits(&self, plan: &RequestPlan, node_price_cap: Option<u64>) -> Result<Option<(CreditHold, CreditReservation)>, ApiError> {
        let (Some(caller), Some(market), Some(keys)) = (&plan.caller, &self.config.market, &self.config.keys) else { return Ok(None) };
        let Some(payer) = keys.payer(caller) else { return Ok(None) };
        let positions: u64 = plan.jobs.iter().map(|j| (j.prompt.len() + j.params.max_tokens) as u64).sum();
        let prices: u64 = self.directory.with(|d| d.usable(&self.model.id).iter().map(|r| r.info.price_per_1k).fold(0u64, u64::saturating_add));
        let prices = node_price_cap.map_or(prices, |cap| prices.min(cap));
        let per_1k = hotpot_core::Credits::from_micros(prices.saturating_add(market.fee_per_1k.micros()));
        let most =
            per_1k.per(1000, positions).ok_or_else(|| ApiError::BadRequest { message: "this request's cost overflows".into(), param: None, code: None })?;
        let limits = keys.reserve_credits(caller, most)?;
        Ok(Some((market.hold(&payer, &plan.id, most)?, limits)))
    }

    /// Positions a session's route must hold.
    fn session_len(&self, job: &ChoiceJob) -> usize {
        (job.prompt.len() + job.params.max_tokens).min(self.model.context)
    }

    /// Drives one session to its end and hands its record to the sinks.
    async fn run_session(
        self: Arc<Self>,
        mut job: ChoiceJob,
        mut chain: RemoteChain,
        request: &RequestRun,
        tx: mpsc::Sender<Result<SessionEvent, ApiError>>,
        _slot: tokio::sync::OwnedSemaphorePermit,
    ) {
        let context = SessionContext {
            id: format!("{}/{}", request.id, job.index),
            caller: request.caller.as_ref().map(|c| c.name.clone()),
            model: self.model.name.clone(),
            model_id: self.model.id,
            heads: self.heads.clone(),
        };
        let reservation = request.reservation.as_ref();
        let _running = self.activity.session();
        let mut sink = Metered {
            tx: tx.clone(),
            metrics: Arc::clone(&self.metrics),
            activity: Arc::clone(&self.activity),
            started: request.started,
            last: None,
            first_token: Arc::clone(&request.first_token),
        };
        job.speculation.clone_from(&self.config.speculation);
        let outcome = if request.priority == hotpot_wire::Priority::Batch {
            let mut background = Background { chain: &mut chain, interactive: Arc::clone(&self.interactive) };
            drive(&self.client, &mut background, &job, &context, &mut sink).await
        } else {
            drive(&self.client, &mut chain, &job, &context, &mut sink).await
        };
        let transcripts = self.auditor.as_ref().map(|_| chain.transcripts());
        if let Some(e) = outcome.error {
            let _ = tx.send(Err(e.into())).await;
        }
        // The answer is complete: the nodes' receipts need not hold it up.
        drop((sink, tx));
        if let Some(kept) = &request.kept
            && kept.clone().wait_for(|kept| *kept).await.is_err()
        {
            // The answer was not kept: it will be asked for again, and
            // charged then.
            chain.close().await;
            return;
        }
        let mut receipts = Vec::new();
        for r in crate::market::receipts_for(self.network.key(), &outcome.record) {
            let payment = match self.config.onchain.as_ref().and_then(|c| c.wallet_of(&self.directory, &r.node).map(|w| (c, w))) {
                Some((c, wallet)) => c.payment(&r, wallet).await,
                None => None,
            };
            receipts.push((r, payment.map(Box::new)));
        }
        let receipts = chain.close_with_receipts(receipts).await;
        let cost = self.config.market.as_ref().map_or(hotpot_core::Credits::ZERO, |m| m.settle(&outcome.record, &receipts, request.credits.as_ref()));
        if let Some(limits) = &request.credit_limits {
            limits.settle(cost);
        }
        self.log_charge(request, &outcome.record, cost);
        self.on_record(&outcome.record, reservation);
        if let (Some(auditor), Some(transcripts)) = (&self.auditor, transcripts) {
            auditor.after_session(transcripts);
        }
    }

    /// Appends a finished session's charge to its key's spend log.
    fn log_charge(&self, request: &RequestRun, record: &SessionRecord, cost: hotpot_core::Credits) {
        let (Some(caller), Some(keys)) = (&request.caller, &self.config.keys) else { return };
        let balance_after =
            keys.payer(caller).zip(self.config.market.as_ref()).and_then(|(payer, market)| market.books.balance(&hotpot_ledger::Account::Key(payer)).ok());
        let charge = crate::spend::Charge {
            session: record.id.clone(),
            model: record.model.clone(),
            positions: record.route.iter().map(|s| s.positions as u64).max().unwrap_or(0),
            tokens: record.billed_tokens(),
            amount: cost,
            balance_after,
        };
        keys.log_charge(caller, charge);
    }

    /// A finished session's record: billing, metrics, the other sinks.
    fn on_record(&self, record: &SessionRecord, reservation: Option<&Reservation>) {
        let billed = record.billed_tokens();
        if let Some(reservation) = reservation {
            reservation.settle(billed);
            if self.config.metrics_per_key {
                self.metrics.key_tokens.get_or_create(&KeyLabels { key: reservation.caller().name.clone() }).inc_by(billed);
            }
        }
        self.metrics.tokens_in.inc_by(record.billed_prompt_tokens as u64);
        self.metrics.tokens_out.inc_by(record.completion_tokens as u64);
        if let Some(s) = &record.speculation {
            self.metrics.drafted.inc_by(s.drafted as u64);
            self.metrics.draft_accepted.inc_by(s.accepted as u64);
            self.metrics.decode_passes.inc_by(s.passes as u64);
            let per_pass = record.completion_tokens as f64 / s.passes.max(1) as f64;
            tracing::info!(
                session = %record.id, drafted = s.drafted, accepted = s.accepted, passes = s.passes,
                "speculation: {:.0} % of drafts kept, {per_pass:.2} tokens per pass", 100.0 * s.acceptance()
            );
        }
        if let Finish::Error(message) = &record.finish {
            tracing::warn!(session = %record.id, error = %message, "a session failed");
        }
        self.activity.route(record);
        for sink in &self.config.record_sinks {
            sink.record(record);
        }
    }
}

/// What a request's sessions share.
struct RequestRun {
    id: String,
    caller: Option<Caller>,
    reservation: Option<Reservation>,
    /// A prepaid key's credits held for the request in the books.
    credits: Option<CreditHold>,
    /// The same amount held against the key's credit limits.
    credit_limits: Option<CreditReservation>,
    started: Instant,
    priority: hotpot_wire::Priority,
    /// An interactive request's place among those waiting for a first
    /// token (let go at its first token, or when it ends).
    first_token: Arc<Mutex<Option<YieldGuard>>>,
    /// A batch line's: charges wait until its answer is kept.
    kept: Option<tokio::sync::watch::Receiver<bool>>,
    /// Dropped with the request, once its every session is charged.
    _charged: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A session's events on their way to the request, timed for metrics.
struct Metered {
    tx: mpsc::Sender<Result<SessionEvent, ApiError>>,
    metrics: Arc<Metrics>,
    activity: Arc<crate::swarm::Activity>,
    started: Instant,
    last: Option<Instant>,
    first_token: Arc<Mutex<Option<YieldGuard>>>,
}

impl EventSink for Metered {
    async fn send(&mut self, event: SessionEvent) -> bool {
        if matches!(event, SessionEvent::Token { .. }) {
            let now = Instant::now();
            match self.last {
                None => {
                    self.metrics.time_to_first_token.observe(now.duration_since(self.started).as_secs_f64());
                    self.first_token.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                Some(previous) => self.metrics.token_latency.observe(now.duration_since(previous).as_secs_f64()),
            }
            self.last = Some(now);
            self.activity.tokens(1);
        }
        self.tx.send(Ok(event)).await.is_ok()
    }
}

/// Longest a batch step waits for interactive requests to get their first
/// token (so that a steady interactive load slows batches, never stops them).
const MAX_YIELD: Duration = Duration::from_secs(2);

/// Interactive requests waiting for their first token. Batch sessions
/// step only while there are none: on a machine whose CPUs a batch keeps
/// busy (the gateway's sampling, the nodes' passes), an interactive
/// answer starts almost as fast as on an idle one.
#[derive(Debug, Default)]
pub(crate) struct Yield {
    waiting: std::sync::atomic::AtomicUsize,
    clear: tokio::sync::Notify,
}

impl Yield {
    fn hold(self: &Arc<Self>) -> YieldGuard {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        YieldGuard(Arc::clone(self))
    }

    /// Returns once no interactive request waits, or after [`MAX_YIELD`].
    async fn wait(&self) {
        let deadline = tokio::time::Instant::now() + MAX_YIELD;
        loop {
            let notified = self.clear.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.waiting.load(std::sync::atomic::Ordering::Acquire) == 0 || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

#[derive(Debug)]
pub(crate) struct YieldGuard(Arc<Yield>);

impl Drop for YieldGuard {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0.clear.notify_waiters();
        }
    }
}

/// A batch session's route: each step first lets waiting interactive
/// requests go ahead.
struct Background<'a> {
    chain: &'a mut RemoteChain,
    interactive: Arc<Yield>,
}

impl crate::session::Pipeline for Background<'_> {
    async fn forward(&mut self, hidden: hotpot_engine::HiddenStates, start: usize) -> Result<hotpot_engine::HiddenStates, crate::chain::ChainError> {
        self.interactive.wait().await;
        self.chain.forward(hidden, start).await
    }

    async fn truncate(&mut self, len: usize) -> Result<(), crate::chain::ChainError> {
        self.chain.truncate(len).await
    }

    async fn close(&mut self) {
        self.chain.close().await;
    }

    fn stages(&self) -> Vec<crate::chain::StageRecord> {
        self.chain.stage_records()
    }

    fn transcripts(&self) -> Vec<crate::chain::StageTranscript> {
        self.chain.transcripts()
    }

    fn failovers(&self) -> usize {
        self.chain.failovers()
    }
}
