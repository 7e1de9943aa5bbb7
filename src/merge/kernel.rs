//! Per-chunk merge arithmetic: sparsify each model's delta, weight, elect signs, combine.
//!
//! Everything here works on f32 slices of one chunk of rows and knows nothing about files. A
//! chunk's result depends only on its data, its global element offset and the per-tensor
//! statistics computed before (rank cuts, L1 factors, slerp angles), never on which thread
//! runs it — this is what makes merges byte-identical for any thread count and chunk size.

use crate::merge::mask::{self, MaskKey};
use crate::merge::method::Sparsifier;
use crate::merge::select::RankCut;

/// How survivors of a sparsifier are rescaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleRule {
    /// No rescaling.
    None,
    /// Multiply every survivor by this factor (÷ density for DARE, or an L1 ratio).
    Factor(f32),
    /// DELLA with inverse rescale: divide each survivor by its own keep probability.
    InverseProbability,
}

/// Per-model, per-tensor sparsification parameters (resolved from the config).
#[derive(Clone, Debug)]
pub struct ModelSparsity {
    /// Keep fraction.
    pub density: f64,
    /// DELLA's half-width of the probability range.
    pub epsilon: f64,
    /// Mask key (seed, stream, tensor name).
    pub key: MaskKey,
    /// For Magnitude/Outliers: the rank window [upper, lower) as cuts.
    pub keep_from: RankCut,
    /// Lower end of the window.
    pub keep_until: RankCut,
    /// Elements equal to `keep_from`'s / `keep_until`'s magnitude before this chunk.
    pub equal_before_chunk: (u64, u64),
    /// Rescale rule.
    pub scale: ScaleRule,
}

/// Applies the sparsifier to one chunk of one model's delta in place. `start` is the global
/// index of `delta[0]` in the tensor; rows are `n_per_row` long and the chunk holds whole rows.
///
/// Returns the number of non-zero elements left where it was counted on the way (DARE), for
/// the merge report; `None` where the caller must count them.
pub fn sparsify(
    kind: Sparsifier,
    p: &ModelSparsity,
    start: u64,
    n_per_row: usize,
    delta: &mut [f32],
) -> Option<u64> {
    match kind {
        Sparsifier::None => None,
        Sparsifier::Random => {
            let scale = match p.scale {
                ScaleRule::Factor(f) => f,
                _ => 1.0,
            };
            Some(mask::dare_in_place_nonzeros(
                &p.key, p.density, start, delta, scale,
            ))
        }
        Sparsifier::Magnitude | Sparsifier::Outliers => {
            let (mut seen_from, mut seen_until) = p.equal_before_chunk;
            let scale = match p.scale {
                ScaleRule::Factor(f) => f,
                _ => 1.0,
            };
            for v in delta.iter_mut() {
                let b = v.abs().to_bits();
                // Rank below `keep_until` (inside the top) but not below `keep_from`.
                let in_top = p.keep_until.below(b, seen_until);
                let in_removed = p.keep_from.below(b, seen_from);
                if b == p.keep_from.value_bits {
                    seen_from += 1;
                }
                if b == p.keep_until.value_bits {
                    seen_until += 1;
                }
                *v = if in_top && !in_removed {
                    *v * scale
                } else {
                    0.0
                };
            }
            None
        }
        Sparsifier::Della => {
            della_rows(p, start, n_per_row, delta);
            None
        }
    }
}

/// DELLA keep probabilities for one row: (density − ε) + 2ε · (rank − 1)/(n − 1), rank by
/// ascending magnitude (ties by index), as mergekit's `della_magprune`.
pub fn della_probabilities(row: &[f32], density: f64, epsilon: f64, out: &mut [f32]) {
    let n = row.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by(|&a, &b| {
        row[a as usize]
            .abs()
            .total_cmp(&row[b as usize].abs())
            .then(a.cmp(&b))
    });
    let denom = (n.max(2) - 1) as f64;
    for (rank, &i) in order.iter().enumerate() {
        let norm = if n > 1 { rank as f64 / denom } else { 0.0 };
        out[i as usize] = (density - epsilon + norm * 2.0 * epsilon) as f32;
    }
}

