//! The llama.cpp runtime on the real fixtures: weight discovery, whole-tensor writes with
//! bit-identical restore, generation, perplexity, and the errors users hit.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::experts::Noise;
use ggmerge::format::gguf::GgufModel;
use ggmerge::format::nbytes;
use ggmerge::quant;
use ggmerge::runtime::{
    GenerateOptions, Model, ModelOptions, RuntimeError, Session, SessionOptions, StopReason,
};
use ggmerge::Progress;

const THREADS: usize = 1;

fn load(path: &std::path::Path) -> Model {
    let opts = ModelOptions {
        threads: Some(THREADS),
        gpu_layers: common::test_gpu_layers(),
        ..Default::default()
    };
    Model::load(path, &opts).unwrap()
}

fn session(model: &Model, n_ctx: u32) -> Session<'_> {
    model
        .session(&SessionOptions {
            n_ctx,
            n_batch: 512,
            threads: Some(THREADS),
            ..Default::default()
        })
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Every `*.weight` tensor of the file is found, with the file's type, shape and size.
fn check_discovery(path: &std::path::Path, expected: usize) {
    let model = load(path);
    let t0 = std::time::Instant::now();
    let weights = model.weights().unwrap();
    eprintln!(
        "{}: {} weight tensors discovered in {:.2?}",
        path.display(),
        weights.len(),
        t0.elapsed()
    );
    let file = GgufModel::open(path).unwrap();
    let in_file: Vec<_> = file
        .tensors()
        .filter(|t| t.info.name.ends_with(".weight"))
        .collect();
    let mut buffers = std::collections::BTreeMap::<&str, usize>::new();
    for w in weights.iter() {
        *buffers.entry(w.buffer_name()).or_default() += 1;
    }
    eprintln!("{}: buffers {buffers:?}", path.display());
    assert_eq!(in_file.len(), expected, "fixture changed?");
    assert_eq!(weights.len(), expected);
    for t in &in_file {
        let w = weights
            .get(&t.info.name)
            .unwrap_or_else(|| panic!("{} not discovered", t.info.name));
        assert_eq!(w.ty(), t.info.ty, "{}", t.info.name);
        assert_eq!(w.nbytes(), t.data.len() as u64, "{}", t.info.name);
        let n = t
            .info
            .shape
            .iter()
            .rposition(|&d| d != 1)
            .map_or(1, |i| i + 1);
        assert_eq!(w.shape(), &t.info.shape[..n], "{}", t.info.name);
    }
}

#[test]
fn discovery_finds_all_smollm2_weights() {
    // Tied embeddings: token_embd.weight is both the input table and the output matrix.
    check_discovery(&common::smollm2(), 272);
}

#[test]
fn discovery_finds_all_gemma3_weights() {
    check_discovery(&common::gemma3(), 236);
}

#[test]
fn greedy_generation_is_deterministic() {
    let model = load(&common::smollm2());
    let opts = GenerateOptions {
        n_predict: 16,
        ..Default::default()
    };
    let mut s = session(&model, 256);
    let t0 = std::time::Instant::now();
    let a = s.generate("The capital of France is", &opts).unwrap();
    eprintln!("16 tokens in {:.2?}: {:?}", t0.elapsed(), a.text);
    let b = s.generate("The capital of France is", &opts).unwrap();
    let c = session(&model, 256)
        .generate("The capital of France is", &opts)
        .unwrap();
    assert!(!a.text.trim().is_empty());
    assert!(!a.tokens.is_empty() && a.tokens.len() <= 16);
    if a.tokens.len() < 16 {
        assert_eq!(a.stop, StopReason::EndOfGeneration);
    }
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens, c.tokens);
    assert_eq!(a.text, c.text);

    // Streaming gives the same text.
    let mut streamed = String::new();
    let d = s
        .generate_with("The capital of France is", &opts, |p| streamed.push_str(p))
        .unwrap();
    assert_eq!(streamed, d.text);
    assert_eq!(d.tokens, a.tokens);

    // Chat template (SmolLM2 has a ChatML one).
    let chat = s
        .generate(
            "What is the capital of France?",
            &GenerateOptions {
                chat: true,
                ..opts.clone()
            },
        )
        .unwrap();
    eprintln!("chat: {:?}", chat.text);
    assert!(!chat.text.trim().is_empty());
    assert!(chat.n_prompt > a.n_prompt);
}

