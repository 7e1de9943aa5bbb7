//! Per-chunk measurements behind the merge report (delta noise, delta retention) and the
//! finiteness check of every input chunk.
//!
//! These run over every element of every merged chunk, so they are written as fixed-order
//! two-level lane reductions: within each block of [`BLOCK`] elements, element `j` goes to
//! `f32` lane `j % LANES`; each block's lane sums are then added to `f64` lanes, combined in
//! lane order at the end. The order depends only on the slice, never on threads, so the report
//! is deterministic; the independent lanes let the loops vectorize (a single running sum is a
//! serial chain of dependent adds, several times slower), and widening to `f64` once per block
//! instead of once per element halves their cost. A block's `f32` sums carry relative errors of
//! about 10⁻⁶ — far below what a report prints.

/// Independent accumulators per reduction (two AVX2 registers of `f32`).
const LANES: usize = 16;
/// Elements per block of `f32` lane sums (pieces measured one after another must be whole
/// blocks, except the last).
pub const BLOCK: usize = 256;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;

/// Sums lanes in order.
#[inline(always)]
fn total(lanes: [f64; LANES]) -> f64 {
    lanes.iter().fold(0.0, |a, b| a + b)
}

/// The number of exactly-zero elements of `x` and `Σ x²` (in `f64`).
pub fn zeros_and_sumsq(x: &[f32]) -> (u64, f64) {
    let mut m = DeltaMeasure::default();
    m.add(x);
    m.totals()
}

/// Adds each `f32` lane sum of one block to its `f64` lane.
#[inline(always)]
fn widen_into(sums: &mut [f64; LANES], block: [f32; LANES]) {
    for (s, b) in sums.iter_mut().zip(block) {
        *s += f64::from(b);
    }
}

/// The number of exactly-zero elements and `Σ x²` of a delta taken over consecutive pieces:
/// the lane sums carry over from piece to piece, so the result equals [`zeros_and_sumsq`] of
/// the pieces joined, bit for bit, as long as every piece but the last is a whole number of
/// blocks ([`BLOCK`] elements).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DeltaMeasure {
    zeros: u64,
    sumsq: [f64; LANES],
}

impl DeltaMeasure {
    /// Adds the next piece.
    pub fn add(&mut self, x: &[f32]) {
        for block in x.chunks(BLOCK) {
            self.add_block(block);
        }
    }

    /// Adds one block (at most [`BLOCK`] elements).
    fn add_block(&mut self, x: &[f32]) {
        let (groups, rest) = x.as_chunks::<LANES>();
        let (zeros, mut sums) = zeros_and_squares(groups);
        self.zeros += zeros;
        for (j, &v) in rest.iter().enumerate() {
            self.zeros += u64::from(v == 0.0);
            sums[j] += v * v;
        }
        widen_into(&mut self.sumsq, sums);
    }

    /// The number of zeros and `Σ x²` so far.
    pub fn totals(&self) -> (u64, f64) {
        (self.zeros, total(self.sumsq))
    }
}

/// The number of exactly-zero elements of whole groups and their squares' `f32` lane sums.
#[inline]
fn zeros_and_squares(groups: &[[f32; LANES]]) -> (u64, [f32; LANES]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = Avx2::get() {
        return avx2::zeros_and_squares(cpu, groups);
    }
    let mut zeros = [0u32; LANES];
    let mut sums = [0f32; LANES];
    for g in groups {
        for j in 0..LANES {
            zeros[j] += u32::from(g[j] == 0.0);
            sums[j] += g[j] * g[j];
        }
    }
    (zeros.iter().map(|&z| u64::from(z)).sum(), sums)
}

/// The number of non-zero elements of `x` (NaN counts as non-zero).
pub fn nonzeros(x: &[f32]) -> u64 {
    let (groups, rest) = x.as_chunks::<LANES>();
    nonzero_groups(groups) + rest.iter().filter(|v| **v != 0.0).count() as u64
}

