//! What the HTTP speech providers share: API keys that never print, the reqwest client with our
//! timeouts, the mapping of HTTP failures to [`TtsError`], decoding a streamed body (raw PCM,
//! µ-law or WAV, with bytes that straddle network chunks carried over), time-to-first-byte
//! measurement, and the per-reply loop that sends one request per text unit. Cancellation drops
//! the in-flight response, which closes its connection, so the server stops generating.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AudioStream, SynthChunk, TextUnit, TtsError, AUDIO_QUEUE};
use crate::audio::wav::{self, SampleFormat, StreamDecoder, WavError, WavFormat};
use crate::metrics::Metrics;

use crate::net::error_chain;
pub(crate) use crate::net::short;
pub use crate::net::ApiKey;

/// The key in the environment variable `env`; a missing or empty variable is a configuration
/// error that names the variable (never a value).
pub fn api_key(provider: &'static str, env: &str) -> Result<ApiKey, TtsError> {
    ApiKey::from_env(env).ok_or_else(|| TtsError::Config {
        provider,
        detail: format!("set the API key in the environment variable {env}"),
    })
}

/// How long a network speech provider may take, in `[tts.<provider>.timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderTimeouts {
    /// TCP, TLS and websocket handshakes.
    pub connect_ms: u64,
    /// From handing a unit over to its first audio byte.
    pub first_byte_ms: u64,
    /// Longest silence in the middle of a unit's audio.
    pub stall_ms: u64,
}

impl Default for ProviderTimeouts {
    fn default() -> Self {
        ProviderTimeouts {
            connect_ms: 3_000,
            first_byte_ms: 5_000,
            stall_ms: 5_000,
        }
    }
}

impl ProviderTimeouts {
    pub(crate) fn get(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(self.connect_ms),
            first_byte: Duration::from_millis(self.first_byte_ms),
            stall: Duration::from_millis(self.stall_ms),
        }
    }

    pub(crate) fn validate(&self, provider: &str) -> Result<(), String> {
        if self.connect_ms == 0 || self.first_byte_ms == 0 || self.stall_ms == 0 {
            return Err(format!("tts.{provider}.timeouts must all be above 0 ms"));
        }
        Ok(())
    }
}

/// How long a provider may take; from the `[tts.<provider>]` config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// TCP + TLS (+ websocket) handshake.
    pub connect: Duration,
    /// From sending a unit to its first audio byte.
    pub first_byte: Duration,
    /// Between two pieces of a unit's audio once it has started.
    pub stall: Duration,
}

/// The reqwest client of one provider: connect timeout set, no proxy lookup, rustls with ring.
pub(crate) fn client(
    provider: &'static str,
    timeouts: &Timeouts,
) -> Result<reqwest::Client, TtsError> {
    crate::net::client(timeouts.connect).map_err(|e| TtsError::Config {
        provider,
        detail: format!("cannot build the HTTP client: {e}"),
    })
}

/// Maps a failed HTTP status to its error. `body` is what the server said, already redacted.
pub(crate) fn status_error(
    provider: &'static str,
    status: u16,
    body: &str,
    key_env: &str,
) -> TtsError {
    let detail = short(body);
    match status {
        401 | 403 => TtsError::Auth {
            provider,
            status,
            key_env: key_env.to_string(),
        },
        429 => TtsError::RateLimited { provider, detail },
        500..=599 => TtsError::Server {
            provider,
            status,
            detail,
        },
        _ => TtsError::Rejected {
            provider,
            status,
            detail,
        },
    }
}

/// Maps a reqwest failure (no HTTP status) to its error. reqwest's messages name the URL, which
/// never carries a key (keys travel in headers).
pub(crate) fn request_error(
    provider: &'static str,
    e: &reqwest::Error,
    during_body: bool,
) -> TtsError {
    let detail = error_chain(e);
    if e.is_timeout() {
        TtsError::Timeout {
            provider,
            what: format!("waiting for the server ({detail})"),
        }
    } else if during_body || e.is_body() || e.is_decode() {
        TtsError::Truncated { provider, detail }
    } else {
        TtsError::Connect { provider, detail }
    }
}

/// The audio a response body carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFormat {
    /// Headerless signed 16-bit little-endian mono PCM.
    Pcm16 { rate: u32 },
    /// Headerless G.711 µ-law, 8 kHz.
    Mulaw8k,
    /// A WAV stream: the header sets the format.
    Wav,
}

/// Turns body bytes into samples, whatever the network chunking.
#[derive(Debug)]
pub(crate) struct BodyDecoder {
    decoder: StreamDecoder,
    /// WAV only: bytes gathered until the whole header has arrived.
    head: Option<Vec<u8>>,
}

/// A WAV header longer than this is not a header we can use.
const MAX_WAV_HEADER: usize = 4096;

