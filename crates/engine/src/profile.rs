//! Where the time of a forward pass goes, per kind of operation.
//!
//! Off by default (one relaxed atomic load per operation); `hotpot bench
//! --profile` turns it on and prints the breakdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The operations of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Embed,
    Norm,
    Quantize,
    MatmulQkv,
    Rope,
    Attention,
    MatmulOut,
    MatmulGateUp,
    Swiglu,
    MatmulDown,
    Residual,
    Head,
}

impl Phase {
    pub const ALL: [Phase; 12] = [
        Self::Embed,
        Self::Norm,
        Self::Quantize,
        Self::MatmulQkv,
        Self::Rope,
        Self::Attention,
        Self::MatmulOut,
        Self::MatmulGateUp,
        Self::Swiglu,
        Self::MatmulDown,
        Self::Residual,
        Self::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Embed => "embedding lookup",
            Self::Norm => "rms norm",
            Self::Quantize => "activation quantization",
            Self::MatmulQkv => "matmul q/k/v",
            Self::Rope => "rope + kv cache write",
            Self::Attention => "attention",
            Self::MatmulOut => "matmul attn out",
            Self::MatmulGateUp => "matmul gate/up",
            Self::Swiglu => "swiglu",
            Self::MatmulDown => "matmul down",
            Self::Residual => "residual adds",
            Self::Head => "head (norm + matmul)",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];

/// Starts (or stops) collecting; what was collected stays until [`take`].
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Time spent per phase since the last `enable`/`take`, which it clears.
pub fn take() -> Vec<(Phase, Duration)> {
    Phase::ALL.iter().map(|&p| (p, Duration::from_nanos(NANOS[p as usize].swap(0, Ordering::Relaxed)))).collect()
}

/// Runs `f`, charging its wall time to `phase` when profiling is on.
#[inline]
pub(crate) fn time<R>(phase: Phase, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let result = f();
    NANOS[phase as usize].fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    result
}
