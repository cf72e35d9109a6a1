//! The portable kernels: the reference every SIMD variant must match bit
//! for bit. Integer sums are exact; the float steps per block and lane are
//! `acc = fma(d_w · d_x, isum, acc)` (then `fma(m_w, s_x, acc)` for Q4_1),
//! in block order. `mul_add` is a fused multiply-add everywhere (in software
//! where the CPU has none), so the SIMD variants' `vfmadd` matches it.

use half::f16;

use super::matrix::{PANEL, Tile, WeightFormat, unpack_q4, unpack_q8};
use super::quant::QK;

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

fn quant_panel(tile: &Tile, t: usize) -> [f32; PANEL] {
    let x = &tile.x.quantized;
    let blocks = tile.blocks();
    let quant_bytes = tile.format.quant_bytes();
    let scale = |array: usize, b: usize, r: usize| {
        let at = tile.scales_at(array) + (b * PANEL + r) * 2;
        f16::from_le_bytes([tile.panel[at], tile.panel[at + 1]]).to_f32()
    };
    let mut acc = [0.0f32; PANEL];
    for b in 0..blocks {
        let xb = t * blocks + b;
        let xq = &x.qs[xb * QK..][..QK];
        let quants = &tile.panel[b * quant_bytes..][..quant_bytes];
        for (r, a) in acc.iter_mut().enumerate() {
            let isum: i32 = match tile.format {
                WeightFormat::Q4_0 | WeightFormat::Q4_1 => {
                    let mut q = [0u8; QK];
                    unpack_q4(quants, r, &mut q);
                    q.iter().zip(xq).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum()
                }
                _ => {
                    let mut q = [0i8; QK];
                    unpack_q8(quants, r, &mut q);
                    q.iter().zip(xq).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum()
                }
            };
            let d = scale(0, b, r) * x.d[xb];
            match tile.format {
                WeightFormat::Q4_0 => *a = d.mul_add((isum - 8 * x.isum[xb]) as f32, *a),
                WeightFormat::Q4_1 => {
                    *a = d.mul_add(isum as f32, *a);
                    *a = scale(1, b, r).mul_add(x.s[xb], *a);
                }
                _ => *a = d.mul_add(isum as f32, *a),
            }
        }
    }
    acc
}
