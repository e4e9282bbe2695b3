//! The turn detector: a pure state machine from per-frame speech probabilities to turn events.
//! Start and end thresholds give hysteresis; `min_speech_ms` confirms a start, `min_silence_ms` of
//! quiet ends a turn, `speech_pad_ms` widens both edges, `max_turn_ms` cuts a monologue, and
//! `min_interruption_ms` of speech raises a barge-in. With a pause length set
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
    /// Silence that ends a turn whatever the model said (smart).
    pub max_silence_ms: u32,
    /// The model's probability at or above which a turn ends at the pause (smart).
    pub complete_threshold: f32,
    /// Start the reply at each pause, and send it only once the turn ends (smart): a turn that
    /// ends at the pause gets its reply with no wait for the model, and one that goes on has
    /// its reply taken back unheard.
    pub preemptive: bool,
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
            pause_ms: 200,
            max_silence_ms: 1_500,
            complete_threshold: 0.5,
            preemptive: true,
        }
    }
}

impl TurnPolicy {
    pub(crate) fn smart(&self) -> bool {
        self.policy == PolicyKind::Smart
    }

    /// The detector settings this policy runs with: under `smart`, `max_silence_ms` ends turns.
    pub(crate) fn detector(&self, vad: TurnSettings, rate: u32) -> TurnDetector {
        if !self.smart() {
            return TurnDetector::new(vad, rate);
        }
        let vad = TurnSettings {
            min_silence_ms: self.max_silence_ms,
            ..vad
        };
        TurnDetector::new(vad, rate).with_pause(self.pause_ms)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.complete_threshold) {
            return Err("pipeline.turn.complete_threshold must lie in [0, 1]".into());
        }
        if self.smart() && !(32..=2_000).contains(&self.pause_ms) {
            return Err("pipeline.turn.pause_ms must be within 32..=2000".into());
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    /// Speech confirmed; `start` is the first speech sample minus the pad.
    SpeechStart { start: u64 },
    /// Speech has lasted `min_interruption_ms` (raised once per stretch of speech).
    Interruption { start: u64 },
    /// The turn is over: samples `start..end` hold it, pads included. `forced` when cut by
    /// `max_turn_ms`.
    SpeechEnd { start: u64, end: u64, forced: bool },
    /// The speaker has been quiet for the pause length: the turn so far is `start..end`, pads
    /// included, exactly what a [`TurnEvent::SpeechEnd`] at this silence would hold. Raised once
    /// per silence.
    Pause { start: u64, end: u64 },
    /// Speech again after a pause: the turn goes on.
    Resume,
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
    /// and `paused` says a pause was reported for it.
    Speaking {
        since: u64,
        quiet: Option<u64>,
        interrupted: bool,
        paused: bool,
    },
}

#[derive(Debug)]
pub struct TurnDetector {
    settings: TurnSettings,
    rate: u32,
    state: State,
    /// Silence that reports a pause, in samples; none without an end-of-turn model.
    pause: Option<u64>,
}

impl TurnDetector {
    pub(crate) fn new(settings: TurnSettings, rate: u32) -> Self {
        TurnDetector {
            settings,
            rate,
            state: State::Idle,
            pause: None,
        }
    }

    /// Reports a pause after `pause_ms` of silence (shorter than `min_silence_ms`, which still
    /// ends the turn whatever happens at the pause).
    pub(crate) fn with_pause(mut self, pause_ms: u32) -> Self {
        self.pause = Some(self.samples(pause_ms));
        self
    }

