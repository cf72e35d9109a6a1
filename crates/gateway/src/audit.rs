//! Audits: after a session ends, a share of each node's work is recomputed
//! by someone else — another node serving the same blocks, or the gateway's
//! own engine — in one prefill, and compared with what the node returned
//! and signed. A failed audit is repeated by other executors; a majority of
//! failures marks the node as a cheat, bans it from routing, and stores
//! evidence that anyone holding the model can re-check (`hotpot verify`).
//!
//! A conviction is gossiped to other gateways as an accusation; each of
//! them fetches the evidence from the accuser, checks the accused node's
//! signatures on it, and audits the recorded work itself: it bans the node
//! only if its own audit fails too, and ignores an accuser whose evidence
//! turned out false.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use hotpot_core::{Commitment, LayerSpan, ModelId, NodeId};
use hotpot_engine::{Device, ForwardError, HiddenStates, ModelError, ModelFile, Span};
use hotpot_net::{Framed, Multiaddr, NetEvent, Network, PeerId, Stream, cheats_topic, peer_id_of};
use hotpot_verify::{AuditPolicy, AuditRecord, Evidence, EvidenceError, Executor, ExecutorError, Kept, Sketch, Tolerance, Verdict, compare};
use hotpot_wire::{Accusation, ClientMessage, DType, EvidenceMessage, NodeMessage, PROTOCOL_AUDIT, PROTOCOL_EVIDENCE, Tensor};
use rand::Rng;

use crate::chain::{AuditSelector, StageTranscript};
use crate::directory::SharedDirectory;
use crate::metrics::{AuditLabels, Metrics, ResultLabels};
use crate::service::ServedModel;

/// How the gateway audits.
#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    pub policy: AuditPolicy,
    pub tolerance: Tolerance,
    /// The model file, to recompute spans with the gateway's own engine
    /// (`None`: only other nodes audit).
    pub local_model: Option<PathBuf>,
    /// Where evidence of cheating is written.
    pub evidence_dir: Option<PathBuf>,
    /// Device of the gateway's own engine.
    pub device: Option<Device>,
    /// Measurement only (`bench/redteam.sh`): record convictions and
    /// evidence but keep routing through the convicted node, so that every
    /// one of its sessions is audited.
    pub keep_cheats: bool,
    /// Red-team only: convict every audited node, honest or not, so that
    /// tests can check that other gateways reject false accusations.
    pub accuse_everyone: bool,
    /// How often the gateway gossips its accusations again, for gateways
    /// that were not listening when it first did.
    pub accusations_every: Duration,
    /// Most accusations from other gateways checked per minute (each costs
    /// an audit); the rest are dropped and counted, so a flood from
    /// ever-new peer ids cannot take the gateway's compute.
    pub accusation_checks_per_minute: u32,
}

/// Why one audit step (recomputing, fetching evidence) failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Net(#[from] hotpot_net::NetError),
    #[error(transparent)]
    Wire(#[from] hotpot_wire::WireError),
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    #[error("unreadable evidence: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the audit task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the executor refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Protocol(&'static str),
    #[error("cannot start compute threads: {0}")]
    Threads(String),
}

/// The whole model loaded locally: recomputes any span.
pub struct LocalExecutor {
    span: Span,
}

impl LocalExecutor {
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, ModelError> {
        let file = ModelFile::open(path)?;
        let span = Span::load(&file, file.config().full_span(), device)?;
        Ok(Self { span })
    }

    fn run(&self, span: LayerSpan, inputs: &[f32], rows: usize) -> Result<Vec<f32>, ForwardError> {
        let dim = self.span.config().dim;
        let hidden = HiddenStates::new(rows, dim, inputs.to_vec())?;
        let mut cache = self.span.cache_for(span, rows)?;
        self.span.forward(&mut cache, &hidden, 0).map(HiddenStates::into_vec)
    }
}

