//! A call: the actor that owns its conversation ([`actor`]), the bookkeeping of the reply in
//! flight ([`reply`]) and the transport's handle on it ([`handle`]). [`start`] wires one up: the
//! listening stages (resample → VAD) feeding the actor's turn events, the registry entry, and
//! the handle. The transport hears from the call through a bounded channel of [`Outbound`]
//! messages.

mod actor;
#[cfg(test)]
mod actor_tests;
mod handle;
mod reply;

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub(crate) use handle::{goodbye, history, CallCommand, CallHandle};

use super::conversation::Conversation;
use super::limits::{InputBudget, LimitError, Limits, RealtimeGate};
use super::listen;
use super::registry::{self, RegistryError};
use super::{Outbound, PipelineSettings};
use crate::audio::Encoding;
use crate::audio::{resample::StreamResampler, MODEL_RATE};
use crate::metrics::{ErrorKind, Metrics};
use crate::model::SpeechLanguageModel;
use crate::tts::{OutputHint, Synthesizer};
use crate::vad::smart_turn::SmartTurnHandle;
use crate::vad::VadHandle;
use actor::{Actor, ActorConfig, Keep};

/// The live calls, each by its command channel.
pub(crate) type CallRegistry = registry::CallRegistry<mpsc::Sender<CallCommand>>;
type Registration = registry::Registration<mpsc::Sender<CallCommand>>;

/// Chunks of caller audio that may wait for the resampler; the transport waits beyond that, which
/// pushes back on the socket instead of dropping audio. The real bound is in samples
/// ([`InputBudget`]); this only caps the number of tiny chunks.
const AUDIO_IN_QUEUE: usize = 64;
/// 16 kHz chunks waiting for the VAD stage; same policy.
const HEARD_QUEUE: usize = 64;
/// Turn events from the VAD stage; a handful per turn.
const VAD_EVENT_QUEUE: usize = 32;
/// Commands from the transport; rare.
const COMMAND_QUEUE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("cannot convert {0} Hz input for the VAD: {1}")]
    InputRate(u32, String),
    #[error("the speech-language model cannot open a session: {0}")]
    Model(String),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the call has ended")]
    Ended,
}

impl CallError {
    /// The error kind clients see and metrics count.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            CallError::InputRate(..) => ErrorKind::BadConfig,
            CallError::Model(_) | CallError::Ended => ErrorKind::CallStart,
            CallError::Limit(e) => e.kind(),
            CallError::Registry(_) => ErrorKind::IdInUse,
        }
    }
}

/// Everything calls share: the model, the voice, the VAD worker and the metrics.
#[derive(Clone)]
pub struct Services {
    pub(crate) slm: Arc<dyn SpeechLanguageModel>,
    pub(crate) tts: Arc<dyn Synthesizer>,
    pub(crate) vad: VadHandle,
    /// The end-of-turn model; `None` under the silence policy.
    pub(crate) turn_model: Option<SmartTurnHandle>,
    pub metrics: Arc<Metrics>,
    pub(crate) settings: Arc<PipelineSettings>,
    /// What one caller may send and make the server hold.
    pub(crate) limits: Arc<Limits>,
    /// Live calls by id.
    pub(crate) registry: CallRegistry,
}

/// What one caller asked for.
#[derive(Debug, Clone)]
pub(crate) struct CallOptions {
    /// How the call is known to the registry (e.g. the Twilio call SID); generated if `None`.
    pub id: Option<String>,
    pub input_rate: u32,
    pub output_rate: u32,
    pub output_encoding: Encoding,
    pub system_prompt: Option<String>,
    pub first_message: Option<String>,
    pub subscribe_transcript: bool,
    /// The transport reports played units (`CallHandle::played`); the history then keeps exactly
    /// the acknowledged units instead of an estimate from the playout clock.
    pub playback_acks: bool,
    /// `vocode` or `twilio`, for traces.
    pub transport: &'static str,
    /// The W3C trace context of the request that opened the call.
    pub trace: TraceContext,
}

