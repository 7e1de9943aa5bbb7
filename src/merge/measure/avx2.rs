//! The reductions of the parent module with explicit AVX2 instructions, run where the CPU has
//! AVX2 (detected at run time, see [`crate::merge::simd`]); elsewhere the portable loops run.
//!
//! The same lanes as the portable loops — element `j` of each group of 16 goes to lane `j`,
//! eight lanes per register — and the same operations (a product, then a sum; no fused
//! multiply-add), so their results equal the portable loops' bit for bit (tested there); the
//! compiler's version of the portable lane loops shuffled lanes through scalar registers
//! (measured 0.85 vs 0.32 ns per element for an earlier `retention_sums`).
//!
//! Each public function is a safe entry point taking an [`Avx2`] proof; its body is a
//! `#[target_feature(enable = "avx2,popcnt")]` function with `core::arch` intrinsics (safe to
//! call there), and registers go to and from arrays with `bytemuck::cast`, so the only `unsafe`
//! is the call of each body from its entry point.

use core::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_and_ps, _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmp_ps,
    _mm256_cmpeq_epi32, _mm256_max_ps, _mm256_min_ps, _mm256_movemask_ps, _mm256_mul_ps,
    _mm256_or_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_sub_ps, _CMP_EQ_OQ,
    _CMP_NEQ_UQ,
};

use super::LANES;
use crate::merge::simd::Avx2;

/// `_CMP_EQ_OQ`: +0 and −0 are zero, NaN is not.
const EQ: i32 = _CMP_EQ_OQ;
/// `_CMP_NEQ_UQ`: true for NaN, as Rust's `!=`.
const NEQ: i32 = _CMP_NEQ_UQ;

/// The 16 elements of a group as two registers of 8 (unaligned loads).
#[inline(always)]
fn load(g: &[f32; LANES]) -> [__m256; 2] {
    bytemuck::cast(*g)
}

/// Two registers back to 16 lanes.
#[inline(always)]
fn lanes(r: [__m256; 2]) -> [f32; LANES] {
    bytemuck::cast(r)
}

/// `acc += x²` lane by lane (a product, then a sum).
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn add_squares(acc: &mut [__m256; 2], x: [__m256; 2]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a = _mm256_add_ps(*a, _mm256_mul_ps(x, x));
    }
}

/// The number of lanes of a group equal to zero (`EQ`) or not (`NEQ`).
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn count<const OP: i32>(v: [__m256; 2]) -> u64 {
    let zero = _mm256_setzero_ps();
    u64::from(
        _mm256_movemask_ps(_mm256_cmp_ps::<OP>(v[0], zero)).count_ones()
            + _mm256_movemask_ps(_mm256_cmp_ps::<OP>(v[1], zero)).count_ones(),
    )
}

/// The number of non-zero elements (NaN counts as non-zero) over whole groups.
pub(super) fn nonzeros(_: Avx2, x: &[[f32; LANES]]) -> u64 {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { nonzeros_avx2(x) }
}

/// The body of [`nonzeros`].
#[target_feature(enable = "avx2,popcnt")]
fn nonzeros_avx2(x: &[[f32; LANES]]) -> u64 {
    x.iter().map(|g| count::<NEQ>(load(g))).sum()
}

/// The number of exactly-zero elements and the lane sums of `x²` over whole groups.
pub(super) fn zeros_and_squares(_: Avx2, x: &[[f32; LANES]]) -> (u64, [f32; LANES]) {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { zeros_and_squares_avx2(x) }
}

/// The body of [`zeros_and_squares`].
#[target_feature(enable = "avx2,popcnt")]
fn zeros_and_squares_avx2(x: &[[f32; LANES]]) -> (u64, [f32; LANES]) {
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut zeros = 0u64;
    for g in x {
        let v = load(g);
        zeros += count::<EQ>(v);
        add_squares(&mut acc, v);
    }
    (zeros, lanes(acc))
}

