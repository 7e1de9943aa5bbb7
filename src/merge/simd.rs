//! Which code path the merge's hot loops take, chosen at run time: the explicit AVX2 kernels
//! (the `avx2` submodules of `mask`, `kernel` and `measure`) where the CPU running the program
//! has AVX2, else portable loops — and, in tests, the portable loops on request, so that both
//! are checked against each other on the same machine.
//!
//! The kernels do not depend on the flags the crate was compiled with: they are
//! `#[target_feature(enable = "avx2")]` functions (`"avx2,popcnt"` where they count compare
//! masks with `count_ones`), compiled for AVX2 in every x86-64 build (with or without
//! `-C target-cpu=…`), and they run only after [`Avx2::get`] found the CPU has AVX2 and POPCNT
//! (every AVX2 CPU has both), detected once per process. They use no FMA (a fused multiply-add
//! rounds once, which would change results) and no F16C. A build for another architecture has
//! neither this type nor the kernels.
//!
//! [`Avx2`] is the proof of that check: each kernel's safe entry point takes one, and its
//! `unsafe` call of the `#[target_feature]` body rests on it — one `unsafe` per kernel, and no
//! caller can reach AVX2 instructions on a CPU without them.

#[cfg(test)]
thread_local! {
    static PORTABLE_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Proof that the CPU running this process has AVX2 and POPCNT: only [`Avx2::get`] makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The proof where the CPU has AVX2 and POPCNT, else `None` — and `None` in a test inside
    /// [`with_portable`]`(true, …)`.
    ///
    /// Detected on the first call (`is_x86_feature_detected!`), then a load of the cached
    /// answer; a build that enables both at compile time (`-C target-cpu=…`) knows it already.
    #[inline]
    pub(crate) fn get() -> Option<Avx2> {
        #[cfg(test)]
        if PORTABLE_ONLY.get() {
            return None;
        }
        detected().then_some(Avx2(()))
    }
}

/// Whether the CPU has AVX2 and POPCNT, detected once per process.
#[cfg(target_arch = "x86_64")]
#[inline]
fn detected() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    cfg!(all(target_feature = "avx2", target_feature = "popcnt"))
        || *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("popcnt")
        })
}

/// Runs `f` on this thread with the portable loops only (`portable`) or the default paths.
#[cfg(test)]
pub(crate) fn with_portable<R>(portable: bool, f: impl FnOnce() -> R) -> R {
    PORTABLE_ONLY.set(portable);
    let r = f();
    PORTABLE_ONLY.set(false);
    r
}

#[cfg(test)]
mod tests {
    /// The AVX2 kernels run in these tests wherever the CPU has AVX2 — whatever the build's
    /// flags — so the bit-identity tests of the parent modules check them there.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_detected_at_run_time() {
        use super::{with_portable, Avx2};
        let cpu = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt");
        assert_eq!(Avx2::get().is_some(), cpu);
        assert!(with_portable(true, Avx2::get).is_none());
        assert_eq!(with_portable(false, Avx2::get).is_some(), cpu);
    }
}
