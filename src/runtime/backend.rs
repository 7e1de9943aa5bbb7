//! llama.cpp's process-wide state: `llama_backend_init` (once), its log sink, and the compute
//! devices the build knows ([`devices`], [`gpu_offload_supported`]).
//!
//! Which devices exist is decided when llama.cpp is built: the default build has the CPU only;
//! ggmerge's cargo features `cuda`, `vulkan`, `metal`, `rocm` add a GPU backend, and
//! `dynamic-backends` loads every backend library found beside the executable at [`init`]
//! (ggml's `ggml_backend_load_all`, which also picks the best CPU variant for the machine).
//!
//! llama.cpp logs through one global callback. By default ggmerge's sink drops everything but
//! keeps the last error-level message *of the thread that logged it*, which
//! [`take_last_error`] hands to error values (so a failed load says *why*). llama.cpp logs a
//! failing call's reasons on the thread that made the call, so with sessions on several
//! threads (a server) each call reports its own error, never another thread's. With
//! `GGMERGE_LLAMA_LOG=1` in the environment every message is also written to stderr, as
//! llama.cpp would.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// The environment variable that lets llama.cpp's log through to stderr (`1`).
pub const LOG_ENV: &str = "GGMERGE_LLAMA_LOG";

static INIT: Once = Once::new();
static PASS_THROUGH: AtomicBool = AtomicBool::new(false);
thread_local! {
    /// This thread's last error-level message (with its continuation lines), and whether the
    /// previous message was an error (so `GGML_LOG_LEVEL_CONT` lines can be attached to it).
    static LAST_ERROR: RefCell<(String, bool)> = const { RefCell::new((String::new(), false)) };
}

/// Initialises llama.cpp once per process (`llama_backend_init`) and installs the log sink.
/// Every entry point of the runtime layer calls this first.
pub fn init() {
    INIT.call_once(|| {
        let pass = std::env::var(LOG_ENV).is_ok_and(|v| v == "1");
        PASS_THROUGH.store(pass, Ordering::Relaxed);
        // SAFETY: `log_sink` is an `extern "C"` function with the signature of
        // `ggml_log_callback` that never unwinds (it catches panics) and uses no user data, so a
        // null user-data pointer is fine. llama_log_set also installs it for ggml.
        // llama_backend_init takes no arguments and only initialises global tables; `Once`
        // guarantees it runs once, before any other llama.cpp call of this layer.
        unsafe {
            sys::llama_log_set(Some(log_sink), std::ptr::null_mut());
            #[cfg(feature = "dynamic-backends")]
            // Loads the backend libraries (CPU variants, GPUs) built beside the executable;
            // takes no arguments, registers what it finds in ggml's global registry.
            sys::ggml_backend_load_all();
            sys::llama_backend_init();
        }
    });
}

/// What kind of device a [`Device`] is (ggml's `ggml_backend_dev_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host CPU.
    Cpu,
    /// A discrete GPU.
    Gpu,
    /// A GPU sharing the host's memory.
    IntegratedGpu,
    /// An accelerator working beside the CPU (BLAS, AMX …), holding no layers itself.
    Accelerator,
    /// Anything newer than this list.
    Other,
}

/// A compute device of this build of llama.cpp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// ggml's name (`CPU`, `CUDA0`, `Vulkan0`, `Metal` …): what buffers on it are named after.
    pub name: String,
    /// The driver's description (`NVIDIA GeForce RTX 4090`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub description: String,
    /// CPU, GPU, …
    pub kind: DeviceKind,
    /// Memory free and total, bytes, as the driver reports them (0 when unknown).
    pub memory_free: u64,
    /// See `memory_free`.
    pub memory_total: u64,
}

/// The devices llama.cpp can use, in its order (GPUs first, then the CPU); `-ngl` offloads to
/// the GPUs among them.
pub fn devices() -> Vec<Device> {
    init();
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: ggml returns static NUL-terminated names owned by the device (checked
            // non-null), alive as long as the process.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: the registry is initialised (init above); indices below the count are valid and
    // the device handles live as long as the process.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n)
        .filter_map(|i| {
            let dev = unsafe { sys::ggml_backend_dev_get(i) };
            if dev.is_null() {
                return None;
            }
            let (mut free, mut total) = (0usize, 0usize);
            // SAFETY: `dev` is a live device (non-null); the out-pointers are locals.
            let (name, description, kind) = unsafe {
                sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
                (
                    text(sys::ggml_backend_dev_name(dev)),
                    text(sys::ggml_backend_dev_description(dev)),
                    sys::ggml_backend_dev_type(dev),
                )
            };
            let kind = match kind {
                sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
                sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
                sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
                sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
                _ => DeviceKind::Other,
            };
            Some(Device {
                name,
                description,
                kind,
                memory_free: free as u64,
                memory_total: total as u64,
            })
        })
        .collect()
}

/// Whether this build can offload layers to a GPU (`llama_supports_gpu_offload`): a GPU
/// backend was compiled in (or loaded) and found a device.
pub fn gpu_offload_supported() -> bool {
    init();
    // SAFETY: no arguments; reads the initialised registry.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// Takes (and clears) this thread's last llama.cpp error-level log message; empty when there
/// was none.
pub fn take_last_error() -> String {
    LAST_ERROR.with_borrow_mut(|g| std::mem::take(&mut g.0).trim().to_string())
}

/// Forgets any earlier error message, so the next [`take_last_error`] reports only what the
/// following call logged.
pub fn clear_last_error() {
    let _ = take_last_error();
}

unsafe extern "C" fn log_sink(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    // A panic must not unwind into C: catch it and drop the message.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if text.is_null() {
            return;
        }
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call
        // (checked non-null above); it is only read here.
        let bytes = unsafe { CStr::from_ptr(text) }.to_bytes();
        if PASS_THROUGH.load(Ordering::Relaxed) {
            let _ = std::io::stderr().write_all(bytes);
        }
        let msg = String::from_utf8_lossy(bytes);
        LAST_ERROR.with_borrow_mut(|g| match level {
            sys::GGML_LOG_LEVEL_ERROR => {
                g.0 = msg.into_owned();
                g.1 = true;
            }
            sys::GGML_LOG_LEVEL_CONT if g.1 => g.0.push_str(&msg),
            sys::GGML_LOG_LEVEL_CONT => {}
            _ => g.1 = false,
        });
    }));
}
