//! The turn detector: a pure state machine from per-frame speech probabilities to turn events.
//! Start and end thresholds give hysteresis; `min_speech_ms` confirms a start, `min_silence_ms` of
//! quiet ends a turn, `speech_pad_ms` widens both edges, `max_turn_ms` cuts a monologue, and
//! `min_interruption_ms` of speech raises a barge-in. Timestamps are sample indices of the stream.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEvent {
    /// Speech confirmed; `start` is the first speech sample minus the pad.
    SpeechStart { start: u64 },
    /// Speech has lasted `min_interruption_ms` (raised once per stretch of speech).
    Interruption { start: u64 },
    /// The turn is over: samples `start..end` hold it, pads included. `forced` when cut by
    /// `max_turn_ms`.
    SpeechEnd { start: u64, end: u64, forced: bool },
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
    /// In a turn that started at `since` (unpadded); `quiet` is where the current silence began.
    Speaking {
        since: u64,
        quiet: Option<u64>,
        interrupted: bool,
    },
}

#[derive(Debug)]
pub struct TurnDetector {
    settings: TurnSettings,
    rate: u32,
    state: State,
}

impl TurnDetector {
    pub(crate) fn new(settings: TurnSettings, rate: u32) -> Self {
        TurnDetector {
            settings,
            rate,
            state: State::Idle,
        }
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
                match quiet {
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
