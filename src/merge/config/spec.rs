//! Which parameters exist ([`SPECS`]: kind, level, range), which each method reads
//! ([`Method::param_names`]) and their defaults, and the checks [`super::MergeConfig::validate`]
//! runs; the nesting check run on config text before parsing.

use super::{ConfigError, Method, ParamValue, Params};

pub(super) const GLOBAL_AT: &str = "the global parameters";

pub(super) fn model_at(model: &str) -> String {
    format!("model `{model}`")
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Number,
    Flag,
}

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Range {
    Finite,
    /// (0, 1]
    Density,
    /// [0, 1)
    Fraction,
}

pub(super) struct Spec {
    name: &'static str,
    kind: Kind,
    per_model: bool,
    range: Range,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "weight",
        kind: Kind::Number,
        per_model: true,
        range: Range::Finite,
    },
    Spec {
        name: "density",
        kind: Kind::Number,
        per_model: true,
        range: Range::Density,
    },
    Spec {
        name: "gamma",
        kind: Kind::Number,
        per_model: true,
        range: Range::Fraction,
    },
    Spec {
        name: "epsilon",
        kind: Kind::Number,
        per_model: true,
        range: Range::Fraction,
    },
    Spec {
        name: "lambda",
        kind: Kind::Number,
        per_model: false,
        range: Range::Finite,
    },
    Spec {
        name: "t",
        kind: Kind::Number,
        per_model: false,
        range: Range::Finite,
    },
    Spec {
        name: "normalize",
        kind: Kind::Flag,
        per_model: false,
        range: Range::Finite,
    },
    Spec {
        name: "int8_mask",
        kind: Kind::Flag,
        per_model: false,
        range: Range::Finite,
    },
    Spec {
        name: "rescale",
        kind: Kind::Flag,
        per_model: false,
        range: Range::Finite,
    },
];

pub(super) fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Checks one parameter set (`model`: the model it belongs to, `None` for the global one).
/// Refuses parameter names no method has, naming them all and where they stand.
pub(super) fn refuse_unknown(params: &Params, at: &str) -> Result<(), ConfigError> {
    let unknown: Vec<String> = params
        .iter()
        .filter(|(name, _)| spec(name).is_none())
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(ConfigError::UnknownParameters {
        names: unknown.join(", "),
        at: at.to_string(),
    })
}

pub(super) fn check_params(
    method: Method,
    params: &Params,
    at: &str,
    model: Option<&str>,
) -> Result<(), ConfigError> {
    refuse_unknown(params, at)?;
    for (name, value) in params.iter() {
        let spec = spec(name).expect("checked above");
        if !method.param_names().contains(&name) {
            return Err(ConfigError::ParameterNotUsed {
                name: name.to_string(),
                at: at.to_string(),
                method,
            });
        }
        if let (Some(model), false) = (model, spec.per_model) {
            return Err(ConfigError::GlobalOnlyParameter {
                name: name.to_string(),
                model: model.to_string(),
            });
        }
        let invalid = |reason: String| ConfigError::InvalidValue {
            name: name.to_string(),
            at: at.to_string(),
            reason,
        };
        check_shape(value).map_err(invalid)?;
        let (all_numbers, all_bools) = value.leaf_kinds();
        match spec.kind {
            Kind::Number if !all_numbers => {
                return Err(invalid("expected a number, a list of numbers (a gradient over the layers) or filter rules with such values".into()))
            }
            Kind::Flag if !all_bools => {
                return Err(invalid("expected true or false (or filter rules with true/false values)".into()))
            }
            _ => {}
        }
        for x in value.numbers() {
            let (ok, range) = match spec.range {
                Range::Finite => (
                    number_fits_f32(x),
                    "a finite number of at most 3.4e38 in magnitude",
                ),
                Range::Density => (x > 0.0 && x <= 1.0, "in (0, 1]"),
                Range::Fraction => ((0.0..1.0).contains(&x), "in [0, 1)"),
            };
            if !ok {
                return Err(invalid(format!("{x:?} is out of range: must be {range}")));
            }
        }
    }
    Ok(())
}

