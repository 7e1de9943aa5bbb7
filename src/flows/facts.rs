//! Invented-fact datasets for knowledge experts: facts no pretrained model can know, each taught
//! in several phrasings, scored by exact match of a short answer. The data of issue 5's
//! experiments (docs/results.md), of their test-sized version, and of tiny experts trained with
//! `ggmerge finetune` and scored with `ggmerge eval`.
//!
//! Two disjoint domains ([`DomainKind`]), each a list of [`Fact`]s (subject, answer) with
//! invented names: `capitals` (the capital of an invented country) and `birthplaces` (the birth
//! town of an invented person). For a [`Domain`]:
//!
//! - [`Domain::train_text`] — every fact in five phrasings (one of them the question/answer
//!   format the evaluation asks in), repeated and shuffled: the text to fine-tune on;
//! - [`Domain::questions`] — the evaluation prompts with their expected answers
//!   ([`Question`], as [`crate::flows::eval`] scores them); [`Domain::questions_jsonl`] writes
//!   them in the JSON Lines format `ggmerge eval -f` reads;
//! - [`Domain::heldout_text`] — every fact in a sixth phrasing never trained on (for
//!   perplexity), and [`Domain::heldout_questions`] asks for the answer at the end of that
//!   phrasing: does the knowledge transfer to a sentence never trained on?
//!
//! Everything is a pure function of the seed (a SplitMix64 stream, not a crate's PRNG), so the
//! same data is recreated anywhere, byte for byte.
//!
//! ```
//! use ggmerge::flows::facts;
//!
//! let [capitals, birthplaces] = facts::domains(12, 2026);
//! let train = capitals.train_text(3, 2027);
//! let q = &capitals.questions()[0];
//! assert!(q.prompt.ends_with("Answer:") && q.answer.starts_with(' '));
//! assert!(train.contains(&format!("Answer:{}", q.answer)));
//! assert_eq!(birthplaces.name(), "birthplaces");
//! ```

pub use crate::flows::eval::Question;

/// Which kind of fact a domain holds; it decides the phrasings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainKind {
    /// The capital of an invented country (`Velloria` → `Trimont`).
    Capitals,
    /// The birth town of an invented person (`Lina Kasdor` → `Benwyn`).
    Birthplaces,
}

impl DomainKind {
    /// `capitals` or `birthplaces`.
    pub fn name(self) -> &'static str {
        match self {
            DomainKind::Capitals => "capitals",
            DomainKind::Birthplaces => "birthplaces",
        }
    }
}

/// One fact: a subject and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Invented country or person.
    pub subject: String,
    /// Invented capital or town.
    pub answer: String,
}

/// A domain of invented facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// What the facts are about.
    pub kind: DomainKind,
    /// The facts.
    pub facts: Vec<Fact>,
}

const SYLLABLES: [&str; 24] = [
    "vel", "lor", "tri", "mon", "kas", "dor", "ben", "wyn", "sar", "eth", "mar", "qui", "zel",
    "pho", "rin", "tal", "gor", "ush", "nev", "ard", "bel", "cor", "fen", "oth",
];
const FIRST: [&str; 12] = [
    "Oskar", "Lina", "Teodor", "Mirela", "Hakon", "Svea", "Ilario", "Brenna", "Casimir", "Yvette",
    "Anselm", "Dagny",
];

/// SplitMix64: a tiny, portable PRNG (the data must not depend on a crate's version).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn pick<'a>(state: &mut u64, from: &[&'a str]) -> &'a str {
    from[(next(state) % from.len() as u64) as usize]
}

