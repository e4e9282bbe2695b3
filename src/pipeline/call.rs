//! The call actor. One task owns a call's conversation, its model session and the reply in
//! flight; the transport reaches it through a [`CallHandle`] (bounded channels of audio and
//! commands) and hears from it through a bounded channel of [`Outbound`] messages. The actor
//! starts the listening stages once and one set of speaking stages per reply, and on barge-in
//! cancels the reply, drops its queued audio and tells the client to clear, in one step.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::conversation::{Conversation, Turn};
use super::limits::{BudgetPermit, InputBudget, LimitError, Limits, RealtimeGate};
use super::listen::{self, VadEvent};
use super::pacer::{self, PacerEvent, PacerSettings, Playout};
use super::registry::{CallRegistry, Registration, RegistryError};
use super::sentence::{SentenceAccumulator, SentenceSettings};
use super::{Outbound, PipelineSettings, Timeline};
use crate::audio::Encoding;
use crate::audio::{resample::StreamResampler, MODEL_RATE};
use crate::metrics::Metrics;
use crate::model::{SlmSession, SpeechLanguageModel, TokenStream, UserTurn};
use crate::tts::{OutputHint, Synthesizer, TextUnit, Voice};
use crate::vad::VadHandle;

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
/// Text units waiting for the synthesizer of a reply.
const UNIT_QUEUE: usize = 32;
/// Reply milestones; a handful per reply.
const REPLY_EVENT_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
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
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::InputRate(..) => "bad_config",
            CallError::Model(_) => "call_start",
            CallError::Limit(e) => e.kind(),
            CallError::Registry(_) => "id_in_use",
            CallError::Ended => "ended",
        }
    }
}

/// Everything calls share: the model, the voice, the VAD worker and the metrics.
#[derive(Clone)]
pub struct Services {
    pub slm: Arc<dyn SpeechLanguageModel>,
    pub tts: Arc<dyn Synthesizer>,
    pub vad: VadHandle,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<PipelineSettings>,
    /// What one caller may send and make the server hold.
    pub limits: Arc<Limits>,
    /// Live calls by id.
    pub registry: CallRegistry,
}

/// What one caller asked for.
#[derive(Debug, Clone)]
pub struct CallOptions {
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
}

#[derive(Debug)]
pub enum CallCommand {
    History(oneshot::Sender<Conversation>),
    /// The client has played unit `unit` of reply `reply` to its end.
    Played {
        reply: u64,
        unit: usize,
    },
}

/// Caller audio on its way to the resampler, with its share of the call's input budget.
pub(super) type AudioIn = (Vec<f32>, BudgetPermit);

/// The transport's side of a call. Dropping it ends the call and every task in it.
pub struct CallHandle {
    /// The call's id in the registry.
    pub id: String,
    audio: mpsc::Sender<AudioIn>,
    commands: mpsc::Sender<CallCommand>,
    input_rate: u32,
    budget: InputBudget,
    pace: RealtimeGate,
    metrics: Arc<Metrics>,
    _guard: DropGuard,
}

