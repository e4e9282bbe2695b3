//! The call actor alone, on tokio's paused clock: the scripted model, a fake voice that speaks
//! each unit as one second of audio at once, and turn events made up by the test instead of a
//! VAD. Covers the first message, barge-in during generation and during playback, the history by
//! acknowledgement and by the playout estimate, and a reply played out in full.

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

fn call(token_delay_ms: u64, first_message: Option<&str>, playback_acks: bool) -> Call {
    let model = ScriptedModel::new(REPLY, Duration::from_millis(token_delay_ms));
    let cfg = ActorConfig {
        settings: Arc::new(PipelineSettings::default()),
        limits: Arc::new(Limits::default()),
        metrics: Arc::new(Metrics::new()),
        output_rate: RATE,
        playback_acks,
        subscribe_transcript: true,
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
        let now = tokio::time::Instant::now().into_std();
        let ev = VadEvent::SpeechEnd {
            audio: Arc::from(vec![0.0f32; RATE as usize]),
            true_end: now,
            detected: now,
            forced: false,
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
                Outbound::Clear { reply, spoken } => Some((*reply, spoken.clone())),
                _ => None,
            })
            .collect()
    }

    /// Audio frames of a reply that was not cancelled, sent after `t`.
    fn live_audio_after(&self, t: tokio::time::Instant) -> usize {
        self.seen
            .iter()
            .filter(|(at, m)| {
                *at > t && matches!(m, Outbound::Audio { reply, .. } if !reply.is_cancelled())
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