/// `out = x − b` over whole groups, with the number of exactly-zero differences and the lane
/// sums of their squares; `None` (with `out` partly written) if `x` holds a NaN or infinity.
pub(super) fn subtract_measured(
    _: Avx2,
    x: &[[f32; LANES]],
    b: &[[f32; LANES]],
    out: &mut [[f32; LANES]],
) -> Option<(u64, [f32; LANES])> {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { subtract_measured_avx2(x, b, out) }
}

/// The body of [`subtract_measured`].
#[target_feature(enable = "avx2,popcnt")]
fn subtract_measured_avx2(
    x: &[[f32; LANES]],
    b: &[[f32; LANES]],
    out: &mut [[f32; LANES]],
) -> Option<(u64, [f32; LANES])> {
    let exponent = _mm256_set1_epi32(0x7f80_0000);
    let exponent_bits = _mm256_castsi256_ps(exponent);
    let mut bad = _mm256_setzero_ps();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut zeros = 0u64;
    for ((x, b), o) in x.iter().zip(b).zip(out.iter_mut()) {
        let (x, b) = (load(x), load(b));
        for h in x {
            // All exponent bits set: infinite or NaN.
            let e = _mm256_castps_si256(_mm256_and_ps(h, exponent_bits));
            bad = _mm256_or_ps(bad, _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exponent)));
        }
        let v = [_mm256_sub_ps(x[0], b[0]), _mm256_sub_ps(x[1], b[1])];
        *o = lanes(v);
        zeros += count::<EQ>(v);
        add_squares(&mut acc, v);
    }
    (_mm256_movemask_ps(bad) == 0).then(|| (zeros, lanes(acc)))
}

/// The lane sums of `(q − b)·(o − b)` and `(o − b)²` over whole groups.
pub(super) fn retention_groups(
    _: Avx2,
    q: &[[f32; LANES]],
    o: &[[f32; LANES]],
    b: &[[f32; LANES]],
) -> ([f32; LANES], [f32; LANES]) {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { retention_groups_avx2(q, o, b) }
}

/// The body of [`retention_groups`].
#[target_feature(enable = "avx2,popcnt")]
fn retention_groups_avx2(
    q: &[[f32; LANES]],
    o: &[[f32; LANES]],
    b: &[[f32; LANES]],
) -> ([f32; LANES], [f32; LANES]) {
    let (mut num, mut den) = ([_mm256_setzero_ps(); 2], [_mm256_setzero_ps(); 2]);
    for ((q, o), b) in q.iter().zip(o).zip(b) {
        let (q, o, b) = (load(q), load(o), load(b));
        for k in 0..2 {
            let delta = _mm256_sub_ps(o[k], b[k]);
            num[k] = _mm256_add_ps(num[k], _mm256_mul_ps(_mm256_sub_ps(q[k], b[k]), delta));
            den[k] = _mm256_add_ps(den[k], _mm256_mul_ps(delta, delta));
        }
    }
    (lanes(num), lanes(den))
}

/// The smallest and largest element of a block of whole groups of 8 (exact: any order gives
/// the same values as the portable fold, NaN aside).
pub(super) fn block_min_max(_: Avx2, x: &[[f32; 8]]) -> (f32, f32) {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { block_min_max_avx2(x) }
}

/// The body of [`block_min_max`].
#[target_feature(enable = "avx2,popcnt")]
fn block_min_max_avx2(x: &[[f32; 8]]) -> (f32, f32) {
    let mut lo = _mm256_set1_ps(f32::MAX);
    let mut hi = _mm256_set1_ps(f32::MIN);
    for g in x {
        let v: __m256 = bytemuck::cast(*g);
        lo = _mm256_min_ps(lo, v);
        hi = _mm256_max_ps(hi, v);
    }
    let lo: [f32; 8] = bytemuck::cast(lo);
    let hi: [f32; 8] = bytemuck::cast(hi);
    (
        lo.iter().fold(f32::MAX, |a, &v| if v < a { v } else { a }),
        hi.iter().fold(f32::MIN, |a, &v| if v > a { v } else { a }),
    )
}
