//! OpenAI-compatible speech: `POST {base_url}/v1/audio/speech` with `{model, input, voice,
//! response_format}`, read as a stream. `pcm` is headerless 24 kHz s16le; `wav` carries its own
//! header. The same API is served by OpenAI and by self-hosted servers such as Kokoro-FastAPI and
//! Speaches, hence the configurable base URL and the optional key.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::http::{self, BodyFormat, HttpSpeaker, ProviderTimeouts};
use super::{OutputHint, Synthesizer, TtsError, Voice};
use crate::metrics::Metrics;

const PROVIDER: &str = "openai";
/// The rate of OpenAI's `pcm` response format.
const PCM_RATE: u32 = 24_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpenAiFormat {
    /// Raw 24 kHz s16le: nothing to parse, the lowest latency.
    Pcm,
    /// A WAV stream, for servers whose `pcm` differs.
    Wav,
}

/// `[tts.openai]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// The server, without `/v1` (e.g. `http://localhost:8880` for Kokoro-FastAPI).
    pub base_url: String,
    pub model: String,
    pub voice: String,
    pub format: OpenAiFormat,
    /// The environment variable holding the key. When it is unset no `Authorization` header is
    /// sent, which self-hosted servers accept.
    pub api_key_env: String,
    pub timeouts: ProviderTimeouts,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com".into(),
            model: "gpt-4o-mini-tts".into(),
            voice: "alloy".into(),
            format: OpenAiFormat::Pcm,
            api_key_env: "OPENAI_API_KEY".into(),
            timeouts: ProviderTimeouts::default(),
        }
    }
}

#[derive(Serialize)]
struct SpeechRequest<'a> {
    model: &'a str,
    input: &'a str,
    voice: &'a str,
    response_format: &'a str,
}

/// The OpenAI-compatible provider; one client shared by every call.
pub struct OpenAi {
    speaker: HttpSpeaker,
}

impl OpenAi {
    pub fn new(config: &OpenAiConfig, metrics: Arc<Metrics>) -> Result<Self, TtsError> {
        let timeouts = config.timeouts.get();
        let client = http::client(PROVIDER, &timeouts)?;
        let key = match http::api_key(PROVIDER, &config.api_key_env) {
            Ok(k) => Some(k),
            Err(_) => {
                tracing::info!(
                    env = %config.api_key_env,
                    "no OpenAI key in the environment; sending requests without one"
                );
                None
            }
        };
        let url = format!("{}/v1/audio/speech", http::trim_base(&config.base_url));
        let (format, wire) = match config.format {
            OpenAiFormat::Pcm => (BodyFormat::Pcm16 { rate: PCM_RATE }, "pcm"),
            OpenAiFormat::Wav => (BodyFormat::Wav, "wav"),
        };
        let (model, voice, auth) = (config.model.clone(), config.voice.clone(), key.clone());
        let build: http::BuildRequest = Arc::new(move |unit| {
            let body = SpeechRequest {
                model: &model,
                input: &unit.text,
                voice: &voice,
                response_format: wire,
            };
            let mut req = client.post(&url).json(&body);
            if let Some(k) = &auth {
                req = req.bearer_auth(k.expose());
            }
            Box::pin(std::future::ready(Ok(req)))
        });
        Ok(OpenAi {
            speaker: HttpSpeaker {
                provider: PROVIDER,
                timeouts,
                metrics,
                key,
                format,
                build,
            },
        })
    }
}

impl Synthesizer for OpenAi {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn open(&self, _hint: OutputHint) -> Box<dyn Voice> {
        // The API has one PCM rate; the pacer converts to the caller's.
        Box::new(self.speaker.clone())
    }
}