fn della_rows(p: &ModelSparsity, start: u64, n_per_row: usize, delta: &mut [f32]) {
    let mut probs = vec![0f32; n_per_row];
    let mut keep = vec![false; n_per_row];
    for (r, row) in delta.chunks_mut(n_per_row).enumerate() {
        della_probabilities(row, p.density, p.epsilon, &mut probs);
        let row_start = start + (r * n_per_row) as u64;
        mask::keep_with_probability(&p.key, row_start, &probs, &mut keep);
        for ((v, &k), &pr) in row.iter_mut().zip(&keep).zip(&probs) {
            *v = if !k {
                0.0
            } else {
                match p.scale {
                    ScaleRule::None => *v,
                    ScaleRule::Factor(f) => *v * f,
                    ScaleRule::InverseProbability => *v / pr,
                }
            };
        }
    }
}

/// How sparsified, weighted deltas are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Combine {
    /// TIES sign election: keep only deltas agreeing with the sign of Σ wᵢδᵢ (ties positive).
    pub consensus: bool,
    /// Divide by Σ of the (agreeing) weights.
    pub normalize: bool,
    /// Scale of the mixed delta.
    pub lambda: f32,
}

/// Combines the (already sparsified) deltas of one chunk into `out` = base + λ·mixed.
/// `base` may be empty (linear merges have no base: the result is the weighted sum itself).
///
/// Per element j, with `xᵢ = wᵢ·δᵢ[j]` and sums taken in model order starting from +0:
/// without consensus, mixed = Σ xᵢ (÷ Σ wᵢ when normalizing, unless |Σ wᵢ| < 1e-8); with
/// consensus, the majority sign is that of Σ xᵢ (ties positive), only non-zero xᵢ of that sign
/// are summed, and the divisor is the sum of their weights (1 when none agree).
///
/// This is the vectorized version, with the instruction set chosen at run time; its result is
/// bit-identical to [`combine_scalar`], the plain reference, for every input (NaN payloads
/// aside): each element sees the same IEEE operations in the same order, only several elements
/// at once. Every delta and a non-empty `base` must be at least `out.len()` long.
///
/// Returns whether every output value is within ±[`RANGE_LIMIT`] (NaN and ±Inf are not;
/// checked on the way, so the caller need not scan `out` again unless it is not).
pub fn combine(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(cpu) = super::simd::Avx2::get() {
        let (done, in_range) = avx2::combine(cpu, c, base, deltas, weights, out);
        combine_blocks(c, base, deltas, weights, done, &mut out[done..]);
        return in_range && all_in_range(&out[done..]);
    }
    combine_blocks(c, base, deltas, weights, 0, out);
    all_in_range(out)
}

/// The magnitude every merged value stays within unless something is wrong: F16's largest
/// value, and so what F16 outputs and the F16 block scales of the quantized types can hold.
/// Real weights are orders of magnitude smaller; a merge beyond it comes from its parameters.
pub const RANGE_LIMIT: f32 = 65504.0;

/// Whether every value is finite and within ±[`RANGE_LIMIT`] (a branch-free scan that
/// vectorizes: the bits of |x| order like the values, NaN and ±Inf last).
pub fn all_in_range(x: &[f32]) -> bool {
    let limit = RANGE_LIMIT.to_bits();
    x.iter().fold(0u32, |a, v| {
        a | u32::from(v.to_bits() & 0x7fff_ffff > limit)
    }) == 0
}

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The divisor of a normalized merge without consensus, the same for every element: Σ wᵢ from
/// +0 in model order, or 1 when it is (nearly) zero.
#[inline]
fn weight_sum(weights: &[f32]) -> f32 {
    let mut wsum = 0f32;
    for &w in weights {
        wsum += w;
    }
    if wsum.abs() < 1e-8 {
        1.0
    } else {
        wsum
    }
}

/// Elements per block of [`combine`]: its per-element accumulators for one block live on the
/// stack (3 × 2 KiB), and each model's slice of the block is read while it is still in L1.
const BLOCK: usize = 512;

