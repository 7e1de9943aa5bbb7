//! Output files, written so that nothing but the named output is ever left behind.
//!
//! - [`OutputFile`]: a file written to a hidden temporary file next to the target
//!   (`.NAME.ggmerge-PID.tmp`) and renamed into place only when complete. Dropping it without
//!   [`OutputFile::commit`] — an error, a full disk at the last flush, a failed rename — deletes
//!   the temporary file. Writing onto an input, or onto anything that is not a regular file
//!   (`/dev/null`, a FIFO, a socket, a directory), is refused before any work. While it is
//!   written, the inputs it is made from are watched: an input that changes size or
//!   modification time (another process rewrote or truncated it) makes the output an error
//!   instead of a file built from a mix of old and new bytes.
//! - [`TempFile`]: a scratch file beside an output (same naming), deleted on drop.
//! - [`remove_temporary_files`]: what a Ctrl-C / SIGTERM handler calls before exiting: every
//!   temporary file of this process is deleted, and no rename can happen afterwards.
//! - Temporary files of a process that was killed (SIGKILL, power loss) cannot delete
//!   themselves: [`OutputFile::create`] removes stale ones of its own naming from the target's
//!   directory when the process that made them is gone.
//! - [`Destination`]: what an output path means — a GGUF file, a safetensors file, or a
//!   directory of safetensors files — decided from the path or an explicit [`FileFormat`],
//!   never guessed silently.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::format::error::{FormatError, Result};

/// Temporary files of this process that exist right now (created, not yet renamed or deleted).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The registry, even if a thread panicked while holding it (it is a plain list of paths).
fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(path: &Path) {
    live().retain(|p| p != path);
}

/// Deletes every temporary file this process is writing and keeps any output from being
/// renamed into place afterwards (the registry stays locked for the rest of the process).
/// Meant for a signal handler that exits right after (the `ggmerge` binary calls it on
/// SIGINT, SIGTERM and SIGHUP). Returns how many files were deleted.
pub fn remove_temporary_files() -> usize {
    let guard = live();
    let mut removed = 0;
    for p in guard.iter() {
        if fs::remove_file(p).is_ok() {
            removed += 1;
        }
    }
    // A commit waiting for the lock must never rename a file we just deleted the twin of, nor
    // one created after: the process is about to exit, so the lock is simply never released.
    std::mem::forget(guard);
    removed
}

/// The hidden temporary name for `target` with `tag` (`tmp`, `spill`): `.NAME.ggmerge-PID.tmp`
/// or `.NAME.ggmerge-TAG-PID.tmp`.
fn temp_path(target: &Path, tag: Option<&str>) -> Result<PathBuf> {
    let name = target.file_name().ok_or_else(|| FormatError::Write {
        path: target.to_path_buf(),
        reason: "output path has no file name".into(),
    })?;
    let pid = std::process::id();
    let name = name.to_string_lossy();
    Ok(target.with_file_name(match tag {
        None => format!(".{name}.ggmerge-{pid}.tmp"),
        Some(tag) => format!(".{name}.ggmerge-{tag}-{pid}.tmp"),
    }))
}

