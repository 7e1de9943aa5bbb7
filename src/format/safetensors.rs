//! safetensors models: reading them as a [`ModelSource`] under GGUF names, and writing them under
//! Hugging Face names, streaming.
//!
//! - [`SafetensorsModel`] — one model from a single `.safetensors` file, a sharded checkpoint
//!   (`model.safetensors.index.json` and its shards), or an HF directory holding `config.json`
//!   and one of those. Files are memory-mapped; headers are validated by the `safetensors` crate
//!   (after ggmerge's own length checks, so a truncated file says so). Tensors are exposed under
//!   their GGUF names ([`hf_names::hf_to_gguf`]) with ggml-order shapes (the HF shape reversed;
//!   the bytes are the same), and with llama.cpp's conversion applied
//!   ([`hf_names::transform_of`]): llama q/k rows permuted, Gemma norms `+ 1`.
//! - [`SafetensorsWriter`] — one safetensors file, header first (all offsets are known from the
//!   shapes), then each tensor's bytes in order, to a temporary file renamed on success.
//! - [`write_safetensors`] — a model under HF names, optionally sharded like an HF checkpoint
//!   (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`), with the inverse
//!   transforms applied to values a callback supplies tensor by tensor, slab by slab.
//!
//! Only F32, F16 and BF16 tensors are read or written; other dtypes are an error naming the
//! tensor and its dtype.
//!
//! **Gemma norms in F16/BF16.** llama.cpp adds 1 in the checkpoint's dtype (a BF16 `w + 1` is
//! rounded to BF16) and then stores norms as F32. ggmerge computes `f32(w) + 1` in f32 and
//! exposes those tensors as F32, which is at least as precise, and writes `g - 1` computed in f32
//! when going back (1-D tensors are written as F32 by [`crate::flows::convert`], so the round
//! trip GGUF → safetensors → GGUF is exact for norm values in the usual range).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata as StMetadata, TensorInfo as StInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value as Json;

use super::mmap::MappedFile;
use crate::format::error::{FormatError, Result};
use crate::format::gguf::Metadata;
use crate::format::hf_names::{self, Direction, HfConfig, Transform};
use crate::format::output::OutputFile;
use crate::format::source::{ModelSource, SourceTensor};
use crate::format::{nbytes, GgmlType};

/// The index file of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights file of an unsharded HF checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The HF model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The largest header the `safetensors` crate accepts (100 MB).
const MAX_HEADER: u64 = 100_000_000;
/// Elements per slab when writing (32 MiB of f32).
const SLAB_ELEMS: u64 = 8 << 20;
/// Most dimensions a GGUF tensor may have.
const MAX_DIMS: usize = 4;

/// The ggml type of a safetensors dtype ggmerge reads.
fn ggml_of(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// The safetensors dtype of a ggml type ggmerge writes.
fn dtype_of(ty: GgmlType) -> Option<Dtype> {
    match ty {
        GgmlType::F32 => Some(Dtype::F32),
        GgmlType::F16 => Some(Dtype::F16),
        GgmlType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// F32/F16/BF16 little-endian bytes as f32 values.
fn decode_f32(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// One mapped safetensors file with its validated header.
struct StFile {
    path: PathBuf,
    map: MappedFile,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    /// Tensors in data-offset order.
    tensors: Vec<(String, StInfo)>,
}

/// Looks for the tensor the `safetensors` crate refused, to name it in the error: an unknown or
/// unsupported dtype, or data offsets that do not match the shape. `None` if nothing is found.
fn diagnose_header(header: &[u8], path: &Path) -> Option<FormatError> {
    let root: Json = serde_json::from_slice(header).ok()?;
    let obj = root.as_object()?;
    for (name, v) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = |reason: String| {
            Some(FormatError::BadTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                reason,
            })
        };
        let Some(t) = v.as_object() else {
            return bad("its header entry is not a JSON object".into());
        };
        let dtype_str = t.get("dtype").and_then(Json::as_str).unwrap_or("(missing)");
        let Ok(dtype) = serde_json::from_value::<Dtype>(Json::String(dtype_str.into())) else {
            return Some(FormatError::UnsupportedDtype {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: dtype_str.into(),
            });
        };
        let shape: Option<Vec<u64>> = t
            .get("shape")
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(Json::as_u64).collect());
        let offsets: Option<Vec<u64>> = t
            .get("data_offsets")
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(Json::as_u64).collect());
        let (Some(shape), Some(offsets)) = (shape, offsets) else {
            return bad("shape or data_offsets missing or not lists of integers".into());
        };
        let [start, end] = offsets[..] else {
            return bad(format!("data_offsets {offsets:?} is not [start, end]"));
        };
        let size = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize() as u64))
            .map(|bits| bits / 8);
        match size {
            None => return bad(format!("shape {shape:?} overflows")),
            Some(size) if end < start || end - start != size => {
                return bad(format!(
                    "data_offsets [{start}, {end}] hold {} bytes, but shape {shape:?} of {dtype_str} needs {size}",
                    end.saturating_sub(start)
                ))
            }
            _ => {}
        }
    }
    None
}

/// The tensor whose data ends last, per the raw header (for truncation messages).
fn last_tensor_end(header: &[u8]) -> Option<(String, u64)> {
    let root: Json = serde_json::from_slice(header).ok()?;
    root.as_object()?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(name, v)| {
            let end = v.get("data_offsets")?.as_array()?.get(1)?.as_u64()?;
            Some((name.clone(), end))
        })
        .max_by_key(|(_, e)| *e)
}

/// A safetensors header validated by [`parse_header`].
#[derive(Clone, Debug)]
pub struct StHeader {
    /// Byte offset of the data section (8 + header length).
    pub data_start: usize,
    /// Tensors in data-offset order; their `data_offsets` are relative to `data_start`.
    pub tensors: Vec<(String, StInfo)>,
}

