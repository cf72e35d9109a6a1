//! A Hotpot node: serves a span of a model's blocks to the swarm.
//!
//! Startup, in order: open the model file and compute its id; choose the
//! span (given, or the swarm's weakest window); load only those blocks;
//! measure decode speed; start the engine thread; accept session and info
//! streams; announce one DHT provider record per block; gossip heartbeats.

mod push;
mod serve;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hotpot_core::placement::{Served, weakest_window};
use hotpot_core::{LayerSpan, ModelId};
use hotpot_engine::{Device, HiddenStates, ModelError, ModelFile, Span};
use hotpot_net::{NetError, NetEvent, Network, block_key, cheats_topic, model_topic};
use hotpot_wire::{NodeInfo, PROTOCOL_AUDIT, PROTOCOL_INFER, PROTOCOL_INFO, PROTOCOL_PUSH};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::serve::StreamLimits;
use crate::worker::{Jobs, RuntimeCheat, WorkerConfig};

/// Which blocks to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChoice {
    Fixed(LayerSpan),
    /// The window of `count` blocks (default: as many as fit in memory)
    /// that the swarm covers worst.
    Auto {
        count: Option<u32>,
    },
}

/// How a red-team node cheats: the cheats Hotpot's verification must catch.
/// Only for testing that verification (`hotpot node --redteam …`).
#[derive(Debug, Clone, PartialEq)]
pub enum Cheat {
    /// Run the span re-quantized to another GGML type (`Q4_0`, `Q8_0`).
    Requantize(String),
    /// Add Gaussian noise of 1 % of the quantization step to the first block.
    Noise,
    /// Skip the span's first block.
    SkipBlock,
    /// Attend only to the last 64 positions (a cheap KV cache).
    AttentionWindow(usize),
    /// Return the previous decode output again.
    Replay,
    /// Run the weights of the neighbouring span.
    OtherSpan,
    /// Perturb the input hidden states before computing.
    AlterInput,
    /// Run the weights of another GGUF while announcing the original id.
    Weights(PathBuf),
}

impl std::str::FromStr for Cheat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "requantize-q4_0" => Self::Requantize("Q4_0".into()),
            "requantize-q8_0" => Self::Requantize("Q8_0".into()),
            "noise" => Self::Noise,
            "skip-block" => Self::SkipBlock,
            "attention-window" => Self::AttentionWindow(64),
            "replay" => Self::Replay,
            "other-span" => Self::OtherSpan,
            "alter-input" => Self::AlterInput,
            other => match other.strip_prefix("weights:") {
                Some(path) => Self::Weights(PathBuf::from(path)),
                None => {
                    return Err(format!(
                        "unknown cheat `{other}` (requantize-q4_0, requantize-q8_0, noise, skip-block, attention-window, replay, other-span, alter-input, weights:FILE)"
                    ));
                }
            },
        })
    }
}

/// How a node runs. `Default` gives sensible values for everything but the
/// model.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub model_path: PathBuf,
    /// A human name for the model, shown in heartbeats.
    pub model_name: String,
    pub blocks: BlockChoice,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// Compute on this device instead of a new one with `threads` threads
    /// (`hotpot up` shares one between its nodes and its gateway, so that
    /// they never fight over the cores).
    pub device: Option<Device>,
    pub max_sessions: usize,
    /// Memory the KV caches of all sessions may reserve together.
    pub kv_budget_bytes: usize,
    /// Sessions (and streams) silent this long are closed and freed.
    pub idle_timeout: Duration,
    pub heartbeat: Duration,
    pub price_per_1k: u64,
    /// Refuse new sessions from a gateway that closed this many sessions
    /// without a receipt in the last hour (0: never).
    pub max_owed_receipts: usize,
    /// Where countersigned receipts are kept (`None`: not kept).
    pub receipts: Option<PathBuf>,
    /// The node's wallet on the market's chain (announced) and where the
    /// receipts gateways signed for the contract are kept.
    pub chain: Option<NodeChain>,
    /// Put TOPLOC-style output sketches in commitments.
    pub sketches: bool,
    /// Red-team only: cheat this way.
    pub cheat: Option<Cheat>,
}

