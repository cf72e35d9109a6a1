//! Evidence that a node cheated: its own signed commitments, the inputs it
//! was given and the outputs it returned (whose hashes it signed), and what
//! the auditors recomputed. Anyone with the model can re-check it: the
//! signatures and hashes tie the outputs to the node, and one prefill over
//! the inputs shows whether they are the span's function of the inputs.

use data_encoding::{BASE64, HEXLOWER};
use hotpot_core::{Commitment, LayerSpan, ModelId, NodeId, SessionId, Signature, StepRecord};
use serde::{Deserialize, Serialize};

use crate::audit::{Comparison, Tolerance, compare};

/// Why an executor could not recompute a span.
pub type ExecutorError = Box<dyn std::error::Error + Send + Sync>;

/// Something that can recompute a span over given inputs (the node crate
/// and the gateway implement it with the engine).
pub trait Executor {
    /// Outputs of blocks `span` for `rows` input rows, positions `0..rows`.
    fn recompute(&self, span: LayerSpan, inputs: &[f32], rows: usize) -> Result<Vec<f32>, ExecutorError>;
}

/// A commitment in JSON-friendly form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitmentRecord {
    pub session: String,
    pub model: ModelId,
    pub span: LayerSpan,
    pub start_pos: u32,
    pub rows: u32,
    pub input_hash: String,
    pub output_hash: String,
    pub node: NodeId,
    pub sketches: Vec<String>,
    pub signature: String,
}

impl From<&Commitment> for CommitmentRecord {
    fn from(c: &Commitment) -> Self {
        Self {
            session: HEXLOWER.encode(&c.session.0),
            model: c.model,
            span: c.span,
            start_pos: c.start_pos,
            rows: c.rows,
            input_hash: HEXLOWER.encode(&c.input_hash),
            output_hash: HEXLOWER.encode(&c.output_hash),
            node: c.node,
            sketches: c.sketches.iter().map(|s| HEXLOWER.encode(s)).collect(),
            signature: HEXLOWER.encode(&c.signature.0),
        }
    }
}

impl TryFrom<&CommitmentRecord> for Commitment {
    type Error = EvidenceError;

    fn try_from(r: &CommitmentRecord) -> Result<Self, EvidenceError> {
        fn fixed<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], EvidenceError> {
            let bytes = HEXLOWER.decode(text.as_bytes()).map_err(|_| EvidenceError::Malformed(what))?;
            bytes.try_into().map_err(|_| EvidenceError::Malformed(what))
        }
        Ok(Commitment {
            session: SessionId(fixed(&r.session, "session")?),
            model: r.model,
            span: r.span,
            start_pos: r.start_pos,
            rows: r.rows,
            input_hash: fixed(&r.input_hash, "input hash")?,
            output_hash: fixed(&r.output_hash, "output hash")?,
            node: r.node,
            sketches: r.sketches.iter().map(|s| HEXLOWER.decode(s.as_bytes()).map_err(|_| EvidenceError::Malformed("sketch"))).collect::<Result<_, _>>()?,
            signature: Signature(fixed(&r.signature, "signature")?),
        })
    }
}

/// One step of the audited session, as the node signed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceStep {
    pub commitment: CommitmentRecord,
    /// The step's input rows, f32 little-endian, base64.
    pub input: String,
    /// The step's output rows as the node returned them.
    pub output: String,
}

/// One auditor's recomputation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub executor: String,
    pub comparison: Comparison,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub version: u32,
    pub model: ModelId,
    pub model_name: String,
    pub span: LayerSpan,
    pub dim: usize,
    pub node: NodeId,
    pub steps: Vec<EvidenceStep>,
    pub audits: Vec<AuditRecord>,
    pub created_ms: u64,
    /// The gateway that wrote the evidence and accuses the node, with its
    /// signature over everything else in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuser: Option<Accuser>,
}

/// Who accuses: a gateway's key and its signature of the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accuser {
    pub gateway: NodeId,
    /// Hex ed25519 signature of [`Evidence::accused_bytes`].
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    #[error("malformed evidence: bad {0}")]
    Malformed(&'static str),
    #[error("unsupported evidence version {0}")]
    Version(u32),
    #[error("step {step}: {reason}")]
    Step { step: usize, reason: String },
    #[error("the accuser's signature does not verify for gateway {0}")]
    Accuser(NodeId),
    #[error("recomputing the span failed: {0}")]
    Executor(String),
}

/// What re-checking evidence concluded.
#[derive(Debug, Clone, PartialEq)]
pub struct EvidenceVerdict {
    pub signatures_valid: bool,
    pub comparison: Comparison,
    /// The node signed outputs that are not its span's function of the inputs.
    pub cheat: bool,
}

pub const EVIDENCE_VERSION: u32 = 1;

