//! GGUF: zero-copy reading over a memory map (single and split files) and streaming writing.
//!
//! - [`read`] — the validating header parser ([`Header`], [`TensorInfo`]).
//! - [`value`] — metadata values and the ordered [`Metadata`] list.
//! - [`write`](mod@write) — [`GgufWriter`], header first, then tensor data in order, to a temporary file
//!   renamed on success.
//! - This module: [`GgufFile`] (one mapped file) and [`GgufModel`] (one model, possibly split
//!   into `NAME-00001-of-0000N.gguf` shards, seen as one).

pub mod read;
pub mod value;
pub mod write;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use read::{Header, TensorInfo};
pub use value::{Array, Metadata, StringArray, Value, ValueType};
pub use write::{GgufWriter, TensorSpec};

use crate::format::error::{FormatError, Result};
use crate::format::mmap::MappedFile;

/// Whether `path` is a regular file that starts with the GGUF magic (how inputs of either
/// format are told apart).
pub fn is_gguf_file(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == read::MAGIC
}

/// The block (layer) number of a GGUF tensor name `blk.N.…`, `None` for tensors outside the
/// blocks (`token_embd.weight`, `output_norm.weight`) and for malformed numbers. The one
/// parser of layer indices: merge parameter gradients, llama.cpp's mixture rules and the
/// Hugging Face name mapping all use it.
pub fn block_index(name: &str) -> Option<u32> {
    parse_block_number(name.strip_prefix("blk.")?.split('.').next()?)
}

/// A block number as llama.cpp writes it: decimal digits, no sign, no leading zero.
pub fn parse_block_number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Metadata keys of split models (llama.cpp's `gguf-split`).
pub const KEY_SPLIT_NO: &str = "split.no";
/// Number of shards.
pub const KEY_SPLIT_COUNT: &str = "split.count";
/// Total tensors over all shards.
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// One GGUF file: its validated header and its mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    map: MappedFile,
    header: Header,
}

impl GgufFile {
    /// Maps and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let map = MappedFile::open(&path)?;
        let header = read::parse_header(map.bytes(), &path)?;
        Ok(GgufFile { path, map, header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// Metadata in file order.
    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }
    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }
    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.map.bytes().len() as u64
    }
    /// Whether the file is empty (never true for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw bytes of tensor `i` (zero-copy). Bounds were validated at open.
    pub fn tensor_data(&self, i: usize) -> &[u8] {
        let t = &self.header.tensors[i];
        let start = (self.header.data_offset + t.offset) as usize;
        &self.map.bytes()[start..start + t.nbytes as usize]
    }
    /// Drops the pages of bytes `part` (clamped) of tensor `i`'s data from the process's
    /// resident set until they are read again (see `MappedFile::release`).
    pub fn release_tensor(&self, i: usize, part: Range<usize>) {
        let data = self.tensor_data(i);
        let end = part.end.min(data.len());
        self.map.release(&data[part.start.min(end)..end]);
    }
    /// Drops the pages under `part`, a slice of this file's bytes (a tensor's data or part of
    /// it), from the process's resident set until they are read again; a slice of anything
    /// else is ignored (see `MappedFile::release`).
    pub fn release_bytes(&self, part: &[u8]) {
        self.map.release(part);
    }
}

/// A tensor of a [`GgufModel`]: its info and its bytes.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    /// Name, shape, type.
    pub info: &'a TensorInfo,
    /// Raw data (zero-copy from the map).
    pub data: &'a [u8],
}

/// A model stored as one GGUF file or as split shards, read as one.
pub struct GgufModel {
    shards: Vec<GgufFile>,
    /// (shard, index within shard) of every tensor, in model order.
    order: Vec<(usize, usize)>,
    by_name: HashMap<String, usize>,
}

/// For `DIR/NAME-00002-of-00003.gguf`, returns (`DIR/NAME`, 2, 3).
fn split_parts(path: &Path) -> Option<(PathBuf, u32, u32)> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".gguf")?;
    // "-00001-of-00003" is 15 bytes.
    if stem.len() < 15 || !stem.is_char_boundary(stem.len() - 15) {
        return None;
    }
    let (prefix, tail) = stem.split_at(stem.len() - 15);
    let b = tail.as_bytes();
    if b[0] != b'-' || &tail[6..10] != "-of-" {
        return None;
    }
    let no: u32 = tail[1..6].parse().ok()?;
    let count: u32 = tail[10..15].parse().ok()?;
    Some((path.with_file_name(prefix), no, count))
}

/// The path of shard `no` (1-based) of `count` for `prefix`, as llama.cpp names them.
pub fn split_path(prefix: &Path, no: u32, count: u32) -> PathBuf {
    let name = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    prefix.with_file_name(format!("{name}-{no:05}-of-{count:05}.gguf"))
}

