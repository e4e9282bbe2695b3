//! The turn detector: a pure state machine from per-frame speech probabilities to turn events.
//! Start and end thresholds give hysteresis; `min_speech_ms` confirms a start, `min_silence_ms` of
//! quiet ends a turn, `speech_pad_ms` widens both edges, `max_turn_ms` cuts a monologue, and
//! `min_interruption_ms` of speech raises a barge-in, and with [`TurnDetector::with_sustained`]
//! speech that lasts `false_interruption_ms` says it can no longer be a false one. With a pause length set
//! ([`TurnDetector::with_pause`]), a shorter silence reports a pause (where a turn may have ended)
//! and speech after it a resume; [`TurnDetector::end_now`] ends a paused turn on the end-of-turn
//! model's word. Timestamps are sample indices of the stream.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnSettings {
    /// Probability at or above which a frame counts as speech.
    pub start_threshold: f32,
    /// Probability below which a frame counts as silence; between the two, the state holds.
    pub end_threshold: f32,
    /// Speech must last this long before a turn starts.
    pub min_speech_ms: u32,
    /// Silence must last this long before a turn ends.
    pub min_silence_ms: u32,
    /// Added before the start and after the end of each turn.
    pub speech_pad_ms: u32,
    /// A turn longer than this is ended where it stands.
    pub max_turn_ms: u32,
    /// Speech this long while the bot talks is a barge-in.
    pub min_interruption_ms: u32,
}

impl Default for TurnSettings {
    fn default() -> Self {
        TurnSettings {
            start_threshold: 0.5,
            end_threshold: 0.35,
            min_speech_ms: 200,
            min_silence_ms: 500,
            speech_pad_ms: 30,
            max_turn_ms: 30_000,
            min_interruption_ms: 120,
        }
    }
}

impl TurnSettings {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let in_unit = |x: f32| (0.0..=1.0).contains(&x);
        if !in_unit(self.start_threshold) || !in_unit(self.end_threshold) {
            return Err("VAD thresholds must lie in [0, 1]".into());
        }
        if self.end_threshold > self.start_threshold {
            return Err(format!(
                "end_threshold ({}) must not exceed start_threshold ({})",
                self.end_threshold, self.start_threshold
            ));
        }
        if self.max_turn_ms <= self.min_speech_ms {
            return Err("max_turn_ms must exceed min_speech_ms".into());
        }
        Ok(())
    }
}

/// How a turn ends: `[pipeline.turn]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnPolicy {
    /// `smart`: at a short pause, ask the end-of-turn model; `silence`: a fixed silence
    /// (`[pipeline.vad] min_silence_ms`) ends every turn.
    pub policy: PolicyKind,
    /// Silence before the end-of-turn model is asked (smart).
    pub pause_ms: u32,
    /// A longer silence at which it is asked again if it first judged the turn likely but not
    /// surely complete (smart); 0: never. A finished turn's probability rises as its trailing
    /// silence grows, but so does an unfinished one's: off by default, since on the bench it
    /// cut off more speakers than it sped up (README, "Turn-taking").
    pub recheck_ms: u32,
    /// Silence that ends a turn whatever the model said (smart).
    pub max_silence_ms: u32,
    /// A verdict not back this long after the model was asked is given up (smart): the worker
    /// is behind, so the turn ends at `[pipeline.vad] min_silence_ms` of silence, as under the
    /// `silence` policy, instead of waiting for `max_silence_ms`; the request is withdrawn
    /// (`gazelle_end_of_turn_decisions_total{decision="fallback"}`). 0: wait for every verdict.
    pub verdict_timeout_ms: u32,
    /// The model's probability at or above which a turn may end early (smart): after
    /// `likely_silence_ms` of silence, or at once from `confident_threshold` up.
    pub complete_threshold: f32,
    /// The probability from which a turn ends at the pause itself (smart).
    pub confident_threshold: f32,
    /// Silence that ends a turn the model judged likely but not surely complete (smart).
    pub likely_silence_ms: u32,
    /// Start the reply at each pause, and send it only once the turn ends (smart): a turn that
    /// ends at the pause gets its reply with no wait for the model, and one that goes on has
    /// its reply taken back unheard.
    pub preemptive: bool,
    /// Speech over the bot shorter than this (a cough, an "uh-huh", a bump) only pauses the
    /// reply: once it is over and shorter, the reply resumes where it stopped; longer, it is a
    /// barge-in. 0: every interruption cuts the reply at once. Either policy.
    pub false_interruption_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Smart,
    Silence,
}

