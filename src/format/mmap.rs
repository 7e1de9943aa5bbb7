//! The one place that memory-maps a file.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::format::error::{FormatError, Result};

/// A read-only memory map of a whole file. Empty files map to an empty slice.
pub struct MappedFile {
    map: Option<Mmap>,
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
            return Ok(MappedFile { map: None });
        }
        // SAFETY: the map is read-only and lives as long as `MappedFile`. The invariant mmap needs
        // is that no one truncates or rewrites the file while it is mapped; ggmerge never writes
        // to its inputs (outputs go to a temporary file that is renamed, and writing onto an
        // input is refused), so only an outside process could break it — the same contract every
        // mmap-based model loader (llama.cpp included) has.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io("cannot memory-map", e))?;
        Ok(MappedFile { map: Some(map) })
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
            // (For private, writable mappings it would discard changes — this map is neither.)
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, part.len())
            };
        }
    }
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
}
