//! Per-chunk measurements behind the merge report (delta noise, delta retention) and the
//! finiteness check of every input chunk.
//!
//! These run over every element of every merged chunk, so they are written as fixed-order
//! lane reductions: `LANES` independent accumulators, element `j` going to lane `j % LANES`,
//! combined in lane order at the end. The order depends only on the slice, never on threads,
//! so the report is deterministic; the independent lanes let the compiler vectorize the loops
//! (a single running `f64` sum is a serial chain of dependent adds, several times slower).

/// Independent accumulators per reduction (two AVX2 registers of `f64`).
const LANES: usize = 8;

#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod avx2;

#[cfg(test)]
thread_local! {
    /// Tests set this to compare the portable loops with the AVX2 ones on the same input.
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the AVX2 kernels run (where built): always, except in tests that ask for the
/// portable loops.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn use_avx2() -> bool {
    #[cfg(test)]
    return !PORTABLE_ONLY.get();
    #[cfg(not(test))]
    true
}

/// Sums lanes in order.
#[inline(always)]
fn total(lanes: [f64; LANES]) -> f64 {
    lanes.iter().fold(0.0, |a, b| a + b)
}

/// The number of exactly-zero elements of `x` and `Σ x²` (in `f64`).
pub fn zeros_and_sumsq(x: &[f32]) -> (u64, f64) {
    let (groups, rest) = x.as_chunks::<LANES>();
    let (mut zeros, mut sumsq) = zeros_and_sumsq_groups(groups);
    for (j, &v) in rest.iter().enumerate() {
        zeros += u64::from(v == 0.0);
        sumsq[j] += f64::from(v) * f64::from(v);
    }
    (zeros, total(sumsq))
}

/// [`zeros_and_sumsq`] over whole groups, with the sums still in lanes.
#[inline]
fn zeros_and_sumsq_groups(groups: &[[f32; LANES]]) -> (u64, [f64; LANES]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if use_avx2() {
        return avx2::zeros_and_sumsq(groups);
    }
    let mut zeros = [0u32; LANES];
    let mut sumsq = [0f64; LANES];
    for g in groups {
        for j in 0..LANES {
            let v = f64::from(g[j]);
            zeros[j] += u32::from(g[j] == 0.0);
            sumsq[j] += v * v;
        }
    }
    (zeros.iter().map(|&z| u64::from(z)).sum(), sumsq)
}

/// The number of non-zero elements of `x` (NaN counts as non-zero).
pub fn nonzeros(x: &[f32]) -> u64 {
    let (groups, rest) = x.as_chunks::<LANES>();
    nonzero_groups(groups) + rest.iter().filter(|v| **v != 0.0).count() as u64
}

/// [`nonzeros`] over whole groups.
#[inline]
fn nonzero_groups(groups: &[[f32; LANES]]) -> u64 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if use_avx2() {
        return avx2::nonzeros(groups);
    }
    let mut count = [0u32; LANES];
    for g in groups {
        for j in 0..LANES {
            count[j] += u32::from(g[j] != 0.0);
        }
    }
    count.iter().map(|&c| u64::from(c)).sum()
}

/// Delta retention terms of one chunk: `(⟨q − b, o − b⟩, ⟨o − b, o − b⟩)` in `f64`, with `o`
/// the merged values before requantization, `q` after, and `b` the base. Only the common
/// length of the three slices is used.
pub fn retention_sums(q: &[f32], o: &[f32], b: &[f32]) -> (f64, f64) {
    let n = q.len().min(o.len()).min(b.len());
    let (q8, q_rest) = q[..n].as_chunks::<LANES>();
    let (o8, o_rest) = o[..n].as_chunks::<LANES>();
    let (b8, b_rest) = b[..n].as_chunks::<LANES>();
    let (mut num, mut den) = retention_groups(q8, o8, b8);
    for (j, ((q, o), b)) in q_rest.iter().zip(o_rest).zip(b_rest).enumerate() {
        let delta = f64::from(o - b);
        num[j] += f64::from(q - b) * delta;
        den[j] += delta * delta;
    }
    (total(num), total(den))
}

