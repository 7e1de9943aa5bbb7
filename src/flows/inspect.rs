//! `inspect`: what is in a GGUF model — architecture, size, types, metadata, tensors.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::format::gguf::{GgufModel, Value};

/// Per-type totals.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TypeCount {
    /// Type name (`Q4_K`).
    pub ty: String,
    /// Tensors of this type.
    pub tensors: usize,
    /// Parameters in them.
    pub params: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Bits per weight of the type.
    pub bits_per_weight: f64,
}

/// One metadata entry, with long arrays summarized.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MetaEntry {
    /// Key.
    pub key: String,
    /// GGUF value type (`string`, `array[string]`, …).
    pub value_type: String,
    /// The value, arrays past 8 items summarized.
    pub value: String,
}

/// One tensor's row of the table.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TensorRow {
    /// Name.
    pub name: String,
    /// Type name.
    pub ty: String,
    /// Shape, ggml order (row length first).
    pub shape: Vec<u64>,
    /// Elements.
    pub params: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What a delta pack holds (for `inspect` of a `.dpk.gguf`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PackSummary {
    /// Fingerprint of the base it applies to.
    pub base_fingerprint: String,
    /// Sparsifier (`dare`, `magnitude`, `della`).
    pub method: String,
    /// Keep fraction.
    pub density: f64,
    /// Mask seed and stream.
    pub seed: u64,
    /// Mask stream.
    pub stream: u32,
    /// Mask storage (`philox`, `explicit`, `dense`).
    pub mask: String,
    /// Value type.
    pub values: String,
    /// Changed tensors and their kept value counts.
    pub tensors: Vec<(String, u64)>,
    /// The data checksum, verified on opening (`None`: a pack written before packs had one).
    pub checksum: Option<String>,
}

/// Everything `ggmerge inspect` shows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelSummary {
    /// Files (shards) of the model.
    pub files: Vec<String>,
    /// GGUF version.
    pub gguf_version: u32,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// `general.type` (`model`, `ggmerge.delta`, …).
    pub file_kind: Option<String>,
    /// Bytes on disk.
    pub file_size: u64,
    /// Total parameters.
    pub n_params: u64,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
    /// Average bits per weight over all tensors.
    pub bits_per_weight: f64,
    /// Per-type totals, by descending bytes.
    pub types: Vec<TypeCount>,
    /// Metadata in file order.
    pub metadata: Vec<MetaEntry>,
    /// Tensors in file order.
    pub tensors: Vec<TensorRow>,
    /// For delta packs: what the pack holds.
    pub pack: Option<PackSummary>,
}

fn type_label(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("array[{:?}]", a.element_type()).to_lowercase(),
        v => format!("{:?}", v.value_type()).to_lowercase(),
    }
}

/// Summarizes an opened model.
pub fn summarize(model: &GgufModel) -> ModelSummary {
    let md = model.metadata();
    let mut by_type: BTreeMap<String, TypeCount> = BTreeMap::new();
    let mut tensors = Vec::with_capacity(model.n_tensors());
    for t in model.tensors() {
        let i = t.info;
        let e = by_type
            .entry(i.ty.name().to_string())
            .or_insert_with(|| TypeCount {
                ty: i.ty.name().into(),
                tensors: 0,
                params: 0,
                bytes: 0,
                bits_per_weight: i.ty.bits_per_weight(),
            });
        e.tensors += 1;
        e.params += i.n_elements();
        e.bytes += i.nbytes;
        tensors.push(TensorRow {
            name: i.name.clone(),
            ty: i.ty.name().into(),
            shape: i.shape.clone(),
            params: i.n_elements(),
            bytes: i.nbytes,
        });
    }
    let mut types: Vec<TypeCount> = by_type.into_values().collect();
    types.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.ty.cmp(&b.ty)));
    let n_params: u64 = tensors.iter().map(|t| t.params).sum();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    ModelSummary {
        files: model
            .shards()
            .iter()
            .map(|s| s.path().display().to_string())
            .collect(),
        gguf_version: model.shards()[0].header().version,
        architecture: md.architecture().map(str::to_string),
        name: md
            .get("general.name")
            .and_then(Value::as_str)
            .map(str::to_string),
        file_kind: md
            .get("general.type")
            .and_then(Value::as_str)
            .map(str::to_string),
        file_size: model.file_size(),
        n_params,
        tensor_bytes,
        bits_per_weight: if n_params == 0 {
            0.0
        } else {
            tensor_bytes as f64 * 8.0 / n_params as f64
        },
        types,
        metadata: md
            .iter()
            .map(|(k, v)| MetaEntry {
                key: k.to_string(),
                value_type: type_label(v),
                value: v.to_string(),
            })
            .collect(),
        tensors,
        pack: None,
    }
}

/// Opens `path` (a GGUF file, or any shard of a split model) and summarizes it.
///
/// ```no_run
/// let summary = ggmerge::inspect("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// println!("{:?}: {} parameters", summary.architecture, summary.n_params);
/// # Ok::<(), ggmerge::Error>(())
/// ```
pub fn inspect(path: impl AsRef<Path>) -> crate::error::Result<ModelSummary> {
    let model = GgufModel::open(path.as_ref())?;
    let mut summary = summarize(&model);
    if summary.file_kind.as_deref() == Some(crate::delta::pack::PACK_TYPE) {
        let p = crate::delta::pack::DeltaPack::open(path.as_ref())?;
        summary.pack = Some(PackSummary {
            base_fingerprint: p.fingerprint.clone(),
            method: p.sparsifier.name().into(),
            density: p.density,
            seed: p.seed,
            stream: p.stream,
            mask: p.mask.name().into(),
            values: p.values.name().into(),
            tensors: p.tensors.clone(),
            checksum: p.checksum.clone(),
        });
    }
    Ok(summary)
}