impl CallHandle {
    /// Caller audio at the input rate, mono f32. A chunk longer than the call's input budget is
    /// refused; otherwise this waits while audio runs ahead of real time by more than the burst
    /// allowance, and while the budget of samples in flight is spent, which pushes back on the
    /// socket instead of buffering.
    pub async fn audio(&mut self, samples: Vec<f32>) -> Result<(), CallError> {
        self.budget.check(samples.len())?;
        let secs = samples.len() as f64 / self.input_rate as f64;
        let wait = self.pace.admit(
            std::time::Duration::from_secs_f64(secs),
            tokio::time::Instant::now().into_std(),
        );
        if !wait.is_zero() {
            self.metrics
                .input_throttled_seconds
                .inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
        let permit = self.budget.acquire(samples.len()).await;
        self.audio
            .send((samples, permit))
            .await
            .map_err(|_| CallError::Ended)
    }

    pub async fn history(&self) -> Result<Conversation, CallError> {
        history(&self.commands).await
    }

    /// Reports that the client played a unit to its end (for `playback_acks` calls).
    pub async fn played(&self, reply: u64, unit: usize) -> Result<(), CallError> {
        let cmd = CallCommand::Played { reply, unit };
        self.commands.send(cmd).await.map_err(|_| CallError::Ended)
    }

    /// A cloneable sender of commands, for the server's registry of calls.
    pub fn commands(&self) -> mpsc::Sender<CallCommand> {
        self.commands.clone()
    }
}

/// Asks a call for its conversation so far.
pub async fn history(commands: &mpsc::Sender<CallCommand>) -> Result<Conversation, CallError> {
    let (tx, rx) = oneshot::channel();
    let sent = commands.send(CallCommand::History(tx)).await;
    sent.map_err(|_| CallError::Ended)?;
    rx.await.map_err(|_| CallError::Ended)
}

/// Starts a call. Its tasks stop when the handle drops, `parent` is cancelled, or `out` closes.
pub fn start(
    services: Services,
    options: CallOptions,
    out: mpsc::Sender<Outbound>,
    parent: &CancellationToken,
) -> Result<CallHandle, CallError> {
    let cancel = parent.child_token();
    let resampler = StreamResampler::new(options.input_rate, MODEL_RATE)
        .map_err(|e| CallError::InputRate(options.input_rate, e.to_string()))?;
    let session = services
        .slm
        .open_session()
        .map_err(|e| CallError::Model(e.to_string()))?;
    let voice = services.tts.open(OutputHint {
        sample_rate: options.output_rate,
        encoding: options.output_encoding,
    });
    let (audio_tx, audio_rx) = mpsc::channel(AUDIO_IN_QUEUE);
    let (heard_tx, heard_rx) = mpsc::channel(HEARD_QUEUE);
    let (vad_tx, vad_rx) = mpsc::channel(VAD_EVENT_QUEUE);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    if let Some(id) = &options.id {
        super::limits::check_id(id)?;
    }
    services.limits.check_texts(
        options.system_prompt.as_deref(),
        options.first_message.as_deref(),
    )?;
    let (id, registration) = services
        .registry
        .register(options.id.clone(), cmd_tx.clone())?;
    tracing::debug!(call = %id, "call started");
    let mut tasks = JoinSet::new();
    tasks.spawn(listen::ingest(
        resampler,
        audio_rx,
        heard_tx,
        cancel.clone(),
    ));
    tasks.spawn(listen::detect(
        services.vad.clone(),
        services.settings.vad,
        heard_rx,
        vad_tx,
        services.metrics.clone(),
        cancel.clone(),
    ));
    let conversation = Conversation::new(
        options
            .system_prompt
            .clone()
            .or_else(|| services.settings.system_prompt.clone()),
        options
            .first_message
            .clone()
            .or_else(|| services.settings.first_message.clone()),
    );
    let actor = Actor {
        services,
        options,
        out,
        cancel: cancel.clone(),
        conversation,
        session,
        voice,
        reply: None,
        next_reply: 0,
        tasks,
        _registration: registration,
    };
    let budget = InputBudget::new(&actor.services.limits, actor.options.input_rate);
    let burst = std::time::Duration::from_millis(actor.services.limits.realtime_burst_ms as u64);
    let pace = RealtimeGate::new(burst, tokio::time::Instant::now().into_std());
    let metrics = actor.services.metrics.clone();
    let input_rate = actor.options.input_rate;
    tokio::spawn(actor.run(vad_rx, cmd_rx));
    Ok(CallHandle {
        id,
        audio: audio_tx,
        commands: cmd_tx,
        input_rate,
        budget,
        pace,
        metrics,
        _guard: cancel.drop_guard(),
    })
}

/// Milestones of the text side of a reply.
enum TextEvent {
    FirstToken(Instant),
    Unit(String, Instant),
    Done,
    Failed(String),
    /// The reply reached this many characters and was cut there.
    TooLong(usize),
}

struct Reply {
    id: u64,
    cancel: CancellationToken,
    /// The user turn it answers; `None` for the first message.
    turn_end: Option<(Instant, Instant, f64)>,
    timeline: Timeline,
    timeline_sent: bool,
    units: Vec<String>,
    /// Units the client acknowledged as played, from the start.
    acked: usize,
    text_events: Option<mpsc::Receiver<TextEvent>>,
    pacer_events: Option<mpsc::Receiver<PacerEvent>>,
    ledger: watch::Receiver<Playout>,
    text_done: bool,
    /// When the client finishes playing the reply, once all audio is out.
    plays_until: Option<Instant>,
}

struct Actor {
    services: Services,
    options: CallOptions,
    out: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    conversation: Conversation,
    session: Box<dyn SlmSession>,
    voice: Box<dyn Voice>,
    reply: Option<Reply>,
    next_reply: u64,
    /// Every task of the call; aborted when the actor ends.
    tasks: JoinSet<()>,
    /// Keeps the call in the registry while the actor lives.
    _registration: Registration,
}

/// Keeps the active-calls gauge right however the actor ends.
struct Live(Arc<Metrics>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.active_calls.dec();
    }
}

