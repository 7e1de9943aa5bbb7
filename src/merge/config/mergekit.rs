//! mergekit's YAML `models:` form → [`MergeConfig`](super::MergeConfig).

use super::spec::{model_at, spec, GLOBAL_AT};
use super::tree::*;
use super::{ConfigError, ConfigSource, MergeConfig, Method, ModelEntry};

const MERGEKIT_KEYS: &str = "models, base_model, merge_method, parameters, dtype, out_dtype, tokenizer_source, tokenizer, chat_template";

fn mergekit_dtype(node: Node, key: &'static str) -> Result<Option<String>, ConfigError> {
    let Some(value) = opt_string(node, key)? else {
        return Ok(None);
    };
    let bare = value.strip_prefix("torch.").unwrap_or(&value);
    let ggml = match bare {
        "float16" => "F16",
        "bfloat16" => "BF16",
        "float32" => "F32",
        _ => return Err(ConfigError::UnsupportedDtype { key, value }),
    };
    Ok(Some(ggml.to_string()))
}

/// Whether a tokenizer source keeps the base's tokenizer: `base`, or the base model itself.
fn is_base_tokenizer(value: &str, base: Option<&str>) -> bool {
    value == "base" || Some(value) == base
}

pub(super) fn parse_mergekit(root: Node) -> Result<MergeConfig, ConfigError> {
    let items = match root {
        Node::Null => return Err(ConfigError::Empty),
        Node::Map(e) => e,
        other => return Err(wrong("the config", "a mapping of keys", &other)),
    };
    let mut method = None;
    let mut base_model = None;
    let mut models = None;
    let mut global = None;
    let mut dtype = None;
    let mut out_dtype = None;
    let mut tokenizer_sources: Vec<(&'static str, String)> = Vec::new();
    for (key, node) in items {
        match key.as_str() {
            "merge_method" => {
                let name = string(node, &key)?;
                method = Some(Method::from_name(&name).ok_or(ConfigError::UnknownMethod { name })?);
            }
            "base_model" => base_model = opt_string(node, &key)?,
            "models" => models = Some(node),
            "parameters" => global = Some(entries(node, &key)?),
            "dtype" => dtype = mergekit_dtype(node, "dtype")?,
            "out_dtype" => out_dtype = mergekit_dtype(node, "out_dtype")?,
            "tokenizer_source" => {
                if let Some(s) = opt_string(node, &key)? {
                    tokenizer_sources.push(("tokenizer_source", s));
                }
            }
            "tokenizer" => {
                // mergekit's TokenizerConfig: `source` defaults to `union`.
                let mut source = "union".to_string();
                for (k, v) in entries(node, &key)? {
                    match k.as_str() {
                        "source" => source = string(v, "tokenizer.source")?,
                        other => {
                            return Err(unsupported(
                                format!("tokenizer.{other}"),
                                "ggmerge keeps the base model's tokenizer and embeddings; only `tokenizer: {source: base}` is accepted",
                            ))
                        }
                    }
                }
                tokenizer_sources.push(("tokenizer.source", source));
            }
            "chat_template" => {
                if !matches!(node, Node::Null) {
                    return Err(ConfigError::ChatTemplate);
                }
            }
            "slices" => {
                return Err(unsupported(
                    key,
                    "ggmerge merges whole models; remove `slices` and list the models under `models`",
                ))
            }
            "modules" => {
                return Err(unsupported(
                    key,
                    "ggmerge merges whole models; remove `modules` and list the models under `models`",
                ))
            }
            "seed" | "random_seed" => {
                return Err(unsupported(
                    key,
                    "mergekit configs have no seed; pass the mask seed with --seed, or use the native TOML form's `seed`",
                ))
            }
            "requant" => {
                return Err(unsupported(
                    key,
                    "mergekit has no requantization option; pass --requant, or use the native TOML form's `requant`",
                ))
            }
            "method" => return Err(unsupported(key, "mergekit YAML names the method with `merge_method`")),
            "base" => return Err(unsupported(key, "mergekit YAML names the base model with `base_model`")),
            "type" => {
                return Err(unsupported(
                    key,
                    "mergekit YAML sets the output type with `dtype`/`out_dtype`; for quantized output use --type",
                ))
            }
            _ => {
                let hint = if spec(&key).is_some() {
                    format!("parameters go under `parameters:` (global) or a model's `parameters:`; mergekit config keys are: {MERGEKIT_KEYS}")
                } else {
                    format!("not a mergekit config key ggmerge accepts; keys are: {MERGEKIT_KEYS}")
                };
                return Err(unsupported(key, hint));
            }
        }
    }
    let method = method.ok_or(ConfigError::MissingKey {
        key: "merge_method".into(),
    })?;
    for (key, value) in tokenizer_sources {
        if !is_base_tokenizer(&value, base_model.as_deref()) {
            return Err(ConfigError::UnsupportedTokenizer { key, value });
        }
    }

    let mut config = MergeConfig::new(method, ConfigSource::MergekitYaml);
    config.base_model = base_model;
    config.out_type = out_dtype.or(dtype);
    if let Some(items) = global {
        read_params(
            items,
            GLOBAL_AT,
            None,
            ConfigSource::MergekitYaml,
            &mut config.parameters,
            &mut config.rescale_setting,
        )?;
    }
    let models = match models.ok_or(ConfigError::MissingKey {
        key: "models".into(),
    })? {
        Node::Seq(items) => items,
        other => {
            return Err(wrong(
                "models",
                "a list of {model, parameters} entries",
                &other,
            ))
        }
    };
    for (i, node) in models.into_iter().enumerate() {
        let key = format!("models[{i}]");
        let fields = match node {
            Node::Map(e) => e,
            other => {
                return Err(wrong(
                    &key,
                    "a mapping with `model:` (and optional `parameters:`)",
                    &other,
                ))
            }
        };
        let mut model = None;
        let mut params = None;
        for (k, v) in fields {
            match k.as_str() {
                "model" => model = Some(string(v, &format!("{key}.model"))?),
                "parameters" => params = Some(entries(v, &format!("{key}.parameters"))?),
                other => {
                    return Err(unsupported(
                        format!("{key}.{other}"),
                        "a model entry has only `model` and `parameters`",
                    ))
                }
            }
        }
        let model = model.ok_or(ConfigError::MissingKey {
            key: format!("{key}.model"),
        })?;
        let mut entry = ModelEntry::new(model);
        if let Some(items) = params {
            let at = model_at(&entry.model);
            read_params(
                items,
                &at,
                Some(&entry.model),
                ConfigSource::MergekitYaml,
                &mut entry.parameters,
                &mut None,
            )?;
        }
        config.models.push(entry);
    }
    drop_base_entries(&mut config)?;
    Ok(config)
}