impl Executor for LocalExecutor {
    fn recompute(&self, span: LayerSpan, inputs: &[f32], rows: usize) -> Result<Vec<f32>, ExecutorError> {
        Ok(self.run(span, inputs, rows)?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExecutorChoice {
    Node(PeerId),
    Local,
}

impl ExecutorChoice {
    fn name(&self) -> String {
        match self {
            Self::Node(peer) => format!("node {peer}"),
            Self::Local => "gateway engine".into(),
        }
    }
}

/// Evidence this gateway wrote, kept to serve to other gateways by hash.
#[derive(Default)]
struct EvidenceStore {
    order: VecDeque<[u8; 32]>,
    files: HashMap<[u8; 32], Arc<Vec<u8>>>,
}

/// How many evidence files are kept in memory for other gateways.
const KEPT_EVIDENCE: usize = 256;

impl EvidenceStore {
    fn insert(&mut self, bytes: Vec<u8>) -> [u8; 32] {
        let hash = hotpot_core::hash(&bytes);
        if self.files.insert(hash, Arc::new(bytes)).is_none() {
            self.order.push_back(hash);
        }
        while self.order.len() > KEPT_EVIDENCE {
            if let Some(old) = self.order.pop_front() {
                self.files.remove(&old);
            }
        }
        hash
    }
}

/// Accusations from other gateways being checked, and accusers caught lying.
#[derive(Default)]
struct Accusations {
    checking: HashSet<PeerId>,
    false_accusers: HashSet<PeerId>,
    /// Checks left in the current minute, and when it was last refilled.
    allowance: f64,
    refilled: Option<std::time::Instant>,
}

impl Accusations {
    /// Takes one check from a bucket of `per_minute`, refilled steadily.
    fn take_check(&mut self, per_minute: u32) -> bool {
        let now = std::time::Instant::now();
        let cap = f64::from(per_minute);
        let elapsed = self.refilled.map_or(f64::INFINITY, |t| now.duration_since(t).as_secs_f64());
        self.allowance = (self.allowance + elapsed * cap / 60.0).min(cap);
        self.refilled = Some(now);
        if self.allowance >= 1.0 {
            self.allowance -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What checking another gateway's accusation found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    /// Our own audit convicted the node.
    Confirmed,
    /// Our own audit found the recorded work honest.
    Rejected,
    /// The evidence was not what the accusation said, or not signed by the node.
    Invalid(String),
    /// We could not get the evidence or audit it (no fault of the accuser's).
    Unchecked(String),
}

/// What an accusation names: the node, its blocks, the evidence's hash.
#[derive(Debug, Clone, Copy)]
struct Conviction {
    node: NodeId,
    span: LayerSpan,
    evidence: [u8; 32],
}

impl Conviction {
    /// The accusation to gossip: the evidence can be fetched at `addrs`.
    fn accusation(&self, model: ModelId, addrs: &[Multiaddr]) -> Accusation {
        Accusation { node: self.node, model, span: self.span, evidence: self.evidence, addrs: addrs.iter().map(ToString::to_string).collect() }
    }
}

pub struct Auditor {
    network: Network,
    directory: SharedDirectory,
    model: ServedModel,
    config: AuditConfig,
    local: Mutex<Option<Arc<LocalExecutor>>>,
    metrics: Arc<Metrics>,
    evidence: Mutex<EvidenceStore>,
    accusations: Mutex<Accusations>,
    /// This gateway's own convictions, the latest per node, whose
    /// accusations it repeats every `accusations_every`.
    convictions: Mutex<HashMap<PeerId, Conviction>>,
    /// One accusation is checked at a time, so that a flood of them cannot
    /// take the gateway's compute.
    checks: tokio::sync::Semaphore,
    /// Where a conviction voids receipts and slashes stakes.
    market: Option<Arc<crate::market::Market>>,
    /// The market on a chain, where convictions are co-signed and slashed.
    onchain: Option<Arc<crate::onchain::OnChain>>,
    /// This gateway's signatures on convictions (its own and those it
    /// confirmed), gossiped again with its accusations.
    cosigned: Mutex<Vec<hotpot_wire::ConvictionSignature>>,
    /// Recent audits and convictions, for the swarm view.
    activity: Arc<crate::swarm::Activity>,
}

/// Evidence requests served at once.
const EVIDENCE_STREAMS: usize = 16;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where an auditor's findings go besides its own state.
pub struct Findings {
    pub metrics: Arc<Metrics>,
    /// The books: a conviction voids the node's receipts and takes its stake.
    pub market: Option<Arc<crate::market::Market>>,
    /// The chain: convictions are co-signed and slashed there.
    pub onchain: Option<Arc<crate::onchain::OnChain>>,
    /// The swarm view: recent audits and convictions.
    pub activity: Arc<crate::swarm::Activity>,
}

impl Auditor {
    /// An auditor that also serves its evidence to other gateways and checks
    /// theirs (tasks on the current Tokio runtime).
    pub fn new(network: Network, directory: SharedDirectory, model: ServedModel, config: AuditConfig, findings: Findings) -> Arc<Self> {
        let Findings { metrics, market, onchain, activity } = findings;
        let auditor = Arc::new(Self {
            network,
            directory,
            model,
            config,
            local: Mutex::new(None),
            metrics,
            evidence: Mutex::default(),
            accusations: Mutex::default(),
            convictions: Mutex::default(),
            checks: tokio::sync::Semaphore::new(1),
            market,
            onchain,
            cosigned: Mutex::default(),
            activity,
        });
        auditor.listen();
        auditor.remember_convictions();
        auditor.repeat_accusations();
        auditor
    }

    /// Takes up the convictions whose evidence this gateway wrote in earlier
    /// runs (its evidence directory): those nodes stay banned, and their
    /// accusations are repeated.
    fn remember_convictions(self: &Arc<Self>) {
        let Some(dir) = self.config.evidence_dir.clone() else { return };
        let (auditor, model) = (Arc::downgrade(self), self.model.id);
        tokio::spawn(async move {
            let found = tokio::task::spawn_blocking(move || read_convictions(&dir, &model)).await.unwrap_or_default();
            let Some(auditor) = auditor.upgrade() else { return };
            if !found.is_empty() {
                tracing::info!(convictions = found.len(), "remembering the cheats convicted before");
            }
            for (evidence, bytes) in found {
                let Some(peer) = peer_id_of(&evidence.node) else { continue };
                if !auditor.config.keep_cheats {
                    auditor.directory.with(|d| d.mark_cheat(peer));
                }
                let hash = lock(&auditor.evidence).insert(bytes);
                lock(&auditor.convictions).insert(peer, Conviction { node: evidence.node, span: evidence.span, evidence: hash });
                let file = format!("{}-{}.json", evidence.node, evidence.created_ms);
                auditor.activity.conviction(&peer, evidence.node, evidence.span, "earlier run", Some(file));
            }
        });
    }

    /// Serves evidence over `/hotpot/evidence/1` and follows the model's
    /// accusations topic.
    fn listen(self: &Arc<Self>) {
        match self.network.accept(PROTOCOL_EVIDENCE) {
            Ok(mut incoming) => {
                let auditor = Arc::downgrade(self);
                // Evidence requests are small and rare: a flood of them gets
                // closed streams beyond a few at a time.
                let serving = Arc::new(tokio::sync::Semaphore::new(EVIDENCE_STREAMS));
                tokio::spawn(async move {
                    while let Some((peer, stream)) = incoming.next().await {
                        let Some(auditor) = auditor.upgrade() else { return };
                        let Ok(permit) = Arc::clone(&serving).try_acquire_owned() else { continue };
                        tokio::spawn(async move {
                            auditor.serve_evidence(peer, stream).await;
                            drop(permit);
                        });
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot serve evidence to other gateways"),
        }
        let auditor: Weak<Self> = Arc::downgrade(self);
        let (network, topic) = (self.network.clone(), cheats_topic(&self.model.id));
        let mut events = network.events();
        tokio::spawn(async move {
            let _ = network.subscribe(topic.clone()).await;
            loop {
                match events.recv().await {
                    Ok(NetEvent::Gossip { topic: t, source: Some(accuser), data }) if t == topic => {
                        let Some(auditor) = auditor.upgrade() else { return };
                        match Accusation::decode(&data) {
                            Ok(accusation) => {
                                tokio::spawn(async move { auditor.on_accusation(accuser, accusation).await });
                            }
                            Err(e) => match (hotpot_wire::ConvictionSignature::decode(&data), &auditor.onchain) {
                                (Ok(signature), Some(onchain)) => {
                                    let onchain = Arc::clone(onchain);
                                    tokio::spawn(async move { onchain.on_signature(signature).await });
                                }
                                (Ok(_), None) => {}
                                (Err(_), _) => tracing::debug!(%accuser, error = %e, "ignoring a malformed accusation"),
                            },
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
    }

    async fn serve_evidence(&self, peer: PeerId, stream: Stream) {
        let timeout = Duration::from_secs(10);
        let mut framed = Framed::new(peer, stream);
        // A request is a tag and a 32-byte hash.
        let Ok(Some(request)) = framed.recv_limited(timeout, 64).await else { return };
        let bytes = match EvidenceMessage::decode(&request) {
            Ok(EvidenceMessage::Request { evidence }) => lock(&self.evidence).files.get(&evidence).map(|b| b.as_ref().clone()),
            _ => None,
        };
        let _ = framed.send(&EvidenceMessage::Evidence { bytes }.encode(), timeout).await;
        framed.close().await;
    }

    /// Draws, when a session's stage is connected to `peer`, whether that
    /// stage will be audited (the node cannot tell): only audited stages
    /// keep their tensors until the session ends.
    pub fn selector(self: &Arc<Self>) -> AuditSelector {
        let auditor = Arc::downgrade(self);
        Arc::new(move |peer: &PeerId| {
            let Some(auditor) = auditor.upgrade() else { return false };
            let draw = rand::rng().random::<f64>();
            auditor.directory.with(|d| {
                let reputation = d.reputation(*peer);
                let audit = auditor.config.policy.should_audit(reputation, draw);
                reputation.sessions += 1;
                audit
            })
        })
    }

    /// Starts the audits of a finished session's drawn stages, in the background.
    pub fn after_session(self: &Arc<Self>, transcripts: Vec<StageTranscript>) {
        for stage in transcripts.into_iter().filter(|s| !s.inputs.is_empty()) {
            let auditor = Arc::clone(self);
            tokio::spawn(async move {
                auditor.audit(stage).await;
            });
        }
    }

    /// Who may recompute `stage`: other nodes serving its blocks (in random
    /// order), then the gateway's own engine.
    fn executors(&self, stage: &StageTranscript) -> Vec<ExecutorChoice> {
        let mut nodes: Vec<ExecutorChoice> = self.directory.with(|d| {
            d.usable(&self.model.id)
                .into_iter()
                .filter(|r| r.peer != stage.peer && r.info.span.start() <= stage.span.start() && stage.span.end() <= r.info.span.end())
                .map(|r| ExecutorChoice::Node(r.peer))
                .collect()
        });
        for i in (1..nodes.len()).rev() {
            nodes.swap(i, rand::rng().random_range(0..=i));
        }
        if self.config.local_model.is_some() {
            nodes.push(ExecutorChoice::Local);
        }
        nodes
    }

    async fn local(&self) -> Result<Arc<LocalExecutor>, AuditError> {
        if let Some(local) = self.local.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(Arc::clone(local));
        }
        let path = self.config.local_model.clone().ok_or(AuditError::Protocol("no local model"))?;
        let device = match &self.config.device {
            Some(device) => device.clone(),
            None => Device::cpu(0)?,
        };
        let loaded = tokio::task::spawn_blocking(move || LocalExecutor::load(&path, &device)).await??;
        let loaded = Arc::new(loaded);
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Recomputes the positions `kept` holds (see [`Kept`]) with `executor`.
    async fn recompute(&self, executor: ExecutorChoice, stage: &StageTranscript, kept: &Kept) -> Result<Vec<f32>, AuditError> {
        let rows = kept.positions();
        match executor {
            ExecutorChoice::Local => {
                let local = self.local().await?;
                let (span, inputs) = (stage.span, kept.inputs.clone());
                Ok(tokio::task::spawn_blocking(move || local.run(span, &inputs, rows)).await??)
            }
            ExecutorChoice::Node(peer) => {
                let timeout = Duration::from_secs(30) + Duration::from_millis(20) * rows as u32;
                let stream = self.network.open_stream(peer, PROTOCOL_AUDIT, timeout).await?;
                let mut framed = Framed::new(peer, stream);
                let inputs = Tensor::from_f32(DType::F32, rows, stage.dim, &kept.inputs);
                let request = ClientMessage::Audit { model: self.model.id, span: stage.span, inputs };
                framed.send(&request.encode(), timeout).await?;
                let reply = framed.recv(timeout).await?.ok_or(AuditError::Protocol("the auditor closed the stream"))?;
                framed.close().await;
                match NodeMessage::decode(&reply)? {
                    NodeMessage::Audited { outputs } if outputs.rows() == rows && outputs.cols() == stage.dim => Ok(outputs.to_f32()),
                    NodeMessage::Error { message, .. } => Err(AuditError::Refused(message)),
                    _ => Err(AuditError::Protocol("unexpected answer to an audit")),
                }
            }
        }
    }

    /// Whether every sketch the node committed agrees with `recomputed`
    /// (sketches over positions a later step overwrote are not checked).
    fn sketches_agree(&self, stage: &StageTranscript, kept: &Kept, recomputed: &[f32]) -> bool {
        stage.commitments.iter().enumerate().flat_map(|(i, c)| c.sketches.iter().map(move |bytes| (i, bytes))).all(|(step, bytes)| {
            let Some(sketch) = Sketch::from_bytes(bytes) else {
                return false;
            };
            let (start, rows) = (sketch.start as usize, sketch.rows as usize);
            if start + rows > kept.positions() {
                return false;
            }
            !kept.unchanged_since(step, start, rows) || sketch.check(kept.rows(recomputed, start, rows)).passes(&self.config.tolerance.sketch)
        })
    }

    /// Audits `stage`, escalating a failure; convicts on a majority.
    async fn audit(&self, stage: StageTranscript) -> Verdict {
        let executors = self.executors(&stage);
        if executors.is_empty() {
            tracing::debug!(peer = %stage.peer, blocks = %stage.span, "no one can audit these blocks");
            return Verdict::Pending;
        }
        let steps: Vec<(u32, u32)> = stage.commitments.iter().map(|c| (c.start_pos, c.rows)).collect();
        let kept = match Kept::of(&steps, &stage.inputs, &stage.outputs, stage.dim) {
            Ok(kept) => kept,
            Err(e) => {
                tracing::warn!(peer = %stage.peer, error = %e, "a transcript that does not line up cannot be audited");
                return Verdict::Pending;
            }
        };
        let mut results = Vec::new();
        let mut records = Vec::new();
        let mut verdict = Verdict::Pending;
        for attempt in 0..(executors.len() + self.config.policy.escalation as usize + 1) * 2 {
            let executor = executors[attempt % executors.len()];
            let recomputed = match self.recompute(executor, &stage, &kept).await {
                Ok(values) => values,
                Err(e) => {
                    tracing::debug!(executor = %executor.name(), error = %e, "an audit executor failed");
                    continue;
                }
            };
            let comparison = compare(&kept.outputs, &recomputed, stage.dim, &self.config.tolerance);
            let pass = comparison.pass && self.sketches_agree(&stage, &kept, &recomputed);
            results.push(pass);
            records.push(AuditRecord { executor: executor.name(), comparison });
            verdict = self.config.policy.verdict(&results);
            if verdict != Verdict::Pending {
                break;
            }
        }
        let Some(&first) = results.first() else {
            return Verdict::Pending;
        };
        if self.config.accuse_everyone {
            verdict = Verdict::Cheat;
        }
        let shown = match (verdict, first) {
            (Verdict::Cheat, _) => "cheat",
            (_, true) => "passed",
            (_, false) => "failed",
        };
        self.activity.audit(&stage.peer, stage.node, stage.span, shown);
        let labels = AuditLabels { peer: stage.peer.to_string(), result: if first { "pass".into() } else { "fail".into() } };
        self.metrics.audits.get_or_create(&labels).inc();
        self.directory.with(|d| {
            let reputation = d.reputation(stage.peer);
            reputation.audits += 1;
            if !first {
                reputation.failed_audits += 1;
            }
        });
        match verdict {
            Verdict::Cheat => self.convict(&stage, records).await,
            Verdict::Honest if !first => {
                tracing::warn!(peer = %stage.peer, "a failed audit was not confirmed by re-audits")
            }
            _ => {}
        }
        verdict
    }

    async fn convict(&self, stage: &StageTranscript, records: Vec<AuditRecord>) {
        if !self.config.keep_cheats {
            self.directory.with(|d| d.mark_cheat(stage.peer));
        }
        // Every step as it was sent, in order (rolled-back rows included:
        // the node signed them).
        let mut offset = 0;
        let steps: Vec<_> = stage
            .commitments
            .iter()
            .map(|c| {
                let (a, b) = (offset, offset + c.rows as usize * stage.dim);
                offset = b;
                (c.clone(), stage.inputs[a..b].to_vec(), stage.outputs[a..b].to_vec())
            })
            .collect();
        let mut evidence = Evidence::new(self.model.id, &self.model.name, stage.span, stage.dim, stage.node, &steps);
        evidence.audits = records;
        evidence.sign(self.network.key());
        let bytes = serde_json::to_vec_pretty(&evidence).unwrap_or_default();
        let path = self.config.evidence_dir.as_ref().map(|dir| dir.join(format!("{}-{}.json", stage.node, evidence.created_ms)));
        if let Some(path) = &path {
            if let Err(e) = hotpot_core::fsutil::write_atomic(path, &bytes) {
                tracing::error!(path = %path.display(), error = %e, "cannot write evidence of cheating; the conviction lives only in this process");
            }
        }
        tracing::warn!(
            peer = %stage.peer, blocks = %stage.span, evidence = ?path,
            "CHEAT: the node's signed outputs are not its blocks' function of their inputs; banned from routing"
        );
        let hash = lock(&self.evidence).insert(bytes);
        if let Some(market) = &self.market {
            let session = stage.commitments.first().map(|c| c.session);
            let penalty = market.punish(&stage.peer, &stage.node, session, &hotpot_core::hex(&hash));
            if let Some(path) = &path {
                let written = serde_json::to_vec_pretty(&penalty)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| hotpot_core::fsutil::write_atomic(&crate::market::penalty_path(path), &bytes));
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot write the penalty beside the evidence");
                }
            }
        }
        self.cosign(&stage.node, hash, true).await;
        // Counted once the evidence (and the penalty) are on disk, so
        // whoever reads the counter finds the files.
        self.metrics.cheats.inc();
        let conviction = Conviction { node: stage.node, span: stage.span, evidence: hash };
        lock(&self.convictions).insert(stage.peer, conviction);
        let file = path.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        self.activity.conviction(&stage.peer, stage.node, stage.span, "own audit", file);
        let accusation = conviction.accusation(self.model.id, &self.network.listen_addrs().await.unwrap_or_default());
        if let Err(e) = self.network.publish(cheats_topic(&self.model.id), accusation.encode()).await {
            tracing::debug!(error = %e, "could not gossip the accusation (no other gateway listening yet?)");
        }
    }

    /// With a market on a chain: signs the conviction of `node` on
    /// `evidence` (as its accuser, or as an auditor that confirmed it) and
    /// gossips the signature; the accuser slashes once the quorum signed.
    async fn cosign(&self, node: &NodeId, evidence: [u8; 32], accuser: bool) {
        let Some(onchain) = &self.onchain else { return };
        let Some(wallet) = onchain.wallet_of(&self.directory, node) else {
            tracing::warn!(%node, "the convicted node announced no verified wallet: nothing to slash on chain");
            return;
        };
        let Some(signature) = onchain.sign_conviction(wallet, &self.model.id, evidence, accuser) else { return };
        if let Err(e) = self.network.publish(cheats_topic(&self.model.id), signature.encode()).await {
            tracing::debug!(error = %e, "could not gossip a conviction signature (no other gateway listening yet?)");
        }
        lock(&self.cosigned).push(signature);
        if accuser {
            onchain.try_slash((wallet, evidence)).await;
        }
    }

    /// Gossips this gateway's accusations again every `accusations_every`,
    /// for as long as the gateway runs.
    fn repeat_accusations(self: &Arc<Self>) {
        let auditor = Arc::downgrade(self);
        let (network, model, every) = (self.network.clone(), self.model.id, self.config.accusations_every);
        let topic = cheats_topic(&model);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticks.tick().await;
                let Some(auditor) = auditor.upgrade() else { return };
                let convictions: Vec<Conviction> = lock(&auditor.convictions).values().copied().collect();
                let signatures = lock(&auditor.cosigned).clone();
                let onchain = auditor.onchain.clone();
                drop(auditor);
                // A slash the contract refused (this gateway not registered
                // yet, the chain unreachable) is tried again.
                if let Some(onchain) = onchain {
                    onchain.retry_slashes().await;
                }
                for signature in signatures {
                    let _ = network.publish(topic.clone(), signature.encode()).await;
                }
                if convictions.is_empty() {
                    continue;
                }
                let addrs = network.listen_addrs().await.unwrap_or_default();
                for conviction in convictions {
                    if let Err(e) = network.publish(topic.clone(), conviction.accusation(model, &addrs).encode()).await {
                        tracing::debug!(error = %e, "could not gossip an accusation again");
                    }
                }
            }
        });
    }

    /// Checks another gateway's accusation with an audit of our own.
    async fn on_accusation(&self, accuser: PeerId, accusation: Accusation) {
        tracing::debug!(%accuser, node = %accusation.node, "heard an accusation");
        let Some(peer) = peer_id_of(&accusation.node) else { return };
        // Only nodes this gateway might route through are worth an audit.
        let known = self.directory.with(|d| d.all().iter().any(|r| r.peer == peer) && !d.reputation(peer).cheat);
        if accusation.model != self.model.id || accuser == self.network.peer_id() || !known {
            return;
        }
        {
            let mut state = lock(&self.accusations);
            if state.false_accusers.contains(&accuser) {
                return;
            }
            // One check per accused node at a time, and a few a minute.
            if state.checking.contains(&peer) || !state.take_check(self.config.accusation_checks_per_minute) {
                tracing::debug!(%accuser, accused = %peer, "dropping an accusation: this node is being checked, or this minute's checks are spent");
                self.metrics.accusations.get_or_create(&ResultLabels { result: "dropped".into() }).inc();
                return;
            }
            state.checking.insert(peer);
        }
        let finding = match self.checks.acquire().await {
            Ok(_permit) => self.check_accusation(accuser, peer, &accusation).await,
            Err(_) => Finding::Unchecked("shutting down".into()),
        };
        lock(&self.accusations).checking.remove(&peer);
        let result = match &finding {
            Finding::Confirmed => {
                tracing::info!(%accuser, accused = %peer, "another gateway's accusation confirmed by our own audit");
                self.cosign(&accusation.node, accusation.evidence, false).await;
                "confirmed"
            }
            Finding::Rejected => {
                tracing::warn!(%accuser, accused = %peer, "an accusation was false: our audit of its evidence passed; ignoring that accuser");
                lock(&self.accusations).false_accusers.insert(accuser);
                "rejected"
            }
            Finding::Invalid(reason) => {
                tracing::warn!(%accuser, accused = %peer, %reason, "an accusation came with invalid evidence; ignoring that accuser");
                lock(&self.accusations).false_accusers.insert(accuser);
                "invalid"
            }
            Finding::Unchecked(reason) => {
                tracing::debug!(%accuser, accused = %peer, %reason, "could not check an accusation");
                "unchecked"
            }
        };
        self.metrics.accusations.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    async fn check_accusation(&self, accuser: PeerId, peer: PeerId, accusation: &Accusation) -> Finding {
        // Connect to the accuser first (gateways are not in the DHT).
        for addr in accusation.addrs.iter().take(4).filter_map(|a| a.parse::<hotpot_net::Multiaddr>().ok()) {
            if tokio::time::timeout(Duration::from_secs(10), self.network.dial(addr)).await.is_ok_and(|r| r.is_ok()) {
                break;
            }
        }
        let bytes = match self.fetch_evidence(accuser, accusation.evidence).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Finding::Invalid("the accuser does not have the evidence it announced".into()),
            Err(e) => return Finding::Unchecked(e.to_string()),
        };
        let stage = match self.transcript_of(accuser, peer, accusation, &bytes) {
            Ok(stage) => stage,
            Err(e) => return Finding::Invalid(e.to_string()),
        };
        match self.audit(stage).await {
            Verdict::Cheat => Finding::Confirmed,
            Verdict::Honest => Finding::Rejected,
            Verdict::Pending => Finding::Unchecked("no one could audit the evidence".into()),
        }
    }

    async fn fetch_evidence(&self, accuser: PeerId, hash: [u8; 32]) -> Result<Option<Vec<u8>>, AuditError> {
        let timeout = Duration::from_secs(60);
        let stream = self.network.open_stream(accuser, PROTOCOL_EVIDENCE, timeout).await?;
        let mut framed = Framed::new(accuser, stream);
        framed.send(&EvidenceMessage::Request { evidence: hash }.encode(), timeout).await?;
        let reply = framed.recv(timeout).await?.ok_or(AuditError::Protocol("the accuser closed the stream"))?;
        framed.close().await;
        match EvidenceMessage::decode(&reply)? {
            EvidenceMessage::Evidence { bytes } => Ok(bytes),
            _ => Err(AuditError::Protocol("unexpected answer to an evidence request")),
        }
    }

    /// The accused node's recorded work, if `bytes` are the announced
    /// evidence, signed by the accuser when signed at all, and every step
    /// of it carries the node's signature.
    fn transcript_of(&self, accuser: PeerId, peer: PeerId, accusation: &Accusation, bytes: &[u8]) -> Result<StageTranscript, AuditError> {
        if hotpot_core::hash(bytes) != accusation.evidence {
            return Err(AuditError::Protocol("the evidence does not hash to what was announced"));
        }
        let evidence: Evidence = serde_json::from_slice(bytes)?;
        if evidence.node != accusation.node || evidence.model != self.model.id || evidence.span != accusation.span {
            return Err(AuditError::Protocol("the evidence is about another node, model or span"));
        }
        if evidence.dim != self.model.dim || evidence.span.end() > self.model.n_blocks {
            return Err(AuditError::Protocol("the evidence does not fit the model"));
        }
        if let Some(signer) = evidence.check_accuser()?
            && peer_id_of(&signer) != Some(accuser)
        {
            return Err(AuditError::Protocol("the evidence is signed by another gateway than its accuser"));
        }
        let (inputs, outputs) = evidence.check_signatures()?;
        let commitments = evidence.steps.iter().map(|s| Commitment::try_from(&s.commitment)).collect::<Result<Vec<_>, _>>()?;
        Ok(StageTranscript { peer, node: evidence.node, span: evidence.span, dim: evidence.dim, inputs, outputs, commitments })
    }
}

/// The newest evidence file in `dir` about each node of `model`, among
/// those whose commitments the node really signed, with its bytes. A file
/// that cannot be read as evidence is reported (and left in place), never
/// skipped silently: a conviction may be in it.
fn read_convictions(dir: &std::path::Path, model: &ModelId) -> Vec<(Evidence, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut newest: HashMap<NodeId, (Evidence, Vec<u8>)> = HashMap::new();
    let evidence_file = |p: &std::path::Path| p.extension().is_some_and(|e| e == "json") && !p.to_string_lossy().ends_with(".penalty.json");
    for path in entries.flatten().map(|e| e.path()).filter(|p| evidence_file(p)) {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read an evidence file; the conviction in it is not restored");
                continue;
            }
        };
        match serde_json::from_slice::<Evidence>(&bytes) {
            Ok(evidence) if evidence.model == *model => match evidence.check_signatures() {
                Ok(_) => {
                    if newest.get(&evidence.node).is_none_or(|(kept, _)| kept.created_ms < evidence.created_ms) {
                        newest.insert(evidence.node, (evidence, bytes));
                    }
                }
                Err(e) => tracing::error!(path = %path.display(), error = %e, "an evidence file does not verify; its conviction is not restored"),
            },
            Ok(_) => {}
            Err(e) => tracing::error!(
                path = %path.display(), bytes = bytes.len(), error = %e,
                "an evidence file is damaged (half-written or truncated?); its conviction is not restored; the file is left in place"
            ),
        }
    }
    newest.into_values().collect()
}
