//! Experts at run time: a base loaded by llama.cpp's own loader, with weighted delta packs
//! applied to its weight tensors in memory — no merged file — and switchable while running.
//!
//! A mixture is computed by the merge engine (the same code as `ggmerge apply`, so the weights
//! are byte-identical to the offline merge), then written tensor by tensor into the loaded model
//! ([`Session::set_weight`]). Switching mixtures rewrites the tensors either mixture changes
//! (restoring the base's bytes where the new one changes nothing). Recent mixtures' tensor bytes
//! are cached within a memory budget, so switching back is a copy, not a recomputation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::delta::pack::{fingerprint, DeltaPack};
use crate::error::{Error, Result};
use crate::flows::merge::{for_each_changed_tensor, plan_merge_with_packs, MergeOptions};
use crate::flows::progress::with_threads;
use crate::format::gguf::GgufModel;
use crate::merge::config::{
    number_fits_f32, ConfigSource, MergeConfig, Method, ModelEntry, ParamValue,
};
use crate::runtime::{Model, Session, SessionOptions};

/// One expert: a delta pack and its name (the file name without `.dpk.gguf`).
#[derive(Clone, Debug, PartialEq)]
pub struct Expert {
    /// Name used by `/experts name=weight`.
    pub name: String,
    /// The pack.
    pub path: PathBuf,
}

impl Expert {
    /// An expert named after its file (`math.dpk.gguf` → `math`).
    pub fn from_path(path: impl Into<PathBuf>) -> Expert {
        let path = path.into();
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = file
            .strip_suffix(".dpk.gguf")
            .or_else(|| file.strip_suffix(".gguf"))
            .unwrap_or(&file)
            .to_string();
        Expert { name, path }
    }
}

/// How a mixture switch went.
#[derive(Clone, Debug, PartialEq)]
pub struct SwitchReport {
    /// Tensors written.
    pub tensors: usize,
    /// Whether the mixture came from the cache.
    pub cached: bool,
    /// Wall time in seconds.
    pub seconds: f64,
}

type TensorBytes = Arc<Vec<(String, Vec<u8>)>>;

/// A llama.cpp session whose weights are the base plus a weighted mixture of experts.
pub struct ExpertSession<'m> {
    session: Session<'m>,
    base_path: PathBuf,
    base: GgufModel,
    experts: Vec<Expert>,
    /// The experts' packs, open for the session, with their kept indices cached.
    packs: Vec<Arc<DeltaPack>>,
    /// Bytes of those cached indices.
    index_bytes: u64,
    weights: Vec<f64>,
    method: Method,
    threads: Option<usize>,
    /// Tensors currently different from the base.
    applied: HashSet<String>,
    /// Recent mixtures, most recent last: (key, bytes, size).
    cache: Vec<(String, TensorBytes, u64)>,
    cache_budget: u64,
    warnings: Vec<String>,
}

fn mixture_key(weights: &[f64]) -> String {
    weights
        .iter()
        .map(|w| format!("{:016x}", w.to_bits()))
        .collect::<Vec<_>>()
        .join(",")
}

