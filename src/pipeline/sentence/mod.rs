//! The sentence accumulator: streamed tokens in, speakable text units out. A unit is emitted as
//! soon as a sentence (or, for the first unit of a reply, a clause of a few words) is complete,
//! and what remains is flushed when generation ends. It knows abbreviations (English, German,
//! Spanish), initials, decimals, ellipses, closing quotes, numbered lists, line breaks and the
//! CJK full stops that need no space after them. No unit is longer than `max_chars` characters.
//!
//! The text comes from a model and can be anything, so the scan is incremental: each character
//! is examined a bounded number of times however the reply is split into tokens, and the work
//! per reply stays linear in its length.

pub(crate) mod stage;

/// Words after which a full stop does not end a sentence (compared lower-case, without the dot).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "u.s", "u.k",
    "a.m", "p.m", "approx", "dept", "fig", "inc", "ltd", "mt", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "cf", "al", "ph.d", "gen", "col", "capt",
    "lt", "sgt", "rev", "z.b", "d.h", "usw", "bzw", "ca", "nr", "vgl", "sra", "srta", "dra", "ud",
    "uds",
];

const CLOSERS: &[char] = &[
    '"', '\'', '”', '’', ')', ']', '»', '」', '』', '）', '】', '］', '〕', '〉', '》',
];

const OPENERS: &[char] = &['"', '\'', '“', '‘', '(', '[', '¿', '¡', '«', '„', '‚'];

/// Sentence ends of scripts written without spaces; they end a sentence wherever they stand.
const CJK_ENDS: &[char] = &['。', '！', '？', '．'];

/// Longer words skip the abbreviation, initial and number checks, which keeps them O(1).
const MAX_CHECKED_WORD: usize = 16;

/// How many spaces after a possible sentence end are read to see what follows it; past that the
/// unit is cut, so a flood of spaces is never rescanned.
const MAX_LOOKAHEAD: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceSettings {
    /// Emit the first clause of a reply at a comma, semicolon, colon or dash once it has this many
    /// words; 0 disables early clauses.
    pub first_clause_words: usize,
    /// No unit is longer than this many characters (not bytes): a longer one is split at its last
    /// whitespace, or after exactly this many characters if it has none. 0 counts as 1.
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
    /// Text received. `buf[..start]` is spent; it is dropped only once it outgrows the rest, so
    /// cutting a unit never moves the whole buffer.
    buf: String,
    start: usize,
    /// Byte offset up to which `buf` has been scanned.
    pos: usize,
    /// Characters scanned since the last reset, so lengths in characters need no rescan.
    seen: usize,
    /// First non-space character of the pending unit, as (byte offset, character index).
    text: Option<(usize, usize)>,
    /// Byte offset just past the last non-space character of the pending unit.
    text_end: usize,
    /// The last whitespace inside the pending unit: where an over-long unit is split.
    gap: Option<Gap>,
    /// Words in the pending unit, and since it began or since its last line break.
    words: usize,
    line_words: usize,
    /// The word being scanned, as (byte offset, character index); `None` after a space.
    word: Option<(usize, usize)>,
    /// The last character of that word that is not a closer: what decides a sentence end.
    core: Option<Core>,
    prev: char,
    /// A CJK sentence end was seen; the unit ends before the next character that is not a closer.
    cjk_end: Option<char>,
    /// A possible sentence end waits for the next non-space character.
    wait: Option<Wait>,
    emitted: usize,
    /// Characters examined; the tests hold it to a small multiple of the input.
    examined: usize,
}

#[derive(Debug, Clone, Copy)]
struct Gap {
    text_end: usize,
    next: usize,
    next_index: usize,
}

#[derive(Debug, Clone, Copy)]
struct Core {
    c: char,
    at: usize,
    index: usize,
    prev: char,
}

#[derive(Debug, Clone, Copy)]
struct Wait {
    /// The space after the possible end, not yet scanned.
    space: char,
    /// How far the lookahead has read, so more tokens resume it instead of restarting it.
    look: usize,
    spaces: usize,
    follow: Follow,
}

#[derive(Debug, Clone, Copy)]
enum Follow {
    /// The sentence ends only if a capital letter follows (ellipses, numbers).
    Capital,
    /// The sentence ends unless a "b" follows ("z. B.").
    NotB,
}

