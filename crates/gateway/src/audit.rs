//! Audits: after a session ends, a share of each node's work is recomputed
//! by someone else — another node serving the same blocks, or the gateway's
//! own engine — in one prefill, and compared with what the node returned
//! and signed. A failed audit is repeated by other executors; a majority of
//! failures marks the node as a cheat, bans it from routing, and stores
//! evidence that anyone holding the model can re-check (`hotpot verify`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotpot_core::LayerSpan;
use hotpot_engine::{Device, HiddenStates, ModelFile, Span};
use hotpot_net::{Framed, Network, PeerId};
use hotpot_verify::{AuditPolicy, AuditRecord, Evidence, Executor, Sketch, Tolerance, Verdict, compare};
use hotpot_wire::{ClientMessage, DType, NodeMessage, PROTOCOL_AUDIT, Tensor};
use rand::Rng;

use crate::chain::StageTranscript;
use crate::directory::SharedDirectory;
use crate::metrics::{AuditLabels, Metrics};
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
}

/// The whole model loaded locally: recomputes any span.
pub struct LocalExecutor {
    span: Span,
}

impl LocalExecutor {
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, String> {
        let file = ModelFile::open(path).map_err(|e| e.to_string())?;
        let span = Span::load(&file, file.config().full_span(), device).map_err(|e| e.to_string())?;
        Ok(Self { span })
    }
}

impl Executor for LocalExecutor {
    fn recompute(&self, span: LayerSpan, inputs: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let dim = self.span.config().dim;
        let hidden = HiddenStates::new(rows, dim, inputs.to_vec()).map_err(|e| e.to_string())?;
        let mut cache = self.span.cache_for(span, rows).map_err(|e| e.to_string())?;
        self.span.forward(&mut cache, &hidden, 0).map(HiddenStates::into_vec).map_err(|e| e.to_string())
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

pub struct Auditor {
    network: Network,
    directory: SharedDirectory,
    model: ServedModel,
    config: AuditConfig,
    local: Mutex<Option<Arc<LocalExecutor>>>,
    metrics: Arc<Metrics>,
}

impl Auditor {
    pub fn new(network: Network, directory: SharedDirectory, model: ServedModel, config: AuditConfig, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { network, directory, model, config, local: Mutex::new(None), metrics })
    }

    /// Decides which of a finished session's stages to audit, and starts
    /// those audits in the background.
    pub fn after_session(self: &Arc<Self>, transcript: Vec<StageTranscript>) {
        for stage in transcript.into_iter().filter(|s| !s.inputs.is_empty()) {
            let draw = rand::rng().random::<f64>();
            let audit = self.directory.with(|d| {
                let reputation = d.reputation(stage.peer);
                let audit = self.config.policy.should_audit(reputation, draw);
                reputation.sessions += 1;
                audit
            });
            if audit {
                let auditor = Arc::clone(self);
                tokio::spawn(async move { auditor.audit(stage).await });
            }
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

    async fn local(&self) -> Result<Arc<LocalExecutor>, String> {
        if let Some(local) = self.local.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(Arc::clone(local));
        }
        let path = self.config.local_model.clone().ok_or("no local model")?;
        let device = match &self.config.device {
            Some(device) => device.clone(),
            None => Device::cpu(0).map_err(|e| e.to_string())?,
        };
        let loaded = tokio::task::spawn_blocking(move || LocalExecutor::load(&path, &device)).await.map_err(|e| e.to_string())??;
        let loaded = Arc::new(loaded);
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&loaded));
        Ok(loaded)
    }