#[test]
fn gemma3_generates() {
    let model = load(&common::gemma3());
    let mut s = session(&model, 256);
    let opts = GenerateOptions {
        n_predict: 16,
        ..Default::default()
    };
    let a = s.generate("The three primary colours are", &opts).unwrap();
    eprintln!("gemma3: {:?}", a.text);
    assert!(!a.text.trim().is_empty());
    let b = s.generate("The three primary colours are", &opts).unwrap();
    assert_eq!(a.tokens, b.tokens);
    // This fixture carries no chat template: a clear error, not a guess.
    let chat = GenerateOptions { chat: true, ..opts };
    let err = s.generate("Hi", &chat).unwrap_err();
    assert!(matches!(err, RuntimeError::NoChatTemplate), "{err}");
}

/// Writing the file's own bytes into every weight leaves the logits bit-identical; a perturbed
/// tensor changes them; restoring the original bytes gives the first logits back exactly.
fn check_set_weight_roundtrip(path: &std::path::Path, tensor: &str) {
    let file = GgufModel::open(path).unwrap();
    let model = load(path);
    let mut s = session(&model, 64);
    let tokens = model
        .tokenize("The quick brown fox jumps over", true, false)
        .unwrap();
    let base = s.logits_for(&tokens).unwrap();
    assert_eq!(base.len(), model.n_vocab());

    let t0 = std::time::Instant::now();
    let mut total = 0u64;
    for t in file.tensors() {
        s.set_weight(&t.info.name, t.data).unwrap();
        total += t.data.len() as u64;
    }
    eprintln!(
        "{}: rewrote all {} tensors ({} MB) in {:.2?}",
        path.display(),
        file.n_tensors(),
        total >> 20,
        t0.elapsed()
    );
    let same = s.logits_for(&tokens).unwrap();
    assert_eq!(max_abs_diff(&base, &same), 0.0);
    assert!(bits_equal(&base, &same));

    // Perturb a tensor (the named one, then one in a repacked buffer if the CPU repacks any),
    // restore it, and check both effects.
    let mut names = vec![tensor.to_string()];
    let weights = model.weights().unwrap();
    if let Some(w) = weights
        .iter()
        .find(|w| w.buffer_name().contains("REPACK") && w.shape().len() == 2)
    {
        names.push(w.name().to_string());
    }
    for tensor in &names {
        perturb_and_restore(&mut s, &file, tensor, &tokens, &base);
    }

    // A second session on the same model sees the model's (restored) weights.
    let other = session(&model, 64).logits_for(&tokens).unwrap();
    assert!(bits_equal(&base, &other));
}

/// Writes a noisy requantized copy of `tensor`: the logits change; the original bytes bring
/// `base` back bit for bit.
fn perturb_and_restore(
    s: &mut Session<'_>,
    file: &GgufModel,
    tensor: &str,
    tokens: &[i32],
    base: &[f32],
) {
    let t = file.tensor_by_name(tensor).unwrap();
    let mut v = vec![0f32; t.info.n_elements() as usize];
    quant::dequantize(t.info.ty, t.data, &mut v, tensor).unwrap();
    let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let mut noise = Noise::new(7);
    for x in v.iter_mut() {
        *x += 0.5 * rms * noise.normal();
    }
    let mut bytes = vec![0u8; nbytes(&t.info.shape, t.info.ty).unwrap() as usize];
    quant::quantize(t.info.ty, &v, t.info.shape[0], &mut bytes, tensor).unwrap();
    assert_ne!(bytes, t.data);
    let buffer = s
        .model()
        .weights()
        .unwrap()
        .get(tensor)
        .unwrap()
        .buffer_name()
        .to_string();
    let t0 = std::time::Instant::now();
    s.set_weight(tensor, &bytes).unwrap();
    let dt = t0.elapsed();
    let changed = s.logits_for(tokens).unwrap();
    let d = max_abs_diff(base, &changed);
    eprintln!(
        "{tensor} ({}, {buffer}, {} bytes) written in {dt:.2?}: max |Δlogit| = {d}",
        t.info.ty,
        bytes.len()
    );
    assert!(d > 1e-3, "perturbing {tensor} did not change the logits");
    s.set_weight(tensor, t.data).unwrap();
    let restored = s.logits_for(tokens).unwrap();
    assert!(
        bits_equal(base, &restored),
        "restoring {tensor} is not bit-identical"
    );
}