impl Actor {
    async fn run(
        mut self,
        mut vad: mpsc::Receiver<VadEvent>,
        mut commands: mpsc::Receiver<CallCommand>,
    ) {
        self.services.metrics.active_calls.inc();
        let _live = Live(self.services.metrics.clone());
        if let Some(text) = self.conversation.first_message.clone() {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Ok(text));
            self.start_reply(rx, self.cancel.child_token(), None);
        }
        loop {
            let plays_until = self.reply.as_ref().and_then(|r| r.plays_until);
            let playback_over = async move {
                match plays_until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = self.out.closed() => break,
                ev = vad.recv() => match ev {
                    Some(ev) => self.on_vad(ev).await,
                    None => break,
                },
                cmd = commands.recv() => match cmd {
                    Some(CallCommand::History(tx)) => {
                        let _ = tx.send(self.conversation.clone());
                    }
                    Some(CallCommand::Played { reply, unit }) => {
                        if let Some(r) = self.reply.as_mut().filter(|r| r.id == reply) {
                            r.acked = r.acked.max(unit + 1);
                        }
                    }
                    None => break,
                },
                ev = next_reply_event(&mut self.reply) => match ev {
                    ReplyEvent::Text(ev) => self.on_text(ev).await,
                    ReplyEvent::Pacer(ev) => self.on_pacer(ev).await,
                },
                _ = playback_over => self.finish_reply(),
            }
        }
        self.cancel.cancel();
        self.tasks.shutdown().await;
    }

    async fn on_vad(&mut self, ev: VadEvent) {
        match ev {
            VadEvent::SpeechStart => {}
            VadEvent::Interruption { .. } => self.barge_in("interruption").await,
            VadEvent::SpeechEnd {
                audio,
                true_end,
                detected,
                forced,
            } => {
                // A turn that ends while the bot still talks interrupts it too.
                self.barge_in("turn").await;
                let duration_ms = audio.len() as u64 * 1000 / MODEL_RATE as u64;
                tracing::debug!(duration_ms, forced, "user turn");
                let cancel = self.cancel.child_token();
                let tokens = self.session.respond(
                    UserTurn {
                        audio: audio.clone(),
                    },
                    &self.conversation,
                    cancel.clone(),
                );
                self.conversation.turns.push(Turn::User { duration_ms });
                self.start_reply(
                    tokens,
                    cancel,
                    Some((true_end, detected, duration_ms as f64)),
                );
            }
            VadEvent::Failed(e) => {
                tracing::error!(error = %e, "VAD failed; the call can no longer hear");
                let _ = self
                    .out
                    .send(Outbound::Error {
                        kind: "vad",
                        message: format!("voice detection failed: {e}"),
                    })
                    .await;
                self.cancel.cancel();
            }
        }
    }

    /// Starts the speaking stages for one reply.
    fn start_reply(
        &mut self,
        tokens: TokenStream,
        cancel: CancellationToken,
        turn_end: Option<(Instant, Instant, f64)>,
    ) {
        let id = self.next_reply;
        self.next_reply += 1;
        let s = &self.services.settings;
        let sentence = SentenceSettings {
            first_clause_words: s.first_clause_words,
            max_chars: s.max_unit_chars,
        };
        let (unit_tx, unit_rx) = mpsc::channel(UNIT_QUEUE);
        let (text_tx, text_rx) = mpsc::channel(REPLY_EVENT_QUEUE);
        let (pacer_tx, pacer_rx) = mpsc::channel(REPLY_EVENT_QUEUE);
        let (ledger_tx, ledger_rx) = watch::channel(Playout::default());
        // Tasks of earlier replies have ended; forget them so a long call does not pile them up.
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(accumulate(
            tokens,
            sentence,
            self.services.limits.max_reply_chars,
            unit_tx,
            text_tx,
            cancel.clone(),
        ));
        let audio = self.voice.synthesize(unit_rx, cancel.clone());
        let pacer = PacerSettings {
            reply: id,
            output_rate: self.options.output_rate,
            frame_ms: s.output_frame_ms,
            lead: s.lead(),
            max_ahead: std::time::Duration::from_millis(
                self.services.limits.max_synth_ahead_ms as u64,
            ),
        };
        self.tasks.spawn(pacer::run(
            pacer,
            audio,
            self.out.clone(),
            pacer_tx,
            ledger_tx,
            cancel.clone(),
        ));
        let mut timeline = Timeline {
            reply: id,
            ..Default::default()
        };
        if let Some((true_end, detected, ms)) = turn_end {
            timeline.user_audio_ms = ms;
            timeline.vad_end_ms = Some(Timeline::offset(true_end, detected));
        }
        self.reply = Some(Reply {
            id,
            cancel,
            turn_end,
            timeline,
            timeline_sent: false,
            units: Vec::new(),
            acked: 0,
            text_events: Some(text_rx),
            pacer_events: Some(pacer_rx),
            ledger: ledger_rx,
            text_done: false,
            plays_until: None,
        });
    }

    fn stage(&mut self, at: Instant, pick: fn(&mut Timeline) -> &mut Option<f64>) {
        let Some(r) = self.reply.as_mut() else { return };
        let Some((true_end, _, _)) = r.turn_end else {
            return;
        };
        let slot = pick(&mut r.timeline);
        if slot.is_none() {
            *slot = Some(Timeline::offset(true_end, at));
        }
    }

    async fn on_text(&mut self, ev: TextEvent) {
        match ev {
            TextEvent::FirstToken(at) => self.stage(at, |t| &mut t.first_token_ms),
            TextEvent::Unit(text, at) => {
                self.stage(at, |t| &mut t.first_unit_ms);
                let Some(r) = self.reply.as_mut() else { return };
                r.units.push(text.clone());
                let reply = r.id;
                if self.options.subscribe_transcript {
                    let _ = self.out.send(Outbound::Transcript { reply, text }).await;
                }
            }
            TextEvent::Done => {
                if let Some(r) = self.reply.as_mut() {
                    r.text_done = true;
                }
            }
            TextEvent::TooLong(limit) => {
                self.services.metrics.error("reply_too_long");
                tracing::warn!(limit, "a reply reached limits.max_reply_chars and was cut");
            }
            TextEvent::Failed(e) => {
                self.services.metrics.error("slm");
                tracing::warn!(error = %e, "the model failed mid-reply");
                let _ = self
                    .out
                    .send(Outbound::Error {
                        kind: "slm",
                        message: format!("the model failed: {e}"),
                    })
                    .await;
            }
        }
    }

    async fn on_pacer(&mut self, ev: PacerEvent) {
        match ev {
            PacerEvent::FirstSynthAudio(at) => self.stage(at, |t| &mut t.first_synth_byte_ms),
            PacerEvent::FirstAudioSent(at) => {
                self.stage(at, |t| &mut t.first_audio_sent_ms);
                self.send_timeline().await;
            }
            PacerEvent::Finished { plays_until } => {
                if let Some(r) = self.reply.as_mut() {
                    r.plays_until = Some(plays_until);
                }
            }
            PacerEvent::Underrun { by, synthesis } => {
                let cause = if synthesis { "synthesis" } else { "scheduling" };
                tracing::debug!(gap_ms = by.as_secs_f64() * 1e3, cause, "playback underrun");
                self.services.metrics.underrun(cause, by);
            }
            PacerEvent::Failed => {
                self.services.metrics.error("tts");
                let _ = self
                    .out
                    .send(Outbound::Error {
                        kind: "tts",
                        message: "speech synthesis failed".into(),
                    })
                    .await;
            }
        }
    }

    async fn send_timeline(&mut self) {
        let Some(r) = self.reply.as_mut() else { return };
        if r.timeline_sent || r.turn_end.is_none() {
            return;
        }
        r.timeline_sent = true;
        let t = r.timeline.clone();
        let h = &self.services.metrics.turn_stage_seconds;
        for (stage, v) in [
            ("vad_end", t.vad_end_ms),
            ("first_token", t.first_token_ms),
            ("first_unit", t.first_unit_ms),
            ("first_synth_byte", t.first_synth_byte_ms),
            ("first_audio_sent", t.first_audio_sent_ms),
        ] {
            if let Some(ms) = v {
                h.with_label_values(&[stage]).observe(ms / 1000.0);
            }
        }
        let _ = self.out.send(Outbound::Timeline(t)).await;
    }

    /// The reply played out in full.
    fn finish_reply(&mut self) {
        let Some(r) = self.reply.take() else { return };
        let text = r.units.join(" ");
        if !text.is_empty() {
            self.conversation.turns.push(Turn::Bot {
                text,
                interrupted: false,
            });
        }
    }

    /// Stops the reply in flight, if the bot is generating or speaking: cancels generation and
    /// synthesis, drops queued audio, tells the client to clear, and keeps what was heard.
    async fn barge_in(&mut self, during: &'static str) {
        let Some(r) = self.reply.take() else { return };
        let now = Instant::now();
        r.cancel.cancel();
        let ledger = r.ledger.borrow().clone();
        let silent = ledger.ends_at.is_none_or(|t| t <= now);
        if r.text_done && r.plays_until.is_some() && silent {
            // Already finished playing; the timer just has not fired yet.
            self.reply = Some(r);
            self.finish_reply();
            return;
        }
        let spoken = if self.options.playback_acks {
            r.units[..r.acked.min(r.units.len())].join(" ")
        } else {
            pacer::spoken_text(&r.units, &ledger, now).0
        };
        self.services
            .metrics
            .barge_ins
            .with_label_values(&[during])
            .inc();
        tracing::debug!(reply = r.id, %spoken, "barge-in");
        let _ = self
            .out
            .send(Outbound::Clear {
                reply: r.id,
                spoken: spoken.clone(),
            })
            .await;
        self.session.reply_truncated(&spoken);
        if !spoken.is_empty() {
            self.conversation.turns.push(Turn::Bot {
                text: spoken,
                interrupted: true,
            });
        }
    }
}

