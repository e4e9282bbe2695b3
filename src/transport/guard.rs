//! What transports do with what a caller says before it reaches a log line: untrusted strings are
//! escaped and cut short ([`Untrusted`]), so a newline cannot forge a log line and a megabyte
//! cannot flood one, and repeated warnings from one call are rate-limited ([`WarnLimiter`]) while
//! the metrics still count every one.

use std::fmt;
use std::time::{Duration, Instant};

/// Characters of an untrusted string shown in a log line.
const SHOWN_CHARS: usize = 80;

/// Displays an untrusted string for a log: control characters, quotes and backslashes escaped,
/// at most 80 characters, and how much was cut.
pub(crate) struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == SHOWN_CHARS {
                return write!(f, "\"…(+{} bytes)", self.0.len() - i);
            }
            if c.is_control() || c == '"' || c == '\\' || !is_plain(c) {
                for e in c.escape_default() {
                    f.write_fmt(format_args!("{e}"))?;
                }
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        f.write_str("\"")
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Printable characters that cannot disturb a terminal or a log parser: letters, digits,
/// punctuation and symbols, but no line or paragraph separators, bidi controls or other format
/// characters.
fn is_plain(c: char) -> bool {
    !matches!(c, '\u{2028}' | '\u{2029}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Warnings one call may log per window; the rest are counted and summed up later.
const WARNINGS_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);

/// Rate-limits one call's warnings: the first few per minute are logged, the rest are only
/// counted, and the count is logged when the window turns or the call ends.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }
}

impl WarnLimiter {
    /// Whether to log this warning now. Reports what the last window suppressed when it turns.
    pub(crate) fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= WINDOW {
            self.report();
            self.window_start = now;
            self.logged = 0;
        }
        if self.logged < WARNINGS_PER_WINDOW {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Warnings suppressed and not yet reported.
    #[cfg(test)]
    pub(crate) fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Logs how many warnings were suppressed, if any.
    pub(crate) fn report(&mut self) {
        if self.suppressed > 0 {
            tracing::warn!(
                suppressed = self.suppressed,
                "more bad input from this caller; only counted in gazelle_errors_total"
            );
            self.suppressed = 0;
        }
    }
}

impl Drop for WarnLimiter {
    fn drop(&mut self) {
        self.report();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_strings_are_escaped_and_cut() {
        let shown = Untrusted("r1.u2\nINFO forged line").to_string();
        assert_eq!(shown, "\"r1.u2\\nINFO forged line\"");
        assert!(!shown.contains('\n'));
        let shown = Untrusted("a\"b\\c\u{202E}d\u{1b}[31m").to_string();
        assert_eq!(shown, "\"a\\\"b\\\\c\\u{202e}d\\u{1b}[31m\"");
        let long = "é".repeat(1_000);
        let shown = Untrusted(&long).to_string();
        assert!(
            shown.starts_with(&format!("\"{}", "é".repeat(80))),
            "{shown}"
        );
        assert!(shown.ends_with("\"…(+1840 bytes)"), "{shown}");
        assert_eq!(Untrusted("日本語 😀").to_string(), "\"日本語 😀\"");
    }

    #[test]
    fn warnings_are_limited_per_window() {
        let t0 = Instant::now();
        let mut w = WarnLimiter {
            window_start: t0,
            logged: 0,
            suppressed: 0,
        };
        let allowed = (0..10_000).filter(|_| w.allow(t0)).count();
        assert_eq!(allowed, WARNINGS_PER_WINDOW as usize);
        assert_eq!(w.suppressed(), 10_000 - WARNINGS_PER_WINDOW as u64);
        // A new window logs again (and reports the suppressed count).
        assert!(w.allow(t0 + WINDOW));
        assert_eq!(w.suppressed(), 0);
    }
}
