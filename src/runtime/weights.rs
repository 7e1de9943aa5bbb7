//! Weight discovery: the model's weight tensors found with llama.cpp's public API only.
//!
//! llama.cpp does not expose a model's tensors. Discovery creates a throwaway context whose
//! `cb_eval` callback (the scheduler's "do you want this node?" question) sees every graph node
//! of a one-token decode and records each source `src[i]` named `*.weight` that lives in a
//! buffer and is not a view: the model's own tensors, repacked ones included. The context is
//! freed afterwards; the tensors belong to the model. The result is a [`WeightMap`].
//!
//! A tensor no graph node reads would not be found (none in the models tested: all 272 of
//! SmolLM2 and all 236 of Gemma 3 are).
//!
//! One name can stand for several tensors: with GPU offload llama.cpp loads a tied embedding
//! (`token_embd.weight`, also the output layer) twice, once for the input layer on the CPU and
//! once for the output layer on its device. Such copies (same name, type and shape) are kept
//! together in one [`WeightTensor`], and a write goes to every copy.

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::context::{Batch, Context, ContextParams};
use super::error::{Result, RuntimeError};
use super::model::Model;
use crate::format::GgmlType;

/// One weight tensor of a loaded model: where it is (private) and what it holds.
#[derive(Debug)]
pub struct WeightTensor {
    raw: NonNull<sys::ggml_tensor>,
    name: String,
    ty: GgmlType,
    shape: Vec<u64>,
    nbytes: u64,
    buffer: String,
    /// Further tensors of the same name, type and shape, with their buffers' names.
    copies: Vec<(NonNull<sys::ggml_tensor>, String)>,
}

impl WeightTensor {
    /// The tensor's name (`blk.0.ffn_up.weight`), as in the GGUF file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its ggml type (unchanged by repacking).
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Its shape, innermost dimension first, trailing 1s dropped (as `ggml_n_dims`).
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// `ggml_nbytes`: the size of the whole tensor in its type — what
    /// [`Session::set_weight`](super::Session::set_weight) takes.
    pub fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// The name of the backend buffer holding it (`ggml_backend_buffer_name`: `CPU`,
    /// `CPU_REPACK` for weights repacked for the fast CPU kernels, a GPU's name, …).
    pub fn buffer_name(&self) -> &str {
        &self.buffer
    }

    /// The buffers of the tensor's further copies (see the module docs), usually none.
    pub fn copy_buffer_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.copies.iter().map(|(_, b)| b.as_str())
    }

    /// The tensor and its copies: every ggml tensor a write must reach.
    pub(crate) fn raws(&self) -> impl Iterator<Item = *mut sys::ggml_tensor> + '_ {
        std::iter::once(self.raw.as_ptr()).chain(self.copies.iter().map(|(r, _)| r.as_ptr()))
    }
}

/// The weight tensors of a model by name (iteration in name order). Obtained from
/// [`Model::weights`]; lives as long as the model.
#[derive(Debug, Default)]
pub struct WeightMap {
    by_name: BTreeMap<String, WeightTensor>,
}

impl WeightMap {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&WeightTensor> {
        self.by_name.get(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// All tensors, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &WeightTensor> + '_ {
        self.by_name.values()
    }

