//! Experts at run time: a base loaded by llama.cpp's own loader, with weighted delta packs
//! applied to its weight tensors in memory — no merged file — and switchable while running.
//!
//! A mixture is planned and computed by the merge layer ([`crate::merge::plan`],
//! [`crate::merge::run::for_each_changed_tensor`]: the same code as `ggmerge apply`, so the
//! weights are byte-identical to the offline merge) over the packs and base this session keeps
//! open, then written tensor by tensor into the loaded model ([`Session::set_weight`]). Switching mixtures rewrites the tensors either mixture changes
//! (restoring the base's bytes where the new one changes nothing). Recent mixtures' tensor bytes
//! are cached within a memory budget, so switching back is a copy, not a recomputation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::delta::pack::{fingerprint, DeltaPack};
use crate::format::gguf::GgufModel;
use crate::format::output::FileFormat;
use crate::format::source::ModelSource;
use crate::merge::config::{number_fits_f32, ConfigSource, MergeConfig, ModelEntry, ParamValue};
use crate::merge::input::{Inputs, MergeInput};
use crate::merge::method::Method;
use crate::merge::plan::{plan, PlanOptions};
use crate::merge::run::for_each_changed_tensor;
use crate::quant::Requant;
use crate::runtime::error::{Result, RuntimeError};
use crate::runtime::{Model, Session, SessionOptions};
use crate::threads::with_threads;

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
    base: Arc<GgufModel>,
    /// The base's fingerprint (packs added later are checked against it).
    base_fingerprint: Option<String>,
    experts: Vec<Expert>,
    /// The experts' packs, open for the session, with their kept indices cached.
    packs: Vec<Arc<DeltaPack>>,
    /// Bytes of those cached indices.
    index_bytes: u64,
    weights: Vec<f64>,
    /// How the current mixture combines the deltas.
    current_method: Method,
    /// The default combination of [`ExpertSession::set_mixture`].
    method: Method,
    threads: Option<usize>,
    /// How mixtures requantize the tensors they change.
    requant: Requant,
    /// Tensors currently different from the base.
    applied: HashSet<String>,
    /// Recent mixtures, most recent last: (key, bytes, size).
    cache: Vec<(String, TensorBytes, u64)>,
    cache_budget: u64,
    warnings: Vec<String>,
    /// Mixture switches that computed tensors, and those served from the cache.
    computed: u64,
    cache_hits: u64,
}

