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

use crate::format::error::Result;
use crate::format::gguf::{GgufModel, Metadata};
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
    fn release(&self, name: &str, part: Range<usize>) {
        self.release_tensor(name, part);
    }
}
