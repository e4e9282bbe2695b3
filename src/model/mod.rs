//! The speech-language model seam: the traits the call pipeline talks to, the scripted model
//! that stands in where no GPU or weights are at hand, a model behind an OpenAI-compatible API,
//! and a fallback for it. A model is shared by every call; each call
//! opens a session that owns its per-call state (for Gazelle, the KV cache).

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod device;
pub mod engine;
pub(crate) mod fallback;
pub mod gazelle;
pub(crate) mod loading;
pub mod openai;
pub mod scripted;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Any error of a model's own, kept whole (with its sources) across the seam.
pub(crate) type ModelError = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SlmError {
    #[error("{name} is still loading ({secs} s so far); watch /health and call again")]
    Loading { name: String, secs: u64 },
    #[error("{name} failed to load: {source}")]
    LoadFailed { name: String, source: ModelError },
    #[error("generation failed: {0}")]
    Generation(ModelError),
    #[error("too many model requests queued for this call")]
    Backlog,
    #[error(
        "the model is busy: {waiting} turns already wait for it (slm.gazelle.max_waiting_turns); \
         try again in a moment"
    )]
    Busy { waiting: usize },
    #[error("the model engine has stopped")]
    WorkerGone,
}

/// One user turn, as heard.
#[derive(Debug, Clone)]
pub(crate) struct UserTurn {
    /// Mono audio at 16 kHz, pads included.
    pub audio: Arc<[f32]>,
}

/// Tokens of a reply: text pieces in order, ending when the sender drops. An `Err` ends the
/// reply early.
pub(crate) type TokenStream = mpsc::Receiver<Result<String, SlmError>>;

/// How many tokens may wait between the model and the sentence accumulator. Generation waits when
/// it is full, which only happens if synthesis falls far behind.
pub(crate) const TOKEN_QUEUE: usize = 256;

/// Whether a model can take calls, as `/health` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ModelStatus {
    Ready,
    Loading { elapsed: std::time::Duration },
    Failed(String),
}

pub(crate) trait SpeechLanguageModel: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;

    /// Whether calls can open sessions now.
    fn status(&self) -> ModelStatus {
        ModelStatus::Ready
    }

    /// Opens the per-call state of one conversation, under its system prompt.
    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError>;
}

pub(crate) trait SlmSession: Send + 'static {
    /// Starts a reply to `turn`, the newest user turn of the session's conversation (the session
    /// keeps the turns before it). Generation stops between two tokens once `cancel` fires.
    fn respond(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream;

    /// Starts a reply to a turn that may still grow (preemptive generation at a pause). Its
    /// tokens stream as usual, and the caller keeps them from the user until it decides:
    /// [`Self::commit`] makes the turn final, [`Self::discard`] takes it back as if it never
    /// happened. The next `respond` or `begin_tentative` waits until one of the two.
    fn begin_tentative(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream;

    /// Makes the tentative turn final; its reply goes on streaming.
    fn commit(&mut self);

    /// Takes the tentative turn back: its reply stops where it stands and the model forgets the
    /// turn and everything generated for it.
    fn discard(&mut self);

    /// The last reply was cut off: only `spoken` reached the user, and the model should continue
    /// from there.
    fn reply_truncated(&mut self, spoken: &str) {
        let _ = spoken;
    }
}