/// The PID in a temporary file name of ours (`.NAME.ggmerge-PID.tmp`,
/// `.NAME.ggmerge-TAG-PID.tmp`), if it is one.
fn temp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (_, tail) = rest.rsplit_once(".ggmerge-")?;
    let pid = tail.rsplit('-').next()?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` exists (on systems without `/proc`, every process is assumed alive,
/// so nothing is ever deleted by mistake).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    !proc_root.join("self").exists() || proc_root.join(pid.to_string()).exists()
}

/// Removes temporary files of ggmerge's naming in `dir` whose process is gone (left by a run
/// that was killed). Returns the files removed. Best effort: unreadable directories and files
/// that cannot be removed are skipped.
pub fn remove_stale_temporary_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_owner) else {
            continue;
        };
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && !process_alive(pid) && fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Refuses output paths that cannot take a finished file by rename: `-` (standard output),
/// and existing paths that are not regular files (devices such as `/dev/null`, FIFOs,
/// sockets, directories). A missing parent directory is an error too. Called before any
/// work, so a bad path costs nothing.
pub fn check_output_path(path: &Path) -> Result<()> {
    let refuse = |reason: String| {
        Err(FormatError::Write {
            path: path.to_path_buf(),
            reason,
        })
    };
    if path.as_os_str() == "-" {
        return refuse(
            "ggmerge writes models to files, not to standard output: name an output file \
             (merge --dry-run shows the plan without writing anything)"
                .into(),
        );
    }
    if path.as_os_str().is_empty() {
        return refuse("the output path is empty".into());
    }
    match fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(m) => {
            let kind = file_kind(&m);
            return refuse(format!(
                "exists and is {kind}, not a regular file: outputs are written to a temporary \
                 file and renamed over the target, which would replace it; name a regular file \
                 (merge --dry-run computes the plan without writing)"
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(FormatError::Io {
                path: path.to_path_buf(),
                what: "cannot examine the output path",
                source,
            })
        }
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return refuse(format!("the directory {} does not exist", parent.display()));
    }
    Ok(())
}

/// "a directory", "a character device" … for messages.
fn file_kind(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// The directory a file path lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Refuses an output that is one of `inputs` (the same file under any name): a flow calls it
/// before any work; [`OutputFile`] checks again when it creates the file.
pub fn refuse_inputs(output: &Path, inputs: &[&Path]) -> Result<()> {
    match inputs.iter().find(|i| same_file(i, output)) {
        Some(input) => Err(FormatError::Write {
            path: output.to_path_buf(),
            reason: format!(
                "refusing to overwrite the input {}; choose another output path",
                input.display()
            ),
        }),
        None => Ok(()),
    }
}

/// Whether `a` and `b` name the same existing file (same device and inode on Unix).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Size and modification time of an input when the output was started.
struct InputStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl InputStamp {
    fn take(path: &Path) -> Option<InputStamp> {
        let m = fs::metadata(path).ok()?;
        m.is_file().then(|| InputStamp {
            path: path.to_path_buf(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }

    /// An error if the file changed since the stamp was taken (or faulted while mapped).
    fn check(&self) -> Result<()> {
        let changed = |now: String| FormatError::InputChanged {
            path: self.path.clone(),
            detail: now,
        };
        if crate::format::mmap::faulted(&self.path) {
            return Err(changed(
                "reading its memory map failed (the file was truncated)".into(),
            ));
        }
        match fs::metadata(&self.path) {
            Ok(m) if m.len() != self.len => Err(changed(format!(
                "its size went from {} to {} bytes",
                self.len,
                m.len()
            ))),
            Ok(m) if m.modified().ok() != self.modified => Err(changed(
                "it was rewritten (its modification time changed)".into(),
            )),
            Ok(_) => Ok(()),
            Err(_) => Err(changed("it was deleted or renamed".into())),
        }
    }
}

/// A file being written. Dropping it without [`OutputFile::commit`] deletes the temporary file.
pub struct OutputFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
    written: u64,
    inputs: Vec<InputStamp>,
    /// Set once the temporary file is renamed onto the target (or known deleted).
    done: bool,
}

impl OutputFile {
    /// Starts writing `target`, the output the user named (an existing regular file there is
    /// replaced when the output is complete). Refuses a target that is one of `inputs` (the
    /// same file under any name) or not a regular file ([`check_output_path`]). The temporary
    /// file is `.NAME.ggmerge-PID.tmp` in the target's directory; stale ones of dead
    /// processes there are removed first.
    pub fn create(target: &Path, inputs: &[&Path]) -> Result<OutputFile> {
        Self::open(target, inputs)
    }

    /// Starts writing `target`, a file written *beside* the named output (`config.json`, a
    /// shard, an index): an existing file there is replaced only when `overwrite` is true
    /// (`--force`), otherwise it is an error naming the file.
    pub fn create_beside(target: &Path, inputs: &[&Path], overwrite: bool) -> Result<OutputFile> {
        if !overwrite && fs::symlink_metadata(target).is_ok() {
            return Err(FormatError::Write {
                path: target.to_path_buf(),
                reason: "exists already and is not the output you named; ggmerge does not \
                         replace other files without --force (or write to a new directory)"
                    .into(),
            });
        }
        Self::open(target, inputs)
    }

    fn open(target: &Path, inputs: &[&Path]) -> Result<OutputFile> {
        refuse_inputs(target, inputs)?;
        check_output_path(target)?;
        remove_stale_temporary_files(&parent_dir(target));
        // Stamped before the temporary file exists: a change from then on is seen.
        let stamps: Vec<InputStamp> = inputs.iter().filter_map(|p| InputStamp::take(p)).collect();
        let tmp = temp_path(target, None)?;
        let file = {
            // Registered before it exists, so an interrupt between the two still removes it.
            let mut reg = live();
            reg.push(tmp.clone());
            File::create(&tmp)
        };
        let file = file.map_err(|source| {
            forget(&tmp);
            FormatError::Io {
                path: target.to_path_buf(),
                what: "cannot create the temporary output file",
                source,
            }
        })?;
        Ok(OutputFile {
            target: target.to_path_buf(),
            tmp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            written: 0,
            inputs: stamps,
            done: false,
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

    /// An error if an input changed (size or modification time) or could not be read through
    /// its memory map since this output was started.
    pub fn check_inputs(&self) -> Result<()> {
        self.inputs.iter().try_for_each(InputStamp::check)
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let w = self.writer.as_mut().ok_or_else(|| FormatError::Write {
            path: self.target.clone(),
            reason: "write after commit".into(),
        })?;
        if let Err(source) = w.write_all(bytes) {
            // Bytes handed straight from an input's memory map (streamed copies) fail in the
            // kernel with EFAULT, not SIGBUS, when that input shrank meanwhile: then the input
            // is the culprit, not the disk.
            self.check_inputs()?;
            return Err(FormatError::Io {
                path: self.target.clone(),
                what: "cannot write (is the disk full?)",
                source,
            });
        }
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

    /// Flushes and syncs the temporary file, checks the inputs are unchanged, and renames it
    /// onto the target. On any error the temporary file is deleted (when `self` drops).
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
            .map_err(|e| io("cannot flush (is the disk full?)", e.into_error()))?;
        file.sync_all()
            .map_err(|e| io("cannot sync (is the disk full?)", e))?;
        drop(file);
        self.check_inputs()?;
        // Renamed under the registry's lock: an interrupt handler either deletes the temporary
        // file before (and the rename fails), or finds it already renamed and forgotten.
        let mut reg = live();
        fs::rename(&self.tmp, &self.target)
            .map_err(|e| io("cannot rename the temporary file onto the output", e))?;
        reg.retain(|p| p != &self.tmp);
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.done {
            drop(self.writer.take());
            let _ = fs::remove_file(&self.tmp);
            forget(&self.tmp);
        }
    }
}

/// A scratch file beside an output (`.NAME.ggmerge-TAG-PID.tmp`), registered like an output's
/// temporary file: deleted on drop, on an interrupt, or by a later run if this process is
/// killed.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Creates the scratch file for `output` tagged `tag` (letters only), truncating any file
    /// of that name; returns it and the open file.
    pub fn create(output: &Path, tag: &str) -> Result<(TempFile, File)> {
        let path = temp_path(output, Some(tag))?;
        live().push(path.clone());
        let temp = TempFile { path };
        let file = File::create(&temp.path).map_err(|source| FormatError::Io {
            path: temp.path.clone(),
            what: "cannot create a temporary file",
            source,
        })?;
        Ok((temp, file))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        forget(&self.path);
    }
}

/// An output file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// GGUF.
    Gguf,
    /// safetensors (with Hugging Face names and a `config.json`).
    Safetensors,
}

impl FileFormat {
    /// `GGUF` / `safetensors`.
    pub fn name(self) -> &'static str {
        match self {
            FileFormat::Gguf => "GGUF",
            FileFormat::Safetensors => "safetensors",
        }
    }

    /// Parses `gguf` or `safetensors` (any case).
    pub fn from_name(name: &str) -> Option<FileFormat> {
        match name.to_ascii_lowercase().as_str() {
            "gguf" => Some(FileFormat::Gguf),
            "safetensors" | "st" => Some(FileFormat::Safetensors),
            _ => None,
        }
    }
}

/// Where an output goes, decided by [`Destination::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The format written.
    pub format: FileFormat,
    /// The path the user named.
    pub named: PathBuf,
    /// The main file: the GGUF file, or the safetensors weights (`DIR/model.safetensors` for a
    /// directory output; shards are named after it).
    pub file: PathBuf,
    /// The directory that gets `config.json` (safetensors only).
    pub dir: PathBuf,
    /// Whether the named output is a directory (every file in it is then written beside it).
    pub is_dir: bool,
}