/// Validates a whole safetensors file held in `bytes` (as [`SafetensorsModel::open`] does for
/// each file it maps): length field, cap, header bounds, then the `safetensors` crate's full
/// validation (UTF-8, JSON, dtypes, contiguous offsets, sizes, data ends at the end of
/// `bytes`). `path` only names the file in errors. Any input gives `Ok` or an error, never a
/// panic; every tensor of an `Ok` header lies inside `bytes`.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<StHeader> {
    StFile::parse(bytes, path)
}

impl StFile {
    /// Maps and validates one safetensors file ([`parse_header`] on its bytes).
    fn open(path: &Path) -> Result<StFile> {
        let map = MappedFile::open(path)?;
        let StHeader {
            data_start,
            tensors,
        } = StFile::parse(map.bytes(), path)?;
        Ok(StFile {
            path: path.to_path_buf(),
            map,
            data_start,
            tensors,
        })
    }

    /// Validates the bytes of a safetensors file: length field, cap, header bounds (as
    /// ggmerge's own checks, so truncation is reported as such), then the `safetensors` crate's
    /// full validation (UTF-8, JSON, dtypes, contiguous offsets, sizes, data ends at EOF).
    fn parse(bytes: &[u8], path: &Path) -> Result<StHeader> {
        let len = bytes.len() as u64;
        let invalid = |reason: String| FormatError::Safetensors {
            path: path.to_path_buf(),
            reason,
        };
        let Some(len_field) = bytes.get(..8) else {
            return Err(FormatError::Truncated {
                path: path.to_path_buf(),
                what: "safetensors header length".into(),
                offset: 0,
                needed: 8,
                available: len,
            });
        };
        if len_field.starts_with(b"GGUF") {
            return Err(invalid("this is a GGUF file, not safetensors".into()));
        }
        let mut le = [0u8; 8];
        le.copy_from_slice(len_field);
        let n = u64::from_le_bytes(le);
        if n > MAX_HEADER {
            return Err(invalid(format!(
                "header length {n} is over the {MAX_HEADER}-byte limit (corrupt or not safetensors)"
            )));
        }
        if 8 + n > len {
            return Err(FormatError::Truncated {
                path: path.to_path_buf(),
                what: "safetensors header (JSON)".into(),
                offset: 8,
                needed: n,
                available: len - 8,
            });
        }
        let header = &bytes[8..(8 + n) as usize];
        // The `safetensors` crate adds the data size to the header size unchecked (a panic in
        // builds with overflow checks), so a data end within 8 + n of 2^64 is refused first.
        if let Some((name, end)) =
            last_tensor_end(header).filter(|(_, e)| e.checked_add(8 + n).is_none())
        {
            return Err(FormatError::DataOutOfBounds {
                path: path.to_path_buf(),
                name,
                end: end.saturating_add(8 + n),
                file_len: len,
            });
        }
        let metadata = match SafeTensors::read_metadata(bytes) {
            Ok((_, m)) => m,
            Err(e) => {
                return Err(match e {
                    SafeTensorError::InvalidHeader(_) => {
                        invalid("the header is not valid UTF-8".into())
                    }
                    SafeTensorError::MetadataIncompleteBuffer => {
                        match last_tensor_end(header) {
                            Some((name, end)) if 8 + n + end > len => {
                                FormatError::DataOutOfBounds {
                                    path: path.to_path_buf(),
                                    name,
                                    end: 8 + n + end,
                                    file_len: len,
                                }
                            }
                            Some((_, end)) => invalid(format!(
                                "{} bytes after the last tensor's data (the header describes {end} bytes of data)",
                                len - 8 - n - end
                            )),
                            None => invalid("the data section does not match the header".into()),
                        }
                    }
                    SafeTensorError::InvalidOffset(name) => invalid(format!(
                        "tensor {name:?}: data offsets are not contiguous from 0 in header order"
                    )),
                    other => diagnose_header(header, path)
                        .unwrap_or_else(|| invalid(format!("invalid header: {other}"))),
                });
            }
        };
        let tensors = metadata
            .offset_keys()
            .into_iter()
            .filter_map(|name| {
                let info = metadata.info(&name)?.clone();
                Some((name, info))
            })
            .collect();
        Ok(StHeader {
            data_start: 8 + n as usize,
            tensors,
        })
    }
}

/// How the weights of a model are stored.
enum Layout {
    /// One `.safetensors` file.
    Single(PathBuf),
    /// An index JSON and its shards.
    Index(PathBuf),
}

/// For `DIR/NAME-00001-of-00003.safetensors`, the index `DIR/NAME.safetensors.index.json`.
fn shard_index(path: &Path) -> Option<PathBuf> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".safetensors")?;
    if stem.len() < 15 || !stem.is_char_boundary(stem.len() - 15) {
        return None;
    }
    let (prefix, tail) = stem.split_at(stem.len() - 15);
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    (tail.starts_with('-') && &tail[6..10] == "-of-" && digits(&tail[1..6]) && digits(&tail[10..]))
        .then(|| path.with_file_name(format!("{prefix}.safetensors.index.json")))
}