    async fn recompute(&self, executor: ExecutorChoice, stage: &StageTranscript) -> Result<Vec<f32>, String> {
        let rows = stage.inputs.len() / stage.dim;
        match executor {
            ExecutorChoice::Local => {
                let local = self.local().await?;
                let (span, inputs) = (stage.span, stage.inputs.clone());
                tokio::task::spawn_blocking(move || local.recompute(span, &inputs, rows)).await.map_err(|e| e.to_string())?
            }
            ExecutorChoice::Node(peer) => {
                let timeout = Duration::from_secs(30) + Duration::from_millis(20) * rows as u32;
                let stream = self.network.open_stream(peer, PROTOCOL_AUDIT, timeout).await.map_err(|e| e.to_string())?;
                let mut framed = Framed::new(peer, stream);
                let inputs = Tensor::from_f32(DType::F32, rows, stage.dim, &stage.inputs);
                let request = ClientMessage::Audit { model: self.model.id, span: stage.span, inputs };
                framed.send(&request.encode(), timeout).await.map_err(|e| e.to_string())?;
                let reply = framed.recv(timeout).await.map_err(|e| e.to_string())?.ok_or("the auditor closed the stream")?;
                framed.close().await;
                match NodeMessage::decode(&reply).map_err(|e| e.to_string())? {
                    NodeMessage::Audited { outputs } if outputs.rows() == rows && outputs.cols() == stage.dim => Ok(outputs.to_f32()),
                    NodeMessage::Error { message, .. } => Err(message),
                    other => Err(format!("unexpected answer to an audit: {other:?}")),
                }
            }
        }
    }

    /// Whether every sketch the node committed agrees with `recomputed`.
    fn sketches_agree(&self, stage: &StageTranscript, recomputed: &[f32]) -> bool {
        let rows = recomputed.len() / stage.dim;
        stage.commitments.iter().flat_map(|c| &c.sketches).all(|bytes| {
            let Some(sketch) = Sketch::from_bytes(bytes) else {
                return false;
            };
            let (start, end) = (sketch.start as usize, (sketch.start + sketch.rows) as usize);
            end <= rows && sketch.check(&recomputed[start * stage.dim..end * stage.dim]).passes(&self.config.tolerance.sketch)
        })
    }

    async fn audit(&self, stage: StageTranscript) {
        let executors = self.executors(&stage);
        if executors.is_empty() {
            tracing::debug!(peer = %stage.peer, blocks = %stage.span, "no one can audit these blocks");
            return;
        }
        let mut results = Vec::new();
        let mut records = Vec::new();
        let mut verdict = Verdict::Pending;
        for attempt in 0..(executors.len() + self.config.policy.escalation as usize + 1) * 2 {
            let executor = executors[attempt % executors.len()];
            let recomputed = match self.recompute(executor, &stage).await {
                Ok(values) => values,
                Err(e) => {
                    tracing::debug!(executor = %executor.name(), error = %e, "an audit executor failed");
                    continue;
                }
            };
            let comparison = compare(&stage.outputs, &recomputed, stage.dim, &self.config.tolerance);
            let pass = comparison.pass && self.sketches_agree(&stage, &recomputed);
            results.push(pass);
            records.push(AuditRecord { executor: executor.name(), comparison });
            verdict = self.config.policy.verdict(&results);
            if verdict != Verdict::Pending {
                break;
            }
        }
        let Some(&first) = results.first() else {
            return;
        };
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
            Verdict::Cheat => self.convict(&stage, records),
            Verdict::Honest if !first => {
                tracing::warn!(peer = %stage.peer, "a failed audit was not confirmed by re-audits")
            }
            _ => {}
        }
    }

    fn convict(&self, stage: &StageTranscript, records: Vec<AuditRecord>) {
        if !self.config.keep_cheats {
            self.directory.with(|d| d.mark_cheat(stage.peer));
        }
        self.metrics.cheats.inc();
        let steps: Vec<_> = stage
            .commitments
            .iter()
            .map(|c| {
                let (a, b) = (c.start_pos as usize * stage.dim, (c.start_pos + c.rows) as usize * stage.dim);
                (c.clone(), stage.inputs[a..b].to_vec(), stage.outputs[a..b].to_vec())
            })
            .collect();
        let mut evidence = Evidence::new(self.model.id, &self.model.name, stage.span, stage.dim, stage.node, &steps);
        evidence.audits = records;
        let path = self.config.evidence_dir.as_ref().map(|dir| dir.join(format!("{}-{}.json", stage.node, evidence.created_ms)));
        if let Some(path) = &path {
            let written = std::fs::create_dir_all(path.parent().unwrap_or(path))
                .and_then(|()| std::fs::write(path, serde_json::to_vec_pretty(&evidence).unwrap_or_default()));
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot write evidence");
            }
        }
        tracing::warn!(
            peer = %stage.peer, blocks = %stage.span, evidence = ?path,
            "CHEAT: the node's signed outputs are not its blocks' function of their inputs; banned from routing"
        );
    }
}
