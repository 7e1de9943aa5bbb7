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
}
