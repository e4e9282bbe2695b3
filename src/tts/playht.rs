//! PlayHT's streaming API: `POST {base_url}/api/v2/tts/stream` with the `AUTHORIZATION` (secret
//! key) and `X-USER-ID` headers, answered with raw s16le PCM at the requested rate. PlayHT shut
//! its public service down on 2025-12-31; the client stays for deployments that speak the same
//! API.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::http::{self, ApiKey, BodyFormat, HttpSpeaker, ProviderTimeouts};
use super::{OutputHint, Synthesizer, TtsError, Voice};
use crate::metrics::Metrics;

const PROVIDER: &str = "playht";
/// Rates we ask for directly; others get 24 kHz and the pacer converts.
const RATES: [u32; 5] = [8_000, 16_000, 22_050, 24_000, 44_100];

/// `[tts.playht]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlayHtConfig {
    pub base_url: String,
    /// A voice manifest URL or id, as the server names it.
    pub voice: String,
    pub voice_engine: String,
    pub api_key_env: String,
    pub user_id_env: String,
    pub timeouts: ProviderTimeouts,
}

impl Default for PlayHtConfig {
    fn default() -> Self {
        PlayHtConfig {
            base_url: "https://api.play.ht".into(),
            voice: "s3://voice-cloning-zero-shot/d9ff78ba-d016-47f6-b0ef-dd630f59414e/female-cs/manifest.json"
                .into(),
            voice_engine: "Play3.0-mini".into(),
            api_key_env: "PLAYHT_API_KEY".into(),
            user_id_env: "PLAYHT_USER_ID".into(),
            timeouts: ProviderTimeouts::default(),
        }
    }
}

#[derive(Serialize)]
struct StreamRequest<'a> {
    text: &'a str,
    voice: &'a str,
    voice_engine: &'a str,
    output_format: &'static str,
    sample_rate: u32,
}

/// The PlayHT provider; one client shared by every call.
pub struct PlayHt {
    client: reqwest::Client,
    url: String,
    config: PlayHtConfig,
    key: ApiKey,
    /// Not a secret on its own, but it identifies the account: handled like one.
    user: ApiKey,
    metrics: Arc<Metrics>,
}

impl PlayHt {
    pub fn new(config: &PlayHtConfig, metrics: Arc<Metrics>) -> Result<Self, TtsError> {
        let key = http::api_key(PROVIDER, &config.api_key_env)?;
        let user = http::api_key(PROVIDER, &config.user_id_env)?;
        let client = http::client(PROVIDER, &config.timeouts.get())?;
        Ok(PlayHt {
            client,
            url: format!("{}/api/v2/tts/stream", http::trim_base(&config.base_url)),
            config: config.clone(),
            key,
            user,
            metrics,
        })
    }
}

impl Synthesizer for PlayHt {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn open(&self, hint: OutputHint) -> Box<dyn Voice> {
        let rate = if RATES.contains(&hint.sample_rate) {
            hint.sample_rate
        } else {
            24_000
        };
        let (client, url, config) = (self.client.clone(), self.url.clone(), self.config.clone());
        let (key, user) = (self.key.clone(), self.user.clone());
        let build: http::BuildRequest = Arc::new(move |unit| {
            let body = StreamRequest {
                text: &unit.text,
                voice: &config.voice,
                voice_engine: &config.voice_engine,
                output_format: "raw",
                sample_rate: rate,
            };
            let req = client
                .post(&url)
                .header("AUTHORIZATION", key.expose())
                .header("X-USER-ID", user.expose())
                .header(reqwest::header::ACCEPT, "audio/*")
                .json(&body);
            Box::pin(std::future::ready(Ok(req)))
        });
        Box::new(HttpSpeaker {
            provider: PROVIDER,
            timeouts: self.config.timeouts.get(),
            metrics: self.metrics.clone(),
            key: Some(self.key.clone()),
            format: BodyFormat::Pcm16 { rate },
            build,
        })
    }
}