/// A node's side of a market on a chain.
#[derive(Debug, Clone)]
pub struct NodeChain {
    /// Its payout address, bound to its key (announced in `NodeInfo`).
    pub wallet: hotpot_wire::WalletProof,
    /// Where the gateways' vouchers are kept, for the node to settle them
    /// itself (`hotpot chain settle`) if its gateway does not.
    pub receipts: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::new(),
            model_name: String::new(),
            blocks: BlockChoice::Auto { count: None },
            threads: 0,
            device: None,
            max_sessions: 32,
            kv_budget_bytes: 2 << 30,
            idle_timeout: Duration::from_secs(120),
            heartbeat: Duration::from_secs(10),
            price_per_1k: 0,
            max_owed_receipts: 0,
            receipts: None,
            chain: None,
            sketches: true,
            cheat: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// A node that is serving.
#[derive(Clone)]
pub struct RunningNode {
    state: Arc<State>,
    lifecycle: Arc<tokio::sync::Mutex<Option<Lifecycle>>>,
}

/// What stopping the node ends, in reverse order of start.
struct Lifecycle {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    engine: std::thread::JoinHandle<()>,
}

struct State {
    model: ModelId,
    dim: usize,
    redteam: bool,
    model_name: String,
    n_blocks: u32,
    span: LayerSpan,
    throughput: f32,
    max_sessions: usize,
    price_per_1k: u64,
    network: Network,
    jobs: Jobs,
    wallet: Option<hotpot_wire::WalletProof>,
}

impl State {
    async fn info(&self) -> NodeInfo {
        let load = self.jobs.load();
        let sessions = load.sessions.load(Ordering::Relaxed);
        NodeInfo {
            node: self.network.node_id(),
            model: self.model,
            model_name: self.model_name.clone(),
            n_blocks: self.n_blocks,
            span: self.span,
            throughput: self.throughput,
            free_slots: self.max_sessions.saturating_sub(sessions) as u32,
            max_sessions: self.max_sessions as u32,
            queue: load.queue.load(Ordering::Relaxed) as u32,
            price_per_1k: self.price_per_1k,
            version: if self.redteam { format!("{}-redteam", env!("CARGO_PKG_VERSION")) } else { env!("CARGO_PKG_VERSION").to_string() },
            addrs: self.network.listen_addrs().await.unwrap_or_default().iter().map(ToString::to_string).collect(),
            timestamp_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            features: hotpot_wire::features::PUSH,
            wallet: self.wallet.clone(),
        }
    }
}

impl RunningNode {
    pub fn span(&self) -> LayerSpan {
        self.state.span
    }

    pub fn model(&self) -> ModelId {
        self.state.model
    }

    /// Measured decode speed of the whole span, tokens/s.
    pub fn throughput(&self) -> f32 {
        self.state.throughput
    }

    pub async fn info(&self) -> NodeInfo {
        self.state.info().await
    }

