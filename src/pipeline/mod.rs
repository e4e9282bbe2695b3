//! The call pipeline: one actor per call ([`call`]) that owns the conversation, fed by the
//! listening stages ([`listen`]: resample → VAD) and driving one reply at a time through the
//! speaking stages (model → [`sentence`] accumulator → synthesizer → [`pacer`]). Stages are tokio
//! tasks joined by bounded channels; a reply's tasks share one cancellation token, a child of the
//! call's, so a barge-in stops exactly that reply.

pub(crate) mod call;
pub(crate) mod conversation;
pub(crate) mod limits;
pub(crate) mod listen;
pub(crate) mod pacer;
pub(crate) mod registry;
pub mod sentence;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::TurnStage;
use crate::vad::{TurnPolicy, TurnSettings};

/// What a call sends towards its transport. The transport encodes it for its wire protocol.
#[derive(Debug, Clone)]
pub(crate) enum Outbound {
    /// One frame of bot audio at the caller's output rate. `reply` is the reply's token: a frame
    /// whose reply was cancelled while it waited in the queue is dropped, never sent. `due` is
    /// when the caller's playback reaches this frame, when it continues audio already queued
    /// there (`None` for a frame that starts playback); a transport that delivers it later
    /// reports the gap with [`crate::metrics::Metrics::frame_delivered`].
    Audio {
        samples: Vec<f32>,
        playable: Playable,
        due: Option<std::time::Instant>,
    },
    /// Audio of unit `unit` of reply `reply` has been handed over up to here: all of it when
    /// `within` is `None` (after the unit's last `Audio`), else its first `within` samples (sent
    /// every ~250 ms of audio). Transports that can learn when playback reaches a point (Twilio
    /// marks) place one there and report it back with `CallHandle::played`.
    UnitSent {
        reply: u64,
        unit: usize,
        within: Option<u64>,
        playable: Playable,
    },
    /// A unit of bot text of reply `reply` as it goes to the synthesizer.
    Transcript { reply: u64, text: String },
    /// Barge-in: the client must stop playback at once. `spoken` is what the user heard. When
    /// `paused`, the reply is only held (the user made a sound over it): its audio may follow,
    /// from where it stopped, if the sound proves no turn; if not, a final `Clear` follows.
    Clear {
        reply: u64,
        spoken: String,
        paused: bool,
    },
    /// The latency timeline of a reply, once its first audio is out.
    Timeline(Timeline),
    /// A recoverable problem with the caller's input; the call goes on.
    Error {
        kind: crate::metrics::ErrorKind,
        message: String,
    },
}

/// Whether a frame or mark of a reply may still go to the client. It may not once its stretch of
/// playback was taken back (the reply was cut, or held and rewound) or while the reply is held:
/// the call holds the gate before it queues the pause's `Clear`, so a frame the pacer queued just
/// after that `Clear`, before it saw the hold, is dropped rather than played over the caller.
#[derive(Debug, Clone)]
pub(crate) struct Playable {
    pub(crate) segment: CancellationToken,
    pub(crate) gate: pacer::Gate,
}

impl Playable {
    pub(crate) fn is_stale(&self) -> bool {
        self.segment.is_cancelled() || self.gate.borrow().is_some()
    }
}

/// Per-reply stage times in milliseconds after the true end of the user's speech.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Timeline {
    pub reply: u64,
    /// Length of the user's turn audio.
    pub user_audio_ms: f64,
    pub vad_end_ms: Option<f64>,
    pub first_token_ms: Option<f64>,
    pub first_unit_ms: Option<f64>,
    pub first_synth_byte_ms: Option<f64>,
    pub first_audio_sent_ms: Option<f64>,
    /// When the pause the turn ended at was noticed (smart policy).
    pub pause_ms: Option<f64>,
    /// The end-of-turn model's probability that the turn was complete, at that pause.
    pub end_of_turn_probability: Option<f32>,
    /// When the reply was started preemptively, at the pause, and when it was committed (the
    /// turn was over; its audio could go out).
    pub preemptive_start_ms: Option<f64>,
    pub commit_ms: Option<f64>,
}

impl Timeline {
    /// Each latency stage and when the reply reached it, in the order replies reach them. A
    /// stage's one name is its metric label (`gazelle_turn_stage_seconds`), its span's name, and
    /// with `_ms` this struct's field (`gazelle_timeline` on the wire).
    pub(crate) fn stages(&self) -> [(TurnStage, Option<f64>); 5] {
        [
            (TurnStage::VadEnd, self.vad_end_ms),
            (TurnStage::FirstToken, self.first_token_ms),
            (TurnStage::FirstUnit, self.first_unit_ms),
            (TurnStage::FirstSynthByte, self.first_synth_byte_ms),
            (TurnStage::FirstAudioSent, self.first_audio_sent_ms),
        ]
    }

    pub(crate) fn offset(from: Instant, to: Instant) -> f64 {
        to.saturating_duration_since(from).as_secs_f64() * 1000.0
    }
}

/// Knobs of the pipeline that apply to every call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    pub vad: TurnSettings,
    /// How a turn ends (`[pipeline.turn]`).
    pub turn: TurnPolicy,
    /// How far ahead of real time audio may be sent; bounds how long a barge-in takes to silence
    /// the client.
    pub output_lead_ms: u32,
    /// Length of each audio message to the caller.
    pub output_frame_ms: u32,
    /// Words before the first clause of a reply may go to TTS on its own (0: whole sentences).
    pub first_clause_words: usize,
    /// Longest text unit sent to TTS.
    pub max_unit_chars: usize,
    /// Used when the client sends none.
    pub system_prompt: Option<String>,
    /// Spoken at call start when the client sends none.
    pub first_message: Option<String>,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            vad: TurnSettings::default(),
            turn: TurnPolicy::default(),
            output_lead_ms: 300,
            output_frame_ms: 20,
            first_clause_words: 4,
            max_unit_chars: 240,
            system_prompt: None,
            first_message: None,
        }
    }
}

impl PipelineSettings {
    pub(crate) fn lead(&self) -> Duration {
        Duration::from_millis(self.output_lead_ms as u64)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.vad.validate()?;
        self.turn.validate()?;
        if !(5..=200).contains(&self.output_frame_ms) {
            return Err("output_frame_ms must be within 5..=200".into());
        }
        if self.output_lead_ms < self.output_frame_ms {
            return Err("output_lead_ms must be at least output_frame_ms".into());
        }
        if self.max_unit_chars < 20 {
            return Err("max_unit_chars must be at least 20".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage is in `Timeline::stages`, once, in its order, and its field on the wire is
    /// its label with `_ms`.
    #[test]
    fn each_stage_has_one_name() {
        let t = Timeline {
            vad_end_ms: Some(1.0),
            first_token_ms: Some(2.0),
            first_unit_ms: Some(3.0),
            first_synth_byte_ms: Some(4.0),
            first_audio_sent_ms: Some(5.0),
            ..Default::default()
        };
        let stages: Vec<TurnStage> = t.stages().iter().map(|(s, _)| *s).collect();
        assert_eq!(stages, TurnStage::ALL);
        let wire = serde_json::to_value(&t).unwrap();
        for (stage, ms) in t.stages() {
            let field = format!("{}_ms", stage.as_str());
            assert_eq!(wire[&field].as_f64(), ms, "{field}");
        }
    }
}
