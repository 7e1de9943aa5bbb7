//! [`combine`](super::combine) with explicit AVX2 instructions, for builds where AVX2 is enabled
//! at compile time: groups of 8 elements computed start to finish in registers — the TIES vote,
//! the agreeing sum and weight, the output — with the model loop inside.
//!
//! The portable version makes one pass per step over blocks of 512 elements through stack
//! buffers (the compiler vectorizes each pass; written per element, it would not). Each element
//! still sees the same IEEE operations in the same order as the scalar reference (a product,
//! then a sum; no fused multiply-add), so the results are bit-identical — the parent module's
//! property tests compare both with the reference. Intrinsics come from `safe_arch`, whose
//! functions are safe, so there is no `unsafe` here.

use core::arch::x86_64::{_CMP_EQ_OQ, _CMP_GE_OQ, _CMP_GT_OQ, _CMP_NEQ_UQ};

use safe_arch::{
    add_m256, bitand_m256, bitand_m256i, bitandnot_m256, bitor_m256, bitxor_m256,
    blend_varying_m256, cast_to_m256_from_m256i, cast_to_m256i_from_m256, cmp_gt_mask_i32_m256i,
    cmp_op_mask_m256, div_m256, load_unaligned_m256, m256, move_mask_m256, mul_m256,
    set_splat_i32_m256i, set_splat_m256, zeroed_m256,
};

use super::Combine;

/// Elements per register.
const GROUP: usize = 8;

/// Combines the whole groups of 8 at the start of `out` (see [`super::combine`] for the
/// meaning) and returns how many elements it wrote (the caller finishes the rest) and whether
/// they are all within [`super::RANGE_LIMIT`].
pub(super) fn combine(
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

/// The shared constants of a combine.
struct Consts {
    zero: m256,
    one: m256,
    lambda: m256,
    wsum: m256,
}

impl Consts {
    fn new(c: Combine, weights: &[f32]) -> Consts {
        Consts {
            zero: zeroed_m256(),
            one: set_splat_m256(1.0),
            lambda: set_splat_m256(c.lambda),
            wsum: set_splat_m256(super::weight_sum(weights)),
        }
    }
}

/// All-ones lanes where `v` is out of [`super::RANGE_LIMIT`]'s range: NaN, infinite, or larger
/// in magnitude (the bits of |v|, compared as integers, order like the values; NaN and ±Inf
/// have the largest).
#[inline(always)]
fn out_of_range(v: m256) -> m256 {
    let abs = bitand_m256i(cast_to_m256i_from_m256(v), set_splat_i32_m256i(0x7fff_ffff));
    let limit = set_splat_i32_m256i(super::RANGE_LIMIT.to_bits() as i32);
    cast_to_m256_from_m256i(cmp_gt_mask_i32_m256i(abs, limit))
}

/// One group's output from its weighted deltas `x[i] = wᵢ·δᵢ` (in model order) and weights.
#[inline(always)]
fn mix(c: Combine, k: &Consts, x: &[m256], w: &[m256], b: m256) -> m256 {
    let (sum, div) = if c.consensus {
        // The sign vote s = Σ wᵢ·δᵢ (ties positive), then the sum and weight of the non-zero
        // terms agreeing with it.
        let mut vote = k.zero;
        for &x in x {
            vote = add_m256(vote, x);
        }
        let positive_vote = cmp_op_mask_m256::<_CMP_GE_OQ>(vote, k.zero);
        let (mut sum, mut div) = (k.zero, k.zero);
        for (&x, &w) in x.iter().zip(w) {
            // x != 0 (true for NaN, as in Rust) and (x > 0) == (s >= 0).
            let nonzero = cmp_op_mask_m256::<_CMP_NEQ_UQ>(x, k.zero);
            let positive = cmp_op_mask_m256::<_CMP_GT_OQ>(x, k.zero);
            let agree = bitandnot_m256(bitxor_m256(positive, positive_vote), nonzero);
            // A disagreeing term adds +0, which leaves the sums' bits unchanged (they start
            // at +0 and are never −0; see the portable version).
            sum = add_m256(sum, bitand_m256(agree, x));
            div = add_m256(div, bitand_m256(agree, w));
        }
        // No agreeing weight: divide by 1.
        let none = cmp_op_mask_m256::<_CMP_EQ_OQ>(div, k.zero);
        (sum, blend_varying_m256(div, k.one, none))
    } else {
        let mut sum = k.zero;
        for &x in x {
            sum = add_m256(sum, x);
        }
        (sum, k.wsum)
    };
    let mixed = if c.normalize { div_m256(sum, div) } else { sum };
    add_m256(b, mul_m256(k.lambda, mixed))
}

/// [`combine`] for exactly `M` models: the per-model values of a group stay in registers.
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
    let w: [m256; M] = core::array::from_fn(|i| set_splat_m256(weights[i]));
    let base_groups = (!base.is_empty()).then(|| &base[..n * GROUP].as_chunks::<GROUP>().0[..n]);
    let mut x = [k.zero; M];
    let finite = groups_loop(c, &k, groups, base_groups, &w, &mut x, |x, g| {
        for i in 0..M {
            x[i] = mul_m256(w[i], load_unaligned_m256(&d[i][g]));
        }
    });
    (n * GROUP, finite)
}

/// The group loop of both versions: `load(x, g)` fills the weighted deltas of group `g`; the
/// output goes to `groups`. Returns whether every output is within [`super::RANGE_LIMIT`].
#[inline(always)]
fn groups_loop<X: AsMut<[m256]> + ?Sized>(
    c: Combine,
    k: &Consts,
    groups: &mut [[f32; GROUP]],
    base_groups: Option<&[[f32; GROUP]]>,
    w: &[m256],
    x: &mut X,
    mut load: impl FnMut(&mut X, usize),
) -> bool {
    let mut bad = k.zero;
    for (g, o) in groups.iter_mut().enumerate() {
        load(x, g);
        let b = match base_groups {
            Some(b) => load_unaligned_m256(&b[g]),
            None => k.zero,
        };
        let v = mix(c, k, x.as_mut(), w, b);
        bad = bitor_m256(bad, out_of_range(v));
        *o = v.into();
    }
    move_mask_m256(bad) == 0
}

/// [`combine`] for any number of models.
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
    let w: Vec<m256> = weights.iter().map(|&w| set_splat_m256(w)).collect();
    let base_groups = (!base.is_empty()).then(|| &base[..n * GROUP].as_chunks::<GROUP>().0[..n]);
    let mut x = vec![k.zero; m];
    let finite = groups_loop(c, &k, groups, base_groups, &w, &mut x, |x, g| {
        for ((x, w), d) in x.iter_mut().zip(&w).zip(&d) {
            *x = mul_m256(*w, load_unaligned_m256(&d[g]));
        }
    });
    (n * GROUP, finite)
}