/// [`retention_sums`] over whole groups (of equal count), with the sums still in lanes.
#[inline]
fn retention_groups(
    q: &[[f32; LANES]],
    o: &[[f32; LANES]],
    b: &[[f32; LANES]],
) -> ([f64; LANES], [f64; LANES]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if use_avx2() {
        return avx2::retention_sums(q, o, b);
    }
    let mut num = [0f64; LANES];
    let mut den = [0f64; LANES];
    for ((q, o), b) in q.iter().zip(o).zip(b) {
        for j in 0..LANES {
            let delta = f64::from(o[j] - b[j]);
            num[j] += f64::from(q[j] - b[j]) * delta;
            den[j] += delta * delta;
        }
    }
    (num, den)
}

/// `Σ (max − min)²` over every `every`-th block of `block` consecutive elements of `x` (blocks
/// 0, `every`, 2·`every`, …; the last block may be shorter), and the number of blocks measured:
/// the spread of each quantization block, from which the report estimates the base's
/// quantization step — an estimate, so a sample of the blocks is enough. `block == 0`
/// measures nothing; `every == 0` is taken as 1.
pub fn block_range_sumsq(x: &[f32], block: usize, every: usize) -> (f64, u64) {
    if block == 0 {
        return (0.0, 0);
    }
    let mut sum = 0f64;
    let mut blocks = 0u64;
    for blk in x.chunks(block).step_by(every.max(1)) {
        let mut lo = [f32::MAX; LANES];
        let mut hi = [f32::MIN; LANES];
        let mut parts = blk.chunks_exact(LANES);
        for p in &mut parts {
            for j in 0..LANES {
                lo[j] = if p[j] < lo[j] { p[j] } else { lo[j] };
                hi[j] = if p[j] > hi[j] { p[j] } else { hi[j] };
            }
        }
        for (j, &v) in parts.remainder().iter().enumerate() {
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
        }
        let lo = lo.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a });
        let hi = hi.iter().fold(f32::MIN, |a, &v| if v > a { v } else { a });
        sum += f64::from(hi - lo).powi(2);
        blocks += 1;
    }
    (sum, blocks)
}

/// Elements scanned per step of [`first_non_finite`] before looking for the exact position.
const SCAN: usize = 256;

/// Turns model values into deltas, `x[j] -= base[j]` over the common length, checking the
/// values first: returns the index of the first NaN or infinite `x[j]` (as it was), if any,
/// and then `x` is only partly converted. One pass instead of [`first_non_finite`] and a
/// subtraction.
pub fn subtract_finite(x: &mut [f32], base: &[f32]) -> Option<usize> {
    let n = x.len().min(base.len());
    for (k, (part, b)) in x[..n]
        .chunks_mut(SCAN)
        .zip(base[..n].chunks(SCAN))
        .enumerate()
    {
        if let Some(i) = non_finite_in(part) {
            return Some(k * SCAN + i);
        }
        for (v, b) in part.iter_mut().zip(b) {
            *v -= b;
        }
    }
    None
}

/// The index of the first NaN or infinite element of `x`, if any.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    x.chunks(SCAN)
        .enumerate()
        .find_map(|(k, part)| non_finite_in(part).map(|i| k * SCAN + i))
}