impl GgufModel {
    /// Opens a model. A path named `NAME-0000K-of-0000N.gguf` whose metadata has
    /// `split.count = N` opens all N shards (any shard may be given).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let path = path.as_ref();
        let first = GgufFile::open(path)?;
        let count = first.metadata().get_u64(KEY_SPLIT_COUNT).unwrap_or(1);
        if count <= 1 {
            return GgufModel::from_shards(vec![first]);
        }
        let split_err = |reason: String| FormatError::Split {
            path: path.to_path_buf(),
            reason,
        };
        let (prefix, _, name_count) = split_parts(path).ok_or_else(|| {
            split_err(format!(
                "metadata says {count} shards but the file name is not NAME-0000K-of-{count:05}.gguf"
            ))
        })?;
        if u64::from(name_count) != count {
            return Err(split_err(format!(
                "file name says {name_count} shards, metadata says {count}"
            )));
        }
        let mut shards = Vec::with_capacity(count as usize);
        for no in 1..=name_count {
            let p = split_path(&prefix, no, name_count);
            if p == path {
                continue;
            }
            shards.push(GgufFile::open(&p)?);
        }
        shards.push(first);
        shards.sort_by_key(|s| s.metadata().get_u64(KEY_SPLIT_NO).unwrap_or(u64::MAX));
        GgufModel::from_shards(shards)
    }

    fn from_shards(shards: Vec<GgufFile>) -> Result<GgufModel> {
        let n = shards.len();
        if n > 1 {
            let total: usize = shards.iter().map(|s| s.tensors().len()).sum();
            for (i, s) in shards.iter().enumerate() {
                let err = |reason: String| FormatError::Split {
                    path: s.path().to_path_buf(),
                    reason,
                };
                let no = s.metadata().get_u64(KEY_SPLIT_NO);
                if no != Some(i as u64) {
                    return Err(err(format!("expected {KEY_SPLIT_NO} = {i}, found {no:?}")));
                }
                let count = s.metadata().get_u64(KEY_SPLIT_COUNT);
                if count != Some(n as u64) {
                    return Err(err(format!(
                        "expected {KEY_SPLIT_COUNT} = {n}, found {count:?}"
                    )));
                }
                let declared = s.metadata().get_u64(KEY_SPLIT_TENSORS_COUNT);
                if declared != Some(total as u64) {
                    return Err(err(format!(
                        "{KEY_SPLIT_TENSORS_COUNT} is {declared:?} but the shards hold {total} tensors"
                    )));
                }
            }
        }
        let mut order = Vec::new();
        let mut by_name = HashMap::new();
        for (si, s) in shards.iter().enumerate() {
            for (ti, t) in s.tensors().iter().enumerate() {
                if by_name.insert(t.name.clone(), order.len()).is_some() {
                    return Err(FormatError::DuplicateTensor {
                        path: s.path().to_path_buf(),
                        name: t.name.clone(),
                    });
                }
                order.push((si, ti));
            }
        }
        Ok(GgufModel {
            shards,
            order,
            by_name,
        })
    }

    /// The first shard's metadata (the model's metadata; split keys included).
    pub fn metadata(&self) -> &Metadata {
        self.shards[0].metadata()
    }
    /// The shards, in order.
    pub fn shards(&self) -> &[GgufFile] {
        &self.shards
    }
    /// The path the model is known by (its first shard).
    pub fn path(&self) -> &Path {
        self.shards[0].path()
    }
    /// Total bytes on disk over all shards.
    pub fn file_size(&self) -> u64 {
        self.shards.iter().map(GgufFile::len).sum()
    }
    /// Number of tensors.
    pub fn n_tensors(&self) -> usize {
        self.order.len()
    }
    /// Tensor `i` in model order.
    pub fn tensor(&self, i: usize) -> TensorRef<'_> {
        let (s, t) = self.order[i];
        TensorRef {
            info: &self.shards[s].tensors()[t],
            data: self.shards[s].tensor_data(t),
        }
    }
    /// All tensors in model order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = TensorRef<'_>> + '_ {
        (0..self.order.len()).map(|i| self.tensor(i))
    }
    /// The tensor named `name`.
    pub fn tensor_by_name(&self, name: &str) -> Option<TensorRef<'_>> {
        self.by_name.get(name).map(|&i| self.tensor(i))
    }
    /// Drops the pages of bytes `part` (clamped) of the tensor named `name` from the process's
    /// resident set until they are read again (no-op for unknown names; see
    /// `MappedFile::release`).
    pub fn release_tensor(&self, name: &str, part: Range<usize>) {
        if let Some(&i) = self.by_name.get(name) {
            let (s, t) = self.order[i];
            self.shards[s].release_tensor(t, part);
        }
    }
    /// Drops the pages under `part`, a slice of the data of any of the model's tensors, from
    /// the process's resident set until they are read again (slices of anything else are
    /// ignored): what a streaming reader calls on the bytes it is done with.
    pub fn release_bytes(&self, part: &[u8]) {
        for s in &self.shards {
            s.release_bytes(part);
        }
    }
    /// Number of parameters (elements over all tensors).
    pub fn n_params(&self) -> u64 {
        self.tensors().map(|t| t.info.n_elements()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_parse() {
        let (prefix, no, count) =
            split_parts(Path::new("/m/model-00002-of-00003.gguf")).expect("split name");
        assert_eq!((prefix.as_path(), no, count), (Path::new("/m/model"), 2, 3));
        assert_eq!(
            split_path(&prefix, 1, 3),
            PathBuf::from("/m/model-00001-of-00003.gguf")
        );
        assert!(split_parts(Path::new("/m/model.gguf")).is_none());
        assert!(split_parts(Path::new("/m/é-0001x-of-00003.gguf")).is_none());
    }
}