#[test]
fn set_weight_roundtrip_smollm2() {
    check_set_weight_roundtrip(&common::smollm2(), "blk.0.ffn_up.weight");
}

#[test]
fn set_weight_roundtrip_gemma3() {
    check_set_weight_roundtrip(&common::gemma3(), "blk.0.ffn_up.weight");
}

const TEXT: &str = "The history of the printing press begins in the middle of the fifteenth \
century, when Johannes Gutenberg, a goldsmith from Mainz, combined several older techniques \
into a single practical system. Movable type had been used in East Asia for centuries, but \
Gutenberg's metal type, cast in a hand mould from an alloy of lead, tin and antimony, was \
durable and could be produced quickly in large numbers. He also adapted the screw press, \
which farmers had long used to press grapes and olives, and developed an oil-based ink that \
stuck to metal far better than the water-based inks of the scribes. The most famous product \
of his workshop is the Bible printed around 1455, of which fewer than fifty copies survive \
today. Within a few decades, printing shops had spread to more than two hundred cities across \
Europe. Venice became one of the busiest centres of the new trade, and its printers produced \
elegant editions of classical authors in small, affordable formats. The price of books fell \
sharply, and the number of people who could afford to own them grew just as quickly. \
Scholars were able to compare identical copies of a text, which made it easier to correct \
errors and to build on the work of others. Pamphlets and broadsheets carried news, \
advertisements and political arguments to readers who had never held a manuscript. During \
the Reformation, Martin Luther's writings were printed in hundreds of thousands of copies, and \
historians often argue that the movement could not have spread so fast without the press. \
Governments and churches soon tried to control what could be printed, introducing licences, \
lists of forbidden books and heavy penalties for unauthorised publishers. Yet the flow of \
printed material proved difficult to stop. By the seventeenth century, regular newspapers \
appeared in several countries, and scientific societies published journals that reported \
experiments and observations to members far away. The spread of literacy was slow and uneven, \
but schools increasingly relied on printed primers, grammars and arithmetic books. In the \
nineteenth century, steam power transformed the industry once again. Rotary presses could \
print thousands of sheets an hour, paper made from wood pulp replaced expensive rag paper, and \
cheap newspapers reached a mass audience in the growing industrial cities. Typesetting \
remained slow until the invention of machines that cast whole lines of type at once, which \
allowed daily papers to grow to many pages. In the twentieth century, offset lithography and \
later photocomposition replaced metal type almost entirely, and computers changed the work of \
designers and editors. Today most text is read on screens, but the basic idea behind \
Gutenberg's invention, that words can be reproduced exactly and cheaply for many readers, \
remains at the heart of how knowledge is shared. Libraries still collect early printed books, \
and historians study their bindings, margins and ownership marks to learn how readers of the \
past actually used them.";

#[derive(Default)]
struct Count {
    total: AtomicU64,
    done: AtomicU64,
    finished: AtomicU64,
}