enum Decision {
    Cut,
    No,
    Wait(Follow),
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
        self.compact();
        self.buf.push_str(token);
        let mut out = Vec::new();
        self.scan(&mut out);
        out
    }

    /// Generation ended: whatever is left is the last unit.
    pub fn finish(&mut self) -> Option<String> {
        // Anything past `pos` is the lookahead of a pending end, which holds only spaces.
        let rest = self
            .text
            .map(|(begin, _)| self.buf[begin..self.text_end].to_string());
        self.reset();
        rest
    }

    /// Drops everything (barge-in).
    pub(crate) fn reset(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        *self = SentenceAccumulator {
            settings: self.settings,
            buf,
            examined: self.examined,
            ..Default::default()
        };
    }

    fn max_chars(&self) -> usize {
        self.settings.max_chars.max(1)
    }

    /// Drops the spent prefix once it is larger than what remains, which keeps the copying
    /// linear overall. Every offset still in use lies at or after `start`.
    fn compact(&mut self) {
        let n = self.start;
        if n == 0 || n <= self.buf.len() - n {
            return;
        }
        self.buf.drain(..n);
        self.start = 0;
        self.pos -= n;
        self.text_end = self.text_end.saturating_sub(n);
        if let Some(t) = &mut self.text {
            t.0 -= n;
        }
        if let Some(g) = &mut self.gap {
            g.text_end -= n;
            g.next -= n;
        }
        if let Some(w) = &mut self.word {
            w.0 -= n;
        }
        if let Some(c) = &mut self.core {
            c.at -= n;
        }
        if let Some(w) = &mut self.wait {
            w.look -= n;
        }
    }

    fn scan(&mut self, out: &mut Vec<String>) {
        loop {
            if let Some(wait) = self.wait {
                let Some(cut) = self.look(wait) else {
                    return;
                };
                self.wait = None;
                if cut {
                    self.cut(self.text_end, self.pos + wait.space.len_utf8(), out);
                    self.advance(wait.space);
                } else {
                    self.space(wait.space);
                }
                continue;
            }
            let Some(c) = self.buf[self.pos..].chars().next() else {
                return;
            };
            self.examined += 1;
            if let Some(end) = self.cjk_end {
                let digit = c.is_ascii_digit() || ('０'..='９').contains(&c);
                if end == '．' && digit {
                    // "３．１４" is a number, not a sentence end.
                    self.cjk_end = None;
                } else if !continues_end(c) {
                    self.cut(self.text_end, self.pos, out);
                }
            }
            if !c.is_whitespace() {
                self.split_if_full(out);
                self.letter(c);
                continue;
            }
            if c == '\n' && self.text.is_some() {
                self.cut(self.text_end, self.pos + 1, out);
                self.advance(c);
                continue;
            }
            if self.word.is_some() {
                match self.decide() {
                    Decision::Cut => {
                        self.cut(self.text_end, self.pos + c.len_utf8(), out);
                        self.advance(c);
                        continue;
                    }
                    Decision::Wait(follow) => {
                        self.wait = Some(Wait {
                            space: c,
                            look: self.pos + c.len_utf8(),
                            spaces: 0,
                            follow,
                        });
                        continue;
                    }
                    Decision::No => {}
                }
            }
            self.space(c);
        }
    }

    /// Reads on past the space after a possible end; `None` until the buffer says enough.
    fn look(&mut self, mut wait: Wait) -> Option<bool> {
        while let Some(c) = self.buf[wait.look..].chars().next() {
            self.examined += 1;
            if c == '\n' {
                return Some(true);
            }
            if !c.is_whitespace() {
                return Some(match wait.follow {
                    Follow::Capital => c.is_uppercase(),
                    Follow::NotB => !matches!(c, 'b' | 'B'),
                });
            }
            wait.spaces += 1;
            if wait.spaces > MAX_LOOKAHEAD {
                return Some(true);
            }
            wait.look += c.len_utf8();
        }
        self.wait = Some(wait);
        None
    }

    fn advance(&mut self, c: char) {
        self.pos += c.len_utf8();
        self.seen += 1;
        self.prev = c;
    }

    fn space(&mut self, c: char) {
        self.word = None;
        if self.text.is_some() {
            self.gap = Some(Gap {
                text_end: self.text_end,
                next: self.pos + c.len_utf8(),
                next_index: self.seen + 1,
            });
        } else {
            // Leading spaces belong to no unit; letting them go lets `compact` drop them.
            self.start = self.pos + c.len_utf8();
        }
        if c == '\n' {
            self.line_words = 0;
        }
        self.advance(c);
    }

    fn letter(&mut self, c: char) {
        if self.word.is_none() {
            self.word = Some((self.pos, self.seen));
            self.core = None;
            self.words += 1;
            self.line_words += 1;
        }
        if self.text.is_none() {
            self.text = Some((self.pos, self.seen));
        }
        self.text_end = self.pos + c.len_utf8();
        if !CLOSERS.contains(&c) {
            self.core = Some(Core {
                c,
                at: self.pos,
                index: self.seen,
                prev: self.prev,
            });
        }
        if CJK_ENDS.contains(&c) {
            self.cjk_end = Some(c);
        }
        self.advance(c);
    }

    /// Before the next non-space character: if it would make the unit too long, emit the unit up
    /// to its last whitespace, or, with none, the `max_chars` characters it already has.
    fn split_if_full(&mut self, out: &mut Vec<String>) {
        let Some((_, first)) = self.text else {
            return;
        };
        if self.seen - first < self.max_chars() {
            return;
        }
        let Some(gap) = self.gap else {
            self.cut(self.text_end, self.pos, out);
            return;
        };
        let (word, core, cjk_end) = (self.word, self.core, self.cjk_end);
        self.cut(gap.text_end, gap.next, out);
        if gap.next < self.pos {
            // The word after the gap stays pending; it is shorter than the unit that was cut.
            self.text = Some((gap.next, gap.next_index));
            self.words = 1;
            self.line_words = 1;
            (self.word, self.core, self.cjk_end) = (word, core, cjk_end);
        }
    }

    /// Emits the pending unit, which ends at `text_end`, and starts the next one at `next`.
    fn cut(&mut self, text_end: usize, next: usize, out: &mut Vec<String>) {
        if let Some((begin, _)) = self.text {
            out.push(self.buf[begin..text_end].to_string());
            self.emitted += 1;
        }
        self.start = next;
        self.text = None;
        self.gap = None;
        self.words = 0;
        self.line_words = 0;
        self.word = None;
        self.core = None;
        self.cjk_end = None;
    }

    /// At a space that ends a word: does the word end the unit?
    fn decide(&mut self) -> Decision {
        let (Some(word), Some(core)) = (self.word, self.core) else {
            return Decision::No;
        };
        match core.c {
            '!' | '?' => Decision::Cut,
            '…' => Decision::Wait(Follow::Capital),
            '.' if core.prev == '.' && core.index > word.1 => Decision::Wait(Follow::Capital),
            '.' => self.full_stop(word, core),
            ',' | ';' | ':' | '—' | '–' if self.emitted == 0 => {
                let n = self.settings.first_clause_words;
                if n > 0 && self.words >= n {
                    Decision::Cut
                } else {
                    Decision::No
                }
            }
            _ => Decision::No,
        }
    }

    fn full_stop(&mut self, word: (usize, usize), core: Core) -> Decision {
        let len = core.index - word.1;
        if len >= MAX_CHECKED_WORD {
            return Decision::Cut;
        }
        self.examined += len;
        let closed = core.at + 1 != self.pos;
        let stem = self.buf[word.0..core.at]
            .trim_start_matches(OPENERS)
            .trim_end_matches('.');
        let lower: String = stem.chars().flat_map(char::to_lowercase).collect();
        let mut chars = stem.chars();
        let single = chars.next().filter(|_| chars.next().is_none());
        if ABBREVIATIONS.contains(&lower.as_str()) {
            Decision::No
        } else if stem == "z" {
            Decision::Wait(Follow::NotB)
        } else if single.is_some_and(char::is_uppercase) {
            // An initial: "J. R. R. Tolkien".
            Decision::No
        } else if !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit()) {
            // "1." alone at the start of a line is a list marker; elsewhere a number ends a
            // sentence only if a capital letter follows ("I am 25. Next", not "1. apples").
            if self.line_words == 1 && !closed {
                Decision::No
            } else {
                Decision::Wait(Follow::Capital)
            }
        } else {
            Decision::Cut
        }
    }
}

/// What may stand after a CJK sentence end and still belong to its sentence ("？！", "。」").
fn continues_end(c: char) -> bool {
    CLOSERS.contains(&c) || CJK_ENDS.contains(&c) || matches!(c, '!' | '?' | '.' | '…')
}

#[cfg(test)]
mod tests;
