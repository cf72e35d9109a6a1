//! Times one matrix product per weight format, the way decode (1 token) and
//! prefill (many tokens) use it, and prints the rate in GB/s of weights
//! read and in tokens/s.
//!
//! cargo run --release -p hotpot-engine --example matmul -- [THREADS] [ROWS] [COLS] [TOKENS] [FORMATS] [BITS]
//!
//! BITS (8 or 16, default 16): the activation width K-quant weights read.

use std::time::Instant;

use half::f16;
use hotpot_engine::kernels::{ActivationBits, Cpu, CpuPool, MatmulInput, Matrix, WeightFormat, isa, matmul};

fn random_ggml(format: WeightFormat, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let blocks = rows * cols / format.ggml_block_len();
    let bytes = format.ggml_block_bytes();
    let mut out = Vec::with_capacity(blocks * bytes);
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed as u8
    };
    let d = f16::from_f32(0.001).to_le_bytes();
    for _ in 0..blocks {
        let mut block: Vec<u8> = (0..bytes).map(|_| next()).collect();
        match format {
            WeightFormat::Q6_K => block[bytes - 2..].copy_from_slice(&d),
            WeightFormat::Q4_K | WeightFormat::Q5_K => {
                block[0..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&d);
            }
            _ => block[0..2].copy_from_slice(&d),
        }
        out.extend(block);
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let threads = arg(0, 2);
    let (rows, cols, tokens) = (arg(1, 17920), arg(2, 1536), arg(3, 1));
    let formats: Vec<WeightFormat> = match args.get(4) {
        Some(list) => list.split(',').filter_map(|n| WeightFormat::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(n))).collect(),
        None => {
            vec![WeightFormat::Q4_0, WeightFormat::Q4_1, WeightFormat::Q8_0, WeightFormat::Q5_0, WeightFormat::Q4_K, WeightFormat::Q5_K, WeightFormat::Q6_K]
        }
    };
    let bits = if arg(5, 16) == 8 { ActivationBits::Eight } else { ActivationBits::Sixteen };
    let cpu = Cpu { pool: CpuPool::new(threads).expect("threads"), isa: isa::selected() };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.001).collect();
    println!("{rows}x{cols}, {tokens} token(s), {threads} thread(s), {} kernels, {bits:?}-bit K-quant activations", cpu.isa.name());
    for format in formats {
        let bytes = random_ggml(format, rows, cols, &mut seed);
        let m = Matrix::from_ggml(format, rows, cols, &bytes).expect("packs");
        let mut input = MatmulInput::default();
        input.prepare(&cpu, &x, tokens, cols, [format], bits);
        let mut out = vec![0.0f32; tokens * rows];
        matmul(&cpu, &m, &input, &mut out, rows, 0);
        // Seven rounds; the median and the best (this VM's neighbours come and
        // go). `HOTPOT_MATMUL_ONCE=1`: one product, for instruction counts.
        let once = std::env::var_os("HOTPOT_MATMUL_ONCE").is_some();
        let reps = if once { 1 } else { (400_000_000 / (m.size_bytes() * tokens.max(1))).clamp(2, 100) };
        let mut rounds: Vec<f64> = (0..if once { 1 } else { 7 })
            .map(|_| {
                let started = Instant::now();
                for _ in 0..reps {
                    matmul(&cpu, &m, &input, &mut out, rows, 0);
                }
                started.elapsed().as_secs_f64() / reps as f64
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        let (median, best) = (rounds[rounds.len() / 2], rounds[0]);
        println!(
            "{:>5}: median {:8.3} ms  {:6.2} GB/s  {:8.1} tok/s | best {:6.2} GB/s  {:8.1} tok/s  ({:.1} MB packed)",
            format.name(),
            median * 1e3,
            m.size_bytes() as f64 / median / 1e9,
            tokens as f64 / median,
            m.size_bytes() as f64 / best / 1e9,
            tokens as f64 / best,
            m.size_bytes() as f64 / 1e6
        );
    }
}
