//! Hotpot's own CPU kernels: packed quantized matrices, their products, and
//! the per-token operations of a transformer block.

/// Defines `fn name(isa: Isa, args…)` that runs `body` compiled for the
/// instruction set `isa` names. The body is the same Rust code in every
/// variant and Rust never reassociates floating-point operations, so each
/// variant computes the same bits; only the vector width the compiler may
/// use differs.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::kernels::isa::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match isa.min($crate::kernels::isa::best()) {
                    // SAFETY: clamped to what this CPU was detected to support.
                    $crate::kernels::isa::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::kernels::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::isa::Isa::Scalar => {}
                }
            }
            let _ = isa;
            body($($arg),*)
        }
    };
}

mod aligned;
pub mod isa;
pub mod matrix;
pub mod ops;
pub mod pool;
pub mod quant;
mod scalar;
mod wide;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use aligned::Arena;
pub use aligned::AlignedBuf;
pub use isa::Isa;
pub use matrix::{ActivationBits, MatmulInput, Matrix, PANEL, WeightFormat, matmul};
pub use pool::CpuPool;

/// The kernel family in use on this CPU (reported with benchmark figures).
pub fn variant() -> &'static str {
    isa::selected().name()
}

/// Where kernels run: a thread pool and an instruction-set variant.
#[derive(Debug)]
pub struct Cpu {
    pub pool: CpuPool,
    pub isa: Isa,
}