/// The portable body of [`combine`] for elements `start..start + out.len()` of `base` and the
/// deltas: per block of [`BLOCK`] elements, one pass per model over contiguous
/// slices (model order, as the scalar loop), then one pass for the divisor and base. Written so
/// that each pass is a straight element-wise loop the compiler vectorizes; no `mul_add`, and
/// Rust never contracts `a * b + c` into an FMA, so the `fma` targets change nothing numerically.
/// A disagreeing term is added as +0, which leaves every accumulator as it was (see below).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "x86_64+sse4.1",
    "aarch64+neon"
))]
fn combine_blocks(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    start: usize,
    out: &mut [f32],
) {
    // The scalar loop zips deltas with weights: extra entries of either are ignored.
    let m = deltas.len().min(weights.len());
    let (deltas, weights) = (&deltas[..m], &weights[..m]);
    let wsum = weight_sum(weights);
    let mut s_buf = [0f32; BLOCK];
    let mut sum_buf = [0f32; BLOCK];
    let mut div_buf = [0f32; BLOCK];
    for (bi, o) in out.chunks_mut(BLOCK).enumerate() {
        let off = start + bi * BLOCK;
        let len = o.len();
        let sum = &mut sum_buf[..len];
        sum.fill(0.0);
        let div: &[f32] = if c.consensus {
            // Pass 1: s = Σ wᵢ·δᵢ, the sign vote.
            let s = &mut s_buf[..len];
            s.fill(0.0);
            for (d, &w) in deltas.iter().zip(weights) {
                for (a, &x) in s.iter_mut().zip(&d[off..off + len]) {
                    *a += w * x;
                }
            }
            // Pass 2: sum and weight of the non-zero terms agreeing with sign(s) (s ≥ 0: +).
            let div = &mut div_buf[..len];
            div.fill(0.0);
            for (d, &w) in deltas.iter().zip(weights) {
                let terms = sum.iter_mut().zip(div.iter_mut()).zip(s.iter());
                for (((a, v), &sj), &x) in terms.zip(&d[off..off + len]) {
                    let x = w * x;
                    let agree = x != 0.0 && (x > 0.0) == (sj >= 0.0);
                    // Adding +0 for a disagreeing term leaves the sum's bits unchanged: sums
                    // start at +0 and a round-to-nearest sum is −0 only when both terms are,
                    // so no accumulator is ever −0 (the one value that `+ 0` would change).
                    // (A select of `*a + x` and `*a` compiles to a masked store, slow on AMD.)
                    *a += if agree { x } else { 0.0 };
                    *v += if agree { w } else { 0.0 };
                }
            }
            // The guard (no agreeing weight: divide by 1) is applied in pass 3, as a value:
            // a conditional store here compiles to a masked store, slow on AMD.
            div
        } else {
            for (d, &w) in deltas.iter().zip(weights) {
                for (a, &x) in sum.iter_mut().zip(&d[off..off + len]) {
                    *a += w * x;
                }
            }
            &[]
        };
        // Pass 3: out = b + λ·mixed, with b = 0 (added, as the scalar loop does) without base.
        let lambda = c.lambda;
        match (base.is_empty(), c.normalize, c.consensus) {
            (true, false, _) => {
                for (o, &a) in o.iter_mut().zip(sum.iter()) {
                    *o = 0.0 + lambda * a;
                }
            }
            (false, false, _) => {
                for ((o, &a), &b) in o.iter_mut().zip(sum.iter()).zip(&base[off..off + len]) {
                    *o = b + lambda * a;
                }
            }
            (true, true, false) => {
                for (o, &a) in o.iter_mut().zip(sum.iter()) {
                    *o = 0.0 + lambda * (a / wsum);
                }
            }
            (false, true, false) => {
                for ((o, &a), &b) in o.iter_mut().zip(sum.iter()).zip(&base[off..off + len]) {
                    *o = b + lambda * (a / wsum);
                }
            }
            (true, true, true) => {
                for ((o, &a), &v) in o.iter_mut().zip(sum.iter()).zip(div) {
                    let v = if v == 0.0 { 1.0 } else { v };
                    *o = 0.0 + lambda * (a / v);
                }
            }
            (false, true, true) => {
                let terms = o.iter_mut().zip(sum.iter()).zip(div);
                for (((o, &a), &v), &b) in terms.zip(&base[off..off + len]) {
                    let v = if v == 0.0 { 1.0 } else { v };
                    *o = b + lambda * (a / v);
                }
            }
        }
    }
}

/// The reference for [`combine`]: one element at a time, exactly as specified there. Slow (the
/// model loop is innermost), kept to test the fast version against.
pub fn combine_scalar(
    c: Combine,
    base: &[f32],
    deltas: &[Vec<f32>],
    weights: &[f32],
    out: &mut [f32],
) {
    for j in 0..out.len() {
        let b = if base.is_empty() { 0.0 } else { base[j] };
        let mut sum = 0f32;
        let mut div = 0f32;
        if c.consensus {
            let mut s = 0f32;
            for (d, w) in deltas.iter().zip(weights) {
                s += w * d[j];
            }
            let majority = if s >= 0.0 { 1.0 } else { -1.0 };
            for (d, &w) in deltas.iter().zip(weights) {
                let x = w * d[j];
                // sign(x) == majority: zero deltas agree with neither sign (mergekit's mask).
                if x != 0.0 && (x > 0.0) == (majority > 0.0) {
                    sum += x;
                    div += w;
                }
            }
            if div == 0.0 {
                div = 1.0;
            }
        } else {
            for (d, &w) in deltas.iter().zip(weights) {
                sum += w * d[j];
                div += w;
            }
            if div.abs() < 1e-8 {
                div = 1.0;
            }
        }
        let mixed = if c.normalize { sum / div } else { sum };
        out[j] = b + c.lambda * mixed;
    }
}

