//! What a merge reports: per model the share of exactly-zero deltas, the delta RMS and its
//! ratio to the base's quantization noise, the kept share; per output type the delta retention
//! ⟨q(merged) − base, Δ⟩ / ⟨Δ, Δ⟩; the requantization mode and, on the base's grid, what
//! happened to the blocks ([`GridReport`]); and advice ([`MergeReport::warnings`]) when noise
//! dominates a delta or requantization rounds a merge away. Built from the engine's per-tensor
//! [`TensorStats`], summed in plan order.

use crate::format::output::Destination;
use crate::format::GgmlType;
use crate::merge::engine::{signal_to_noise, TensorStats};
use crate::merge::method::Kind;
use crate::merge::plan::{MergePlan, TensorAction};
use crate::quant::grid::{GridCounts, Requant};

/// Per-model measurements of a merge.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelReport {
    /// The model's path.
    pub path: String,
    /// Share of delta elements that were exactly zero (quantized experts: high values mean the
    /// fine-tune's change is below the quantization step).
    pub zero_delta_share: f64,
    /// RMS of the delta.
    pub delta_rms: f64,
    /// Delta RMS over the rounding noise expected from two independent quantizations at the
    /// base's step (`None` for unquantized bases). Below ~2, noise dominates.
    pub signal_to_noise: Option<f64>,
    /// Share of delta elements kept after sparsification (non-zero).
    pub kept_share: f64,
}

/// Delta retention of one output type.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionReport {
    /// Output type.
    pub ty: String,
    /// ⟨q(merged) − base, Δ⟩ / ⟨Δ, Δ⟩ over the merged tensors of this type.
    pub retention: f64,
    /// Tensors.
    pub tensors: usize,
}

/// What on-grid requantization did (a merge in a [`Requant`] mode on the grid).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GridReport {
    /// Merged tensors requantized on the base's grid.
    pub tensors: usize,
    /// Their blocks: kept (no element changed), moved (changed elements re-encoded on the
    /// base's grid), fallback (quantized the usual way: a changed value beyond the grid's
    /// range, or a zero scale).
    pub blocks: GridCounts,
    /// Merged tensors of the base's type whose type has no grid codec, requantized in full:
    /// (type name, tensors), in order of first appearance. F32 outputs are exact and not
    /// listed.
    pub full_types: Vec<(String, usize)>,
    /// Merged tensors whose output type differs from the base tensor's (`--type`), quantized
    /// in full.
    pub other_type_tensors: usize,
}

/// Summary of a merge.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// Tensors in the output.
    pub tensors: usize,
    /// Tensors merged.
    pub merged: usize,
    /// Tensors copied verbatim.
    pub copied: usize,
    /// Output size.
    pub output_bytes: u64,
    /// Where the output went, and in which format.
    pub destination: Destination,
    /// Wall time.
    pub seconds: f64,
    /// Per model.
    pub models: Vec<ModelReport>,
    /// Per output type.
    pub retention: Vec<RetentionReport>,
    /// How tensors of the base's type were requantized.
    pub requant: Requant,
    /// On-grid requantization's counts (`None` for [`Requant::Full`]).
    pub grid: Option<GridReport>,
    /// Advice for the user (noise-dominated experts, low retention, absurd packs).
    pub warnings: Vec<String>,
}

/// Running totals of the engine's per-tensor measurements.
#[derive(Default)]
pub(crate) struct Totals {
    zero: Vec<u64>,
    sumsq: Vec<f64>,
    kept: Vec<u64>,
    elements: u64,
    step_sumsq: f64,
    step_blocks: u64,
    /// (type, Σ numerator, Σ denominator, tensors)
    retention: Vec<(GgmlType, f64, f64, usize)>,
    merged: usize,
    grid: GridReport,
}

impl Totals {
    /// Totals for `models` models.
    pub(crate) fn new(models: usize) -> Totals {
        Totals {
            zero: vec![0; models],
            sumsq: vec![0.0; models],
            kept: vec![0; models],
            ..Totals::default()
        }
    }

