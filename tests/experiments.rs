//! Issue 5's experiment pipeline at test size: fine-tune → extract → apply at load time →
//! evaluate, on a tiny llama with random weights (2 blocks, n_embd 64, SmolLM2's tokenizer,
//! written by ggmerge's own GGUF writer, see `common/tiny_model.rs`) that llama.cpp trains in
//! seconds.
//!
//! The test writes the tiny base and four invented capital-city facts
//! ([`ggmerge::flows::facts`], data seed [`DATA_SEED`]), fine-tunes the base on them with
//! [`finetune`] (`ggmerge finetune`'s flow: llama.cpp's training API, one thread, fixed
//! inputs: deterministic), extracts the fine-tune twice (a dense pack, density 1, and a DARE
//! pack at density
//! [`DENSITY`]), loads the base once with llama.cpp and applies each pack in memory through an
//! [`ExpertSession`], then scores every question with [`Session::score_answer`] and measures the
//! perplexity of held-out sentences stating the same facts in a phrasing never trained on.
//!
//! # What is asserted, and why the thresholds are safe
//!
//! Thirty optimizer steps (3 epochs of ~10 windows of 256 tokens) do not teach a random
//! 6.4M-parameter model which capital goes with which country: at this scale the expert learns
//! the domain's vocabulary and phrasing (the answers' tokens become likely after `Answer:`), not
//! the association, and greedy decoding never produces an exact answer. So exact-match *gains*
//! are not asserted, nor that the right answer beats the other facts' answers (it did at chance
//! level in every run). What holds with a wide margin, measured with data seeds 1 to 6 (the test
//! keeps seed 1; training is deterministic for fixed inputs and one thread):
//!
//! - The random base is close to uniform over SmolLM2's 49152 tokens: −ln 49152 = −10.80 nats
//!   per answer token, −10.74 … −10.87 observed; asserted within [−11.5, −10.0]. It answers
//!   nothing exactly (asserted).
//! - The expert beats the base on its task: the correct answers' log-likelihood per answer token
//!   rises by 6.67 … 6.90 nats with the dense pack and 6.15 … 6.80 with the DARE pack (13 … 21
//!   nats per question); asserted: at least 3 nats per token for both (each answer token 20×
//!   more likely), under half the smallest gain observed.
//! - The same holds for the answers at the end of the held-out sentences (a phrasing never
//!   trained on): 6.16 … 6.70 nats per token with the DARE pack; asserted at least 3. (That
//!   this gain equals the one on the trained question format is the sign that the expert
//!   learned the answers' tokens rather than the facts.)
//! - DARE at density 0.5 keeps most of the fine-tune's effect: 92 … 99 % of the dense pack's
//!   gain observed; asserted at least 50 %.
//! - The held-out sentences' perplexity drops from ≈ 48 000 (about the vocabulary size, as a
//!   near-uniform model gives) to 540 … 1440 with the DARE pack (34 … 89× lower observed);
//!   asserted at least 4× lower.
//! - Weights 0 give the base's scores back bit for bit after the experts were applied
//!   (asserted exactly).
//!
//! Timing: about 20 s in all on a loaded 2-core machine (one thread for training and
//! inference), 85 % of it the fine-tuning at ~0.6 s per step, dominated by the 49152-token
//! output layer.

mod common;

use std::time::Instant;

use common::tiny_model::TinyLlama;
use ggmerge::flows::extract::{extract_delta, ExtractOptions};
use ggmerge::flows::facts::{self, Domain, Question};
use ggmerge::flows::finetune::finetune;
use ggmerge::format::gguf::GgufModel;
use ggmerge::format::GgmlType;
use ggmerge::merge::config::Method;
use ggmerge::runtime::train::{TrainEvent, TrainOptions};
use ggmerge::runtime::{Expert, ExpertSession};
use ggmerge::runtime::{Model, ModelOptions, Session, SessionOptions};
use ggmerge::NoProgress;

/// Seed of the invented facts and of the training text's order.
const DATA_SEED: u64 = 1;
/// Facts in the domain.
const FACTS: usize = 4;
/// Times every phrasing of every fact appears in the training text.
const REPEATS: usize = 8;
/// AdamW learning rate: a random model needs far more than a pretrained one (5e-5).
const LR: f32 = 3e-3;
/// Passes over the training windows.
const EPOCHS: usize = 3;
/// Keep fraction of the DARE pack.
const DENSITY: f64 = 0.5;

