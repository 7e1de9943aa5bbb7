//! Stop strings over streamed text: text is released as soon as it cannot be the start of a
//! stop string, so a client never sees part of one, and generation stops at the first full
//! match (the stop string itself is not returned), as OpenAI's `stop` does.

/// Matches stop strings against text arriving piece by piece.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that can be released now and whether a stop string was
    /// completed (then nothing after it is released, and the caller stops).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        // The earliest complete stop string, if any.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// The text still held at the end of generation (no stop string came).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, on a char
/// boundary.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = (stop.len() - 1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            let start = text.len() - k;
            text.is_char_boundary(start)
                && stop.is_char_boundary(k)
                && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (emit, hit) = m.push(p);
            out.push_str(&emit);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_pieces_are_cut_and_never_shown() {
        assert_eq!(
            run(&["\n\n"], &["Paris", ".\n", "\nMore"]),
            ("Paris.".into(), true)
        );
        assert_eq!(
            run(&["END"], &["ab", "E", "N", "x"]),
            ("abENx".into(), false)
        );
        assert_eq!(run(&["END", "N"], &["abE", "Nx"]), ("abE".into(), true));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!", "x"]), ("caf".into(), true));
        // Held text is released once it cannot start a stop string.
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("aST"), ("a".into(), false));
        assert_eq!(m.push("x"), ("STx".into(), false));
    }
}
