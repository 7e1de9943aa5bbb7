//! Tests of the grid codecs against ggml (the crate's dequantizer and quantizer are ggml's), per
//! type: the view decodes as ggml does, codes round-trip bit for bit, unchanged blocks keep
//! their bytes, nearest rounding lands on the nearest level, stochastic rounding is unbiased,
//! out-of-range blocks fall back to ggml's quantization.

use super::*;
use crate::quant::codec::{dequantize_into, quantize_into};

/// A deterministic stream (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Weight-like values: roughly normal, scale 0.05, with a few outliers.
    fn weights(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let s: f64 = (0..4).map(|_| self.unit() - 0.5).sum::<f64>() * 1.7;
                let outlier = if i % 97 == 5 { 6.0 } else { 1.0 };
                (s * 0.05 * outlier) as f32
            })
            .collect()
    }
}

fn hash_draw(seed: u64, e: usize) -> u32 {
    (Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ e as u64).next() >> 32) as u32
}

/// `n_blocks` blocks of `codec`'s type quantized by ggml from weight-like values, and their
/// ggml decoding.
fn ggml_blocks(codec: &GridCodec, n_blocks: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let values = Rng(seed).weights(n_blocks * codec.block);
    let mut bytes = vec![0u8; n_blocks * codec.bytes];
    quantize_into(codec.ty, &values, codec.block as u64, &mut bytes);
    let mut decoded = vec![0f32; values.len()];
    dequantize_into(codec.ty, &bytes, &mut decoded);
    (bytes, decoded)
}

fn affines(codec: &GridCodec, block: &[u8]) -> Vec<Affine> {
    let mut a = vec![Affine::default(); codec.block / codec.group];
    (codec.groups)(block, &mut a);
    a
}

fn codes_of(codec: &GridCodec, block: &[u8]) -> Vec<u8> {
    let mut c = vec![0u8; codec.block];
    (codec.unpack)(block, &mut c);
    c
}

/// The levels [`requantize`] may write, in code order.
fn writable(codec: &GridCodec) -> std::ops::Range<usize> {
    usize::from(codec.levels.lowest())..codec.levels.count()
}

fn same(a: f32, b: f32) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

#[test]
fn the_table_matches_the_type_table() {
    for g in &GRIDS {
        assert_eq!(g.block as u64, g.ty.block_size(), "{}", g.ty);
        assert_eq!(g.bytes as u64, g.ty.type_size(), "{}", g.ty);
        assert_eq!(g.block % g.group, 0, "{}", g.ty);
        assert!(g.block / g.group <= MAX_GROUPS, "{}", g.ty);
        assert!(g.levels.count() <= 256, "{}", g.ty);
        assert_eq!(grid_of(g.ty).map(|c| c.ty), Some(g.ty));
    }
    assert!(grid_of(GgmlType::F16).is_none() && grid_of(GgmlType::IQ3_S).is_none());
    // Levels ascend with the code.
    for g in &GRIDS {
        for c in 1..g.levels.count() {
            assert!(
                g.levels.level(c as u8) > g.levels.level(c as u8 - 1),
                "{}",
                g.ty
            );
        }
    }
}

#[test]
fn the_view_decodes_ggml_blocks_as_ggml_does() {
    for codec in &GRIDS {
        let (bytes, ggml) = ggml_blocks(codec, 64, 1);
        let mut ours = vec![0f32; ggml.len()];
        for (b, o) in bytes
            .chunks_exact(codec.bytes)
            .zip(ours.chunks_exact_mut(codec.block))
        {
            codec.decode(b, o);
        }
        for (j, (x, y)) in ggml.iter().zip(&ours).enumerate() {
            assert!(same(*x, *y), "{} element {j}: ggml {x}, view {y}", codec.ty);
        }
    }
}

#[test]
fn the_view_decodes_random_bytes_as_ggml_does() {
    // Every bit of a block, scales and codes alike, set at random: the layout is exercised
    // beyond what the quantizer writes (negative sub-block scales, high bits, …).
    let mut rng = Rng(2);
    for codec in &GRIDS {
        for trial in 0..200 {
            let block: Vec<u8> = (0..codec.bytes).map(|_| rng.next() as u8).collect();
            let mut ggml = vec![0f32; codec.block];
            dequantize_into(codec.ty, &block, &mut ggml);
            let mut ours = vec![0f32; codec.block];
            codec.decode(&block, &mut ours);
            for j in 0..codec.block {
                assert!(
                    same(ggml[j], ours[j]),
                    "{} trial {trial} element {j}: ggml {}, view {}",
                    codec.ty,
                    ggml[j],
                    ours[j]
                );
            }
        }
    }
}