impl<'m> ExpertSession<'m> {
    /// Opens a session on `model` (loaded from `base_path` with [`Model::load`]) and applies
    /// the mixture `weights` (one per expert). `method` combines the deltas
    /// (`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`); `cache_budget` bounds the bytes
    /// of cached mixtures.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'m Model,
        base_path: &Path,
        experts: Vec<Expert>,
        weights: &[f64],
        method: Method,
        session: &SessionOptions,
        threads: Option<usize>,
        cache_budget: u64,
    ) -> Result<ExpertSession<'m>> {
        let base = GgufModel::open(base_path)?;
        // Each pack's mask is generated once, here; every mixture then scatters kept values
        // at cached indices (4 bytes per kept value) instead of regenerating masks.
        let mut packs = Vec::with_capacity(experts.len());
        let mut index_bytes = 0;
        let base_fingerprint = if experts.is_empty() {
            String::new()
        } else {
            fingerprint(&base)?
        };
        let mut warnings = Vec::new();
        for e in &experts {
            let mut pack = DeltaPack::open(&e.path)?;
            pack.check_base(&base, &base_fingerprint)?;
            warnings.extend(pack.scale_warnings(&base)?);
            index_bytes += with_threads(threads, || pack.cache_kept_indices(&base))?;
            packs.push(Arc::new(pack));
        }
        let mut s = ExpertSession {
            session: model.session(session)?,
            base_path: base_path.to_path_buf(),
            base,
            experts,
            packs,
            index_bytes,
            weights: Vec::new(),
            method,
            threads,
            applied: HashSet::new(),
            cache: Vec::new(),
            cache_budget,
            warnings,
        };
        s.set_mixture(weights)?;
        Ok(s)
    }

    /// The llama.cpp session (generate, perplexity, logits).
    pub fn session(&mut self) -> &mut Session<'m> {
        &mut self.session
    }

    /// What opening the packs found worth telling (packs of absurd scale).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The experts, in order.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// The current weights, one per expert.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Bytes held for the packs' cached kept indices (4 per kept value of a DARE pack).
    pub fn index_bytes(&self) -> u64 {
        self.index_bytes
    }

    /// Computes a mixture's changed tensors with the merge engine (the bytes `apply` writes).
    fn compute(&self, weights: &[f64]) -> Result<TensorBytes> {
        let mut config = MergeConfig::new(self.method, ConfigSource::Cli);
        config.base_model = Some(self.base_path.display().to_string());
        for (e, &w) in self.experts.iter().zip(weights) {
            if w != 0.0 {
                let mut entry = ModelEntry::new(e.path.display().to_string());
                entry.parameters.set("weight", ParamValue::Number(w));
                config.models.push(entry);
            }
        }
        if config.models.is_empty() {
            return Ok(Arc::new(Vec::new()));
        }
        let opts = MergeOptions {
            output: self.base_path.with_extension("mixture.gguf"),
            threads: self.threads,
            ..Default::default()
        };
        let plan = plan_merge_with_packs(&config, &opts, &self.packs)?;
        let mut out = Vec::new();
        for_each_changed_tensor(&plan, self.threads, &mut |t, bytes| {
            out.push((t.name.clone(), bytes));
            Ok(())
        })?;
        Ok(Arc::new(out))
    }

    /// Switches to the mixture `weights` (one per expert): rewrites every tensor the new or the
    /// previous mixture changes and clears the KV cache.
    pub fn set_mixture(&mut self, weights: &[f64]) -> Result<SwitchReport> {
        let started = Instant::now();
        if weights.len() != self.experts.len() {
            return Err(Error::Invalid(format!(
                "{} weights for {} experts",
                weights.len(),
                self.experts.len()
            )));
        }
        if let Some((e, w)) = self
            .experts
            .iter()
            .zip(weights)
            .find(|(_, &w)| !number_fits_f32(w))
        {
            return Err(Error::Invalid(format!(
                "weight {w} of expert {} is not a finite number of at most 3.4e38 in magnitude",
                e.name
            )));
        }
        let key = mixture_key(weights);
        let (tensors, cached) = match self.cache.iter().position(|c| c.0 == key) {
            Some(i) => {
                let entry = self.cache.remove(i);
                let t = entry.1.clone();
                self.cache.push(entry);
                (t, true)
            }
            None => {
                let t = self.compute(weights)?;
                let size: u64 = t.iter().map(|(_, b)| b.len() as u64).sum();
                if size <= self.cache_budget {
                    self.cache.push((key, t.clone(), size));
                    while self.cache.iter().map(|c| c.2).sum::<u64>() > self.cache_budget {
                        self.cache.remove(0);
                    }
                }
                (t, false)
            }
        };
        let new: HashSet<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        let mut written = 0;
        for name in self.applied.difference(&new) {
            let t = self.base.tensor_by_name(name).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: has no tensor {name:?}",
                    self.base_path.display()
                ))
            })?;
            self.session.write_weight(name, t.data)?;
            written += 1;
        }
        for (name, bytes) in tensors.iter() {
            self.session.write_weight(name, bytes)?;
            written += 1;
        }
        self.session.clear_memory();
        self.applied = new;
        self.weights = weights.to_vec();
        Ok(SwitchReport {
            tensors: written,
            cached,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Parses `name=weight …` (experts not named keep weight 0) into weights.
    pub fn parse_mixture(&self, spec: &str) -> Result<Vec<f64>> {
        let mut w = vec![0.0; self.experts.len()];
        let mut seen = HashSet::new();
        for part in spec.split_whitespace() {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                Error::Invalid(format!("{part:?}: write name=weight, e.g. math=1 code=0.3"))
            })?;
            let i = self
                .experts
                .iter()
                .position(|e| e.name == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = self.experts.iter().map(|e| e.name.as_str()).collect();
                    Error::Invalid(format!(
                        "unknown expert {name:?}; known: {}",
                        known.join(", ")
                    ))
                })?;
            let v: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| number_fits_f32(*v))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "weight {value:?} of {name} is not a finite number of at most 3.4e38 \
                         in magnitude"
                    ))
                })?;
            if !seen.insert(i) {
                return Err(Error::Invalid(format!(
                    "expert {name} is given twice; give each expert once"
                )));
            }
            w[i] = v;
        }
        Ok(w)
    }

    /// The current mixture as `name=weight …`.
    pub fn describe(&self) -> String {
        self.experts
            .iter()
            .zip(&self.weights)
            .map(|(e, w)| format!("{}={w}", e.name))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
