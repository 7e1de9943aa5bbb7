//! Which code path the merge's hot loops take: the explicit AVX2 kernels where the build has
//! AVX2 (`-C target-cpu=native`, see `.cargo/config.toml`), else portable loops — and, in
//! tests, the portable loops on request, so that both are checked against each other on the
//! same machine.

#[cfg(test)]
thread_local! {
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the AVX2 kernels run (where built): always, except in a test inside
/// [`with_portable`]`(true, …)`.
#[cfg_attr(
    not(all(target_arch = "x86_64", target_feature = "avx2")),
    allow(dead_code)
)]
#[inline(always)]
pub(crate) fn use_avx2() -> bool {
    #[cfg(test)]
    return !PORTABLE_ONLY.get();
    #[cfg(not(test))]
    true
}

/// Runs `f` on this thread with the portable loops only (`portable`) or the default paths.
#[cfg(test)]
pub(crate) fn with_portable<R>(portable: bool, f: impl FnOnce() -> R) -> R {
    PORTABLE_ONLY.set(portable);
    let r = f();
    PORTABLE_ONLY.set(false);
    r
}
