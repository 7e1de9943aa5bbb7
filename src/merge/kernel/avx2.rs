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
    add_m256, bitand_m256, bitandnot_m256, bitxor_m256, blend_varying_m256, cmp_op_mask_m256,
    div_m256, load_unaligned_m256, m256, mul_m256, set_splat_m256, zeroed_m256,
};

use super::Combine;

/// Elements per register.
const GROUP: usize = 8;

/// Combines the whole groups of 8 at the start of `out` (see [`super::combine`] for the
/// meaning) and returns how many elements it wrote; the caller finishes the rest.
pub(super) fn combine(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> usize {
    // The scalar loop zips deltas with weights: extra entries of either are ignored.
    let m = deltas.len().min(weights.len());
    let (deltas, weights) = (&deltas[..m], &weights[..m]);
    // Per model: its weight splat and its delta groups.
    let models: Vec<(m256, &[[f32; GROUP]])> = deltas
        .iter()
        .zip(weights)
        .map(|(d, &w)| (set_splat_m256(w), d[..out.len()].as_chunks::<GROUP>().0))
        .collect();
    let base_groups = if base.is_empty() {
        None
    } else {
        Some(base[..out.len()].as_chunks::<GROUP>().0)
    };
    let (zero, one) = (zeroed_m256(), set_splat_m256(1.0));
    let lambda = set_splat_m256(c.lambda);
    let wsum = set_splat_m256(super::weight_sum(weights));
    let (groups, _) = out.as_chunks_mut::<GROUP>();
    for (g, o) in groups.iter_mut().enumerate() {
        let (sum, div) = if c.consensus {
            // The sign vote s = Σ wᵢ·δᵢ (ties positive), then the sum and weight of the
            // non-zero terms agreeing with it.
            let mut vote = zero;
            for (w, d) in &models {
                vote = add_m256(vote, mul_m256(*w, load_unaligned_m256(&d[g])));
            }
            let positive_vote = cmp_op_mask_m256::<_CMP_GE_OQ>(vote, zero);
            let (mut sum, mut div) = (zero, zero);
            for (w, d) in &models {
                let x = mul_m256(*w, load_unaligned_m256(&d[g]));
                // x != 0 (true for NaN, as in Rust) and (x > 0) == (s >= 0).
                let nonzero = cmp_op_mask_m256::<_CMP_NEQ_UQ>(x, zero);
                let positive = cmp_op_mask_m256::<_CMP_GT_OQ>(x, zero);
                let agree = bitandnot_m256(bitxor_m256(positive, positive_vote), nonzero);
                // A disagreeing term adds +0, which leaves the sums' bits unchanged (they
                // start at +0 and are never −0; see the portable version).
                sum = add_m256(sum, bitand_m256(agree, x));
                div = add_m256(div, bitand_m256(agree, *w));
            }
            // No agreeing weight: divide by 1.
            let none = cmp_op_mask_m256::<_CMP_EQ_OQ>(div, zero);
            (sum, blend_varying_m256(div, one, none))
        } else {
            let mut sum = zero;
            for (w, d) in &models {
                sum = add_m256(sum, mul_m256(*w, load_unaligned_m256(&d[g])));
            }
            (sum, wsum)
        };
        let mixed = if c.normalize { div_m256(sum, div) } else { sum };
        let b = match base_groups {
            Some(b) => load_unaligned_m256(&b[g]),
            None => zero,
        };
        *o = add_m256(b, mul_m256(lambda, mixed)).into();
    }
    groups.len() * GROUP
}
