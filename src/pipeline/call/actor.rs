//! The call actor: one task that owns a call's conversation, its model session, its voice and the
//! reply in flight. It turns the listening stage's turn events into replies (one set of speaking
//! stages per reply: sentence stage → synthesizer → pacer) and on barge-in cancels the reply,
//! drops its queued audio and tells the client to clear, in one step, keeping in the history only
//! what was heard. Speech over the bot first only pauses the reply (the client clears, the pacer
//! takes back what was not played): a sound shorter than `false_interruption_ms` (a cough, an
//! "uh-huh") lets it play on from there, and speech that lasts that long cuts it the moment it
//! does (the VAD says so), freeing the model and the voice before the turn ends. At a pause
//! (smart turn policy) it starts the reply preemptively with its audio held: the end of the turn
//! commits it and lets the audio out, and speech after the pause discards it unheard, from the
//! model's cache too. It takes its inputs as channels, so tests drive it with synthetic turn
//! events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::handle::CallCommand;
use super::reply::{next_reply_event, Heard, Reply, ReplyEvent, Tentative, TurnEnd};
use super::Registration;
use crate::audio::MODEL_RATE;
use crate::metrics::{BargeIn, ErrorKind, Metrics, UnderrunCause};
use crate::model::{SlmError, SlmSession, TokenStream, UserTurn};
use crate::pipeline::conversation::{Conversation, Turn};
use crate::pipeline::limits::Limits;
use crate::pipeline::listen::{PauseSeen, VadEvent};
use crate::pipeline::pacer::{self, PacerEvent, PacerSettings, Playout};
use crate::pipeline::sentence::stage::{accumulate, TextEvent};
use crate::pipeline::sentence::SentenceSettings;
use crate::pipeline::{Outbound, PipelineSettings, Timeline};
use crate::tts::Voice;

/// Text units waiting for the synthesizer of a reply.
const UNIT_QUEUE: usize = 32;
/// Reply milestones; a handful per reply.
const REPLY_EVENT_QUEUE: usize = 64;
/// Quiet after a short sound over a paused reply before it plays on: a word followed by more
/// speech ("Wait, … stop, I have a question") must not let the reply out in between.
const RESUME_AFTER: Duration = Duration::from_millis(300);

/// What the actor needs to know of the server and of the caller.
pub(crate) struct ActorConfig {
    pub settings: Arc<PipelineSettings>,
    pub limits: Arc<Limits>,
    pub metrics: Arc<Metrics>,
    pub output_rate: u32,
    /// The transport reports played units; else the playout clock estimates them.
    pub playback_acks: bool,
    pub subscribe_transcript: bool,
    /// The call's span and what its spans say of it.
    pub trace: (tracing::Span, crate::telemetry::CallInfo),
}

/// Held while the actor lives: the call's place in the registry and its call slot, so the server
/// knows a call has ended only once its actor has.
#[derive(Default)]
pub(crate) struct Keep {
    pub _registration: Option<Registration>,
    pub _slot: Option<OwnedSemaphorePermit>,
}

pub(crate) struct Actor {
    cfg: ActorConfig,
    out: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    conversation: Conversation,
    session: Box<dyn SlmSession>,
    voice: Box<dyn Voice>,
    reply: Option<Reply>,
    /// Short sounds heard over the paused reply so far.
    sounds: Option<Sounds>,
    /// Saying goodbye (a server drain): the call ends when the reply has played, and hears no
    /// more turns.
    ending: bool,
    next_reply: u64,
    /// Every task of the call; aborted when the actor ends.
    tasks: JoinSet<()>,
    _keep: Keep,
}

/// Speech over a paused reply that has ended, each part shorter than a turn so far.
struct Sounds {
    /// Their audio, one after the other: if more speech makes a turn of them, it is all of it.
    audio: Vec<f32>,
    speech: Duration,
    /// When the reply plays on unless speech comes first.
    resume_at: Option<Instant>,
}

/// Keeps the active-calls gauge right however the actor ends.
struct Live(Arc<Metrics>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.active_calls.dec();
    }
}