    /// Ends the turn at the pause in progress, as `min_silence_ms` of silence would have. None
    /// (and nothing changes) unless a pause was reported and no speech has come since.
    pub(crate) fn end_now(&mut self) -> Option<TurnEvent> {
        let State::Speaking {
            since,
            quiet: Some(q),
            paused: true,
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
        let s = self.settings;
        let pad = self.samples(s.speech_pad_ms);
        let speech = p >= s.start_threshold;
        let silence = p < s.end_threshold;
        let interrupt_after = self.samples(s.min_interruption_ms);
        let min_silence = self.samples(s.min_silence_ms);
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
                if paused && quiet.is_none() {
                    paused = false;
                    out.push(TurnEvent::Resume);
                }
                match quiet {
                    Some(q)
                        if !paused
                            && end - q < min_silence
                            && self.pause.is_some_and(|p| end - q >= p) =>
                    {
                        paused = true;
                        out.push(TurnEvent::Pause {
                            start: padded,
                            end: q + pad,
                        });
                        State::Speaking {
                            since,
                            quiet,
                            interrupted,
                            paused,
                        }
                    }
                    Some(q) if end - q >= min_silence => {
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
                paused: false,
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
mod tests {
    use super::*;

    /// 100 frames per second at 1 kHz make the arithmetic readable: frame k is samples
    /// [10k, 10k+10), 10 ms each.
    fn run(settings: TurnSettings, probs: &[f32]) -> Vec<(usize, TurnEvent)> {
        let mut det = TurnDetector::new(settings, 1_000);
        let mut events = Vec::new();
        for (k, &p) in probs.iter().enumerate() {
            let mut out = Vec::new();
            det.push(10 * k as u64, 10 * (k as u64 + 1), p, &mut out);
            events.extend(out.into_iter().map(|e| (k, e)));
        }
        events
    }

    fn settings() -> TurnSettings {
        TurnSettings {
            start_threshold: 0.5,
            end_threshold: 0.3,
            min_speech_ms: 50,
            min_silence_ms: 100,
            speech_pad_ms: 20,
            max_turn_ms: 1_000,
            min_interruption_ms: 30,
        }
    }

    fn seq(parts: &[(f32, usize)]) -> Vec<f32> {
        parts
            .iter()
            .flat_map(|&(p, n)| std::iter::repeat_n(p, n))
            .collect()
    }

    #[test]
    fn table() {
        use TurnEvent::*;
        type Case = (&'static str, Vec<f32>, Vec<(usize, TurnEvent)>);
        let cases: Vec<Case> = vec![
            ("silence only", seq(&[(0.0, 50)]), vec![]),
            (
                "one clean turn",
                seq(&[(0.0, 10), (0.9, 30), (0.0, 20)]),
                vec![
                    (12, Interruption { start: 80 }),
                    (14, SpeechStart { start: 80 }),
                    (
                        49,
                        SpeechEnd {
                            start: 80,
                            end: 420,
                            forced: false,
                        },
                    ),
                ],
            ),
            (
                "a blip shorter than min_speech is ignored",
                seq(&[(0.9, 4), (0.0, 30)]),
                vec![(2, Interruption { start: 0 })],
            ),
            (
                "hysteresis: mid probabilities neither end nor restart a turn",
                seq(&[(0.9, 10), (0.4, 30), (0.1, 10)]),
                vec![
                    (2, Interruption { start: 0 }),
                    (4, SpeechStart { start: 0 }),
                    (
                        49,
                        SpeechEnd {
                            start: 0,
                            end: 420,
                            forced: false,
                        },
                    ),
                ],
            ),
            (
                "a short pause does not end the turn",
                seq(&[(0.9, 10), (0.0, 5), (0.9, 10), (0.0, 10)]),
                vec![
                    (2, Interruption { start: 0 }),
                    (4, SpeechStart { start: 0 }),
                    (
                        34,
                        SpeechEnd {
                            start: 0,
                            end: 270,
                            forced: false,
                        },
                    ),
                ],
            ),
            (
                "max turn length cuts and restarts",
                seq(&[(0.9, 110)]),
                vec![
                    (2, Interruption { start: 0 }),
                    (4, SpeechStart { start: 0 }),
                    (
                        99,
                        SpeechEnd {
                            start: 0,
                            end: 1000,
                            forced: true,
                        },
                    ),
                    (104, SpeechStart { start: 980 }),
                ],
            ),
        ];
        for (name, probs, want) in cases {
            assert_eq!(run(settings(), &probs), want, "{name}");
        }
    }

    #[test]
    fn pending_speech_survives_short_dips_but_not_long_silence() {
        use TurnEvent::*;
        let s = settings();
        // A soft onset with a dip: the turn starts at the first speech frame.
        let events = run(
            s,
            &seq(&[(0.0, 5), (0.9, 2), (0.0, 3), (0.9, 10), (0.0, 20)]),
        );
        assert!(
            events.contains(&(12, SpeechStart { start: 30 })),
            "{events:?}"
        );
        // A blip, then silence longer than min_silence: the candidate is dropped.
        let events = run(s, &seq(&[(0.9, 3), (0.0, 12), (0.9, 3), (0.0, 20)]));
        assert!(
            events.iter().all(|(_, e)| !matches!(e, SpeechStart { .. })),
            "{events:?}"
        );
    }

    /// Pauses at 40 ms of silence, ends at 100 ms: a pause, a resume when speech comes back, a
    /// second pause, and `end_now` ending the turn where a full silence would have.
    #[test]
    fn pauses_resume_and_end_now() {
        use TurnEvent::*;
        let mut det = TurnDetector::new(settings(), 1_000).with_pause(40);
        let probs = seq(&[(0.9, 10), (0.0, 6), (0.9, 10), (0.0, 5)]);
        let mut events = Vec::new();
        for (k, &p) in probs.iter().enumerate() {
            let mut out = Vec::new();
            det.push(10 * k as u64, 10 * (k as u64 + 1), p, &mut out);
            events.extend(out.into_iter().map(|e| (k, e)));
        }
        assert_eq!(
            events,
            vec![
                (2, Interruption { start: 0 }),
                (4, SpeechStart { start: 0 }),
                (13, Pause { start: 0, end: 120 }),
                (16, Resume),
                (29, Pause { start: 0, end: 280 }),
            ]
        );
        assert_eq!(
            det.end_now(),
            Some(SpeechEnd {
                start: 0,
                end: 280,
                forced: false
            }),
            "the same turn a full silence would have ended"
        );
        assert_eq!(det.end_now(), None, "idle now");
        // Without a pause reported, end_now does nothing; silence still ends the turn.
        let mut det = TurnDetector::new(settings(), 1_000).with_pause(40);
        let mut out = Vec::new();
        for k in 0..12u64 {
            det.push(10 * k, 10 * (k + 1), 0.9, &mut out);
        }
        assert_eq!(det.end_now(), None);
        for k in 12..30u64 {
            det.push(10 * k, 10 * (k + 1), 0.0, &mut out);
        }
        assert_eq!(
            out.last(),
            Some(&SpeechEnd {
                start: 0,
                end: 140,
                forced: false
            })
        );
        assert_eq!(out.iter().filter(|e| matches!(e, Pause { .. })).count(), 1);
    }

    #[test]
    fn validate_rejects_inverted_thresholds() {
        let s = TurnSettings {
            end_threshold: 0.8,
            ..TurnSettings::default()
        };
        assert!(s.validate().is_err());
        assert!(TurnSettings::default().validate().is_ok());
    }
}
