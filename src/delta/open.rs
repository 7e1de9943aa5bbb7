//! Opening a merge's inputs from a config: the base, then each model as a model (GGUF or
//! safetensors) or — when its file is a delta pack — as a sparse input, checked against the
//! base (fingerprint, index range) and for an absurd scale. This is the delta layer's part of
//! planning a merge: telling a pack from a model needs this layer; the plan itself is
//! [`crate::merge::plan`].

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::delta::error::Result;
use crate::delta::pack::{fingerprint, DeltaPack};
use crate::format::gguf::{is_gguf_file, GgufModel};
use crate::format::hf_names::HfConfig;
use crate::format::source::{self, ModelSource};
use crate::merge::config::MergeConfig;
use crate::merge::input::{Inputs, MergeInput};
use crate::merge::plan::reference_path;

/// Opens the inputs of `config`. Packs found in `open` (matched by path) are used as they are:
/// the runtime keeps its packs open, with their kept indices cached, and has checked them
/// against the base already. Other packs are opened and checked here.
///
/// Each input is parsed once, all of them concurrently: a GGUF header with a 50k-token
/// vocabulary takes milliseconds to read, serial time before any tensor is merged. GGUF models
/// open alongside the base; safetensors ones need the base's architecture (their tensor names
/// are mapped with it), so they open after it.
pub fn open_inputs(config: &MergeConfig, open: &[Arc<DeltaPack>]) -> Result<Inputs> {
    config.validate().map_err(crate::merge::MergeError::from)?;
    let base_path = reference_path(config)?;
    let (reference, gguf_models) = rayon::join(
        || source::open(&base_path, None),
        || {
            config
                .models
                .par_iter()
                .map(|m| -> Option<Result<Opened>> {
                    let path = Path::new(&m.model);
                    if let Some(p) = open.iter().find(|p| p.path() == path) {
                        return Some(Ok(Opened::Pack(p.clone(), true)));
                    }
                    is_gguf_file(path).then(|| {
                        let file = GgufModel::open(path)?;
                        Ok(if DeltaPack::is_pack_file(&file) {
                            Opened::Pack(Arc::new(DeltaPack::from_file(path, file)?), false)
                        } else {
                            Opened::Model(Arc::new(file))
                        })
                    })
                })
                .collect::<Vec<Option<Result<Opened>>>>()
        },
    );
    let reference: Arc<dyn ModelSource> = Arc::from(reference?);
    let fallback = reference.metadata().and_then(HfConfig::from_gguf_metadata);
    let opened: Vec<Result<Opened>> = gguf_models
        .into_par_iter()
        .zip(&config.models)
        .map(|(opened, m)| {
            opened.unwrap_or_else(|| {
                let model = source::open(Path::new(&m.model), fallback.as_ref())?;
                Ok(Opened::Model(Arc::from(model)))
            })
        })
        .collect();
    let mut base_fingerprint: Option<String> = None;
    let mut warnings = Vec::new();
    let mut models = Vec::with_capacity(opened.len());
    for input in opened {
        models.push(match input? {
            Opened::Model(m) => MergeInput::Model(m),
            Opened::Pack(pack, checked) => {
                if !checked {
                    if base_fingerprint.is_none() {
                        base_fingerprint = Some(fingerprint(reference.as_ref())?);
                    }
                    let fp = base_fingerprint.as_deref().unwrap_or("");
                    pack.check_base(reference.as_ref(), fp)?;
                    warnings.extend(pack.scale_warnings(reference.as_ref())?);
                }
                MergeInput::Sparse(pack)
            }
        });
    }
    Ok(Inputs {
        reference,
        models,
        warnings,
    })
}

/// An input as opened: a model, or a pack and whether it was checked against the base.
enum Opened {
    Model(Arc<dyn ModelSource>),
    Pack(Arc<DeltaPack>, bool),
}
