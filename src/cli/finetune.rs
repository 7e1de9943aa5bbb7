//! `ggmerge finetune`: its arguments and the printing around [`ggmerge::flows::finetune`].

use std::path::PathBuf;

use clap::Args;

use ggmerge::flows::eval::{evaluate, read_questions, EvalReport, Question};
use ggmerge::flows::finetune::finetune;
use ggmerge::runtime::train::{Phase, TrainEvent, TrainOptions};
use ggmerge::runtime::{Model, Session, SessionOptions};
use ggmerge::NoProgress;

use super::outln;

/// Fine-tune a GGUF model on a text with llama.cpp's training API (full fine-tuning, AdamW).
///
/// Every weight except token_embd.weight (which llama.cpp keeps frozen) is trained on
/// next-token prediction: the text is tokenized, cut into sequences of --ctx tokens starting
/// every --stride tokens, and the last --val-split of the sequences are only evaluated. Loss and
/// next-token accuracy are printed per step (stderr) and per epoch (stdout). With -t 1 the
/// result is the same bit for bit on every run.
///
/// Training needs every tensor in F32 (llama.cpp trains nothing else). Make an F32 copy of a
/// quantized or F16 model first:
///
///   ggmerge quantize model.Q4_K_M.gguf model-f32.gguf F32
///
/// (A copy of a quantized model keeps its rounding; start from an F16/BF16/F32 model when you
/// have one.) Memory: about 4× the F32 file (weights, gradients, two AdamW moments) plus
/// activations, e.g. 2.4 GB for SmolLM2-135M.
///
/// Llama-style models (llama, mistral, qwen2, SmolLM2 …) train. Gemma (GEGLU) and GELU models
/// (GPT-2, Phi-2, Falcon …) are refused: ggml has no backward pass for their feed-forward, and
/// llama.cpp would abort. Fine-tune those elsewhere; their fine-tunes merge and extract as usual.
///
/// The output keeps the base's metadata (chat template, tokenizer, names) and tensor order;
/// only the weights differ. It is an expert of the base for `extract`, `merge` and `run`.
///
/// Example:
///   ggmerge quantize SmolLM2-135M-Instruct.Q4_1.gguf smol-f32.gguf F32
///   ggmerge finetune --base smol-f32.gguf --data facts.txt -o expert.gguf --epochs 3 -t 4
///       --eval questions.jsonl     # exact match and log-likelihood after every epoch
///   ggmerge extract --base smol-f32.gguf --finetuned expert.gguf --density 0.1 -o expert.dpk.gguf
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct FinetuneArgs {
    /// The model to fine-tune: GGUF, every tensor F32.
    #[arg(long)]
    pub base: PathBuf,
    /// The training text (UTF-8), used as is; BOS is added if the model's tokenizer adds one.
    #[arg(long)]
    pub data: PathBuf,
    /// The fine-tuned model (GGUF, F32, the base's metadata); written to a temporary file and
    /// renamed when complete.
    #[arg(short, long, alias = "out")]
    pub output: PathBuf,
    /// AdamW learning rate, constant. 5e-5 suits a pretrained model; a randomly initialised
    /// one needs far more (1e-3 …).
    #[arg(long, default_value = "5e-5")]
    pub lr: f32,
    /// Learning rate of the last epoch: the rate decays exponentially, epoch by epoch, from
    /// --lr to it (as llama.cpp's finetune -lr-min). Default: --lr throughout.
    #[arg(long)]
    pub lr_min: Option<f32>,
    /// Questions to score after every epoch (JSON Lines, as `ggmerge eval -f`): exact match
    /// and answer log-likelihood, to see when the model has learned enough.
    #[arg(long, value_name = "QUESTIONS")]
    pub eval: Option<PathBuf>,
    /// AdamW weight decay.
    #[arg(long, default_value = "0")]
    pub wd: f32,
    /// Passes over the training sequences.
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    /// Tokens per training sequence, rounded up to a multiple of 256 (llama.cpp pads its
    /// contexts). The text needs at least ctx + 1 + stride tokens.
    #[arg(long, default_value_t = 256)]
    pub ctx: u32,
    /// Tokens between the starts of two sequences (default: ctx / 2, as llama.cpp's
    /// finetune; --stride ctx gives sequences without overlap).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Fraction of the sequences (the last ones) only evaluated, not trained on; in [0, 1).
    #[arg(long, default_value = "0.05")]
    pub val_split: f32,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

/// Scores `questions` with the weights `model` holds now (a fresh inference context).
fn score(
    model: &Model,
    questions: &[Question],
    threads: Option<usize>,
) -> ggmerge::Result<EvalReport> {
    let longest = questions
        .iter()
        .map(|q| q.prompt.len() + q.answer.len())
        .max()
        .unwrap_or(0);
    let opts = SessionOptions {
        // Every byte a token at worst, plus the template-free margin of a few tokens.
        n_ctx: (longest as u32 + 16).clamp(64, 4096),
        threads,
        ..Default::default()
    };
    let mut session = Session::new(model, &opts)?;
    evaluate(&mut session, questions, &NoProgress)
}

/// Runs `ggmerge finetune`.
pub fn run(a: &FinetuneArgs) -> anyhow::Result<()> {
    let opts = TrainOptions {
        lr: a.lr,
        lr_min: a.lr_min,
        weight_decay: a.wd,
        epochs: a.epochs,
        n_ctx: a.ctx,
        stride: a.stride,
        val_split: a.val_split,
        threads: super::threads(a.threads),
    };
    opts.validate()?;
    let data = a.data.display().to_string();
    let questions = a.eval.as_deref().map(read_questions).transpose()?;
    let mut eval_error = None;
    let mut on_event = |e: TrainEvent<'_>| match e {
        TrainEvent::Start(p) => {
            if p.n_ctx != p.n_ctx_requested as usize {
                eprintln!(
                    "note: --ctx {} rounded up to {} (llama.cpp pads contexts to 256)",
                    p.n_ctx_requested, p.n_ctx
                );
            }
            eprintln!(
                "{data}: {} tokens of text -> {} sequences of {} tokens (stride {}): {} train, \
                 {} validation; AdamW lr {:e}{} wd {}, {} epoch(s), {} thread(s)",
                p.text_tokens,
                p.sequences,
                p.n_ctx,
                p.stride,
                p.train_sequences,
                p.val_sequences,
                p.lr,
                p.lr_min
                    .map_or(String::new(), |m| format!(" decaying to {m:e}")),
                p.weight_decay,
                p.epochs,
                p.threads
            );
        }
        TrainEvent::Step(s) => eprintln!(
            "epoch {} {} {:>4}/{}: loss {:.4} ± {:.4}, accuracy {:.2}%, {:.2} s/step, eta {:.0} s",
            s.epoch,
            match s.phase {
                Phase::Train => "train",
                Phase::Validation => "val  ",
            },
            s.step,
            s.steps,
            s.stats.loss,
            s.stats.loss_unc.unwrap_or(0.0),
            100.0 * s.stats.accuracy,
            s.secs_per_step,
            s.eta_secs,
        ),
        TrainEvent::Epoch(r) => {
            let val = r.val.map_or(String::new(), |v| {
                format!(
                    ", val loss {:.4} accuracy {:.2}%",
                    v.loss,
                    100.0 * v.accuracy
                )
            });
            outln!(
                "epoch {}/{}: lr {:.2e}, train loss {:.4} accuracy {:.2}%{val} ({:.1} s, {:.2} s/step)",
                r.epoch,
                opts.epochs,
                r.lr,
                r.train.loss,
                100.0 * r.train.accuracy,
                r.secs,
                r.secs_per_step
            );
        }
        TrainEvent::Trained { epoch, model } => {
            let (Some(q), None) = (&questions, &eval_error) else {
                return;
            };
            match score(model, q, opts.threads) {
                Ok(r) => outln!(
                    "epoch {epoch}/{}: eval exact match {}/{} ({:.1}%), answer log-likelihood {:.3} per token",
                    opts.epochs,
                    r.exact,
                    r.scores.len(),
                    100.0 * r.exact_share(),
                    r.logprob_per_token
                ),
                Err(e) => eval_error = Some(e),
            }
        }
    };
    // Every error names its file (model, text or output) or the option at fault.
    let r = finetune(&a.base, &a.data, &a.output, &opts, &mut on_event)?;
    if let Some(e) = eval_error {
        // The model was written; only the scoring failed (it stopped after the first error).
        eprintln!("warning: --eval stopped: {e}");
    }
    let epochs = &r.train.epochs;
    if let (Some(first), Some(last), true) = (epochs.first(), epochs.last(), epochs.len() > 1) {
        outln!(
            "train loss {:.4} -> {:.4}{}",
            first.train.loss,
            last.train.loss,
            last.val
                .map_or(String::new(), |v| format!(", final val loss {:.4}", v.loss))
        );
    }
    outln!(
        "wrote {} ({:.1} MiB, {} of {} tensors changed; token_embd stays frozen as in \
         llama.cpp); training {:.1} s, {:.2} s per training step; total {:.1} s",
        a.output.display(),
        r.bytes as f64 / (1 << 20) as f64,
        r.changed,
        r.tensors,
        r.train.secs,
        r.train.secs_per_step(),
        r.secs
    );
    Ok(())
}
