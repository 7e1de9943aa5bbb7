//! [`combine`](super::combine) with explicit AVX2 instructions, run where the CPU has AVX2
//! (detected at run time, see [`crate::merge::simd`]): groups of 8 elements computed start to
//! finish in registers — the TIES vote, the agreeing sum and weight, the output — with the
//! model loop inside.
//!
//! The portable version makes one pass per step over blocks of 512 elements through stack
//! buffers (the compiler vectorizes each pass; written per element, it would not). Each element
//! still sees the same IEEE operations in the same order as the scalar reference (a product,
//! then a sum; no fused multiply-add), so the results are bit-identical — the parent module's
//! property tests compare both with the reference. The bodies are `#[target_feature(enable =
//! "avx2")]` functions with `core::arch` intrinsics (safe to call there); registers go to and
//! from `[f32; 8]` with `bytemuck::cast`, so the only `unsafe` is the call of the body from
//! [`combine`], which takes an [`Avx2`] proof.

use core::arch::x86_64::{
    __m256, _mm256_add_ps, _mm256_and_ps, _mm256_and_si256, _mm256_andnot_ps, _mm256_blendv_ps,
    _mm256_castps_si256, _mm256_castsi256_ps, _mm256_cmp_ps, _mm256_cmpgt_epi32, _mm256_div_ps,
    _mm256_movemask_ps, _mm256_mul_ps, _mm256_or_ps, _mm256_set1_epi32, _mm256_set1_ps,
    _mm256_setzero_ps, _mm256_xor_ps, _CMP_EQ_OQ, _CMP_GE_OQ, _CMP_GT_OQ, _CMP_NEQ_UQ,
};

use super::Combine;
use crate::merge::simd::Avx2;

/// Elements per register.
const GROUP: usize = 8;

/// Combines the whole groups of 8 at the start of `out` (see [`super::combine`] for the
/// meaning) and returns how many elements it wrote (the caller finishes the rest) and whether
/// they are all within [`super::RANGE_LIMIT`].
pub(super) fn combine(
    _: Avx2,
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> (usize, bool) {
    // SAFETY: the body's one precondition is its target features (AVX2), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { combine_avx2(c, base, deltas, weights, out) }
}

/// The body of [`combine`].
#[target_feature(enable = "avx2")]
fn combine_avx2(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> (usize, bool) {
    // The scalar loop zips deltas with weights: extra entries of either are ignored.
    match deltas.len().min(weights.len()) {
        1 => combine_fixed::<1>(c, base, deltas, weights, out),
        2 => combine_fixed::<2>(c, base, deltas, weights, out),
        3 => combine_fixed::<3>(c, base, deltas, weights, out),
        4 => combine_fixed::<4>(c, base, deltas, weights, out),
        _ => combine_any(c, base, deltas, weights, out),
    }
}

/// A group of 8 as a register (an unaligned load).
#[inline(always)]
fn register(g: &[f32; GROUP]) -> __m256 {
    bytemuck::cast(*g)
}

/// The shared constants of a combine.
struct Consts {
    zero: __m256,
    one: __m256,
    lambda: __m256,
    wsum: __m256,
}

impl Consts {
    #[target_feature(enable = "avx2")]
    #[inline]
    fn new(c: Combine, weights: &[f32]) -> Consts {
        Consts {
            zero: _mm256_setzero_ps(),
            one: _mm256_set1_ps(1.0),
            lambda: _mm256_set1_ps(c.lambda),
            wsum: _mm256_set1_ps(super::weight_sum(weights)),
        }
    }
}

/// All-ones lanes where `v` is out of [`super::RANGE_LIMIT`]'s range: NaN, infinite, or larger
/// in magnitude (the bits of |v|, compared as integers, order like the values; NaN and ±Inf
/// have the largest).
#[target_feature(enable = "avx2")]
#[inline]
fn out_of_range(v: __m256) -> __m256 {
    let abs = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fff_ffff));
    let limit = _mm256_set1_epi32(super::RANGE_LIMIT.to_bits() as i32);
    _mm256_castsi256_ps(_mm256_cmpgt_epi32(abs, limit))
}

