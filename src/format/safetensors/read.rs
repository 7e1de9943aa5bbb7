//! Reading: [`SafetensorsModel`] (a file, a sharded index, or an HF directory) as a
//! [`ModelSource`] under GGUF names, with headers validated before any view is handed out.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo as StInfo;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value as Json;

use crate::format::error::{FormatError, Result};
use crate::format::gguf::Metadata;
use crate::format::hf_names::{self, Direction, HfConfig, Transform};
use crate::format::mmap::MappedFile;
use crate::format::source::{ModelSource, SourceTensor};
use crate::format::GgmlType;

use super::{decode_f32, ggml_of, CONFIG_FILE, INDEX_FILE, MAX_DIMS, MAX_HEADER, SINGLE_FILE};

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
pub(super) fn shard_index(path: &Path) -> Option<PathBuf> {
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

    /// Drops the pages under `part`, a slice of the bytes of any of the model's files (a
    /// tensor's data as [`ModelSource::tensor`] lends it, when untransformed), from the
    /// process's resident set until they are read again; slices of anything else are ignored.
    pub fn release_bytes(&self, part: &[u8]) {
        for f in &self.files {
            f.map.release(part);
        }
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