#[test]
fn packing_unpacked_codes_gives_back_the_block() {
    // Every code field's bit survives unpack → pack, on random bytes (Q8_0's −128 included):
    // what keeps unchanged elements' codes bit for bit.
    let mut rng = Rng(3);
    for codec in &GRIDS {
        for _ in 0..200 {
            let block: Vec<u8> = (0..codec.bytes).map(|_| rng.next() as u8).collect();
            let mut b = block.clone();
            (codec.pack)(&codes_of(codec, &block), &mut b);
            assert_eq!(b, block, "{}", codec.ty);
        }
    }
}

#[test]
fn a_packed_code_reads_back_and_moves_nothing_else() {
    let mut rng = Rng(4);
    for codec in &GRIDS {
        let block: Vec<u8> = (0..codec.bytes).map(|_| rng.next() as u8).collect();
        let groups = affines(codec, &block);
        let codes = codes_of(codec, &block);
        for j in 0..codec.block {
            for c in 0..codec.levels.count() {
                let mut new = codes.clone();
                new[j] = c as u8;
                let mut b = block.clone();
                (codec.pack)(&new, &mut b);
                assert_eq!(codes_of(codec, &b), new, "{} element {j}", codec.ty);
                assert_eq!(affines(codec, &b), groups, "{}: scales moved", codec.ty);
            }
        }
    }
}

#[test]
fn unchanged_blocks_keep_their_bytes() {
    for codec in &GRIDS {
        let (bytes, base) = ggml_blocks(codec, 16, 4);
        let mut out = vec![0xAAu8; bytes.len()];
        for rounding in [Rounding::Nearest, Rounding::Stochastic(&|_, d| d.fill(7))] {
            let counts = requantize(codec, &bytes, &base, &base, &mut out, rounding);
            assert_eq!(out, bytes, "{}", codec.ty);
            assert_eq!(
                counts,
                GridCounts {
                    kept: 16,
                    ..Default::default()
                }
            );
        }
    }
}

/// Merged values: the base with every third element of every block with a non-zero step
/// moved to a random position inside its group's range (so always on the grid's span).
fn changed_in_range(codec: &GridCodec, bytes: &[u8], base: &[f32], seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut merged = base.to_vec();
    let (bottom, top) = (codec.levels.lowest(), (codec.levels.count() - 1) as u8);
    for (k, block) in bytes.chunks_exact(codec.bytes).enumerate() {
        let groups = affines(codec, block);
        for j in (0..codec.block).step_by(3) {
            let a = groups[j / codec.group];
            if a.step == 0.0 {
                continue;
            }
            let (lo, hi) = (codec.levels.level(bottom), codec.levels.level(top));
            let level = lo + (hi - lo) * rng.unit() as f32;
            merged[k * codec.block + j] = a.step * level + a.offset;
        }
    }
    merged
}

