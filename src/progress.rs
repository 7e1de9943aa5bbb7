//! Progress reporting from long operations (flows and the runtime). The library never prints: it calls a [`Progress`]
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
