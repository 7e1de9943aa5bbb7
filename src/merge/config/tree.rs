//! The document tree both readers produce ([`Node`]): YAML and TOML values reduced to what
//! configs use, with typed accessors that name the key in their errors.

use super::spec::{model_at, refuse_unknown, GLOBAL_AT};
use super::{ConfigError, ConfigSource, FilterRule, MergeConfig, ParamValue, Params, Rescale};

/// A parsed YAML or TOML value, reduced to what configs use.
pub(super) enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order.
    Map(Vec<(String, Node)>),
    /// Anything else (YAML tags, TOML datetimes), by name.
    Other(&'static str),
}

impl Node {
    pub(super) fn from_yaml(value: serde_norway::Value, at: &str) -> Result<Node, ConfigError> {
        use serde_norway::Value as V;
        Ok(match value {
            V::Null => Node::Null,
            V::Bool(b) => Node::Bool(b),
            V::Number(n) => match n.as_i64() {
                Some(i) => Node::Int(i),
                None => Node::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            V::String(s) => Node::Str(s),
            V::Sequence(seq) => Node::Seq(
                seq.into_iter()
                    .enumerate()
                    .map(|(i, v)| Node::from_yaml(v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            V::Mapping(map) => {
                let mut entries = Vec::with_capacity(map.len());
                for (k, v) in map {
                    let key = match k {
                        V::String(s) => s,
                        other => {
                            return Err(ConfigError::WrongType {
                                key: format!("a key in {at}"),
                                expected: "a string",
                                found: Node::from_yaml(other, at)?.kind(),
                            })
                        }
                    };
                    let child = Node::from_yaml(v, &key)?;
                    entries.push((key, child));
                }
                Node::Map(entries)
            }
            V::Tagged(_) => Node::Other("a tagged value"),
        })
    }

    pub(super) fn from_toml(value: toml::Value, at: &str) -> Result<Node, ConfigError> {
        use toml::Value as V;
        Ok(match value {
            V::Boolean(b) => Node::Bool(b),
            V::Integer(i) => Node::Int(i),
            V::Float(x) => Node::Float(x),
            V::String(s) => Node::Str(s),
            V::Datetime(_) => Node::Other("a date-time"),
            V::Array(items) => Node::Seq(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| Node::from_toml(v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            V::Table(t) => Node::Map(
                t.into_iter()
                    .map(|(k, v)| Node::from_toml(v, &k).map(|n| (k, n)))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Node::Null => "nothing",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
            Node::Other(what) => what,
        }
    }

    fn number(&self) -> Option<f64> {
        match self {
            Node::Int(i) => Some(*i as f64),
            Node::Float(x) => Some(*x),
            _ => None,
        }
    }
}

pub(super) fn wrong(key: &str, expected: &'static str, found: &Node) -> ConfigError {
    ConfigError::WrongType {
        key: key.to_string(),
        expected,
        found: found.kind(),
    }
}

pub(super) fn string(node: Node, key: &str) -> Result<String, ConfigError> {
    match node {
        Node::Str(s) => Ok(s),
        other => Err(wrong(key, "a string", &other)),
    }
}

/// A string, or `None` for an explicit null.
pub(super) fn opt_string(node: Node, key: &str) -> Result<Option<String>, ConfigError> {
    match node {
        Node::Null => Ok(None),
        other => string(other, key).map(Some),
    }
}

/// A mapping's entries; null counts as empty (YAML `parameters:` with nothing under it).
pub(super) fn entries(node: Node, key: &str) -> Result<Vec<(String, Node)>, ConfigError> {
    match node {
        Node::Map(e) => Ok(e),
        Node::Null => Ok(Vec::new()),
        other => Err(wrong(key, "a mapping", &other)),
    }
}

pub(super) fn unsupported(key: impl Into<String>, hint: impl Into<String>) -> ConfigError {
    ConfigError::UnsupportedKey {
        key: key.into(),
        hint: hint.into(),
    }
}

/// Parses one parameter's value.
pub(super) fn param_value(node: Node, name: &str, at: &str) -> Result<ParamValue, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidValue {
        name: name.to_string(),
        at: at.to_string(),
        reason,
    };
    const EXPECTED: &str = "expected a number, true/false, a list of numbers (a gradient over the layers) or a list of {filter, value} rules";
    match node {
        Node::Bool(b) => Ok(ParamValue::Bool(b)),
        Node::Int(_) | Node::Float(_) => Ok(ParamValue::Number(node.number().unwrap_or(f64::NAN))),
        Node::Seq(items) if items.is_empty() => Err(invalid("empty list".into())),
        Node::Seq(items) if items.iter().all(|n| matches!(n, Node::Map(_))) => items
            .into_iter()
            .map(|n| filter_rule(n, name, at))
            .collect::<Result<Vec<_>, _>>()
            .map(ParamValue::Filtered),
        Node::Seq(items) => gradient(items).map_err(invalid),
        // A single {filter, value} mapping: a one-rule list (mergekit rejects it at merge time).
        node @ Node::Map(_) => Ok(ParamValue::Filtered(vec![filter_rule(node, name, at)?])),
        other => Err(invalid(format!("{EXPECTED}, found {}", other.kind()))),
    }
}

/// A list of numbers as a gradient. As in mergekit (where bools are ints) `true`/`false`
/// count as 1/0.
pub(super) fn gradient(items: Vec<Node>) -> Result<ParamValue, String> {
    items
        .iter()
        .map(|n| match n {
            Node::Bool(b) => Ok(f64::from(u8::from(*b))),
            n => n.number().ok_or_else(|| {
                format!(
                    "a gradient list must hold only numbers (or only {{filter, value}} rules), found {}",
                    n.kind()
                )
            }),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(ParamValue::Gradient)
}

pub(super) fn filter_rule(node: Node, name: &str, at: &str) -> Result<FilterRule, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidValue {
        name: name.to_string(),
        at: at.to_string(),
        reason,
    };
    let mut filter = None;
    let mut value = None;
    for (k, v) in entries(node, name)? {
        match k.as_str() {
            "filter" => {
                filter = match v {
                    Node::Null => None,
                    Node::Str(s) => Some(s),
                    other => {
                        return Err(invalid(format!(
                            "a rule's `filter` must be a string, found {}",
                            other.kind()
                        )))
                    }
                }
            }
            "value" => {
                value = Some(match v {
                    Node::Bool(b) => ParamValue::Bool(b),
                    n @ (Node::Int(_) | Node::Float(_)) => {
                        ParamValue::Number(n.number().unwrap_or(f64::NAN))
                    }
                    Node::Seq(items) if items.is_empty() => {
                        return Err(invalid("a rule's `value` is an empty list".into()))
                    }
                    Node::Seq(items) => gradient(items).map_err(invalid)?,
                    other => {
                        return Err(invalid(format!(
                    "a rule's `value` must be a number, true/false or a list of numbers, found {}",
                    other.kind()
                )))
                    }
                })
            }
            other => {
                return Err(invalid(format!(
                    "unknown key `{other}` in a filter rule (rules have `filter` and `value`)"
                )))
            }
        }
    }
    let value = value.ok_or_else(|| invalid("a filter rule has no `value`".into()))?;
    Ok(FilterRule { filter, value })
}

/// `rescale` as written: a bool in mergekit YAML, a mode name in native TOML.
pub(super) fn rescale_value(node: Node, source: ConfigSource) -> Result<Rescale, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidValue {
        name: "rescale".into(),
        at: GLOBAL_AT.into(),
        reason,
    };
    match (source, node) {
        (ConfigSource::MergekitYaml, Node::Bool(b)) => {
            Ok(if b { Rescale::L1 } else { Rescale::None })
        }
        (ConfigSource::MergekitYaml, other) => Err(invalid(format!(
            "expected true or false, found {}",
            other.kind()
        ))),
        (_, Node::Str(s)) => Rescale::from_name(&s)
            .ok_or_else(|| invalid(format!("`{s}` is not one of \"inverse\", \"l1\", \"none\""))),
        (_, other) => Err(invalid(format!(
            "expected \"inverse\" (÷ density), \"l1\" (mergekit's rescale) or \"none\", found {}",
            other.kind()
        ))),
    }
}

/// Reads parameter entries into `params` (and the global `rescale`).
pub(super) fn read_params(
    items: Vec<(String, Node)>,
    at: &str,
    model: Option<&str>,
    source: ConfigSource,
    params: &mut Params,
    rescale: &mut Option<Rescale>,
) -> Result<(), ConfigError> {
    for (name, node) in items {
        if name == "rescale" {
            match model {
                Some(m) => {
                    return Err(ConfigError::GlobalOnlyParameter {
                        name,
                        model: m.to_string(),
                    })
                }
                None => *rescale = Some(rescale_value(node, source)?),
            }
            continue;
        }
        let value = param_value(node, &name, at)?;
        if params.set(name.clone(), value).is_some() {
            return Err(ConfigError::DuplicateParameter {
                name,
                at: at.to_string(),
            });
        }
    }
    Ok(())
}

/// Drops the entries naming the base (checking their parameter names first, so that typos
/// still fail), for methods with a base.
pub(super) fn drop_base_entries(config: &mut MergeConfig) -> Result<(), ConfigError> {
    let (Some(base), true) = (config.base_model.clone(), config.method.needs_base()) else {
        return Ok(());
    };
    for m in config.models.iter().filter(|m| m.model == base) {
        refuse_unknown(&m.parameters, &model_at(&m.model))?;
    }
    config.models.retain(|m| m.model != base);
    Ok(())
}