    /// Stops serving: every open session gets a `ShuttingDown` error (so
    /// its gateway fails over at once), the network tasks end, then the
    /// engine thread. Waits at most `deadline` for them; safe to call twice.
    pub async fn shutdown(&self, deadline: Duration) {
        let Some(Lifecycle { stop, mut tasks, engine }) = self.lifecycle.lock().await.take() else { return };
        tracing::info!("stopping: telling open sessions, ending tasks");
        stop.cancel();
        let ended = tokio::time::timeout(deadline, async { while tasks.join_next().await.is_some() {} }).await;
        if ended.is_err() {
            tasks.abort_all();
        }
        self.state.jobs.tell(worker::Job::Stop);
        let joined = tokio::time::timeout(deadline, tokio::task::spawn_blocking(move || engine.join())).await;
        if joined.is_err() {
            tracing::warn!("the engine thread did not stop in time");
        } else {
            tracing::info!("stopped");
        }
    }
}

/// Starts a node on `network` (already listening and joined).
pub async fn start(config: NodeConfig, network: Network) -> Result<RunningNode, NodeError> {
    let path = config.model_path.clone();
    let (file, model) = tokio::task::spawn_blocking(move || -> Result<_, ModelError> {
        let file = ModelFile::open(&path)?;
        let id = file.model_id()?;
        Ok((file, id))
    })
    .await
    .map_err(|e| NodeError::Config(e.to_string()))??;
    let n_blocks = file.config().n_blocks;
    tracing::info!(model = %model, name = %config.model_name, blocks = n_blocks, "model file opened");

    let span = match config.blocks {
        BlockChoice::Fixed(span) => {
            file.config().check_span(span)?;
            span
        }
        BlockChoice::Auto { count } => {
            let count = count.unwrap_or_else(|| blocks_that_fit(&file)).clamp(1, n_blocks);
            let swarm = network.discover(Some(&model), n_blocks, Duration::from_secs(3)).await;
            let served: Vec<Served> = swarm.iter().map(|(_, i)| Served { span: i.span, throughput: i.throughput }).collect();
            let span = weakest_window(n_blocks, count, &served);
            tracing::info!(%span, nodes_seen = swarm.len(), "chose the swarm's weakest window");
            span
        }
    };

    let device = match &config.device {
        Some(device) => device.clone(),
        None => Device::cpu(config.threads)?,
    };
    let runtime_cheat = match &config.cheat {
        Some(Cheat::Replay) => RuntimeCheat::Replay,
        Some(Cheat::AlterInput) => RuntimeCheat::AlterInput(1e-3),
        _ => RuntimeCheat::None,
    };
    if let Some(cheat) = &config.cheat {
        tracing::warn!(?cheat, "RED-TEAM NODE: this node cheats, to test Hotpot's verification");
    }
    let cheat = config.cheat.clone();
    let model_path = config.model_path.clone();
    let (span_weights, throughput) = tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
        let mut loaded = load_span(&file, &model_path, span, &device, cheat.as_ref())?;
        if let Some(Cheat::AttentionWindow(window)) = cheat {
            loaded.set_attention_window(Some(window));
        }
        let throughput = measure_throughput(&loaded);
        Ok((loaded, throughput))
    })
    .await
    .map_err(|e| NodeError::Config(e.to_string()))??;
    tracing::info!(%span, mib = span_weights.size_bytes() >> 20, threads = span_weights.device().threads(), kernels = %span_weights.device().isa().name(), tokens_per_s = throughput, "blocks loaded");

    let span_weights_dim = span_weights.config().dim;
    let context = span_weights.config().context_length;
    let (jobs, engine) = worker::spawn(
        span_weights,
        WorkerConfig {
            model,
            key: network.key().clone(),
            max_sessions: config.max_sessions,
            kv_budget_bytes: config.kv_budget_bytes,
            idle_timeout: config.idle_timeout,
            sketches: config.sketches,
            cheat: runtime_cheat,
            price_per_1k: hotpot_core::Credits::from_micros(config.price_per_1k),
            max_owed_receipts: config.max_owed_receipts,
        },
    )?;
    let state = Arc::new(State {
        model,
        dim: span_weights_dim,
        redteam: config.cheat.is_some(),
        model_name: config.model_name.clone(),
        n_blocks,
        span,
        throughput,
        max_sessions: config.max_sessions,
        price_per_1k: config.price_per_1k,
        network: network.clone(),
        jobs: jobs.clone(),
        wallet: config.chain.as_ref().map(|c| c.wallet.clone()),
    });

    // Every task below stops with `stop`; `RunningNode::shutdown` cancels it.
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    // The largest legitimate frame: a whole context of hidden states.
    let frame = context.saturating_mul(state.dim).saturating_mul(4).saturating_add(4096).min(hotpot_wire::MAX_FRAME);
    let budget = Arc::new(tokio::sync::Semaphore::new((FRAME_BUDGET.max(2 * frame) >> 10).min(tokio::sync::Semaphore::MAX_PERMITS)));
    let limits = StreamLimits { idle: config.idle_timeout, write: Duration::from_secs(30), frame, budget: Arc::clone(&budget) };
    // Streams are cheap (their frames' memory is budgeted above): many in
    // all, and per peer a few more than the sessions a gateway may hold.
    let session_gate = serve::StreamGate::new(MAX_SESSION_STREAMS.max(4 * config.max_sessions), config.max_sessions.max(1) + 4);
    let sessions = network.accept(PROTOCOL_INFER)?;
    let push_table = push::PushTable::new(network.clone(), limits.write);
    let (session_jobs, session_stop, session_limits, session_push) = (jobs.clone(), stop.clone(), limits.clone(), Arc::clone(&push_table));
    let receipts = match &config.receipts {
        Some(path) => {
            Some(Arc::new(hotpot_ledger::ReceiptBook::open(path).map_err(|e| NodeError::Config(format!("cannot keep receipts in {}: {e}", path.display())))?))
        }
        None => None,
    };
    let payments = match &config.chain {
        Some(chain) => {
            let outbox = hotpot_chain::Outbox::open(&chain.receipts)
                .map_err(|e| NodeError::Config(format!("cannot keep chain receipts in {}: {e}", chain.receipts.display())))?;
            Some(Arc::new(serve::Payments { outbox, address: chain.wallet.address }))
        }
        None => None,
    };
    tasks.spawn(accept_streams(sessions, session_gate, "session", stop.clone(), move |peer, stream| {
        let services = serve::Services { jobs: session_jobs.clone(), push: Arc::clone(&session_push), receipts: receipts.clone(), payments: payments.clone() };
        serve::serve_session(peer, stream, services, session_limits.clone(), session_stop.clone())
    }));
    // Steps forwarded by the previous node of pushed chains.
    let pushes = network.accept(PROTOCOL_PUSH)?;
    let push_gate = serve::StreamGate::new(MAX_SESSION_STREAMS.max(4 * config.max_sessions), config.max_sessions.max(1) + 4);
    let (push_jobs, push_stop, push_limits) = (jobs.clone(), stop.clone(), limits.clone());
    tasks.spawn(accept_streams(pushes, push_gate, "push", stop.clone(), move |peer, stream| {
        push::serve_push(peer, stream, Arc::clone(&push_table), push_jobs.clone(), push_limits.clone(), push_stop.clone())
    }));
    let mut infos = network.accept(PROTOCOL_INFO)?;
    let (info_state, info_stop) = (Arc::clone(&state), stop.clone());
    let info_gate = serve::StreamGate::new(64, 4);
    tasks.spawn(async move {
        loop {
            tokio::select! {
                next = infos.next() => match next {
                    Some((peer, stream)) => {
                        let Some(pass) = info_gate.enter(peer) else { continue };
                        let info = info_state.info().await;
                        tokio::spawn(async move {
                            serve::serve_info(peer, stream, info).await;
                            drop(pass);
                        });
                    }
                    None => break,
                },
                () = info_stop.cancelled() => break,
            }
        }
    });
    let mut audits = network.accept(PROTOCOL_AUDIT)?;
    let (audit_jobs, audit_stop) = (jobs.clone(), stop.clone());
    let gate = Arc::new(serve::AuditGate::new(serve::AuditLimits { per_minute: 30.0, queued: 4, max_rows: context.min(MAX_AUDIT_ROWS) }));
    let dim = state.dim;
    let audit_gate = serve::StreamGate::new(16, 2);
    let audit_frame = context.min(MAX_AUDIT_ROWS).saturating_mul(dim).saturating_mul(4).saturating_add(4096);
    let audit_limits = StreamLimits { frame: audit_frame.min(limits.frame), ..limits };
    tasks.spawn(async move {
        loop {
            tokio::select! {
                next = audits.next() => match next {
                    Some((peer, stream)) => {
                        let Some(pass) = audit_gate.enter(peer) else {
                            tokio::spawn(serve::refuse(peer, stream, "too many audit streams are open; try again later"));
                            continue;
                        };
                        let serve = serve::serve_audit(peer, stream, audit_jobs.clone(), Arc::clone(&gate), model, dim, audit_limits.clone(), audit_stop.clone());
                        tokio::spawn(async move {
                            serve.await;
                            drop(pass);
                        });
                    }
                    None => break,
                },
                () = audit_stop.cancelled() => break,
            }
        }
    });
    let (expire_jobs, expire_stop) = (jobs.clone(), stop.clone());
    let tick = (config.idle_timeout / 4).max(Duration::from_millis(100));
    tasks.spawn(async move {
        let mut interval = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = interval.tick() => expire_jobs.tell(worker::Job::Expire),
                () = expire_stop.cancelled() => break,
            }
        }
    });

    network.provide(span.blocks().map(|b| block_key(&model, b)).collect()).await?;
    let topic = model_topic(&model);
    network.subscribe(topic.clone()).await?;
    // Accusations between gateways travel through the nodes' gossip mesh.
    network.subscribe(cheats_topic(&model)).await?;
    let heartbeat_stop = stop.clone();
    let heartbeat_state = Arc::clone(&state);
    tasks.spawn(async move {
        tokio::select! {
            () = heartbeats(heartbeat_state, topic, config.heartbeat) => {}
            () = heartbeat_stop.cancelled() => {}
        }
    });
    tracing::info!(peer = %network.peer_id(), %span, "serving");
    Ok(RunningNode { state, lifecycle: Arc::new(tokio::sync::Mutex::new(Some(Lifecycle { stop, tasks, engine }))) })
}

