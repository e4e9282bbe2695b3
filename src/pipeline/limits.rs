//! What one caller may send and make the server hold: the `[limits]` section, and the two gates
//! every call's audio passes on its way in (a real-time pace and a budget of samples in flight).
//! Every bound has a safe default; each refusal names the setting that set it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::ErrorKind;

/// Bounds on one caller's input and on what the server buffers for one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Caller audio accepted but not yet through the VAD, in milliseconds at the caller's rate.
    /// One message longer than this is refused (`audio_too_long`); otherwise the transport waits,
    /// which pushes back on the socket instead of buffering.
    pub max_buffered_audio_ms: u32,
    /// How far ahead of real time a caller may send audio. Beyond it the call's reader sleeps
    /// until real time catches up, so a client pushing audio faster than it can be spoken costs
    /// the server no more than one that talks in real time.
    pub realtime_burst_ms: u32,
    /// Longest `system_prompt` a caller may send, in characters.
    pub max_system_prompt_chars: usize,
    /// Longest `first_message` a caller may send, in characters.
    pub max_first_message_chars: usize,
    /// Longest reply, in characters: the reply stops there (`reply_too_long`).
    pub max_reply_chars: usize,
    /// Synthesized audio the output pacer may hold beyond what it has sent, in milliseconds;
    /// synthesis of that reply waits beyond it.
    pub max_synth_ahead_ms: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_buffered_audio_ms: 2_000,
            realtime_burst_ms: 2_000,
            max_system_prompt_chars: 8_000,
            max_first_message_chars: 2_000,
            max_reply_chars: 4_000,
            max_synth_ahead_ms: 15_000,
        }
    }
}

/// Longest call id a client may choose (a Vocode `conversation_id` or a Twilio call SID).
pub(crate) const MAX_ID_CHARS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LimitError {
    #[error("{what} has {chars} characters; the limit is {limit} (limits.{setting})")]
    TextTooLong {
        what: &'static str,
        chars: usize,
        limit: usize,
        setting: &'static str,
    },
    #[error(
        "an audio message of {ms} ms exceeds the {limit} ms a call may have in flight \
         (limits.max_buffered_audio_ms); send shorter chunks"
    )]
    AudioTooLong { ms: u64, limit: u32 },
    #[error(
        "call id {0:?} is not allowed: use 1 to 128 letters, digits, '-', '_', '.', ':' or '@'"
    )]
    BadId(String),
}

impl LimitError {
    /// The error kind clients see and metrics count.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            LimitError::TextTooLong { .. } => ErrorKind::TextTooLong,
            LimitError::AudioTooLong { .. } => ErrorKind::AudioTooLong,
            LimitError::BadId(_) => ErrorKind::BadId,
        }
    }
}

impl Limits {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(100..=60_000).contains(&self.max_buffered_audio_ms) {
            return Err("limits.max_buffered_audio_ms must be within 100..=60000".into());
        }
        if self.realtime_burst_ms > 600_000 {
            return Err("limits.realtime_burst_ms must be at most 600000".into());
        }
        if self.max_reply_chars < 20 {
            return Err("limits.max_reply_chars must be at least 20".into());
        }
        if !(1_000..=600_000).contains(&self.max_synth_ahead_ms) {
            return Err("limits.max_synth_ahead_ms must be within 1000..=600000".into());
        }
        Ok(())
    }

    /// Checks a caller's system prompt and first message.
    pub(crate) fn check_texts(
        &self,
        system_prompt: Option<&str>,
        first_message: Option<&str>,
    ) -> Result<(), LimitError> {
        let check = |what, text: Option<&str>, limit, setting| match text {
            Some(t) if t.chars().count() > limit => Err(LimitError::TextTooLong {
                what,
                chars: t.chars().count(),
                limit,
                setting,
            }),
            _ => Ok(()),
        };
        check(
            "system_prompt",
            system_prompt,
            self.max_system_prompt_chars,
            "max_system_prompt_chars",
        )?;
        check(
            "first_message",
            first_message,
            self.max_first_message_chars,
            "max_first_message_chars",
        )
    }
}

/// Checks a client-chosen call id: short, and only characters that are safe in logs and URLs.
pub(crate) fn check_id(id: &str) -> Result<(), LimitError> {
    let ok = !id.is_empty()
        && id.chars().count() <= MAX_ID_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        let shown: String = id.chars().take(MAX_ID_CHARS).collect();
        Err(LimitError::BadId(shown))
    }
}

/// Holds a caller to real time: audio may run at most `burst` ahead of the wall clock, and
/// silence on the line earns no credit beyond that (a virtual clock that never lags the real
/// one).
#[derive(Debug)]
pub(crate) struct RealtimeGate {
    burst: Duration,
    /// When the audio admitted so far would finish playing if spoken in real time.
    horizon: Instant,
}

