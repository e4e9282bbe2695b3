//! Speech synthesis: the [`Synthesizer`] trait the call pipeline talks to, and its providers. A
//! synthesizer turns a stream of text units into a stream of audio chunks tagged with the unit they
//! speak, so the pipeline can tell how much of the text reached the user.
//!
//! Providers: [`espeak`] (local, the default), [`elevenlabs`] (websocket or HTTP), [`xtts`],
//! [`openai`] (any OpenAI-compatible speech server) and [`playht`]; [`http`] holds what the HTTP
//! ones share and [`fallback`] wraps a primary with a second voice for failed replies.

pub mod elevenlabs;
pub mod espeak;
pub mod fallback;
pub mod http;
pub mod openai;
pub mod playht;
pub mod xtts;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why speech failed. Messages name the provider and say what to check; they never carry a
/// secret (keys travel in headers, and server bodies are redacted before they land here).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TtsError {
    #[error("the local voice is unavailable: {0}")]
    Unavailable(String),
    #[error("synthesis failed: {0}")]
    Synthesis(String),
    #[error("{provider} is misconfigured: {detail}")]
    Config {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} rejected the API key (HTTP {status}); check the key in {key_env}")]
    Auth {
        provider: &'static str,
        status: u16,
        key_env: String,
    },
    #[error("{provider} quota or rate limit reached (HTTP 429): {detail}; wait or raise the plan's limits")]
    RateLimited {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} server error (HTTP {status}): {detail}; the service may be down")]
    Server {
        provider: &'static str,
        status: u16,
        detail: String,
    },
    #[error("{provider} refused the request (HTTP {status}): {detail}; check the voice and model settings")]
    Rejected {
        provider: &'static str,
        status: u16,
        detail: String,
    },
    #[error("{provider} timed out {what}")]
    Timeout {
        provider: &'static str,
        what: String,
    },
    #[error("cannot reach {provider}: {detail}")]
    Connect {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} audio stream was cut short: {detail}")]
    Truncated {
        provider: &'static str,
        detail: String,
    },
    #[error("{provider} sent something unexpected: {detail}")]
    Protocol {
        provider: &'static str,
        detail: String,
    },
}

/// One speakable piece of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextUnit {
    /// Position of the unit within its reply, from 0.
    pub index: usize,
    pub text: String,
}

/// Audio for (part of) a unit, mono f32.
#[derive(Debug, Clone)]
pub struct SynthChunk {
    pub unit: usize,
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// The last chunk of its unit.
    pub unit_done: bool,
}

/// Audio chunks of a reply, in order. The stream ends when the units' sender drops and everything
/// is spoken, or at the first `Err`.
pub(crate) type AudioStream = mpsc::Receiver<Result<SynthChunk, TtsError>>;

/// Chunks that may wait between a synthesizer and the output pacer. The pacer holds audio back to
/// the real-time lead, so a full queue makes synthesis of that reply wait (never other calls').
pub(crate) const AUDIO_QUEUE: usize = 64;

/// What the caller's transport will play, so a provider can ask for it directly (for example
/// ElevenLabs' `ulaw_8000` for a phone call) and spare a conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputHint {
    pub sample_rate: u32,
    pub encoding: crate::audio::Encoding,
}

/// A speech provider, shared by every call.
pub trait Synthesizer: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;

    /// Opens the voice for one call. Providers that keep a connection warm per call start it
    /// here, in the background, so the first sentence does not pay for the handshake.
    fn open(&self, hint: OutputHint) -> Box<dyn Voice>;
}

/// One call's voice: speaks one reply at a time.
pub trait Voice: Send + 'static {
    /// Speaks `units` as they arrive. Once `cancel` fires, in-flight synthesis stops promptly
    /// (the provider's stream or context is closed) and the stream ends.
    fn synthesize(
        &mut self,
        units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream;
}

pub(crate) use crate::net::install_crypto_provider;
