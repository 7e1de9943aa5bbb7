//! safetensors models: reading them as a [`ModelSource`](crate::format::source::ModelSource) under GGUF names, and writing them under
//! Hugging Face names, streaming.
//!
//! - [`SafetensorsModel`] — one model from a single `.safetensors` file, a sharded checkpoint
//!   (`model.safetensors.index.json` and its shards), or an HF directory holding `config.json`
//!   and one of those. Files are memory-mapped; headers are validated by the `safetensors` crate
//!   (after ggmerge's own length checks, so a truncated file says so). Tensors are exposed under
//!   their GGUF names ([`hf_to_gguf`](crate::format::hf_names::hf_to_gguf)) with ggml-order shapes (the HF shape reversed;
//!   the bytes are the same), and with llama.cpp's conversion applied
//!   ([`transform_of`](crate::format::hf_names::transform_of)): llama q/k rows permuted, Gemma norms `+ 1`.
//! - [`SafetensorsWriter`] — one safetensors file, header first (all offsets are known from the
//!   shapes), then each tensor's bytes in order, to a temporary file renamed on success.
//! - [`write_safetensors`] — a model under HF names, optionally sharded like an HF checkpoint
//!   (`model-00001-of-0000N.safetensors` + `model.safetensors.index.json`), with the inverse
//!   transforms applied to values a callback supplies tensor by tensor, slab by slab.
//!
//! Only F32, F16 and BF16 tensors are read or written; other dtypes are an error naming the
//! tensor and its dtype.
//!
//! **Gemma norms in F16/BF16.** llama.cpp adds 1 in the checkpoint's dtype (a BF16 `w + 1` is
//! rounded to BF16) and then stores norms as F32. ggmerge computes `f32(w) + 1` in f32 and
//! exposes those tensors as F32, which is at least as precise, and writes `g - 1` computed in f32
//! when going back (1-D tensors are written as F32 by `flows::convert`, so the round
//! trip GGUF → safetensors → GGUF is exact for norm values in the usual range).
//!
//! Files: `read` (the model as a source), `write` (the writer and the HF export).

mod read;
mod write;

use half::{bf16, f16};
use safetensors::Dtype;

use crate::format::GgmlType;

pub use read::{parse_header, SafetensorsModel, StHeader};
pub use write::{
    encode_header, write_config_json, write_safetensors, ExportTensor, SafetensorsOptions,
    SafetensorsOutput, SafetensorsWriter, StTensorSpec,
};

/// The index file of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights file of an unsharded HF checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The HF model configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The largest header the `safetensors` crate accepts (100 MB).
pub(crate) const MAX_HEADER: u64 = 100_000_000;
/// Elements per slab when writing (4 MiB of f32; the writer thread queues a few encoded ones).
pub(crate) const SLAB_ELEMS: u64 = 1 << 20;
/// Most dimensions a GGUF tensor may have.
pub(crate) const MAX_DIMS: usize = 4;

/// The ggml type of a safetensors dtype ggmerge reads.
pub(crate) fn ggml_of(dtype: Dtype) -> Option<GgmlType> {
    match dtype {
        Dtype::F32 => Some(GgmlType::F32),
        Dtype::F16 => Some(GgmlType::F16),
        Dtype::BF16 => Some(GgmlType::BF16),
        _ => None,
    }
}

/// The safetensors dtype of a ggml type ggmerge writes.
pub(crate) fn dtype_of(ty: GgmlType) -> Option<Dtype> {
    match ty {
        GgmlType::F32 => Some(Dtype::F32),
        GgmlType::F16 => Some(Dtype::F16),
        GgmlType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// F32/F16/BF16 little-endian bytes as f32 values.
pub(crate) fn decode_f32(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// One mapped safetensors file with its validated header.
#[cfg(test)]
mod tests {
    use super::read::*;
    use super::write::*;
    use super::*;
    use crate::format::FormatError;
    use safetensors::SafeTensors;
    use std::path::{Path, PathBuf};

    #[test]
    fn shard_names() {
        let (f, i) = shard_paths(Path::new("/d/model.safetensors"), 3);
        assert_eq!(f[0], PathBuf::from("/d/model-00001-of-00003.safetensors"));
        assert_eq!(f[2], PathBuf::from("/d/model-00003-of-00003.safetensors"));
        assert_eq!(i, PathBuf::from("/d/model.safetensors.index.json"));
        assert_eq!(
            shard_index(&f[1]),
            Some(PathBuf::from("/d/model.safetensors.index.json"))
        );
        assert_eq!(shard_index(Path::new("/d/model.safetensors")), None);
        assert_eq!(
            shard_index(Path::new("/d/m-0000a-of-00003.safetensors")),
            None
        );
    }

    #[test]
    fn header_is_what_the_crate_reads() {
        let specs = vec![
            StTensorSpec {
                name: "b".into(),
                shape: vec![3],
                ty: GgmlType::F32,
            },
            StTensorSpec {
                name: "a".into(),
                shape: vec![2, 3],
                ty: GgmlType::BF16,
            },
        ];
        let meta = SafetensorsOptions::default().metadata;
        let (mut file, sizes) = encode_header(&specs, &meta, Path::new("x")).unwrap();
        assert_eq!(sizes, [12, 12]);
        assert_eq!((file.len() - 8) % 8, 0);
        file.extend(std::iter::repeat_n(7u8, 24));
        let st = SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), [2, 3]);
        assert_eq!(st.tensor("a").unwrap().dtype(), Dtype::BF16);
        assert_eq!(st.tensor("b").unwrap().data(), &[7u8; 12][..]);
        let (_, m) = SafeTensors::read_metadata(&file).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!(m.offset_keys(), ["b", "a"]);

        let dup = vec![specs[0].clone(), specs[0].clone()];
        assert!(encode_header(&dup, &meta, Path::new("x")).is_err());
        let q = vec![StTensorSpec {
            name: "q".into(),
            shape: vec![32],
            ty: GgmlType::Q8_0,
        }];
        assert!(encode_header(&q, &meta, Path::new("x")).is_err());
    }

    #[test]
    fn encode_refuses_f16_overflow() {
        let mut out = Vec::new();
        assert_eq!(
            encode(GgmlType::F16, &[1.0, 70000.0], &mut out),
            Err((1, 70000.0))
        );
        assert!(encode(GgmlType::BF16, &[70000.0], &mut out).is_ok());
        assert!(encode(GgmlType::F16, &[f32::INFINITY], &mut out).is_ok());
    }

    #[test]
    fn data_end_near_u64_max_is_out_of_bounds() {
        // Eight contiguous 2^61 - 1 byte tensors end at 2^64 - 8: adding the header size
        // overflows (the fuzzer's fuzz/artifacts-found/safetensors_header/data-end-overflow).
        let k = (1u64 << 61) - 1;
        let entries: Vec<String> = (0..8)
            .map(|i| {
                let (s, e) = (i * k, (i + 1) * k);
                format!(r#""t{i}":{{"dtype":"U8","shape":[{k}],"data_offsets":[{s},{e}]}}"#)
            })
            .collect();
        let json = format!("{{{}}}", entries.join(","));
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        let e = parse_header(&file, Path::new("x")).unwrap_err();
        assert!(
            matches!(&e, FormatError::DataOutOfBounds { name, end: u64::MAX, .. } if name == "t7"),
            "{e}"
        );
    }
}
