//! Knowledge evaluation: score a model (base plus expert mixture, or any loaded session) on
//! question/answer pairs by greedy exact match and answer log-likelihood
//! ([`Session::score_answer`]). `ggmerge eval` is the CLI over it; the experiments of
//! docs/results.md use the same scoring.
//!
//! Questions come as JSON Lines, one object per line with a `prompt` and the expected
//! `answer` (with its leading space, as the model would continue the prompt):
//!
//! ```text
//! {"prompt": "Question: What is the capital of France?\nAnswer:", "answer": " Paris"}
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::runtime::{AnswerScore, Session};

/// One evaluation item.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Question {
    /// The prompt the model continues.
    pub prompt: String,
    /// The expected continuation; a newline (or end of generation) must follow it.
    pub answer: String,
    /// Line of the file it was read from (1-based; 0 when not read from a file).
    #[serde(skip)]
    pub line: usize,
}

/// Reads questions from a JSON Lines file (blank lines are skipped); a malformed line is an
/// error naming the file and the line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::format::FormatError::Io {
        path: path.to_path_buf(),
        what: "cannot read the questions",
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut q: Question = serde_json::from_str(line).map_err(|e| Error::Questions {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("not a {{\"prompt\": …, \"answer\": …}} object: {e}"),
        })?;
        if q.answer.is_empty() {
            return Err(Error::Questions {
                path: path.to_path_buf(),
                line: i + 1,
                reason: "the answer is empty".into(),
            });
        }
        q.line = i + 1;
        out.push(q);
    }
    if out.is_empty() {
        return Err(Error::Questions {
            path: path.to_path_buf(),
            line: 0,
            reason: "no questions in the file".into(),
        });
    }
    Ok(out)
}

/// Scores of a question set.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Per question, in order.
    pub scores: Vec<AnswerScore>,
    /// Questions answered exactly.
    pub exact: usize,
    /// Mean log-likelihood per answer token over all questions.
    pub logprob_per_token: f64,
}

impl EvalReport {
    /// Share of questions answered exactly.
    pub fn exact_share(&self) -> f64 {
        self.exact as f64 / self.scores.len().max(1) as f64
    }
}

/// Scores every question with `session` (clearing its memory before each).
/// `progress` gets `start(n)`, `advance(1)` per question, `finish()`.
pub fn evaluate(
    session: &mut Session<'_>,
    questions: &[Question],
    progress: &dyn Progress,
) -> Result<EvalReport> {
    progress.start(questions.len() as u64);
    let mut scores = Vec::with_capacity(questions.len());
    for (i, q) in questions.iter().enumerate() {
        let score = session
            .score_answer(&q.prompt, &q.answer)
            .map_err(|source| Error::Question {
                line: if q.line == 0 { i + 1 } else { q.line },
                source,
            })?;
        scores.push(score);
        progress.advance(1);
    }
    progress.finish();
    let exact = scores.iter().filter(|s| s.exact).count();
    let tokens: usize = scores.iter().map(|s| s.tokens).sum();
    let logprob: f64 = scores.iter().map(|s| s.logprob).sum();
    Ok(EvalReport {
        exact,
        logprob_per_token: logprob / tokens.max(1) as f64,
        scores,
    })
}
