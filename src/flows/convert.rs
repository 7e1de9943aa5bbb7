//! `convert`: GGUF ↔ safetensors, streaming tensor by tensor.
//!
//! - **GGUF → safetensors**: every tensor with an HF name ([`hf_names::gguf_to_hf`]) is
//!   dequantized (ggml, bit-exact) slab by slab, un-transformed (llama q/k rows un-permuted, Gemma
//!   norms `- 1`) and written under its HF name: 1-D tensors as F32, the others in
//!   [`ConvertOptions::out_type`] (F32, F16 or BF16; default F16). A minimal `config.json` is
//!   written next to the weights (architecture, layer and head counts, sizes from the GGUF
//!   metadata) so the output opens again as a [`SafetensorsModel`]. Tensors without an HF name
//!   (`rope_freqs.weight`) are skipped and listed in the report.
//! - **safetensors → GGUF**: needs a GGUF base ([`ConvertOptions::metadata_from`]) for the
//!   metadata and tokenizer that safetensors does not carry. Tensors come out under GGUF names
//!   with llama.cpp's transforms, in the base's tensor order (tensors the base lacks follow),
//!   each in its stored type (F32, F16, BF16; transformed Gemma norms F32) or the requested one.
//!
//! The direction follows the input: a file starting with `GGUF` is GGUF; anything else (a
//! `.safetensors` file, an index JSON, a directory) is safetensors.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::flows::progress::{with_threads, Progress};
use crate::format::gguf::{
    GgufModel, GgufWriter, Metadata, TensorSpec, Value, KEY_SPLIT_COUNT, KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS_COUNT,
};
use crate::format::hf_names::{self, HfConfig};
use crate::format::output::{Destination, FileFormat};
use crate::format::safetensors::{self, ExportTensor, SafetensorsModel, SafetensorsOptions};
use crate::format::source::ModelSource;
use crate::format::stream::{write_behind, Parts};
use crate::format::{nbytes, FormatError, GgmlType};
use crate::quant::{codec, QuantError, FTYPES};

/// Output bytes converted per slab when writing GGUF (the writer thread queues a few).
const SLAB_BYTES: usize = 4 << 20;

/// Options of [`convert_model`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Type of tensors with 2 or more dimensions (1-D tensors are always F32).
    /// safetensors output: F32, F16 or BF16; `None` means F16.
    /// GGUF output: `None` keeps each tensor's stored type; otherwise any type ggml produces
    /// without an importance matrix (`Q8_0`, `Q4_K`, …; rows must fit its block size).
    pub out_type: Option<GgmlType>,
    /// GGUF output: the GGUF model whose metadata (hyperparameters, tokenizer, chat template) the
    /// output gets. Required for safetensors → GGUF.
    pub metadata_from: Option<PathBuf>,
    /// safetensors output: largest shard in bytes; `None` writes one file.
    pub max_shard_bytes: Option<u64>,
    /// safetensors input: the architecture (GGUF spelling) when there is no `config.json`.
    /// Without either, the base's architecture and head counts are used.
    pub arch: Option<String>,
    /// safetensors output: write `config.json` next to the weights.
    pub write_config: bool,
    /// Replace existing files beside the named output (`config.json`, shards, the files in an
    /// output directory); without it they are an error.
    pub force: bool,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            out_type: None,
            metadata_from: None,
            max_shard_bytes: None,
            arch: None,
            write_config: true,
            force: false,
            threads: None,
        }
    }
}

/// Which way a conversion went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ConvertDirection {
    /// GGUF in, safetensors out.
    GgufToSafetensors,
    /// safetensors in, GGUF out.
    SafetensorsToGguf,
}

/// Summary of a [`convert_model`] run.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    /// Which way.
    pub direction: ConvertDirection,
    /// Tensors written.
    pub tensors: usize,
    /// Input tensors left out because they have no name in the output format
    /// (`rope_freqs.weight`; HF `rotary_emb.inv_freq`, Gemma 3 vision tower).
    pub skipped: Vec<String>,
    /// Embedding tensors whose extra rows (beyond the base's vocabulary) were dropped, as
    /// llama.cpp does for Gemma 3.
    pub trimmed: Vec<String>,
    /// Files written (weights, index, `config.json`).
    pub outputs: Vec<PathBuf>,
    /// Input bytes on disk.
    pub input_bytes: u64,
    /// Output bytes on disk.
    pub output_bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

use crate::format::gguf::is_gguf_file as is_gguf;

