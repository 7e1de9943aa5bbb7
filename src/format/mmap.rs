//! The one place that memory-maps a file, and the guard that keeps a truncated input from
//! killing the process.
//!
//! A memory-mapped file that another process truncates while it is read makes the next access
//! to a page past the new end raise SIGBUS, which kills the process (exit 135, no message, a
//! temporary output left behind). ggmerge reads its inputs through maps (zero-copy, and pages
//! are released as a merge goes), so it installs a SIGBUS handler once, on the first map:
//!
//! - a fault inside one of ggmerge's live maps replaces the faulting page with a page of zeros
//!   (`mmap(MAP_FIXED | MAP_ANONYMOUS)`), marks that map as faulted, and lets the read go on;
//! - a fault anywhere else restores the previous handler (by default: terminate), so real bugs
//!   still crash as before.
//!
//! Zeros are never written out as if they were data: [`crate::format::output::OutputFile`]
//! checks, after each tensor and before renaming the output into place, that no input faulted
//! and that no input changed size or modification time — the output is then an error naming
//! the input ([`FormatError::InputChanged`]). The runtime's packs check the same way after each
//! mixture. The handler costs nothing while no fault happens (it is not on any read path);
//! reading inputs with `pread` instead would have cost a copy of every input byte.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::Mmap;

use crate::format::error::{FormatError, Result};

/// Maps watched by the SIGBUS handler at once; a map opened while all are taken is simply not
/// watched (a truncation then crashes as it would without the guard).
const SLOTS: usize = 256;

/// One watched map: its address range (len 0 = free) and whether a fault hit it.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static WATCHED: [Slot; SLOTS] = [FREE; SLOTS];
/// Slot claims (the handler reads only the atomics above, never this lock).
static CLAIMED: Mutex<[bool; SLOTS]> = Mutex::new([false; SLOTS]);
/// Paths of live maps by slot, for [`faulted`].
static PATHS: Mutex<Vec<(usize, PathBuf)>> = Mutex::new(Vec::new());

/// Whether a live map of `path` hit a SIGBUS (the file shrank under it).
pub fn faulted(path: &Path) -> bool {
    let paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    paths
        .iter()
        .any(|(slot, p)| p == path && WATCHED[*slot].faulted.load(Ordering::Acquire))
}

/// A read-only memory map of a whole file. Empty files map to an empty slice.
pub struct MappedFile {
    map: Option<Mmap>,
    slot: Option<usize>,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<MappedFile> {
        let io = |what, source| FormatError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        let file = File::open(path).map_err(|e| io("cannot open", e))?;
        let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
        if len == 0 {
            return Ok(MappedFile {
                map: None,
                slot: None,
            });
        }
        // SAFETY: the map is read-only and lives as long as `MappedFile`. The invariant mmap needs
        // is that no one truncates or rewrites the file while it is mapped; ggmerge never writes
        // to its inputs (outputs go to a temporary file that is renamed, and writing onto an
        // input is refused). An outside process that truncates it anyway makes reads past the
        // new end fault: the SIGBUS guard below turns that into zeros plus a flag, and every
        // output checks the flag (and the file's size and time) before it is committed.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io("cannot memory-map", e))?;
        let slot = sigbus::watch(map.as_ptr() as usize, map.len());
        if let Some(s) = slot {
            let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
            paths.push((s, path.to_path_buf()));
        }
        Ok(MappedFile {
            map: Some(map),
            slot,
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Tells the kernel that the pages under `part` (a slice of [`bytes`](Self::bytes)) are
    /// not needed for now: they leave this process's resident set (the file's pages stay in the
    /// page cache, and reading `part` again maps them back in). A merge calls this for each
    /// input tensor once it is merged, so the process's RSS stays near one tensor's inputs
    /// instead of growing to the size of every input. Best effort: a slice outside the map or
    /// a refusal by the kernel is ignored. The range is widened to whole pages, so a neighbor
    /// may lose a page too — it is read back on its next access.
    pub fn release(&self, part: &[u8]) {
        // Nothing to gain below a page.
        if part.len() < 4096 {
            return;
        }
        let (Some(map), false) = (&self.map, part.is_empty()) else {
            return;
        };
        let base = map.as_ptr() as usize;
        let Some(offset) = (part.as_ptr() as usize).checked_sub(base) else {
            return;
        };
        if offset + part.len() > map.len() {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: `MADV_DONTNEED` on a read-only, shared file mapping only drops page-table
            // entries; the next access faults the same file bytes back in from the page cache
            // (or disk), so every `&[u8]` borrowed from the map keeps reading the same values.
            // (For private, writable mappings it would discard changes — this map is neither;
            // a page the SIGBUS guard replaced reads back as zeros again, and is flagged.)
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, part.len())
            };
        }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            // Unwatched before the map goes (the map field drops after this body).
            PATHS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(slot, _)| *slot != s);
            sigbus::unwatch(s);
        }
    }
}

