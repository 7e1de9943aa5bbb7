//! indicatif progress bars behind the library's `Progress` callback: one bar counts tensors
//! (with the current tensor's name), one counts output bytes (with throughput).

use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The two bars, created when the work starts.
pub struct Bars {
    bars: Mutex<Option<(MultiProgress, ProgressBar, ProgressBar)>>,
    quiet: bool,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars {
            bars: Mutex::new(None),
            quiet,
        }
    }

    fn with(&self, f: impl FnOnce(&ProgressBar, &ProgressBar)) {
        if let Ok(guard) = self.bars.lock() {
            if let Some((_, tensors, bytes)) = guard.as_ref() {
                f(tensors, bytes);
            }
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl ggmerge::Progress for Bars {
    fn start(&self, total: u64) {
        if self.quiet {
            return;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let tensors = multi.add(ProgressBar::new(0));
        tensors.set_style(style("{spinner} tensors {pos:>4}/{len:4} {wide_msg}"));
        let bytes = multi.add(ProgressBar::new(total));
        bytes.set_style(style(
            "  [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ));
        if let Ok(mut g) = self.bars.lock() {
            *g = Some((multi, tensors, bytes));
        }
    }

    fn tensor(&self, name: &str, index: usize, count: usize) {
        self.with(|t, _| {
            t.set_length(count as u64);
            t.set_position(index as u64 + 1);
            t.set_message(name.to_string());
        });
    }

    fn advance(&self, bytes: u64) {
        self.with(|_, b| b.inc(bytes));
    }

    fn finish(&self) {
        self.with(|t, b| {
            t.finish_and_clear();
            b.finish_and_clear();
        });
    }
}