/// Structural checks for values built in code: no empty gradient or rule list, no nested rules.
fn check_shape(value: &ParamValue) -> Result<(), String> {
    match value {
        ParamValue::Gradient(k) if k.is_empty() => Err("empty gradient list".into()),
        ParamValue::Filtered(rules) if rules.is_empty() => Err("empty filter list".into()),
        ParamValue::Filtered(rules) => {
            if rules
                .iter()
                .any(|r| matches!(r.value, ParamValue::Filtered(_)))
            {
                return Err("a filter rule's value cannot itself be a list of rules".into());
            }
            rules.iter().try_for_each(|r| check_shape(&r.value))
        }
        _ => Ok(()),
    }
}

impl Method {
    /// The parameters the method reads (mergekit's declared parameters for it).
    pub fn param_names(self) -> &'static [&'static str] {
        const TASK: &[&str] = &[
            "weight",
            "density",
            "lambda",
            "normalize",
            "rescale",
            "int8_mask",
        ];
        const BREADCRUMBS: &[&str] = &[
            "weight",
            "density",
            "gamma",
            "lambda",
            "normalize",
            "rescale",
            "int8_mask",
        ];
        const DELLA: &[&str] = &[
            "weight",
            "density",
            "epsilon",
            "lambda",
            "normalize",
            "rescale",
            "int8_mask",
        ];
        match self {
            Method::Linear => &["weight", "normalize"],
            Method::Slerp => &["t"],
            Method::TaskArithmetic | Method::Ties | Method::DareLinear | Method::DareTies => TASK,
            Method::Breadcrumbs | Method::BreadcrumbsTies => BREADCRUMBS,
            Method::Della | Method::DellaLinear => DELLA,
        }
    }

    /// mergekit's default for a parameter of this method, if it has one (`weight` and `t` are
    /// required; `rescale` is resolved by [`MergeConfig::rescale`](super::MergeConfig::rescale)).
    pub fn default_param(self, name: &str) -> Option<ParamValue> {
        if !self.param_names().contains(&name) {
            return None;
        }
        match name {
            "density" | "lambda" => Some(ParamValue::Number(1.0)),
            "gamma" => Some(ParamValue::Number(0.01)),
            "epsilon" => Some(ParamValue::Number(0.15)),
            "normalize" => Some(ParamValue::Bool(self.default_normalize())),
            "int8_mask" => Some(ParamValue::Bool(false)),
            _ => None,
        }
    }
}

/// Deepest `[`/`{` nesting a config may have (its deepest real use, a filtered gradient, is 3).
pub const MAX_NESTING: usize = 32;

/// Refuses text whose flow brackets/braces nest deeper than [`MAX_NESTING`], outside quoted
/// strings and `#` comments — before a parser sees it (serde's YAML parser took 38 s on 100 000
/// open brackets before reporting its recursion limit).
pub(super) fn check_nesting(text: &str) -> Result<(), ConfigError> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            comment = false;
        } else if comment {
        } else if let Some(q) = quote {
            if c == '\\' && q == '"' {
                chars.next();
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                '"' | '\'' => quote = Some(c),
                '#' if prev.is_whitespace() => comment = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(ConfigError::TooDeep { line });
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        prev = c;
    }
    Ok(())
}

/// Whether a numeric parameter (weight, lambda, …) is usable: finite, and small enough to be
/// a finite `f32`, the type the engine computes in (`1e39` is a finite `f64` that overflows to
/// infinity as `f32`).
pub fn number_fits_f32(x: f64) -> bool {
    x.is_finite() && x.abs() <= f64::from(f32::MAX)
}

/// Whether DELLA's keep probabilities `density ± epsilon` lie in (0, 1), as mergekit requires
/// (a density of 1 or more keeps everything and is always fine).
pub fn della_bounds_ok(density: f64, epsilon: f64) -> bool {
    density >= 1.0 || (density - epsilon > 0.0 && density + epsilon < 1.0)
}