/// [`nonzeros`] over whole groups.
#[inline]
fn nonzero_groups(groups: &[[f32; LANES]]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = Avx2::get() {
        return avx2::nonzeros(cpu, groups);
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
    let mut r = Retention::default();
    r.add(q, o, b);
    r.totals()
}

/// [`retention_sums`] taken over consecutive pieces, with the same rule as [`DeltaMeasure`]:
/// every piece but the last a whole number of blocks ([`BLOCK`] elements).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Retention {
    num: [f64; LANES],
    den: [f64; LANES],
}

impl Retention {
    /// Adds the next piece (the common length of the three slices).
    pub fn add(&mut self, q: &[f32], o: &[f32], b: &[f32]) {
        let n = q.len().min(o.len()).min(b.len());
        for ((q, o), b) in q[..n]
            .chunks(BLOCK)
            .zip(o[..n].chunks(BLOCK))
            .zip(b[..n].chunks(BLOCK))
        {
            let (qg, q_rest) = q.as_chunks::<LANES>();
            let (og, o_rest) = o.as_chunks::<LANES>();
            let (bg, b_rest) = b.as_chunks::<LANES>();
            let (mut num, mut den) = retention_groups(qg, og, bg);
            for (j, ((q, o), b)) in q_rest.iter().zip(o_rest).zip(b_rest).enumerate() {
                let delta = o - b;
                num[j] += (q - b) * delta;
                den[j] += delta * delta;
            }
            widen_into(&mut self.num, num);
            widen_into(&mut self.den, den);
        }
    }

    /// `(⟨q − b, o − b⟩, ⟨o − b, o − b⟩)` so far.
    pub fn totals(&self) -> (f64, f64) {
        (total(self.num), total(self.den))
    }
}