impl Progress for Count {
    fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }
    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn perplexity_smollm2() {
    let model = load(&common::smollm2());
    let mut s = session(&model, 128);
    let progress = Count::default();
    let t0 = std::time::Instant::now();
    let a = s.perplexity(TEXT, &progress).unwrap();
    eprintln!(
        "perplexity {:.4} ± {:.4} over {} tokens ({} chunks of 128, {} scored) in {:.2?}; per chunk {:?}",
        a.ppl,
        a.ppl_err,
        a.n_tokens,
        a.chunk_ppl.len(),
        a.n_scored,
        t0.elapsed(),
        a.chunk_ppl
    );
    assert!(
        a.n_tokens >= 512,
        "the text should be ~600 tokens: {}",
        a.n_tokens
    );
    assert_eq!(a.chunk_ppl.len(), a.n_tokens / 128);
    assert_eq!(a.n_scored, a.chunk_ppl.len() * (128 - 64 - 1));
    assert!(
        a.ppl.is_finite() && (2.0..200.0).contains(&a.ppl),
        "{}",
        a.ppl
    );
    assert!(a.ppl_err.is_finite() && a.ppl_err > 0.0);
    assert_eq!(a.running.last().copied(), Some(a.ppl));
    assert_eq!(
        progress.total.load(Ordering::Relaxed),
        a.chunk_ppl.len() as u64
    );
    assert_eq!(
        progress.done.load(Ordering::Relaxed),
        a.chunk_ppl.len() as u64
    );
    assert_eq!(progress.finished.load(Ordering::Relaxed), 1);

    let b = s.perplexity(TEXT, &ggmerge::NoProgress).unwrap();
    assert_eq!(a.ppl.to_bits(), b.ppl.to_bits());
    assert_eq!(a.chunk_ppl, b.chunk_ppl);

    // Too short for two windows: llama-perplexity's rule.
    let err = s.perplexity("A short text.", &progress).unwrap_err();
    assert!(matches!(err, RuntimeError::TextTooShort { .. }), "{err}");
    assert_eq!(progress.finished.load(Ordering::Relaxed), 1);
}

