//! `extract` as a library call: a fine-tune → a sparse delta pack against its base
//! ([`crate::delta::extract`], format in [`crate::delta::pack`]).

use std::path::Path;

pub use crate::delta::extract::{ExtractOptions, ExtractReport, PACK_SPARSIFIERS};
use crate::error::Result;
use crate::progress::Progress;

/// Extracts `finetuned − base` as a sparse delta pack at `output`.
///
/// ```no_run
/// use ggmerge::flows::extract::{extract_delta, ExtractOptions};
/// use ggmerge::NoProgress;
///
/// let opts = ExtractOptions { density: 0.1, seed: 42, ..Default::default() };
/// let r = extract_delta("base.gguf".as_ref(), "math.gguf".as_ref(), "math.dpk.gguf".as_ref(), &opts, &NoProgress)?;
/// println!("pack is {:.1}% of the fine-tune", 100.0 * r.pack_bytes as f64 / r.finetuned_bytes as f64);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn extract_delta(
    base: &Path,
    finetuned: &Path,
    output: &Path,
    opts: &ExtractOptions,
    progress: &dyn Progress,
) -> Result<ExtractReport> {
    Ok(crate::delta::extract::extract(
        base, finetuned, output, opts, progress,
    )?)
}