/// How one mixture does on the domain.
#[derive(Debug, Clone, PartialEq)]
struct Eval {
    /// Mean over the questions of the answer's log-likelihood (nats).
    mean_logprob: f64,
    /// The same per answer token.
    per_token: f64,
    /// Questions answered exactly by greedy decoding.
    exact: usize,
    /// Log-likelihood per answer token of the answers at the end of the held-out sentences.
    heldout_per_token: f64,
    /// Perplexity of the held-out sentences.
    heldout_ppl: f64,
}

/// Σ log-likelihood, Σ answer tokens and exact answers of `questions`.
fn score(s: &mut Session<'_>, questions: &[Question]) -> (f64, usize, usize) {
    let (mut sum, mut tokens, mut exact) = (0.0, 0, 0);
    for q in questions {
        let a = s.score_answer(&q.prompt, &q.answer).unwrap();
        assert!(
            a.tokens >= 1 && a.logprob.is_finite() && a.logprob < 0.0,
            "{a:?}"
        );
        sum += a.logprob;
        tokens += a.tokens;
        exact += usize::from(a.exact);
    }
    (sum, tokens, exact)
}

fn evaluate(s: &mut Session<'_>, domain: &Domain, heldout: &str) -> Eval {
    let questions = domain.questions();
    let (sum, tokens, exact) = score(s, &questions);
    let (h_sum, h_tokens, _) = score(s, &domain.heldout_questions());
    let ppl = s.perplexity(heldout, &NoProgress).unwrap();
    Eval {
        mean_logprob: sum / questions.len() as f64,
        per_token: sum / tokens as f64,
        exact,
        heldout_per_token: h_sum / h_tokens as f64,
        heldout_ppl: ppl.ppl,
    }
}

