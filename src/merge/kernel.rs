//! Per-chunk merge arithmetic: sparsify each model's delta, weight, elect signs, combine.
//!
//! Everything here works on f32 slices of one chunk of rows and knows nothing about files. A
//! chunk's result depends only on its data, its global element offset and the per-tensor
//! statistics computed before (rank cuts, L1 factors, slerp angles), never on which thread
//! runs it — this is what makes merges byte-identical for any thread count and chunk size.

use crate::merge::mask::{self, MaskKey};
use crate::merge::select::RankCut;

/// How each model's delta is sparsified before combining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsifier {
    /// Keep every element.
    None,
    /// DARE: keep each element with probability `density` (Philox mask).
    Random,
    /// TIES: keep the top `density` fraction by magnitude.
    Magnitude,
    /// Breadcrumbs: drop the top `gamma` fraction, keep the next `density` fraction.
    Outliers,
    /// DELLA: keep with probability rising with the magnitude rank within the row.
    Della,
}

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
pub fn sparsify(
    kind: Sparsifier,
    p: &ModelSparsity,
    start: u64,
    n_per_row: usize,
    delta: &mut [f32],
) {
    match kind {
        Sparsifier::None => {}
        Sparsifier::Random => {
            let scale = match p.scale {
                ScaleRule::Factor(f) => f,
                _ => 1.0,
            };
            mask::dare_in_place(&p.key, p.density, start, delta, scale);
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
        }
        Sparsifier::Della => della_rows(p, start, n_per_row, delta),
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
pub fn combine(c: Combine, base: &[f32], deltas: &[Vec<f32>], weights: &[f32], out: &mut [f32]) {
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