/// Where the weights of `path` are, and the directory holding `config.json`.
fn locate(path: &Path) -> Result<(Layout, PathBuf)> {
    if path.is_dir() {
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Ok((Layout::Index(index), path.to_path_buf()));
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Ok((Layout::Single(single), path.to_path_buf()));
        }
        let found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| FormatError::Io {
                path: path.to_path_buf(),
                what: "cannot list the directory",
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .collect();
        return match &found[..] {
            [one] => Ok((Layout::Single(one.clone()), path.to_path_buf())),
            _ => Err(FormatError::Safetensors {
                path: path.to_path_buf(),
                reason: format!(
                    "the directory has neither {SINGLE_FILE} nor {INDEX_FILE}, and {} other \
                     .safetensors files (one would be read)",
                    found.len()
                ),
            }),
        };
    }
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if path.extension().is_some_and(|x| x == "json") {
        return Ok((Layout::Index(path.to_path_buf()), dir));
    }
    if let Some(index) = shard_index(path).filter(|i| i.is_file()) {
        return Ok((Layout::Index(index), dir));
    }
    Ok((Layout::Single(path.to_path_buf()), dir))
}

/// Reads an index: its `weight_map` as (tensor, shard file name) pairs.
fn read_index(path: &Path) -> Result<Vec<(String, String)>> {
    let bad = |reason: String| FormatError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        what: "cannot read the safetensors index",
        source,
    })?;
    let root: Json =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = root
        .get("weight_map")
        .and_then(Json::as_object)
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{name:?}] is not a file name")))?;
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|f| f == std::ffi::OsStr::new(file));
        if !plain || file == ".." || file == "." {
            return Err(bad(format!(
                "weight_map[{name:?}] = {file:?} is not a plain file name in the index's directory"
            )));
        }
        out.push((name.clone(), file.to_string()));
    }
    Ok(out)
}

/// Where [`SafetensorsModel`] gets its configuration.
enum ConfigFrom<'a> {
    /// `config.json`, required.
    File,
    /// `config.json` if present (architecture overridden), else only the architecture.
    Arch(&'a str),
    /// This configuration; `config.json` is not read.
    Given(HfConfig),
    /// `config.json` if present, else this configuration.
    FileOr(HfConfig),
}

/// One tensor of a [`SafetensorsModel`].
struct Entry {
    gguf: String,
    hf: String,
    file: usize,
    /// Absolute byte range in the file's map.
    start: usize,
    end: usize,
    /// Type of the stored bytes.
    src_ty: GgmlType,
    /// Type exposed (F32 for Gemma norms stored as F16/BF16).
    ty: GgmlType,
    /// ggml-order shape.
    shape: Vec<u64>,
    transform: Transform,
    /// Head size for the q/k permutation (0 otherwise).
    head_dim: u64,
}

/// A safetensors model seen as a [`ModelSource`]: GGUF names, ggml shapes, llama.cpp's
/// conversion transforms applied.
///
/// ```no_run
/// use ggmerge::format::safetensors::SafetensorsModel;
/// use ggmerge::format::source::ModelSource;
///
/// let m = SafetensorsModel::open("SmolLM2-135M-Instruct/")?;
/// let q = m.tensor("blk.0.attn_q.weight")?.expect("present");
/// println!("{} {:?} {}", q.name, q.shape, q.ty);
/// # Ok::<(), ggmerge::format::FormatError>(())
/// ```
pub struct SafetensorsModel {
    path: PathBuf,
    files: Vec<StFile>,
    config: HfConfig,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    skipped: Vec<String>,
}

impl SafetensorsModel {
    /// Opens a model: a `.safetensors` file, a `*.safetensors.index.json`, a shard of an indexed
    /// checkpoint (the whole checkpoint is opened), or a directory. The architecture and head
    /// counts come from `config.json` in the same directory; without one this is an error
    /// (see [`SafetensorsModel::open_with_arch`]).
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsModel> {
        SafetensorsModel::open_inner(path.as_ref(), ConfigFrom::File)
    }

    /// Opens a model whose architecture (GGUF spelling: `llama`, `gemma3`, …) is given
    /// explicitly; `config.json`, if present, still supplies the head counts.
    pub fn open_with_arch(path: impl AsRef<Path>, arch: &str) -> Result<SafetensorsModel> {
        SafetensorsModel::open_inner(path.as_ref(), ConfigFrom::Arch(arch))
    }

    /// Opens a model with an explicit configuration (`config.json` is not read).
    pub fn open_with_config(path: impl AsRef<Path>, config: HfConfig) -> Result<SafetensorsModel> {
        SafetensorsModel::open_inner(path.as_ref(), ConfigFrom::Given(config))
    }

    /// Opens a model with its `config.json` if it has one, else with `fallback` (for example
    /// [`HfConfig::from_gguf_metadata`] of the GGUF base it was fine-tuned from).
    pub fn open_or_config(path: impl AsRef<Path>, fallback: HfConfig) -> Result<SafetensorsModel> {
        SafetensorsModel::open_inner(path.as_ref(), ConfigFrom::FileOr(fallback))
    }