impl Actor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: ActorConfig,
        session: Box<dyn SlmSession>,
        voice: Box<dyn Voice>,
        conversation: Conversation,
        out: mpsc::Sender<Outbound>,
        cancel: CancellationToken,
        tasks: JoinSet<()>,
        keep: Keep,
    ) -> Self {
        Actor {
            cfg,
            out,
            cancel,
            conversation,
            session,
            voice,
            reply: None,
            sounds: None,
            ending: false,
            next_reply: 0,
            tasks,
            _keep: keep,
        }
    }

    /// Runs the call until it is cancelled, its transport goes, or the listening stage ends.
    pub(crate) async fn run(
        mut self,
        mut vad: mpsc::Receiver<VadEvent>,
        mut commands: mpsc::Receiver<CallCommand>,
    ) {
        self.cfg.metrics.active_calls.inc();
        let _live = Live(self.cfg.metrics.clone());
        if let Some(text) = self.conversation.first_message.clone() {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Ok(text));
            self.start_reply(rx, self.cancel.child_token(), None, None);
        }
        loop {
            let plays_until = self.reply.as_ref().and_then(|r| r.plays_until);
            let playback_over = sleep_until(plays_until);
            let quiet_after_sound = sleep_until(self.sounds.as_ref().and_then(|s| s.resume_at));
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
                    Some(CallCommand::Played { reply, unit, within }) => {
                        // A paused reply ignores them (`Reply::acknowledge`).
                        if let Some(r) = self.reply.as_mut().filter(|r| r.id == reply) {
                            r.acknowledge(unit, within);
                        }
                    }
                    Some(CallCommand::Goodbye(text)) => self.goodbye(text).await,
                    None => break,
                },
                ev = next_reply_event(&mut self.reply) => match ev {
                    ReplyEvent::Text(ev) => self.on_text(ev).await,
                    ReplyEvent::Pacer(ev) => self.on_pacer(ev).await,
                },
                _ = playback_over => self.finish_reply(),
                _ = quiet_after_sound => self.resume_reply("a short sound"),
            }
        }
        self.cancel.cancel();
        self.tasks.shutdown().await;
    }

    async fn on_vad(&mut self, ev: VadEvent) {
        if self.ending && !matches!(ev, VadEvent::Failed(_)) {
            return;
        }
        match ev {
            VadEvent::SpeechStart => {}
            VadEvent::Interruption => {
                let paused = self.reply.as_ref().is_some_and(|r| r.paused.is_some());
                let pausable = |r: &Reply| r.tentative.is_none();
                if paused {
                    // More speech over the paused reply: it stays paused.
                    if let Some(s) = self.sounds.as_mut() {
                        s.resume_at = None;
                    }
                } else if self.cfg.settings.turn.false_interruption_ms > 0
                    && self.reply.as_ref().is_some_and(pausable)
                {
                    self.pause_reply().await;
                } else {
                    self.barge_in(BargeIn::Interruption).await;
                }
            }
            VadEvent::Sustained => {
                // Speech over the paused reply has lasted `false_interruption_ms`: it is no
                // false interruption, so the reply is cut now, freeing the model and the voice,
                // not when the interrupting turn ends. Short sounds before it stay, to be heard
                // with it as one turn.
                if self.reply.as_ref().is_some_and(|r| r.paused.is_some()) {
                    let sounds = self.sounds.take();
                    self.barge_in(BargeIn::Interruption).await;
                    self.sounds = sounds;
                }
            }
            VadEvent::Dropped => self.resume_reply("no turn"),
            VadEvent::Pause {
                audio,
                true_end,
                detected,
            } => {
                // Only when nothing else is in flight: a pause while the bot talks belongs to a
                // barge-in, which the turn's end handles.
                if !self.cfg.settings.turn.preemptive || self.reply.is_some() {
                    return;
                }
                let duration_ms = turn_ms(&audio);
                let turn_samples = audio.len();
                let cancel = self.cancel.child_token();
                let tokens = self
                    .session
                    .begin_tentative(UserTurn { audio }, cancel.clone());
                self.start_reply(
                    tokens,
                    cancel,
                    Some((true_end, detected, duration_ms as f64)),
                    Some(turn_samples),
                );
                self.cfg.metrics.preemptive("started", None);
                tracing::debug!(duration_ms, "preemptive reply at a pause");
            }
            VadEvent::Resume => self.discard_tentative(),
            VadEvent::SpeechEnd {
                audio,
                true_end,
                detected,
                forced,
                speech,
                pause,
            } => {
                let (audio, speech) = match self.sounds.take() {
                    // Short sounds before this speech over the same paused reply: one turn.
                    Some(s) => {
                        let mut all = s.audio;
                        all.extend_from_slice(&audio);
                        (Arc::from(all), s.speech + speech)
                    }
                    None => (audio, speech),
                };
                let short =
                    speech.as_millis() < self.cfg.settings.turn.false_interruption_ms as u128;
                if short && self.reply.as_ref().is_some_and(|r| r.paused.is_some()) {
                    // A sound over the bot, not a turn: unless speech follows soon, the reply
                    // plays on, and the sound is neither answered nor kept.
                    self.sounds = Some(Sounds {
                        audio: audio.to_vec(),
                        speech,
                        resume_at: Some(now() + RESUME_AFTER),
                    });
                    return;
                }
                let duration_ms = turn_ms(&audio);
                let answers = |r: &Reply| {
                    r.tentative
                        .as_ref()
                        .is_some_and(|t| t.turn_samples == audio.len())
                        && r.true_end() == Some(true_end)
                };
                if self.reply.as_ref().is_some_and(answers) {
                    self.commit(detected, duration_ms, pause).await;
                    return;
                }
                self.discard_tentative();
                // A turn that ends while the bot still talks interrupts it too.
                self.barge_in(BargeIn::Turn).await;
                tracing::debug!(duration_ms, forced, "user turn");
                let cancel = self.cancel.child_token();
                let tokens = self.session.respond(UserTurn { audio }, cancel.clone());
                self.conversation.push(Turn::User { duration_ms });
                let turn_end = (true_end, detected, duration_ms as f64);
                self.start_reply(tokens, cancel, Some(turn_end), None);
                if let Some(r) = self.reply.as_mut() {
                    note_pause(r, pause);
                }
            }
            VadEvent::Failed(e) => {
                tracing::error!(error = %e, "VAD failed; the call can no longer hear");
                let _ = self
                    .out
                    .send(Outbound::Error {
                        kind: ErrorKind::Vad,
                        message: format!("voice detection failed: {e}"),
                    })
                    .await;
                self.cancel.cancel();
            }
        }
    }

    /// Speech over the bot: its audio stops where the client's playback stands (the client
    /// clears; the pacer takes back the rest), until the speech proves a turn or not.
    async fn pause_reply(&mut self) {
        let Some(r) = self.reply.as_mut() else { return };
        let at = now();
        let spoken = match r.heard(at, self.cfg.playback_acks) {
            Heard::All => {
                self.finish_reply();
                return;
            }
            Heard::Cut(spoken) => spoken,
        };
        r.pause(at);
        tracing::debug!(reply = r.id, %spoken, "speech over the reply: paused");
        let clear = Outbound::Clear {
            reply: r.id,
            spoken,
            paused: true,
        };
        let _ = self.out.send(clear).await;
    }

    /// The sound that paused the reply was no turn: it plays on from where it stopped.
    fn resume_reply(&mut self, why: &str) {
        self.sounds = None;
        let Some(r) = self.reply.as_mut() else { return };
        let Some(paused) = r.resume(now()) else {
            return;
        };
        self.cfg.metrics.paused_reply("resumed");
        tracing::debug!(
            reply = r.id,
            ?paused,
            why,
            "false interruption: the reply resumes"
        );
    }

    /// The turn ended where the preemptive reply began: it becomes the reply, and its audio and
    /// held messages go out now.
    async fn commit(&mut self, detected: Instant, duration_ms: u64, pause: Option<PauseSeen>) {
        let Some(r) = self.reply.as_mut() else { return };
        self.session.commit();
        let held = r.commit(now(), detected);
        note_pause(r, pause);
        self.conversation.push(Turn::User { duration_ms });
        self.cfg.metrics.preemptive("committed", None);
        tracing::debug!(duration_ms, "preemptive reply committed");
        for msg in held {
            if self.out.send(msg).await.is_err() {
                return;
            }
        }
    }

    /// The user went on after the pause: the preemptive reply is taken back unheard. The model
    /// forgets the turn before the reply is cancelled, so nothing of it is kept.
    fn discard_tentative(&mut self) {
        if self.reply.as_ref().is_none_or(|r| r.tentative.is_none()) {
            return;
        }
        let r = self.reply.take().expect("checked");
        self.session.discard();
        r.cancel.cancel();
        let ran = r
            .tentative
            .as_ref()
            .map(|t| now().saturating_duration_since(t.started));
        self.cfg.metrics.preemptive("discarded", ran);
        tracing::debug!(?ran, "preemptive reply discarded");
    }

    /// A message for the client, held with a preemptive reply until it is committed.
    async fn send(&mut self, msg: Outbound) {
        if let Some(t) = self.reply.as_mut().and_then(|r| r.tentative.as_mut()) {
            t.held.push(msg);
            return;
        }
        let _ = self.out.send(msg).await;
    }

    /// Starts the speaking stages for one reply; a preemptive one (answering a turn of
    /// `tentative` samples that may still grow) with its audio held.
    fn start_reply(
        &mut self,
        tokens: TokenStream,
        cancel: CancellationToken,
        turn_end: Option<TurnEnd>,
        tentative: Option<usize>,
    ) {
        let id = self.next_reply;
        self.next_reply += 1;
        let s = &self.cfg.settings;
        let sentence = SentenceSettings {
            first_clause_words: s.first_clause_words,
            max_chars: s.max_unit_chars,
        };
        let (unit_tx, unit_rx) = mpsc::channel(UNIT_QUEUE);
        let (text_tx, text_rx) = mpsc::channel(REPLY_EVENT_QUEUE);
        let (pacer_tx, pacer_rx) = mpsc::channel(REPLY_EVENT_QUEUE);
        let (ledger_tx, ledger_rx) = watch::channel(Playout::default());
        let (gate, gate_rx) = watch::channel(tentative.is_some().then(now));
        let tentative = tentative.map(|turn_samples| Tentative {
            turn_samples,
            started: now(),
            held: Vec::new(),
        });
        // Tasks of earlier replies have ended; forget them so a long call does not pile them up.
        while self.tasks.try_join_next().is_some() {}
        self.tasks.spawn(accumulate(
            tokens,
            sentence,
            self.cfg.limits.max_reply_chars,
            unit_tx,
            text_tx,
            cancel.clone(),
        ));
        let audio = self.voice.synthesize(unit_rx, cancel.clone());
        let pacer = PacerSettings {
            reply: id,
            output_rate: self.cfg.output_rate,
            frame_ms: s.output_frame_ms,
            lead: s.lead(),
            max_ahead: Duration::from_millis(self.cfg.limits.max_synth_ahead_ms as u64),
        };
        self.tasks.spawn(pacer::run(
            pacer,
            audio,
            self.out.clone(),
            pacer_tx,
            ledger_tx,
            gate_rx,
            cancel.clone(),
        ));
        self.reply = Some(Reply::new(
            id, cancel, turn_end, text_rx, pacer_rx, ledger_rx, gate, tentative,
        ));
    }

    fn stage(&mut self, at: Instant, pick: fn(&mut Timeline) -> &mut Option<f64>) {
        if let Some(r) = self.reply.as_mut() {
            r.stage(at, pick);
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
                if self.cfg.subscribe_transcript {
                    self.send(Outbound::Transcript { reply, text }).await;
                }
            }
            TextEvent::Done => {
                if let Some(r) = self.reply.as_mut() {
                    r.text_done = true;
                }
            }
            TextEvent::TooLong(limit) => {
                if let Some(r) = self.reply.as_mut() {
                    r.cut_short = true;
                }
                self.cfg.metrics.error(ErrorKind::ReplyTooLong);
                tracing::warn!(limit, "a reply reached limits.max_reply_chars and was cut");
            }
            TextEvent::Failed(e) => {
                if let Some(r) = self.reply.as_mut() {
                    r.cut_short = true;
                }
                let kind = match e {
                    SlmError::Busy { .. } => ErrorKind::ModelBusy,
                    _ => ErrorKind::Slm,
                };
                // The engine counts the turns it turns away itself.
                if kind != ErrorKind::ModelBusy {
                    self.cfg.metrics.error(kind);
                }
                tracing::warn!(error = %e, "the model failed on a turn");
                self.send(Outbound::Error {
                    kind,
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
                // A paused reply is finished again once it plays on.
                if let Some(r) = self.reply.as_mut().filter(|r| r.paused.is_none()) {
                    r.plays_until = Some(plays_until);
                }
            }
            PacerEvent::Underrun { by, synthesis } => {
                let cause = if synthesis {
                    UnderrunCause::Synthesis
                } else {
                    UnderrunCause::Scheduling
                };
                let gap_ms = by.as_secs_f64() * 1e3;
                tracing::debug!(gap_ms, cause = cause.as_str(), "playback underrun");
                self.cfg.metrics.underrun(cause, by);
            }
            PacerEvent::Failed => {
                self.cfg.metrics.error(ErrorKind::Tts);
                self.send(Outbound::Error {
                    kind: ErrorKind::Tts,
                    message: "speech synthesis failed".into(),
                })
                .await;
            }
        }
    }

    async fn send_timeline(&mut self) {
        let Some(t) = self.reply.as_mut().and_then(Reply::take_timeline) else {
            return;
        };
        for (stage, v) in t.stages() {
            if let Some(ms) = v {
                self.cfg.metrics.turn_stage(stage, ms / 1000.0);
            }
        }
        let _ = self.out.send(Outbound::Timeline(t)).await;
    }

    /// Cuts what is playing, says `text`, and ends the call once it has played.
    async fn goodbye(&mut self, text: String) {
        if self.ending {
            return;
        }
        self.barge_in(BargeIn::Drain).await;
        self.ending = true;
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(text));
        self.start_reply(rx, self.cancel.child_token(), None, None);
        tracing::info!("the server is draining: goodbye");
    }

    /// Exports the span of the turn `r` answered, now that the reply has ended.
    fn trace_turn(&self, r: &Reply, barge_in: bool) {
        let Some(true_end) = r.true_end() else { return };
        let t = &r.timeline;
        let stages = t.stages().map(|(stage, ms)| (stage.as_str(), ms));
        let speech = Duration::from_secs_f64(t.user_audio_ms / 1e3);
        let trace = crate::telemetry::TurnTrace {
            reply: r.id,
            speech_start: true_end.checked_sub(speech).unwrap_or(true_end),
            true_end,
            ended: now(),
            barge_in,
            stages: &stages,
        };
        let (span, info) = &self.cfg.trace;
        crate::telemetry::record_turn(span, info, &trace);
    }

    /// The reply played out in full.
    fn finish_reply(&mut self) {
        if self.ending {
            self.cancel.cancel();
        }
        let Some(r) = self.reply.take() else { return };
        self.trace_turn(&r, false);
        let text = r.units.join(" ");
        // All of it was heard, but the model said more than was spoken: its history keeps
        // only what was.
        if r.cut_short {
            self.session.reply_truncated(&text);
        }
        if !text.is_empty() {
            self.conversation.push(Turn::Bot {
                text,
                interrupted: false,
            });
        }
    }

    /// Stops the reply in flight, if the bot is generating or speaking: cancels generation and
    /// synthesis, drops queued audio, tells the client to clear, and keeps what was heard.
    async fn barge_in(&mut self, during: BargeIn) {
        self.sounds = None;
        // Nothing of a preemptive reply was heard: it is simply taken back.
        self.discard_tentative();
        let Some(r) = self.reply.take() else { return };
        r.cancel.cancel();
        // Speech that paused the reply proved a barge-in; the pacer took back what was not
        // played by then, so the ledger says what was heard.
        let during = if r.paused.is_some() {
            self.cfg.metrics.paused_reply("cut");
            BargeIn::Interruption
        } else {
            during
        };
        // Tokio's clock, which the pacer's ledger uses too (and tests can pause).
        let now = tokio::time::Instant::now().into_std();
        let spoken = match r.heard(now, self.cfg.playback_acks) {
            Heard::All => {
                self.reply = Some(r);
                self.finish_reply();
                return;
            }
            Heard::Cut(spoken) => spoken,
        };
        self.cfg.metrics.barge_in(during);
        self.trace_turn(&r, true);
        tracing::debug!(reply = r.id, %spoken, "barge-in");
        let _ = self
            .out
            .send(Outbound::Clear {
                reply: r.id,
                spoken: spoken.clone(),
                paused: false,
            })
            .await;
        self.session.reply_truncated(&spoken);
        if !spoken.is_empty() {
            self.conversation.push(Turn::Bot {
                text: spoken,
                interrupted: true,
            });
        }
    }
}

/// Sleeps until `t`; forever if `None`.
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// A user turn's length in milliseconds.
fn turn_ms(audio: &[f32]) -> u64 {
    audio.len() as u64 * 1000 / MODEL_RATE as u64
}

/// Tokio's clock, which the pacer uses too (and tests can pause).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Records the pause a turn ended at in its reply's timeline.
fn note_pause(r: &mut Reply, pause: Option<PauseSeen>) {
    let (Some(p), Some(true_end)) = (pause, r.true_end()) else {
        return;
    };
    r.timeline.pause_ms = Some(crate::pipeline::Timeline::offset(true_end, p.at));
    r.timeline.end_of_turn_probability = p.probability;
}
