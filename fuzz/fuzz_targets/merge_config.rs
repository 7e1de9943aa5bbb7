//! Fuzzes the merge config parsers: the input (when UTF-8) as mergekit YAML
//! (`MergeConfig::from_yaml_str`) and as native TOML (`MergeConfig::from_toml_str`). Each must
//! give `Ok` or a `ConfigError`, never a panic, a stack overflow or a huge allocation; libFuzzer's
//! `-timeout` flags inputs that take too long (deep nesting).
//!
//! A config that parses is validated again (`validate`, which the parsers already ran) and its
//! parameters are resolved for every model and a few tensors and layer counts, as a merge plan
//! does: the ranges `validate` promises must hold for every evaluated value (density in (0, 1],
//! gamma and epsilon in [0, 1), weight and other numbers finite).
#![no_main]

use ggmerge::flows::merge::method_spec;
use ggmerge::merge::config::{MergeConfig, TensorContext};
use libfuzzer_sys::fuzz_target;

/// Tensors to resolve parameters for: (GGUF name, HF name, layer).
const TENSORS: &[(&str, Option<&str>, Option<u32>)] = &[
    ("token_embd.weight", Some("model.embed_tokens.weight"), None),
    (
        "blk.0.attn_q.weight",
        Some("model.layers.0.self_attn.q_proj.weight"),
        Some(0),
    ),
    (
        "blk.1.ffn_up.weight",
        Some("model.layers.1.mlp.up_proj.weight"),
        Some(1),
    ),
    ("blk.2.attn_norm.weight", None, Some(2)),
    ("output.weight", Some("lm_head.weight"), None),
];

fn check(config: &MergeConfig) {
    config.validate().expect("a parsed config validates again");
    let _ = method_spec(config);
    let _ = config.rescale();
    for n_layers in [1u32, 3, 30] {
        for &(gguf_name, hf_name, layer) in TENSORS {
            let ctx = TensorContext {
                gguf_name,
                hf_name,
                layer: layer.map(|l| l.min(n_layers - 1)),
                n_layers,
            };
            let mut models: Vec<Option<usize>> = (0..config.models.len()).map(Some).collect();
            models.push(None);
            for m in models {
                let at = |name: &str| config.number(m, name, &ctx);
                if let Some(d) = at("density") {
                    assert!(
                        d > 0.0 && d <= 1.0,
                        "density {d} at {gguf_name} of {n_layers}"
                    );
                }
                for name in ["gamma", "epsilon"] {
                    if let Some(x) = at(name) {
                        assert!((0.0..1.0).contains(&x), "{name} {x} at {gguf_name}");
                    }
                }
                for name in ["weight", "lambda", "t"] {
                    if let Some(x) = at(name) {
                        assert!(x.is_finite(), "{name} {x} at {gguf_name}");
                    }
                }
                let _ = config.flag(m, "normalize", &ctx);
                let _ = config.flag(m, "int8_mask", &ctx);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match MergeConfig::from_yaml_str(text) {
        Ok(config) => check(&config),
        Err(e) => drop(e.to_string()),
    }
    match MergeConfig::from_toml_str(text) {
        Ok(config) => check(&config),
        Err(e) => drop(e.to_string()),
    }
});