    fn open_inner(path: &Path, from: ConfigFrom<'_>) -> Result<SafetensorsModel> {
        let (layout, dir) = locate(path)?;
        // (file index, tensor index within the file) in model order.
        let mut files = Vec::new();
        let mut order: Vec<(usize, usize)> = Vec::new();
        match layout {
            Layout::Single(p) => {
                files.push(StFile::open(&p)?);
                order.extend((0..files[0].tensors.len()).map(|t| (0, t)));
            }
            Layout::Index(index) => {
                let map = read_index(&index)?;
                let mut names: Vec<&str> = map.iter().map(|(_, f)| f.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                let base = index.parent().unwrap_or(Path::new("."));
                for f in &names {
                    files.push(StFile::open(&base.join(f))?);
                }
                let mut wanted: HashMap<usize, HashMap<&str, bool>> = HashMap::new();
                for (tensor, f) in &map {
                    let fi = names.binary_search(&f.as_str()).unwrap_or_default();
                    wanted.entry(fi).or_default().insert(tensor, false);
                }
                for (fi, file) in files.iter().enumerate() {
                    let Some(w) = wanted.get_mut(&fi) else {
                        continue;
                    };
                    for (ti, (name, _)) in file.tensors.iter().enumerate() {
                        if let Some(seen) = w.get_mut(name.as_str()) {
                            *seen = true;
                            order.push((fi, ti));
                        }
                    }
                    if let Some((missing, _)) = w.iter().find(|(_, seen)| !**seen) {
                        return Err(FormatError::Config {
                            path: index.clone(),
                            reason: format!(
                                "weight_map puts tensor {missing:?} in {}, which does not contain it",
                                names[fi]
                            ),
                        });
                    }
                }
            }
        }

        // The configuration after the weights, so a file that is not safetensors says so first.
        let config_path = dir.join(CONFIG_FILE);
        let unsupported = |a: &str| FormatError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "architecture {a:?} is not supported (supported: {})",
                hf_names::SUPPORTED_ARCHS.join(", ")
            ),
        };
        let checked = |mut c: HfConfig| -> Result<HfConfig> {
            c.arch = HfConfig::for_arch(&c.arch)
                .ok_or_else(|| unsupported(&c.arch))?
                .arch;
            Ok(c)
        };
        let config = match from {
            ConfigFrom::Given(c) => checked(c)?,
            ConfigFrom::File | ConfigFrom::FileOr(_) | ConfigFrom::Arch(_)
                if config_path.is_file() =>
            {
                let mut c = HfConfig::from_file(&config_path)?;
                if let ConfigFrom::Arch(a) = from {
                    c.arch = a.to_string();
                }
                checked(c)?
            }
            ConfigFrom::FileOr(c) => checked(c)?,
            ConfigFrom::Arch(a) => HfConfig::for_arch(a).ok_or_else(|| unsupported(a))?,
            ConfigFrom::File => {
                return Err(FormatError::Config {
                    path: path.to_path_buf(),
                    reason: format!(
                        "no {CONFIG_FILE} next to the model, so its architecture is unknown; \
                         add one or give the architecture explicitly"
                    ),
                })
            }
        };

        let mut entries = Vec::with_capacity(order.len());
        let mut by_name = HashMap::new();
        let mut skipped = Vec::new();
        for (fi, ti) in order {
            let file = &files[fi];
            let (hf, info) = &file.tensors[ti];
            if hf_names::hf_is_skipped(&config.arch, hf) {
                skipped.push(hf.clone());
                continue;
            }
            let entry = SafetensorsModel::entry(file, fi, hf, info, &config)?;
            if by_name.insert(entry.gguf.clone(), entries.len()).is_some() {
                return Err(FormatError::DuplicateTensor {
                    path: file.path.clone(),
                    name: entry.gguf,
                });
            }
            entries.push(entry);
        }
        Ok(SafetensorsModel {
            path: path.to_path_buf(),
            files,
            config,
            entries,
            by_name,
            skipped,
        })
    }

    /// Maps one HF tensor: name, type, shape, transform.
    fn entry(
        file: &StFile,
        fi: usize,
        hf: &str,
        info: &StInfo,
        config: &HfConfig,
    ) -> Result<Entry> {
        let path = &file.path;
        let bad = |reason: String| FormatError::BadTensor {
            path: path.clone(),
            name: hf.to_string(),
            reason,
        };
        let gguf =
            hf_names::hf_to_gguf(&config.arch, hf).ok_or_else(|| FormatError::UnmappedTensor {
                path: path.clone(),
                name: hf.to_string(),
                arch: config.arch.clone(),
                target: "GGUF",
            })?;
        let src_ty = ggml_of(info.dtype).ok_or_else(|| FormatError::UnsupportedDtype {
            path: path.clone(),
            name: hf.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        if info.shape.len() > MAX_DIMS {
            return Err(bad(format!(
                "shape {:?} has more than {MAX_DIMS} dimensions",
                info.shape
            )));
        }
        if info.shape.contains(&0) {
            return Err(bad(format!("shape {:?} has a zero dimension", info.shape)));
        }
        let mut shape: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
        if shape.is_empty() {
            shape.push(1);
        }
        let transform = hf_names::transform_of(&config.arch, &gguf);
        let mut head_dim = 0;
        if matches!(transform, Transform::PermuteQ | Transform::PermuteK) {
            let heads = config.permute_heads(transform).ok_or_else(|| {
                bad(
                    "the configuration has no num_attention_heads, which llama.cpp's q/k row \
                     permutation needs (add config.json)"
                        .into(),
                )
            })?;
            let rows = *shape.last().unwrap_or(&1);
            head_dim = hf_names::head_dim(rows, heads).map_err(bad)?;
        }
        let ty = if transform == Transform::AddOne {
            GgmlType::F32
        } else {
            src_ty
        };
        let (s, e) = info.data_offsets;
        Ok(Entry {
            gguf,
            hf: hf.to_string(),
            file: fi,
            start: file.data_start + s,
            end: file.data_start + e,
            src_ty,
            ty,
            shape,
            transform,
            head_dim,
        })
    }

    /// The configuration in use (from `config.json` or given).
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// The files read (one, or every shard).
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Total bytes of the mapped files.
    pub fn file_size(&self) -> u64 {
        self.files.iter().map(|f| f.map.bytes().len() as u64).sum()
    }

    /// HF tensors llama.cpp drops that were left out (`rotary_emb.inv_freq`, vision tower, …).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The HF name of the tensor with GGUF name `gguf_name`.
    pub fn hf_name(&self, gguf_name: &str) -> Option<&str> {
        self.by_name
            .get(gguf_name)
            .map(|&i| self.entries[i].hf.as_str())
    }

    /// The dtype stored in the file for GGUF tensor `gguf_name` (before any transform).
    pub fn stored_type(&self, gguf_name: &str) -> Option<GgmlType> {
        self.by_name.get(gguf_name).map(|&i| self.entries[i].src_ty)
    }

    /// The tensor's data as llama.cpp's converter would store it: borrowed from the map when
    /// untouched, owned when permuted or offset.
    fn data(&self, e: &Entry) -> Cow<'_, [u8]> {
        let raw = &self.files[e.file].map.bytes()[e.start..e.end];
        match e.transform {
            Transform::None => Cow::Borrowed(raw),
            Transform::PermuteQ | Transform::PermuteK => {
                let rows = *e.shape.last().unwrap_or(&1) as usize;
                let mut out = vec![0u8; raw.len()];
                hf_names::permute_rows(
                    raw,
                    &mut out,
                    raw.len() / rows.max(1),
                    e.head_dim,
                    Direction::HfToGguf,
                );
                Cow::Owned(out)
            }
            Transform::AddOne => {
                let v = decode_f32(e.src_ty, raw);
                Cow::Owned(v.iter().flat_map(|x| (x + 1.0).to_le_bytes()).collect())
            }
        }
    }
}

