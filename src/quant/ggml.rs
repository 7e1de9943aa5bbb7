//! The safe face of ggml's quantization C API (through `llama-cpp-sys-2`). The only module in
//! ggmerge with ggml FFI; each function wraps one C function and checks, before calling, every
//! precondition that ggml would otherwise `GGML_ASSERT` (which aborts the process).

use std::ffi::CStr;

use llama_cpp_sys_2 as sys;

use crate::format::GgmlType;

fn raw(ty: GgmlType) -> sys::ggml_type {
    ty.id() as sys::ggml_type
}

/// ggml's own view of a type: (name, block size, bytes per block). Used to check
/// [`crate::format::ggml_type::TYPES`] against the linked ggml.
pub fn ggml_traits(ty: GgmlType) -> (String, u64, u64) {
    // SAFETY: `ty` is a valid ggml type id (GgmlType holds only ids below GGML_TYPE_COUNT that
    // ggml has a traits row for); `ggml_get_type_traits` returns a pointer into a static table.
    let t = unsafe { &*sys::ggml_get_type_traits(raw(ty)) };
    // SAFETY: type_name is a static NUL-terminated string for every valid id.
    let name = unsafe { CStr::from_ptr(t.type_name) }
        .to_string_lossy()
        .into_owned();
    (name, t.blck_size as u64, t.type_size as u64)
}

/// Whether ggml has a `to_float` for `ty`.
pub fn has_to_float(ty: GgmlType) -> bool {
    // SAFETY: as in `ggml_traits`.
    unsafe { (*sys::ggml_get_type_traits(raw(ty))).to_float.is_some() }
}

/// Dequantizes whole blocks: `src` holds `dst.len() / block_size` blocks of `ty`.
///
/// Panics (a bug in the caller, never user data) if the lengths disagree or `ty` has no
/// `to_float`; callers check `can_dequantize` first.
pub fn to_float(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len() as u64;
    assert!(
        n.is_multiple_of(ty.block_size()),
        "{ty}: {n} is not whole blocks"
    );
    assert_eq!(
        src.len() as u64,
        n / ty.block_size() * ty.type_size(),
        "{ty}: size mismatch"
    );
    // SAFETY: as in `ggml_traits`.
    let f = unsafe { (*sys::ggml_get_type_traits(raw(ty))).to_float }
        .unwrap_or_else(|| panic!("ggml has no to_float for {ty}"));
    // SAFETY: `src` holds exactly n/block_size blocks of `ty` and `dst` has room for n floats,
    // checked above; to_float reads only those blocks and writes only those n floats, and keeps
    // no pointer after returning.
    unsafe { f(src.as_ptr().cast(), dst.as_mut_ptr(), n as i64) }
}

/// Quantizes `src` (whole rows of `n_per_row`) into `dst` with `ggml_quantize_chunk`,
/// without an importance matrix.
///
/// Panics (a caller bug) on length mismatch or a type that needs an imatrix or cannot be
/// produced; callers check the type table first.
pub fn quantize_chunk(ty: GgmlType, src: &[f32], n_per_row: u64, dst: &mut [u8]) {
    use crate::format::ggml_type::QuantizeSupport;
    assert_eq!(
        ty.traits().quantize,
        QuantizeSupport::Yes,
        "{ty} cannot be quantized to"
    );
    let n = src.len() as u64;
    assert!(
        n_per_row > 0 && n.is_multiple_of(n_per_row),
        "{ty}: not whole rows"
    );
    let row = ty.row_bytes(n_per_row).expect("row not whole blocks");
    let nrows = n / n_per_row;
    assert_eq!(dst.len() as u64, row * nrows, "{ty}: output size mismatch");
    // SAFETY: ggml_quantize_chunk reads nrows*n_per_row floats from `src` and writes
    // nrows*row_size bytes to `dst` (start = 0), both checked above. Its GGML_ASSERTs hold:
    // start is 0 (a multiple of the block size and of n_per_row); `ty` does not require an
    // imatrix (QuantizeSupport::Yes excludes those); n_per_row is a multiple of the block size
    // (row_bytes succeeded), which the per-type quantize functions assert. ggml_quantize_init
    // inside it is guarded by ggml's critical section, so concurrent calls are fine.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            raw(ty),
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    assert_eq!(written as u64, row * nrows);
}

/// `ggml_validate_row_data`: checks scales and values for NaN/Inf (and other per-type rules).
pub fn validate_row_data(ty: GgmlType, data: &[u8]) -> bool {
    if !(data.len() as u64).is_multiple_of(ty.type_size()) {
        return false;
    }
    // SAFETY: the function reads exactly `data.len()` bytes, which must be whole blocks
    // (checked above; it would otherwise return false after logging). No pointer is kept.
    unsafe { sys::ggml_validate_row_data(raw(ty), data.as_ptr().cast(), data.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ggml_type::{QuantizeSupport, TYPES};

    /// Every row of ggmerge's type table agrees with the linked ggml.
    #[test]
    fn type_table_matches_ggml() {
        for t in TYPES {
            let ty = GgmlType::from_id(t.id).unwrap();
            let (name, blck, size) = ggml_traits(ty);
            assert_eq!(name, t.ggml_name, "id {}", t.id);
            assert_eq!(
                (blck, size),
                (ty.block_size(), ty.type_size()),
                "{}",
                t.name
            );
            // F32 has no ggml to_float (ggmerge copies it); every other dequantizable type does.
            let expect_to_float = t.can_dequantize && ty != GgmlType::F32;
            assert_eq!(has_to_float(ty), expect_to_float, "{} to_float", t.name);
            // SAFETY: valid id, static table.
            let needs = unsafe { sys::ggml_quantize_requires_imatrix(raw(ty)) };
            if needs {
                assert_eq!(t.quantize, QuantizeSupport::NeedsImatrix, "{}", t.name);
            }
        }
    }
}