impl Default for TurnPolicy {
    fn default() -> Self {
        TurnPolicy {
            policy: PolicyKind::Smart,
            pause_ms: 64,
            recheck_ms: 0,
            max_silence_ms: 1_500,
            verdict_timeout_ms: 250,
            complete_threshold: 0.5,
            confident_threshold: 0.9,
            likely_silence_ms: 1_100,
            preemptive: true,
            false_interruption_ms: 500,
        }
    }
}

impl TurnPolicy {
    pub(crate) fn smart(&self) -> bool {
        self.policy == PolicyKind::Smart
    }

    /// The detector settings this policy runs with: under `smart`, `max_silence_ms` ends turns.
    /// Either way it says when speech has lasted `false_interruption_ms`.
    pub(crate) fn detector(&self, vad: TurnSettings, rate: u32) -> TurnDetector {
        if !self.smart() {
            return TurnDetector::new(vad, rate).with_sustained(self.false_interruption_ms);
        }
        let vad = TurnSettings {
            min_silence_ms: self.max_silence_ms,
            ..vad
        };
        let pauses = [self.pause_ms, self.recheck_ms];
        let pauses = if self.recheck_ms == 0 {
            &pauses[..1]
        } else {
            &pauses[..]
        };
        TurnDetector::new(vad, rate)
            .with_pauses(pauses)
            .with_sustained(self.false_interruption_ms)
    }

    /// What the end-of-turn model's probability `p` at a pause means for the turn.
    pub(crate) fn decide(&self, p: f32) -> Decision {
        if p >= self.confident_threshold {
            Decision::Complete
        } else if p >= self.complete_threshold {
            Decision::Likely
        } else {
            Decision::Incomplete
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let unit = |x: f32| (0.0..=1.0).contains(&x);
        if !unit(self.complete_threshold) || !unit(self.confident_threshold) {
            return Err("pipeline.turn thresholds must lie in [0, 1]".into());
        }
        if self.confident_threshold < self.complete_threshold {
            return Err(
                "pipeline.turn.confident_threshold must not be below complete_threshold".into(),
            );
        }
        if self.smart()
            && !((self.recheck_ms == 0 || self.pause_ms < self.recheck_ms)
                && self.recheck_ms < self.likely_silence_ms
                && self.pause_ms < self.likely_silence_ms
                && self.likely_silence_ms <= self.max_silence_ms)
        {
            return Err(
                "pipeline.turn needs pause_ms < likely_silence_ms <= max_silence_ms, and \
                 pause_ms < recheck_ms < likely_silence_ms unless recheck_ms is 0"
                    .into(),
            );
        }
        if self.smart() && !(32..=2_000).contains(&self.pause_ms) {
            return Err("pipeline.turn.pause_ms must be within 32..=2000".into());
        }
        if self.smart() && self.verdict_timeout_ms >= self.max_silence_ms {
            return Err(format!(
                "pipeline.turn.verdict_timeout_ms ({}) must be below max_silence_ms ({}), or 0",
                self.verdict_timeout_ms, self.max_silence_ms
            ));
        }
        if self.smart() && self.max_silence_ms <= self.pause_ms {
            return Err(format!(
                "pipeline.turn.max_silence_ms ({}) must exceed pause_ms ({})",
                self.max_silence_ms, self.pause_ms
            ));
        }
        Ok(())
    }
}

/// The end-of-turn model's verdict on a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The turn ends at the pause.
    Complete,
    /// The turn ends after `likely_silence_ms`.
    Likely,
    /// The turn ends after `max_silence_ms` (or goes on).
    Incomplete,
}