#[test]
fn errors_are_clear() {
    let model = load(&common::smollm2());
    let mut s = session(&model, 16);

    let long = "word ".repeat(100);
    let err = s.generate(&long, &GenerateOptions::default()).unwrap_err();
    assert!(
        matches!(err, RuntimeError::PromptTooLong { n_ctx: 16, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("context holds 16"), "{msg}");
    let toks = model.tokenize(&long, true, false).unwrap();
    assert!(matches!(
        s.logits_for(&toks).unwrap_err(),
        RuntimeError::PromptTooLong { .. }
    ));

    let w = model.weights().unwrap().get("blk.0.ffn_up.weight").unwrap();
    let n = w.nbytes() as usize;
    let err = s
        .set_weight("blk.0.ffn_up.weight", &vec![0u8; n - 1])
        .unwrap_err();
    assert!(matches!(err, RuntimeError::WeightSize { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.ffn_up.weight") && msg.contains(&n.to_string()),
        "{msg}"
    );
    let err = s.set_weight("blk.99.ffn_up.weight", &[0u8; 4]).unwrap_err();
    assert!(matches!(err, RuntimeError::UnknownTensor { .. }), "{err}");

    let bad = GenerateOptions {
        temp: f32::NAN,
        ..Default::default()
    };
    assert!(matches!(
        s.generate("Hi", &bad).unwrap_err(),
        RuntimeError::Invalid(_)
    ));

    // The session still works after the errors.
    let ok = s
        .generate(
            "Hi",
            &GenerateOptions {
                n_predict: 4,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(ok.tokens.len() <= 4);

    // Load errors name the file.
    let dir = common::tempdir();
    let missing = dir.path().join("missing.gguf");
    let err = Model::load(&missing, &ModelOptions::default()).unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }));
    assert!(err.to_string().contains("missing.gguf"));
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file").unwrap();
    let err = Model::load(&junk, &ModelOptions::default()).unwrap_err();
    eprintln!("junk: {err}");
    assert!(matches!(err, RuntimeError::Load { .. }));
    assert!(err.to_string().contains("junk.gguf"));
}

/// Log-softmax of `logits` at `token`.
fn log_prob_of(logits: &[f32], token: i32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    f64::from(logits[token as usize] - max) - sum.ln()
}

#[test]
fn score_answer_smollm2() {
    let model = load(&common::smollm2());
    let mut s = session(&model, 128);
    // SmolLM2-135M greedily continues this with " Paris\nThe capital of Spain".
    let prompt =
        "The capital of Germany is Berlin\nThe capital of Italy is Rome\nThe capital of France is";
    let paris = s.score_answer(prompt, " Paris").unwrap();
    let wrong = s.score_answer(prompt, " Banana bread").unwrap();
    eprintln!("Paris: {paris:?}; Banana bread: {wrong:?}");
    assert!(paris.exact, "{paris:?}");
    assert_eq!(paris.tokens, 1);
    assert!(paris.logprob < 0.0 && paris.logprob > -1.0, "{paris:?}");
    assert!(!wrong.exact, "{wrong:?}");
    assert!(wrong.tokens >= 2, "{wrong:?}");
    assert!(wrong.logprob < paris.logprob - 5.0, "{wrong:?}");
    // Exact means what greedy generation produces.
    let g = s
        .generate(
            prompt,
            &GenerateOptions {
                n_predict: 3,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(g.text.starts_with(" Paris\n"), "{:?}", g.text);
    // Here greedy says " Paris." : without the newline after it the answer is not exact.
    let plain = s
        .score_answer("The capital of France is", " Paris")
        .unwrap();
    eprintln!("plain: {plain:?}");
    assert!(!plain.exact && plain.logprob > -3.0, "{plain:?}");

    // The log-likelihood equals the one of token-by-token decoding (teacher forcing is only a
    // shortcut): each answer token scored from the logits after its own prefix.
    let mut tokens = model.tokenize(prompt, true, false).unwrap();
    let answer = &model
        .tokenize(&format!("{prompt} Banana bread\n"), true, false)
        .unwrap()[tokens.len()..];
    assert_eq!(answer.len(), wrong.tokens + 1, "{answer:?}");
    let mut by_steps = 0.0;
    for &t in &answer[..wrong.tokens] {
        by_steps += log_prob_of(&s.logits_for(&tokens).unwrap(), t);
        tokens.push(t);
    }
    assert!(
        (by_steps - wrong.logprob).abs() < 1e-2,
        "{by_steps} vs {wrong:?}"
    );
    // Scoring is independent of what the session held before, and of the batch size (a prompt
    // split over several decodes).
    assert_eq!(s.score_answer(prompt, " Paris").unwrap(), paris);
    let mut small = model
        .session(&SessionOptions {
            n_ctx: 128,
            n_batch: 8,
            threads: Some(THREADS),
            ..Default::default()
        })
        .unwrap();
    // On a GPU backend a batch of 8 and a whole prompt take different kernels (matrix-vector
    // vs matrix-matrix, f16 accumulation): allow 5% of the log-likelihood there. Measured:
    // 0.3% on lavapipe (Vulkan), 1.6% on CUDA (H200: −32.05 vs −32.56 for " Banana bread").
    let relative = if common::test_gpu_layers() != 0 {
        5e-2
    } else {
        0.0
    };
    for (answer, full) in [(" Paris", &paris), (" Banana bread", &wrong)] {
        let split = small.score_answer(prompt, answer).unwrap();
        assert_eq!((split.exact, split.tokens), (full.exact, full.tokens));
        assert!(
            (split.logprob - full.logprob).abs() < 1e-2 + relative * full.logprob.abs(),
            "{split:?} vs {full:?}"
        );
    }

    // An empty answer is an error; the session still works after it.
    let err = s.score_answer(prompt, "").unwrap_err();
    assert!(matches!(err, RuntimeError::Invalid(_)), "{err}");
    assert_eq!(s.score_answer(prompt, " Paris").unwrap(), paris);
}

#[test]
fn score_answer_gemma_blank_line_ends_the_answer() {
    // Gemma's vocabulary has "\n\n" as one token. After blank-line separated examples the
    // base greedily writes " Paris\n\n…": the answer followed by a newline, so exact — the
    // scorer once took only "\n" as the end and called this a miss.
    let model = load(&common::gemma3());
    let mut s = session(&model, 128);
    let prompt = "Germany: Berlin\n\nItaly: Rome\n\nSpain: Madrid\n\nFrance:";
    let blank = model.tokenize("\n\n", false, false).unwrap();
    assert_eq!(blank.len(), 1, "{blank:?}");
    let g = s
        .generate(
            prompt,
            &GenerateOptions {
                n_predict: 2,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(g.text.starts_with(" Paris\n\n"), "{:?}", g.text);
    let paris = s.score_answer(prompt, " Paris").unwrap();
    assert!(paris.exact, "{paris:?}");
    assert_eq!(paris.tokens, 1);
    // A continuation that does not start with a newline still ends no answer.
    let plain = s
        .score_answer("The capital of France is", " Paris")
        .unwrap();
    let g = s
        .generate(
            "The capital of France is",
            &GenerateOptions {
                n_predict: 2,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        plain.exact,
        g.text.starts_with(" Paris\n"),
        "{plain:?} {:?}",
        g.text
    );
}
