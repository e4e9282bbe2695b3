//! The sentence accumulator: streamed tokens in, speakable text units out. A unit is emitted as
//! soon as a sentence (or, for the first unit of a reply, a clause of a few words) is complete,
//! and what remains is flushed when generation ends. It knows abbreviations, initials, decimals,
//! ellipses, closing quotes, numbered lists and line breaks.

/// Words after which a full stop does not end a sentence (compared lower-case, without the dot).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "u.s", "u.k",
    "a.m", "p.m", "approx", "dept", "fig", "inc", "ltd", "mt", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "cf", "al", "ph.d", "gen", "col", "capt",
    "lt", "sgt", "rev",
];

const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '»'];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceSettings {
    /// Emit the first clause of a reply at a comma, semicolon, colon or dash once it has this many
    /// words; 0 disables early clauses.
    pub first_clause_words: usize,
    /// A unit longer than this many characters is split at its last space.
    pub max_chars: usize,
}

impl Default for SentenceSettings {
    fn default() -> Self {
        SentenceSettings {
            first_clause_words: 4,
            max_chars: 240,
        }
    }
}

#[derive(Debug, Default)]
pub struct SentenceAccumulator {
    settings: SentenceSettings,
    buf: String,
    /// Byte offset up to which `buf` has been examined for boundaries.
    scanned: usize,
    emitted: usize,
}

impl SentenceAccumulator {
    pub fn new(settings: SentenceSettings) -> Self {
        SentenceAccumulator {
            settings,
            ..Default::default()
        }
    }

    /// Adds a token; returns the units it completed.
    pub fn push(&mut self, token: &str) -> Vec<String> {
        self.buf.push_str(token);
        let mut out = Vec::new();
        while let Some(cut) = self.find_boundary() {
            let unit: String = self.buf.drain(..cut).collect();
            self.scanned = 0;
            let unit = unit.trim();
            if !unit.is_empty() {
                out.push(unit.to_string());
                self.emitted += 1;
            }
        }
        out
    }

    /// Generation ended: whatever is left is the last unit.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        self.scanned = 0;
        self.emitted = 0;
        let rest = rest.trim();
        (!rest.is_empty()).then(|| rest.to_string())
    }

    /// Drops everything (barge-in).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.emitted = 0;
    }

    /// The byte offset just past the first complete unit in `buf`, if any.
    fn find_boundary(&mut self) -> Option<usize> {
        let chars: Vec<(usize, char)> = self.buf.char_indices().collect();
        let start = chars
            .iter()
            .position(|&(i, _)| i >= self.scanned)
            .unwrap_or(chars.len());
        for k in start..chars.len() {
            let (i, c) = chars[k];
            if c == '\n' {
                if !self.buf[..i].trim().is_empty() {
                    return Some(i + 1);
                }
                continue;
            }
            if !c.is_whitespace() {
                continue;
            }
            // `c` is a space: look at what it ends.
            let before = &self.buf[..i];
            match self.ends_unit(before, &chars[k + 1..]) {
                Decision::Cut => return Some(i + 1),
                Decision::No => {}
                Decision::NeedMore => {
                    self.scanned = i;
                    return None;
                }
            }
        }
        if self.buf.len() > self.settings.max_chars {
            if let Some(sp) = self.buf[..self.settings.max_chars].rfind(' ') {
                return Some(sp + 1);
            }
        }
        self.scanned = self.buf.len();
        None
    }

    fn ends_unit(&self, before: &str, after: &[(usize, char)]) -> Decision {
        let trimmed = before.trim_end_matches(CLOSERS);
        let Some(last) = trimmed.chars().last() else {
            return Decision::No;
        };
        let word = trimmed.rsplit(char::is_whitespace).next().unwrap_or("");
        match last {
            '!' | '?' => Decision::Cut,
            '…' => capital_follows(after),
            '.' if trimmed.ends_with("..") => capital_follows(after),
            '.' => {
                let stem = word.trim_start_matches(['"', '\'', '“', '‘', '(', '[']);
                let stem = stem.trim_end_matches('.');
                let lower = stem.to_lowercase();
                if ABBREVIATIONS.contains(&lower.as_str()) {
                    Decision::No
                } else if stem.chars().count() == 1 && stem.chars().all(char::is_uppercase) {
                    // An initial: "J. R. R. Tolkien".
                    Decision::No
                } else if !stem.is_empty() && stem.chars().all(|c| c.is_ascii_digit()) {
                    // "1." at the start of a line is a list marker; elsewhere a number ends a
                    // sentence only if a capital letter follows ("I am 25. Next", not "1. apples").
                    let line = before.rsplit('\n').next().unwrap_or("").trim();
                    if line == word {
                        Decision::No
                    } else {
                        capital_follows(after)
                    }
                } else {
                    Decision::Cut
                }
            }
            ',' | ';' | ':' | '—' | '–' if self.emitted == 0 => {
                let n = self.settings.first_clause_words;
                let words = before.split_whitespace().count();
                if n > 0 && words >= n {
                    Decision::Cut
                } else {
                    Decision::No
                }
            }
            _ => Decision::No,
        }
    }
}

