//! A merge's inputs as the planner sees them: the reference model (the base, or for `linear`
//! the first model) and, per model, either its full weights ([`ModelSource`], GGUF or
//! safetensors) or a sparse delta already sparsified and rescaled ([`SparseSource`]: a delta
//! pack, implemented in the delta layer above this one).
//!
//! Opening them is the caller's job — `crate::delta::open_inputs` for files named in a config,
//! or the runtime, which keeps its base and packs open across mixtures — because telling a
//! delta pack from a model needs the layer above this one. Everything is shared (`Arc`), so a
//! session can plan mixture after mixture over the same open files.

use std::path::Path;
use std::sync::Arc;

use crate::format::source::ModelSource;
use crate::merge::engine::SparseDelta;

/// A sparse delta against the base: the kept values of each changed tensor and where they go.
pub trait SparseSource: Send + Sync {
    /// The file it was read from.
    fn path(&self) -> &Path;
    /// The architecture of the base it was made against.
    fn architecture(&self) -> Option<&str>;
    /// The base tensors it changes, with their kept value counts, in its order.
    fn changed_tensors(&self) -> &[(String, u64)];
    /// The engine's view of its delta for base tensor `name`, if it changes it.
    fn sparse(&self, name: &str) -> Option<SparseDelta<'_>>;
    /// Hints that tensor `name`'s stored delta will not be read again soon (see
    /// [`ModelSource::release`]).
    fn release(&self, name: &str) {
        let _ = name;
    }
}

/// One model of a merge.
#[derive(Clone)]
pub enum MergeInput {
    /// A fine-tuned model; its delta is computed against the base.
    Model(Arc<dyn ModelSource>),
    /// A sparse delta extracted against this base (a delta pack).
    Sparse(Arc<dyn SparseSource>),
}

impl MergeInput {
    /// The input's path.
    pub fn path(&self) -> &Path {
        match self {
            MergeInput::Model(m) => m.path(),
            MergeInput::Sparse(p) => p.path(),
        }
    }

    /// Its architecture, if known.
    pub fn architecture(&self) -> Option<&str> {
        match self {
            MergeInput::Model(m) => m.architecture(),
            MergeInput::Sparse(p) => p.architecture(),
        }
    }

    /// The files it is read from.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            MergeInput::Model(m) => m.files(),
            MergeInput::Sparse(p) => vec![p.path()],
        }
    }

    /// Hints that tensor `name` will not be read again soon.
    pub fn release(&self, name: &str) {
        match self {
            MergeInput::Model(m) => m.release(name, 0..usize::MAX),
            MergeInput::Sparse(p) => p.release(name),
        }
    }
}

/// A merge's inputs, open.
#[derive(Clone)]
pub struct Inputs {
    /// The base (for `linear`, the first model): shapes, types and metadata come from it.
    pub reference: Arc<dyn ModelSource>,
    /// The models, in config order (an input's index is its mask stream).
    pub models: Vec<MergeInput>,
    /// What opening them found worth telling (delta packs of absurd scale).
    pub warnings: Vec<String>,
}

impl Inputs {
    /// Every file read: the reference's and each model's.
    pub fn files(&self) -> Vec<&Path> {
        let mut v = self.reference.files();
        for m in &self.models {
            v.extend(m.files());
        }
        v
    }
}