/// The `f32` lane sums of `(q − b)·(o − b)` and `(o − b)²` over whole groups (of equal count).
#[inline]
fn retention_groups(
    q: &[[f32; LANES]],
    o: &[[f32; LANES]],
    b: &[[f32; LANES]],
) -> ([f32; LANES], [f32; LANES]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = Avx2::get() {
        return avx2::retention_groups(cpu, q, o, b);
    }
    let mut num = [0f32; LANES];
    let mut den = [0f32; LANES];
    for ((q, o), b) in q.iter().zip(o).zip(b) {
        for j in 0..LANES {
            let delta = o[j] - b[j];
            num[j] += (q[j] - b[j]) * delta;
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
    #[cfg(target_arch = "x86_64")]
    let cpu = Avx2::get();
    for blk in x.chunks(block).step_by(every.max(1)) {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = cpu {
            if let (eights, []) = blk.as_chunks::<8>() {
                let (lo, hi) = avx2::block_min_max(cpu, eights);
                sum += f64::from(hi - lo).powi(2);
                blocks += 1;
                continue;
            }
        }
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
const SCAN: usize = BLOCK;

/// Writes the deltas `out[j] = x[j] − base[j]` (model values minus base values) over the
/// common length of the three slices, checking the values first: returns the index of the
/// first NaN or infinite `x[j]`, if any, and then `out` is only partly written. With
/// `measure`, also adds the deltas to it (see [`DeltaMeasure`] for how pieces must be cut).
/// One pass instead of a check, a subtraction and a measurement.
pub fn subtract_measured(
    x: &[f32],
    base: &[f32],
    out: &mut [f32],
    mut measure: Option<&mut DeltaMeasure>,
) -> Option<usize> {
    let n = x.len().min(base.len()).min(out.len());
    for (k, ((part, b), o)) in x[..n]
        .chunks(BLOCK)
        .zip(base[..n].chunks(BLOCK))
        .zip(out[..n].chunks_mut(BLOCK))
        .enumerate()
    {
        #[cfg(target_arch = "x86_64")]
        if let (Some(m), Some(cpu), ([.., _], [])) = (
            measure.as_deref_mut(),
            Avx2::get(),
            part.as_chunks::<LANES>(),
        ) {
            // Checks as it goes; on a non-finite value, find it below.
            if let Some((zeros, sums)) = avx2::subtract_measured(
                cpu,
                part.as_chunks().0,
                b.as_chunks().0,
                o.as_chunks_mut().0,
            ) {
                m.zeros += zeros;
                widen_into(&mut m.sumsq, sums);
                continue;
            }
        }
        if let Some(i) = non_finite_in(part) {
            return Some(k * BLOCK + i);
        }
        for ((o, x), b) in o.iter_mut().zip(part).zip(b) {
            *o = x - b;
        }
        if let Some(m) = measure.as_deref_mut() {
            m.add_block(o);
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
    use crate::merge::simd::with_portable;

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
            // Block sums in f32: relative errors of about 1e-6.
            assert!((s - plain).abs() <= 1e-5 * plain, "{s} vs {plain}");
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
        assert!((num - pn).abs() <= 1e-5 * pd, "{num} vs {pn}");
        assert!((den - pd).abs() <= 1e-5 * pd, "{den} vs {pd}");
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
            with_portable(portable, || {
                (
                    zeros_and_sumsq(&b),
                    retention_sums(&q, &o, &b),
                    nonzeros(&b),
                )
            })
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
    fn measures_taken_in_pieces_equal_the_whole() {
        let b = sample(5000);
        let x: Vec<f32> = b
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i % 5 == 0 {
                    *v
                } else {
                    v + (i % 17) as f32 * 1e-4
                }
            })
            .collect();
        let want: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        let whole = zeros_and_sumsq(&want);
        let (r_num, r_den) = retention_sums(&x, &want, &b);
        for portable in [false, true] {
            with_portable(portable, || {
                for piece in [BLOCK, 2 * BLOCK, 5000] {
                    let mut out = vec![0f32; x.len()];
                    let mut m = DeltaMeasure::default();
                    let mut r = Retention::default();
                    for ((xs, bs), os) in x
                        .chunks(piece)
                        .zip(b.chunks(piece))
                        .zip(out.chunks_mut(piece))
                    {
                        assert_eq!(subtract_measured(xs, bs, os, Some(&mut m)), None);
                        r.add(xs, os, bs);
                    }
                    assert_eq!(out, want);
                    assert_eq!(m.totals().0, whole.0);
                    assert_eq!(m.totals().1.to_bits(), whole.1.to_bits());
                    assert_eq!(r.totals().0.to_bits(), r_num.to_bits());
                    assert_eq!(r.totals().1.to_bits(), r_den.to_bits());
                }
                // A non-finite model value is found wherever it is, measured or not.
                for bad in [3, 700, 4999] {
                    let mut y = x.clone();
                    y[bad] = f32::NAN;
                    let mut out = vec![0f32; y.len()];
                    let mut m = DeltaMeasure::default();
                    assert_eq!(subtract_measured(&y, &b, &mut out, Some(&mut m)), Some(bad));
                    y[bad] = f32::NEG_INFINITY;
                    assert_eq!(subtract_measured(&y, &b, &mut out, None), Some(bad));
                }
            });
        }
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
    fn subtract_measured_subtracts_or_finds_the_first_bad_value() {
        let b = sample(1000);
        let mut x: Vec<f32> = b.iter().map(|v| v * 3.0 + 0.5).collect();
        let want: Vec<f32> = x.iter().zip(&b).map(|(x, b)| x - b).collect();
        let mut out = vec![0f32; x.len()];
        assert_eq!(subtract_measured(&x, &b, &mut out, None), None);
        assert_eq!(out, want);
        x[900] = f32::NAN;
        x[600] = f32::NEG_INFINITY;
        assert_eq!(subtract_measured(&x, &b, &mut out, None), Some(600));
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