impl ModelSource for SafetensorsModel {
    fn path(&self) -> &Path {
        &self.path
    }
    fn architecture(&self) -> Option<&str> {
        Some(&self.config.arch)
    }
    fn metadata(&self) -> Option<&Metadata> {
        None
    }
    fn tensor_names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.gguf.clone()).collect()
    }
    fn tensor_info(&self, name: &str) -> Option<(Vec<u64>, GgmlType)> {
        self.by_name.get(name).map(|&i| {
            let e = &self.entries[i];
            (e.shape.clone(), e.ty)
        })
    }
    fn release(&self, name: &str, part: std::ops::Range<usize>) {
        // Transformed tensors (permuted rows) map `part` to other raw bytes; a hint, so the
        // raw range at the same offsets is good enough.
        if let Some(&i) = self.by_name.get(name) {
            let e = &self.entries[i];
            let raw = &self.files[e.file].map.bytes()[e.start..e.end];
            let end = part.end.min(raw.len());
            self.files[e.file]
                .map
                .release(&raw[part.start.min(end)..end]);
        }
    }
    fn tensor(&self, name: &str) -> Result<Option<SourceTensor<'_>>> {
        let Some(&i) = self.by_name.get(name) else {
            return Ok(None);
        };
        let e = &self.entries[i];
        Ok(Some(SourceTensor {
            name: e.gguf.clone(),
            shape: e.shape.clone(),
            ty: e.ty,
            data: self.data(e),
        }))
    }
    fn block_count(&self) -> Option<u64> {
        self.config.n_layers
    }
    fn files(&self) -> Vec<&Path> {
        SafetensorsModel::files(self)
    }
    fn hf_config(&self) -> Option<&HfConfig> {
        Some(&self.config)
    }
}

/// A tensor of a safetensors file to be written: HF name, HF (row-major, outermost first)
/// shape, and dtype (F32, F16 or BF16).
#[derive(Clone, Debug, PartialEq)]
pub struct StTensorSpec {
    /// Name as written.
    pub name: String,
    /// Shape, outermost dimension first (HF order).
    pub shape: Vec<u64>,
    /// F32, F16 or BF16.
    pub ty: GgmlType,
}