/// W3C trace context headers, as received.
#[derive(Debug, Clone, Default)]
pub(crate) struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl TraceContext {
    pub(crate) fn from_headers(headers: &axum::http::HeaderMap) -> Self {
        let get = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 512)
                .map(str::to_string)
        };
        TraceContext {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }
}

/// Starts a call. Its tasks stop when the handle drops, `parent` is cancelled, or `out` closes.
/// The actor holds `slot` (the call's place under `server.max_calls`) until it ends, so a server
/// that waits for every slot waits for every actor.
pub(crate) fn start(
    services: Services,
    options: CallOptions,
    out: mpsc::Sender<Outbound>,
    parent: &CancellationToken,
    slot: Option<OwnedSemaphorePermit>,
) -> Result<CallHandle, CallError> {
    if let Some(id) = &options.id {
        super::limits::check_id(id)?;
    }
    services.limits.check_texts(
        options.system_prompt.as_deref(),
        options.first_message.as_deref(),
    )?;
    let resampler = StreamResampler::new(options.input_rate, MODEL_RATE)
        .map_err(|e| CallError::InputRate(options.input_rate, e.to_string()))?;
    let system_prompt = options
        .system_prompt
        .clone()
        .or_else(|| services.settings.system_prompt.clone());
    let session = services
        .slm
        .open_session(system_prompt.as_deref())
        .map_err(|e| CallError::Model(e.to_string()))?;
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (id, registration) = services
        .registry
        .register(options.id.clone(), cmd_tx.clone())?;
    tracing::debug!(call = %id, "call started");
    let cancel = parent.child_token();
    let voice = services.tts.open(OutputHint {
        sample_rate: options.output_rate,
        encoding: options.output_encoding,
    });
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_IN_QUEUE);
    let (heard_tx, heard_rx) = mpsc::channel(HEARD_QUEUE);
    let (vad_tx, vad_rx) = mpsc::channel(VAD_EVENT_QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(listen::ingest(
        resampler,
        audio_rx,
        heard_tx,
        cancel.clone(),
    ));
    tasks.spawn(listen::detect(
        services.vad.clone(),
        listen::TurnTaking {
            vad: services.settings.vad,
            policy: services.settings.turn,
            model: services.turn_model.clone(),
        },
        heard_rx,
        vad_tx,
        services.metrics.clone(),
        cancel.clone(),
    ));
    let conversation = Conversation::new(
        system_prompt,
        options
            .first_message
            .clone()
            .or_else(|| services.settings.first_message.clone()),
    );
    let info = crate::telemetry::CallInfo {
        id: id.clone(),
        transport: options.transport,
        model: services.slm.name().to_string(),
        voice: services.tts.name().to_string(),
    };
    let span = crate::telemetry::call_span(
        &info,
        options.trace.traceparent.as_deref(),
        options.trace.tracestate.as_deref(),
    );
    let cfg = ActorConfig {
        trace: (span.clone(), info),
        settings: services.settings.clone(),
        limits: services.limits.clone(),
        metrics: services.metrics.clone(),
        output_rate: options.output_rate,
        playback_acks: options.playback_acks,
        subscribe_transcript: options.subscribe_transcript,
    };
    let keep = Keep {
        _registration: Some(registration),
        _slot: slot,
    };
    let actor = Actor::new(
        cfg,
        session,
        voice,
        conversation,
        out,
        cancel.clone(),
        tasks,
        keep,
    );
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(vad_rx, cmd_rx),
        span,
    ));
    let burst = std::time::Duration::from_millis(services.limits.realtime_burst_ms as u64);
    Ok(CallHandle {
        id,
        audio: audio_tx,
        commands: cmd_tx,
        input_rate: options.input_rate,
        budget: InputBudget::new(&services.limits, options.input_rate),
        pace: RealtimeGate::new(burst, tokio::time::Instant::now().into_std()),
        metrics: services.metrics.clone(),
        _guard: cancel.drop_guard(),
    })
}
