//! Coqui's xtts-streaming-server: `POST /tts_stream` with the text and a speaker (its
//! `speaker_embedding` and `gpt_cond_latent`), answered with 24 kHz s16le as it is generated.
//! The speaker is computed once, by the server, from a reference WAV (`POST /clone_speaker`) or
//! picked by name from `GET /studio_speakers`, then cached for every call.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::http::{self, BodyFormat, HttpSpeaker, ProviderTimeouts, Timeouts};
use super::{OutputHint, Synthesizer, TtsError, Voice};
use crate::metrics::Metrics;

const PROVIDER: &str = "xtts";
const RATE: u32 = 24_000;

/// `[tts.xtts]`: exactly one of `speaker_wav` and `studio_speaker`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XttsConfig {
    pub base_url: String,
    /// A reference recording of the voice to clone (a few seconds of clean speech).
    pub speaker_wav: Option<PathBuf>,
    /// A speaker the server ships, by name.
    pub studio_speaker: Option<String>,
    pub language: String,
    /// Tokens per streamed piece: smaller starts sooner, larger is more efficient.
    pub stream_chunk_size: u32,
    pub timeouts: ProviderTimeouts,
}

impl Default for XttsConfig {
    fn default() -> Self {
        XttsConfig {
            base_url: "http://localhost:8000".into(),
            speaker_wav: None,
            studio_speaker: None,
            language: "en".into(),
            stream_chunk_size: 20,
            timeouts: ProviderTimeouts::default(),
        }
    }
}

impl XttsConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match (&self.speaker_wav, &self.studio_speaker) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(
                "tts.xtts needs exactly one of speaker_wav (a reference WAV to clone) and \
                      studio_speaker (a name from the server's /studio_speakers)"
                    .into(),
            ),
        }
    }
}

/// The server's speaker, kept as the JSON text it sent: it is forwarded verbatim with every
/// request, and re-serialising thousands of floats per unit would cost more than the copy.
#[derive(Debug)]
struct Speaker {
    embedding: String,
    latent: String,
}

#[derive(Deserialize)]
struct SpeakerJson {
    speaker_embedding: serde_json::Value,
    gpt_cond_latent: serde_json::Value,
}

struct Inner {
    client: reqwest::Client,
    base: String,
    config: XttsConfig,
    timeouts: Timeouts,
    /// Filled by the first call that needs it; a failed fetch leaves it empty to retry.
    speaker: OnceCell<Arc<Speaker>>,
}

/// The XTTS provider, shared by every call.
pub struct Xtts {
    inner: Arc<Inner>,
    metrics: Arc<Metrics>,
}

impl Xtts {
    pub fn new(config: &XttsConfig, metrics: Arc<Metrics>) -> Result<Self, TtsError> {
        config.validate().map_err(|detail| TtsError::Config {
            provider: PROVIDER,
            detail,
        })?;
        let timeouts = config.timeouts.get();
        Ok(Xtts {
            inner: Arc::new(Inner {
                client: http::client(PROVIDER, &timeouts)?,
                base: http::trim_base(&config.base_url),
                config: config.clone(),
                timeouts,
                speaker: OnceCell::new(),
            }),
            metrics,
        })
    }
}

impl Inner {
    async fn speaker(&self) -> Result<Arc<Speaker>, TtsError> {
        self.speaker
            .get_or_try_init(|| async {
                let s = tokio::time::timeout(self.timeouts.first_byte * 4, self.fetch_speaker())
                    .await
                    .map_err(|_| TtsError::Timeout {
                        provider: PROVIDER,
                        what: "fetching the speaker".into(),
                    })??;
                tracing::info!(base = %self.base, "xtts speaker ready");
                Ok(Arc::new(s))
            })
            .await
            .cloned()
    }

    async fn fetch_speaker(&self) -> Result<Speaker, TtsError> {
        let req = match (&self.config.speaker_wav, &self.config.studio_speaker) {
            (Some(path), _) => {
                let bytes = tokio::fs::read(path).await.map_err(|e| TtsError::Config {
                    provider: PROVIDER,
                    detail: format!("cannot read speaker_wav {}: {e}", path.display()),
                })?;
                let part = reqwest::multipart::Part::bytes(bytes)
                    .file_name("speaker.wav")
                    .mime_str("audio/wav")
                    .expect("a valid mime type");
                let form = reqwest::multipart::Form::new().part("wav_file", part);
                self.client
                    .post(format!("{}/clone_speaker", self.base))
                    .multipart(form)
            }
            (None, _) => self.client.get(format!("{}/studio_speakers", self.base)),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| http::request_error(PROVIDER, &e, false))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| http::request_error(PROVIDER, &e, true))?;
        if !(200..300).contains(&status) {
            return Err(http::status_error(
                PROVIDER,
                status,
                &text,
                "(xtts uses no key)",
            ));
        }
        let bad = |detail: String| TtsError::Protocol {
            provider: PROVIDER,
            detail,
        };
        let parsed: SpeakerJson = match &self.config.studio_speaker {
            Some(name) => {
                let mut all: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                let names: Vec<String> = all.keys().take(20).cloned().collect();
                let one = all.remove(name).ok_or_else(|| TtsError::Config {
                    provider: PROVIDER,
                    detail: format!("no studio speaker {name:?}; the server has {names:?}"),
                })?;
                serde_json::from_value(one).map_err(|e| bad(e.to_string()))?
            }
            None => serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?,
        };
        Ok(Speaker {
            embedding: parsed.speaker_embedding.to_string(),
            latent: parsed.gpt_cond_latent.to_string(),
        })
    }
}

impl Synthesizer for Xtts {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn open(&self, _hint: OutputHint) -> Box<dyn Voice> {
        // Fetch the speaker now, so the call's first sentence does not wait for it.
        if self.inner.speaker.get().is_none() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let inner = self.inner.clone();
                rt.spawn(async move {
                    if let Err(e) = inner.speaker().await {
                        tracing::warn!(error = %e, "cannot prepare the xtts speaker");
                    }
                });
            }
        }
        let inner = self.inner.clone();
        let build: http::BuildRequest = Arc::new(move |unit| {
            let inner = inner.clone();
            let text = unit.text.clone();
            Box::pin(async move {
                let speaker = inner.speaker().await?;
                let body = format!(
                    "{{\"text\":{},\"language\":{},\"speaker_embedding\":{},\"gpt_cond_latent\":{},\
                     \"add_wav_header\":false,\"stream_chunk_size\":\"{}\"}}",
                    serde_json::Value::from(text),
                    serde_json::Value::from(inner.config.language.as_str()),
                    speaker.embedding,
                    speaker.latent,
                    inner.config.stream_chunk_size,
                );
                Ok(inner
                    .client
                    .post(format!("{}/tts_stream", inner.base))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body))
            })
        });
        Box::new(HttpSpeaker {
            provider: PROVIDER,
            timeouts: self.inner.timeouts,
            metrics: self.metrics.clone(),
            key: None,
            format: BodyFormat::Pcm16 { rate: RATE },
            build,
        })
    }
}
