//! How many threads a run may use, and the rayon pool every layer runs its parallel work in.
//!
//! `-t` values above what the machine can use are lowered (a request for 100 000 threads would
//! otherwise start them all, as rayon and llama.cpp do); the CLI warns when it lowers one.
//! Used by every layer that starts threads, below all of them.

/// Threads allowed per core: enough for any reasonable oversubscription, far below what makes
/// a machine unusable.
pub const PER_CORE: usize = 4;

/// A thread pool could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ThreadsError {
    /// `-t 0`.
    #[error("thread count must be at least 1")]
    Zero,
    /// The operating system refused to start the threads.
    #[error("cannot start {threads} threads: {reason}")]
    Start {
        /// Threads asked for.
        threads: usize,
        /// Why.
        reason: String,
    },
}

/// Cores (hardware threads) available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The most threads a run uses: [`PER_CORE`] × [`cores`].
pub fn max_threads() -> usize {
    PER_CORE * cores()
}

/// `requested` lowered to [`max_threads`]; `None` (all cores) becomes [`cores`]. Zero stays
/// zero: callers report it as an error.
pub fn clamp(requested: Option<usize>) -> usize {
    requested.map_or_else(cores, |n| n.min(max_threads()))
}

/// Runs `f` on a rayon pool of `threads` threads (all cores when `None`; at most
/// [`max_threads`]), so that everything `f` runs in parallel uses that many.
pub fn with_threads<T: Send, E: From<ThreadsError> + Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        if n == 0 {
            return Err(ThreadsError::Zero.into());
        }
        b = b.num_threads(clamp(Some(n)));
    }
    let pool = b.build().map_err(|e| ThreadsError::Start {
        threads: threads.unwrap_or(0),
        reason: e.to_string(),
    })?;
    pool.install(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_clamped_and_zero_refused() {
        assert_eq!(clamp(None), cores());
        assert_eq!(clamp(Some(1)), 1);
        assert_eq!(clamp(Some(usize::MAX)), max_threads());
        let r: Result<(), ThreadsError> = with_threads(Some(0), || Ok(()));
        assert!(matches!(r, Err(ThreadsError::Zero)));
        let n: Result<usize, ThreadsError> =
            with_threads(Some(100_000), || Ok(rayon::current_num_threads()));
        assert_eq!(n.unwrap(), max_threads());
    }
}
