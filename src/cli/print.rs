//! Human-readable output of the commands.

use std::path::Path;

use ggmerge::quant::Target;

use super::outln;
use ggmerge::{ModelSummary, QuantizeReport};

pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn summary(s: &ModelSummary, tensors: bool, all_metadata: bool) {
    outln!("file:          {}", s.files.join(", "));
    outln!("GGUF version:  {}", s.gguf_version);
    if let Some(kind) = &s.file_kind {
        outln!("kind:          {kind}");
    }
    outln!(
        "architecture:  {}",
        s.architecture.as_deref().unwrap_or("(none)")
    );
    if let Some(name) = &s.name {
        outln!("name:          {name}");
    }
    outln!(
        "parameters:    {} ({})",
        human_count(s.n_params),
        s.n_params
    );
    outln!(
        "size:          {} on disk, {} of tensors, {:.2} bits/weight",
        mib(s.file_size),
        mib(s.tensor_bytes),
        s.bits_per_weight
    );
    outln!("tensors:       {}", s.tensors.len());
    outln!();
    outln!(
        "{:<8} {:>8} {:>14} {:>12} {:>6}",
        "type",
        "tensors",
        "parameters",
        "size",
        "bpw"
    );
    for t in &s.types {
        outln!(
            "{:<8} {:>8} {:>14} {:>12} {:>6.2}",
            t.ty,
            t.tensors,
            t.params,
            mib(t.bytes),
            t.bits_per_weight
        );
    }
    outln!();
    outln!("metadata ({} keys):", s.metadata.len());
    for m in &s.metadata {
        let hidden =
            !all_metadata && m.key.starts_with("tokenizer.") && m.value_type.starts_with("array");
        let long = !all_metadata && m.value.chars().count() > 100;
        let value = if hidden {
            let n = m
                .value
                .rsplit("… ")
                .next()
                .unwrap_or("")
                .trim_end_matches(']');
            format!(
                "({}; --metadata shows it)",
                if n.ends_with("items") { n } else { "array" }
            )
        } else if long {
            let cut: String = m.value.chars().take(97).collect();
            format!("{cut}…")
        } else {
            m.value.clone()
        };
        outln!("  {:<45} {:<14} {}", m.key, m.value_type, value);
    }
    if let Some(p) = &s.pack {
        let kept: u64 = p.tensors.iter().map(|t| t.1).sum();
        outln!();
        outln!(
            "delta pack:    {} at density {}, {} mask (seed {}, stream {}), {} values",
            p.method,
            p.density,
            p.mask,
            p.seed,
            p.stream,
            p.values
        );
        outln!("base:          fingerprint {}", p.base_fingerprint);
        match &p.checksum {
            Some(c) => outln!("checksum:      verified ({c})"),
            None => outln!("checksum:      none (written by an older ggmerge; not verified)"),
        }
        outln!(
            "changed:       {} tensors, {kept} kept values",
            p.tensors.len()
        );
        if tensors {
            outln!();
            outln!("{:<40} {:>12}", "changed tensor", "kept");
            for (name, k) in &p.tensors {
                outln!("{name:<40} {k:>12}");
            }
            return;
        }
    }
    if tensors {
        outln!();
        outln!(
            "{:<40} {:<8} {:>22} {:>12}",
            "tensor",
            "type",
            "shape",
            "size"
        );
        for t in &s.tensors {
            let shape = t
                .shape
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" x ");
            outln!(
                "{:<40} {:<8} {:>22} {:>12}",
                t.name,
                t.ty,
                shape,
                mib(t.bytes)
            );
        }
    } else {
        outln!();
        outln!(
            "({} tensors; --tensors lists them, --json prints everything)",
            s.tensors.len()
        );
    }
}

pub fn quantize_report(r: &QuantizeReport, output: &Path, target: &Target) {
    if r.requantized > 0 {
        eprintln!(
            "warning: {} tensors were already quantized and were requantized to {}: rounding \
             error compounds; start from an F16/BF16/F32 model when you have one",
            r.requantized,
            target.describe()
        );
    }
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &r.tensors {
        *counts.entry(t.to.to_string()).or_default() += 1;
    }
    let types = counts
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    outln!("wrote {} ({})", output.display(), target.describe());
    outln!(
        "  tensors:    {} ({} converted, {} copied) — {types}",
        r.tensors.len(),
        r.converted(),
        r.tensors.len() - r.converted()
    );
    outln!(
        "  size:       {} -> {} ({:.1}%)",
        mib(r.input_bytes),
        mib(r.output_bytes),
        100.0 * r.output_bytes as f64 / r.input_bytes.max(1) as f64
    );
    outln!(
        "  time:       {:.2} s, {:.1} MB/s of output",
        r.seconds,
        r.output_bytes as f64 / 1e6 / r.seconds.max(1e-9)
    );
}

pub fn merge_plan(p: &ggmerge::flows::merge::MergePlan) {
    use ggmerge::flows::merge::TensorAction;
    outln!("method:   {} (seed {})", p.method_name, p.seed);
    outln!("base:     {}", p.reference().path().display());
    for (i, m) in p.models().iter().enumerate() {
        outln!("model {i}:  {}", m.path().display());
    }
    outln!();
    outln!(
        "{:<40} {:<8} {:<8} {:<10} params (weight/density per model)",
        "tensor",
        "base",
        "output",
        "action"
    );
    for t in &p.tensors {
        let action = match t.action {
            TensorAction::Copy => "copy",
            TensorAction::Requantize => "requant",
            TensorAction::Merge => "merge",
        };
        let params = t
            .params
            .iter()
            .map(|m| format!("{}/{}", m.weight, m.density))
            .collect::<Vec<_>>()
            .join(" ");
        outln!(
            "{:<40} {:<8} {:<8} {:<10} {params}",
            t.name,
            t.base_ty.to_string(),
            t.out_ty.to_string(),
            action
        );
    }
    let merged = p
        .tensors
        .iter()
        .filter(|t| t.action == TensorAction::Merge)
        .count();
    outln!();
    outln!(
        "{} tensors: {merged} merged, {} copied or requantized",
        p.tensors.len(),
        p.tensors.len() - merged
    );
    outln!("estimated output size: {}", mib(p.output_bytes));
    outln!(
        "estimated peak memory: {} (plus memory-mapped inputs)",
        mib(p.peak_memory)
    );
}