impl BodyDecoder {
    pub(crate) fn new(format: BodyFormat) -> Self {
        let default = match format {
            BodyFormat::Pcm16 { rate } => WavFormat {
                sample_format: SampleFormat::Pcm16,
                channels: 1,
                sample_rate: rate,
            },
            BodyFormat::Mulaw8k => WavFormat {
                sample_format: SampleFormat::Mulaw,
                channels: 1,
                sample_rate: 8_000,
            },
            BodyFormat::Wav => WavFormat {
                sample_format: SampleFormat::Pcm16,
                channels: 1,
                sample_rate: 24_000,
            },
        };
        BodyDecoder {
            decoder: StreamDecoder::new(default),
            head: (format == BodyFormat::Wav).then(Vec::new),
        }
    }

    /// The rate of the samples `push` returns.
    pub(crate) fn sample_rate(&self) -> u32 {
        self.decoder.format().sample_rate
    }

    /// Decodes the next piece of the body; a partial sample or header waits for the next one.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        if let Some(head) = self.head.as_mut() {
            head.extend_from_slice(bytes);
            match wav::parse_header(head) {
                Ok(_) => {
                    let head = self.head.take().unwrap_or_default();
                    return self.decoder.push(&head).map_err(|e| e.to_string());
                }
                Err(WavError::Truncated(_)) if head.len() < MAX_WAV_HEADER => return Ok(Vec::new()),
                Err(e) => return Err(format!("bad WAV header: {e}")),
            }
        }
        self.decoder.push(bytes).map_err(|e| e.to_string())
    }
}

/// Records one unit's time to first byte: the histogram and a debug line.
pub(crate) fn record_ttfb(metrics: &Metrics, provider: &str, unit: usize, ttfb: Duration) {
    metrics
        .tts_ttfb_seconds
        .with_label_values(&[provider])
        .observe(ttfb.as_secs_f64());
    tracing::debug!(
        provider,
        unit,
        ttfb_ms = ttfb.as_secs_f64() * 1e3,
        "first audio byte"
    );
}

/// A future that builds one unit's request (it may first fetch something once, like a speaker).
pub(crate) type RequestFuture =
    Pin<Box<dyn Future<Output = Result<reqwest::RequestBuilder, TtsError>> + Send>>;

/// Builds the request for a unit.
pub(crate) type BuildRequest = Arc<dyn Fn(&TextUnit) -> RequestFuture + Send + Sync>;

/// What one HTTP provider needs to speak a reply.
#[derive(Clone)]
pub(crate) struct HttpSpeaker {
    pub provider: &'static str,
    pub timeouts: Timeouts,
    pub metrics: Arc<Metrics>,
    /// For the error messages, and to redact server messages that echo it.
    pub key: Option<ApiKey>,
    pub format: BodyFormat,
    pub build: BuildRequest,
}