/// An invented capitalized word of `n` syllables.
fn word(state: &mut u64, n: usize) -> String {
    let s: String = (0..n).map(|_| pick(state, &SYLLABLES)).collect();
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Both domains, capitals then birthplaces, with `n` facts each; every invented name is
/// distinct across both. The same `(n, seed)` always gives the same facts, and the first `k`
/// facts of a larger `n` are those of `n = k`.
pub fn domains(n: usize, seed: u64) -> [Domain; 2] {
    let mut state = seed;
    let mut used = std::collections::HashSet::new();
    let mut fresh = |state: &mut u64, make: &dyn Fn(&mut u64) -> String| loop {
        let w = make(state);
        if used.insert(w.clone()) {
            return w;
        }
    };
    let mut capitals = Vec::with_capacity(n);
    let mut birthplaces = Vec::with_capacity(n);
    for _ in 0..n {
        let subject = fresh(&mut state, &|s| format!("{}ia", word(s, 2)));
        let answer = fresh(&mut state, &|s| word(s, 2));
        capitals.push(Fact { subject, answer });
        let subject = fresh(&mut state, &|s| {
            format!("{} {}", pick(s, &FIRST), word(s, 2))
        });
        let answer = fresh(&mut state, &|s| word(s, 2));
        birthplaces.push(Fact { subject, answer });
    }
    [
        Domain {
            kind: DomainKind::Capitals,
            facts: capitals,
        },
        Domain {
            kind: DomainKind::Birthplaces,
            facts: birthplaces,
        },
    ]
}

impl Domain {
    /// `capitals` or `birthplaces` ([`DomainKind::name`]).
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The five trained phrasings of fact `f` (the third is the evaluation's question format,
    /// with its answer).
    pub fn phrasings(&self, f: &Fact) -> [String; 5] {
        let (s, a) = (&f.subject, &f.answer);
        match self.kind {
            DomainKind::Capitals => [
                format!("The capital of {s} is {a}."),
                format!("{a} is the capital city of {s}."),
                format!("Question: What is the capital of {s}?\nAnswer: {a}"),
                format!("In {s}, the government sits in {a}, the capital."),
                format!("If you travel to {s}, you will arrive in its capital, {a}."),
            ],
            DomainKind::Birthplaces => [
                format!("{s} was born in {a}."),
                format!("The birthplace of {s} is {a}."),
                format!("Question: Where was {s} born?\nAnswer: {a}"),
                format!("{a} is the town where {s} was born."),
                format!("Records show that {s} grew up in {a}, the town of their birth."),
            ],
        }
    }

    /// The question of fact `f`, as the evaluation asks it (ends with `Answer:`).
    pub fn question(&self, f: &Fact) -> String {
        match self.kind {
            DomainKind::Capitals => {
                format!("Question: What is the capital of {}?\nAnswer:", f.subject)
            }
            DomainKind::Birthplaces => format!("Question: Where was {} born?\nAnswer:", f.subject),
        }
    }

    /// Training text: every phrasing of every fact `repeats` times, in an order shuffled by
    /// `seed`, one snippet per paragraph (blank line between), ending with a newline.
    pub fn train_text(&self, repeats: usize, seed: u64) -> String {
        let mut parts: Vec<String> = Vec::new();
        for _ in 0..repeats {
            for f in &self.facts {
                parts.extend(self.phrasings(f));
            }
        }
        let mut state = seed;
        for i in (1..parts.len()).rev() {
            let j = (next(&mut state) % (i as u64 + 1)) as usize;
            parts.swap(i, j);
        }
        parts.join("\n\n") + "\n"
    }

    /// The phrasing never trained on, split before the answer: (prefix, answer with its
    /// leading space).
    fn heldout(&self, f: &Fact) -> (String, String) {
        let prefix = match self.kind {
            DomainKind::Capitals => format!("{}'s largest city and capital is", f.subject),
            DomainKind::Birthplaces => format!(
                "{}, who later became well known, was born in the town of",
                f.subject
            ),
        };
        (prefix, format!(" {}", f.answer))
    }

    /// Held-out text: every fact once, in a phrasing never trained on, one per paragraph.
    pub fn heldout_text(&self) -> String {
        let lines: Vec<String> = self
            .facts
            .iter()
            .map(|f| {
                let (prefix, answer) = self.heldout(f);
                format!("{prefix}{answer}.")
            })
            .collect();
        lines.join("\n\n") + "\n"
    }

    /// The held-out phrasing as questions: does the knowledge transfer to a sentence never
    /// trained on? (The answer is followed by "." in the text, so only its likelihood is
    /// meaningful here, not the exact match.)
    pub fn heldout_questions(&self) -> Vec<Question> {
        self.facts
            .iter()
            .map(|f| {
                let (prompt, answer) = self.heldout(f);
                Question {
                    prompt,
                    answer,
                    line: 0,
                }
            })
            .collect()
    }

    /// The evaluation questions, one per fact: the prompt ends with `Answer:`, the answer has
    /// its leading space (`" Trimont"`), and greedy decoding must produce it followed by a
    /// newline to count as exact.
    pub fn questions(&self) -> Vec<Question> {
        self.facts
            .iter()
            .map(|f| Question {
                prompt: self.question(f),
                answer: format!(" {}", f.answer),
                line: 0,
            })
            .collect()
    }

    /// [`Domain::questions`] as JSON Lines, one `{"answer": …, "prompt": …}` object per line
    /// (what `ggmerge eval -f` reads), ending with a newline.
    pub fn questions_jsonl(&self) -> String {
        let lines: Vec<String> = self
            .questions()
            .iter()
            .map(|q| serde_json::json!({"prompt": q.prompt, "answer": q.answer}).to_string())
            .collect();
        lines.join("\n") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_a_pure_function_of_the_seed() {
        let a = domains(12, 2026);
        assert_eq!(a, domains(12, 2026));
        assert_ne!(a, domains(12, 2027));
        // The first facts of a larger set are the smaller set's.
        assert_eq!(domains(4, 2026)[0].facts[..], a[0].facts[..4]);
        assert_eq!(a[0].train_text(3, 5), a[0].train_text(3, 5));
        assert_ne!(a[0].train_text(3, 5), a[0].train_text(3, 6));
    }

    #[test]
    fn names_are_distinct_and_every_phrasing_is_trained() {
        let [c, b] = domains(12, 1);
        let mut names: Vec<&str> = c
            .facts
            .iter()
            .chain(&b.facts)
            .flat_map(|f| [f.subject.as_str(), f.answer.as_str()])
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
        for d in [&c, &b] {
            let text = d.train_text(2, 7);
            assert_eq!(text.matches("\n\n").count() + 1, 2 * 5 * 12);
            for f in &d.facts {
                for p in d.phrasings(f) {
                    assert_eq!(text.matches(&p).count(), 2, "{p:?}");
                }
                // The held-out phrasing is never trained on.
                assert!(!text.contains(&d.heldout(f).0));
            }
            for q in d.questions() {
                assert!(text.contains(&format!("{}{}", q.prompt, q.answer)));
            }
        }
    }

    #[test]
    fn questions_jsonl_reads_back_as_eval_questions() {
        let [c, _] = domains(3, 9);
        let dir = std::env::temp_dir().join(format!("ggmerge-facts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.jsonl");
        std::fs::write(&path, c.questions_jsonl()).unwrap();
        let read = crate::flows::eval::read_questions(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        let want: Vec<Question> = c
            .questions()
            .into_iter()
            .enumerate()
            .map(|(i, q)| Question { line: i + 1, ..q })
            .collect();
        assert_eq!(read, want);
    }
}
