//! The thread-pool helper of the flows; [`Progress`] lives in [`crate::progress`] (the runtime
//! layer uses it too) and is re-exported here.

pub use crate::progress::{NoProgress, Progress};

/// Runs `f` on a rayon pool of `threads` threads (all cores when `None`; at most
/// [`crate::threads::max_threads`]).
pub fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> crate::Result<T> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            return Err(crate::Error::Invalid(
                "thread count must be at least 1".into(),
            ));
        }
        b = b.num_threads(crate::threads::clamp(Some(n)));
    }
    let pool = b.build().map_err(|e| crate::Error::Threads {
        threads: threads.unwrap_or(0),
        reason: e.to_string(),
    })?;
    pool.install(f)
}