/// Encodes a safetensors header (8-byte length, JSON padded with spaces to a multiple of 8)
/// for `tensors` laid out in order, and returns it with each tensor's byte size. The header is
/// built and validated with the `safetensors` crate's own `Metadata`.
pub fn encode_header(
    tensors: &[StTensorSpec],
    metadata: &BTreeMap<String, String>,
    path: &Path,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let err = |reason: String| FormatError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0usize;
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(err(format!("duplicate tensor {:?}", t.name)));
        }
        if t.name == "__metadata__" {
            return Err(err("a tensor cannot be named __metadata__".into()));
        }
        let dtype = dtype_of(t.ty).ok_or_else(|| {
            err(format!(
                "tensor {:?}: safetensors output supports F32, F16 and BF16, not {}",
                t.name, t.ty
            ))
        })?;
        let ggml_shape: Vec<u64> = t.shape.iter().rev().copied().collect();
        let size = nbytes(&ggml_shape, t.ty)
            .map_err(|e| err(format!("tensor {:?} {:?}: {e}", t.name, t.shape)))?;
        let usize_of = |x: u64| usize::try_from(x).map_err(|_| err("size overflows".into()));
        let end = offset
            .checked_add(usize_of(size)?)
            .ok_or_else(|| err("total data size overflows".into()))?;
        let shape = t
            .shape
            .iter()
            .map(|&d| usize_of(d))
            .collect::<Result<Vec<usize>>>()?;
        infos.push((
            t.name.clone(),
            StInfo {
                dtype,
                shape,
                data_offsets: (offset, end),
            },
        ));
        sizes.push(size);
        offset = end;
    }
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let meta = StMetadata::new((!meta.is_empty()).then_some(meta), infos)
        .map_err(|e| err(format!("invalid safetensors header: {e}")))?;
    let mut json =
        serde_json::to_vec(&meta).map_err(|e| err(format!("cannot encode the header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() as u64 > MAX_HEADER {
        return Err(err(format!(
            "header of {} bytes is over the safetensors limit of {MAX_HEADER}",
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, sizes))
}

/// Writes one safetensors file tensor by tensor: the header (all offsets computed from shapes
/// and dtypes) first, then each tensor's bytes in the declared order. Output goes through
/// [`OutputFile`] (temporary file, renamed on [`SafetensorsWriter::finish`]).
pub struct SafetensorsWriter {
    out: OutputFile,
    sizes: Vec<u64>,
    names: Vec<String>,
    next: usize,
    tensor_start: u64,
}

impl SafetensorsWriter {
    /// Creates `path` (via a temporary file) and writes the header. `metadata` is the
    /// `__metadata__` map (HF writes `{"format": "pt"}`); writing onto one of `inputs` is
    /// refused.
    pub fn create(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
    ) -> Result<SafetensorsWriter> {
        Self::create_file(path, tensors, metadata, inputs, None)
    }

    /// [`SafetensorsWriter::create`] for a file written beside the output the user named (a
    /// shard, or the weights inside an output directory): an existing file is replaced only
    /// with `overwrite` (`--force`).
    pub fn create_beside(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
        overwrite: bool,
    ) -> Result<SafetensorsWriter> {
        Self::create_file(path, tensors, metadata, inputs, Some(overwrite))
    }

    fn create_file(
        path: &Path,
        tensors: &[StTensorSpec],
        metadata: &BTreeMap<String, String>,
        inputs: &[&Path],
        beside: Option<bool>,
    ) -> Result<SafetensorsWriter> {
        let (header, sizes) = encode_header(tensors, metadata, path)?;
        let mut out = match beside {
            None => OutputFile::create(path, inputs)?,
            Some(overwrite) => OutputFile::create_beside(path, inputs, overwrite)?,
        };
        out.write_all(&header)?;
        let tensor_start = out.written();
        Ok(SafetensorsWriter {
            out,
            sizes,
            names: tensors.iter().map(|t| t.name.clone()).collect(),
            next: 0,
            tensor_start,
        })
    }

    /// Name of the tensor whose data is expected next, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.next).map(String::as_str)
    }

    /// Appends part of the next tensor's data.
    pub fn write_part(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)
    }

    /// Closes the next tensor, checking its size.
    pub fn end_tensor(&mut self) -> Result<()> {
        let target = self.out.target().to_path_buf();
        let expected = *self
            .sizes
            .get(self.next)
            .ok_or_else(|| FormatError::Write {
                path: target.clone(),
                reason: "more tensors written than declared".into(),
            })?;
        let got = self.out.written() - self.tensor_start;
        if got != expected {
            return Err(FormatError::Write {
                path: target,
                reason: format!(
                    "tensor {:?}: wrote {got} bytes, its shape and dtype need {expected}",
                    self.names[self.next]
                ),
            });
        }
        self.next += 1;
        self.tensor_start = self.out.written();
        self.out.check_inputs()
    }

    /// Checks every tensor was written and returns the uncommitted output.
    fn close(self) -> Result<OutputFile> {
        if self.next != self.sizes.len() {
            return Err(FormatError::Write {
                path: self.out.target().to_path_buf(),
                reason: format!(
                    "only {} of {} tensors were written",
                    self.next,
                    self.sizes.len()
                ),
            });
        }
        Ok(self.out)
    }

    /// Checks every tensor was written, then syncs and renames into place. Returns the size.
    pub fn finish(self) -> Result<u64> {
        self.close()?.commit()
    }
}

/// A tensor to export with [`write_safetensors`]: its GGUF name and ggml-order shape (as the
/// source model has them) and the dtype to write.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportTensor {
    /// GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml-order shape (`shape[0]` the row length).
    pub shape: Vec<u64>,
    /// Output dtype: F32, F16 or BF16.
    pub ty: GgmlType,
}

/// Options of [`write_safetensors`].
#[derive(Clone, Debug)]
pub struct SafetensorsOptions {
    /// Largest shard in bytes of tensor data; `None` writes one file. A tensor larger than this
    /// gets a shard of its own. When the model fits in one shard no index is written.
    pub max_shard_bytes: Option<u64>,
    /// The `__metadata__` of every file (default `{"format": "pt"}`, which transformers
    /// expects).
    pub metadata: BTreeMap<String, String>,
    /// Whether the weights path given to [`write_safetensors`] is itself the output the user
    /// named (default). `false` for the weights inside an output directory: every file is then
    /// written *beside* the named output, like shards and the index always are.
    pub path_is_named: bool,
    /// Replace existing files beside the named output (`--force`); without it they are an
    /// error naming the file.
    pub overwrite: bool,
}

impl Default for SafetensorsOptions {
    fn default() -> SafetensorsOptions {
        SafetensorsOptions {
            max_shard_bytes: None,
            metadata: BTreeMap::from([("format".to_string(), "pt".to_string())]),
            path_is_named: true,
            overwrite: false,
        }
    }
}

/// What [`write_safetensors`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsOutput {
    /// The weight files, in shard order.
    pub files: Vec<PathBuf>,
    /// The index file, when sharded.
    pub index: Option<PathBuf>,
    /// Bytes written over all files (index included).
    pub bytes: u64,
    /// (GGUF name, HF name) of every tensor, in order.
    pub names: Vec<(String, String)>,
}

/// The shard file names for `path` (`DIR/STEM.safetensors`): `STEM-0000K-of-0000N.safetensors`
/// and `STEM.safetensors.index.json`, as HF names them for `model.safetensors`.
fn shard_paths(path: &Path, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file
        .strip_suffix(".safetensors")
        .unwrap_or(&file)
        .to_string();
    let files = (1..=n)
        .map(|k| path.with_file_name(format!("{stem}-{k:05}-of-{n:05}.safetensors")))
        .collect();
    (
        files,
        path.with_file_name(format!("{stem}.safetensors.index.json")),
    )
}

