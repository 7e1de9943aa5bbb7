//! Synthetic "fine-tunes" of the real fixtures, and a llama.cpp load-and-evaluate check.
#![allow(dead_code)]

use std::path::Path;

use ggmerge::format::gguf::{GgufModel, GgufWriter, TensorSpec};
use ggmerge::format::GgmlType;
use ggmerge::quant;

/// Deterministic approximately-normal noise (sum of 4 uniforms from a xorshift stream).
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
    /// Zero mean, unit variance.
    pub fn normal(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 1.732_050_8
    }
}

/// Writes an "expert": every 2-D weight of `base` perturbed by δ ~ N(0, (rel · rms(w))²),
/// stored as `ty`; 1-D tensors copied unchanged. Only tensors whose name contains one of
/// `only` are perturbed (all when empty).
pub fn make_expert(base: &Path, out: &Path, seed: u64, rel: f32, ty: GgmlType, only: &[&str]) {
    let model = GgufModel::open(base).unwrap();
    let plan: Vec<GgmlType> = model
        .tensors()
        .map(|t| {
            if t.info.shape.len() >= 2 {
                ty
            } else {
                t.info.ty
            }
        })
        .collect();
    let specs: Vec<TensorSpec> = model
        .tensors()
        .zip(&plan)
        .map(|(t, &ty)| TensorSpec {
            name: t.info.name.clone(),
            shape: t.info.shape.clone(),
            ty,
        })
        .collect();
    let mut w = GgufWriter::create(out, 3, model.metadata(), &specs, &[base]).unwrap();
    let mut noise = Noise::new(seed);
    for (t, &ty) in model.tensors().zip(&plan) {
        if ty == t.info.ty && t.info.shape.len() < 2 {
            w.write_tensor(t.data).unwrap();
            continue;
        }
        let mut v = vec![0f32; t.info.n_elements() as usize];
        quant::dequantize(t.info.ty, t.data, &mut v, &t.info.name).unwrap();
        if only.is_empty() || only.iter().any(|p| t.info.name.contains(p)) {
            let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
            for x in v.iter_mut() {
                *x += rel * rms * noise.normal();
            }
        }
        let mut bytes = vec![0u8; ggmerge::format::nbytes(&t.info.shape, ty).unwrap() as usize];
        quant::quantize(ty, &v, t.info.shape[0], &mut bytes, &t.info.name).unwrap();
        w.write_tensor(&bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Loads `path` with llama.cpp (no mmap), decodes a short prompt and returns the last logits.
pub fn llama_logits(path: &Path) -> Vec<f32> {
    use llama_cpp_sys_2 as sys;
    use std::ffi::CString;
    extern "C" fn quiet(
        _: sys::ggml_log_level,
        _: *const std::os::raw::c_char,
        _: *mut std::ffi::c_void,
    ) {
    }
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: test-only FFI mirroring llama.cpp's simple example: every handle is checked for
    // null, used while alive and freed in reverse order; buffers outlive the calls using them.
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let mut mp = sys::llama_model_default_params();
        mp.n_gpu_layers = 0;
        let model = sys::llama_model_load_from_file(c.as_ptr(), mp);
        assert!(
            !model.is_null(),
            "llama.cpp could not load {}",
            path.display()
        );
        let mut cp = sys::llama_context_default_params();
        cp.n_ctx = 64;
        cp.n_batch = 64;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null());
        let vocab = sys::llama_model_get_vocab(model);
        let text = CString::new("The capital of France is").unwrap();
        let mut toks = vec![0 as sys::llama_token; 32];
        let n = sys::llama_tokenize(
            vocab,
            text.as_ptr(),
            text.as_bytes().len() as i32,
            toks.as_mut_ptr(),
            32,
            true,
            false,
        );
        assert!(n > 0);
        let batch = sys::llama_batch_get_one(toks.as_mut_ptr(), n);
        assert_eq!(sys::llama_decode(ctx, batch), 0);
        let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
        let logits =
            std::slice::from_raw_parts(sys::llama_get_logits_ith(ctx, -1), n_vocab).to_vec();
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        logits
    }
}

/// DARE packs (F16 values) of synthetic fine-tunes of `base`, one per `(seed, name)`, at
/// `density` with mask seed `mask_seed`, in `dir` as `NAME.dpk.gguf` (the fine-tunes are
/// removed once extracted).
pub fn packs_of(
    base: &Path,
    dir: &Path,
    experts: &[(u64, &str)],
    density: f64,
    mask_seed: u64,
) -> Vec<std::path::PathBuf> {
    use ggmerge::flows::extract::{extract_delta, ExtractOptions};
    experts
        .iter()
        .map(|&(seed, name)| {
            let ft = dir.join(format!("{name}.gguf"));
            make_expert(base, &ft, seed, 3e-2, GgmlType::F16, &[]);
            let pack = dir.join(format!("{name}.dpk.gguf"));
            let o = ExtractOptions {
                density,
                seed: mask_seed,
                ..Default::default()
            };
            extract_delta(base, &ft, &pack, &o, &ggmerge::NoProgress).unwrap();
            std::fs::remove_file(&ft).unwrap();
            pack
        })
        .collect()
}

/// Applies packs with their weights to `base` offline (task arithmetic, `merge` with packs as
/// models) into `output`.
pub fn apply_packs(base: &Path, packs: &[(&Path, f64)], output: &Path) {
    use ggmerge::merge::config::{ConfigSource, MergeConfig, Method, ModelEntry, ParamValue};
    let mut cfg = MergeConfig::new(Method::TaskArithmetic, ConfigSource::Cli);
    cfg.base_model = Some(base.display().to_string());
    for (p, w) in packs {
        let mut e = ModelEntry::new(p.display().to_string());
        e.parameters.set("weight", ParamValue::Number(*w));
        cfg.models.push(e);
    }
    let opts = ggmerge::MergeOptions {
        output: output.to_path_buf(),
        threads: Some(2),
        ..Default::default()
    };
    ggmerge::merge_models(&cfg, &opts, &ggmerge::NoProgress).unwrap();
}