/// Serves each stream of `incoming` admitted by `gate` with `serve` (one
/// task each; a stream over the gate's caps is answered `Busy` and
/// closed) until `stop`; then waits for the open ones to end (they tell
/// their peers, e.g. `ShuttingDown`).
async fn accept_streams<F>(
    mut incoming: impl futures::Stream<Item = (hotpot_net::PeerId, hotpot_net::Stream)> + Unpin,
    gate: Arc<serve::StreamGate>,
    what: &'static str,
    stop: CancellationToken,
    serve: impl Fn(hotpot_net::PeerId, hotpot_net::Stream) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut open = JoinSet::new();
    loop {
        tokio::select! {
            next = incoming.next() => match next {
                Some((peer, stream)) => {
                    let Some(pass) = gate.enter(peer) else {
                        tracing::debug!(%peer, "refusing a {what} stream: too many open");
                        tokio::spawn(serve::refuse(peer, stream, "too many streams of this protocol are open; try again later"));
                        continue;
                    };
                    let served = serve(peer, stream);
                    open.spawn(async move {
                        served.await;
                        drop(pass);
                    });
                }
                None => break,
            },
            Some(_) = open.join_next(), if !open.is_empty() => {}
            () = stop.cancelled() => break,
        }
    }
    while open.join_next().await.is_some() {}
}

