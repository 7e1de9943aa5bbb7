//! The native TOML form → [`MergeConfig`](super::MergeConfig).

use super::spec::{model_at, spec, GLOBAL_AT};
use super::tree::*;
use super::{ConfigError, ConfigSource, MergeConfig, Method, ModelEntry};
use crate::quant::Requant;

const NATIVE_KEYS: &str = "method, base, models, parameters, type, seed, threads, requant";

pub(super) fn parse_native(root: Node) -> Result<MergeConfig, ConfigError> {
    let Node::Map(items) = root else {
        return Err(ConfigError::Empty);
    };
    let mut method = None;
    let mut base = None;
    let mut models = None;
    let mut global = None;
    let mut out_type = None;
    let mut seed = None;
    let mut threads = None;
    let mut requant = None;
    for (key, node) in items {
        match key.as_str() {
            "method" => {
                let name = string(node, &key)?;
                method = Some(Method::from_name(&name).ok_or(ConfigError::UnknownMethod { name })?);
            }
            "base" => base = Some(string(node, &key)?),
            "models" => models = Some(node),
            "parameters" => global = Some(entries(node, &key)?),
            "type" => out_type = Some(string(node, &key)?),
            "seed" => {
                seed = Some(match node {
                    Node::Int(i) if i >= 0 => i as u64,
                    other => return Err(wrong("seed", "a non-negative integer", &other)),
                })
            }
            "threads" => {
                threads = Some(match node {
                    Node::Int(i) if i >= 1 => usize::try_from(i).unwrap_or(usize::MAX),
                    other => return Err(wrong("threads", "a positive integer", &other)),
                })
            }
            "requant" => {
                let name = string(node, &key)?;
                requant =
                    Some(
                        Requant::from_name(&name).ok_or_else(|| ConfigError::InvalidValue {
                            name: "requant".into(),
                            at: "the config".into(),
                            reason: format!(
                                "`{name}` is not one of {}",
                                Requant::ALL.map(|r| format!("\"{r}\"")).join(", ")
                            ),
                        })?,
                    );
            }
            "merge_method" => {
                return Err(unsupported(
                    key,
                    "the TOML form names the method with `method`",
                ))
            }
            "base_model" => {
                return Err(unsupported(
                    key,
                    "the TOML form names the base model with `base`",
                ))
            }
            "dtype" | "out_dtype" => {
                return Err(unsupported(
                    key,
                    "the TOML form sets the output type with `type`",
                ))
            }
            "slices" | "modules" => {
                return Err(unsupported(
                    key.clone(),
                    format!(
                    "ggmerge merges whole models; remove `{key}` and list the models as [[models]]"
                ),
                ))
            }
            _ => {
                let hint = if spec(&key).is_some() {
                    format!("parameters go in [parameters] (global) or a [[models]] table; top-level keys are: {NATIVE_KEYS}")
                } else {
                    format!("top-level keys are: {NATIVE_KEYS}")
                };
                return Err(unsupported(key, hint));
            }
        }
    }
    let method = method.ok_or(ConfigError::MissingKey {
        key: "method".into(),
    })?;
    let mut config = MergeConfig::new(method, ConfigSource::NativeToml);
    config.base_model = base;
    config.out_type = out_type;
    config.seed = seed;
    config.threads = threads;
    config.requant = requant;
    if let Some(items) = global {
        read_params(
            items,
            GLOBAL_AT,
            None,
            ConfigSource::NativeToml,
            &mut config.parameters,
            &mut config.rescale_setting,
        )?;
    }
    let models = match models.ok_or(ConfigError::MissingKey {
        key: "models".into(),
    })? {
        Node::Seq(items) => items,
        other => return Err(wrong("models", "an array of tables ([[models]])", &other)),
    };
    for (i, node) in models.into_iter().enumerate() {
        let key = format!("models[{i}]");
        let fields = match node {
            Node::Map(e) => e,
            other => return Err(wrong(&key, "a table with `path`", &other)),
        };
        let mut path = None;
        let mut nested = None;
        let mut direct = Vec::new();
        for (k, v) in fields {
            match k.as_str() {
                "path" => path = Some(string(v, &format!("{key}.path"))?),
                "parameters" => nested = Some(entries(v, &format!("{key}.parameters"))?),
                "model" => {
                    return Err(unsupported(
                        format!("{key}.model"),
                        "the TOML form names a model's file with `path`",
                    ))
                }
                _ => direct.push((k, v)),
            }
        }
        let path = path.ok_or(ConfigError::MissingKey {
            key: format!("{key}.path"),
        })?;
        let mut entry = ModelEntry::new(path);
        let at = model_at(&entry.model);
        direct.extend(nested.unwrap_or_default());
        read_params(
            direct,
            &at,
            Some(&entry.model),
            ConfigSource::NativeToml,
            &mut entry.parameters,
            &mut None,
        )?;
        config.models.push(entry);
    }
    drop_base_entries(&mut config)?;
    Ok(config)
}