fn floats_to_base64(values: &[f32]) -> String {
    BASE64.encode(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
}

fn base64_to_bytes(text: &str, what: &'static str) -> Result<Vec<u8>, EvidenceError> {
    BASE64.decode(text.as_bytes()).map_err(|_| EvidenceError::Malformed(what))
}

fn bytes_to_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

impl Evidence {
    /// Evidence from a session's steps: `(commitment, input rows, output rows)`.
    pub fn new(model: ModelId, model_name: &str, span: LayerSpan, dim: usize, node: NodeId, steps: &[(Commitment, Vec<f32>, Vec<f32>)]) -> Self {
        Self {
            version: EVIDENCE_VERSION,
            model,
            model_name: model_name.to_string(),
            span,
            dim,
            node,
            steps: steps
                .iter()
                .map(|(c, input, output)| EvidenceStep {
                    commitment: CommitmentRecord::from(c),
                    input: floats_to_base64(input),
                    output: floats_to_base64(output),
                })
                .collect(),
            audits: Vec::new(),
            created_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            accuser: None,
        }
    }

    /// What an accuser signs: a domain tag and the hash of the evidence
    /// without its accuser.
    pub fn accused_bytes(&self) -> Vec<u8> {
        let unsigned = Self { accuser: None, ..self.clone() };
        let json = serde_json::to_vec(&unsigned).unwrap_or_default();
        let mut bytes = b"hotpot-evidence/1\0".to_vec();
        bytes.extend_from_slice(blake3::hash(&json).as_bytes());
        bytes
    }

    /// Signs the evidence as the gateway holding `key`.
    pub fn sign(&mut self, key: &hotpot_core::NodeKey) {
        let signature = key.sign(&self.accused_bytes());
        self.accuser = Some(Accuser { gateway: key.id(), signature: HEXLOWER.encode(&signature.0) });
    }

    /// The gateway that signed the evidence (`None`: unsigned), or an
    /// error when the signature does not verify.
    pub fn check_accuser(&self) -> Result<Option<NodeId>, EvidenceError> {
        let Some(accuser) = &self.accuser else { return Ok(None) };
        let bytes = HEXLOWER.decode(accuser.signature.as_bytes()).map_err(|_| EvidenceError::Malformed("accuser signature"))?;
        let signature = Signature(bytes.try_into().map_err(|_| EvidenceError::Malformed("accuser signature"))?);
        accuser.gateway.verify(&self.accused_bytes(), &signature).map_err(|_| EvidenceError::Accuser(accuser.gateway))?;
        Ok(Some(accuser.gateway))
    }

    /// Checks that every step is signed by the node, starts at or before
    /// the end of the one before (earlier: a rollback), and that the
    /// recorded bytes are what it signed. Returns every step's inputs and
    /// outputs, concatenated in order.
    pub fn check_signatures(&self) -> Result<(Vec<f32>, Vec<f32>), EvidenceError> {
        if self.version != EVIDENCE_VERSION {
            return Err(EvidenceError::Version(self.version));
        }
        let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
        let mut next = 0u32;
        for (i, step) in self.steps.iter().enumerate() {
            let bad = |reason: String| EvidenceError::Step { step: i, reason };
            let c = Commitment::try_from(&step.commitment)?;
            let input = base64_to_bytes(&step.input, "input")?;
            let output = base64_to_bytes(&step.output, "output")?;
            if c.model != self.model || c.span != self.span {
                return Err(bad("signed for another model or span".into()));
            }
            // Steps spliced from different sessions would recompute
            // differently even for an honest node.
            if let Some(first) = self.steps.first()
                && step.commitment.session != first.commitment.session
            {
                return Err(bad("belongs to another session".into()));
            }
            if c.start_pos > next {
                return Err(bad(format!("starts at position {}, after the end of the steps before ({next})", c.start_pos)));
            }
            if input.len() != c.rows as usize * self.dim * 4 || output.len() != input.len() {
                return Err(bad("tensor sizes do not match the signed row count".into()));
            }
            let record = StepRecord { session: c.session, model: c.model, span: c.span, start_pos: c.start_pos, rows: c.rows, input: &input, output: &output };
            c.check(self.node, record).map_err(|e| bad(e.to_string()))?;
            next = c.start_pos + c.rows;
            inputs.extend(bytes_to_floats(&input));
            outputs.extend(bytes_to_floats(&output));
        }
        Ok((inputs, outputs))
    }

    /// Re-checks everything with `executor`'s recomputation.
    pub fn verify(&self, executor: &dyn Executor, tolerance: &Tolerance) -> Result<EvidenceVerdict, EvidenceError> {
        let (inputs, outputs) = self.check_signatures()?;
        let steps: Vec<(u32, u32)> = self.steps.iter().map(|s| (s.commitment.start_pos, s.commitment.rows)).collect();
        let kept = Kept::of(&steps, &inputs, &outputs, self.dim).map_err(|_| EvidenceError::Malformed("steps"))?;
        let recomputed = executor.recompute(self.span, &kept.inputs, kept.positions()).map_err(|e| EvidenceError::Executor(e.to_string()))?;
        let comparison = compare(&kept.outputs, &recomputed, self.dim, tolerance);
        Ok(EvidenceVerdict { signatures_valid: true, cheat: !comparison.pass, comparison })
    }
}

/// The positions a session's steps left in place. A step may start before
/// the previous one ended: the gateway rolled the node back (speculative
/// drafts refused) and the step overwrote those positions. What stays at
/// each position — its input and what the node returned — is what every
/// kept output was computed from, and what an audit recomputes in one
/// prefill; an overwritten row decided nothing (a refused draft's row is
/// never read), so it needs no check.
#[derive(Debug, Clone, PartialEq)]
pub struct Kept {
    pub inputs: Vec<f32>,
    pub outputs: Vec<f32>,
    /// The index of the step that last wrote each position.
    pub writer: Vec<usize>,
    dim: usize,
}

impl Kept {
    /// `steps` are (start position, rows) in order; `inputs` and `outputs`
    /// their rows concatenated. Fails when the sizes disagree or a step
    /// starts past the end of what is kept.
    pub fn of(steps: &[(u32, u32)], inputs: &[f32], outputs: &[f32], dim: usize) -> Result<Self, String> {
        let total: usize = steps.iter().map(|&(_, rows)| rows as usize).sum();
        if dim == 0 || inputs.len() != total * dim || outputs.len() != inputs.len() {
            return Err(format!("{} input and {} output values for {total} rows of {dim}", inputs.len(), outputs.len()));
        }
        let mut kept = Self { inputs: Vec::with_capacity(inputs.len()), outputs: Vec::with_capacity(outputs.len()), writer: Vec::new(), dim };
        let mut offset = 0;
        for (i, &(start, rows)) in steps.iter().enumerate() {
            let (start, rows) = (start as usize, rows as usize);
            if start > kept.writer.len() {
                return Err(format!("step {i} starts at {start}, past the {} positions kept", kept.writer.len()));
            }
            kept.inputs.truncate(start * dim);
            kept.outputs.truncate(start * dim);
            kept.writer.truncate(start);
            kept.inputs.extend_from_slice(&inputs[offset * dim..(offset + rows) * dim]);
            kept.outputs.extend_from_slice(&outputs[offset * dim..(offset + rows) * dim]);
            kept.writer.extend(std::iter::repeat_n(i, rows));
            offset += rows;
        }
        Ok(kept)
    }

    pub fn positions(&self) -> usize {
        self.writer.len()
    }

    /// Whether positions `start .. start + rows` still hold what step
    /// `step` saw there (no later step overwrote them).
    pub fn unchanged_since(&self, step: usize, start: usize, rows: usize) -> bool {
        self.writer.get(start..start + rows).is_some_and(|w| w.iter().all(|&writer| writer <= step))
    }

    /// The kept rows `start .. start + rows` of `values` (position-indexed).
    pub fn rows<'a>(&self, values: &'a [f32], start: usize, rows: usize) -> &'a [f32] {
        &values[start * self.dim..(start + rows) * self.dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotpot_core::NodeKey;

    #[test]
    fn rolled_back_rows_are_overwritten() {
        // Step 0: positions 0..3; step 1: 3..6 (drafts); step 2 rolls back to 4.
        let steps = [(0, 3), (3, 3), (4, 2)];
        let inputs: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let outputs: Vec<f32> = inputs.iter().map(|v| v * 10.0).collect();
        let kept = Kept::of(&steps, &inputs, &outputs, 1).expect("fits");
        assert_eq!(kept.inputs, vec![0.0, 1.0, 2.0, 3.0, 6.0, 7.0]);
        assert_eq!(kept.outputs, vec![0.0, 10.0, 20.0, 30.0, 60.0, 70.0]);
        assert_eq!(kept.writer, vec![0, 0, 0, 1, 2, 2]);
        assert!(kept.unchanged_since(1, 0, 4));
        assert!(!kept.unchanged_since(1, 3, 3), "step 1's rows 4 and 5 were overwritten");
        assert!(Kept::of(&[(0, 1), (3, 1)], &[0.0, 1.0], &[0.0, 1.0], 1).is_err(), "a gap");
        assert!(Kept::of(&[(0, 2)], &[0.0], &[0.0], 1).is_err(), "short");
    }

    #[test]
    fn an_accuser_signs_the_evidence_and_any_change_breaks_it() {
        let key = NodeKey::generate();
        let (model, span, steps) = session_steps(&key, Some(1));
        let mut evidence = Evidence::new(model, "m", span, 2, key.id(), &steps);
        assert_eq!(evidence.check_accuser(), Ok(None));
        let gateway = NodeKey::generate();
        evidence.sign(&gateway);
        let text = serde_json::to_string(&evidence).expect("serializes");
        let read: Evidence = serde_json::from_str(&text).expect("parses");
        assert_eq!(read.check_accuser(), Ok(Some(gateway.id())));
        let mut changed = read.clone();
        changed.created_ms += 1;
        assert_eq!(changed.check_accuser(), Err(EvidenceError::Accuser(gateway.id())));
        let mut impostor = read;
        impostor.accuser.as_mut().expect("signed").gateway = NodeKey::generate().id();
        assert!(impostor.check_accuser().is_err());
    }

    /// Doubles its inputs: a stand-in span.
    struct Doubler;
    impl Executor for Doubler {
        fn recompute(&self, _: LayerSpan, inputs: &[f32], _: usize) -> Result<Vec<f32>, ExecutorError> {
            Ok(inputs.iter().map(|v| v * 2.0).collect())
        }
    }

    /// A signed step with its input and output rows.
    type Step = (Commitment, Vec<f32>, Vec<f32>);

    fn session_steps(key: &NodeKey, lie_at: Option<usize>) -> (ModelId, LayerSpan, Vec<Step>) {
        let (model, span, session) = (ModelId::from_bytes([2; 32]), LayerSpan::new(0, 4).expect("span"), SessionId([1; 16]));
        let mut steps = Vec::new();
        let mut pos = 0;
        for (i, rows) in [3usize, 1, 1].into_iter().enumerate() {
            let input: Vec<f32> = (0..rows * 2).map(|j| (i * 10 + j) as f32).collect();
            let mut output: Vec<f32> = input.iter().map(|v| v * 2.0).collect();
            if lie_at == Some(i) {
                output[0] += 0.5;
            }
            let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let (ib, ob) = (bytes(&input), bytes(&output));
            let record = StepRecord { session, model, span, start_pos: pos, rows: rows as u32, input: &ib, output: &ob };
            steps.push((Commitment::sign(key, record, vec![]), input, output));
            pos += rows as u32;
        }
        (model, span, steps)
    }

    #[test]
    fn evidence_round_trips_and_convicts_only_liars() {
        let key = NodeKey::generate();
        let (model, span, honest) = session_steps(&key, None);
        let e = Evidence::new(model, "m", span, 2, key.id(), &honest);
        let json = serde_json::to_string(&e).expect("serializes");
        let back: Evidence = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, e);
        let verdict = back.verify(&Doubler, &Tolerance::default()).expect("checks");
        assert!(verdict.signatures_valid && !verdict.cheat);

        let (_, _, lying) = session_steps(&key, Some(1));
        let verdict = Evidence::new(model, "m", span, 2, key.id(), &lying).verify(&Doubler, &Tolerance::default()).expect("checks");
        assert!(verdict.cheat && verdict.comparison.first_bad == Some(3), "{verdict:?}");
    }

    #[test]
    fn tampered_evidence_is_refused() {
        let key = NodeKey::generate();
        let (model, span, steps) = session_steps(&key, Some(0));
        let mut e = Evidence::new(model, "m", span, 2, key.id(), &steps);
        // An accuser who edits the outputs breaks the node's signature.
        e.steps[0].output = floats_to_base64(&[0.0; 6]);
        assert!(matches!(e.check_signatures(), Err(EvidenceError::Step { step: 0, .. })));
        let mut other = Evidence::new(model, "m", span, 2, NodeKey::generate().id(), &steps);
        assert!(other.check_signatures().is_err(), "signed by someone else");
        other.node = key.id();
        other.steps.swap(1, 2);
        assert!(other.check_signatures().is_err(), "steps out of order");
    }

    #[test]
    fn steps_spliced_from_another_session_are_refused() {
        // Honest steps of two sessions, at contiguous positions: recomputing
        // them as one session would convict an honest node.
        let key = NodeKey::generate();
        let (model, span, mut steps) = session_steps(&key, None);
        let (c, input, output) = steps.pop().expect("a step");
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ib, ob) = (bytes(&input), bytes(&output));
        let record = StepRecord { session: SessionId([7; 16]), model, span, start_pos: c.start_pos, rows: c.rows, input: &ib, output: &ob };
        steps.push((Commitment::sign(&key, record, vec![]), input, output));
        let e = Evidence::new(model, "m", span, 2, key.id(), &steps);
        assert!(matches!(e.check_signatures(), Err(EvidenceError::Step { step: 2, .. })), "{:?}", e.check_signatures());
    }
}