impl HttpSpeaker {
    /// Speaks each unit with its own request, in order, until the units end or `cancel` fires.
    pub(crate) fn speak(
        &self,
        mut units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        // Bounded like every synthesizer's output: a full queue makes this reply's reading of the
        // body wait, which backs the server off through TCP.
        let (tx, rx) = mpsc::channel(AUDIO_QUEUE);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let unit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    u = units.recv() => match u { Some(u) => u, None => return },
                };
                let result = tokio::select! {
                    // Dropping the unit's future drops its response: the connection closes.
                    _ = cancel.cancelled() => return,
                    r = me.speak_unit(&unit, &tx) => r,
                };
                match result {
                    Ok(true) => {}
                    Ok(false) => return, // the consumer is gone
                    Err(e) => {
                        tracing::warn!(provider = me.provider, unit = unit.index, error = %e, "speech failed");
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        rx
    }

    /// One unit: request, stream, decode. `Ok(false)` when the receiver is gone.
    async fn speak_unit(
        &self,
        unit: &TextUnit,
        tx: &mpsc::Sender<Result<SynthChunk, TtsError>>,
    ) -> Result<bool, TtsError> {
        let provider = self.provider;
        let started = Instant::now();
        let first_byte = self.timeouts.first_byte;
        let timeout = || TtsError::Timeout {
            provider,
            what: format!("after {} ms without audio", first_byte.as_millis()),
        };
        let deadline = tokio::time::Instant::from_std(started + first_byte);
        let request = tokio::time::timeout_at(deadline, (self.build)(unit))
            .await
            .map_err(|_| timeout())??;
        let response = tokio::time::timeout_at(deadline, request.send())
            .await
            .map_err(|_| timeout())?
            .map_err(|e| request_error(provider, &e, false))?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let body = tokio::time::timeout(Duration::from_secs(2), response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let body = self.key.as_ref().map_or(body.clone(), |k| k.redact(&body));
            let key_env = self.key.as_ref().map_or("the key variable", |k| k.env());
            return Err(status_error(provider, status, &body, key_env));
        }
        let mut body = response.bytes_stream();
        let mut decoder = BodyDecoder::new(self.format);
        let mut got_bytes = false;
        loop {
            let wait = if got_bytes {
                tokio::time::Instant::now() + self.timeouts.stall
            } else {
                deadline
            };
            let piece = match tokio::time::timeout_at(wait, body.next()).await {
                Err(_) if got_bytes => {
                    return Err(TtsError::Timeout {
                        provider,
                        what: format!(
                            "mid-stream: no audio for {} ms",
                            self.timeouts.stall.as_millis()
                        ),
                    })
                }
                Err(_) => return Err(timeout()),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(request_error(provider, &e, true)),
                Ok(Some(Ok(bytes))) => bytes,
            };
            if piece.is_empty() {
                continue;
            }
            if !got_bytes {
                got_bytes = true;
                record_ttfb(&self.metrics, provider, unit.index, started.elapsed());
            }
            let samples = decoder
                .push(&piece)
                .map_err(|detail| TtsError::Protocol { provider, detail })?;
            if samples.is_empty() {
                continue;
            }
            let chunk = SynthChunk {
                unit: unit.index,
                samples,
                sample_rate: decoder.sample_rate(),
                unit_done: false,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Ok(false);
            }
        }
        if !got_bytes {
            return Err(TtsError::Truncated {
                provider,
                detail: "the response ended before any audio".into(),
            });
        }
        let done = SynthChunk {
            unit: unit.index,
            samples: Vec::new(),
            sample_rate: decoder.sample_rate(),
            unit_done: true,
        };
        Ok(tx.send(Ok(done)).await.is_ok())
    }
}

/// Every HTTP provider's per-call voice is its speaker: no state survives between replies.
impl super::Voice for HttpSpeaker {
    fn synthesize(
        &mut self,
        units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        self.speak(units, cancel)
    }
}

/// `base` without a trailing slash, so paths can be appended.
pub(crate) fn trim_base(base: &str) -> String {
    base.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_debug_and_redaction_hide_the_value() {
        std::env::set_var("GAZELLE_TEST_HTTP_KEY", "sk-very-secret");
        let k = api_key("openai", "GAZELLE_TEST_HTTP_KEY").unwrap();
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("sk-very-secret") && dbg.contains("GAZELLE_TEST_HTTP_KEY"));
        assert_eq!(k.redact("bad key sk-very-secret!"), "bad key ***!");
        let err = api_key("openai", "GAZELLE_TEST_NO_SUCH_KEY").unwrap_err();
        assert!(
            err.to_string().contains("GAZELLE_TEST_NO_SUCH_KEY"),
            "{err}"
        );
    }

    #[test]
    fn statuses_map_to_their_errors() {
        let e = |s| status_error("xtts", s, "nope", "K");
        assert!(matches!(e(401), TtsError::Auth { status: 401, .. }));
        assert!(matches!(e(403), TtsError::Auth { status: 403, .. }));
        assert!(matches!(e(429), TtsError::RateLimited { .. }));
        assert!(matches!(e(503), TtsError::Server { status: 503, .. }));
        assert!(matches!(e(422), TtsError::Rejected { status: 422, .. }));
        assert!(e(401).to_string().contains("check the key in K"));
    }

    #[test]
    fn pcm_bytes_split_anywhere_decode_the_same() {
        let samples: Vec<i16> = (0..101).map(|i| (i * 300 - 15_000) as i16).collect();
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        for split in [1usize, 3, 7, 64] {
            let mut d = BodyDecoder::new(BodyFormat::Pcm16 { rate: 24_000 });
            let mut out = Vec::new();
            for piece in bytes.chunks(split) {
                out.extend(d.push(piece).unwrap());
            }
            let expect: Vec<f32> = samples
                .iter()
                .map(|&s| crate::audio::pcm::i16_to_f32(s))
                .collect();
            assert_eq!(out, expect, "split {split}");
        }
    }

    #[test]
    fn wav_header_split_across_pieces_sets_the_rate() {
        let file = wav::write(&[0.25; 50], 22_050, crate::audio::Encoding::Linear16);
        let mut d = BodyDecoder::new(BodyFormat::Wav);
        let mut out = Vec::new();
        for piece in file.chunks(5) {
            out.extend(d.push(piece).unwrap());
        }
        assert_eq!(d.sample_rate(), 22_050);
        assert_eq!(out.len(), 50);
        let mut m = BodyDecoder::new(BodyFormat::Mulaw8k);
        assert_eq!(m.push(&[0xFF, 0x7F]).unwrap().len(), 2);
        assert_eq!(m.sample_rate(), 8_000);
    }
}