pub fn merge_report(r: &ggmerge::flows::merge::MergeReport, method: &str) {
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let d = &r.destination;
    match d.is_dir {
        true => outln!(
            "wrote {} ({}: {}, config.json; {method})",
            d.named.display(),
            d.describe(),
            d.file
                .file_name()
                .map_or(String::new(), |f| f.to_string_lossy().into_owned())
        ),
        false => outln!("wrote {} ({}, {method})", d.named.display(), d.describe()),
    }
    outln!(
        "  tensors:    {} ({} merged, {} copied verbatim)",
        r.tensors,
        r.merged,
        r.copied
    );
    for (i, m) in r.models.iter().enumerate() {
        let snr = m
            .signal_to_noise
            .map_or("n/a".to_string(), |s| format!("{s:.1}"));
        outln!(
            "  model {i}:    kept {:.1}% of delta, zero deltas {:.1}%, delta RMS {:.2e}, delta/noise {snr} — {}",
            100.0 * m.kept_share,
            100.0 * m.zero_delta_share,
            m.delta_rms,
            m.path
        );
    }
    for t in &r.retention {
        outln!(
            "  retention:  {} keeps {:.1}% of the merged delta ({} tensors)",
            t.ty,
            100.0 * t.retention,
            t.tensors
        );
    }
    requant_report(r);
    outln!(
        "  size:       {}, time {:.2} s, {:.1} MB/s",
        mib(r.output_bytes),
        r.seconds,
        r.output_bytes as f64 / 1e6 / r.seconds.max(1e-9)
    );
}

/// The requantization lines of a merge summary: the mode, and on the grid what happened to
/// the blocks, which types had no grid (said once) and how many tensors changed type.
fn requant_report(r: &ggmerge::flows::merge::MergeReport) {
    let Some(g) = &r.grid else {
        outln!("  requant:    {}", r.requant);
        return;
    };
    let b = &g.blocks;
    outln!(
        "  requant:    {} — {} tensors on the base's grid: {} blocks unchanged, {} moved, {} out of \
         the grid's range (requantized in full)",
        r.requant,
        g.tensors,
        b.kept,
        b.moved,
        b.fallback
    );
    if !g.full_types.is_empty() {
        let types: Vec<String> = g
            .full_types
            .iter()
            .map(|(ty, n)| format!("{ty} ({n} tensors)"))
            .collect();
        outln!(
            "              no grid for {}: requantized in full",
            types.join(", ")
        );
    }
    if g.other_type_tensors > 0 {
        outln!(
            "              {} tensors change type (--type): quantized in full",
            g.other_type_tensors
        );
    }
}

pub fn convert_report(r: &ggmerge::ConvertReport) {
    for f in &r.outputs {
        outln!("wrote {}", f.display());
    }
    outln!("  tensors:    {} ({:?})", r.tensors, r.direction);
    if !r.skipped.is_empty() {
        outln!(
            "  skipped:    {} (no name in the output format)",
            r.skipped.join(", ")
        );
    }
    if !r.trimmed.is_empty() {
        outln!(
            "  trimmed:    {} (extra vocabulary rows dropped, as llama.cpp does)",
            r.trimmed.join(", ")
        );
    }
    outln!(
        "  size:       {} -> {}, {:.2} s",
        mib(r.input_bytes),
        mib(r.output_bytes),
        r.seconds
    );
}

pub fn extract_report(r: &ggmerge::flows::extract::ExtractReport, output: &Path) {
    if let Some(snr) = r.signal_to_noise {
        if snr < 2.0 {
            eprintln!(
                "warning: the fine-tune's delta (RMS {:.2e}) is comparable to the rounding noise of the base's \
                 quantization (ratio {snr:.2}): if it was trained from unquantized weights, much of the pack is rounding \
                 noise — extract against a higher-precision (F16/Q8_0) base if you can",
                r.delta_rms
            );
        }
    }
    outln!("wrote {}", output.display());
    outln!("  tensors:    {} changed of {}", r.changed, r.tensors);
    outln!(
        "  kept:       {} of {} delta values ({:.2}%)",
        r.kept,
        r.elements,
        100.0 * r.kept as f64 / r.elements.max(1) as f64
    );
    outln!(
        "  size:       {} vs {} for the fine-tune ({:.1}%, {:.3} bytes/parameter)",
        mib(r.pack_bytes),
        mib(r.finetuned_bytes),
        100.0 * r.pack_bytes as f64 / r.finetuned_bytes.max(1) as f64,
        r.pack_bytes as f64 / r.elements.max(1) as f64
    );
    let snr = r
        .signal_to_noise
        .map_or("n/a".to_string(), |s| format!("{s:.1}"));
    outln!(
        "  delta:      RMS {:.2e}, {:.1}% exactly zero, delta/noise {snr}",
        r.delta_rms,
        100.0 * r.zero_delta_share
    );
    outln!("  time:       {:.2} s", r.seconds);
}