    /// Adds a merged tensor's measurements (its output type `out_ty`, the base tensor's type
    /// `base_ty`).
    pub(crate) fn add(&mut self, st: &TensorStats, out_ty: GgmlType, base_ty: GgmlType) {
        self.merged += 1;
        match &st.grid {
            Some(counts) => {
                self.grid.tensors += 1;
                self.grid.blocks.add(counts);
            }
            None if out_ty != base_ty => self.grid.other_type_tensors += 1,
            None if out_ty == GgmlType::F32 => {}
            None => match self
                .grid
                .full_types
                .iter_mut()
                .find(|t| t.0 == out_ty.name())
            {
                Some(t) => t.1 += 1,
                None => self.grid.full_types.push((out_ty.name().into(), 1)),
            },
        }
        self.elements += st.elements;
        for i in 0..st.kept.len().min(self.kept.len()) {
            self.zero[i] += st.zero_deltas[i];
            self.sumsq[i] += st.delta_sumsq[i];
            self.kept[i] += st.kept[i];
        }
        self.step_sumsq += st.step_sumsq;
        self.step_blocks += st.step_blocks;
        if st.retention_den > 0.0 && out_ty != GgmlType::F32 {
            match self.retention.iter_mut().find(|r| r.0 == out_ty) {
                Some(r) => {
                    r.1 += st.retention_num;
                    r.2 += st.retention_den;
                    r.3 += 1;
                }
                None => self
                    .retention
                    .push((out_ty, st.retention_num, st.retention_den, 1)),
            }
        }
    }
}

/// The report of a run of `plan` (what it measured in `totals`).
pub(crate) fn report(
    plan: &MergePlan,
    totals: Totals,
    destination: Destination,
    output_bytes: u64,
    seconds: f64,
) -> MergeReport {
    let Totals {
        zero,
        sumsq,
        kept,
        elements,
        step_sumsq,
        step_blocks,
        retention,
        merged,
        grid,
    } = totals;
    let step_rms = (step_blocks > 0).then(|| (step_sumsq / step_blocks as f64).sqrt());
    let mut warnings = plan.warnings.clone();
    let e = elements.max(1) as f64;
    let models: Vec<ModelReport> = plan
        .models()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let delta_rms = (sumsq[i] / e).sqrt();
            let snr = step_rms.map(|s| signal_to_noise(delta_rms, s));
            if let Some(snr) = snr.filter(|s| *s < 2.0) {
                if plan.method.kind == Kind::TaskVector {
                    warnings.push(format!(
                        "{}: its delta (RMS {delta_rms:.2e}) is comparable to the rounding noise of the base's quantization \
                         (ratio {snr:.2}): if the fine-tune was trained from unquantized weights, much of what is merged is \
                         rounding noise — prefer a higher-precision (F16/Q8_0) base and experts",
                        m.path().display()
                    ));
                }
            }
            ModelReport {
                path: m.path().display().to_string(),
                zero_delta_share: zero[i] as f64 / e,
                delta_rms,
                signal_to_noise: snr,
                kept_share: kept[i] as f64 / e,
            }
        })
        .collect();
    let retention: Vec<RetentionReport> = retention
        .into_iter()
        .map(|(ty, num, den, tensors)| {
            let r = num / den;
            if r < 0.5 {
                warnings.push(format!(
                    "{ty} output keeps only {:.0}% of the merged delta (requantization rounds small changes away): \
                     use DARE (dare_ties / dare_linear) with a lower density so kept deltas are rescaled above the step, \
                     or more bits for the changed tensors (--type Q8_0)",
                    r * 100.0
                ));
            }
            RetentionReport {
                ty: ty.name().into(),
                retention: r,
                tensors,
            }
        })
        .collect();
    MergeReport {
        tensors: plan.tensors.len(),
        merged,
        copied: plan
            .tensors
            .iter()
            .filter(|t| t.action == TensorAction::Copy)
            .count(),
        output_bytes,
        destination,
        seconds,
        models,
        retention,
        requant: plan.requant,
        grid: plan.requant.on_grid().then_some(grid),
        warnings,
    }
}