impl Destination {
    /// What `path` means as an output:
    ///
    /// - `*.gguf` → a GGUF file; `*.safetensors` → a safetensors file (with `config.json`
    ///   beside it); any other existing directory, or a path ending in `/` → a directory that
    ///   gets `model.safetensors` (or shards and an index) and `config.json`.
    /// - `format` (`--format`) overrides the extension: GGUF goes to `path` as a file whatever
    ///   its name; safetensors goes to `path` as a file if it ends in `.safetensors`, else into
    ///   `path` as a directory.
    /// - Anything else is an error asking for a `.gguf`/`.safetensors` name or `--format`.
    ///
    /// Nothing is created here.
    pub fn resolve(path: &Path, format: Option<FileFormat>) -> Result<Destination> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let text = path.as_os_str().to_string_lossy();
        let looks_like_dir = path.is_dir() || text.ends_with('/') || text.ends_with("/.");
        let format = match (format, ext.as_deref()) {
            (Some(f), _) => f,
            (None, Some("gguf")) => FileFormat::Gguf,
            (None, Some("safetensors")) => FileFormat::Safetensors,
            (None, _) if looks_like_dir => FileFormat::Safetensors,
            (None, _) => {
                return Err(FormatError::Write {
                    path: path.to_path_buf(),
                    reason: "cannot tell which format to write: name the output *.gguf or \
                             *.safetensors, give a directory (ending in /) for Hugging Face \
                             safetensors, or pass --format gguf|safetensors"
                        .into(),
                })
            }
        };
        let dest = |file: PathBuf, dir: PathBuf, is_dir| Destination {
            format,
            named: path.to_path_buf(),
            file,
            dir,
            is_dir,
        };
        Ok(match format {
            FileFormat::Gguf => {
                if looks_like_dir {
                    return Err(FormatError::Write {
                        path: path.to_path_buf(),
                        reason: "is a directory: a GGUF output is one file; name it (e.g. \
                                 merged.gguf)"
                            .into(),
                    });
                }
                dest(path.to_path_buf(), parent_dir(path), false)
            }
            // (An existing directory of that name is refused when checked.)
            FileFormat::Safetensors if ext.as_deref() == Some("safetensors") => {
                dest(path.to_path_buf(), parent_dir(path), false)
            }
            FileFormat::Safetensors => dest(
                path.join(crate::format::safetensors::SINGLE_FILE),
                path.to_path_buf(),
                true,
            ),
        })
    }

    /// "GGUF file", "safetensors file", "safetensors directory" — for summaries.
    pub fn describe(&self) -> String {
        match (self.format, self.is_dir) {
            (f, false) => format!("{} file", f.name()),
            (f, true) => format!("{} directory", f.name()),
        }
    }

    /// Checks, before any work, that the destination can be written: the main file's path
    /// ([`check_output_path`]; a directory output may exist or will be created), and that the
    /// files written beside it (`config.json`; for a directory output also its weights file)
    /// do not exist unless `force`.
    pub fn check(&self, force: bool) -> Result<()> {
        let exists = match fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => true,
            Ok(m) if self.is_dir => {
                return Err(FormatError::Write {
                    path: self.dir.clone(),
                    reason: format!(
                        "exists and is {}: a safetensors directory output needs a directory",
                        file_kind(&m)
                    ),
                })
            }
            _ => false,
        };
        if !self.is_dir || exists {
            check_output_path(&self.file)?;
        }
        if self.format == FileFormat::Safetensors && !force {
            let mut beside = vec![self.dir.join(crate::format::safetensors::CONFIG_FILE)];
            if self.is_dir {
                beside.push(self.file.clone());
            }
            if let Some(p) = beside.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
                return Err(FormatError::Write {
                    path: p.clone(),
                    reason: "exists already and is not the output you named; ggmerge does not \
                             replace other files without --force (or write to a new directory)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// [`Destination::check`], then creates a missing output directory (with its missing
    /// parents). Returns a guard that removes the directories created here if the output is
    /// never completed.
    pub fn prepare(&self, force: bool) -> Result<CreatedDir> {
        self.check(force)?;
        if !self.is_dir {
            return Ok(CreatedDir(None));
        }
        match fs::metadata(&self.dir) {
            Ok(_) => Ok(CreatedDir(None)),
            Err(_) => {
                // The outermost missing ancestor, to remove on failure.
                let mut first_new = self.dir.clone();
                while let Some(p) = first_new.parent() {
                    if p.as_os_str().is_empty() || p.exists() {
                        break;
                    }
                    first_new = p.to_path_buf();
                }
                fs::create_dir_all(&self.dir).map_err(|source| FormatError::Io {
                    path: self.dir.clone(),
                    what: "cannot create the output directory",
                    source,
                })?;
                Ok(CreatedDir(Some(first_new)))
            }
        }
    }
}

/// A directory created for an output: removed on drop (if still empty) unless
/// [`CreatedDir::keep`] was called.
#[must_use = "dropping it removes the directory it created"]
pub struct CreatedDir(Option<PathBuf>);

impl CreatedDir {
    /// The output is complete: keep the directory.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            // Only empty directories go (remove_dir refuses others); nested ones bottom-up.
            let mut removed_any = true;
            while removed_any {
                removed_any = false;
                for entry in walk_dirs(&dir).into_iter().rev() {
                    removed_any |= fs::remove_dir(&entry).is_ok();
                }
            }
        }
    }
}

