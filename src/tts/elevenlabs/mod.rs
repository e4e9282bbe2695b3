//! ElevenLabs: the provider and its per-call voice. Three modes, picked in `[tts.elevenlabs]`:
//! - `multi` (default): one `multi-stream-input` websocket per call, opened in the background
//!   when the call starts so the first sentence skips the handshake; each reply is a new
//!   `context_id`, and a barge-in closes that context without reconnecting.
//! - `single`: `stream-input`, one websocket per reply, the next one opened ahead of time.
//! - `http`: `POST /v1/text-to-speech/{voice_id}/stream`, one request per unit.
//!
//! Audio is asked for in the caller's format (`pcm_<rate>`, or `ulaw_8000` for 8 kHz µ-law
//! callers) so the pacer has nothing to resample. When a websocket cannot connect, the reply is
//! spoken over HTTP instead.

mod context;
mod socket;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::context::ContextTask;
use self::socket::Socket;
use super::fallback::FallbackVoice;
use super::http::{self, ApiKey, BodyFormat, HttpSpeaker, ProviderTimeouts, Timeouts};
use super::{AudioStream, OutputHint, Synthesizer, TextUnit, TtsError, Voice, AUDIO_QUEUE};
use crate::audio::Encoding;
use crate::metrics::Metrics;

const PROVIDER: &str = "elevenlabs";
/// PCM rates ElevenLabs produces; other callers get 24 kHz and the pacer converts.
const PCM_RATES: [u32; 5] = [8_000, 16_000, 22_050, 24_000, 44_100];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElevenLabsMode {
    Multi,
    Single,
    Http,
}

/// `[tts.elevenlabs]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElevenLabsConfig {
    /// `https://…` (the websocket modes use the same host over `wss://`; `http://` gives `ws://`).
    pub base_url: String,
    pub voice_id: String,
    pub model_id: String,
    pub mode: ElevenLabsMode,
    pub api_key_env: String,
    /// Seconds an idle websocket stays open (ElevenLabs allows up to 180).
    pub inactivity_timeout_s: u32,
    pub timeouts: ProviderTimeouts,
}

impl Default for ElevenLabsConfig {
    fn default() -> Self {
        ElevenLabsConfig {
            base_url: "https://api.elevenlabs.io".into(),
            voice_id: "21m00Tcm4TlvDq8ikWAM".into(),
            model_id: "eleven_flash_v2_5".into(),
            mode: ElevenLabsMode::Multi,
            api_key_env: "ELEVENLABS_API_KEY".into(),
            inactivity_timeout_s: 180,
            timeouts: ProviderTimeouts::default(),
        }
    }
}

/// The `output_format` for a caller, and how its bytes decode.
pub(crate) fn output_format(hint: OutputHint) -> (String, BodyFormat) {
    if hint.encoding == Encoding::Mulaw && hint.sample_rate == 8_000 {
        return ("ulaw_8000".into(), BodyFormat::Mulaw8k);
    }
    let rate = if PCM_RATES.contains(&hint.sample_rate) {
        hint.sample_rate
    } else {
        24_000
    };
    (format!("pcm_{rate}"), BodyFormat::Pcm16 { rate })
}

/// The ElevenLabs provider, shared by every call.
pub struct ElevenLabs {
    config: ElevenLabsConfig,
    key: ApiKey,
    client: reqwest::Client,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

impl ElevenLabs {
    pub fn new(config: &ElevenLabsConfig, metrics: Arc<Metrics>) -> Result<Self, TtsError> {
        let key = http::api_key(PROVIDER, &config.api_key_env)?;
        let timeouts = config.timeouts.get();
        Ok(ElevenLabs {
            config: config.clone(),
            key,
            client: http::client(PROVIDER, &timeouts)?,
            timeouts,
            metrics,
        })
    }

    fn ws_url(&self, endpoint: &str, format: &str) -> String {
        let base = http::trim_base(&self.config.base_url);
        let base = match base.split_once("://") {
            Some(("https", rest)) => format!("wss://{rest}"),
            Some(("http", rest)) => format!("ws://{rest}"),
            _ => base,
        };
        format!(
            "{base}/v1/text-to-speech/{}/{endpoint}?model_id={}&output_format={format}\
             &inactivity_timeout={}&sync_alignment=true",
            self.config.voice_id, self.config.model_id, self.config.inactivity_timeout_s
        )
    }

