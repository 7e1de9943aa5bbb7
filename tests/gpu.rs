//! GPU offload (`-ngl`): where layers live, and experts written into weights that live in
//! device memory — whole and partial offload — behaving exactly as on the CPU path: the same
//! tokens as the applied file loaded with the same offload, A → B → A and weights 0 restoring
//! bit-identical logits.
//!
//! In the default (CPU-only) build there is no device: the tests check that `-ngl` is accepted,
//! ignored with llama.cpp's warning, and that everything stays on the CPU. In a GPU build
//! (`cargo test --features vulkan --test gpu`, run by scripts/test-vulkan.sh on Mesa's software
//! Vulkan device) they offload for real; `GGMERGE_TEST_PARTIAL_LAYERS` (default 12) is the
//! partial offload tried besides `all`.

mod common;

use std::path::{Path, PathBuf};

use common::experts::apply_packs;
use common::smollm2_pack_pair;
use ggmerge::merge::method::Method;
use ggmerge::runtime::backend::{self, DeviceKind};
use ggmerge::runtime::{Expert, ExpertSession, GenerateOptions, Model, ModelOptions};
use ggmerge::runtime::{Placement, SessionOptions};

/// SmolLM2 has 30 layers.
const SMOLLM2_LAYERS: u32 = 30;

fn partial_layers() -> i32 {
    std::env::var("GGMERGE_TEST_PARTIAL_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

fn gpu() -> bool {
    backend::gpu_offload_supported()
}

fn load(path: &Path, gpu_layers: i32) -> Model {
    let opts = ModelOptions {
        gpu_layers,
        threads: Some(1),
        ..Default::default()
    };
    Model::load(path, &opts).unwrap()
}

fn session_opts() -> SessionOptions {
    SessionOptions {
        n_ctx: 128,
        threads: Some(2),
        ..Default::default()
    }
}

fn packs() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    smollm2_pack_pair()
}

/// Host memory: the CPU backend's buffers (`CPU`, `CPU_REPACK`), or a GPU backend's pinned
/// host buffer (`Vulkan_Host`, `CUDA_Host`), where llama.cpp keeps the layers it does not
/// offload when a GPU backend is present.
fn is_cpu(p: &Placement) -> bool {
    p.buffer.starts_with("CPU") || p.buffer.ends_with("_Host")
}

#[test]
fn devices_are_listed_and_the_cpu_is_one() {
    let devices = backend::devices();
    eprintln!("{devices:#?}");
    assert!(
        devices.iter().any(|d| d.kind == DeviceKind::Cpu),
        "{devices:?}"
    );
    let gpus = devices
        .iter()
        .filter(|d| matches!(d.kind, DeviceKind::Gpu | DeviceKind::IntegratedGpu))
        .count();
    assert_eq!(gpu(), gpus > 0, "{devices:?}");
}

#[test]
fn layers_live_where_ngl_puts_them() {
    let all = load(&common::smollm2(), -1);
    let placement = all.placement().unwrap();
    for p in &placement {
        eprintln!("{p:?}");
    }
    let layers: Vec<&Placement> = placement.iter().filter(|p| p.layer.is_some()).collect();
    assert_eq!(
        layers.iter().filter_map(|p| p.layer).max(),
        Some(SMOLLM2_LAYERS - 1)
    );
    if !gpu() {
        assert!(placement.iter().all(is_cpu), "no GPU, yet {placement:?}");
        return;
    }
    assert!(layers.iter().all(|p| !is_cpu(p)), "-ngl all: {placement:?}");
    drop(all);

    let n = partial_layers();
    let partial = load(&common::smollm2(), n);
    let placement = partial.placement().unwrap();
    // llama.cpp offloads the last n layers (i_gpu_start = n_layer + 1 - n, output counted).
    let first_gpu = SMOLLM2_LAYERS + 1 - n as u32;
    for p in placement.iter().filter(|p| p.layer.is_some()) {
        let l = p.layer.unwrap_or(0);
        assert_eq!(is_cpu(p), l < first_gpu, "-ngl {n}, layer {l}: {p:?}");
    }
}

#[test]
fn ngl_without_a_gpu_is_ignored_with_a_warning() {
    let out = common::ggmerge(&[
        "run",
        "--base",
        common::s(&common::smollm2()),
        "-p",
        "Hello",
        "-n",
        "2",
        "-c",
        "64",
        "-t",
        "1",
        "-ngl",
        "all",
        "-v",
    ]);
    let err = common::text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("layer 29: "), "no placement at -v: {err}");
    assert_eq!(err.contains("no usable GPU found"), !gpu(), "{err}");
    let bad = common::ggmerge(&["run", "--base", "x.gguf", "-p", "Hi", "-ngl", "-5"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(common::text(&bad.stderr).contains("not a number of layers"));
}

/// Experts applied to weights at `gpu_layers` give the tokens and logits of the applied file
/// loaded the same way; mixtures switch back and restore the base bit for bit.
fn experts_behave_with_offload(gpu_layers: i32) {
    let (_d, a, b) = packs();
    let dir = common::tempdir();
    let applied = dir.path().join("applied.gguf");
    apply_packs(&common::smollm2(), &[(a, 0.7), (b, 0.3)], &applied);

    let gen = GenerateOptions {
        n_predict: 16,
        ..Default::default()
    };
    let prompt = "The capital of France is";
    let base = load(&common::smollm2(), gpu_layers);
    let tokens = base.tokenize(prompt, true, false).unwrap();
    let base_logits = base
        .session(&session_opts())
        .unwrap()
        .logits_for(&tokens)
        .unwrap();
    let experts = vec![Expert::from_path(a), Expert::from_path(b)];
    let mut s = ExpertSession::new(
        &base,
        &common::smollm2(),
        experts,
        &[0.7, 0.3],
        Method::TaskArithmetic,
        &session_opts(),
        Some(2),
        1 << 30,
    )
    .unwrap();
    let live = s.session().generate(prompt, &gen).unwrap();
    let mixed = s.session().logits_for(&tokens).unwrap();
    assert!(
        mixed != base_logits,
        "-ngl {gpu_layers}: the experts changed nothing"
    );

    let file = load(&applied, gpu_layers);
    let mut plain = file.session(&session_opts()).unwrap();
    assert_eq!(
        live.tokens,
        plain.generate(prompt, &gen).unwrap().tokens,
        "-ngl {gpu_layers}: in memory vs applied file"
    );
    assert!(
        plain.logits_for(&tokens).unwrap() == mixed,
        "-ngl {gpu_layers}: logits differ from the applied file's"
    );
    drop(plain);
    drop(file);

    s.set_mixture(&[0.0, 1.0]).unwrap();
    assert!(s.session().logits_for(&tokens).unwrap() != mixed);
    let back = s.set_mixture(&[0.7, 0.3]).unwrap();
    assert!(back.cached, "{back:?}");
    assert!(
        s.session().logits_for(&tokens).unwrap() == mixed,
        "-ngl {gpu_layers}: A → B → A changed the logits"
    );
    s.set_mixture(&[0.0, 0.0]).unwrap();
    assert!(
        s.session().logits_for(&tokens).unwrap() == base_logits,
        "-ngl {gpu_layers}: weights 0 did not restore the base"
    );
}

#[test]
fn experts_on_fully_offloaded_weights() {
    experts_behave_with_offload(-1);
}

#[test]
fn experts_on_partly_offloaded_weights() {
    experts_behave_with_offload(partial_layers());
}
