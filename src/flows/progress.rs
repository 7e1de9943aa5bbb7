//! The [`Progress`] callback of the flows (it lives in [`crate::progress`], which the runtime
//! and merge layers use too) and the thread-pool helper ([`crate::threads::with_threads`]).

pub use crate::progress::{NoProgress, Progress};
pub use crate::threads::with_threads;
