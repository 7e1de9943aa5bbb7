//! Progress reporting from long flows. The library never prints: it calls a [`Progress`]
//! that the caller supplies (the CLI draws indicatif bars; [`NoProgress`] ignores everything).

/// Receives progress events. Called from the thread running the flow.
pub trait Progress: Sync {
    /// The flow starts; `total` is the total work in bytes of output.
    fn start(&self, _total: u64) {}
    /// A tensor starts (`index` of `count`).
    fn tensor(&self, _name: &str, _index: usize, _count: usize) {}
    /// `bytes` more of the output are done.
    fn advance(&self, _bytes: u64) {}
    /// The flow ended (successfully or not).
    fn finish(&self) {}
}

/// Ignores progress.
pub struct NoProgress;

impl Progress for NoProgress {}

/// Runs `f` on a rayon pool of `threads` threads (all cores when `None`).
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
        b = b.num_threads(n);
    }
    let pool = b.build().map_err(|e| crate::Error::Threads {
        threads: threads.unwrap_or(0),
        reason: e.to_string(),
    })?;
    pool.install(f)
}
