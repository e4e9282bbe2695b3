//! The configuration tree: defaults, overlaid by a TOML file, overlaid by command-line flags.
//! Unknown keys are errors. Secrets never live here; they come from the environment.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::device::{DeviceKind, WeightDtype};
use crate::pipeline::limits::Limits;
use crate::pipeline::PipelineSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {detail}")]
    Parse { path: String, detail: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: crate::transport::auth::AuthConfig,
    pub limits: Limits,
    pub assets: AssetConfig,
    pub pipeline: PipelineSettings,
    pub slm: SlmConfig,
    pub tts: TtsConfig,
    pub twilio: TwilioConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    /// The public base URL Twilio reaches this server at (`https://…`); when unset, the request's
    /// Host header is used with https/wss.
    pub public_url: Option<String>,
    /// The environment variable holding the account's auth token. When it is set, every Twilio
    /// request must carry a valid `X-Twilio-Signature`.
    pub auth_token_env: String,
    /// Largest media-stream frame (Twilio's are a few hundred bytes); a larger one ends the
    /// stream with close code 1009.
    pub max_frame_bytes: usize,
    /// Streams must carry the per-call token that `/twilio/voice` signs into its TwiML, so a
    /// stream can only follow a webhook call, once. Turn off only for TwiML you write yourself.
    pub require_stream_token: bool,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        TwilioConfig {
            public_url: None,
            auth_token_env: "TWILIO_AUTH_TOKEN".into(),
            max_frame_bytes: 64 * 1024,
            require_stream_token: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Calls served at once; further callers are refused with 503.
    pub max_calls: usize,
    /// Largest websocket text frame accepted from a Vocode caller; larger ones get a
    /// `frame_too_large` error, and frames over twice this end the call (close code 1009).
    pub max_frame_bytes: usize,
    /// Websockets waiting for their start message; beyond this, upgrades get HTTP 503.
    pub max_pending_sockets: usize,
    /// Of those, how many one client address (IPv4, or IPv6 /64) may hold; 0 for no cap (behind
    /// a reverse proxy, where every socket comes from the proxy).
    pub max_pending_per_address: usize,
    /// Of those, how many only Twilio media streams may take, so web sockets cannot shut phone
    /// calls out.
    pub pending_phone_share: usize,
    /// HTTP connections served at once (requests and idle keep-alives; not websockets, which
    /// `max_calls` and `max_pending_sockets` bound). Further connections wait in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// HTTP connections one client address (IPv4, or IPv6 /64) may hold at once; 0 for no cap
    /// (behind a reverse proxy, where every connection comes from the proxy).
    pub max_connections_per_ip: usize,
    /// A client must send a request's headers within this.
    pub header_read_timeout_ms: u64,
    /// A websocket must send its start message within this; once more than half the pending
    /// sockets' room is taken, within less, in proportion to the room left (at least 1 s).
    pub start_timeout_ms: u64,
    /// A websocket ping goes out this often.
    pub ping_interval_ms: u64,
    /// A call that receives nothing for this long is ended.
    pub idle_timeout_ms: u64,
    /// A write to a caller that does not finish within this ends the call.
    pub send_timeout_ms: u64,
    pub log_json: bool,
    /// On SIGTERM (or Ctrl-C) the server drains: `/health` answers 503 `draining`, new calls are
    /// refused, and live calls go on for up to this long. A second signal ends it at once.
    pub drain_timeout_ms: u64,
    /// Spoken to the calls still live when the drain times out, before they are ended; none:
    /// they are ended at once.
    pub drain_goodbye: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 3000,
            max_calls: 1000,
            max_frame_bytes: 1 << 20,
            max_pending_sockets: 256,
            max_pending_per_address: 16,
            pending_phone_share: 64,
            max_connections: 1024,
            max_connections_per_ip: 128,
            header_read_timeout_ms: 10_000,
            start_timeout_ms: 10_000,
            ping_interval_ms: 15_000,
            idle_timeout_ms: 45_000,
            send_timeout_ms: 10_000,
            log_json: false,
            drain_timeout_ms: 30_000,
            drain_goodbye: None,
        }
    }
}

impl ServerConfig {
    /// The waiting room's bounds.
    pub(crate) fn waiting_room(&self) -> crate::transport::waiting::RoomSettings {
        crate::transport::waiting::RoomSettings {
            capacity: self.max_pending_sockets,
            phone_share: self.pending_phone_share,
            per_address: self.max_pending_per_address,
            start_timeout: std::time::Duration::from_millis(self.start_timeout_ms),
        }
    }

