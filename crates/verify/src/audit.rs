//! Deciding whether a node's outputs are what its span computes: the
//! comparison with a recomputation, the tolerance honest differences need,
//! the audit rate, and escalation from one failed audit to a verdict.

use serde::{Deserialize, Serialize};

use crate::sketch::SketchThresholds;

/// How far an honest recomputation may differ from a node's outputs.
///
/// Hotpot's CPU kernels give the same bits on every CPU, thread count and
/// kernel variant, so the calibrated tolerance on CPU is exactly zero; other
/// backends (GPUs) will need `max_relative > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Largest `|claimed − recomputed| / max(|recomputed| over the row)` accepted.
    pub max_relative: f32,
    pub sketch: SketchThresholds,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self { max_relative: 0.0, sketch: SketchThresholds::default() }
    }
}

/// A node's outputs against a recomputation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub positions: usize,
    pub identical: bool,
    pub max_abs: f32,
    /// Largest per-row relative difference (see [`Tolerance`]).
    pub max_relative: f32,
    /// First position that differs beyond the tolerance.
    pub first_bad: Option<usize>,
    pub pass: bool,
}

/// Compares `claimed` with `recomputed` (`rows × dim` each).
pub fn compare(claimed: &[f32], recomputed: &[f32], dim: usize, tolerance: &Tolerance) -> Comparison {
    let rows = recomputed.len() / dim.max(1);
    if claimed.len() != recomputed.len() || dim == 0 {
        return Comparison { positions: rows, identical: false, max_abs: f32::INFINITY, max_relative: f32::INFINITY, first_bad: Some(0), pass: false };
    }
    let mut identical = true;
    let (mut max_abs, mut max_relative) = (0.0f32, 0.0f32);
    let mut first_bad = None;
    for (r, (c, e)) in claimed.chunks_exact(dim).zip(recomputed.chunks_exact(dim)).enumerate() {
        let scale = e.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        let mut row_rel = 0.0f32;
        for (a, b) in c.iter().zip(e) {
            if a.to_bits() != b.to_bits() {
                identical = false;
            }
            let diff = if a.is_finite() { (a - b).abs() } else { f32::INFINITY };
            max_abs = max_abs.max(diff);
            row_rel = row_rel.max(diff / scale);
        }
        max_relative = max_relative.max(row_rel);
        if first_bad.is_none() && !identical && row_rel > tolerance.max_relative {
            first_bad = Some(r);
        }
    }
    let pass = identical || max_relative <= tolerance.max_relative;
    Comparison { positions: rows, identical, max_abs, max_relative, first_bad: if pass { None } else { first_bad.or(Some(0)) }, pass }
}

/// When the gateway audits a session.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AuditPolicy {
    /// Share of sessions audited once a node is known.
    pub rate: f64,
    /// A node's first sessions are all audited.
    pub probation: u32,
    /// Independent re-audits after a failed one; a majority of failures
    /// (counting the first) makes the node a cheat.
    pub escalation: u32,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        Self { rate: 0.05, probation: 20, escalation: 2 }
    }
}

impl AuditPolicy {
    /// Whether to audit a session of a node that has passed `history`
    /// audited sessions so far; `draw` is uniform in `[0, 1)`.
    pub fn should_audit(&self, history: &Reputation, draw: f64) -> bool {
        if history.cheat {
            return false;
        }
        history.sessions < u64::from(self.probation) || draw < self.rate * (1.0 + f64::from(history.failed_audits.min(10) as u32))
    }

    /// The verdict once the re-audits are in: `results` holds every audit
    /// of the suspicious work (true = passed), the first one included.
    pub fn verdict(&self, results: &[bool]) -> Verdict {
        match results.first() {
            None => return Verdict::Pending,
            Some(true) => return Verdict::Honest,
            Some(false) => {}
        }
        let failures = results.iter().filter(|ok| !**ok).count();
        let needed = (self.escalation as usize).div_ceil(2) + 1;
        if failures >= needed {
            Verdict::Cheat
        } else if results.len() < self.escalation as usize + 1 {
            Verdict::Pending
        } else {
            Verdict::Honest
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Honest,
    Cheat,
    /// More audits needed.
    Pending,
}

/// What the gateway remembers about a node's audits (feeds routing and
/// the audit rate).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reputation {
    pub sessions: u64,
    pub audits: u64,
    pub failed_audits: u64,
    pub cheat: bool,
}

impl Reputation {
    /// A routing penalty factor: 1 for a clean record, growing with failures.
    pub fn penalty(&self) -> f64 {
        if self.cheat { f64::INFINITY } else { 1.0 + self.failed_audits as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_tolerant_comparisons() {
        let a = vec![1.0f32, -2.0, 3.0, 0.5];
        let t = Tolerance::default();
        let same = compare(&a, &a, 2, &t);
        assert!(same.identical && same.pass && same.first_bad.is_none());
        let mut b = a.clone();
        b[3] = 0.5000001;
        let off = compare(&b, &a, 2, &t);
        assert!(!off.pass && off.first_bad == Some(1), "{off:?}");
        let loose = Tolerance { max_relative: 1e-3, ..t };
        assert!(compare(&b, &a, 2, &loose).pass);
        assert!(!compare(&a[..2], &a, 2, &t).pass, "shape mismatch fails");
        let nan = vec![f32::NAN, -2.0, 3.0, 0.5];
        assert!(!compare(&nan, &a, 2, &loose).pass);
    }

    #[test]
    fn policy_and_escalation() {
        let p = AuditPolicy::default();
        let new = Reputation::default();
        assert!(p.should_audit(&new, 0.99), "probation audits everything");
        let known = Reputation { sessions: 100, audits: 25, ..Default::default() };
        assert!(p.should_audit(&known, 0.01) && !p.should_audit(&known, 0.5));
        assert_eq!(p.verdict(&[true]), Verdict::Honest);
        assert_eq!(p.verdict(&[false]), Verdict::Pending);
        assert_eq!(p.verdict(&[false, true]), Verdict::Pending);
        assert_eq!(p.verdict(&[false, true, true]), Verdict::Honest);
        assert_eq!(p.verdict(&[false, false]), Verdict::Cheat);
        assert_eq!(p.verdict(&[false, true, false]), Verdict::Cheat);
        assert!(!p.should_audit(&Reputation { cheat: true, ..Default::default() }, 0.0));
    }
}
