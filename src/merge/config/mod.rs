//! Merge configuration: mergekit YAML as users already have it, a native TOML form of the same,
//! and per-tensor parameter resolution.
//!
//! Main types: [`MergeConfig`] (what to merge, how), [`ParamValue`] (one parameter's setting:
//! scalar, per-layer gradient or filtered list), [`TensorContext`] (the tensor a parameter is
//! resolved for) and [`ConfigError`]; [`Method`] and [`Rescale`] come from
//! [`crate::merge::method`] (re-exported here). What lives elsewhere: the per-tensor plan
//! ([`crate::merge::plan`]) and the merge kernels, and the parsing of output type names
//! (`out_type` is kept as written here).
//!
//! Files: `param` (values and their per-tensor resolution), `spec` (which parameters exist,
//! their ranges, and the checks of [`MergeConfig::validate`]), `tree` (the document tree both
//! readers produce), `mergekit` (YAML), `native` (TOML), `error`.
//!
//! # mergekit YAML
//!
//! mergekit's `models:` form is read as it is, so existing configs work:
//!
//! ```yaml
//! models:
//!   - model: mistralai/Mistral-7B-v0.1      # the base: no parameters needed
//!   - model: samir-fama/SamirGPT-v1
//!     parameters: {density: 0.53, weight: 0.4}
//!   - model: abacusai/Slerp-CM-mist-dpo
//!     parameters:
//!       density: 0.53
//!       weight: [0.2, 0.4, 0.3]              # gradient over the layers
//! merge_method: dare_ties
//! base_model: mistralai/Mistral-7B-v0.1
//! parameters:
//!   int8_mask: true
//! dtype: bfloat16
//! ```
//!
//! Keys: `models`, `base_model`, `merge_method`, `parameters`, `dtype`, `out_dtype`,
//! `tokenizer_source` (`base` only), `tokenizer` (`source: base` only), `chat_template` (must be
//! absent). Every other key — `slices`, `modules`, mergekit-mega's `name`, a stray `seed` — is an
//! error naming it, never silently ignored. mergekit has no seed: masks use the CLI's `--seed`.
//! The output type is `out_dtype`, else `dtype` (as in mergekit, where `dtype` is also the
//! output type unless `out_dtype` is given): `float16` → `F16`, `bfloat16` → `BF16`,
//! `float32` → `F32`.
//!
//! # Native TOML
//!
//! The same structure with shorter keys; parameters may sit directly in a model's table:
//!
//! ```toml
//! method = "dare_ties"           # any mergekit method name below
//! base = "base-Q8_0.gguf"
//! type = "Q4_K_M"                # output type (ggml type or llama.cpp mixture); default: like base
//! seed = 42                      # mask seed (DARE/DELLA) and stochastic rounding seed; default 0
//! threads = 8                    # optional; default: all cores
//! requant = "grid"               # "full", "grid", "grid-stochastic" (default); see quant::grid
//!
//! [parameters]                   # global: apply to every model unless it sets its own
//! lambda = 1.0
//! normalize = false
//! rescale = "inverse"            # "inverse" (÷ density, the paper), "l1" (mergekit's), "none"
//!
//! [[models]]
//! path = "math-Q8_0.gguf"
//! weight = 0.6
//! density = [0.2, 0.5, 0.8]      # gradient: interpolated over the layer index
//!
//! [[models]]
//! path = "code-F16.gguf"
//! weight = 0.4
//! density = [{ filter = "attn", value = 0.3 }, { value = 0.5 }]   # first matching rule wins
//! ```
//!
//! `[models.parameters]` sub-tables are accepted too.
//!
//! # Parameters
//!
//! The names are mergekit's; [`Method::param_names`] lists each method's:
//!
//! | name | where | methods | default |
//! |---|---|---|---|
//! | `weight` | per model (or global) | all but `slerp` | required |
//! | `density` | per model (or global) | task-vector methods | 1 |
//! | `gamma` | per model (or global) | `breadcrumbs`, `breadcrumbs_ties` | 0.01 |
//! | `epsilon` | per model (or global) | `della`, `della_linear` | 0.15 |
//! | `lambda` | global | task-vector methods | 1 |
//! | `normalize` | global | `linear` and task-vector methods | [`Method::default_normalize`] |
//! | `rescale` | global | task-vector methods | see [`MergeConfig::rescale`] |
//! | `int8_mask` | global | task-vector methods | false; accepted and ignored (a mergekit memory saving that does not change results) |
//! | `t` | global | `slerp` | required |
//!
//! A parameter another method uses, or a global one set on a model, is an error (mergekit
//! would silently ignore it). A value is a number or `true`/`false`, a list of numbers (a
//! gradient, see [`TensorContext::t`]), or a list of `{filter, value}` rules: the first rule
//! whose `filter` is a substring of the tensor's name (or that has no filter, or `*`) gives the
//! value; when none matches, the model-level setting falls through to the global one, as in
//! mergekit.
//!
//! # Example
//!
//! ```
//! use ggmerge::merge::config::{MergeConfig, Method, TensorContext};
//!
//! let config = MergeConfig::from_toml_str(
//!     r#"
//!     method = "ties"
//!     base = "base.gguf"
//!     [[models]]
//!     path = "expert.gguf"
//!     weight = 1.0
//!     density = [{ filter = "attn", value = 0.3 }, { value = 0.5 }]
//!     "#,
//! )?;
//! assert_eq!(config.method, Method::Ties);
//! let ctx = TensorContext {
//!     gguf_name: "blk.3.attn_q.weight",
//!     hf_name: Some("model.layers.3.self_attn.q_proj.weight"),
//!     layer: Some(3),
//!     n_layers: 32,
//! };
//! assert_eq!(config.number(Some(0), "density", &ctx), Some(0.3));
//! assert_eq!(config.flag(None, "normalize", &ctx), Some(true)); // ties normalizes by default
//! # Ok::<(), ggmerge::merge::config::ConfigError>(())
//! ```