    /// Sum of [`WeightTensor::nbytes`].
    pub fn total_bytes(&self) -> u64 {
        self.iter().map(|t| t.nbytes).sum()
    }
}

/// What the callback collects.
#[derive(Default)]
struct Recorder {
    found: BTreeMap<String, WeightTensor>,
    error: Option<String>,
}

impl Recorder {
    /// Records the `*.weight` sources of one graph node.
    ///
    /// # Safety
    /// `node` points to a live graph node whose non-null `src[i]` are live tensors.
    unsafe fn visit(&mut self, node: *const sys::ggml_tensor) {
        // SAFETY: guaranteed by the caller.
        let srcs = unsafe { (*node).src };
        for src in srcs.into_iter().filter(|s| !s.is_null()) {
            // SAFETY: non-null source of a live node (caller's guarantee), not written while
            // the callback runs (the scheduler waits for our answer).
            let t = unsafe { &*src };
            // SAFETY: `name` is a NUL-terminated array inside the tensor (ggml_set_name
            // always terminates it within its 64 bytes).
            let name_bytes = unsafe { CStr::from_ptr(t.name.as_ptr()) }.to_bytes();
            if !name_bytes.ends_with(b".weight") || t.buffer.is_null() || !t.view_src.is_null() {
                continue;
            }
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            if self
                .found
                .get(&name)
                .is_some_and(|prev| prev.raws().any(|r| r == src))
            {
                continue;
            }
            let Some(ty) = GgmlType::from_id(t.type_) else {
                self.error
                    .get_or_insert(format!("tensor {name:?} has unknown ggml type {}", t.type_));
                continue;
            };
            let n_dims = t.ne.iter().rposition(|&n| n != 1).map_or(1, |i| i + 1);
            let shape: Vec<u64> = t.ne[..n_dims].iter().map(|&n| n as u64).collect();
            // SAFETY: `src` is a live tensor; ggml_nbytes only reads its type, ne and nb.
            let nbytes = unsafe { sys::ggml_nbytes(src) } as u64;
            // SAFETY: `t.buffer` is a live buffer (non-null, checked above) of the model;
            // ggml_backend_buffer_name returns a static NUL-terminated name (or null).
            let buffer = unsafe {
                let p = sys::ggml_backend_buffer_name(t.buffer);
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            // `src` is non-null (filtered above).
            let raw = NonNull::new(src).expect("non-null");
            if let Some(prev) = self.found.get_mut(&name) {
                if prev.ty == ty && prev.shape == shape && prev.nbytes == nbytes {
                    prev.copies.push((raw, buffer));
                } else {
                    self.error.get_or_insert(format!(
                        "two different tensors are named {name:?} ({} {:?} and {ty} {shape:?})",
                        prev.ty, prev.shape
                    ));
                }
                continue;
            }
            self.found.insert(
                name.clone(),
                WeightTensor {
                    raw,
                    name,
                    ty,
                    shape,
                    nbytes,
                    buffer,
                    copies: Vec::new(),
                },
            );
        }
    }
}

/// `cb_eval`: asked about every node before it is computed; answers "not needed" so the graph
/// runs unsplit, recording the node's weight sources on the way.
unsafe extern "C" fn record_weights(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    let r = catch_unwind(AssertUnwindSafe(|| {
        if ask && !t.is_null() && !user.is_null() {
            // SAFETY: `user` is the `&mut Recorder` that `discover` passed as cb_eval_user_data;
            // it outlives the context and is touched by no one else during the decode (the
            // callback runs on the decoding thread). `t` is a live node of the graph being
            // computed, and its sources are live tensors.
            unsafe { (*user.cast::<Recorder>()).visit(t) };
        }
    }));
    if r.is_err() && !user.is_null() {
        // SAFETY: as above; the panic left the recorder in a valid (if partial) state.
        let rec = unsafe { &mut *user.cast::<Recorder>() };
        rec.error
            .get_or_insert("panic in the cb_eval callback".into());
    }
    // `ask`: we never need the node's data. `!ask` (never reached): keep computing.
    !ask
}

/// Finds the weight tensors of `model` (see the module docs).
pub(crate) fn discover(model: &Model, threads: usize) -> Result<WeightMap> {
    let mut rec = Recorder::default();
    {
        let ctx_params = ContextParams {
            n_ctx: 256,
            n_batch: 1,
            threads,
            cb_eval: Some(record_weights),
            cb_eval_user_data: (&mut rec as *mut Recorder).cast(),
        };
        // `rec` outlives `ctx` (declared before it, dropped after the block).
        let mut ctx = Context::new(model, &ctx_params)?;
        let mut batch = Batch::new(1);
        batch.push(model.bos().unwrap_or(0), 0, true);
        ctx.decode(&batch)?;
    }
    if let Some(e) = rec.error {
        return Err(RuntimeError::Discovery(e));
    }
    if rec.found.is_empty() {
        return Err(RuntimeError::Discovery(
            "no tensor named *.weight was seen in the graph".into(),
        ));
    }
    Ok(WeightMap { by_name: rec.found })
}
