//! The portable kernels: the reference every SIMD variant must match bit
//! for bit. Integer sums are exact; the float steps per block and lane are
//! fixed (see [`block_step`]) and run in block order. `mul_add` is a fused
//! multiply-add everywhere (in software where the CPU has none), so the
//! SIMD variants' `vfmadd` matches it.

use half::f16;

use super::matrix::{PANEL, Tile, WeightFormat, unpack_q8, unpack_wide};
use super::quant::{ActivationQuant, QK, QuantizedRows};

/// # Safety
/// `tile.out` must be valid as `Tile::store` requires.
pub(crate) unsafe fn tile(tile: &Tile) {
    for t in tile.t0..tile.t0 + tile.nt {
        let acc = match tile.format {
            WeightFormat::F32 => f32_panel(tile, t),
            _ => quant_panel(tile, t),
        };
        unsafe { tile.store(t - tile.t0, &acc) };
    }
}

fn f32_panel(tile: &Tile, t: usize) -> [f32; PANEL] {
    let x = &tile.x.values[t * tile.cols..][..tile.cols];
    let mut acc = [0.0f32; PANEL];
    for (k, &xk) in x.iter().enumerate() {
        let w = &tile.panel[k * PANEL * 4..][..PANEL * 4];
        for (r, a) in acc.iter_mut().enumerate() {
            let wr = f32::from_le_bytes([w[4 * r], w[4 * r + 1], w[4 * r + 2], w[4 * r + 3]]);
            *a = wr.mul_add(xk, *a);
        }
    }
    acc
}

/// The integer dot products of one block and row: over the first and the
/// last 16 columns (Q6_K scales them separately; the others add them).
#[derive(Clone, Copy)]
pub(crate) struct BlockSums {
    pub first: i32,
    pub last: i32,
}

impl BlockSums {
    pub fn total(self) -> i32 {
        self.first + self.last
    }
}

/// The scales of one block and row, read from the panel.
#[derive(Clone, Copy)]
pub(crate) struct BlockScales {
    /// f16 `d` (and `m`) per block, or per superblock for K-quants.
    pub d: f32,
    pub m: f32,
    /// K-quant byte scales of the block (scale and min, or Q6_K's two halves).
    pub bytes: [u8; 2],
}

/// One block's contribution to one output: the float steps every variant
/// performs, in this order. `xd`, `xs`, `xsum` are the activation block's
/// scale, `scale · Σq` and `Σq`.
#[inline(always)]
pub(crate) fn block_step(format: WeightFormat, acc: f32, sums: BlockSums, w: BlockScales, xd: f32, xs: f32, xsum: i32) -> f32 {
    match format {
        WeightFormat::Q4_0 => (w.d * xd).mul_add((sums.total() - 8 * xsum) as f32, acc),
        WeightFormat::Q5_0 => (w.d * xd).mul_add((sums.total() - 16 * xsum) as f32, acc),
        WeightFormat::Q4_1 => w.m.mul_add(xs, (w.d * xd).mul_add(sums.total() as f32, acc)),
        WeightFormat::Q8_0 => (w.d * xd).mul_add(sums.total() as f32, acc),
        WeightFormat::Q4_K | WeightFormat::Q5_K => {
            // d·sc and dmin·m are exact in f32 (11 × 6 significant bits).
            let scale = w.d * f32::from(w.bytes[0]);
            let min = w.m * f32::from(w.bytes[1]);
            (-min).mul_add(xs, (scale * xd).mul_add(sums.total() as f32, acc))
        }
        WeightFormat::Q6_K => {
            let first = w.d * f32::from(w.bytes[0] as i8);
            let last = w.d * f32::from(w.bytes[1] as i8);
            (last * xd).mul_add(sums.last as f32, (first * xd).mul_add(sums.first as f32, acc))
        }
        WeightFormat::F32 => unreachable!("f32 weights have no blocks"),
    }
}

/// Token `t`'s activation block `xb` in column order, with its scale,
/// `scale · Σq` and `Σq`.
fn x_block<Q: ActivationQuant>(x: &QuantizedRows<Q>, xb: usize) -> ([i32; QK], f32, f32, i32) {
    let qs = &x.qs[xb * QK..][..QK];
    (std::array::from_fn(|c| qs[Q::slot(c)].widen()), x.d[xb], x.s[xb], x.isum[xb])
}

fn quant_panel(tile: &Tile, t: usize) -> [f32; PANEL] {
    let layout = &tile.layout;
    let blocks = tile.blocks();
    let quant_bytes = tile.format.quant_bytes();
    let half = |at: usize, r: usize| f16::from_le_bytes([tile.panel[at + 2 * r], tile.panel[at + 2 * r + 1]]).to_f32();
    let mut acc = [0.0f32; PANEL];
    for b in 0..blocks {
        let xb = t * blocks + b;
        let (xq, xd, xs, xsum) = if tile.bytes { x_block(&tile.x.bytes, xb) } else { x_block(&tile.x.quantized, xb) };
        let quants = &tile.panel[b * quant_bytes..][..quant_bytes];
        for (r, a) in acc.iter_mut().enumerate() {
            let q: [i32; QK] = match tile.format {
                WeightFormat::Q8_0 => {
                    let mut q = [0i8; QK];
                    unpack_q8(quants, r, &mut q);
                    q.map(i32::from)
                }
                format => unpack_wide(format, quants, r),
            };
            let dot = |cols: std::ops::Range<usize>| cols.map(|c| q[c] * xq[c]).sum::<i32>();
            let sums = BlockSums { first: dot(0..16), last: dot(16..32) };
            let scales = if tile.format.is_k_quant() {
                let m = if tile.format.super_halves() > 1 { half(layout.super_half(1, b), r) } else { 0.0 };
                BlockScales {
                    d: half(layout.super_half(0, b), r),
                    m,
                    bytes: if tile.format == WeightFormat::Q6_K {
                        [tile.panel[layout.block_byte(0, b) + r], tile.panel[layout.block_byte(1, b) + r]]
                    } else {
                        layout.k_scale_min(tile.panel, b, r).into()
                    },
                }
            } else {
                let m = if tile.format.block_halves() > 1 { half(layout.block_half(1, b), r) } else { 0.0 };
                BlockScales { d: half(layout.block_half(0, b), r), m, bytes: [0; 2] }
            };
            *a = block_step(tile.format, *a, sums, scales, xd, xs, xsum);
        }
    }
    acc
}
