//! llama.cpp's own quantizer (`llama_model_quantize`, the engine of `llama-quantize`) as the
//! reference that tests and benchmarks compare `ggmerge quantize` with.

use std::ffi::CString;
use std::path::Path;

use llama_cpp_sys_2 as sys;

extern "C" fn quiet_log(
    _level: sys::ggml_log_level,
    _text: *const std::os::raw::c_char,
    _ud: *mut std::ffi::c_void,
) {
}

/// Runs llama.cpp's quantizer on `input` → `output` with the mixture `ftype`.
pub fn llama_quantize(input: &Path, output: &Path, ftype: u32, threads: i32) {
    let cin = CString::new(input.to_str().unwrap()).unwrap();
    let cout = CString::new(output.to_str().unwrap()).unwrap();
    // SAFETY: the paths are valid NUL-terminated strings that outlive the call; the params
    // struct comes from llama.cpp's own defaults with scalar fields changed; the log callback
    // ignores its arguments and never unwinds.
    let rc = unsafe {
        sys::llama_log_set(Some(quiet_log), std::ptr::null_mut());
        sys::llama_backend_init();
        let mut p = sys::llama_model_quantize_default_params();
        p.nthread = threads;
        p.ftype = ftype as sys::llama_ftype;
        p.allow_requantize = true;
        sys::llama_model_quantize(cin.as_ptr(), cout.as_ptr(), &p)
    };
    assert_eq!(rc, 0, "llama_model_quantize failed for ftype {ftype}");
}