/// Converts `input` to the other format, writing `output`.
///
/// GGUF → safetensors: `output` is a `.safetensors` file, or a directory (created if needed)
/// that gets `model.safetensors` (or shards and an index); `config.json` goes next to the
/// weights. safetensors → GGUF: `output` is the GGUF file; `opts.metadata_from` must name a
/// GGUF base. Outputs are written to temporary files and renamed when complete.
///
/// ```no_run
/// use ggmerge::{convert_model, ConvertOptions, NoProgress};
/// use ggmerge::format::GgmlType;
///
/// // GGUF → HF directory (BF16 weights, config.json).
/// let opts = ConvertOptions { out_type: Some(GgmlType::BF16), ..Default::default() };
/// convert_model("model.gguf".as_ref(), "model-hf".as_ref(), &opts, &NoProgress)?;
/// // ... and back, with the tokenizer and metadata of the original.
/// let opts = ConvertOptions { metadata_from: Some("model.gguf".into()), ..Default::default() };
/// convert_model("model-hf".as_ref(), "roundtrip.gguf".as_ref(), &opts, &NoProgress)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert_model(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport> {
    crate::format::output::refuse_inputs(output, &[input])?;
    let from_gguf = is_gguf(input);
    let (format, wanted) = if from_gguf {
        (
            FileFormat::Safetensors,
            "a .safetensors file or a directory",
        )
    } else {
        (FileFormat::Gguf, "a .gguf file")
    };
    // The output's format is implied by the input's: the path must not say otherwise. A
    // safetensors output without the extension is a directory (HF layout).
    let says = Destination::resolve(output, None).ok().map(|d| d.format);
    if says.is_some_and(|f| f != format) {
        return Err(FormatError::Write {
            path: output.to_path_buf(),
            reason: format!(
                "converting {} writes {}: name {wanted}",
                if from_gguf {
                    "a GGUF model"
                } else {
                    "a safetensors model"
                },
                format.name()
            ),
        }
        .into());
    }
    let dest = Destination::resolve(output, Some(format))?;
    dest.check(opts.force)?;
    if from_gguf {
        gguf_to_safetensors(input, &dest, opts, progress)
    } else {
        safetensors_to_gguf(input, &dest, opts, progress)
    }
}

