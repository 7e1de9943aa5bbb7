//! Fuzzes the safetensors reader: any bytes, taken as a whole `.safetensors` file, must give
//! `Ok` or a `FormatError` from `ggmerge::format::safetensors::parse_header`, never a panic, an
//! out-of-bounds read or a huge allocation (libFuzzer's `-rss_limit_mb` catches the last).
//!
//! A header that parses is checked (contiguous offsets from 0, data ending exactly at the end of
//! the input), then the same bytes are opened as a model (a file in a temporary directory, as
//! `SafetensorsModel` maps files) under a llama config (q/k row permutation) and a gemma3 config
//! (norms + 1), and every tensor is read: the name mapping, shape checks and transforms must not
//! panic either.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ggmerge::format::hf_names::HfConfig;
use ggmerge::format::nbytes;
use ggmerge::format::safetensors::{parse_header, SafetensorsModel};
use ggmerge::format::source::ModelSource;
use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process, written and removed every iteration (in /dev/shm where there
/// is one).
fn scratch() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!(
            "ggmerge-fuzz-st-{}.safetensors",
            std::process::id()
        ))
    })
}

fn configs() -> [HfConfig; 2] {
    let mut llama = HfConfig::for_arch("llama").expect("llama");
    llama.n_head = Some(2);
    llama.n_head_kv = Some(1);
    let gemma = HfConfig::for_arch("gemma3").expect("gemma3");
    [llama, gemma]
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(data, Path::new("fuzz.safetensors")) else {
        return;
    };
    assert!(header.data_start >= 8 && header.data_start <= data.len());
    let mut end = 0;
    for (name, info) in &header.tensors {
        let (s, e) = info.data_offsets;
        assert!(
            s == end && e >= s,
            "tensor {name:?}: offsets {s}..{e} after {end}"
        );
        end = e;
    }
    assert_eq!(
        header.data_start + end,
        data.len(),
        "the data section does not end at the end of the file"
    );

    // The model view of the same bytes.
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    for config in configs() {
        let Ok(model) = SafetensorsModel::open_with_config(path, config) else {
            continue;
        };
        for name in model.tensor_names() {
            let (shape, ty) = model.tensor_info(&name).expect("listed");
            let t = model
                .tensor(&name)
                .expect("a listed tensor reads")
                .expect("a listed tensor is present");
            assert_eq!(t.shape, shape);
            assert_eq!(t.ty, ty);
            assert_eq!(
                Ok(t.data.len() as u64),
                nbytes(&shape, ty).map_err(|_| ()),
                "tensor {name:?}: data size"
            );
        }
    }
    let _ = std::fs::remove_file(path);
});