mod error;
mod mergekit;
mod native;
mod param;
mod spec;
#[cfg(test)]
mod tests;
mod tree;

use std::path::Path;
use std::str::FromStr;

pub use crate::merge::method::{Method, Rescale};
use crate::merge::method::{MethodSpec, Sparsifier};
pub use error::ConfigError;
pub use param::{FilterRule, ParamValue, Params, TensorContext};
pub use spec::{della_bounds_ok, number_fits_f32, MAX_NESTING};

use mergekit::parse_mergekit;
use native::parse_native;
use spec::{check_nesting, check_params, model_at, GLOBAL_AT};
use tree::Node;

/// One model to merge.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    /// The path (or name) as written in the config.
    pub model: String,
    /// Its own parameter settings (they override the global ones).
    pub parameters: Params,
}

impl ModelEntry {
    /// A model without parameters of its own.
    pub fn new(model: impl Into<String>) -> ModelEntry {
        ModelEntry {
            model: model.into(),
            parameters: Params::default(),
        }
    }
}

/// Where a configuration came from; it decides what `rescale` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConfigSource {
    /// A mergekit YAML file: `rescale: true` means mergekit's L1-norm rescale.
    MergekitYaml,
    /// A native TOML file: `rescale = "inverse" | "l1" | "none"`, default `inverse`.
    NativeToml,
    /// Built from command-line options; rescale as for native TOML.
    Cli,
}

/// A merge: method, base, models and parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    /// The merge method.
    pub method: Method,
    /// The base model's path as written (required by all methods but `linear`).
    pub base_model: Option<String>,
    /// The models to merge. For methods with a base, entries naming the base model are
    /// dropped while parsing (mergekit configs often list the base among the models, without
    /// parameters; mergekit never merges it as a task vector), so these are the experts and
    /// an entry's index is its mask stream. For `linear`, every listed model.
    pub models: Vec<ModelEntry>,
    /// Global parameter settings (`rescale` is kept in [`MergeConfig::rescale_setting`]).
    pub parameters: Params,
    /// `rescale` as written: mergekit `true` → [`Rescale::L1`], `false` → [`Rescale::None`];
    /// native `"inverse"`/`"l1"`/`"none"`. `None` when absent: see [`MergeConfig::rescale`].
    pub rescale_setting: Option<Rescale>,
    /// Output type: mergekit `out_dtype`, else `dtype`, mapped to ggml names (`float16` →
    /// `F16`, `bfloat16` → `BF16`, `float32` → `F32`); native `type` as written (`Q4_K_M`,
    /// `q8_0`…). `None`: like the base.
    pub out_type: Option<String>,
    /// Mask seed: native `seed` only (mergekit configs have no seed key; mergekit draws masks
    /// from torch's global generator).
    pub seed: Option<u64>,
    /// Worker threads: native `threads` only.
    pub threads: Option<usize>,
    /// How merged tensors of the base's type are requantized: native `requant` only
    /// (`"full"`, `"grid"`, `"grid-stochastic"`; mergekit YAML has no such key). `None`:
    /// [`Requant::DEFAULT`](crate::quant::Requant::DEFAULT).
    pub requant: Option<crate::quant::Requant>,
    /// Where the config came from.
    pub source: ConfigSource,
}

