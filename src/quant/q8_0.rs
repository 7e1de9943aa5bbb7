//! Q8_0 quantization in Rust, byte-identical to ggml's `quantize_row_q8_0_ref` (what
//! `llama-quantize` writes) for finite input; callers send rows holding NaN or ±Inf to ggml.
//!
//! Why not ggml: its reference loop calls `roundf` through libm once per weight, which made
//! Q8_0 the costliest part of requantizing the fixtures' embeddings (about a tenth of a merge's
//! CPU time). The arithmetic here is the same, step by step:
//!
//! * `amax` = the largest |x| of the 32-weight block (maximum is exact and, for finite values,
//!   independent of order, so it is taken in 8 lanes);
//! * `d = amax / 127`, `id = 1 / d` (0 when `d` is 0), both in `f32`;
//! * the block scale is `d` as IEEE half, rounded to nearest even (ggml's `GGML_FP32_TO_FP16`
//!   and `half::f16::from_f32` agree on every finite value);
//! * each weight is `round(x · id)`, halves away from zero (`roundf` = `f32::round`), as i8.
//!
//! The tests compare with ggml on random rows, ties and extreme scales.

use half::f16;

/// Weights per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 i8.
const BLOCK_BYTES: usize = 2 + QK;
/// Lanes of the `amax` reduction.
const LANES: usize = 8;

/// Whether every value is finite (the precondition of [`quantize`]).
pub fn all_finite(x: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    x.iter().fold(0u32, |a, v| {
        a | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    }) == 0
}

/// Quantizes `src` (whole blocks of 32 finite values) into `dst` (34 bytes per block).
///
/// Compiled for several instruction sets, the best the CPU has chosen at run time: without
/// SSE4.1, `f32::round` is a call to libm's `roundf` per weight (measured: a twelfth of a
/// Gemma 3 merge's CPU time in a build without `-C target-cpu`). Every version computes the
/// same values: `round` is exact on any instruction set, and Rust never fuses `x · id` with
/// anything.
#[multiversion::multiversion(targets("x86_64+avx2+fma+f16c", "x86_64+sse4.1", "aarch64+neon"))]
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    let (blocks, _) = src.as_chunks::<QK>();
    let (out, _) = dst.as_chunks_mut::<BLOCK_BYTES>();
    for (x, y) in blocks.iter().zip(out) {
        let mut lanes = [0f32; LANES];
        for part in x.as_chunks::<LANES>().0 {
            for j in 0..LANES {
                let a = part[j].abs();
                lanes[j] = if lanes[j] > a { lanes[j] } else { a };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &a| if m > a { m } else { a });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let mut q = [0u8; QK];
        for j in 0..QK {
            q[j] = (x[j] * id).round() as i8 as u8;
        }
        y[2..].copy_from_slice(&q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::GgmlType;
    use crate::quant::ggml;

    fn ggml_q8_0(src: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; src.len() / QK * BLOCK_BYTES];
        ggml::quantize_chunk(GgmlType::Q8_0, src, src.len() as u64, &mut out);
        out
    }

    fn ours(src: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; src.len() / QK * BLOCK_BYTES];
        quantize(src, &mut out);
        out
    }

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn random_rows_match_ggml() {
        let mut s = 7u64;
        for scale in [1e-30f32, 1e-6, 0.02, 1.0, 300.0, 1e30] {
            let src: Vec<f32> = (0..QK * 64)
                .map(|_| {
                    let u = (splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32;
                    (u * 2.0 - 1.0) * scale
                })
                .collect();
            assert_eq!(ours(&src), ggml_q8_0(&src), "scale {scale}");
        }
    }

    #[test]
    fn ties_zeros_and_extremes_match_ggml() {
        let mut src = Vec::new();
        // amax = 127 · 2^k gives d = 2^k exactly, so (n + 0.5) · 2^k lands on a tie.
        for k in [-20i32, -3, 0, 5] {
            let step = 2f32.powi(k);
            let mut block = vec![127.0 * step];
            block.extend((0..QK - 1).map(|n| (n as f32 - 15.0 + 0.5) * step));
            src.extend(block);
        }
        src.extend([0.0f32; QK]); // all zero: d = 0, id = 0
        src.extend((0..QK).map(|n| if n % 2 == 0 { -0.0 } else { 1e-45 })); // denormals
        src.extend((0..QK).map(|n| if n == 3 { f32::MAX } else { -f32::MAX / 3.0 }));
        src.extend((0..QK).map(|n| n as f32 * 1e7)); // d beyond f16's range
        assert!(all_finite(&src));
        assert_eq!(ours(&src), ggml_q8_0(&src));
    }

    #[test]
    fn non_finite_values_are_detected() {
        assert!(all_finite(&[0.0, -1.0, f32::MAX]));
        assert!(!all_finite(&[0.0, f32::NAN]));
        assert!(!all_finite(&[f32::NEG_INFINITY]));
    }
}