    fn http_speaker(&self, format: &str, body_format: BodyFormat) -> HttpSpeaker {
        let url = format!(
            "{}/v1/text-to-speech/{}/stream?output_format={format}",
            http::trim_base(&self.config.base_url),
            self.config.voice_id
        );
        let (client, key, model) = (
            self.client.clone(),
            self.key.clone(),
            self.config.model_id.clone(),
        );
        let build: http::BuildRequest = Arc::new(move |unit| {
            let body = serde_json::json!({ "text": unit.text, "model_id": model });
            let req = client
                .post(&url)
                .header("xi-api-key", key.expose())
                .json(&body);
            Box::pin(std::future::ready(Ok(req)))
        });
        HttpSpeaker {
            provider: PROVIDER,
            timeouts: self.timeouts,
            metrics: self.metrics.clone(),
            key: Some(self.key.clone()),
            format: body_format,
            build,
        }
    }
}

impl Synthesizer for ElevenLabs {
    fn name(&self) -> &str {
        PROVIDER
    }

    fn open(&self, hint: OutputHint) -> Box<dyn Voice> {
        let (format, body_format) = output_format(hint);
        let http = self.http_speaker(&format, body_format);
        let (endpoint, hello) = match self.config.mode {
            ElevenLabsMode::Http => return Box::new(http),
            ElevenLabsMode::Multi => ("multi-stream-input", None),
            // A single-context stream opens with a space.
            ElevenLabsMode::Single => ("stream-input", Some(r#"{"text":" "}"#.to_string())),
        };
        let ws = WsVoice {
            url: self.ws_url(endpoint, &format),
            hello,
            key: self.key.clone(),
            timeouts: self.timeouts,
            metrics: self.metrics.clone(),
            format: body_format,
            socket: None,
            replies: 0,
        };
        let mut ws = ws;
        ws.socket = Some(ws.connect());
        // Only a socket that cannot connect sends the reply to HTTP: a bad key or an exhausted
        // quota would fail there too, so those errors go on to the caller's fallback.
        Box::new(FallbackVoice::new(
            Box::new(ws),
            Box::new(http),
            "elevenlabs_ws",
            "elevenlabs_http",
            self.metrics.clone(),
            Some(cannot_connect),
        ))
    }
}

fn cannot_connect(e: &TtsError) -> bool {
    match e {
        TtsError::Connect { .. } => true,
        TtsError::Timeout { what, .. } => what.starts_with("connecting"),
        _ => false,
    }
}

/// A call's websocket voice: the warm socket (multi) or the next reply's socket (single).
struct WsVoice {
    url: String,
    hello: Option<String>,
    key: ApiKey,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    format: BodyFormat,
    socket: Option<Socket>,
    replies: u64,
}

impl WsVoice {
    fn connect(&self) -> Socket {
        Socket::open(
            self.url.clone(),
            self.key.clone(),
            self.timeouts.connect,
            self.hello.clone(),
        )
    }

    /// A live socket for this reply: the warm one, or a new one if it died (idle timeout,
    /// network) or never connected, so every reply tries again.
    fn take_socket(&mut self) -> Socket {
        let warm = self.socket.take().filter(Socket::is_alive);
        let socket = warm.unwrap_or_else(|| self.connect());
        if self.hello.is_none() {
            self.socket = Some(socket.clone());
        } else {
            // Single-context: this socket is the reply's; open the next one now.
            self.socket = Some(self.connect());
        }
        socket
    }
}

impl Voice for WsVoice {
    fn synthesize(
        &mut self,
        units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        self.replies += 1;
        let socket = self.take_socket();
        let task = ContextTask {
            socket,
            context_id: self
                .hello
                .is_none()
                .then(|| format!("reply-{}", self.replies)),
            format: self.format,
            timeouts: self.timeouts,
            metrics: self.metrics.clone(),
        };
        let (tx, rx) = mpsc::channel(AUDIO_QUEUE);
        tokio::spawn(task.run(units, cancel, tx));
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_format_follows_the_caller() {
        let hint = |sample_rate, encoding| OutputHint {
            sample_rate,
            encoding,
        };
        assert_eq!(output_format(hint(8_000, Encoding::Mulaw)).0, "ulaw_8000");
        assert_eq!(
            output_format(hint(16_000, Encoding::Linear16)).0,
            "pcm_16000"
        );
        assert_eq!(
            output_format(hint(44_100, Encoding::Linear16)).0,
            "pcm_44100"
        );
        assert_eq!(
            output_format(hint(48_000, Encoding::Linear16)).0,
            "pcm_24000"
        );
        assert_eq!(output_format(hint(16_000, Encoding::Mulaw)).0, "pcm_16000");
    }
}