impl MergeConfig {
    /// An empty config of `method` (no base, no models, no parameters).
    pub fn new(method: Method, source: ConfigSource) -> MergeConfig {
        MergeConfig {
            method,
            base_model: None,
            models: Vec::new(),
            parameters: Params::default(),
            rescale_setting: None,
            out_type: None,
            seed: None,
            threads: None,
            requant: None,
            source,
        }
    }

    /// Parses a mergekit YAML config (the `models:` form) and validates it.
    pub fn from_yaml_str(s: &str) -> Result<MergeConfig, ConfigError> {
        check_nesting(s)?;
        let mut value: serde_norway::Value =
            serde_norway::from_str(s).map_err(ConfigError::Yaml)?;
        value.apply_merge().map_err(ConfigError::Yaml)?;
        let root = Node::from_yaml(value, "the config")?;
        let config = parse_mergekit(root)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a native TOML config and validates it.
    pub fn from_toml_str(s: &str) -> Result<MergeConfig, ConfigError> {
        check_nesting(s)?;
        let table: toml::Table = toml::from_str(s).map_err(ConfigError::Toml)?;
        let root = Node::from_toml(toml::Value::Table(table), "the config")?;
        let config = parse_native(root)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file: `.yml`/`.yaml` as mergekit YAML, `.toml` as native TOML.
    pub fn from_path(path: &Path) -> Result<MergeConfig, ConfigError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let yaml = match ext.as_deref() {
            Some("yml" | "yaml") => true,
            Some("toml") => false,
            _ => {
                return Err(ConfigError::UnknownExtension {
                    path: path.to_path_buf(),
                })
            }
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let parsed = if yaml {
            MergeConfig::from_yaml_str(&text)
        } else {
            MergeConfig::from_toml_str(&text)
        };
        parsed.map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Checks the config: a base where the method needs one; at least one model (exactly one
    /// besides the base for `slerp`), none listed twice; every parameter known, used by the
    /// method and at the right level; value types and ranges (`density` in (0, 1], `gamma` and
    /// `epsilon` in [0, 1), and `density ± epsilon` in (0, 1) for DELLA where both are plain
    /// numbers, other numbers finite); `weight` set for every model (and `t` for `slerp`).
    ///
    /// A filtered setting without a catch-all rule can still leave a tensor without a value:
    /// [`MergeConfig::model_param`] then returns `None` and the caller reports it per tensor.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let method = self.method;
        if method.needs_base() && self.base_model.is_none() {
            return Err(ConfigError::MissingBase { method });
        }
        if self.models.is_empty() {
            return Err(ConfigError::NoModels { method });
        }
        if method == Method::Slerp && self.models.len() != 1 {
            return Err(ConfigError::SlerpModelCount {
                found: self.models.len(),
            });
        }
        for (i, m) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|o| o.model == m.model) {
                return Err(ConfigError::DuplicateModel {
                    model: m.model.clone(),
                });
            }
            if method.needs_base() && self.base_model.as_deref() == Some(m.model.as_str()) {
                return Err(ConfigError::BaseAmongModels {
                    model: m.model.clone(),
                });
            }
        }
        if method == Method::Linear {
            if let Some(base) = &self.base_model {
                if !self.models.iter().any(|m| &m.model == base) {
                    return Err(ConfigError::LinearBaseNotListed { base: base.clone() });
                }
            }
        }
        if self.rescale_setting.is_some() && !method.param_names().contains(&"rescale") {
            return Err(ConfigError::ParameterNotUsed {
                name: "rescale".into(),
                at: GLOBAL_AT.into(),
                method,
            });
        }

        check_params(method, &self.parameters, GLOBAL_AT, None)?;
        for m in &self.models {
            check_params(
                method,
                &m.parameters,
                &model_at(&m.model),
                Some(m.model.as_str()),
            )?;
        }

        if method == Method::Slerp {
            if self.parameters.get("t").is_none() {
                return Err(ConfigError::MissingParameter {
                    name: "t".into(),
                    model: None,
                });
            }
        } else {
            for m in &self.models {
                if m.parameters.get("weight").is_none() && self.parameters.get("weight").is_none() {
                    return Err(ConfigError::MissingParameter {
                        name: "weight".into(),
                        model: Some(m.model.clone()),
                    });
                }
            }
        }

        if method.sparsifier() == Sparsifier::Della {
            for m in &self.models {
                let setting = |name: &str| {
                    m.parameters
                        .get(name)
                        .or_else(|| self.parameters.get(name))
                        .cloned()
                        .or_else(|| method.default_param(name))
                };
                let (Some(ParamValue::Number(density)), Some(ParamValue::Number(epsilon))) =
                    (setting("density"), setting("epsilon"))
                else {
                    continue;
                };
                if !della_bounds_ok(density, epsilon) {
                    return Err(ConfigError::DellaEpsilon {
                        model: m.model.clone(),
                        density,
                        epsilon,
                    });
                }
            }
        }
        Ok(())
    }

    /// The rescale mode after dropping. Methods without pruning (`linear`, `task_arithmetic`,
    /// `slerp`) never rescale. Otherwise the setting as written, or when absent: for mergekit
    /// YAML mergekit's default ([`Method::default_rescale`] → [`Rescale::L1`], else
    /// [`Rescale::None`]); for native TOML and the CLI [`Rescale::Inverse`] where mergekit
    /// rescales by default (DARE and DELLA), else [`Rescale::None`].
    pub fn rescale(&self) -> Rescale {
        if self.method.sparsifier() == Sparsifier::None {
            return Rescale::None;
        }
        if let Some(r) = self.rescale_setting {
            return r;
        }
        match (self.method.default_rescale(), self.source) {
            (false, _) => Rescale::None,
            (true, ConfigSource::MergekitYaml) => Rescale::L1,
            (true, ConfigSource::NativeToml | ConfigSource::Cli) => Rescale::Inverse,
        }
    }

    /// The engine's view of the method, with this config's global `normalize` (or the
    /// method's default) and [`MergeConfig::rescale`].
    pub fn spec(&self) -> MethodSpec {
        let ctx = TensorContext {
            gguf_name: "",
            hf_name: None,
            layer: None,
            n_layers: 1,
        };
        let normalize = self
            .flag(None, "normalize", &ctx)
            .unwrap_or(self.method.default_normalize());
        self.method.spec(normalize, self.rescale())
    }

    /// Resolves a parameter of model `model` (an index into [`MergeConfig::models`]) for one
    /// tensor: the model's own setting, or when it has none (or none of its rules matches)
    /// the global one. `None` if neither gives a value or `model` is out of range. Defaults are
    /// not applied (see [`MergeConfig::number`]).
    pub fn model_param(
        &self,
        model: usize,
        name: &str,
        ctx: &TensorContext<'_>,
    ) -> Option<ParamValue> {
        let entry = self.models.get(model)?;
        entry
            .parameters
            .get(name)
            .and_then(|v| v.evaluate(ctx))
            .or_else(|| self.global_param(name, ctx))
    }

    /// Resolves a global parameter for one tensor. Defaults are not applied.
    pub fn global_param(&self, name: &str, ctx: &TensorContext<'_>) -> Option<ParamValue> {
        self.parameters.get(name).and_then(|v| v.evaluate(ctx))
    }

    /// A numeric parameter for one tensor, with the method's default when unset
    /// ([`Method::default_param`]): of model `model` (with global fallback), or the global one
    /// for `None`.
    pub fn number(&self, model: Option<usize>, name: &str, ctx: &TensorContext<'_>) -> Option<f64> {
        self.resolved(model, name, ctx)?.as_number()
    }

    /// A `true`/`false` parameter for one tensor, with the method's default when unset: of
    /// model `model` (with global fallback), or the global one for `None`.
    pub fn flag(&self, model: Option<usize>, name: &str, ctx: &TensorContext<'_>) -> Option<bool> {
        self.resolved(model, name, ctx)?.as_bool()
    }

    fn resolved(
        &self,
        model: Option<usize>,
        name: &str,
        ctx: &TensorContext<'_>,
    ) -> Option<ParamValue> {
        let raw = match model {
            Some(i) => {
                self.models.get(i)?;
                self.model_param(i, name, ctx)
            }
            None => self.global_param(name, ctx),
        };
        raw.or_else(|| self.method.default_param(name))
    }
}

impl FromStr for Method {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Method, ConfigError> {
        Method::from_name(s).ok_or_else(|| ConfigError::UnknownMethod {
            name: s.to_string(),
        })
    }
}

impl FromStr for Rescale {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Rescale, ConfigError> {
        Rescale::from_name(s).ok_or_else(|| ConfigError::InvalidValue {
            name: "rescale".into(),
            at: "the command line".into(),
            reason: format!("`{s}` is not one of \"inverse\", \"l1\", \"none\""),
        })
    }
}
