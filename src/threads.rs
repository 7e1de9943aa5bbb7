//! How many threads a run may use: `-t` values above what the machine can use are lowered
//! (a request for 100 000 threads would otherwise start them all, as rayon and llama.cpp do).
//! Used by every layer that starts threads; the CLI warns when it lowers a request.

/// Threads allowed per core: enough for any reasonable oversubscription, far below what makes
/// a machine unusable.
pub const PER_CORE: usize = 4;

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