/// Encodes f32 values into `ty` (F32/F16/BF16) little-endian bytes, refusing finite values the
/// type cannot hold (F16 above 65504).
fn encode(ty: GgmlType, v: &[f32], out: &mut Vec<u8>) -> std::result::Result<(), (usize, f32)> {
    out.clear();
    match ty {
        GgmlType::F16 => {
            for (i, &x) in v.iter().enumerate() {
                let h = f16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err((i, x));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (i, &x) in v.iter().enumerate() {
                let h = bf16::from_f32(x);
                if h.is_infinite() && x.is_finite() {
                    return Err((i, x));
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        _ => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    Ok(())
}

/// Writes a model as safetensors under HF names, streaming, to `path` (a `.safetensors` file),
/// or to `STEM-0000K-of-0000N.safetensors` shards plus `STEM.safetensors.index.json` next to it
/// when [`SafetensorsOptions::max_shard_bytes`] splits it.
///
/// `tensors` are given by GGUF name and ggml shape; each gets its HF name
/// ([`hf_names::gguf_to_hf`]; a tensor without one is an error — filter first) and the inverse
/// of llama.cpp's transform (llama q/k rows un-permuted with `config`'s head counts, Gemma norms
/// `- 1`). Values come from `fill(i, first, buf)`: fill `buf` with elements
/// `first..first + buf.len()` of tensor `i` as f32 in GGUF layout and meaning. Slabs are whole
/// rows (whole heads for permuted tensors, the whole tensor for 1-D ones), at most ~32 MiB of
/// f32, requested in order.
///
/// Every file is written to a temporary file and renamed only when all are complete; the index
/// is renamed last.
pub fn write_safetensors<E: From<FormatError>>(
    path: &Path,
    config: &HfConfig,
    tensors: &[ExportTensor],
    opts: &SafetensorsOptions,
    inputs: &[&Path],
    mut fill: impl FnMut(usize, u64, &mut [f32]) -> std::result::Result<(), E>,
) -> std::result::Result<SafetensorsOutput, E> {
    let werr = |reason: String| FormatError::Write {
        path: path.to_path_buf(),
        reason,
    };
    // Plan every tensor before creating anything, so a bad request leaves no files.
    struct Planned {
        spec: StTensorSpec,
        transform: Transform,
        head_dim: u64,
        size: u64,
    }
    let mut plan = Vec::with_capacity(tensors.len());
    for t in tensors {
        let hf = hf_names::gguf_to_hf(&config.arch, &t.name).ok_or_else(|| {
            FormatError::UnmappedTensor {
                path: path.to_path_buf(),
                name: t.name.clone(),
                arch: config.arch.clone(),
                target: "Hugging Face",
            }
        })?;
        if dtype_of(t.ty).is_none() {
            return Err(werr(format!(
                "tensor {:?}: safetensors output supports F32, F16 and BF16, not {}",
                t.name, t.ty
            ))
            .into());
        }
        if t.shape.is_empty() || t.shape.contains(&0) {
            return Err(werr(format!(
                "tensor {:?} has invalid shape {:?}",
                t.name, t.shape
            ))
            .into());
        }
        let transform = hf_names::transform_of(&config.arch, &t.name);
        let mut head_dim = 0;
        if matches!(transform, Transform::PermuteQ | Transform::PermuteK) {
            let heads = config.permute_heads(transform).ok_or_else(|| {
                werr(format!(
                    "tensor {:?}: the head count is unknown, and un-permuting q/k needs it",
                    t.name
                ))
            })?;
            head_dim = hf_names::head_dim(*t.shape.last().unwrap_or(&1), heads)
                .map_err(|e| werr(format!("tensor {:?}: {e}", t.name)))?;
        }
        let size = nbytes(&t.shape, t.ty)
            .map_err(|e| werr(format!("tensor {:?} {:?}: {e}", t.name, t.shape)))?;
        plan.push(Planned {
            spec: StTensorSpec {
                name: hf,
                shape: t.shape.iter().rev().copied().collect(),
                ty: t.ty,
            },
            transform,
            head_dim,
            size,
        });
    }

    // Greedy sharding in order, as transformers' save_pretrained does.
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, p) in plan.iter().enumerate() {
        if let Some(max) = opts.max_shard_bytes {
            if i > start && acc + p.size > max {
                shards.push(start..i);
                start = i;
                acc = 0;
            }
        }
        acc += p.size;
    }
    shards.push(start..plan.len());
    let (files, index_path) = if shards.len() == 1 {
        (vec![path.to_path_buf()], None)
    } else {
        let (f, i) = shard_paths(path, shards.len());
        (f, Some(i))
    };

    let mut pending = Vec::with_capacity(files.len() + 1);
    let mut buf: Vec<f32> = Vec::new();
    let mut tmp: Vec<f32> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    for (range, file) in shards.iter().zip(&files) {
        let specs: Vec<StTensorSpec> = plan[range.clone()].iter().map(|p| p.spec.clone()).collect();
        let mut w = if file == path && opts.path_is_named {
            SafetensorsWriter::create(file, &specs, &opts.metadata, inputs)?
        } else {
            SafetensorsWriter::create_beside(file, &specs, &opts.metadata, inputs, opts.overwrite)?
        };
        for i in range.clone() {
            let p = &plan[i];
            let shape = &tensors[i].shape;
            let rows = *shape.last().unwrap_or(&1);
            let inner: u64 = shape[..shape.len() - 1].iter().product();
            let mut slab_rows = if shape.len() == 1 {
                rows
            } else {
                (SLAB_ELEMS / inner.max(1)).clamp(1, rows)
            };
            // Permuted tensors: whole heads per slab.
            if let Some(heads) = slab_rows.checked_div(p.head_dim) {
                slab_rows = heads.max(1) * p.head_dim;
            }
            let mut row = 0;
            while row < rows {
                let n = slab_rows.min(rows - row);
                buf.resize((n * inner) as usize, 0.0);
                fill(i, row * inner, &mut buf)?;
                match p.transform {
                    Transform::AddOne => buf.iter_mut().for_each(|x| *x -= 1.0),
                    Transform::PermuteQ | Transform::PermuteK => {
                        tmp.resize(buf.len(), 0.0);
                        hf_names::permute_rows(
                            bytemuck::cast_slice(&buf),
                            bytemuck::cast_slice_mut(&mut tmp),
                            inner as usize * 4,
                            p.head_dim,
                            Direction::GgufToHf,
                        );
                        std::mem::swap(&mut buf, &mut tmp);
                    }
                    Transform::None => {}
                }
                encode(p.spec.ty, &buf, &mut bytes).map_err(|(k, x)| {
                    werr(format!(
                        "tensor {:?}: element {} is {x}, which {} cannot hold; write F32 or BF16",
                        tensors[i].name,
                        row * inner + k as u64,
                        p.spec.ty
                    ))
                })?;
                w.write_part(&bytes)?;
                row += n;
            }
            w.end_tensor()?;
        }
        pending.push(w.close()?);
    }
    if let Some(ix) = &index_path {
        let total: u64 = plan.iter().map(|p| p.size).sum();
        let mut weight_map = BTreeMap::new();
        for (range, file) in shards.iter().zip(&files) {
            let name = file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            for p in &plan[range.clone()] {
                weight_map.insert(p.spec.name.clone(), name.clone());
            }
        }
        let json = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let text = serde_json::to_vec_pretty(&json)
            .map_err(|e| werr(format!("cannot encode the index: {e}")))?;
        let mut out = OutputFile::create_beside(ix, inputs, opts.overwrite)?;
        out.write_all(&text)?;
        out.write_all(b"\n")?;
        pending.push(out);
    }
    let mut written = 0;
    for out in pending {
        written += out.commit()?;
    }
    Ok(SafetensorsOutput {
        files,
        index: index_path,
        bytes: written,
        names: tensors
            .iter()
            .zip(&plan)
            .map(|(t, p)| (t.name.clone(), p.spec.name.clone()))
            .collect(),
    })
}

/// Writes `config.json` (the minimal one of [`HfConfig::to_json`]) into `dir`, via a temporary
/// file; an existing `config.json` is replaced only with `overwrite` (it is a file beside the
/// output the user named). Returns its path.
pub fn write_config_json(
    dir: &Path,
    config: &HfConfig,
    inputs: &[&Path],
    overwrite: bool,
) -> Result<PathBuf> {
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_vec_pretty(&config.to_json()).map_err(|e| FormatError::Write {
        path: path.clone(),
        reason: format!("cannot encode config.json: {e}"),
    })?;
    let mut out = OutputFile::create_beside(&path, inputs, overwrite)?;
    out.write_all(&text)?;
    out.write_all(b"\n")?;
    out.commit()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        let (f, i) = shard_paths(Path::new("/d/model.safetensors"), 3);
        assert_eq!(f[0], PathBuf::from("/d/model-00001-of-00003.safetensors"));
        assert_eq!(f[2], PathBuf::from("/d/model-00003-of-00003.safetensors"));
        assert_eq!(i, PathBuf::from("/d/model.safetensors.index.json"));
        assert_eq!(
            shard_index(&f[1]),
            Some(PathBuf::from("/d/model.safetensors.index.json"))
        );
        assert_eq!(shard_index(Path::new("/d/model.safetensors")), None);
        assert_eq!(
            shard_index(Path::new("/d/m-0000a-of-00003.safetensors")),
            None
        );
    }

    #[test]
    fn header_is_what_the_crate_reads() {
        let specs = vec![
            StTensorSpec {
                name: "b".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            StTensorSpec {
                name: "a".into(),
                shape: vec![2, 3],
                ty: GgmlType::BF16,
            },
        ];
        let meta = SafetensorsOptions::default().metadata;
        let (mut file, sizes) = encode_header(&specs, &meta, Path::new("x")).unwrap();
        assert_eq!(sizes, [12, 12]);
        assert_eq!((file.len() - 8) % 8, 0);
        file.extend(std::iter::repeat_n(7u8, 24));
        let st = SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), [2, 3]);
        assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::BF16);
        assert_eq!(st.tensor("b").unwrap().data(), &[7u8; 12][..]);
        let (_, m) = SafeTensors::read_metadata(&file).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!(m.offset_keys(), ["b", "a"]);

        let dup = vec![specs[0].clone(), specs[0].clone()];
        assert!(encode_header(&dup, &meta, Path::new("x")).is_err());
        let q = vec![StTensorSpec {
            name: "q".into(),
            shape: vec![32],
            ty: GgmlType::Q8_0,
        }];
        assert!(encode_header(&q, &meta, Path::new("x")).is_err());
    }

    #[test]
    fn encode_refuses_f16_overflow() {
        let mut out = Vec::new();
        assert_eq!(
            encode(GgmlType::F16, &[1.0, 70000.0], &mut out),
            Err((1, 70000.0))
        );
        assert!(encode(GgmlType::BF16, &[70000.0], &mut out).is_ok());
        assert!(encode(GgmlType::F16, &[f32::INFINITY], &mut out).is_ok());
    }

    #[test]
    fn data_end_near_u64_max_is_out_of_bounds() {
        // Eight contiguous 2^61 - 1 byte tensors end at 2^64 - 8: adding the header size
        // overflows (the fuzzer's fuzz/artifacts-found/safetensors_header/data-end-overflow).
        let k = (1u64 << 61) - 1;
        let entries: Vec<String> = (0..8)
            .map(|i| {
                let (s, e) = (i * k, (i + 1) * k);
                format!(r#""t{i}":{{"dtype":"U8","shape":[{k}],"data_offsets":[{s},{e}]}}"#)
            })
            .collect();
        let json = format!("{{{}}}", entries.join(","));
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        let e = parse_header(&file, Path::new("x")).unwrap_err();
        assert!(
            matches!(&e, FormatError::DataOutOfBounds { name, end: u64::MAX, .. } if name == "t7"),
            "{e}"
        );
    }
}