#[test]
fn nearest_rounding_lands_on_the_nearest_level_and_keeps_everything_else() {
    for codec in &GRIDS {
        let (bytes, base) = ggml_blocks(codec, 32, 5);
        let merged = changed_in_range(codec, &bytes, &base, 6);
        let mut out = vec![0u8; bytes.len()];
        let counts = requantize(codec, &bytes, &base, &merged, &mut out, Rounding::Nearest);
        assert_eq!(counts.fallback, 0, "{}", codec.ty);
        assert_eq!(counts.kept + counts.moved, 32, "{}", codec.ty);
        let mut decoded = vec![0f32; merged.len()];
        dequantize_into(codec.ty, &out, &mut decoded);
        for (k, (src, dst)) in bytes
            .chunks_exact(codec.bytes)
            .zip(out.chunks_exact(codec.bytes))
            .enumerate()
        {
            let groups = affines(codec, src);
            assert_eq!(affines(codec, dst), groups, "{}: scales kept", codec.ty);
            for j in 0..codec.block {
                let e = k * codec.block + j;
                if merged[e] == base[e] {
                    assert_eq!(
                        codes_of(codec, dst)[j],
                        codes_of(codec, src)[j],
                        "{} element {e}: unchanged code",
                        codec.ty
                    );
                    continue;
                }
                // The nearest of all the group's levels, and never more than half a step away.
                let a = groups[j / codec.group];
                let best = writable(codec)
                    .map(|c| (a.step * codec.levels.level(c as u8) + a.offset - merged[e]).abs())
                    .fold(f32::INFINITY, f32::min);
                let err = (decoded[e] - merged[e]).abs();
                // Positions are computed in f32: a near-tie may go either way.
                let tol = a.step.abs() * 1e-4;
                assert!(
                    err <= best + tol,
                    "{} element {e}: {err} from the target, nearest level {best}",
                    codec.ty
                );
                if let Levels::Uniform { .. } = codec.levels {
                    assert!(err <= 0.5 * a.step.abs() + tol, "{} element {e}", codec.ty);
                }
            }
        }
    }
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // One block, every element changed to a fixed target between two levels; over many draw
    // streams the mean decoded value converges to the target. Bound: 6 σ of the mean of a
    // two-point distribution (gap² · f(1 − f) / trials), plus float rounding.
    const TRIALS: u64 = 3000;
    for codec in &GRIDS {
        let (bytes, base) = ggml_blocks(codec, 1, 7);
        let mut merged = changed_in_range(codec, &bytes, &base, 8);
        // Small changes too: a tenth of the way to a neighbouring level.
        let groups = affines(codec, &bytes);
        let top = (codec.levels.count() - 1) as u8;
        let codes = codes_of(codec, &bytes);
        for j in (1..codec.block).step_by(3) {
            let a = groups[j / codec.group];
            let c = codes[j];
            let next = if c == top { c - 1 } else { c + 1 };
            let neighbour = a.step * codec.levels.level(next) + a.offset;
            merged[j] = base[j] + 0.1 * (neighbour - base[j]);
        }
        let mut sums = vec![0f64; codec.block];
        let mut out = vec![0u8; bytes.len()];
        let mut decoded = vec![0f32; codec.block];
        for t in 0..TRIALS {
            let draws = |offset: usize, d: &mut [u32]| {
                for (k, x) in d.iter_mut().enumerate() {
                    *x = hash_draw(t, offset + k);
                }
            };
            let counts = requantize(
                codec,
                &bytes,
                &base,
                &merged,
                &mut out,
                Rounding::Stochastic(&draws),
            );
            assert_eq!(counts.fallback, 0, "{}", codec.ty);
            dequantize_into(codec.ty, &out, &mut decoded);
            for (s, v) in sums.iter_mut().zip(&decoded) {
                *s += f64::from(*v);
            }
        }
        let mut changed = 0;
        for j in 0..codec.block {
            if merged[j] == base[j] {
                continue;
            }
            changed += 1;
            let a = groups[j / codec.group];
            let target = f64::from(merged[j]);
            // The neighbouring levels' values around the target, and its fraction between them.
            let mut values: Vec<f64> = writable(codec)
                .map(|c| f64::from(a.step * codec.levels.level(c as u8) + a.offset))
                .collect();
            values.sort_by(f64::total_cmp);
            let i = values
                .iter()
                .rposition(|&v| v <= target)
                .unwrap_or(0)
                .min(values.len() - 2);
            let gap = values[i + 1] - values[i];
            let f = ((target - values[i]) / gap).clamp(0.0, 1.0);
            let sigma = gap * (f * (1.0 - f) / TRIALS as f64).sqrt();
            let mean = sums[j] / TRIALS as f64;
            // Plus the 24-bit resolution of the draws and f32 positions.
            let tol = 6.0 * sigma + 1e-4 * gap;
            assert!(
                (mean - target).abs() <= tol,
                "{} element {j}: mean {mean}, target {target}, 6σ {tol}",
                codec.ty
            );
        }
        assert!(changed > codec.block / 2, "{}: {changed}", codec.ty);
    }
}

