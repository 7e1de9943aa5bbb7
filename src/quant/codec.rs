//! Dequantize and quantize whole rows, in parallel over row chunks with rayon.
//!
//! F32, F16 and BF16 are converted in Rust (`half`, runtime-dispatched F16C); every block type
//! goes through ggml (`to_float`, `ggml_quantize_chunk`), so bytes are ggml's bytes — except
//! Q8_0 quantization of finite rows, done in Rust byte-identically (`q8_0`, tested against
//! ggml). Each row is
//! quantized independently of every other, which is why output is byte-identical whatever the
//! thread count or chunking: chunks only decide which thread does a row, never its result.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::format::ggml_type::QuantizeSupport;
use crate::format::GgmlType;
use crate::quant::error::QuantError;
use crate::quant::{ggml, q8_0};

/// Elements a parallel task works on at once: big enough to amortize scheduling, small enough
/// that the per-task f32 buffer stays in L2.
const CHUNK_ELEMS: u64 = 64 * 1024;

/// Checks `ty` can be dequantized.
pub fn check_dequantize(ty: GgmlType, tensor: &str) -> Result<(), QuantError> {
    if ty.traits().can_dequantize {
        Ok(())
    } else {
        Err(QuantError::CannotDequantize {
            tensor: tensor.into(),
            ty,
        })
    }
}

/// Checks `ty` can be produced for rows of `n_per_row`.
pub fn check_quantize(ty: GgmlType, n_per_row: u64, tensor: &str) -> Result<(), QuantError> {
    match ty.traits().quantize {
        QuantizeSupport::Yes => {}
        QuantizeSupport::NeedsImatrix => {
            return Err(QuantError::CannotQuantize {
                tensor: tensor.into(),
                ty,
                reason: "this type needs an importance matrix, which ggmerge does not compute; \
                         pick a K-quant or IQ4_NL/IQ4_XS"
                    .into(),
            })
        }
        QuantizeSupport::No => {
            return Err(QuantError::CannotQuantize {
                tensor: tensor.into(),
                ty,
                reason: "not a type weights can be stored in".into(),
            })
        }
    }
    if !n_per_row.is_multiple_of(ty.block_size()) {
        return Err(QuantError::CannotQuantize {
            tensor: tensor.into(),
            ty,
            reason: format!(
                "rows of {n_per_row} elements are not a multiple of its block size {}",
                ty.block_size()
            ),
        });
    }
    Ok(())
}

/// Dequantizes whole blocks serially (the caller parallelizes). `src.len()` must be
/// `dst.len() / block_size * type_size`.
pub fn dequantize_into(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        GgmlType::F16 => match bytemuck::try_cast_slice::<u8, f16>(src) {
            Ok(h) => h.convert_to_f32_slice(dst),
            Err(_) => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        },
        GgmlType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(src) {
            Ok(h) => h.convert_to_f32_slice(dst),
            Err(_) => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
                }
            }
        },
        _ => ggml::to_float(ty, src, dst),
    }
}

/// Quantizes whole rows serially (the caller parallelizes).
pub fn quantize_into(ty: GgmlType, src: &[f32], n_per_row: u64, dst: &mut [u8]) {
    if ty == GgmlType::F32 {
        for (d, s) in dst.chunks_exact_mut(4).zip(src) {
            d.copy_from_slice(&s.to_le_bytes());
        }
    } else if ty == GgmlType::Q8_0 && q8_0::all_finite(src) {
        // ggml's bytes, computed in Rust (see `q8_0`); non-finite input keeps ggml's handling.
        q8_0::quantize(src, dst);
    } else {
        ggml::quantize_chunk(ty, src, n_per_row, dst);
    }
}

/// Rows per parallel task for rows of `n_per_row` elements.
fn rows_per_task(n_per_row: u64) -> usize {
    (CHUNK_ELEMS / n_per_row.max(1)).max(1) as usize
}

/// Dequantizes a tensor's bytes into `dst` (one f32 per element), in parallel.
pub fn dequantize(
    ty: GgmlType,
    src: &[u8],
    dst: &mut [f32],
    tensor: &str,
) -> Result<(), QuantError> {
    check_dequantize(ty, tensor)?;
    let blk = ty.block_size() as usize;
    let n = dst.len();
    if !n.is_multiple_of(blk) || (n / blk) as u64 * ty.type_size() != src.len() as u64 {
        return Err(QuantError::SizeMismatch {
            tensor: tensor.into(),
            expected: (n / blk) as u64 * ty.type_size(),
            found: src.len() as u64,
        });
    }
    let elems = (CHUNK_ELEMS as usize / blk).max(1) * blk;
    let src_chunk = elems / blk * ty.type_size() as usize;
    dst.par_chunks_mut(elems)
        .zip(src.par_chunks(src_chunk))
        .for_each(|(d, s)| dequantize_into(ty, s, d));
    Ok(())
}

