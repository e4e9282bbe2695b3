//! Building the shared services from a [`Config`]: find the runtime files, load the VAD, start the
//! voice and the model. Used by `gazelle serve` and by the integration tests, so both run the
//! same server.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::listener::ListenSettings;
use super::AppState;
use crate::assets::{self, AssetError};
use crate::config::{Config, GazelleSlmConfig, SlmKind, TtsProvider};
use crate::metrics::Metrics;
use crate::model::device::open_device;
use crate::model::engine::Engine;
use crate::model::fallback::FallbackModel;
use crate::model::gazelle::hub::{self, HubOptions};
use crate::model::gazelle::Precision;
use crate::model::loading::LoadingModel;
use crate::model::openai::OpenAiModel;
use crate::model::{scripted::ScriptedModel, ModelError, SpeechLanguageModel};
use crate::pipeline::call::Services;
use crate::transport::auth::{Auth, AuthSettings, Secret};
use crate::tts::espeak::{Espeak, EspeakConfig};
use crate::tts::{elevenlabs, fallback, openai, playht, xtts};
use crate::tts::{Synthesizer, TtsError};
use crate::vad::{self, VadError};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Vad(#[from] VadError),
    #[error("cannot start the voice: {0}")]
    Tts(#[from] TtsError),
    #[error("cannot start the model: {0}")]
    Slm(String),
}

/// The model's background load: `serve` stops if it fails, tests wait until it is ready.
#[derive(Clone, Default)]
pub struct ModelLoad(Option<Arc<LoadingModel>>);

impl ModelLoad {
    /// Resolves with the reason if loading fails; never resolves otherwise.
    pub async fn failure(&self) -> ModelError {
        match &self.0 {
            Some(m) => m.failure().await,
            None => std::future::pending().await,
        }
    }
}

/// Loads everything calls share. A model that takes long to load (Gazelle) goes on loading in
/// the background after this returns; [`ModelLoad`] follows it.
pub fn services(config: &Config) -> Result<(Services, ModelLoad), SetupError> {
    let ort_lib = assets::ort_lib(config.assets.ort_lib.as_deref())?;
    let vad_model = assets::vad_model(config.assets.vad_model.as_deref())?;
    let espeak_dir = assets::espeak_dir(config.assets.espeak_dir.as_deref())?;
    let metrics = Arc::new(Metrics::new());
    let env = vad::silero::init_runtime(&ort_lib)?;
    let model = vad::SileroModel::load(env, &vad_model)?;
    let vad = vad::VadHandle::spawn(model, metrics.clone());
    let turn_model = if config.pipeline.turn.smart() {
        let path = assets::turn_model(config.assets.turn_model.as_deref())?;
        let model = vad::smart_turn::SmartTurnModel::load(env, &path)?;
        tracing::info!(model = %path.display(), "end-of-turn model ready");
        Some(vad::smart_turn::SmartTurnHandle::spawn(
            model,
            metrics.clone(),
        ))
    } else {
        None
    };
    let mut tts = synthesizer(config, config.tts.provider, &espeak_dir, &metrics)?;
    if let Some(second) = config.tts.fallback {
        let second = synthesizer(config, second, &espeak_dir, &metrics)?;
        tts = Arc::new(fallback::Fallback::new(tts, second, metrics.clone()));
    }
    let (mut slm, mut load) = speech_model(config, config.slm.kind, &metrics)?;
    if let Some(second) = config.slm.fallback {
        let (second, second_load) = speech_model(config, second, &metrics)?;
        if load.0.is_none() {
            load = second_load;
        }
        slm = Arc::new(FallbackModel::new(slm, second));
    }
    tracing::info!(slm = slm.name(), tts = tts.name(), vad = %vad_model.display(), "services ready");
    let services = Services {
        turn_model,
        slm,
        tts,
        vad,
        metrics,
        settings: Arc::new(config.pipeline.clone()),
        limits: Arc::new(config.limits.clone()),
        registry: Default::default(),
    };
    Ok((services, load))
}

/// The speech-language model of `kind`; Gazelle goes on loading in the background.
fn speech_model(
    config: &Config,
    kind: SlmKind,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<dyn SpeechLanguageModel>, ModelLoad), SetupError> {
    Ok(match kind {
        SlmKind::Scripted => (
            Arc::new(ScriptedModel::new(
                config.slm.reply.clone(),
                Duration::from_millis(config.slm.token_delay_ms),
            )),
            ModelLoad::default(),
        ),
        SlmKind::Openai => {
            let m =
                OpenAiModel::new(&config.slm.openai).map_err(|e| SetupError::Slm(e.to_string()))?;
            (Arc::new(m), ModelLoad::default())
        }
        SlmKind::Gazelle => {
            let c = config.slm.gazelle.clone();
            let engine_metrics = metrics.clone();
            let m = Arc::new(LoadingModel::spawn("gazelle", move || {
                match gazelle(&c, engine_metrics) {
                    Ok(m) => Ok(Arc::new(m) as Arc<dyn SpeechLanguageModel>),
                    Err(e) => Err(Arc::new(e) as ModelError),
                }
            }));
            (
                m.clone() as Arc<dyn SpeechLanguageModel>,
                ModelLoad(Some(m)),
            )
        }
    })
}

/// Why Gazelle could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GazelleSetupError {
    #[error(transparent)]
    Device(#[from] crate::model::device::DeviceError),
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    #[error(transparent)]
    Load(#[from] Box<hub::LoadError>),
}

/// Finds, loads and starts the Gazelle model (downloading it first unless offline).
fn gazelle(c: &GazelleSlmConfig, metrics: Arc<Metrics>) -> Result<Engine, GazelleSetupError> {
    let device = open_device(c.device)?;
    let opts = HubOptions {
        revision: c.revision.clone(),
        offline: c.offline,
        cache_dir: c.cache_dir.clone(),
        endpoint: None,
        progress: true,
    };
    let files = hub::resolve(&c.model, &opts)?;
    let started = std::time::Instant::now();
    let precision = Precision::new(c.dtype.into(), c.audio_dtype.into(), &device);
    let engine = hub::load_engine(&files, precision, &device)
        .map_err(Box::new)?
        .with_max_context(c.max_context)
        .with_system_prompt(c.system_prompt)
        .with_history_audio(c.history_audio);
    tracing::info!(model = %files.origin, secs = started.elapsed().as_secs_f64(), "Gazelle loaded");
    Ok(Engine::start(
        Arc::new(engine),
        c.engine_settings(),
        Some(metrics),
    ))
}

/// The router state for a config and its services; secrets are read from the environment
/// variables the config names.
pub fn state(config: &Config, services: Services) -> AppState {
    let s = &config.server;
    let twilio_token = Secret::from_env(&config.twilio.auth_token_env);
    let twilio_token_str = std::env::var(&config.twilio.auth_token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let auth = Auth::new(AuthSettings {
        api_key: Secret::from_env(&config.auth.api_key_env),
        admin_token: Secret::from_env(&config.auth.admin_token_env),
        twilio_token,
        config: config.auth.clone(),
        twilio_token_env: config.twilio.auth_token_env.clone(),
    });
    if auth.required() {
        tracing::info!(env = %config.auth.api_key_env, "calls need the API key or a call token");
    } else {
        tracing::warn!(
            env = %config.auth.api_key_env,
            "no API key is set: anyone who can reach this server can open calls"
        );
    }
    let pending =
        crate::transport::waiting::WaitingRoom::new(s.waiting_room(), services.metrics.clone());
    AppState {
        services,
        socket: s.socket(s.max_frame_bytes),
        twilio_socket: s.socket(config.twilio.max_frame_bytes),
        cancel: CancellationToken::new(),
        calls: Arc::new(tokio::sync::Semaphore::new(s.max_calls)),
        pending,
        twilio: super::twilio::TwilioSettings {
            public_url: config.twilio.public_url.clone(),
            auth_token: twilio_token_str.map(Into::into),
            require_stream_token: config.twilio.require_stream_token,
        },
        auth: Arc::new(auth),
        drain: Arc::new(super::Drain {
            timeout: Duration::from_millis(s.drain_timeout_ms),
            goodbye: s.drain_goodbye.clone(),
            ..Default::default()
        }),
        listen: ListenSettings {
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            header_read_timeout: Duration::from_millis(s.header_read_timeout_ms),
        },
    }
}

/// The provider `kind`, configured from `[tts.<kind>]`.
fn synthesizer(
    config: &Config,
    kind: TtsProvider,
    espeak_dir: &std::path::Path,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Synthesizer>, TtsError> {
    let t = &config.tts;
    let m = metrics.clone();
    Ok(match kind {
        TtsProvider::Espeak => Arc::new(Espeak::start(&EspeakConfig {
            dir: espeak_dir.to_path_buf(),
            voice: t.espeak.voice.clone(),
            rate_wpm: t.espeak.rate_wpm,
            cache_units: t.espeak.cache_units,
        })?),
        TtsProvider::Elevenlabs => Arc::new(elevenlabs::ElevenLabs::new(&t.elevenlabs, m)?),
        TtsProvider::Xtts => Arc::new(xtts::Xtts::new(&t.xtts, m)?),
        TtsProvider::Openai => Arc::new(openai::OpenAi::new(&t.openai, m)?),
        TtsProvider::Playht => Arc::new(playht::PlayHt::new(&t.playht, m)?),
    })
}
