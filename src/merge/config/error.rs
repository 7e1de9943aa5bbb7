//! [`ConfigError`]: every way a merge config can be unreadable or invalid, naming the key,
//! model or line.

use std::path::PathBuf;

use super::{Method, MAX_NESTING};

/// A merge config could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file name ends in neither `.yml`/`.yaml` nor `.toml`.
    #[error("{}: unknown config format: name mergekit YAML configs `.yml`/`.yaml` and native ones `.toml`", path.display())]
    UnknownExtension {
        /// The file.
        path: PathBuf,
    },
    /// A config file is invalid.
    #[error("{}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<ConfigError>,
    },
    /// The YAML does not parse.
    #[error("invalid YAML")]
    Yaml(#[source] serde_norway::Error),
    /// The TOML does not parse.
    #[error("invalid TOML")]
    Toml(#[source] toml::de::Error),
    /// The document is empty.
    #[error("the merge config is empty")]
    Empty,
    /// Brackets or braces are nested deeper than any merge config needs (checked before
    /// parsing: parsers take quadratic time on such input).
    #[error("line {line}: brackets/braces are nested more than {MAX_NESTING} deep; a merge config needs a few levels")]
    TooDeep {
        /// The line where the limit is passed (1-based).
        line: usize,
    },
    /// A key has a value of the wrong type.
    #[error("`{key}` must be {expected}, found {found}")]
    WrongType {
        /// The key (a path such as `models[1].model`).
        key: String,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        found: &'static str,
    },
    /// A key that ggmerge does not support, or that does not exist.
    #[error("unsupported key `{key}`: {hint}")]
    UnsupportedKey {
        /// The key (a path such as `models[0].lora`).
        key: String,
        /// Why, and what to do instead.
        hint: String,
    },
    /// A required key is absent.
    #[error("missing key `{key}`")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// The merge method is unknown or unsupported.
    #[error("unknown merge method `{name}`; ggmerge supports linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear")]
    UnknownMethod {
        /// The name given.
        name: String,
    },
    /// A `dtype`/`out_dtype` that is not a float type mergekit knows.
    #[error("`{key}: {value}` is not supported; use float16, bfloat16 or float32 (or the --type option for quantized output)")]
    UnsupportedDtype {
        /// `dtype` or `out_dtype`.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A tokenizer other than the base's was asked for.
    #[error("`{key}: {value}` is not supported: ggmerge keeps the base model's tokenizer and vocabulary; use `base` or remove `{key}`")]
    UnsupportedTokenizer {
        /// `tokenizer_source` or `tokenizer.source`.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A `chat_template` was given.
    #[error("`chat_template` is not supported: the output keeps the base model's chat template; remove `chat_template`")]
    ChatTemplate,
    /// A parameter value is malformed (type, empty list, nested rules) or outside its range.
    #[error("parameter `{name}` in {at}: {reason}")]
    InvalidValue {
        /// The parameter.
        name: String,
        /// Where it is set (`model \`…\`` or `global parameters`).
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// Parameter names that no method knows.
    #[error("unknown parameter {names} in {at}; known parameters: weight, density, gamma, epsilon, lambda, normalize, rescale, int8_mask, t")]
    UnknownParameters {
        /// The names, quoted and comma-separated.
        names: String,
        /// Where they are set.
        at: String,
    },
    /// A known parameter that the method does not read.
    #[error("parameter `{name}` in {at} is not used by merge method `{method}` (it reads: {}); remove it", method.param_names().join(", "))]
    ParameterNotUsed {
        /// The parameter.
        name: String,
        /// Where it is set.
        at: String,
        /// The method.
        method: Method,
    },
    /// A global-only parameter (`normalize`, `rescale`, `lambda`, `int8_mask`, `t`) set on a
    /// model.
    #[error("parameter `{name}` is set for model `{model}`, but it applies to the whole merge; move it to the top-level parameters")]
    GlobalOnlyParameter {
        /// The parameter.
        name: String,
        /// The model.
        model: String,
    },
    /// A parameter given twice for one model (directly and in its `parameters` table).
    #[error("parameter `{name}` is given twice for {at}")]
    DuplicateParameter {
        /// The parameter.
        name: String,
        /// Where.
        at: String,
    },
    /// A method that needs a base has none.
    #[error("merge method `{method}` needs a base model: set `base_model` (mergekit YAML) or `base` (TOML)")]
    MissingBase {
        /// The method.
        method: Method,
    },
    /// No model to merge.
    #[error("nothing to merge: list at least one model{} under `models`", if method.needs_base() { " besides the base" } else { "" })]
    NoModels {
        /// The method.
        method: Method,
    },
    /// `slerp` with other than one model besides the base.
    #[error("slerp interpolates between the base and exactly one other model; {found} models besides the base are listed")]
    SlerpModelCount {
        /// Models besides the base.
        found: usize,
    },
    /// A model listed twice.
    #[error("model `{model}` is listed more than once under `models`")]
    DuplicateModel {
        /// The model.
        model: String,
    },
    /// The base model among the models to merge of a method with a base (configs parsed here
    /// never have this: such entries are dropped).
    #[error("model `{model}` is the base model; it cannot also be merged as a task vector")]
    BaseAmongModels {
        /// The model.
        model: String,
    },
    /// `linear` with a `base_model` that is not among its models.
    #[error("linear merges only the listed models and has no base; `base_model: {base}` is not among `models`: list it there (with a weight) or remove `base_model`")]
    LinearBaseNotListed {
        /// The base model given.
        base: String,
    },
    /// A required parameter is unset.
    #[error("missing parameter `{name}`{}", match model { Some(m) => format!(" for model `{m}` (set it on the model or in the global parameters)"), None => " in the global parameters".to_string() })]
    MissingParameter {
        /// The parameter.
        name: String,
        /// The model, or `None` for a global parameter.
        model: Option<String>,
    },
    /// DELLA keep probabilities outside (0, 1).
    #[error("model `{model}`: della needs density ± epsilon inside (0, 1), but density is {density} and epsilon {epsilon}")]
    DellaEpsilon {
        /// The model.
        model: String,
        /// Its density.
        density: f64,
        /// Its epsilon.
        epsilon: f64,
    },
}