/// `dir` and every directory under it, parents before children.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_parse_back_to_their_pid() {
        let t = temp_path(Path::new("/x/merged.gguf"), None).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_owner(name), Some(std::process::id()));
        let s = temp_path(Path::new("a.dpk.gguf"), Some("spill")).unwrap();
        assert_eq!(
            temp_owner(s.file_name().unwrap().to_str().unwrap()),
            Some(std::process::id())
        );
        for other in [
            "merged.gguf",
            ".merged.gguf.tmp",
            ".x.ggmerge-.tmp",
            ".x.ggmerge-12a.tmp",
            "x.ggmerge-12.tmp",
        ] {
            assert_eq!(temp_owner(other), None, "{other}");
        }
    }

    #[test]
    fn stale_temporary_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // PID 0x7fff_fff0 does not exist on Linux (pid_max is at most 2^22).
        let dead = dir.path().join(".m.gguf.ggmerge-2147483632.tmp");
        let dead_spill = dir.path().join(".p.dpk.gguf.ggmerge-spill-2147483632.tmp");
        let ours = temp_path(&dir.path().join("n.gguf"), None).unwrap();
        let unrelated = dir.path().join(".m.gguf.tmp");
        for p in [&dead, &dead_spill, &ours, &unrelated] {
            fs::write(p, b"x").unwrap();
        }
        let removed = remove_stale_temporary_files(dir.path());
        assert_eq!(removed.len(), 2);
        assert!(!dead.exists() && !dead_spill.exists());
        assert!(ours.exists() && unrelated.exists());
    }

    #[test]
    fn a_write_from_a_shrunk_input_map_names_the_input() {
        // Streamed copies hand an input's mapped bytes straight to write(2); if the input
        // shrank, the kernel fails the copy with EFAULT (no SIGBUS in user space): the error
        // must name the input, not a full disk.
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.bin");
        fs::write(&input, vec![7u8; 4 << 20]).unwrap();
        let map = crate::format::mmap::MappedFile::open(&input).unwrap();
        let mut out = OutputFile::create(&dir.path().join("out.bin"), &[&input]).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&input)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // 2 MiB past the new end: more than the 1 MiB buffer, so written from the map itself.
        let err = out.write_all(&map.bytes()[1 << 20..3 << 20]).unwrap_err();
        assert!(matches!(err, FormatError::InputChanged { .. }), "{err}");
        assert!(err.to_string().contains("in.bin"), "{err}");
    }

    #[test]
    fn failed_commit_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.gguf");
        let mut out = OutputFile::create(&target, &[]).unwrap();
        out.write_all(b"data").unwrap();
        // The target turns into a directory after the checks: the rename fails.
        fs::create_dir(&target).unwrap();
        assert!(out.commit().is_err());
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the directory remains: {left:?}");
        assert!(live().is_empty() || !live().iter().any(|p| p.starts_with(dir.path())));
    }

    #[test]
    fn non_regular_outputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_path(dir.path()).is_err());
        assert!(check_output_path(Path::new("-")).is_err());
        assert!(check_output_path(&dir.path().join("missing/x.gguf")).is_err());
        #[cfg(unix)]
        {
            let e = check_output_path(Path::new("/dev/null")).unwrap_err();
            assert!(e.to_string().contains("character device"), "{e}");
        }
        assert!(check_output_path(&dir.path().join("new.gguf")).is_ok());
    }

    #[test]
    fn destinations_follow_the_name_or_the_explicit_format() {
        let r = |p: &str, f| Destination::resolve(Path::new(p), f);
        assert_eq!(r("a/m.gguf", None).unwrap().format, FileFormat::Gguf);
        let st = r("a/m.safetensors", None).unwrap();
        assert_eq!((st.format, st.is_dir), (FileFormat::Safetensors, false));
        assert_eq!(st.dir, PathBuf::from("a"));
        let d = r("a/hf/", None).unwrap();
        assert_eq!((d.format, d.is_dir), (FileFormat::Safetensors, true));
        assert_eq!(d.file, Path::new("a/hf/").join("model.safetensors"));
        let e = r("a/merged", None).unwrap_err().to_string();
        assert!(e.contains("--format"), "{e}");
        assert_eq!(
            r("a/merged", Some(FileFormat::Gguf)).unwrap().file,
            PathBuf::from("a/merged")
        );
        assert!(r("a/merged", Some(FileFormat::Safetensors)).unwrap().is_dir);
        assert!(r("a/hf/", Some(FileFormat::Gguf)).is_err());
        // The extension wins over an existing directory of that name (refused when checked).
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("x.gguf");
        fs::create_dir(&d).unwrap();
        let x = Destination::resolve(&d, None);
        assert!(x.is_err() || x.unwrap().check(false).is_err());
    }

    #[test]
    fn created_directories_go_away_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = Destination::resolve(&dir.path().join("x/y/"), None).unwrap();
        drop(d.prepare(false).unwrap());
        assert!(!dir.path().join("x").exists());
        d.prepare(false).unwrap().keep();
        assert!(dir.path().join("x/y").is_dir());
    }
}