/// SLERP coefficients (s0, s1) for interpolation parameter `t` given the tensors' dot product
/// and squared norms, as mergekit: lerp when the normalized vectors are nearly colinear.
pub fn slerp_coefficients(t: f64, dot: f64, norm0_sq: f64, norm1_sq: f64) -> (f32, f32) {
    const DOT_THRESHOLD: f64 = 0.9995;
    const EPS: f64 = 1e-8;
    let n0 = norm0_sq.sqrt().max(EPS);
    let n1 = norm1_sq.sqrt().max(EPS);
    let cos = dot / (n0 * n1);
    if cos.abs() > DOT_THRESHOLD {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta0 = cos.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t;
    (
        ((theta0 - theta_t).sin() / sin0) as f32,
        (theta_t.sin() / sin0) as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::simd::with_portable;
    use proptest::prelude::*;

    fn c(consensus: bool, normalize: bool) -> Combine {
        Combine {
            consensus,
            normalize,
            lambda: 1.0,
        }
    }

    #[test]
    fn task_arithmetic_by_hand() {
        let base = [1.0, 2.0, 3.0];
        let deltas = vec![vec![0.5, -1.0, 0.0], vec![0.25, 1.0, 0.0]];
        let mut out = [0.0; 3];
        combine(c(false, false), &base, &deltas, &[1.0, 2.0], &mut out);
        assert_eq!(out, [1.0 + 0.5 + 0.5, 2.0 - 1.0 + 2.0, 3.0]);
        combine(c(false, true), &base, &deltas, &[1.0, 2.0], &mut out);
        assert_eq!(out, [1.0 + 1.0 / 3.0, 2.0 + 1.0 / 3.0, 3.0]);
    }

    #[test]
    fn ties_sign_election_by_hand() {
        let base = [0.0; 4];
        // element 0: +0.5 and -0.2 → sum +0.3 → keep +0.5 only.
        // element 1: +0.2 and -0.2 → sum 0 → tie goes positive → keep +0.2.
        // element 2: zeros everywhere → 0 (divisor guard).
        // element 3: -1 and -3 → both agree.
        let deltas = vec![vec![0.5, 0.2, 0.0, -1.0], vec![-0.2, -0.2, 0.0, -3.0]];
        let mut out = [9.0; 4];
        combine(c(true, false), &base, &deltas, &[1.0, 1.0], &mut out);
        assert_eq!(out, [0.5, 0.2, 0.0, -4.0]);
        combine(c(true, true), &base, &deltas, &[1.0, 1.0], &mut out);
        assert_eq!(out, [0.5, 0.2, 0.0, -2.0]);
    }

    #[test]
    fn linear_without_base() {
        let deltas = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        let mut out = [0.0; 2];
        combine(c(false, true), &[], &deltas, &[0.5, 0.5], &mut out);
        assert_eq!(out, [2.0, 4.0]);
    }

    /// Bit equality, except that any NaN equals any NaN (Rust leaves NaN payloads unspecified).
    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    /// Values that make exact ties, zeros of both signs, overflow and ordinary noise likely.
    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            3 => Just(0.0f32),
            1 => Just(-0.0f32),
            4 => (-8i32..=8).prop_map(|i| i as f32 * 0.25),
            4 => -2.0f32..2.0,
            1 => prop_oneof![Just(3e38f32), Just(-3e38f32), Just(1e-40f32), Just(-1e-40f32)],
        ]
    }

    fn weight() -> impl Strategy<Value = f32> {
        prop_oneof![
            3 => (-4i32..=4).prop_map(|i| i as f32 * 0.5),
            3 => -1.5f32..1.5,
            1 => Just(-0.0f32),
            1 => Just(1e-9f32),
        ]
    }

    type Case = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>, bool, bool, f32);

    fn case() -> impl Strategy<Value = Case> {
        (1usize..=5, 0usize..=1000).prop_flat_map(|(m, n)| {
            (
                proptest::collection::vec(proptest::collection::vec(value(), n), m),
                proptest::collection::vec(weight(), m),
                prop_oneof![Just(Vec::new()), proptest::collection::vec(value(), n)],
                any::<bool>(),
                any::<bool>(),
                prop_oneof![Just(1.0f32), -2.0f32..2.0],
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn fast_combine_is_bit_identical_to_scalar(
            (deltas, weights, base, consensus, normalize, lambda) in case()
        ) {
            let n = deltas[0].len();
            let c = Combine { consensus, normalize, lambda };
            let mut fast = vec![f32::NAN; n];
            let mut slow = vec![f32::NAN; n];
            combine_scalar(c, &base, &deltas, &weights, &mut slow);
            // The AVX2 kernel where the CPU has AVX2, and the portable one.
            for portable in [false, true] {
                with_portable(portable, || combine(c, &base, &deltas, &weights, &mut fast));
                prop_assert!(
                    same_bits(&fast, &slow),
                    "{c:?} portable {portable}\nfast {fast:?}\nslow {slow:?}"
                );
            }
        }
    }

    #[test]
    fn fast_combine_handles_signed_zeros_like_scalar() {
        // A zero-weight or zero-delta vote, empty base, λ = −1: results of ±0 must keep their
        // sign exactly as the reference computes it.
        let deltas = [vec![0.0, -0.0, 1.0, -1.0], vec![-0.0, 0.0, -1.0, 1.0]];
        for (consensus, normalize) in [(false, false), (false, true), (true, false), (true, true)] {
            for w in [[1.0, 1.0], [-0.0, 0.0], [1.0, -1.0]] {
                let c = Combine {
                    consensus,
                    normalize,
                    lambda: -1.0,
                };
                // 9 elements: one AVX2 group and a portable tail.
                let deltas: Vec<Vec<f32>> = deltas
                    .iter()
                    .map(|d| d.iter().cycle().take(9).copied().collect())
                    .collect();
                for portable in [false, true] {
                    let (mut fast, mut slow) = ([9.0; 9], [9.0; 9]);
                    with_portable(portable, || combine(c, &[], &deltas, &w, &mut fast));
                    combine_scalar(c, &[], &deltas, &w, &mut slow);
                    assert!(same_bits(&fast, &slow), "{c:?} {w:?}: {fast:?} vs {slow:?}");
                }
            }
        }
    }

    #[test]
    fn combine_reports_output_out_of_range() {
        // 20 elements: two AVX2 groups and a portable tail; one large value in each part.
        for at in [3, 19] {
            let c = Combine {
                consensus: false,
                normalize: false,
                lambda: 1.0,
            };
            // (delta value, weight, whether the sum of two stays in range)
            for (x, w, ok) in [
                (f32::MAX, 1.0, false),         // overflows to +inf
                (f32::MAX, 1e-3, false),        // finite, far beyond F16
                (RANGE_LIMIT / 2.0, 1.0, true), // exactly the limit
                (RANGE_LIMIT, 1.0, false),      // twice the limit
                (1.0, 1.0, true),
            ] {
                let mut d = vec![1.0f32; 20];
                d[at] = x;
                let deltas = vec![d.clone(), d];
                for portable in [false, true] {
                    let mut out = [0f32; 20];
                    let in_range =
                        with_portable(portable, || combine(c, &[], &deltas, &[w, w], &mut out));
                    assert_eq!(in_range, ok, "{x} × {w} at {at} (portable {portable})");
                    assert_eq!(in_range, all_in_range(&out));
                }
            }
        }
        assert!(!all_in_range(&[f32::NAN]) && !all_in_range(&[f32::NEG_INFINITY]));
        assert!(all_in_range(&[-RANGE_LIMIT, 0.0, -0.0]));
    }

    #[test]
    fn della_probabilities_span_the_range() {
        let row = [0.3, -0.1, 0.2, 0.0, -0.5];
        let mut p = [0.0; 5];
        della_probabilities(&row, 0.5, 0.1, &mut p);
        // ascending magnitude: 0.0(i3) 0.1(i1) 0.2(i2) 0.3(i0) 0.5(i4)
        let want = [0.55, 0.45, 0.5, 0.4, 0.6];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
        }
    }

    #[test]
    fn slerp_endpoints() {
        let (s0, s1) = slerp_coefficients(0.0, 0.3, 1.0, 1.0);
        assert!((s0 - 1.0).abs() < 1e-6 && s1.abs() < 1e-6);
        let (s0, s1) = slerp_coefficients(1.0, 0.3, 1.0, 1.0);
        assert!(s0.abs() < 1e-6 && (s1 - 1.0).abs() < 1e-6);
        // Colinear: plain lerp.
        assert_eq!(slerp_coefficients(0.25, 1.0, 1.0, 1.0), (0.75, 0.25));
    }
}