/// Bytes of one row of `n_per_row` elements of `ty`; an error naming `tensor` when such a row
/// is not a whole number of the type's blocks (the one checked row size of this layer).
pub fn row_size(ty: GgmlType, n_per_row: u64, tensor: &str) -> Result<usize, QuantError> {
    ty.row_bytes(n_per_row)
        .map(|r| r as usize)
        .ok_or_else(|| QuantError::CannotQuantize {
            tensor: tensor.into(),
            ty,
            reason: format!("rows of {n_per_row} elements are not whole blocks of {ty}"),
        })
}

/// Quantizes `src` (rows of `n_per_row`) into `dst`, in parallel. Refuses NaN/Inf input.
pub fn quantize(
    ty: GgmlType,
    src: &[f32],
    n_per_row: u64,
    dst: &mut [u8],
    tensor: &str,
) -> Result<(), QuantError> {
    check_quantize(ty, n_per_row, tensor)?;
    let row = row_size(ty, n_per_row, tensor)?;
    let n_rows = src.len() / n_per_row as usize;
    if !(src.len() as u64).is_multiple_of(n_per_row) || dst.len() != row * n_rows {
        return Err(QuantError::SizeMismatch {
            tensor: tensor.into(),
            expected: (row * n_rows) as u64,
            found: dst.len() as u64,
        });
    }
    check_finite(src, 0, tensor)?;
    let rows = rows_per_task(n_per_row);
    dst.par_chunks_mut(rows * row)
        .zip(src.par_chunks(rows * n_per_row as usize))
        .for_each(|(d, s)| quantize_into(ty, s, n_per_row, d));
    Ok(())
}

/// First non-finite value of `v` as an error (`base` is the index of `v[0]` in the tensor).
fn check_finite(v: &[f32], base: u64, tensor: &str) -> Result<(), QuantError> {
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(QuantError::NonFinite {
            tensor: tensor.into(),
            index: base + i as u64,
            value: v[i],
        }),
    }
}

/// Converts rows of `src_ty` into rows of `dst_ty` (dequantize → quantize) in parallel, with a
/// small f32 buffer per task instead of a whole f32 tensor. NaN/Inf in the source is an error
/// naming the first bad element.
pub fn convert(
    src_ty: GgmlType,
    src: &[u8],
    dst_ty: GgmlType,
    dst: &mut [u8],
    n_per_row: u64,
    tensor: &str,
) -> Result<(), QuantError> {
    check_dequantize(src_ty, tensor)?;
    check_quantize(dst_ty, n_per_row, tensor)?;
    let src_row = row_size(src_ty, n_per_row, tensor)?;
    let dst_row = row_size(dst_ty, n_per_row, tensor)?;
    let n_rows = src.len() / src_row.max(1);
    if src.len() != n_rows * src_row || dst.len() != n_rows * dst_row {
        return Err(QuantError::SizeMismatch {
            tensor: tensor.into(),
            expected: (n_rows * dst_row) as u64,
            found: dst.len() as u64,
        });
    }
    let rows = rows_per_task(n_per_row);
    let errors: Vec<QuantError> = dst
        .par_chunks_mut(rows * dst_row)
        .zip(src.par_chunks(rows * src_row))
        .enumerate()
        .filter_map(|(i, (d, s))| {
            let mut buf = vec![0f32; s.len() / src_row * n_per_row as usize];
            dequantize_into(src_ty, s, &mut buf);
            let base = (i * rows) as u64 * n_per_row;
            if let Err(e) = check_finite(&buf, base, tensor) {
                return Some(e);
            }
            quantize_into(dst_ty, &buf, n_per_row, d);
            None
        })
        .collect();
    // The first error in element order, so the message does not depend on scheduling.
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect()
    }

    #[test]
    fn parallel_quantize_matches_one_ggml_call() {
        let n_per_row = 512u64;
        let src = ramp(512 * 300);
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q8_0,
            GgmlType::IQ4_XS,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            let size = ty.row_bytes(n_per_row).unwrap() as usize * 300;
            let mut reference = vec![0u8; size];
            ggml::quantize_chunk(ty, &src, n_per_row, &mut reference);
            let mut ours = vec![0u8; size];
            quantize(ty, &src, n_per_row, &mut ours, "t").unwrap();
            assert_eq!(ours, reference, "{ty}");
        }
    }

    #[test]
    fn nan_is_refused_with_its_index() {
        let mut src = ramp(256 * 4);
        src[700] = f32::NAN;
        let mut out = vec![0u8; GgmlType::Q8_0.row_bytes(256).unwrap() as usize * 4];
        let err = quantize(GgmlType::Q8_0, &src, 256, &mut out, "blk.0.w").unwrap_err();
        assert!(
            matches!(err, QuantError::NonFinite { index: 700, .. }),
            "{err}"
        );
    }

    #[test]
    fn imatrix_types_are_refused() {
        let err = check_quantize(GgmlType::IQ2_XXS, 256, "t").unwrap_err();
        assert!(err.to_string().contains("importance matrix"), "{err}");
        assert!(check_quantize(GgmlType::Q4_K, 640, "t").is_err());
    }
}