impl Decision {
    /// The `decision` label of `gazelle_end_of_turn_decisions_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Decision::Complete => "complete",
            Decision::Likely => "likely",
            Decision::Incomplete => "incomplete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    /// Speech confirmed; `start` is the first speech sample minus the pad.
    SpeechStart { start: u64 },
    /// Speech has lasted `min_interruption_ms` (raised once per stretch of speech).
    Interruption { start: u64 },
    /// The turn's speech, from its first to its latest speech sample, has lasted the length
    /// given to [`TurnDetector::with_sustained`] (`false_interruption_ms`): over the bot it is a
    /// barge-in now, whatever follows. Raised once per turn, after its `SpeechStart`.
    Sustained,
    /// The turn is over: samples `start..end` hold it, pads included. `forced` when cut by
    /// `max_turn_ms`.
    SpeechEnd { start: u64, end: u64, forced: bool },
    /// The speaker has been quiet for the pause length: the turn so far is `start..end`, pads
    /// included, exactly what a [`TurnEvent::SpeechEnd`] at this silence would hold. Raised once
    /// per silence.
    Pause { start: u64, end: u64 },
    /// Speech again after a pause: the turn goes on.
    Resume,
    /// Speech that had raised an [`TurnEvent::Interruption`] died away before it lasted
    /// `min_speech_ms`: no turn came of it.
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Idle,
    /// Speech seen since `since`, not yet confirmed: `voiced` samples of it were not silence,
    /// and `quiet` is where the current silence began. Dips shorter than `min_silence_ms` keep
    /// the candidate (so a soft onset is not lost, as in Silero's reference segmentation).
    Pending {
        since: u64,
        voiced: u64,
        quiet: Option<u64>,
        interrupted: bool,
    },
    /// In a turn that started at `since` (unpadded); `quiet` is where the current silence began,
    /// and `paused` counts the pause lengths reported for it.
    Speaking {
        since: u64,
        quiet: Option<u64>,
        interrupted: bool,
        sustained: bool,
        paused: u8,
    },
}

#[derive(Debug)]
pub struct TurnDetector {
    settings: TurnSettings,
    rate: u32,
    state: State,
    /// Silences that report a pause, shortest first, in samples; none without an end-of-turn
    /// model.
    pauses: Vec<u64>,
    /// A shorter silence that ends the paused turn ([`TurnDetector::end_after`]), in samples.
    silence_cap: Option<u64>,
    /// Speech this long raises [`TurnEvent::Sustained`], in samples.
    sustained_after: Option<u64>,
}

impl TurnDetector {
    pub(crate) fn new(settings: TurnSettings, rate: u32) -> Self {
        TurnDetector {
            settings,
            rate,
            state: State::Idle,
            pauses: Vec::new(),
            silence_cap: None,
            sustained_after: None,
        }
    }

    /// Raises [`TurnEvent::Sustained`] once a turn's speech has lasted `ms` (0: never).
    pub(crate) fn with_sustained(mut self, ms: u32) -> Self {
        self.sustained_after = (ms > 0).then(|| self.samples(ms));
        self
    }

    /// Reports a pause after each of `pauses_ms` of silence (shorter than `min_silence_ms`,
    /// which still ends the turn whatever happens at a pause).
    pub(crate) fn with_pauses(mut self, pauses_ms: &[u32]) -> Self {
        self.pauses = pauses_ms.iter().map(|&ms| self.samples(ms)).collect();
        self.pauses.sort_unstable();
        self
    }

    fn is_paused(&self) -> bool {
        matches!(self.state, State::Speaking { paused, .. } if paused > 0)
    }

    /// Lets the pause in progress end the turn after `silence_ms` of silence in all, sooner
    /// than `min_silence_ms`. Forgotten if speech resumes.
    pub(crate) fn end_after(&mut self, silence_ms: u32) {
        if self.is_paused() {
            self.silence_cap = Some(self.samples(silence_ms));
        }
    }

    /// Ends the turn at the pause in progress, as `min_silence_ms` of silence would have. None
    /// (and nothing changes) unless a pause was reported and no speech has come since.
    pub(crate) fn end_now(&mut self) -> Option<TurnEvent> {
        let State::Speaking {
            since,
            quiet: Some(q),
            paused: 1..,
            ..
        } = self.state
        else {
            return None;
        };
        let pad = self.samples(self.settings.speech_pad_ms);
        self.state = State::Idle;
        Some(TurnEvent::SpeechEnd {
            start: since.saturating_sub(pad),
            end: q + pad,
            forced: false,
        })
    }

    fn samples(&self, ms: u32) -> u64 {
        ms as u64 * self.rate as u64 / 1000
    }

    pub(crate) fn in_speech(&self) -> bool {
        matches!(self.state, State::Speaking { .. })
    }

    /// Feeds one frame that covers samples `start..end` with speech probability `p`.
    pub(crate) fn push(&mut self, start: u64, end: u64, p: f32, out: &mut Vec<TurnEvent>) {
        self.step(start, end, p, out);
        // A shortened silence holds only for the pause it was given at.
        if !self.is_paused() {
            self.silence_cap = None;
        }
    }

