//! Parameter values ([`ParamValue`]: number, flag, per-layer gradient, filtered rules), sets of
//! them ([`Params`]), and their resolution for one tensor ([`TensorContext`]).

use std::collections::BTreeMap;

/// One parameter's setting.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamValue {
    /// A number.
    Number(f64),
    /// `true` / `false`.
    Bool(bool),
    /// A per-layer gradient: knots spread evenly from the first layer to the last, linearly
    /// interpolated (see [`TensorContext::t`]). Never empty when parsed.
    Gradient(Vec<f64>),
    /// Rules tried in order; the first whose filter matches the tensor gives the value.
    Filtered(Vec<FilterRule>),
}

/// One rule of a [`ParamValue::Filtered`] list.
#[derive(Clone, Debug, PartialEq)]
pub struct FilterRule {
    /// A substring of the tensor's GGUF or Hugging Face name; `None` or `"*"` matches every
    /// tensor.
    pub filter: Option<String>,
    /// The value where the rule matches: `Number`, `Bool` or `Gradient`.
    pub value: ParamValue,
}

impl FilterRule {
    /// Whether the rule applies to the tensor. As in mergekit, a filter matches by substring;
    /// here it is tried against both the GGUF name and the Hugging Face name, so mergekit
    /// filters (`self_attn`, `mlp`) and GGUF ones (`attn_q`, `ffn_up`) both work. Note that a
    /// short filter may match more through the GGUF name than in mergekit: `attn` also matches
    /// `blk.N.attn_norm` (Hugging Face `input_layernorm`).
    pub fn matches(&self, ctx: &TensorContext<'_>) -> bool {
        match self.filter.as_deref() {
            None | Some("*") => true,
            Some(f) => {
                let hit = |name: &str| !name.is_empty() && name.contains(f);
                hit(ctx.gguf_name) || ctx.hf_name.is_some_and(hit)
            }
        }
    }
}

impl ParamValue {
    /// The value for one tensor: a `Number` or `Bool`, or `None` when no rule of a filtered
    /// list matches (or a gradient is empty). Gradients are interpolated exactly as mergekit's
    /// `evaluate_setting` does: with `s = t·(n−1)`, `i₀ = ⌊s⌋`, `i₁ = min(n−1, i₀+1)`,
    /// `f = s − i₀`, the value is `(1−f)·knot[i₀] + f·knot[i₁]`.
    pub fn evaluate(&self, ctx: &TensorContext<'_>) -> Option<ParamValue> {
        match self {
            ParamValue::Number(x) => Some(ParamValue::Number(*x)),
            ParamValue::Bool(b) => Some(ParamValue::Bool(*b)),
            ParamValue::Gradient(knots) => interpolate(knots, ctx.t()).map(ParamValue::Number),
            ParamValue::Filtered(rules) => rules
                .iter()
                .find(|r| r.matches(ctx))
                .and_then(|r| r.value.evaluate(ctx)),
        }
    }

    /// The number, if this is a `Number`.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            ParamValue::Number(x) => Some(*x),
            _ => None,
        }
    }

    /// The flag, if this is a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            ParamValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Every number the setting can take at a gradient knot or rule (interpolation stays
    /// between knots, so range checks on these cover every layer).
    pub(super) fn numbers(&self) -> Vec<f64> {
        match self {
            ParamValue::Number(x) => vec![*x],
            ParamValue::Bool(_) => Vec::new(),
            ParamValue::Gradient(k) => k.clone(),
            ParamValue::Filtered(rules) => rules.iter().flat_map(|r| r.value.numbers()).collect(),
        }
    }

    /// Whether every leaf is a number (or gradient), and whether every leaf is a bool.
    pub(super) fn leaf_kinds(&self) -> (bool, bool) {
        match self {
            ParamValue::Number(_) | ParamValue::Gradient(_) => (true, false),
            ParamValue::Bool(_) => (false, true),
            ParamValue::Filtered(rules) => rules.iter().fold((true, true), |(n, b), r| {
                let (rn, rb) = r.value.leaf_kinds();
                (n && rn, b && rb)
            }),
        }
    }
}

fn interpolate(knots: &[f64], t: f64) -> Option<f64> {
    let last = knots.len().checked_sub(1)?;
    let scaled = t * last as f64;
    // `as` truncates toward zero like Python's int(); the min guards t > 1.
    let i0 = (scaled as usize).min(last);
    let i1 = (i0 + 1).min(last);
    let frac = scaled - i0 as f64;
    Some((1.0 - frac) * knots[i0] + frac * knots[i1])
}

/// The tensor a parameter is resolved for.
#[derive(Clone, Copy, Debug)]
pub struct TensorContext<'a> {
    /// The GGUF tensor name, e.g. `blk.3.attn_q.weight`.
    pub gguf_name: &'a str,
    /// The Hugging Face name, e.g. `model.layers.3.self_attn.q_proj.weight`, when known.
    pub hf_name: Option<&'a str>,
    /// The layer (block) index, `None` for tensors outside the blocks (embeddings, output).
    pub layer: Option<u32>,
    /// The number of layers of the model.
    pub n_layers: u32,
}

impl TensorContext<'_> {
    /// The gradient position, as mergekit computes it for a `models:` merge: layer `i` of `n`
    /// is at `t = i / (n − 1)` (`t = 1` when `n ≤ 1`); tensors outside the layers
    /// (embeddings, final norm, output) are at `t = 0`, i.e. they take a gradient's first
    /// knot (mergekit's planner reads them with `t = 0`; versions before its `modules`
    /// rework used `t = 1` for the tensors after the layers).
    pub fn t(&self) -> f64 {
        match self.layer {
            Some(i) if self.n_layers > 1 => f64::from(i) / f64::from(self.n_layers - 1),
            Some(_) => 1.0,
            None => 0.0,
        }
    }
}

/// A set of named parameter settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    map: BTreeMap<String, ParamValue>,
}

impl Params {
    /// The setting of `name`, unevaluated.
    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.map.get(name)
    }

    /// Sets `name`, returning the previous setting.
    pub fn set(&mut self, name: impl Into<String>, value: ParamValue) -> Option<ParamValue> {
        self.map.insert(name.into(), value)
    }

    /// Removes `name`, returning its setting.
    pub fn remove(&mut self, name: &str) -> Option<ParamValue> {
        self.map.remove(name)
    }

    /// Whether no parameter is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The number of parameters set.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The settings, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }
}
