//! Hotpot's own CPU kernels: packed quantized matrices, their products, and
//! the per-token operations of a transformer block.

mod aligned;
pub mod matrix;
pub mod ops;
pub mod pool;
pub mod quant;

pub use matrix::{Matrix, MatmulInput, PANEL, WeightFormat, matmul};
pub use pool::CpuPool;

/// The kernel family in use on this CPU (reported with benchmark figures).
pub fn variant() -> &'static str {
    "scalar"
}
