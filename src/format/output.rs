//! Output files: written to a temporary file next to the target and renamed into place only
//! when complete, so a failed or interrupted run never leaves a partial output; writing onto an
//! input is refused.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::format::error::{FormatError, Result};

/// A file being written. Dropping it without [`OutputFile::commit`] deletes the temporary file.
pub struct OutputFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
    written: u64,
}

/// Whether `a` and `b` name the same existing file (same device and inode on Unix).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

impl OutputFile {
    /// Starts writing `target`. Refuses when `target` is one of `inputs` (the same file under
    /// any name). The temporary file is `.NAME.ggmerge-PID.tmp` in the target's directory.
    pub fn create(target: &Path, inputs: &[&Path]) -> Result<OutputFile> {
        if let Some(input) = inputs.iter().find(|i| same_file(i, target)) {
            return Err(FormatError::Write {
                path: target.to_path_buf(),
                reason: format!(
                    "refusing to overwrite the input {}; choose another output path",
                    input.display()
                ),
            });
        }
        let name = target.file_name().ok_or_else(|| FormatError::Write {
            path: target.to_path_buf(),
            reason: "output path has no file name".into(),
        })?;
        let tmp = target.with_file_name(format!(
            ".{}.ggmerge-{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp).map_err(|source| FormatError::Io {
            path: target.to_path_buf(),
            what: "cannot create the temporary output file",
            source,
        })?;
        Ok(OutputFile {
            target: target.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            written: 0,
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| FormatError::Write {
            path: self.target.clone(),
            reason: "write after commit".into(),
        })?;
        w.write_all(bytes).map_err(|source| FormatError::Io {
            path: self.target.clone(),
            what: "cannot write (disk full?)",
            source,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends `n` zero bytes.
    pub fn write_zeros(&mut self, n: u64) -> Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..k])?;
            left -= k as u64;
        }
        Ok(())
    }

    /// Flushes, syncs and renames the temporary file onto the target.
    pub fn commit(mut self) -> Result<u64> {
        let io = |what, source| FormatError::Io {
            path: self.target.clone(),
            what,
            source,
        };
        let writer = self.writer.take().ok_or_else(|| FormatError::Write {
            path: self.target.clone(),
            reason: "committed twice".into(),
        })?;
        let file = writer
            .into_inner()
            .map_err(|e| io("cannot flush (disk full?)", e.into_error()))?;
        file.sync_all()
            .map_err(|e| io("cannot sync (disk full?)", e))?;
        drop(file);
        fs::rename(&self.tmp, &self.target)
            .map_err(|e| io("cannot rename the temporary file onto the output", e))?;
        Ok(self.written)
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
