//! `finetune`: a GGUF base and a training text → a fully fine-tuned GGUF model, homologous to
//! the base (same metadata, tensor names, order, shapes and types; only the weights differ), so
//! `extract`, `merge` and `run` take it as an expert of that base. `ggmerge finetune` is the CLI
//! over it.
//!
//! [`finetune`]: every cheap check first (options, every base tensor F32, the text readable as
//! UTF-8, the output path writable and not an input), then the base is loaded by llama.cpp and
//! trained in place ([`crate::runtime::train`]: AdamW, next-token cross-entropy, progress as
//! [`TrainEvent`]s), saved by llama.cpp to a temporary file beside the output, and that file's
//! tensors rewrapped in the base's GGUF layout: llama.cpp's writer drops the metadata it does
//! not model (chat template, `general.*`) and records the training context as
//! `context_length`, so its own file is not homologous. The output is written through
//! [`GgufWriter`] (a temporary file renamed when complete); both temporary files are removed on
//! error or interrupt.

use std::path::Path;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::format::gguf::{GgufModel, GgufWriter, TensorSpec};
use crate::format::output::{check_output_path, refuse_inputs, TempFile};
use crate::format::GgmlType;
use crate::runtime::train::{self, TrainError, TrainEvent, TrainOptions, TrainReport};
use crate::runtime::{Model, ModelOptions};

/// What [`finetune`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneReport {
    /// The training run: plan, loss and accuracy per epoch.
    pub train: TrainReport,
    /// Tensors of the base (and of the output).
    pub tensors: usize,
    /// Tensors whose bytes training changed (all but `token_embd.weight`, which llama.cpp keeps
    /// frozen, normally).
    pub changed: usize,
    /// Size of the output file.
    pub bytes: u64,
    /// Wall time of the whole flow (loading, training, saving), seconds.
    pub secs: f64,
}

/// Fine-tunes the GGUF model `base` (every tensor F32) on the text file `data` and writes the
/// result to `output` with the base's metadata and tensor order. `on_event` receives the
/// training's progress ([`train::train`]). Nothing is loaded before the arguments are checked;
/// nothing but `output` is left behind.
pub fn finetune(
    base: &Path,
    data: &Path,
    output: &Path,
    opts: &TrainOptions,
    on_event: &mut dyn FnMut(TrainEvent<'_>),
) -> Result<FinetuneReport> {
    let started = Instant::now();
    opts.validate()?;
    let base_file = GgufModel::open(base)?;
    train::check_trainable(base, base_file.metadata().architecture())?;
    check_f32(&base_file)?;
    refuse_inputs(output, &[base, data])?;
    check_output_path(output)?;
    let bytes = std::fs::read(data).map_err(|source| crate::format::FormatError::Io {
        path: data.to_path_buf(),
        what: "cannot read the training text",
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::TrainingText {
        path: data.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    // llama.cpp's save goes here; created now, so an unwritable directory fails before training.
    let (saved, file) = TempFile::create(output, "llamasave")?;
    drop(file);

    let mut model = Model::load(
        base,
        &ModelOptions {
            repack: false,
            ..Default::default()
        },
    )?;
    let report = train::train(&mut model, &text, opts, on_event)?;
    train::save(&model, saved.path())?;
    drop(model);
    let (changed, bytes) = rewrap(&base_file, saved.path(), output)?;
    Ok(FinetuneReport {
        train: report,
        tensors: base_file.n_tensors(),
        changed,
        bytes,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Errors unless every tensor of `base` is F32 (llama.cpp trains nothing else).
fn check_f32(base: &GgufModel) -> Result<()> {
    let mut not_f32 = base.tensors().filter(|t| t.info.ty != GgmlType::F32);
    match not_f32.next() {
        None => Ok(()),
        Some(first) => Err(crate::runtime::RuntimeError::from(TrainError::NotF32 {
            path: base.path().to_path_buf(),
            not_f32: 1 + not_f32.count(),
            total: base.n_tensors(),
            example: first.info.name.clone(),
            ty: first.info.ty.to_string(),
        })
        .into()),
    }
}

/// Writes `output`: `base`'s metadata (split keys removed) and tensor order, each tensor's data
/// from llama.cpp's save `trained` (same name, shape and type required). Returns (changed
/// tensors, bytes written).
fn rewrap(base: &GgufModel, trained: &Path, output: &Path) -> Result<(usize, u64)> {
    let new = GgufModel::open(trained)?;
    let version = base.shards()[0].header().version;
    let mut meta = base.metadata().clone();
    for k in ["split.no", "split.count", "split.tensors.count"] {
        meta.remove(k);
    }
    let specs: Vec<TensorSpec> = base.tensors().map(|t| TensorSpec::from(t.info)).collect();
    let mut w = GgufWriter::create(output, version, &meta, &specs, &[base.path(), trained])?;
    let mut changed = 0;
    for t in base.tensors() {
        let name = &t.info.name;
        let n = new.tensor_by_name(name).ok_or_else(|| Error::BadTensor {
            path: trained.to_path_buf(),
            tensor: name.clone(),
            reason: "llama.cpp's save of the trained model lacks it".into(),
        })?;
        if n.info.shape != t.info.shape || n.info.ty != t.info.ty {
            return Err(Error::BadTensor {
                path: trained.to_path_buf(),
                tensor: name.clone(),
                reason: format!(
                    "saved as {} {:?}, the base has {} {:?}",
                    n.info.ty, n.info.shape, t.info.ty, t.info.shape
                ),
            });
        }
        changed += usize::from(n.data != t.data);
        w.write_tensor(n.data)?;
    }
    Ok((changed, w.finish()?))
}