#[test]
fn out_of_range_blocks_fall_back_to_ggml() {
    for codec in &GRIDS {
        let (bytes, base) = ggml_blocks(codec, 4, 9);
        // Block 1: one element far beyond the grid's range.
        let mut merged = base.clone();
        let groups = affines(codec, &bytes[codec.bytes..2 * codec.bytes]);
        let a = groups[0];
        let top = (codec.levels.count() - 1) as u8;
        let extreme = (a.step * codec.levels.level(top) + a.offset)
            .abs()
            .max((a.step * codec.levels.level(codec.levels.lowest()) + a.offset).abs());
        merged[codec.block] = 3.0 * extreme + 1.0;
        // Block 2: a small change, on the grid.
        merged[2 * codec.block + 1] += 1e-4;
        let mut out = vec![0u8; bytes.len()];
        for rounding in [Rounding::Nearest, Rounding::Stochastic(&|_, d| d.fill(0))] {
            let counts = requantize(codec, &bytes, &base, &merged, &mut out, rounding);
            assert_eq!(
                counts,
                GridCounts {
                    kept: 2,
                    moved: 1,
                    fallback: 1
                },
                "{}",
                codec.ty
            );
            let mut expected = vec![0u8; codec.bytes];
            quantize_into(
                codec.ty,
                &merged[codec.block..2 * codec.block],
                codec.block as u64,
                &mut expected,
            );
            assert_eq!(
                &out[codec.bytes..2 * codec.bytes],
                &expected[..],
                "{}",
                codec.ty
            );
            assert_eq!(&out[..codec.bytes], &bytes[..codec.bytes], "{}", codec.ty);
        }
    }
}

#[test]
fn a_zero_scale_falls_back() {
    // An all-zero block quantizes to a zero scale: any change there cannot be placed.
    for codec in &GRIDS {
        let zeros = vec![0f32; codec.block];
        let mut bytes = vec![0u8; codec.bytes];
        quantize_into(codec.ty, &zeros, codec.block as u64, &mut bytes);
        let mut base = vec![0f32; codec.block];
        dequantize_into(codec.ty, &bytes, &mut base);
        assert_eq!(affines(codec, &bytes)[0].step, 0.0, "{}", codec.ty);
        let mut merged = base.clone();
        merged[0] = 0.01;
        let mut out = vec![0u8; codec.bytes];
        let counts = requantize(codec, &bytes, &base, &merged, &mut out, Rounding::Nearest);
        assert_eq!(counts.fallback, 1, "{}", codec.ty);
    }
}

#[test]
fn quantizing_a_block_alone_equals_quantizing_it_in_its_row() {
    // What makes a per-block fallback "the usual way": ggml quantizes every block of these
    // types independently of its neighbours (without an importance matrix).
    for codec in &GRIDS {
        let values = Rng(10).weights(codec.block * 8);
        let mut row = vec![0u8; codec.bytes * 8];
        quantize_into(codec.ty, &values, values.len() as u64, &mut row);
        for (k, v) in values.chunks_exact(codec.block).enumerate() {
            let mut one = vec![0u8; codec.bytes];
            quantize_into(codec.ty, v, codec.block as u64, &mut one);
            assert_eq!(
                &row[k * codec.bytes..(k + 1) * codec.bytes],
                &one[..],
                "{}",
                codec.ty
            );
        }
    }
}

#[test]
fn q8_0_never_writes_minus_128() {
    let codec = grid_of(GgmlType::Q8_0).unwrap();
    let (bytes, base) = ggml_blocks(codec, 8, 11);
    let mut merged = base.clone();
    // Just below the lowest level by less than half a step: placed at −127.
    for k in 0..8 {
        let d = affines(codec, &bytes[k * codec.bytes..(k + 1) * codec.bytes])[0].step;
        merged[k * codec.block + 3] = -127.4 * d.abs();
    }
    let mut out = vec![0u8; bytes.len()];
    let counts = requantize(codec, &bytes, &base, &merged, &mut out, Rounding::Nearest);
    assert_eq!(counts.fallback, 0);
    for block in out.chunks_exact(codec.bytes) {
        assert!(block[2..].iter().all(|&b| b != 0x80));
    }
}

#[test]
fn requant_names_round_trip() {
    for r in Requant::ALL {
        assert_eq!(Requant::from_name(r.name()), Some(r));
    }
    assert_eq!(
        Requant::from_name("grid_stochastic"),
        Some(Requant::GridStochastic)
    );
    assert_eq!(Requant::from_name("nearest"), None);
    assert_eq!(Requant::default(), Requant::DEFAULT);
}
