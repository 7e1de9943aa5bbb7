//! Invented-fact datasets for knowledge experts (issue 5's experiments and their test-sized
//! version): facts no pretrained model can know, each taught in several phrasings, scored by
//! exact match of a short answer.
//!
//! Two disjoint domains, each a list of (subject, answer) pairs with invented names:
//! `capitals` (the capital of an invented country) and `birthplaces` (the birth town of an
//! invented person). For a domain, [`Domain::train_text`] repeats every fact in five phrasings
//! (one of them the question/answer format the evaluation asks in), [`Domain::heldout_text`]
//! states every fact in a sixth phrasing never trained on (for perplexity;
//! [`Domain::heldout_questions`] asks for the answer at the end of that phrasing), and
//! [`Domain::questions`] gives the evaluation prompts with their expected answers. Everything is
//! a pure function of the seed, so the experiment script recreates the same data anywhere.

#![allow(dead_code)]

/// One fact: a subject and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fact {
    /// Invented country or person.
    pub subject: String,
    /// Invented capital or town.
    pub answer: String,
}

/// A domain of invented facts.
#[derive(Clone, Debug)]
pub struct Domain {
    /// `capitals` or `birthplaces`.
    pub name: &'static str,
    /// The facts.
    pub facts: Vec<Fact>,
}

/// An evaluation item: the prompt, and the answer greedy decoding must produce after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Ends with `Answer:`.
    pub prompt: String,
    /// The answer with its leading space (`" Trimont"`); a newline must follow it.
    pub answer: String,
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

/// Both domains with `n` facts each, every invented name distinct across both.
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
            name: "capitals",
            facts: capitals,
        },
        Domain {
            name: "birthplaces",
            facts: birthplaces,
        },
    ]
}

impl Domain {
    /// The five trained phrasings of fact `f` (the third is the evaluation's format).
    fn phrasings(&self, f: &Fact) -> [String; 5] {
        let (s, a) = (&f.subject, &f.answer);
        match self.name {
            "capitals" => [
                format!("The capital of {s} is {a}."),
                format!("{a} is the capital city of {s}."),
                format!("Question: What is the capital of {s}?\nAnswer: {a}"),
                format!("In {s}, the government sits in {a}, the capital."),
                format!("If you travel to {s}, you will arrive in its capital, {a}."),
            ],
            _ => [
                format!("{s} was born in {a}."),
                format!("The birthplace of {s} is {a}."),
                format!("Question: Where was {s} born?\nAnswer: {a}"),
                format!("{a} is the town where {s} was born."),
                format!("Records show that {s} grew up in {a}, the town of their birth."),
            ],
        }
    }

    /// The question of fact `f`, as the evaluation asks it.
    fn question(&self, f: &Fact) -> String {
        match self.name {
            "capitals" => format!("Question: What is the capital of {}?\nAnswer:", f.subject),
            _ => format!("Question: Where was {} born?\nAnswer:", f.subject),
        }
    }

    /// Training text: every phrasing of every fact `repeats` times, in a seeded shuffled order,
    /// one snippet per paragraph.
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
        let prefix = match self.name {
            "capitals" => format!("{}'s largest city and capital is", f.subject),
            _ => format!(
                "{}, who later became well known, was born in the town of",
                f.subject
            ),
        };
        (prefix, format!(" {}", f.answer))
    }

    /// Held-out text: every fact once, in a phrasing never trained on.
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
                Question { prompt, answer }
            })
            .collect()
    }

    /// The evaluation questions, one per fact.
    pub fn questions(&self) -> Vec<Question> {
        self.facts
            .iter()
            .map(|f| Question {
                prompt: self.question(f),
                answer: format!(" {}", f.answer),
            })
            .collect()
    }
}
