//! Which instruction set the kernels use, chosen once per process.
//!
//! Every variant computes the same bits (see `matrix`), so the choice only
//! changes speed. `HOTPOT_KERNELS=scalar|avx2|avx512` forces one, for tests
//! and for the calibration of honest differences.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// AVX2 + FMA + F16C: 8 rows per instruction (`vpmaddwd`).
    Avx2,
    /// AVX-512 F/BW/VNNI: 16 rows per instruction (`vpdpwssd`).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The best variant this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
            {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every variant this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        let best = best();
        [Self::Scalar, Self::Avx2, Self::Avx512].into_iter().filter(|isa| *isa <= best).collect()
    }
}

static SELECTED: OnceLock<Isa> = OnceLock::new();
static BEST: OnceLock<Isa> = OnceLock::new();

/// The best variant this CPU runs, detected once. Kernels clamp any
/// requested variant to it, so asking for too much is never unsound.
pub fn best() -> Isa {
    *BEST.get_or_init(Isa::detect)
}

/// The variant in use: `HOTPOT_KERNELS` if set and supported, else the best.
pub fn selected() -> Isa {
    *SELECTED.get_or_init(|| {
        let best = best();
        match std::env::var("HOTPOT_KERNELS").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if best >= Isa::Avx2 => Isa::Avx2,
            Ok("avx512") if best >= Isa::Avx512 => Isa::Avx512,
            Ok(other) if !other.is_empty() => {
                tracing::warn!(requested = other, using = best.name(), "HOTPOT_KERNELS names a variant this CPU lacks");
                best
            }
            _ => best,
        }
    })
}