enum Decision {
    Cut,
    No,
    NeedMore,
}

/// Ends the sentence only if what follows starts with a capital letter (ellipses, numbers).
fn capital_follows(after: &[(usize, char)]) -> Decision {
    match after.iter().map(|&(_, c)| c).find(|c| !c.is_whitespace()) {
        None => Decision::NeedMore,
        Some(c) if c.is_uppercase() => Decision::Cut,
        Some(_) => Decision::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` word-piece by word-piece (as a model streams) and collects every unit.
    fn units(text: &str, settings: SentenceSettings) -> Vec<String> {
        let mut acc = SentenceAccumulator::new(settings);
        let mut out = Vec::new();
        let mut piece = String::new();
        for ch in text.chars() {
            if ch.is_whitespace() && !piece.is_empty() {
                out.extend(acc.push(&piece));
                piece.clear();
            }
            piece.push(ch);
        }
        out.extend(acc.push(&piece));
        out.extend(acc.finish());
        out
    }

    fn no_clauses() -> SentenceSettings {
        SentenceSettings {
            first_clause_words: 0,
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[&str])] = &[
            (
                "Hello there. How are you?",
                &["Hello there.", "How are you?"],
            ),
            ("Wow! Really? Yes.", &["Wow!", "Really?", "Yes."]),
            (
                "Mr. Smith met Dr. Jones today. Fine.",
                &["Mr. Smith met Dr. Jones today.", "Fine."],
            ),
            (
                "Use tools, e.g. a hammer. Done.",
                &["Use tools, e.g. a hammer.", "Done."],
            ),
            (
                "The U.S. economy grew. Good.",
                &["The U.S. economy grew.", "Good."],
            ),
            ("Pi is 3.14 roughly. Yes.", &["Pi is 3.14 roughly.", "Yes."]),
            ("Well... maybe not. Ok.", &["Well... maybe not.", "Ok."]),
            (
                "I waited... Then it rang.",
                &["I waited...", "Then it rang."],
            ),
            (
                "He said \"stop.\" Then left.",
                &["He said \"stop.\"", "Then left."],
            ),
            ("(It works.) Next one.", &["(It works.)", "Next one."]),
            (
                "Steps:\n1. Open it.\n2. Close it.",
                &["Steps:", "1. Open it.", "2. Close it."],
            ),
            (
                "Items: 1. apples and 2. pears",
                &["Items: 1. apples and 2. pears"],
            ),
            ("Line one\nLine two", &["Line one", "Line two"]),
            (
                "J. R. R. Tolkien wrote it.",
                &["J. R. R. Tolkien wrote it."],
            ),
            (
                "It cost 1,000 dollars. Ok.",
                &["It cost 1,000 dollars.", "Ok."],
            ),
            (
                "I am 25. Next year I turn 26.",
                &["I am 25.", "Next year I turn 26."],
            ),
            ("Say no. Then go.", &["Say no.", "Then go."]),
            ("no ending punctuation", &["no ending punctuation"]),
            ("", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(units(input, no_clauses()), *want, "input {input:?}");
        }
    }

    #[test]
    fn first_clause_is_emitted_early_only_once() {
        let s = SentenceSettings {
            first_clause_words: 4,
            ..Default::default()
        };
        let cases: &[(&str, &[&str])] = &[
            (
                "Well I think that, all things considered, it works. Yes, it does.",
                &[
                    "Well I think that,",
                    "all things considered, it works.",
                    "Yes, it does.",
                ],
            ),
            ("Hi, there. Ok.", &["Hi, there.", "Ok."]),
        ];
        for (input, want) in cases {
            assert_eq!(units(input, s), *want, "input {input:?}");
        }
    }

    #[test]
    fn units_come_out_as_soon_as_the_next_token_starts() {
        let mut acc = SentenceAccumulator::new(no_clauses());
        assert!(acc.push("Hello").is_empty());
        assert!(acc.push(" world.").is_empty());
        assert_eq!(acc.push(" Next"), vec!["Hello world."]);
        assert_eq!(acc.finish().as_deref(), Some("Next"));
    }

    #[test]
    fn long_runs_are_split_at_a_space() {
        let s = SentenceSettings {
            first_clause_words: 0,
            max_chars: 20,
        };
        let u = units("aaaa bbbb cccc dddd eeee ffff gggg", s);
        assert!(u.iter().all(|x| x.len() <= 20), "{u:?}");
        assert_eq!(u.join(" "), "aaaa bbbb cccc dddd eeee ffff gggg");
    }

    #[test]
    fn reset_drops_pending_text() {
        let mut acc = SentenceAccumulator::new(no_clauses());
        acc.push("half a sent");
        acc.reset();
        assert_eq!(acc.finish(), None);
    }
}
