//! indicatif progress bars behind the library's `Progress` callback.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One overall bar (bytes of output) whose message names the current tensor.
pub struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars {
            bar: Mutex::new(None),
            quiet,
        }
    }

    fn with(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(guard) = self.bar.lock() {
            if let Some(b) = guard.as_ref() {
                f(b);
            }
        }
    }
}

impl ggmerge::Progress for Bars {
    fn start(&self, total: u64) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if let Ok(mut g) = self.bar.lock() {
            *g = Some(bar);
        }
    }

    fn tensor(&self, name: &str, index: usize, count: usize) {
        self.with(|b| b.set_message(format!("[{}/{count}] {name}", index + 1)));
    }

    fn advance(&self, bytes: u64) {
        self.with(|b| b.inc(bytes));
    }

    fn finish(&self) {
        self.with(|b| b.finish_and_clear());
    }
}