    /// The bounds of a call's socket, for a protocol whose frames are at most `max_frame_bytes`.
    pub(crate) fn socket(
        &self,
        max_frame_bytes: usize,
    ) -> crate::transport::socket::SocketSettings {
        use std::time::Duration;
        crate::transport::socket::SocketSettings {
            max_frame_bytes,
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            send_timeout: Duration::from_millis(self.send_timeout_ms),
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_calls == 0 {
            return Err("server.max_calls must be at least 1".into());
        }
        if self.max_frame_bytes < 1024 {
            return Err("server.max_frame_bytes must be at least 1024".into());
        }
        if self.max_pending_sockets == 0 || self.max_connections == 0 {
            return Err(
                "server.max_pending_sockets and server.max_connections must be at least 1".into(),
            );
        }
        if self.pending_phone_share >= self.max_pending_sockets {
            return Err(format!(
                "server.pending_phone_share ({}) must be below server.max_pending_sockets ({}), \
                 or web sockets could never wait",
                self.pending_phone_share, self.max_pending_sockets
            ));
        }
        for (name, ms) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("start_timeout_ms", self.start_timeout_ms),
            ("ping_interval_ms", self.ping_interval_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("send_timeout_ms", self.send_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return Err(format!("server.{name} must be within 100..=3600000"));
            }
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return Err(
                "server.idle_timeout_ms must exceed server.ping_interval_ms, so a live peer's \
                 pong can arrive in time"
                    .into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssetConfig {
    pub ort_lib: Option<PathBuf>,
    pub vad_model: Option<PathBuf>,
    /// The end-of-turn model (the smart turn policy).
    pub turn_model: Option<PathBuf>,
    pub espeak_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlmKind {
    /// A fixed reply, for checking the pipeline without a GPU or weights.
    Scripted,
    /// The Gazelle joint speech-language model (`[slm.gazelle]`).
    Gazelle,
    /// A model behind an OpenAI-compatible chat-completions API with audio input, such as vLLM
    /// serving Ultravox or Qwen2-Audio (`[slm.openai]`).
    Openai,
}

/// The Gazelle model and how to run it. Hyperparameters come from the checkpoint's config.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GazelleSlmConfig {
    /// A Hub repo id (in the standard Hugging Face cache) or a local directory.
    pub model: String,
    /// Branch, tag or commit to pin.
    pub revision: Option<String>,
    /// Use only the local cache; never touch the network.
    pub offline: bool,
    /// The Hub cache root (default: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub).
    pub cache_dir: Option<std::path::PathBuf>,
    /// Language-model weights: f32, bf16 or f16.
    pub dtype: WeightDtype,
    /// Audio tower and projector: f32 keeps them within 1e-4 of PyTorch.
    pub audio_dtype: WeightDtype,
    pub device: DeviceKind,
    /// Positions of context a call may hold (at most the model's `max_position_embeddings`).
    /// It bounds each call's KV-cache memory, kept in the compute dtype (Mistral-7B: 128 KiB per
    /// position in bf16 on CUDA, 1 GiB at 8192; 256 KiB in f32 on the CPU, 2 GiB at 8192); beyond
    /// it the oldest exchanges are dropped.
    pub max_context: usize,
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    pub repetition_penalty: f32,
    pub seed: u64,
    /// Prefill positions per engine step, over all new turns: a long turn delays the other
    /// calls' decoding by at most one such chunk per step.
    pub prefill_chunk: usize,
    /// Most replies decoded together in one step.
    pub max_batch: usize,
    /// KV-cache memory for all calls together, in MiB. Unset (and no `kv_budget_positions`):
    /// 85 % of the GPU's free memory after loading, or half the available RAM on the CPU.
    pub kv_budget_mb: Option<u64>,
    /// The same budget in cache positions (one position of one call), instead of MiB.
    pub kv_budget_positions: Option<usize>,
    /// Turns that may wait for KV memory; a turn beyond them gets `model_busy` at once.
    pub max_waiting_turns: usize,
    /// The call's system prompt: `auto` (the template's system role, else folded into the
    /// first user turn, as Gazelle's own Mistral template needs), `fold` or `omit`.
    pub system_prompt: crate::model::gazelle::SystemPromptMode,
    /// Earlier turns' audio in the prompt: `all` (the model hears the whole call) or `current`
    /// (only the newest turn's audio; earlier user turns keep their text). See docs/gazelle.md.
    pub history_audio: crate::model::gazelle::HistoryAudio,
}

impl GazelleSlmConfig {
    /// How the engine schedules and how much KV memory it may use.
    pub(crate) fn engine_settings(&self) -> crate::model::engine::EngineSettings {
        use crate::model::engine::KvBudget;
        crate::model::engine::EngineSettings {
            params: self.generation_params(),
            prefill_chunk: self.prefill_chunk,
            max_batch: self.max_batch,
            kv_budget: match (self.kv_budget_mb, self.kv_budget_positions) {
                (_, Some(p)) => KvBudget::Positions(p),
                (Some(mb), None) => KvBudget::Bytes(mb << 20),
                (None, None) => KvBudget::Auto,
            },
            max_waiting_turns: self.max_waiting_turns,
        }
    }

    /// How replies are sampled.
    pub(crate) fn generation_params(&self) -> crate::model::gazelle::GenerationParams {
        crate::model::gazelle::GenerationParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop_on_eos: true,
        }
    }
}

impl Default for GazelleSlmConfig {
    fn default() -> Self {
        GazelleSlmConfig {
            model: crate::model::gazelle::hub::DEFAULT_REPO.into(),
            revision: None,
            offline: false,
            cache_dir: None,
            dtype: WeightDtype::Bf16,
            audio_dtype: WeightDtype::F32,
            device: DeviceKind::Cpu,
            max_context: 8192,
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
            prefill_chunk: 256,
            max_batch: 32,
            kv_budget_mb: None,
            kv_budget_positions: None,
            max_waiting_turns: 64,
            system_prompt: Default::default(),
            history_audio: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlmConfig {
    pub kind: SlmKind,
    /// The scripted model's reply.
    pub reply: String,
    /// Delay before each token of the scripted reply.
    pub token_delay_ms: u64,
    /// Answers a turn whose reply fails before its first token (`openai` or `gazelle` as the
    /// primary, usually `scripted` or `gazelle` here).
    pub fallback: Option<SlmKind>,
    pub gazelle: GazelleSlmConfig,
    pub openai: crate::model::openai::OpenAiSlmConfig,
}

impl Default for SlmConfig {
    fn default() -> Self {
        SlmConfig {
            kind: SlmKind::Scripted,
            reply: "Hello! I am the scripted model of gazelle. I can hear you, and you can hear \
                    me, so your microphone, voice detection and speech output all work."
                .into(),
            token_delay_ms: 0,
            fallback: None,
            gazelle: GazelleSlmConfig::default(),
            openai: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    pub provider: TtsProvider,
    /// Speaks the rest of a reply when the primary fails during it; the next reply tries the
    /// primary again. None: a failed reply stops where it failed.
    pub fallback: Option<TtsProvider>,
    pub espeak: EspeakVoice,
    pub elevenlabs: crate::tts::elevenlabs::ElevenLabsConfig,
    pub xtts: crate::tts::xtts::XttsConfig,
    pub openai: crate::tts::openai::OpenAiConfig,
    pub playht: crate::tts::playht::PlayHtConfig,
}

impl Default for TtsConfig {
    fn default() -> Self {
        TtsConfig {
            provider: TtsProvider::Espeak,
            fallback: None,
            espeak: EspeakVoice::default(),
            elevenlabs: Default::default(),
            xtts: Default::default(),
            openai: Default::default(),
            playht: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsProvider {
    /// The local espeak-ng voice: no network, no key.
    Espeak,
    /// ElevenLabs over its websocket (multi- or single-context) or HTTP streaming API.
    Elevenlabs,
    /// A coqui xtts-streaming-server.
    Xtts,
    /// Any OpenAI-compatible `/v1/audio/speech` server (OpenAI, Kokoro-FastAPI, Speaches).
    Openai,
    /// A PlayHT-compatible `/api/v2/tts/stream` server (the public service closed 2025-12-31).
    Playht,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EspeakVoice {
    pub voice: String,
    pub rate_wpm: u32,
    /// Units whose audio is kept for reuse across calls (0: off).
    pub cache_units: usize,
}

impl Default for EspeakVoice {
    fn default() -> Self {
        EspeakVoice {
            voice: "en-us".into(),
            rate_wpm: 175,
            cache_units: 256,
        }
    }
}

impl Config {
    /// Defaults overlaid by the TOML file, if any.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { detail, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                detail,
            },
            other => other,
        })
    }

    pub(crate) fn parse(text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<string>".into(),
            detail: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pipeline.validate().map_err(ConfigError::Invalid)?;
        self.server.validate().map_err(ConfigError::Invalid)?;
        self.limits.validate().map_err(ConfigError::Invalid)?;
        if !(5..=3_600).contains(&self.auth.token_ttl_s) {
            return Err(ConfigError::Invalid(
                "auth.token_ttl_s must be within 5..=3600".into(),
            ));
        }
        if self.twilio.max_frame_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "twilio.max_frame_bytes must be at least 1024".into(),
            ));
        }
        for o in &self.auth.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "auth.allowed_origins entry {o:?} must be \"*\" or start with http:// or https://"
                )));
            }
        }
        if self.tts.fallback == Some(self.tts.provider) {
            return Err(ConfigError::Invalid(
                "tts.fallback must differ from tts.provider (espeak is the usual fallback)".into(),
            ));
        }
        for (name, t) in [
            ("elevenlabs", &self.tts.elevenlabs.timeouts),
            ("xtts", &self.tts.xtts.timeouts),
            ("openai", &self.tts.openai.timeouts),
            ("playht", &self.tts.playht.timeouts),
        ] {
            t.validate(name).map_err(ConfigError::Invalid)?;
        }
        let used = |p| self.tts.provider == p || self.tts.fallback == Some(p);
        if used(TtsProvider::Xtts) {
            self.tts.xtts.validate().map_err(ConfigError::Invalid)?;
        }
        if self.slm.fallback == Some(self.slm.kind) {
            return Err(ConfigError::Invalid(
                "slm.fallback must differ from slm.kind".into(),
            ));
        }
        if self.slm.kind == SlmKind::Openai || self.slm.fallback == Some(SlmKind::Openai) {
            self.slm.openai.validate().map_err(ConfigError::Invalid)?;
        }
        let g = &self.slm.gazelle;
        if g.max_context < 2 * g.max_new_tokens.max(64) {
            return Err(ConfigError::Invalid(format!(
                "slm.gazelle.max_context ({}) must be at least twice max_new_tokens ({}) and 128, \
                 to hold a turn and its reply",
                g.max_context, g.max_new_tokens
            )));
        }
        if g.prefill_chunk == 0 || g.max_batch == 0 || g.max_waiting_turns == 0 {
            return Err(ConfigError::Invalid(
                "slm.gazelle.prefill_chunk, max_batch and max_waiting_turns must be at least 1"
                    .into(),
            ));
        }
        if g.kv_budget_mb.is_some() && g.kv_budget_positions.is_some() {
            return Err(ConfigError::Invalid(
                "set slm.gazelle.kv_budget_mb or kv_budget_positions, not both".into(),
            ));
        }
        if g.kv_budget_mb == Some(0) || g.kv_budget_positions == Some(0) {
            return Err(ConfigError::Invalid(
                "slm.gazelle's KV budget must be above 0 (leave it unset for automatic)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_too_small_for_a_reply_is_refused() {
        let e = Config::parse("[slm.gazelle]\nmax_context = 100\nmax_new_tokens = 128\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("slm.gazelle.max_context (100)"), "{e}");
        Config::parse("[slm.gazelle]\nmax_context = 512\n").unwrap();
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_fail() {
        let c = Config::parse(
            "[server]\nport = 4000\n[pipeline]\noutput_lead_ms = 200\n[pipeline.vad]\nmin_silence_ms = 700\n",
        )
        .unwrap();
        assert_eq!(c.server.port, 4000);
        assert_eq!(c.server.host, "127.0.0.1");
        assert_eq!(c.pipeline.output_lead_ms, 200);
        assert_eq!(c.pipeline.vad.min_silence_ms, 700);
        let err = Config::parse("[server]\nprot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("prot"), "{err}");
        let err = Config::parse("[pipeline]\noutput_lead_ms = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("output_lead_ms"), "{err}");
    }

    #[test]
    fn providers_parse_by_name_with_defaults() {
        let c = Config::parse(
            "[tts]\nprovider = \"elevenlabs\"\nfallback = \"espeak\"\n\
             [tts.elevenlabs]\nvoice_id = \"v1\"\nmode = \"http\"\n\
             [tts.elevenlabs.timeouts]\nfirst_byte_ms = 900\n",
        )
        .unwrap();
        assert_eq!(c.tts.provider, TtsProvider::Elevenlabs);
        assert_eq!(c.tts.fallback, Some(TtsProvider::Espeak));
        assert_eq!(c.tts.elevenlabs.voice_id, "v1");
        assert_eq!(c.tts.elevenlabs.timeouts.first_byte_ms, 900);
        assert_eq!(c.tts.elevenlabs.timeouts.connect_ms, 3_000);
        assert_eq!(c.tts.elevenlabs.api_key_env, "ELEVENLABS_API_KEY");
        let err = Config::parse("[tts.openai]\nvoise = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("voise"), "{err}");
        let err = Config::parse("[tts]\nprovider = \"xtts\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("speaker"), "{err}");
        let err = Config::parse("[tts]\nprovider = \"espeak\"\nfallback = \"espeak\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fallback"), "{err}");
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }
}