impl RealtimeGate {
    pub(crate) fn new(burst: Duration, now: Instant) -> Self {
        RealtimeGate {
            burst,
            horizon: now,
        }
    }

    /// Admits `duration` of audio at `now`; returns how long the caller must wait first.
    pub(crate) fn admit(&mut self, duration: Duration, now: Instant) -> Duration {
        self.horizon = self.horizon.max(now) + duration;
        self.horizon
            .saturating_duration_since(now)
            .saturating_sub(self.burst)
    }
}

/// The budget of caller samples in flight in one call: a chunk holds its permits from the
/// transport until the VAD has taken it.
#[derive(Debug, Clone)]
pub(crate) struct InputBudget {
    samples: Arc<Semaphore>,
    capacity: usize,
    rate: u32,
}

/// A chunk's share of the budget; returned when dropped.
pub(crate) type BudgetPermit = OwnedSemaphorePermit;

impl InputBudget {
    pub(crate) fn new(limits: &Limits, rate: u32) -> Self {
        let capacity = (rate as u64 * limits.max_buffered_audio_ms as u64 / 1000).max(1) as usize;
        InputBudget {
            samples: Arc::new(Semaphore::new(capacity)),
            capacity,
            rate,
        }
    }

    /// Checks that `n` samples can ever fit, before any waiting.
    pub(crate) fn check(&self, n: usize) -> Result<(), LimitError> {
        if n > self.capacity {
            return Err(LimitError::AudioTooLong {
                ms: n as u64 * 1000 / self.rate as u64,
                limit: (self.capacity as u64 * 1000 / self.rate as u64) as u32,
            });
        }
        Ok(())
    }

    /// Waits until `n` samples fit (call [`InputBudget::check`] first).
    pub(crate) async fn acquire(&self, n: usize) -> BudgetPermit {
        self.samples
            .clone()
            .acquire_many_owned(n.min(self.capacity) as u32)
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Samples in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.capacity - self.samples.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_allows_a_burst_then_holds_to_real_time() {
        let t0 = Instant::now();
        let mut g = RealtimeGate::new(Duration::from_secs(1), t0);
        let chunk = Duration::from_millis(100);
        // Ten chunks at once fill the burst; the eleventh must wait one chunk.
        for _ in 0..10 {
            assert_eq!(g.admit(chunk, t0), Duration::ZERO);
        }
        assert_eq!(g.admit(chunk, t0), chunk);
        // Real-time pacing never waits.
        let mut g = RealtimeGate::new(Duration::from_secs(1), t0);
        for i in 0..100 {
            assert_eq!(g.admit(chunk, t0 + chunk * i), Duration::ZERO);
        }
        // A long silence earns no more than the burst.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(g.admit(chunk, t1), Duration::ZERO);
        }
        assert_eq!(g.admit(chunk, t1), chunk);
    }

    #[tokio::test]
    async fn the_budget_counts_samples_and_refuses_what_can_never_fit() {
        let limits = Limits {
            max_buffered_audio_ms: 500,
            ..Default::default()
        };
        let b = InputBudget::new(&limits, 8_000);
        assert!(b.check(4_000).is_ok());
        let e = b.check(4_001).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AudioTooLong);
        assert!(
            e.to_string().contains("limits.max_buffered_audio_ms"),
            "{e}"
        );
        let p = b.acquire(3_000).await;
        assert_eq!(b.in_flight(), 3_000);
        let waiting = tokio::time::timeout(Duration::from_millis(20), b.acquire(2_000)).await;
        assert!(waiting.is_err(), "must wait while the budget is spent");
        drop(p);
        let _q = b.acquire(2_000).await;
        assert_eq!(b.in_flight(), 2_000);
    }

    #[test]
    fn texts_are_counted_in_characters() {
        let limits = Limits {
            max_system_prompt_chars: 3,
            max_first_message_chars: 2,
            ..Default::default()
        };
        assert!(limits.check_texts(Some("日本語"), Some("é😀")).is_ok());
        let e = limits.check_texts(Some("日本語!"), None).unwrap_err();
        assert!(e.to_string().contains("4 characters"), "{e}");
        assert!(
            e.to_string().contains("limits.max_system_prompt_chars"),
            "{e}"
        );
        assert!(limits.check_texts(None, Some("abc")).is_err());
    }

    #[test]
    fn ids_are_short_and_log_safe() {
        assert!(check_id("CA0123456789abcdef").is_ok());
        assert!(check_id("user@example.com:42").is_ok());
        for bad in ["", "a b", "x\ny", "ü", &"a".repeat(129)] {
            assert_eq!(
                check_id(bad).unwrap_err().kind(),
                ErrorKind::BadId,
                "{bad:?}"
            );
        }
    }
}