/// One group's output from its weighted deltas `x[i] = wᵢ·δᵢ` (in model order) and weights.
#[target_feature(enable = "avx2")]
#[inline]
fn mix(c: Combine, k: &Consts, x: &[__m256], w: &[__m256], b: __m256) -> __m256 {
    let (sum, div) = if c.consensus {
        // The sign vote s = Σ wᵢ·δᵢ (ties positive), then the sum and weight of the non-zero
        // terms agreeing with it.
        let mut vote = k.zero;
        for &x in x {
            vote = _mm256_add_ps(vote, x);
        }
        let positive_vote = _mm256_cmp_ps::<_CMP_GE_OQ>(vote, k.zero);
        let (mut sum, mut div) = (k.zero, k.zero);
        for (&x, &w) in x.iter().zip(w) {
            // x != 0 (true for NaN, as in Rust) and (x > 0) == (s >= 0).
            let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(x, k.zero);
            let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(x, k.zero);
            let agree = _mm256_andnot_ps(_mm256_xor_ps(positive, positive_vote), nonzero);
            // A disagreeing term adds +0, which leaves the sums' bits unchanged (they start
            // at +0 and are never −0; see the portable version).
            sum = _mm256_add_ps(sum, _mm256_and_ps(agree, x));
            div = _mm256_add_ps(div, _mm256_and_ps(agree, w));
        }
        // No agreeing weight: divide by 1.
        let none = _mm256_cmp_ps::<_CMP_EQ_OQ>(div, k.zero);
        (sum, _mm256_blendv_ps(div, k.one, none))
    } else {
        let mut sum = k.zero;
        for &x in x {
            sum = _mm256_add_ps(sum, x);
        }
        (sum, k.wsum)
    };
    let mixed = if c.normalize {
        _mm256_div_ps(sum, div)
    } else {
        sum
    };
    _mm256_add_ps(b, _mm256_mul_ps(k.lambda, mixed))
}

/// [`combine`] for exactly `M` models: the per-model values of a group stay in registers.
#[target_feature(enable = "avx2")]
#[inline]
fn combine_fixed<const M: usize>(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> (usize, bool) {
    let k = Consts::new(c, &weights[..M]);
    let (groups, _) = out.as_chunks_mut::<GROUP>();
    let n = groups.len();
    let d: [&[[f32; GROUP]]; M] =
        core::array::from_fn(|i| &deltas[i][..n * GROUP].as_chunks::<GROUP>().0[..n]);
    let w: [__m256; M] = core::array::from_fn(|i| _mm256_set1_ps(weights[i]));
    let base_groups = (!base.is_empty()).then(|| &base[..n * GROUP].as_chunks::<GROUP>().0[..n]);
    let finite = groups_loop(c, &k, groups, base_groups, &w, &d, [k.zero; M]);
    (n * GROUP, finite)
}

/// The group loop of both versions: per group `g`, the weighted deltas `x[i] = w[i]·d[i][g]`
/// (in the scratch registers `x`, one per model), then the output, written to `groups`. Returns
/// whether every output is within [`super::RANGE_LIMIT`].
///
/// Generic over the containers — arrays of `M` from [`combine_fixed`], so that once inlined
/// (one caller per instance) the model loops are unrolled and `x` stays in registers; no
/// closure, since a closure is a function of its own that LLVM may leave out of line.
#[target_feature(enable = "avx2")]
#[inline]
fn groups_loop<'d, D: AsRef<[&'d [[f32; GROUP]]]>, X: AsMut<[__m256]>>(
    c: Combine,
    k: &Consts,
    groups: &mut [[f32; GROUP]],
    base_groups: Option<&[[f32; GROUP]]>,
    w: &[__m256],
    d: &D,
    mut x: X,
) -> bool {
    let (d, x) = (d.as_ref(), x.as_mut());
    let mut bad = k.zero;
    for (g, o) in groups.iter_mut().enumerate() {
        for ((x, w), d) in x.iter_mut().zip(w).zip(d) {
            *x = _mm256_mul_ps(*w, register(&d[g]));
        }
        let b = match base_groups {
            Some(b) => register(&b[g]),
            None => k.zero,
        };
        let v = mix(c, k, x, w, b);
        bad = _mm256_or_ps(bad, out_of_range(v));
        *o = bytemuck::cast(v);
    }
    _mm256_movemask_ps(bad) == 0
}

/// [`combine`] for any number of models.
#[target_feature(enable = "avx2")]
#[inline]
fn combine_any(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> (usize, bool) {
    let m = deltas.len().min(weights.len());
    let (deltas, weights) = (&deltas[..m], &weights[..m]);
    let k = Consts::new(c, weights);
    let (groups, _) = out.as_chunks_mut::<GROUP>();
    let n = groups.len();
    let d: Vec<&[[f32; GROUP]]> = deltas
        .iter()
        .map(|d| &d[..n * GROUP].as_chunks::<GROUP>().0[..n])
        .collect();
    let w: Vec<__m256> = weights.iter().map(|&w| _mm256_set1_ps(w)).collect();
    let base_groups = (!base.is_empty()).then(|| &base[..n * GROUP].as_chunks::<GROUP>().0[..n]);
    let finite = groups_loop(c, &k, groups, base_groups, &w, &d, vec![k.zero; m]);
    (n * GROUP, finite)
}