fn gguf_to_safetensors(
    input: &Path,
    dest: &Destination,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport> {
    let started = Instant::now();
    let model = GgufModel::open(input)?;
    let arch = model
        .metadata()
        .architecture()
        .unwrap_or("(none)")
        .to_string();
    let mut config =
        HfConfig::from_gguf_metadata(model.metadata()).ok_or_else(|| Error::NoHfNames {
            path: input.to_path_buf(),
            arch: arch.clone(),
            supported: hf_names::SUPPORTED_ARCHS.join(", "),
        })?;
    let out_ty = opts.out_type.unwrap_or(GgmlType::F16);
    if ![GgmlType::F32, GgmlType::F16, GgmlType::BF16].contains(&out_ty) {
        return Err(Error::SafetensorsType {
            ty: out_ty.to_string(),
        });
    }
    config.tie_word_embeddings = Some(model.tensor_by_name("output.weight").is_none());
    if let Some(t) = model.tensor_by_name("token_embd.weight") {
        config.vocab_size = t.info.shape.get(1).copied().or(config.vocab_size);
    }

    let mut export = Vec::new();
    let mut source = Vec::new();
    let mut skipped = Vec::new();
    let mut total = 0u64;
    for (i, t) in model.tensors().enumerate() {
        let info = t.info;
        if hf_names::gguf_to_hf(&config.arch, &info.name).is_none() {
            skipped.push(info.name.clone());
            continue;
        }
        codec::check_dequantize(info.ty, &info.name).map_err(|source| Error::Tensor {
            path: input.to_path_buf(),
            source,
        })?;
        let ty = if info.shape.len() == 1 {
            GgmlType::F32
        } else {
            out_ty
        };
        total += nbytes(&info.shape, ty).map_err(|e| Error::BadTensor {
            path: input.to_path_buf(),
            tensor: info.name.clone(),
            reason: format!("{ty}: {e}"),
        })?;
        export.push(ExportTensor {
            name: info.name.clone(),
            shape: info.shape.clone(),
            ty,
        });
        source.push(i);
    }

    let created_dir = dest.prepare(opts.force)?;
    let inputs: Vec<&Path> = model.shards().iter().map(|s| s.path()).collect();
    let st_opts = SafetensorsOptions {
        max_shard_bytes: opts.max_shard_bytes,
        path_is_named: !dest.is_dir,
        overwrite: opts.force,
        ..SafetensorsOptions::default()
    };
    progress.start(total);
    let n = export.len();
    let result = with_threads(opts.threads, || -> Result<_> {
        safetensors::write_safetensors(
            &dest.file,
            &config,
            &export,
            &st_opts,
            &inputs,
            |i, first, buf: &mut [f32]| -> Result<()> {
                let t = model.tensor(source[i]);
                if first == 0 {
                    progress.tensor(&t.info.name, i, n);
                }
                let (bs, ts) = (t.info.ty.block_size(), t.info.ty.type_size());
                let a = (first / bs * ts) as usize;
                let b = a + (buf.len() as u64 / bs * ts) as usize;
                let bytes = t.data.get(a..b).ok_or_else(|| Error::BadTensor {
                    path: input.to_path_buf(),
                    tensor: t.info.name.clone(),
                    reason: format!("slab {a}..{b} is outside its data"),
                })?;
                codec::dequantize(t.info.ty, bytes, buf, &t.info.name).map_err(|source| {
                    Error::Tensor {
                        path: input.to_path_buf(),
                        source,
                    }
                })?;
                // Read once: the slab's pages leave the resident set.
                model.release_bytes(bytes);
                let elem = if export[i].ty == GgmlType::F32 { 4 } else { 2 };
                progress.advance(buf.len() as u64 * elem);
                Ok(())
            },
        )
    });
    progress.finish();
    let written = result?;
    let mut outputs = written.files.clone();
    outputs.extend(written.index.clone());
    let mut output_bytes = written.bytes;
    if opts.write_config {
        let p = safetensors::write_config_json(&dest.dir, &config, &inputs, opts.force)?;
        output_bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        outputs.push(p);
    }
    created_dir.keep();
    Ok(ConvertReport {
        direction: ConvertDirection::GgufToSafetensors,
        tensors: n,
        skipped,
        trimmed: Vec::new(),
        outputs,
        input_bytes: model.file_size(),
        output_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The output metadata: the base's, split keys removed, `general.file_type` set to the
/// dominant type of the weight matrices (removed when that is no llama.cpp file type).
fn output_metadata(base: &Metadata, specs: &[TensorSpec]) -> Metadata {
    let mut md = base.clone();
    for k in [KEY_SPLIT_NO, KEY_SPLIT_COUNT, KEY_SPLIT_TENSORS_COUNT] {
        md.remove(k);
    }
    let mut counts: Vec<(GgmlType, u64)> = Vec::new();
    for s in specs.iter().filter(|s| s.shape.len() > 1) {
        let n: u64 = s.shape.iter().product();
        match counts.iter_mut().find(|(t, _)| *t == s.ty) {
            Some(c) => c.1 += n,
            None => counts.push((s.ty, n)),
        }
    }
    let dominant = counts.iter().max_by_key(|(_, n)| *n).map(|(t, _)| *t);
    match dominant.and_then(|t| FTYPES.iter().find(|f| f.name == t.name())) {
        Some(f) => md.set("general.file_type", Value::U32(f.id)),
        None => {
            md.remove("general.file_type");
        }
    }
    md
}

/// Writes tensor `spec` of `model` (its first rows, for a trimmed embedding) to `parts`:
/// mapped bytes as they are when the type stays (released once written), else converted slab
/// by slab into buffers of the writer's pool, each slab's input released once converted.
fn write_tensor<'m>(
    model: &'m SafetensorsModel,
    spec: &TensorSpec,
    parts: &Parts<'m>,
    progress: &dyn Progress,
) -> Result<()> {
    let path = model.path();
    let bad = |reason: String| Error::BadTensor {
        path: path.to_path_buf(),
        tensor: spec.name.clone(),
        reason,
    };
    let tensor_err = |source: QuantError| Error::Tensor {
        path: path.to_path_buf(),
        source,
    };
    let t = model
        .tensor(&spec.name)?
        .ok_or_else(|| bad("disappeared from the model".into()))?;
    let ne0 = spec.shape[0];
    let src_row = codec::row_size(t.ty, ne0, &spec.name).map_err(tensor_err)?;
    let n_rows: u64 = spec.shape[1..].iter().product();
    let len = src_row * n_rows as usize;
    // Trimmed embeddings: the first rows.
    let data: Cow<'m, [u8]> = match t.data {
        Cow::Borrowed(b) => Cow::Borrowed(b.get(..len).ok_or_else(|| bad("too short".into()))?),
        Cow::Owned(mut v) => {
            v.truncate(len);
            Cow::Owned(v)
        }
    };
    // Transformed tensors were copied out of the map, whole: their raw pages go at once.
    if let Cow::Owned(_) = data {
        model.release(&spec.name, 0..usize::MAX);
    }
    if spec.ty == t.ty {
        match data {
            Cow::Borrowed(mapped) => {
                for part in mapped.chunks(SLAB_BYTES) {
                    parts.send_mapped(part)?;
                    progress.advance(part.len() as u64);
                }
            }
            Cow::Owned(bytes) => {
                for part in bytes.chunks(SLAB_BYTES) {
                    let mut buf = parts.buffer(part.len());
                    buf.copy_from_slice(part);
                    parts.send(buf)?;
                    progress.advance(part.len() as u64);
                }
            }
        }
        return Ok(());
    }
    let dst_row = codec::row_size(spec.ty, ne0, &spec.name).map_err(tensor_err)?;
    let rows = (SLAB_BYTES / dst_row.max(src_row).max(1)).max(1);
    for slab in data.chunks(rows * src_row.max(1)) {
        let mut out = parts.buffer(slab.len() / src_row.max(1) * dst_row);
        codec::convert(t.ty, slab, spec.ty, &mut out, ne0, &spec.name).map_err(tensor_err)?;
        if let Cow::Borrowed(_) = data {
            model.release_bytes(slab);
        }
        let len = out.len();
        parts.send(out)?;
        progress.advance(len as u64);
    }
    Ok(())
}

fn safetensors_to_gguf(
    input: &Path,
    dest: &Destination,
    opts: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertReport> {
    let started = Instant::now();
    let base_path = opts
        .metadata_from
        .as_deref()
        .ok_or_else(|| Error::NeedsMetadataFrom {
            path: input.to_path_buf(),
        })?;
    let base = GgufModel::open(base_path)?;
    let base_arch = base
        .metadata()
        .architecture()
        .unwrap_or("(none)")
        .to_string();
    let model = match (&opts.arch, HfConfig::from_gguf_metadata(base.metadata())) {
        (Some(a), _) => SafetensorsModel::open_with_arch(input, a)?,
        (None, Some(fallback)) => SafetensorsModel::open_or_config(input, fallback)?,
        (None, None) => SafetensorsModel::open(input)?,
    };
    let arch = model.config().arch.clone();
    if HfConfig::for_arch(&base_arch).map(|c| c.arch) != Some(arch.clone()) {
        return Err(Error::ArchitectureMismatch {
            path: input.to_path_buf(),
            arch,
            base: base_path.to_path_buf(),
            base_arch,
        });
    }

    // Base order first, then tensors the base does not have.
    let mut names: Vec<String> = base
        .tensors()
        .map(|t| t.info.name.clone())
        .filter(|n| model.tensor_info(n).is_some())
        .collect();
    let extra: Vec<String> = model
        .tensor_names()
        .into_iter()
        .filter(|n| base.tensor_by_name(n).is_none())
        .collect();
    names.extend(extra);

    let bad = |name: &str, reason: String| Error::BadTensor {
        path: input.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let tensor_err = |source: QuantError| Error::Tensor {
        path: input.to_path_buf(),
        source,
    };
    let mut specs = Vec::with_capacity(names.len());
    let mut trimmed = Vec::new();
    let mut total = 0u64;
    for name in &names {
        let Some((mut shape, src_ty)) = model.tensor_info(name) else {
            continue;
        };
        if let Some(b) = base.tensor_by_name(name) {
            let bs = &b.info.shape;
            let is_embedding = matches!(name.as_str(), "token_embd.weight" | "output.weight");
            if *bs != shape {
                if is_embedding
                    && bs.len() == 2
                    && shape.len() == 2
                    && bs[0] == shape[0]
                    && bs[1] < shape[1]
                {
                    shape[1] = bs[1];
                    trimmed.push(name.clone());
                } else {
                    return Err(bad(
                        name,
                        format!("shape {shape:?} differs from the base's {bs:?}"),
                    ));
                }
            }
        }
        let ty = match opts.out_type {
            _ if shape.len() == 1 => GgmlType::F32,
            None => src_ty,
            Some(t) => t,
        };
        if ty != src_ty {
            codec::check_quantize(ty, shape[0], name).map_err(tensor_err)?;
        }
        total += nbytes(&shape, ty).map_err(|e| bad(name, format!("{ty}: {e}")))?;
        specs.push(TensorSpec {
            name: name.clone(),
            shape,
            ty,
        });
    }

    let md = output_metadata(base.metadata(), &specs);
    let mut inputs: Vec<&Path> = model.files();
    inputs.extend(base.shards().iter().map(|s| s.path()));
    let version = base.shards()[0].header().version.max(2);
    let mut writer = GgufWriter::create(&dest.file, version, &md, &specs, &inputs)?;

    progress.start(total);
    let n = specs.len();
    let release = |part: &[u8]| model.release_bytes(part);
    let result = with_threads(opts.threads, || -> Result<()> {
        write_behind(&mut writer, &release, |parts| -> Result<()> {
            for (i, spec) in specs.iter().enumerate() {
                progress.tensor(&spec.name, i, n);
                write_tensor(&model, spec, parts, progress)?;
                parts.end_tensor()?;
            }
            Ok(())
        })
    });
    progress.finish();
    result?;
    let output_bytes = writer.finish()?;
    Ok(ConvertReport {
        direction: ConvertDirection::SafetensorsToGguf,
        tensors: n,
        skipped: model.skipped().to_vec(),
        trimmed,
        outputs: vec![dest.file.clone()],
        input_bytes: model.file_size(),
        output_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