#[test]
fn tiny_expert_beats_its_base_through_the_whole_pipeline() {
    let t0 = Instant::now();
    let dir = common::tempdir();
    let base = dir.path().join("tiny.gguf");
    TinyLlama::default().write(&common::smollm2(), &base);
    let file = GgufModel::open(&base).unwrap();
    assert_eq!(file.n_tensors(), 3 + 2 * 9);
    assert!(file.tensors().all(|t| t.info.ty == GgmlType::F32));
    drop(file);

    let [domain, _] = facts::domains(FACTS, DATA_SEED);
    let data = dir.path().join("capitals.train.txt");
    std::fs::write(&data, domain.train_text(REPEATS, DATA_SEED)).unwrap();

    // Fine-tune: windows of 256 tokens without overlap, nothing held out, one thread.
    let t_ft = Instant::now();
    let tuned = dir.path().join("capitals.gguf");
    let opts = TrainOptions {
        lr: LR,
        epochs: EPOCHS,
        n_ctx: 256,
        stride: Some(256),
        val_split: 0.0,
        threads: Some(1),
        ..Default::default()
    };
    let (mut steps, mut epochs) = (0, 0);
    let r = finetune(&base, &data, &tuned, &opts, &mut |e| match e {
        TrainEvent::Step(_) => steps += 1,
        TrainEvent::Epoch(e) => {
            epochs += 1;
            eprintln!("{e:?}");
        }
        TrainEvent::Start(p) => eprintln!("{p:?}"),
        TrainEvent::Trained { .. } => {}
    })
    .unwrap();
    eprintln!("finetune ({:.1?}): {r:?}", t_ft.elapsed());
    // token_embd is frozen by llama.cpp's training; everything else moved.
    assert_eq!((r.tensors, r.changed), (21, 20), "{r:?}");
    assert_eq!(epochs, EPOCHS);
    assert_eq!(steps, EPOCHS * r.train.plan.train_sequences);
    assert!(r.train.epochs.iter().all(|e| e.val.is_none()));
    let (first, last) = (&r.train.epochs[0].train, &r.train.epochs[EPOCHS - 1].train);
    assert!(last.loss < first.loss, "{first:?} → {last:?}");

    // Extract: a dense pack (the whole delta) and a DARE pack.
    let extract = |name: &str, density: f64, values: GgmlType| {
        let pack = dir.path().join(format!("{name}.dpk.gguf"));
        let opts = ExtractOptions {
            density,
            values,
            seed: 42,
            threads: Some(1),
            ..Default::default()
        };
        let r = extract_delta(&base, &tuned, &pack, &opts, &NoProgress).unwrap();
        eprintln!("{name}: {r:?}");
        // token_embd is frozen by llama.cpp's training; everything else moved.
        assert_eq!((r.tensors, r.changed), (21, 20), "{r:?}");
        let kept = r.kept as f64 / r.elements as f64;
        assert!(
            (kept - density).abs() < 0.01,
            "kept {kept} at density {density}"
        );
        pack
    };
    let dense = extract("dense", 1.0, GgmlType::F32);
    let dare = extract("dare", DENSITY, GgmlType::F16);

    // Apply at load time and evaluate.
    let model = Model::load(
        &base,
        &ModelOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = ExpertSession::new(
        &model,
        &base,
        vec![Expert::from_path(&dense), Expert::from_path(&dare)],
        &[0.0, 0.0],
        Method::TaskArithmetic,
        &SessionOptions {
            n_ctx: 64,
            n_batch: 64,
            threads: Some(1),
        },
        Some(1),
        1 << 30,
    )
    .unwrap();
    // Three copies: perplexity needs two windows of n_ctx = 64 tokens; one copy is ~60.
    let heldout = domain.heldout_text().repeat(3);
    let base_eval = evaluate(s.session(), &domain, &heldout);
    s.set_mixture(&[1.0, 0.0]).unwrap();
    let dense_eval = evaluate(s.session(), &domain, &heldout);
    s.set_mixture(&[0.0, 1.0]).unwrap();
    let dare_eval = evaluate(s.session(), &domain, &heldout);
    s.set_mixture(&[0.0, 0.0]).unwrap();
    let restored = evaluate(s.session(), &domain, &heldout);
    eprintln!("base:  {base_eval:?}\ndense: {dense_eval:?}\nDARE:  {dare_eval:?}");
    eprintln!("total {:.1?}", t0.elapsed());

    // The random base: near-uniform next-token distribution, no exact answers.
    assert!(
        (-11.5..-10.0).contains(&base_eval.per_token),
        "{base_eval:?}"
    );
    assert_eq!(base_eval.exact, 0, "{base_eval:?}");
    // The expert beats the base on its task, with the whole delta and with DARE.
    let dense_gain = dense_eval.per_token - base_eval.per_token;
    let dare_gain = dare_eval.per_token - base_eval.per_token;
    eprintln!(
        "gain per answer token: dense {dense_gain:.2} nats, DARE {dare_gain:.2} nats ({:.0}% of \
         dense); per question: dense {:.2}, DARE {:.2}; held-out answers: dense {:.2}, DARE {:.2} \
         per token; held-out perplexity ÷{:.1} (dense), ÷{:.1} (DARE)",
        100.0 * dare_gain / dense_gain,
        dense_eval.mean_logprob - base_eval.mean_logprob,
        dare_eval.mean_logprob - base_eval.mean_logprob,
        dense_eval.heldout_per_token - base_eval.heldout_per_token,
        dare_eval.heldout_per_token - base_eval.heldout_per_token,
        base_eval.heldout_ppl / dense_eval.heldout_ppl,
        base_eval.heldout_ppl / dare_eval.heldout_ppl
    );
    assert!(dense_gain >= 3.0, "{base_eval:?} → {dense_eval:?}");
    assert!(dare_gain >= 3.0, "{base_eval:?} → {dare_eval:?}");
    assert!(dare_gain >= 0.5 * dense_gain, "{dare_gain} vs {dense_gain}");
    // The facts' held-out phrasing is far more likely under the expert.
    let heldout_gain = dare_eval.heldout_per_token - base_eval.heldout_per_token;
    assert!(heldout_gain >= 3.0, "{base_eval:?} → {dare_eval:?}");
    assert!(
        dare_eval.heldout_ppl * 4.0 < base_eval.heldout_ppl,
        "{base_eval:?} → {dare_eval:?}"
    );
    // Weights 0 give the base back exactly.
    assert_eq!(restored, base_eval);
}