/// Session streams open at once, in all.
const MAX_SESSION_STREAMS: usize = 1024;

/// Memory for frames being read or worked on, node-wide (at least two of
/// the largest frames).
const FRAME_BUDGET: usize = 256 << 20;

/// Largest audit a node accepts, in positions.
const MAX_AUDIT_ROWS: usize = 8192;

/// Publishes the node's info every `every`, and at once when a peer
/// subscribes to the model's topic (so newcomers need not wait).
async fn heartbeats(state: Arc<State>, topic: String, every: Duration) {
    let mut events = state.network.events();
    let mut interval = tokio::time::interval(every);
    let mut last_eager = Instant::now() - Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            event = events.recv() => match event {
                Ok(NetEvent::Subscribed { topic: t, .. }) if t == topic && last_eager.elapsed() > Duration::from_millis(500) => {
                    last_eager = Instant::now();
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
        }
        let info = state.info().await;
        if state.network.publish(topic.clone(), info.encode()).await.is_err() {
            return;
        }
    }
}

/// Loads `span` — honestly, or the way a red-team `cheat` would (the
/// run-time cheats, replay and altered inputs, happen in the engine thread).
pub fn load_span(file: &ModelFile, path: &std::path::Path, span: LayerSpan, device: &Device, cheat: Option<&Cheat>) -> Result<Span, NodeError> {
    use hotpot_engine::testing::tamper::{Change, GgmlDType, rewrite};
    let n_blocks = file.config().n_blocks;
    let first = span.start()..span.start() + 1;
    let (change, blocks, shift) = match cheat {
        Some(Cheat::Requantize(to)) => {
            let dtype = match to.as_str() {
                "Q4_0" => GgmlDType::Q4_0,
                _ => GgmlDType::Q8_0,
            };
            (Some(Change::Requantize(dtype)), span.blocks(), 0)
        }
        Some(Cheat::Noise) => (Some(Change::Noise { fraction: 0.01, seed: 7 }), first, 0),
        Some(Cheat::SkipBlock) => (Some(Change::Skip), first, 0),
        Some(Cheat::OtherSpan) => (None, span.blocks(), if span.end() < n_blocks { 1 } else { -1 }),
        Some(Cheat::Weights(other)) => {
            let other = ModelFile::open(other)?;
            return Ok(Span::load(&other, span, device)?);
        }
        _ => return Ok(Span::load(file, span, device)?),
    };
    let tampered = std::env::temp_dir().join(format!("hotpot-redteam-{}-{}.gguf", std::process::id(), span));
    rewrite(path, &tampered, blocks, change, shift).map_err(|e| NodeError::Config(format!("red-team rewrite: {e}")))?;
    let loaded = ModelFile::open(&tampered).and_then(|f| Span::load(&f, span, device));
    let _ = std::fs::remove_file(&tampered);
    Ok(loaded?)
}

/// How many blocks fit in 80 % of the memory available now.
fn blocks_that_fit(file: &ModelFile) -> u32 {
    let n_blocks = file.config().n_blocks;
    let per_block = (file.tensor_bytes() / u64::from(n_blocks.max(1))).max(1);
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(u64::MAX, |kib| kib * 1024);
    ((available / 10 * 8) / per_block).min(u64::from(n_blocks)).max(1) as u32
}

/// Decode tokens/s of the span: a few single-position steps on a scratch cache.
fn measure_throughput(span: &Span) -> f32 {
    let dim = span.config().dim;
    let mut cache = span.new_cache(64);
    let hidden = |pos: usize| HiddenStates::new(1, dim, (0..dim).map(|i| ((i * 31 + pos * 7) % 17) as f32 * 0.05 - 0.4).collect());
    let steps = 16;
    let mut elapsed = Duration::ZERO;
    for pos in 0..steps + 2 {
        let Ok(h) = hidden(pos) else { return 0.0 };
        let started = Instant::now();
        if span.forward(&mut cache, &h, pos).is_err() {
            return 0.0;
        }
        if pos >= 2 {
            elapsed += started.elapsed();
        }
    }
    steps as f32 / elapsed.as_secs_f32().max(1e-6)
}
