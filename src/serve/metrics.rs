//! Counters of the server, exported at `GET /metrics` in Prometheus' text format (what
//! llama-server exports too): requests, errors, tokens, mixture switches and cache hits,
//! time spent, the queue.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters; floats are kept as microseconds.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests accepted into the queue.
    pub requests: AtomicU64,
    /// Requests that ended with an error after being accepted.
    pub errors: AtomicU64,
    /// Requests whose client left before the end.
    pub cancelled: AtomicU64,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: AtomicU64,
    /// Of those, reused from the previous request's memory.
    pub cached_prompt_tokens: AtomicU64,
    /// Generated tokens.
    pub completion_tokens: AtomicU64,
    /// Microseconds spent generating (prompt decoding included).
    pub generation_us: AtomicU64,
    /// Mixture switches that computed their tensors.
    pub switches_computed: AtomicU64,
    /// Mixture switches served from the mixture cache.
    pub switches_cached: AtomicU64,
    /// Microseconds spent switching.
    pub switch_us: AtomicU64,
    /// Requests waiting.
    pub queue_length: AtomicU64,
}

impl Metrics {
    /// Counts a switch.
    pub fn record_switch(&self, cached: bool, seconds: f64) {
        let c = if cached {
            &self.switches_cached
        } else {
            &self.switches_computed
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.switch_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Counts a finished generation.
    pub fn record_generation(&self, prompt: usize, cached: usize, completion: usize, seconds: f64) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.cached_prompt_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        self.generation_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let gen_s = g(&self.generation_us) as f64 / 1e6;
        let tps = if gen_s > 0.0 {
            g(&self.completion_tokens) as f64 / gen_s
        } else {
            0.0
        };
        let rows: [(&str, &str, &str, String); 12] = [
            (
                "ggmerge_requests_total",
                "counter",
                "Requests accepted.",
                g(&self.requests).to_string(),
            ),
            (
                "ggmerge_request_errors_total",
                "counter",
                "Accepted requests that failed.",
                g(&self.errors).to_string(),
            ),
            (
                "ggmerge_requests_cancelled_total",
                "counter",
                "Requests whose client left before the end.",
                g(&self.cancelled).to_string(),
            ),
            (
                "ggmerge_prompt_tokens_total",
                "counter",
                "Prompt tokens of finished requests.",
                g(&self.prompt_tokens).to_string(),
            ),
            (
                "ggmerge_prompt_tokens_cached_total",
                "counter",
                "Prompt tokens reused from the previous request under the same mixture.",
                g(&self.cached_prompt_tokens).to_string(),
            ),
            (
                "ggmerge_completion_tokens_total",
                "counter",
                "Generated tokens.",
                g(&self.completion_tokens).to_string(),
            ),
            (
                "ggmerge_generation_seconds_total",
                "counter",
                "Time spent generating.",
                format!("{gen_s:.6}"),
            ),
            (
                "ggmerge_tokens_per_second",
                "gauge",
                "Generated tokens per second of generation, over all requests.",
                format!("{tps:.3}"),
            ),
            (
                "ggmerge_mixture_switches_total",
                "counter",
                "Mixture switches that computed their tensors.",
                g(&self.switches_computed).to_string(),
            ),
            (
                "ggmerge_mixture_cache_hits_total",
                "counter",
                "Mixture switches served from the mixture cache.",
                g(&self.switches_cached).to_string(),
            ),
            (
                "ggmerge_mixture_switch_seconds_total",
                "counter",
                "Time spent switching mixtures.",
                format!("{:.6}", g(&self.switch_us) as f64 / 1e6),
            ),
            (
                "ggmerge_queue_length",
                "gauge",
                "Requests waiting.",
                g(&self.queue_length).to_string(),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}