enum ReplyEvent {
    Text(TextEvent),
    Pacer(PacerEvent),
}

/// The next milestone of the reply in flight; pending while there is none. A stage's channel that
/// closes is forgotten so it cannot wake the actor again. Text events go first: a unit's event is
/// queued before the unit reaches the synthesizer, so taking text first keeps the timeline in
/// causal order (a unit is never seen after audio made from it).
async fn next_reply_event(reply: &mut Option<Reply>) -> ReplyEvent {
    let Some(r) = reply else {
        return std::future::pending().await;
    };
    loop {
        let (text_open, pacer_open) = (r.text_events.is_some(), r.pacer_events.is_some());
        if !text_open && !pacer_open {
            return std::future::pending().await;
        }
        tokio::select! {
            biased;
            ev = async { r.text_events.as_mut().expect("checked").recv().await }, if text_open => {
                match ev {
                    Some(ev) => return ReplyEvent::Text(ev),
                    None => r.text_events = None,
                }
            }
            ev = async { r.pacer_events.as_mut().expect("checked").recv().await }, if pacer_open => {
                match ev {
                    Some(ev) => return ReplyEvent::Pacer(ev),
                    None => r.pacer_events = None,
                }
            }
        }
    }
}

/// The sentence-accumulator stage: tokens in, text units out to the synthesizer. A reply stops
/// at `max_chars` characters (the rest of the token stream is dropped, which stops generation).
async fn accumulate(
    mut tokens: TokenStream,
    settings: SentenceSettings,
    max_chars: usize,
    units: mpsc::Sender<TextUnit>,
    events: mpsc::Sender<TextEvent>,
    cancel: CancellationToken,
) {
    let mut acc = SentenceAccumulator::new(settings);
    let mut index = 0;
    let mut first = true;
    let mut chars = 0usize;
    loop {
        let token = tokio::select! {
            _ = cancel.cancelled() => return,
            t = tokens.recv() => t,
        };
        let mut last = !matches!(token, Some(Ok(_)));
        let ready = match token {
            Some(Ok(t)) => {
                if first {
                    first = false;
                    let _ = events.send(TextEvent::FirstToken(Instant::now())).await;
                }
                let n = t.chars().count();
                if chars + n <= max_chars {
                    chars += n;
                    acc.push(&t)
                } else {
                    let keep: String = t.chars().take(max_chars - chars).collect();
                    let _ = events.send(TextEvent::TooLong(max_chars)).await;
                    last = true;
                    let mut ready = acc.push(&keep);
                    ready.extend(acc.finish());
                    ready
                }
            }
            Some(Err(e)) => {
                let _ = events.send(TextEvent::Failed(e.to_string())).await;
                acc.finish().into_iter().collect()
            }
            None => acc.finish().into_iter().collect(),
        };
        for text in ready {
            let _ = events
                .send(TextEvent::Unit(text.clone(), Instant::now()))
                .await;
            if units.send(TextUnit { index, text }).await.is_err() {
                return;
            }
            index += 1;
        }
        if last {
            let _ = events.send(TextEvent::Done).await;
            return;
        }
    }
}
