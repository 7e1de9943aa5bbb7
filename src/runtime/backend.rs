//! llama.cpp's process-wide state: `llama_backend_init` (once) and its log sink.
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
            sys::llama_backend_init();
        }
    });
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
