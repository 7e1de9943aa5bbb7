//! [`ModelSource`]: a model as a merge input sees it — tensors by their GGUF names, with
//! ggml-order shapes, a ggml type and bytes — whatever the file format on disk.
//!
//! GGUF models ([`crate::format::gguf::GgufModel`]) are sources directly (zero-copy). Other
//! formats (safetensors) implement the trait by mapping names and, where llama.cpp's converter
//! transforms a tensor (q/k row permutation, Gemma's norm offset), by producing the transformed
//! bytes for that one tensor.

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use crate::format::error::{FormatError, Result};
use crate::format::gguf::{is_gguf_file, GgufModel, Metadata};
use crate::format::hf_names::HfConfig;
use crate::format::safetensors::SafetensorsModel;
use crate::format::GgmlType;

/// One tensor of a [`ModelSource`].
#[derive(Clone, Debug)]
pub struct SourceTensor<'a> {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Shape in ggml order (`shape[0]` is the row length).
    pub shape: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Raw data in that type (borrowed from a map when possible).
    pub data: Cow<'a, [u8]>,
}

/// Opens a model of either format: a GGUF file (or split model, by any shard), else
/// safetensors (a `.safetensors` file, a sharded index `.json`, or an HF directory). A
/// safetensors model without `config.json` takes its architecture and head counts from
/// `fallback` (a GGUF base's, [`HfConfig::from_gguf_metadata`]). Any other file is opened as
/// GGUF, so a damaged `.gguf` is reported as a bad GGUF file, not as a bad safetensors model.
pub fn open(path: &Path, fallback: Option<&HfConfig>) -> Result<Box<dyn ModelSource>> {
    if is_gguf_file(path) {
        return Ok(Box::new(GgufModel::open(path)?));
    }
    if let Err(source) = std::fs::metadata(path) {
        return Err(FormatError::Io {
            path: path.to_path_buf(),
            what: "cannot open the model",
            source,
        });
    }
    let safetensors_name = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("json"));
    if path.is_file() && !safetensors_name {
        return Ok(Box::new(GgufModel::open(path)?));
    }
    Ok(Box::new(match fallback {
        Some(c) => SafetensorsModel::open_or_config(path, c.clone())?,
        None => SafetensorsModel::open(path)?,
    }))
}

/// A model whose tensors a merge can read.
pub trait ModelSource: Send + Sync {
    /// The path the user gave.
    fn path(&self) -> &Path;
    /// Architecture in llama.cpp's spelling (`llama`, `gemma3`, …), if known.
    fn architecture(&self) -> Option<&str>;
    /// GGUF-style metadata, if the source has it (GGUF inputs; synthesized for others).
    fn metadata(&self) -> Option<&Metadata>;
    /// Tensor names (GGUF), in the model's order.
    fn tensor_names(&self) -> Vec<String>;
    /// Shape and type of a tensor without reading its data.
    fn tensor_info(&self, name: &str) -> Option<(Vec<u64>, GgmlType)>;
    /// A tensor with its data, or `None` if the model has no tensor of that name.
    fn tensor(&self, name: &str) -> Result<Option<SourceTensor<'_>>>;
    /// Number of transformer blocks, if known.
    fn block_count(&self) -> Option<u64>;
    /// The files the model is read from (a split GGUF's shards, a sharded safetensors
    /// model's files): an output must not be one of them, and each must stay unchanged while
    /// read. Default: [`ModelSource::path`].
    fn files(&self) -> Vec<&Path> {
        vec![self.path()]
    }
    /// Hugging Face names and head counts of a safetensors model (`None` for GGUF).
    fn hf_config(&self) -> Option<&HfConfig> {
        None
    }
    /// Hints that bytes `part` of tensor `name`'s data (clamped to the tensor) will not be
    /// read again soon, so a memory-mapped source can drop their pages from the process's
    /// resident set (reading them again still works). The default does nothing.
    fn release(&self, name: &str, part: Range<usize>) {
        let _ = (name, part);
    }
}

impl ModelSource for GgufModel {
    fn path(&self) -> &Path {
        GgufModel::path(self)
    }
    fn architecture(&self) -> Option<&str> {
        GgufModel::metadata(self).architecture()
    }
    fn metadata(&self) -> Option<&Metadata> {
        Some(GgufModel::metadata(self))
    }
    fn tensor_names(&self) -> Vec<String> {
        self.tensors().map(|t| t.info.name.clone()).collect()
    }
    fn tensor_info(&self, name: &str) -> Option<(Vec<u64>, GgmlType)> {
        self.tensor_by_name(name)
            .map(|t| (t.info.shape.clone(), t.info.ty))
    }
    fn tensor(&self, name: &str) -> Result<Option<SourceTensor<'_>>> {
        Ok(self.tensor_by_name(name).map(|t| SourceTensor {
            name: t.info.name.clone(),
            shape: t.info.shape.clone(),
            ty: t.info.ty,
            data: Cow::Borrowed(t.data),
        }))
    }
    fn block_count(&self) -> Option<u64> {
        GgufModel::metadata(self).arch_u64("block_count")
    }
    fn files(&self) -> Vec<&Path> {
        self.shards().iter().map(|s| s.path()).collect()
    }
    fn release(&self, name: &str, part: Range<usize>) {
        self.release_tensor(name, part);
    }
}