    fn step(&mut self, start: u64, end: u64, p: f32, out: &mut Vec<TurnEvent>) {
        let s = self.settings;
        let pad = self.samples(s.speech_pad_ms);
        let speech = p >= s.start_threshold;
        let silence = p < s.end_threshold;
        let interrupt_after = self.samples(s.min_interruption_ms);
        let min_silence = self.samples(s.min_silence_ms);
        let end_silence = self.silence_cap.map_or(min_silence, |c| c.min(min_silence));
        self.state = match self.state {
            State::Idle if speech => {
                let state = State::Pending {
                    since: start,
                    voiced: 0,
                    quiet: None,
                    interrupted: false,
                };
                self.advance_pending(state, start, end, p, interrupt_after, pad, out)
            }
            State::Idle => State::Idle,
            state @ State::Pending { .. } => {
                self.advance_pending(state, start, end, p, interrupt_after, pad, out)
            }
            State::Speaking {
                since,
                quiet,
                mut interrupted,
                mut sustained,
                mut paused,
            } => {
                let padded = since.saturating_sub(pad);
                if !interrupted && end - since >= interrupt_after {
                    interrupted = true;
                    out.push(TurnEvent::Interruption { start: padded });
                }
                let quiet = if silence {
                    Some(quiet.unwrap_or(start))
                } else if speech {
                    None
                } else {
                    quiet
                };
                if paused > 0 && quiet.is_none() {
                    paused = 0;
                    out.push(TurnEvent::Resume);
                }
                // Speech so far runs to the latest frame that was not silence.
                let spoken = quiet.unwrap_or(end) - since;
                if !sustained && self.sustained_after.is_some_and(|n| spoken >= n) {
                    sustained = true;
                    out.push(TurnEvent::Sustained);
                }
                match quiet {
                    Some(q)
                        if end - q < min_silence
                            && end - q < end_silence
                            && self
                                .pauses
                                .get(paused as usize)
                                .is_some_and(|&p| end - q >= p) =>
                    {
                        paused += 1;
                        out.push(TurnEvent::Pause {
                            start: padded,
                            end: q + pad,
                        });
                        State::Speaking {
                            since,
                            quiet,
                            interrupted,
                            sustained,
                            paused,
                        }
                    }
                    Some(q) if end - q >= end_silence => {
                        out.push(TurnEvent::SpeechEnd {
                            start: padded,
                            end: q + pad,
                            forced: false,
                        });
                        State::Idle
                    }
                    _ if end - since >= self.samples(s.max_turn_ms) => {
                        out.push(TurnEvent::SpeechEnd {
                            start: padded,
                            end,
                            forced: true,
                        });
                        if speech {
                            State::Pending {
                                since: end,
                                voiced: 0,
                                quiet: None,
                                interrupted: true,
                            }
                        } else {
                            State::Idle
                        }
                    }
                    _ => State::Speaking {
                        since,
                        quiet,
                        interrupted,
                        sustained,
                        paused,
                    },
                }
            }
        };
    }

    #[allow(clippy::too_many_arguments)]
    fn advance_pending(
        &self,
        state: State,
        start: u64,
        end: u64,
        p: f32,
        interrupt_after: u64,
        pad: u64,
        out: &mut Vec<TurnEvent>,
    ) -> State {
        let State::Pending {
            since,
            mut voiced,
            mut quiet,
            mut interrupted,
        } = state
        else {
            return state;
        };
        let s = self.settings;
        if p < s.end_threshold {
            let q = *quiet.get_or_insert(start);
            if end - q >= self.samples(s.min_silence_ms) {
                if interrupted {
                    out.push(TurnEvent::Dropped);
                }
                return State::Idle;
            }
            return State::Pending {
                since,
                voiced,
                quiet,
                interrupted,
            };
        }
        if p >= s.start_threshold {
            quiet = None;
        }
        voiced += end - start;
        let padded = since.saturating_sub(pad);
        if !interrupted && voiced >= interrupt_after {
            interrupted = true;
            out.push(TurnEvent::Interruption { start: padded });
        }
        if voiced >= self.samples(s.min_speech_ms) {
            out.push(TurnEvent::SpeechStart { start: padded });
            State::Speaking {
                since,
                quiet,
                interrupted,
                sustained: false,
                paused: 0,
            }
        } else {
            State::Pending {
                since,
                voiced,
                quiet,
                interrupted,
            }
        }
    }
}

#[cfg(test)]
#[path = "turn_tests.rs"]
mod tests;