#[cfg(all(unix, not(miri)))]
mod sigbus {
    //! The SIGBUS handler. Invariants: the handler touches only `WATCHED` (atomics), `PAGE`
    //! and `PREVIOUS` (written once before the handler is installed), and calls only `mmap`
    //! and `sigaction` — no allocation, no locks.

    use std::sync::atomic::Ordering;
    use std::sync::Once;

    use super::{CLAIMED, SLOTS, WATCHED};

    static INSTALL: Once = Once::new();
    static PAGE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);
    /// The handler that was installed before ours (restored for faults outside our maps).
    static mut PREVIOUS: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::zeroed();
    static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for slot in WATCHED.iter() {
            let len = slot.len.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Acquire);
            if len == 0 || addr < start || addr >= start + len {
                continue;
            }
            let at = addr & !(page - 1);
            // SAFETY: `at` is a page inside a live read-only map of ours (the slot is cleared
            // before the map is unmapped, and no reader outlives the map); replacing that page
            // with zeros changes what the faulting read sees from "crash" to "zeros", which the
            // fault flag reports before anything read is used as output.
            let r = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
            break;
        }
        // Not ours (or the page could not be replaced): the previous behaviour, by returning
        // into the faulting instruction with the previous handler back in place.
        // SAFETY: PREVIOUS was written before our handler was installed and never after.
        unsafe {
            libc::sigaction(
                libc::SIGBUS,
                std::ptr::addr_of!(PREVIOUS).cast::<libc::sigaction>(),
                std::ptr::null_mut(),
            );
        }
    }

    fn install() {
        INSTALL.call_once(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            // SAFETY: a zeroed sigaction is a valid value to fill; PREVIOUS is written here,
            // once, before the handler that reads it exists.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut action.sa_mask);
                let ok = libc::sigaction(
                    libc::SIGBUS,
                    &action,
                    std::ptr::addr_of_mut!(PREVIOUS).cast::<libc::sigaction>(),
                ) == 0;
                INSTALLED.store(ok, Ordering::Release);
            }
        });
    }

    /// Watches `len` bytes at `start`; `None` when no slot is free or no handler could be
    /// installed.
    pub(super) fn watch(start: usize, len: usize) -> Option<usize> {
        install();
        if !INSTALLED.load(Ordering::Acquire) {
            return None;
        }
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        let s = (0..SLOTS).find(|&s| !claimed[s])?;
        claimed[s] = true;
        WATCHED[s].faulted.store(false, Ordering::Release);
        WATCHED[s].start.store(start, Ordering::Release);
        WATCHED[s].len.store(len, Ordering::Release);
        Some(s)
    }

    pub(super) fn unwatch(s: usize) {
        WATCHED[s].len.store(0, Ordering::Release);
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        claimed[s] = false;
    }
}

#[cfg(not(all(unix, not(miri))))]
mod sigbus {
    pub(super) fn watch(_start: usize, _len: usize) -> Option<usize> {
        None
    }
    pub(super) fn unwatch(_s: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let data: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let map = MappedFile::open(&path).unwrap();
        assert_eq!(map.bytes(), &data[..]);
        // Unaligned, whole, empty and foreign slices: all accepted, none changes what is read.
        map.release(&map.bytes()[100..9000]);
        map.release(map.bytes());
        map.release(&map.bytes()[5..5]);
        map.release(&data[..]);
        assert_eq!(map.bytes(), &data[..]);
    }

    #[cfg(unix)]
    #[test]
    fn a_file_truncated_under_its_map_reads_zeros_and_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let data = vec![7u8; 5 * 4096];
        std::fs::write(&path, &data).unwrap();
        let map = MappedFile::open(&path).unwrap();
        assert!(!faulted(&path));
        // Another process truncating the file: pages past the end are gone.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let tail: u64 = map.bytes()[3 * 4096..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0, "the vanished pages read as zeros");
        assert!(faulted(&path));
        assert_eq!(map.bytes()[0], 7, "pages still in the file read as before");
        drop(map);
        assert!(!faulted(&path));
    }
}
