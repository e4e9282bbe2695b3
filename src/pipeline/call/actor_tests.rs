//! The call actor alone, on tokio's paused clock: the scripted model, a fake voice that speaks
//! each unit as one second of audio at once, and turn events made up by the test instead of a
//! VAD. Covers the first message, barge-in during generation and during playback, the history by
//! acknowledgement and by the playout estimate, a reply played out in full, preemptive replies,
//! and replies paused by a sound over them that resume or are cut.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::actor::{Actor, ActorConfig, Keep};
use super::CallCommand;
use crate::metrics::Metrics;
use crate::model::scripted::ScriptedModel;
use crate::model::SpeechLanguageModel;
use crate::pipeline::conversation::{Conversation, Turn};
use crate::pipeline::limits::Limits;
use crate::pipeline::listen::VadEvent;
use crate::pipeline::{Outbound, PipelineSettings};
use crate::tts::{AudioStream, SynthChunk, TextUnit, Voice, AUDIO_QUEUE};

const RATE: u32 = 16_000;
const REPLY: &str = "One two three. Four five six.";

/// Speaks every unit as one second of a constant tone, in ten chunks, as soon as it arrives.
struct FakeVoice;

impl Voice for FakeVoice {
    fn synthesize(
        &mut self,
        mut units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        let (tx, rx) = mpsc::channel(AUDIO_QUEUE);
        tokio::spawn(async move {
            while let Some(u) = units.recv().await {
                for k in 0..10 {
                    let chunk = SynthChunk {
                        unit: u.index,
                        samples: vec![0.25; RATE as usize / 10],
                        sample_rate: RATE,
                        unit_done: k == 9,
                    };
                    if cancel.is_cancelled() || tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

struct Call {
    vad: mpsc::Sender<VadEvent>,
    commands: mpsc::Sender<CallCommand>,
    out: mpsc::Receiver<Outbound>,
    /// Everything the call sent, with when (tokio's clock).
    seen: Vec<(tokio::time::Instant, Outbound)>,
    _cancel: tokio_util::sync::DropGuard,
}

/// A call whose interruptions cut the reply at once (`false_interruption_ms = 0`).
fn call(token_delay_ms: u64, first_message: Option<&str>, playback_acks: bool) -> Call {
    let mut settings = PipelineSettings::default();
    settings.turn.false_interruption_ms = 0;
    call_with(settings, token_delay_ms, first_message, playback_acks)
}

/// A call with the default settings: an interruption first pauses the reply.
fn pausing_call(playback_acks: bool) -> Call {
    call_with(PipelineSettings::default(), 0, None, playback_acks)
}

fn call_with(
    settings: PipelineSettings,
    token_delay_ms: u64,
    first_message: Option<&str>,
    playback_acks: bool,
) -> Call {
    let model = ScriptedModel::new(REPLY, Duration::from_millis(token_delay_ms));
    let cfg = ActorConfig {
        settings: Arc::new(settings),
        limits: Arc::new(Limits::default()),
        metrics: Arc::new(Metrics::new()),
        output_rate: RATE,
        playback_acks,
        subscribe_transcript: true,
        trace: (
            tracing::Span::none(),
            crate::telemetry::CallInfo {
                id: "test".into(),
                transport: "test",
                model: "scripted".into(),
                voice: "fake".into(),
            },
        ),
    };
    let (vad_tx, vad_rx) = mpsc::channel(8);
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let cancel = CancellationToken::new();
    let conversation = Conversation::new(None, first_message.map(str::to_string));
    let actor = Actor::new(
        cfg,
        model.open_session(None).unwrap(),
        Box::new(FakeVoice),
        conversation,
        out_tx,
        cancel.clone(),
        JoinSet::new(),
        Keep::default(),
    );
    tokio::spawn(actor.run(vad_rx, cmd_rx));
    Call {
        vad: vad_tx,
        commands: cmd_tx,
        out: out_rx,
        seen: Vec::new(),
        _cancel: cancel.drop_guard(),
    }
}

impl Call {
    /// The user finished a turn now.
    async fn turn(&self) {
        self.turn_of(Duration::from_secs(1)).await;
    }

    /// The user finished a turn of `speech` now.
    async fn turn_of(&self, speech: Duration) {
        let now = tokio::time::Instant::now().into_std();
        let ev = VadEvent::SpeechEnd {
            audio: Arc::from(vec![0.0f32; RATE as usize]),
            true_end: now,
            detected: now,
            forced: false,
            speech,
            pause: None,
        };
        self.vad.send(ev).await.unwrap();
    }

    /// The user paused after `samples` of speech that ended at `true_end`.
    async fn pause(&self, samples: usize, true_end: std::time::Instant) {
        let ev = VadEvent::Pause {
            audio: Arc::from(vec![0.0f32; samples]),
            true_end,
            detected: tokio::time::Instant::now().into_std(),
        };
        self.vad.send(ev).await.unwrap();
    }

    /// The turn ended at the pause (same audio, same true end).
    async fn end_at_pause(&self, samples: usize, true_end: std::time::Instant, p: f32) {
        let now = tokio::time::Instant::now().into_std();
        let ev = VadEvent::SpeechEnd {
            audio: Arc::from(vec![0.0f32; samples]),
            true_end,
            detected: now,
            forced: false,
            speech: Duration::from_secs(1),
            pause: Some(crate::pipeline::listen::PauseSeen {
                at: now,
                probability: Some(p),
            }),
        };
        self.vad.send(ev).await.unwrap();
    }

    async fn interrupt(&self) {
        self.vad.send(VadEvent::Interruption).await.unwrap();
    }

    /// Lets `d` pass, collecting what the call sends meanwhile.
    async fn wait(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                m = self.out.recv() => {
                    let m = m.expect("the call is running");
                    self.seen.push((tokio::time::Instant::now(), m));
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    /// Waits until the first audio frame arrives; returns when it did.
    async fn first_audio(&mut self) -> tokio::time::Instant {
        for _ in 0..1000 {
            if let Some((at, _)) = self
                .seen
                .iter()
                .find(|(_, m)| matches!(m, Outbound::Audio { .. }))
            {
                return *at;
            }
            self.wait(Duration::from_millis(10)).await;
        }
        panic!("no audio")
    }

    async fn history(&mut self) -> Conversation {
        let (tx, rx) = oneshot::channel();
        self.commands.send(CallCommand::History(tx)).await.unwrap();
        rx.await.unwrap()
    }

    fn clears(&self) -> Vec<(u64, String)> {
        self.seen
            .iter()
            .filter_map(|(_, m)| match m {
                Outbound::Clear {
                    reply,
                    spoken,
                    paused: false,
                } => Some((*reply, spoken.clone())),
                _ => None,
            })
            .collect()
    }

    /// The clears that only paused a reply.
    fn pauses(&self) -> Vec<(u64, String)> {
        self.seen
            .iter()
            .filter_map(|(_, m)| match m {
                Outbound::Clear {
                    reply,
                    spoken,
                    paused: true,
                } => Some((*reply, spoken.clone())),
                _ => None,
            })
            .collect()
    }

    /// Samples of audio sent within `when`, whatever became of them.
    fn samples_in(&self, when: impl std::ops::RangeBounds<tokio::time::Instant>) -> usize {
        self.seen
            .iter()
            .filter(|(at, _)| when.contains(at))
            .filter_map(|(_, m)| match m {
                Outbound::Audio { samples, .. } => Some(samples.len()),
                _ => None,
            })
            .sum()
    }

    /// Audio frames of a reply that was not cancelled, sent after `t`.
    fn live_audio_after(&self, t: tokio::time::Instant) -> usize {
        self.seen
            .iter()
            .filter(|(at, m)| {
                *at > t && matches!(m, Outbound::Audio { playable, .. } if !playable.is_stale())
            })
            .count()
    }
}

fn bot(text: &str, interrupted: bool) -> Turn {
    Turn::Bot {
        text: text.into(),
        interrupted,
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_message_is_spoken_and_kept() {
    let mut c = call(0, Some("Hello there."), false);
    c.wait(Duration::from_secs(3)).await;
    let transcript: Vec<&str> = c
        .seen
        .iter()
        .filter_map(|(_, m)| match m {
            Outbound::Transcript { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(transcript, ["Hello there."]);
    let samples: usize = c
        .seen
        .iter()
        .filter_map(|(_, m)| match m {
            Outbound::Audio { samples, .. } => Some(samples.len()),
            _ => None,
        })
        .sum();
    assert_eq!(samples, RATE as usize);
    // The first message answers no turn: no timeline.
    assert!(!c
        .seen
        .iter()
        .any(|(_, m)| matches!(m, Outbound::Timeline(_))));
    let h = c.history().await;
    assert_eq!(h.turns, [bot("Hello there.", false)]);
}

#[tokio::test(start_paused = true)]
async fn a_reply_played_out_in_full_is_kept_whole() {
    let mut c = call(0, None, false);
    c.turn().await;
    c.wait(Duration::from_secs(4)).await;
    let h = c.history().await;
    assert_eq!(h.turns[0], Turn::User { duration_ms: 1_000 });
    assert_eq!(h.turns[1], bot(REPLY, false));
    let marks: Vec<(u64, usize)> = c
        .seen
        .iter()
        .filter_map(|(_, m)| match m {
            Outbound::UnitSent {
                reply,
                unit,
                within: None,
                ..
            } => Some((*reply, *unit)),
            _ => None,
        })
        .collect();
    assert_eq!(marks, [(0, 0), (0, 1)], "one at each unit's end");
    assert!(c
        .seen
        .iter()
        .any(|(_, m)| matches!(m, Outbound::Timeline(_))));
    assert!(c.clears().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_barge_in_during_generation_keeps_nothing_of_the_reply() {
    let mut c = call(200, None, false);
    c.turn().await;
    // The first token ("One") is out, no unit is complete yet.
    c.wait(Duration::from_millis(300)).await;
    c.interrupt().await;
    let cut = tokio::time::Instant::now();
    c.wait(Duration::from_secs(3)).await;
    assert_eq!(c.clears(), [(0, String::new())]);
    assert_eq!(c.live_audio_after(cut), 0);
    assert!(!c
        .seen
        .iter()
        .any(|(_, m)| matches!(m, Outbound::Transcript { .. })));
    let h = c.history().await;
    assert_eq!(h.turns, [Turn::User { duration_ms: 1_000 }]);
}

#[tokio::test(start_paused = true)]
async fn a_barge_in_during_playback_keeps_what_the_playout_clock_says_was_heard() {
    let mut c = call(0, None, false);
    c.turn().await;
    c.first_audio().await;
    // Unit 0 plays for 1 s, then unit 1: half of it, one word of three, has played.
    c.wait(Duration::from_millis(1_500)).await;
    c.interrupt().await;
    let cut = tokio::time::Instant::now();
    c.wait(Duration::from_secs(2)).await;
    assert_eq!(c.clears(), [(0, "One two three. Four".to_string())]);
    assert_eq!(c.live_audio_after(cut), 0);
    let h = c.history().await;
    assert_eq!(h.turns[1], bot("One two three. Four", true));
}

#[tokio::test(start_paused = true)]
async fn with_playback_acks_the_history_keeps_only_acknowledged_units() {
    let mut c = call(0, None, true);
    c.turn().await;
    c.first_audio().await;
    c.wait(Duration::from_millis(1_100)).await;
    // The client reports unit 0 played; unit 1 is half played but not acknowledged.
    let played = CallCommand::Played {
        reply: 0,
        unit: 0,
        within: None,
    };
    c.commands.send(played).await.unwrap();
    c.wait(Duration::from_millis(400)).await;
    c.interrupt().await;
    c.wait(Duration::from_secs(1)).await;
    assert_eq!(c.clears(), [(0, "One two three.".to_string())]);
    let h = c.history().await;
    assert_eq!(h.turns[1], bot("One two three.", true));
}

#[tokio::test(start_paused = true)]
async fn a_new_turn_while_the_bot_speaks_cuts_the_reply_and_starts_another() {
    let mut c = call(0, None, false);
    c.turn().await;
    c.first_audio().await;
    c.wait(Duration::from_millis(500)).await;
    c.turn().await;
    c.wait(Duration::from_secs(4)).await;
    assert_eq!(c.clears(), [(0, "One".to_string())]);
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [
            Turn::User { duration_ms: 1_000 },
            bot("One", true),
            Turn::User { duration_ms: 1_000 },
            bot(REPLY, false),
        ]
    );
}

/// A reply started at a pause synthesizes but sends nothing; when the turn ends there, it is
/// committed and its audio goes out at once, with the history as for an ordinary turn and the
/// pause, the model's probability and the commit in the timeline.
#[tokio::test(start_paused = true)]
async fn a_preemptive_reply_is_held_until_the_turn_ends_then_sent_at_once() {
    let mut c = call(0, None, false);
    let true_end = tokio::time::Instant::now().into_std();
    c.wait(Duration::from_millis(200)).await;
    c.pause(RATE as usize, true_end).await;
    c.wait(Duration::from_millis(300)).await;
    assert!(
        c.seen.is_empty(),
        "nothing reaches the client before the turn ends: {:?}",
        c.seen
    );
    c.end_at_pause(RATE as usize, true_end, 0.9).await;
    let committed = tokio::time::Instant::now();
    let first = c.first_audio().await;
    assert_eq!(
        first, committed,
        "audio was ready: it goes out at the commit"
    );
    c.wait(Duration::from_secs(3)).await;
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [Turn::User { duration_ms: 1_000 }, bot(REPLY, false)]
    );
    let t = c
        .seen
        .iter()
        .find_map(|(_, m)| match m {
            Outbound::Timeline(t) => Some(t.clone()),
            _ => None,
        })
        .expect("a timeline");
    assert_eq!(t.end_of_turn_probability, Some(0.9));
    assert_eq!(t.preemptive_start_ms, Some(200.0));
    assert_eq!(t.commit_ms, Some(500.0));
    assert_eq!(t.first_audio_sent_ms, Some(500.0));
    assert!(t.first_token_ms.unwrap() <= 200.0, "{t:?}");
    let transcripts = c
        .seen
        .iter()
        .filter(|(_, m)| matches!(m, Outbound::Transcript { .. }))
        .count();
    assert_eq!(transcripts, 2, "the held transcript went out at the commit");
}

/// Speech after the pause takes the preemptive reply back: nothing is sent, nothing is kept,
/// and the longer turn is then answered whole.
#[tokio::test(start_paused = true)]
async fn speech_after_a_pause_discards_the_preemptive_reply_unheard() {
    let mut c = call(0, None, false);
    let true_end = tokio::time::Instant::now().into_std();
    c.pause(RATE as usize, true_end).await;
    c.wait(Duration::from_millis(300)).await;
    c.vad.send(VadEvent::Resume).await.unwrap();
    c.wait(Duration::from_millis(500)).await;
    assert!(c.seen.is_empty(), "{:?}", c.seen);
    assert_eq!(c.history().await.turns, []);
    // The turn goes on and ends later, with more audio: an ordinary reply.
    let later = tokio::time::Instant::now().into_std();
    c.end_at_pause(2 * RATE as usize, later, 0.8).await;
    c.first_audio().await;
    c.wait(Duration::from_secs(3)).await;
    assert!(c.clears().is_empty());
    assert_eq!(
        c.history().await.turns,
        [Turn::User { duration_ms: 2_000 }, bot(REPLY, false)]
    );
}

/// A cough over the bot 1.5 s into its reply: the client is told to clear (the reply is only
/// paused), nothing is sent while the sound lasts, and once it dies away with no turn the reply
/// plays on from where it stopped: the part of unit 1 not yet played, exactly. The history holds
/// the whole reply.
#[tokio::test(start_paused = true)]
async fn a_sound_that_comes_to_nothing_pauses_the_reply_and_it_resumes_where_it_stopped() {
    let mut c = pausing_call(false);
    c.turn().await;
    let first = c.first_audio().await;
    c.wait(Duration::from_millis(1_500)).await;
    c.interrupt().await;
    let paused = tokio::time::Instant::now();
    let played = ((paused - first).as_secs_f64() * RATE as f64).round() as usize;
    c.wait(Duration::from_millis(400)).await;
    assert_eq!(c.pauses(), [(0, "One two three. Four".to_string())]);
    let during = (
        std::ops::Bound::Excluded(paused),
        std::ops::Bound::Unbounded,
    );
    assert_eq!(c.samples_in(during), 0, "nothing sent while paused");
    c.vad.send(VadEvent::Dropped).await.unwrap();
    let resumed = tokio::time::Instant::now();
    c.wait(Duration::from_secs(2)).await;
    assert_eq!(
        c.samples_in(resumed..),
        2 * RATE as usize - played,
        "the unplayed part of unit 1, once"
    );
    assert!(c.clears().is_empty(), "no barge-in");
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [Turn::User { duration_ms: 1_000 }, bot(REPLY, false)]
    );
}

/// A short sound that the detector ends as a turn (an "uh-huh") is no turn either: the reply
/// resumes, and the sound is neither answered nor kept.
#[tokio::test(start_paused = true)]
async fn a_turn_shorter_than_false_interruption_ms_resumes_the_reply() {
    let mut c = pausing_call(false);
    c.turn().await;
    c.first_audio().await;
    c.wait(Duration::from_millis(500)).await;
    c.interrupt().await;
    c.wait(Duration::from_millis(300)).await;
    c.turn_of(Duration::from_millis(250)).await;
    c.wait(Duration::from_secs(3)).await;
    assert_eq!(c.pauses().len(), 1);
    assert!(c.clears().is_empty());
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [Turn::User { duration_ms: 1_000 }, bot(REPLY, false)]
    );
}

/// Speech over the bot that proves a turn cuts the reply where it was paused, not where the
/// turn ended (by then all of it would have played), and the turn is answered. Marks the client
/// returns while the reply is paused (Twilio echoes those it drops on a clear) do not count as
/// heard.
#[tokio::test(start_paused = true)]
async fn speech_that_proves_a_turn_cuts_the_reply_where_it_was_paused() {
    let mut c = pausing_call(true);
    c.turn().await;
    c.first_audio().await;
    c.wait(Duration::from_millis(1_100)).await;
    let played = |unit, within| CallCommand::Played {
        reply: 0,
        unit,
        within,
    };
    c.commands.send(played(0, None)).await.unwrap();
    c.wait(Duration::from_millis(400)).await;
    c.interrupt().await;
    c.wait(Duration::from_millis(50)).await;
    // The echo of marks for audio the client dropped.
    c.commands.send(played(1, Some(12_000))).await.unwrap();
    c.commands.send(played(1, None)).await.unwrap();
    c.wait(Duration::from_millis(1_000)).await;
    c.turn_of(Duration::from_millis(900)).await;
    c.wait(Duration::from_secs(4)).await;
    assert_eq!(c.pauses(), [(0, "One two three.".to_string())]);
    assert_eq!(c.clears(), [(0, "One two three.".to_string())]);
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [
            Turn::User { duration_ms: 1_000 },
            bot("One two three.", true),
            Turn::User { duration_ms: 1_000 },
            bot(REPLY, false),
        ]
    );
}

/// "Wait," … "stop": a short sound, then more speech before the reply plays on. The reply stays
/// paused, and when the two together make a turn it is cut where it paused and the turn answered
/// is both of them.
#[tokio::test(start_paused = true)]
async fn short_sounds_that_add_up_to_a_turn_cut_the_reply_and_are_answered_together() {
    let mut c = pausing_call(false);
    c.turn().await;
    let first = c.first_audio().await;
    c.wait(Duration::from_millis(500)).await;
    c.interrupt().await;
    c.wait(Duration::from_millis(300)).await;
    c.turn_of(Duration::from_millis(300)).await;
    c.wait(Duration::from_millis(200)).await;
    c.interrupt().await;
    let resumed_not = tokio::time::Instant::now();
    c.wait(Duration::from_millis(400)).await;
    assert_eq!(
        c.samples_in(resumed_not..),
        0,
        "still paused while the speech goes on"
    );
    c.turn_of(Duration::from_millis(300)).await;
    c.wait(Duration::from_secs(4)).await;
    assert!(first < resumed_not);
    assert_eq!(c.pauses().len(), 1);
    assert_eq!(c.clears().len(), 1, "cut once");
    let h = c.history().await;
    assert_eq!(h.turns[2], Turn::User { duration_ms: 2_000 }, "{h:?}");
    assert_eq!(h.turns[3], bot(REPLY, false));
}

/// Speech over the paused reply that lasts `false_interruption_ms` (the VAD says so) cuts it
/// then, where it was paused, while the user still talks: the model and the voice are free
/// before the interrupting turn ends. A short sound before it is still answered with it.
#[tokio::test(start_paused = true)]
async fn speech_that_lasts_false_interruption_ms_cuts_the_reply_before_the_turn_ends() {
    let mut c = pausing_call(false);
    c.turn().await;
    c.first_audio().await;
    c.wait(Duration::from_millis(500)).await;
    c.interrupt().await;
    c.wait(Duration::from_millis(300)).await;
    c.turn_of(Duration::from_millis(300)).await;
    c.wait(Duration::from_millis(200)).await;
    c.interrupt().await;
    c.wait(Duration::from_millis(400)).await;
    assert!(c.clears().is_empty(), "paused, not yet cut");
    c.vad.send(VadEvent::Sustained).await.unwrap();
    c.wait(Duration::from_millis(50)).await;
    let pauses = c.pauses();
    assert_eq!(pauses.len(), 1);
    assert_eq!(
        c.clears(),
        pauses,
        "cut where it was paused, before the turn ended"
    );
    let h = c.history().await;
    assert_eq!(
        h.turns,
        [Turn::User { duration_ms: 1_000 }, bot(&pauses[0].1, true)]
    );
    let cut = tokio::time::Instant::now();
    c.wait(Duration::from_millis(1_000)).await;
    assert_eq!(c.samples_in(cut..), 0, "nothing of it after the cut");
    c.turn_of(Duration::from_millis(700)).await;
    c.wait(Duration::from_secs(4)).await;
    assert_eq!(c.clears().len(), 1, "cut once");
    let h = c.history().await;
    assert_eq!(h.turns[2], Turn::User { duration_ms: 2_000 }, "{h:?}");
    assert_eq!(h.turns[3], bot(REPLY, false));
}

/// A drain that runs out mid-reply: the reply is cut where playback stood, as a barge-in would
/// cut it, and the goodbye plays. While it does, the history keeps the heard part of the cut
/// reply and nothing of what was left unsaid.
#[tokio::test(start_paused = true)]
async fn a_drain_goodbye_keeps_only_what_was_heard_of_the_reply_it_cuts() {
    let mut c = call(0, None, false);
    c.turn().await;
    c.first_audio().await;
    // As in the barge-in above: unit 0 and one word of unit 1 have played.
    c.wait(Duration::from_millis(1_500)).await;
    c.commands
        .send(CallCommand::Goodbye("Goodbye for now.".into()))
        .await
        .unwrap();
    let cut = tokio::time::Instant::now();
    c.wait(Duration::from_millis(100)).await;
    assert_eq!(c.clears(), [(0, "One two three. Four".to_string())]);
    assert!(c.live_audio_after(cut) > 0, "the goodbye plays");
    let h = c.history().await;
    assert_eq!(h.turns.len(), 2, "{:?}", h.turns);
    assert_eq!(h.turns[1], bot("One two three. Four", true));
}
