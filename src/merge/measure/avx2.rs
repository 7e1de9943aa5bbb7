//! The `f64` reductions of the parent module with explicit AVX2 instructions, for builds where
//! AVX2 is enabled at compile time (other builds use the portable loops).
//!
//! The compiler turns the portable loops' `[f64; 8]` lanes into scalar shuffles rather than
//! whole-register arithmetic (measured 0.85 vs 0.32 ns per element for `retention_sums`).
//! These keep the same lanes — element `j` of each group of 8 goes to lane `j`, lanes 0–3 in
//! one register and 4–7 in another — and the same operations (a product, then a sum; no fused
//! multiply-add), so their results equal the portable loops' bit for bit (tested there).
//! Intrinsics come from `safe_arch`, whose functions are safe, so there is no `unsafe` here.

use safe_arch::{
    add_m256d, cast_to_m128_from_m256, cmp_op_mask_m256, convert_to_m256d_from_m128,
    extract_m128_from_m256, load_unaligned_m256, m256, m256d, move_mask_m256, mul_m256d, sub_m256,
    zeroed_m256, zeroed_m256d,
};

use super::LANES;

/// Lanes 0–3 and 4–7 of `x`, widened to `f64`.
#[inline(always)]
fn widen(x: m256) -> (m256d, m256d) {
    (
        convert_to_m256d_from_m128(cast_to_m128_from_m256(x)),
        convert_to_m256d_from_m128(extract_m128_from_m256::<1>(x)),
    )
}

/// The eight lanes of two halves.
#[inline(always)]
fn lanes(lo: m256d, hi: m256d) -> [f64; LANES] {
    let lo: [f64; 4] = lo.into();
    let hi: [f64; 4] = hi.into();
    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
}

/// The number of non-zero elements (NaN counts as non-zero) over whole groups of 8.
pub(super) fn nonzeros(x: &[[f32; LANES]]) -> u64 {
    // `_CMP_NEQ_UQ`: true for NaN, as Rust's `!=`.
    const NEQ: i32 = 4;
    let zero = zeroed_m256();
    x.iter()
        .map(|g| {
            let v = load_unaligned_m256(g);
            u64::from(move_mask_m256(cmp_op_mask_m256::<NEQ>(v, zero)).count_ones())
        })
        .sum()
}

/// Lane sums of `x²` and the number of exactly-zero elements over whole groups of 8.
pub(super) fn zeros_and_sumsq(x: &[[f32; LANES]]) -> (u64, [f64; LANES]) {
    // `_CMP_EQ_OQ`: +0 and −0 are zero, NaN is not.
    const EQ: i32 = 0;
    let zero = zeroed_m256();
    let (mut s0, mut s1) = (zeroed_m256d(), zeroed_m256d());
    let mut zeros = 0u64;
    for g in x {
        let v = load_unaligned_m256(g);
        zeros += u64::from(move_mask_m256(cmp_op_mask_m256::<EQ>(v, zero)).count_ones());
        let (lo, hi) = widen(v);
        s0 = add_m256d(s0, mul_m256d(lo, lo));
        s1 = add_m256d(s1, mul_m256d(hi, hi));
    }
    (zeros, lanes(s0, s1))
}

/// Lane sums of `(q − b)·(o − b)` and `(o − b)²` over whole groups of 8.
pub(super) fn retention_sums(
    q: &[[f32; LANES]],
    o: &[[f32; LANES]],
    b: &[[f32; LANES]],
) -> ([f64; LANES], [f64; LANES]) {
    let (mut n0, mut n1) = (zeroed_m256d(), zeroed_m256d());
    let (mut d0, mut d1) = (zeroed_m256d(), zeroed_m256d());
    for ((q, o), b) in q.iter().zip(o).zip(b) {
        let b = load_unaligned_m256(b);
        let (q0, q1) = widen(sub_m256(load_unaligned_m256(q), b));
        let (o0, o1) = widen(sub_m256(load_unaligned_m256(o), b));
        n0 = add_m256d(n0, mul_m256d(q0, o0));
        n1 = add_m256d(n1, mul_m256d(q1, o1));
        d0 = add_m256d(d0, mul_m256d(o0, o0));
        d1 = add_m256d(d1, mul_m256d(o1, o1));
    }
    (lanes(n0, n1), lanes(d0, d1))
}