/// What identifies a pack's content: its checksum, or (older packs) its path and fingerprint.
fn pack_id(pack: &DeltaPack) -> String {
    match &pack.checksum {
        Some(c) => c.clone(),
        None => format!("{}@{}", pack.path().display(), pack.fingerprint),
    }
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
        if !method.combines_packs() {
            return Err(RuntimeError::Method {
                method: method.name(),
            });
        }
        let base = Arc::new(GgufModel::open(base_path)?);
        let mut s = ExpertSession {
            session: model.session(session)?,
            base_path: base_path.to_path_buf(),
            base,
            base_fingerprint: None,
            experts: Vec::new(),
            packs: Vec::new(),
            index_bytes: 0,
            weights: Vec::new(),
            current_method: method,
            method,
            threads,
            requant: session.requant,
            applied: HashSet::new(),
            cache: Vec::new(),
            cache_budget,
            warnings: Vec::new(),
            computed: 0,
            cache_hits: 0,
        };
        for e in experts {
            s.open_expert(e)?;
        }
        s.set_mixture(weights)?;
        Ok(s)
    }

    /// Opens an expert's pack: checked against the base, checked for an absurd scale, and its
    /// mask generated once — every mixture then scatters kept values at cached indices (4
    /// bytes per kept value) instead of regenerating masks. The expert gets weight 0.
    fn open_expert(&mut self, expert: Expert) -> Result<()> {
        if let Some(other) = self.experts.iter().find(|o| o.name == expert.name) {
            return Err(RuntimeError::DuplicateExpert {
                name: other.name.clone(),
            });
        }
        if self.base_fingerprint.is_none() {
            self.base_fingerprint = Some(fingerprint(self.base.as_ref())?);
        }
        let fp = self.base_fingerprint.as_deref().unwrap_or("");
        let mut pack = DeltaPack::open(&expert.path)?;
        pack.check_base(self.base.as_ref(), fp)?;
        self.warnings
            .extend(pack.scale_warnings(self.base.as_ref())?);
        let base = self.base.clone();
        self.index_bytes += with_threads(self.threads, || pack.cache_kept_indices(base.as_ref()))?;
        self.packs.push(Arc::new(pack));
        self.experts.push(expert);
        if self.weights.len() < self.experts.len() {
            self.weights.push(0.0);
        }
        Ok(())
    }

    /// Adds an expert with weight 0 (the current mixture is unchanged). Its pack is checked
    /// against the base like those the session opened with.
    pub fn add_expert(&mut self, expert: Expert) -> Result<()> {
        self.open_expert(expert)
    }

    /// Removes expert `name`; if the current mixture uses it, the session first switches to
    /// the mixture without it. Cached mixtures that used it are dropped.
    pub fn remove_expert(&mut self, name: &str) -> Result<Option<SwitchReport>> {
        let i = self.expert_index(name)?;
        let mut switched = None;
        if self.weights[i] != 0.0 {
            let mut w = self.weights.clone();
            w[i] = 0.0;
            switched = Some(self.set_mixture_with(&w, self.current_method)?);
        }
        let id = pack_id(&self.packs[i]);
        self.cache.retain(|c| !c.0.contains(&id));
        self.index_bytes = self
            .index_bytes
            .saturating_sub(self.packs[i].kept_index_bytes());
        self.experts.remove(i);
        self.packs.remove(i);
        self.weights.remove(i);
        Ok(switched)
    }

    fn expert_index(&self, name: &str) -> Result<usize> {
        self.experts
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| RuntimeError::UnknownExpert {
                name: name.into(),
                known: self
                    .experts
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A key for mixture `weights` combined with `method` that depends only on content: the
    /// method and, per expert with a non-zero weight, its pack's checksum and the weight. Two
    /// sessions (or one, before and after reloading a pack) give the same key for the same
    /// weights only if the packs are the same bytes.
    pub fn mixture_key(&self, weights: &[f64], method: Method) -> String {
        let mut parts: Vec<String> = self
            .packs
            .iter()
            .zip(weights)
            .filter(|(_, &w)| w != 0.0)
            .map(|(p, w)| format!("{}={:016x}", pack_id(p), w.to_bits()))
            .collect();
        parts.sort();
        if parts.is_empty() {
            return "base".into();
        }
        format!("{}:{}", method.name(), parts.join(","))
    }

    /// The key of the current mixture ([`ExpertSession::mixture_key`]).
    pub fn current_key(&self) -> String {
        self.mixture_key(&self.weights, self.current_method)
    }

    /// How the current mixture combines the deltas.
    pub fn current_method(&self) -> Method {
        self.current_method
    }

    /// Switches that computed their tensors, and switches served from the cache.
    pub fn switch_counts(&self) -> (u64, u64) {
        (self.computed, self.cache_hits)
    }

    /// The llama.cpp session (generate, perplexity, logits).
    pub fn session(&mut self) -> &mut Session<'m> {
        &mut self.session
    }

    /// The llama.cpp session, read-only (its context size …).
    pub fn session_ref(&self) -> &Session<'m> {
        &self.session
    }

    /// The experts' packs, in the experts' order.
    pub fn packs(&self) -> &[Arc<DeltaPack>] {
        &self.packs
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

    /// How mixtures requantize the tensors they change ([`SessionOptions::requant`]).
    pub fn requant(&self) -> Requant {
        self.requant
    }

    /// Bytes held for the packs' cached kept indices (4 per kept value of a DARE pack).
    pub fn index_bytes(&self) -> u64 {
        self.index_bytes
    }

    /// Computes a mixture's changed tensors with the merge engine (the bytes `apply` writes),
    /// over the base and packs this session keeps open (their kept indices cached, checked
    /// against the base once when the session opened them).
    fn compute(&self, weights: &[f64], method: Method) -> Result<TensorBytes> {
        let mut config = MergeConfig::new(method, ConfigSource::Cli);
        config.base_model = Some(self.base_path.display().to_string());
        let mut models = Vec::new();
        for ((e, &w), pack) in self.experts.iter().zip(weights).zip(&self.packs) {
            if w != 0.0 {
                let mut entry = ModelEntry::new(e.path.display().to_string());
                entry.parameters.set("weight", ParamValue::Number(w));
                config.models.push(entry);
                models.push(MergeInput::Sparse(pack.clone()));
            }
        }
        if config.models.is_empty() {
            return Ok(Arc::new(Vec::new()));
        }
        let reference: Arc<dyn ModelSource> = self.base.clone();
        let inputs = Inputs {
            reference,
            models,
            warnings: Vec::new(),
        };
        let opts = PlanOptions {
            format: FileFormat::Gguf,
            out_type: None,
            seed: None,
            threads: self.threads,
            requant: Some(self.requant),
        };
        let plan = plan(&config, inputs, &opts)?;
        let mut out = Vec::new();
        for_each_changed_tensor(&plan, self.threads, &mut |t, bytes| {
            out.push((t.name.clone(), bytes));
            Ok::<(), RuntimeError>(())
        })?;
        Ok(Arc::new(out))
    }

    /// Switches to the mixture `weights` (one per expert), combined with the session's
    /// method: rewrites every tensor the new or the previous mixture changes and clears the KV
    /// cache.
    pub fn set_mixture(&mut self, weights: &[f64]) -> Result<SwitchReport> {
        self.set_mixture_with(weights, self.method)
    }

    /// [`ExpertSession::set_mixture`] with the deltas combined by `method` (one of
    /// [`Method::COMBINING_PACKS`]). Switching to the current mixture does nothing.
    pub fn set_mixture_with(&mut self, weights: &[f64], method: Method) -> Result<SwitchReport> {
        let started = Instant::now();
        if !method.combines_packs() {
            return Err(RuntimeError::Method {
                method: method.name(),
            });
        }
        if weights.len() != self.experts.len() {
            return Err(RuntimeError::WeightCount {
                given: weights.len(),
                experts: self.experts.len(),
            });
        }
        if let Some((e, w)) = self
            .experts
            .iter()
            .zip(weights)
            .find(|(_, &w)| !number_fits_f32(w))
        {
            return Err(RuntimeError::ExpertWeight {
                expert: e.name.clone(),
                value: format!("{w:?}"),
            });
        }
        let key = self.mixture_key(weights, method);
        if !self.weights.is_empty() && key == self.current_key() && self.weights == weights {
            return Ok(SwitchReport {
                tensors: 0,
                cached: true,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let (tensors, cached) = match self.cache.iter().position(|c| c.0 == key) {
            Some(i) => {
                let entry = self.cache.remove(i);
                let t = entry.1.clone();
                self.cache.push(entry);
                self.cache_hits += 1;
                (t, true)
            }
            None => {
                let t = self.compute(weights, method)?;
                self.computed += 1;
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
            let t = self
                .base
                .tensor_by_name(name)
                .ok_or_else(|| RuntimeError::UnknownTensor { name: name.clone() })?;
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
        self.current_method = method;
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
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| RuntimeError::MixtureSyntax { part: part.into() })?;
            let i = self.expert_index(name)?;
            let v: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| number_fits_f32(*v))
                .ok_or_else(|| RuntimeError::ExpertWeight {
                    expert: name.into(),
                    value: value.into(),
                })?;
            if !seen.insert(i) {
                return Err(RuntimeError::DuplicateExpert { name: name.into() });
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