/// The first NaN or infinite element of one part of at most [`SCAN`] elements: a branch-free
/// test over the whole part (it vectorizes), the exact position only on the rare hit.
#[inline(always)]
fn non_finite_in(part: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    let bad = part.iter().fold(0u32, |a, v| {
        a | u32::from(v.to_bits() & EXPONENT == EXPONENT)
    });
    if bad == 0 {
        return None;
    }
    part.iter().position(|v| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                k => ((i * 37 % 101) as f32 - 50.0) * 1e-3 * k as f32,
            })
            .collect()
    }

    #[test]
    fn zeros_and_sumsq_match_plain_loops() {
        for n in [0, 1, 7, 8, 9, 1000, 1003] {
            let x = sample(n);
            let (z, s) = zeros_and_sumsq(&x);
            assert_eq!(z, x.iter().filter(|v| **v == 0.0).count() as u64);
            let plain: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
            assert!(
                (s - plain).abs() <= 1e-12 * plain.max(1.0),
                "{s} vs {plain}"
            );
            assert_eq!(nonzeros(&x), n as u64 - z);
        }
    }

    #[test]
    fn retention_sums_match_plain_loops() {
        let b = sample(1003);
        let o: Vec<f32> = b
            .iter()
            .enumerate()
            .map(|(i, v)| v + i as f32 * 1e-4)
            .collect();
        let q: Vec<f32> = o.iter().map(|v| (v * 64.0).round() / 64.0).collect();
        let (num, den) = retention_sums(&q, &o, &b);
        let (mut pn, mut pd) = (0f64, 0f64);
        for j in 0..b.len() {
            let d = f64::from(o[j] - b[j]);
            pn += f64::from(q[j] - b[j]) * d;
            pd += d * d;
        }
        assert!((num - pn).abs() <= 1e-9 * pd, "{num} vs {pn}");
        assert!((den - pd).abs() <= 1e-12 * pd, "{den} vs {pd}");
    }

    #[test]
    fn simd_and_portable_loops_agree_bit_for_bit() {
        let b = sample(4099);
        let o: Vec<f32> = b
            .iter()
            .enumerate()
            .map(|(i, v)| v + (i % 13) as f32 * 3e-4)
            .collect();
        let q: Vec<f32> = o.iter().map(|v| (v * 32.0).round() / 32.0).collect();
        let run = |portable: bool| {
            PORTABLE_ONLY.set(portable);
            let r = (
                zeros_and_sumsq(&b),
                retention_sums(&q, &o, &b),
                nonzeros(&b),
            );
            PORTABLE_ONLY.set(false);
            r
        };
        let (fast, portable) = (run(false), run(true));
        assert_eq!(fast.0 .0, portable.0 .0);
        assert_eq!(fast.0 .1.to_bits(), portable.0 .1.to_bits());
        assert_eq!(fast.1 .0.to_bits(), portable.1 .0.to_bits());
        assert_eq!(fast.1 .1.to_bits(), portable.1 .1.to_bits());
        assert_eq!(fast.2, portable.2);
        assert_eq!(fast.2, b.iter().filter(|v| **v != 0.0).count() as u64);
    }

    #[test]
    fn block_ranges_match_plain_loops() {
        let x = sample(1000);
        for (block, every) in [
            (1, 1),
            (8, 1),
            (32, 1),
            (33, 3),
            (256, 8),
            (2000, 2),
            (32, 0),
        ] {
            let (s, n) = block_range_sumsq(&x, block, every);
            let mut ps = 0f64;
            for blk in x.chunks(block).step_by(every.max(1)) {
                let lo = blk.iter().cloned().fold(f32::MAX, f32::min);
                let hi = blk.iter().cloned().fold(f32::MIN, f32::max);
                ps += f64::from(hi - lo).powi(2);
            }
            assert_eq!(n as usize, x.len().div_ceil(block).div_ceil(every.max(1)));
            assert!((s - ps).abs() <= 1e-12 * ps.max(1.0));
        }
        assert_eq!(block_range_sumsq(&x, 0, 1), (0.0, 0));
    }

    #[test]
    fn subtract_finite_subtracts_or_finds_the_first_bad_value() {
        let b = sample(1000);
        let mut x: Vec<f32> = b.iter().map(|v| v * 3.0 + 0.5).collect();
        let want: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        assert_eq!(subtract_finite(&mut x, &b), None);
        assert_eq!(x, want);
        x[900] = f32::NAN;
        x[600] = f32::NEG_INFINITY;
        assert_eq!(subtract_finite(&mut x, &b), Some(600));
    }

    #[test]
    fn first_non_finite_finds_the_first_bad_value() {
        let mut x = sample(2000);
        assert_eq!(first_non_finite(&x), None);
        x[1500] = f32::INFINITY;
        assert_eq!(first_non_finite(&x), Some(1500));
        x[700] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(700));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&x), Some(3));
        assert_eq!(first_non_finite(&[]), None);
    }
}
