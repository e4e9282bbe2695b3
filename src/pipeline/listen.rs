//! The listening stages of a call: `ingest` converts the caller's audio to 16 kHz, and `detect`
//! runs it through the shared VAD worker and the turn detector, keeps the audio of the turn in
//! progress, and reports turn events with the wall-clock time of the true end of speech. Under
//! the smart turn policy it reports each pause with the turn so far, asks the shared end-of-turn
//! model about it, and ends the turn there when the model says it is complete.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audio::{resample::StreamResampler, MODEL_RATE};
use crate::metrics::{ErrorKind, Metrics};
use crate::vad::silero::frame_len;
use crate::vad::smart_turn::SmartTurnHandle;
use crate::vad::turn::Decision;
use crate::vad::{SileroState, TurnEvent, TurnPolicy, TurnSettings, VadError, VadHandle};

/// Caller audio on its way to the resampler, with its share of the call's input budget.
pub(crate) type AudioIn = (Vec<f32>, super::limits::BudgetPermit);

/// Audio at 16 kHz with the time its last sample arrived.
#[derive(Debug)]
pub(crate) struct HeardAudio {
    pub samples: Vec<f32>,
    pub arrived: Instant,
    /// The chunk's share of the call's input budget, returned (dropped) once the VAD has
    /// taken it.
    pub _budget: Option<super::limits::BudgetPermit>,
}

#[derive(Debug, Clone)]
pub(crate) enum VadEvent {
    SpeechStart,
    /// The user has talked over the bot for `min_interruption_ms`.
    Interruption,
    /// The turn's speech has lasted `false_interruption_ms`: over the bot, no false interruption.
    Sustained,
    /// The user has paused (smart policy): `audio` is the turn so far, exactly what a
    /// `SpeechEnd` at this pause would carry.
    Pause {
        audio: Arc<[f32]>,
        /// When the last sample of speech (before the pad) arrived.
        true_end: Instant,
        /// When the pause was noticed.
        detected: Instant,
    },
    /// Speech again after a pause: the turn goes on.
    Resume,
    /// The speech that raised the last `Interruption` died away without becoming a turn.
    Dropped,
    /// A finished user turn.
    SpeechEnd {
        audio: Arc<[f32]>,
        /// When the last sample of speech (before the pad) arrived.
        true_end: Instant,
        /// When the detector decided the turn was over.
        detected: Instant,
        forced: bool,
        /// How long the speaker spoke, from the first to the last sample of speech (pauses
        /// inside included, pads not).
        speech: Duration,
        /// The pause it ended at, if one was reported (smart policy).
        pause: Option<PauseSeen>,
    },
    /// The VAD failed; the call cannot hear any more.
    Failed(String),
}

/// What the smart policy saw of the pause a turn ended at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PauseSeen {
    /// When the pause was noticed.
    pub at: Instant,
    /// The end-of-turn model's probability that the turn was complete, if it answered.
    pub probability: Option<f32>,
}

/// How `detect` ends turns: the policy, and the end-of-turn model it asks at a pause.
#[derive(Clone)]
pub(crate) struct TurnTaking {
    pub vad: TurnSettings,
    pub policy: TurnPolicy,
    pub model: Option<SmartTurnHandle>,
}

/// What the end-of-turn model has been asked about the silence in progress.
#[derive(Debug, Default)]
struct Asking {
    /// The pauses of this silence it was asked about.
    asked: usize,
    /// Whether it last judged the turn likely (not surely) complete: only then is it asked again
    /// at the longer pause.
    likely: bool,
}

impl Asking {
    /// Whether to ask about the pause just heard.
    fn ask(&mut self) -> bool {
        let ask = self.asked == 0 || self.likely;
        self.asked += ask as usize;
        ask
    }

    /// Speech resumed or the turn ended, by silence or by the model's verdict: the next pause
    /// belongs to a new silence.
    fn observe(&mut self, ev: &TurnEvent) {
        if matches!(ev, TurnEvent::Resume | TurnEvent::SpeechEnd { .. }) {
            *self = Asking::default();
        }
    }
}

type Judgement = Pin<Box<dyn Future<Output = Result<f32, VadError>> + Send>>;

/// Resamples the caller's audio to 16 kHz. Ends when the input closes or the call ends.
pub(crate) async fn ingest(
    mut resampler: StreamResampler,
    mut input: mpsc::Receiver<AudioIn>,
    output: mpsc::Sender<HeardAudio>,
    cancel: CancellationToken,
) {
    loop {
        let (chunk, budget) = tokio::select! {
            _ = cancel.cancelled() => return,
            c = input.recv() => match c { Some(c) => c, None => return },
        };
        let arrived = Instant::now();
        let samples = match resampler.push(&chunk) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "resampling the caller's audio failed");
                return;
            }
        };
        if samples.is_empty() {
            continue;
        }
        let heard = HeardAudio {
            samples,
            arrived,
            _budget: Some(budget),
        };
        if output.send(heard).await.is_err() {
            return;
        }
    }
}

/// The detector's memory of recent audio: enough to cut out the current turn.
struct AudioWindow {
    /// Absolute index of `samples[0]`.
    start: u64,
    samples: VecDeque<f32>,
    /// (absolute index one past the chunk, arrival time) for recent chunks.
    clock: VecDeque<(u64, Instant)>,
}

impl AudioWindow {
    fn end(&self) -> u64 {
        self.start + self.samples.len() as u64
    }

    fn push(&mut self, h: &HeardAudio) {
        self.samples.extend(&h.samples);
        self.clock.push_back((self.end(), h.arrived));
    }

    /// Forgets audio before `keep_from`.
    fn trim(&mut self, keep_from: u64) {
        let drop = keep_from
            .saturating_sub(self.start)
            .min(self.samples.len() as u64);
        self.samples.drain(..drop as usize);
        self.start += drop;
        while self.clock.len() > 1 && self.clock[1].0 <= self.start {
            self.clock.pop_front();
        }
    }

    fn slice(&self, from: u64, to: u64) -> Vec<f32> {
        let a = from.saturating_sub(self.start) as usize;
        let b = (to.saturating_sub(self.start) as usize).min(self.samples.len());
        self.samples.range(a.min(b)..b).copied().collect()
    }

    /// When sample `index` arrived, assuming the caller streams in real time within a chunk.
    fn arrival(&self, index: u64) -> Instant {
        let &(end, at) = self
            .clock
            .iter()
            .find(|(end, _)| *end > index)
            .or(self.clock.back())
            .expect("the window has seen audio");
        let behind = end.saturating_sub(index) as f64 / MODEL_RATE as f64;
        at.checked_sub(Duration::from_secs_f64(behind))
            .unwrap_or(at)
    }
}

/// Runs the VAD over the call's 16 kHz audio and reports turn events.
pub(crate) async fn detect(
    vad: VadHandle,
    turns: TurnTaking,
    mut input: mpsc::Receiver<HeardAudio>,
    events: mpsc::Sender<VadEvent>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let settings = turns.vad;
    let flen = frame_len(MODEL_RATE);
    let pad = settings.speech_pad_ms as u64 * MODEL_RATE as u64 / 1000;
    let max_turn = settings.max_turn_ms as u64 * MODEL_RATE as u64 / 1000;
    // Reports pauses only under the smart policy.
    let mut detector = turns.policy.detector(settings, MODEL_RATE);
    let mut state = Some(SileroState::new(MODEL_RATE).expect("16 kHz is supported"));
    let mut window = AudioWindow {
        start: 0,
        samples: VecDeque::new(),
        clock: VecDeque::new(),
    };
    // Absolute index of the next sample the VAD has not seen.
    let mut analysed: u64 = 0;
    // Where the turn in progress (or a candidate) started, if any.
    let mut turn_start: Option<u64> = None;
    // The pause in progress, and the end-of-turn model's answer about it, once asked.
    let mut pause: Option<PauseSeen> = None;
    // The verdict awaited on the pause in progress, and when the model was asked.
    let mut judging: Option<(Judgement, Instant)> = None;
    let verdict_timeout = match turns.policy.verdict_timeout_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms as u64)),
    };
    let mut asking = Asking::default();
    let mut out = Vec::new();
    loop {
        let heard = tokio::select! {
            _ = cancel.cancelled() => return,
            h = input.recv() => match h { Some(h) => h, None => return },
            judged = async { (&mut judging.as_mut().expect("guarded").0).await },
                if judging.is_some() => {
                if let Some((_, asked)) = judging.take() {
                    metrics.end_of_turn_delay_seconds.observe(asked.elapsed().as_secs_f64());
                }
                let p = match judged {
                    Ok(p) => p,
                    Err(e) => {
                        // The turn still ends at max_silence_ms.
                        metrics.error(ErrorKind::Vad);
                        tracing::warn!(error = %e, "the end-of-turn model failed; waiting for silence");
                        continue;
                    }
                };
                let policy = &turns.policy;
                let decision = policy.decide(p);
                metrics.end_of_turn(decision.as_str());
                tracing::debug!(probability = p, decision = decision.as_str(), "end-of-turn decision");
                if let Some(seen) = pause.as_mut() {
                    seen.probability = Some(p);
                }
                asking.likely = decision == Decision::Likely;
                match decision {
                    Decision::Complete => out.extend(detector.end_now()),
                    Decision::Likely => detector.end_after(policy.likely_silence_ms),
                    Decision::Incomplete => {}
                }
                out.iter().for_each(|ev| asking.observe(ev));
                if !emit(&mut out, &window, pad, &mut turn_start, &mut pause, &events).await {
                    return;
                }
                continue;
            }
        };
        window.push(&heard);
        tracing::trace!(n = heard.samples.len(), end = window.end(), "heard");
        // The model is behind: give its verdict up (the request is withdrawn, so the worker
        // skips it) and end the turn as the silence policy would.
        if let (Some((_, asked)), Some(limit)) = (&judging, verdict_timeout) {
            if asked.elapsed() >= limit {
                let asked = *asked;
                judging = None;
                metrics.end_of_turn("fallback");
                tracing::debug!(
                    waited_ms = asked.elapsed().as_millis() as u64,
                    "no end-of-turn verdict in time; ending on silence"
                );
                detector.end_after(settings.min_silence_ms);
            }
        }
        // The window holds the audio now (bounded by the longest turn): release its budget.
        drop(heard);
        let ready = ((window.end() - analysed) / flen as u64) as usize * flen;
        if ready == 0 {
            continue;
        }
        let frames = window.slice(analysed, analysed + ready as u64);
        let result = vad.infer(
            state.take().expect("state is returned after every job"),
            frames,
        );
        let (s, probs) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = result => match r {
                Ok(r) => r,
                Err(e) => {
                    metrics.error(ErrorKind::Vad);
                    let _ = events.send(VadEvent::Failed(e.to_string())).await;
                    return;
                }
            },
        };
        state = Some(s);
        for p in probs {
            let (a, b) = (analysed, analysed + flen as u64);
            analysed = b;
            detector.push(a, b, p, &mut out);
            if turn_start.is_none() && p >= settings.start_threshold {
                turn_start = Some(a.saturating_sub(pad));
            }
            for ev in &out {
                asking.observe(ev);
                match ev {
                    // A pause: ask the model about the turn so far, with the silence heard
                    // since, as pipecat feeds it. At the longer pause, only when its first
                    // answer was "likely": trailing silence makes the model readier to call any
                    // phrase complete, so an "incomplete" one stands.
                    TurnEvent::Pause { start, .. } if asking.ask() => {
                        judging = turns.model.clone().map(|m| {
                            let audio: Arc<[f32]> = window.slice(*start, b).into();
                            let verdict = Box::pin(async move { m.predict(audio).await });
                            (verdict as Judgement, Instant::now())
                        });
                    }
                    TurnEvent::Resume | TurnEvent::SpeechEnd { .. } => judging = None,
                    _ => {}
                }
            }
            if !emit(&mut out, &window, pad, &mut turn_start, &mut pause, &events).await {
                return;
            }
            if !detector.in_speech() && p < settings.end_threshold {
                turn_start = None;
            }
        }
        // Keep the turn in progress (bounded by the longest turn), or a second of pre-roll.
        let keep = match turn_start {
            Some(s) => s.max(analysed.saturating_sub(max_turn + pad)),
            None => analysed.saturating_sub(MODEL_RATE as u64),
        };
        window.trim(keep);
    }
}

/// Sends the detector's events as the call sees them. False once the call is gone.
async fn emit(
    out: &mut Vec<TurnEvent>,
    window: &AudioWindow,
    pad: u64,
    turn_start: &mut Option<u64>,
    pause: &mut Option<PauseSeen>,
    events: &mpsc::Sender<VadEvent>,
) -> bool {
    for ev in out.drain(..) {
        tracing::debug!(?ev, end = window.end(), start = window.start, "turn event");
        let now = Instant::now();
        let msg = match ev {
            TurnEvent::SpeechStart { start } => {
                *turn_start = Some(start);
                VadEvent::SpeechStart
            }
            TurnEvent::Interruption { .. } => VadEvent::Interruption,
            TurnEvent::Sustained => VadEvent::Sustained,
            TurnEvent::Pause { start, end } => {
                // The first pause of a silence is when the pause was noticed; a later one asks
                // the model again.
                pause.get_or_insert(PauseSeen {
                    at: now,
                    probability: None,
                });
                VadEvent::Pause {
                    audio: window.slice(start, end).into(),
                    true_end: window.arrival(end.saturating_sub(pad)),
                    detected: now,
                }
            }
            TurnEvent::Resume => {
                *pause = None;
                VadEvent::Resume
            }
            TurnEvent::Dropped => VadEvent::Dropped,
            TurnEvent::SpeechEnd { start, end, forced } => {
                let speech_end = if forced { end } else { end.saturating_sub(pad) };
                let spoken = speech_end.saturating_sub(start + pad);
                let audio: Arc<[f32]> = window.slice(start, end).into();
                *turn_start = None;
                VadEvent::SpeechEnd {
                    audio,
                    true_end: window.arrival(speech_end),
                    detected: now,
                    forced,
                    speech: Duration::from_secs_f64(spoken as f64 / MODEL_RATE as f64),
                    pause: pause.take(),
                }
            }
        };
        if events.send(msg).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backlogged end-of-turn worker (here one that never answers): its verdict is given up
    /// `verdict_timeout_ms` after the pause, and the turn ends at `[pipeline.vad] min_silence_ms`
    /// of silence, as under the silence policy, not at `max_silence_ms`. Real speech, real VAD,
    /// streamed in real time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlogged_end_of_turn_model_ends_the_turn_on_silence() {
        let lib = crate::assets::ort_lib(None).expect("ONNX Runtime (run scripts/setup)");
        let env = crate::vad::silero::init_runtime(&lib).unwrap();
        let path = crate::assets::vad_model(None).expect("Silero VAD (run scripts/setup)");
        let metrics = Arc::new(Metrics::new());
        let silero = crate::vad::silero::SileroModel::load(env, &path).unwrap();
        let vad = VadHandle::spawn(silero, metrics.clone());
        let (model, _queue) = SmartTurnHandle::never_answering();
        let policy = TurnPolicy::default();
        let vad_settings = TurnSettings::default();
        let turns = TurnTaking {
            vad: vad_settings,
            policy,
            model: Some(model),
        };
        let (tx, rx) = mpsc::channel(256);
        let (etx, mut erx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        tokio::spawn(detect(vad, turns, rx, etx, metrics.clone(), cancel));
        let clip = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smart-turn/goforward.wav");
        let wav = crate::audio::wav::read(&std::fs::read(clip).unwrap()).unwrap();
        assert_eq!(wav.sample_rate, MODEL_RATE);
        let mut audio = wav.samples;
        audio.extend(vec![0.0; 3 * MODEL_RATE as usize]);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            for (i, c) in audio.chunks(MODEL_RATE as usize / 50).enumerate() {
                tokio::time::sleep_until(started + Duration::from_millis(20 * i as u64)).await;
                let heard = HeardAudio {
                    samples: c.to_vec(),
                    arrived: Instant::now(),
                    _budget: None,
                };
                if tx.send(heard).await.is_err() {
                    return;
                }
            }
        });
        let (true_end, detected) = loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), erx.recv())
                .await
                .expect("a turn end within the clip")
                .expect("detect runs");
            if let VadEvent::SpeechEnd {
                true_end, detected, ..
            } = ev
            {
                break (true_end, detected);
            }
        };
        let silence_ms = detected.duration_since(true_end).as_secs_f64() * 1e3;
        let count = |d: &str| metrics.end_of_turn_decisions.with_label_values(&[d]).get();
        assert!(count("fallback") >= 1, "the verdict was not given up");
        assert_eq!(count("complete") + count("likely") + count("incomplete"), 0);
        // min_silence_ms (500) of silence, to within the VAD's frames and the pad; the
        // policy's max_silence_ms is 1500.
        assert!(
            (450.0..800.0).contains(&silence_ms),
            "the turn ended after {silence_ms:.0} ms of silence (min_silence_ms {}, \
             max_silence_ms {})",
            vad_settings.min_silence_ms,
            policy.max_silence_ms
        );
    }

    #[test]
    fn window_slices_and_times_samples() {
        let t0 = Instant::now();
        let mut w = AudioWindow {
            start: 0,
            samples: VecDeque::new(),
            clock: VecDeque::new(),
        };
        w.push(&HeardAudio {
            samples: vec![1.0; 16_000],
            arrived: t0 + Duration::from_secs(1),
            _budget: None,
        });
        w.push(&HeardAudio {
            samples: vec![2.0; 16_000],
            arrived: t0 + Duration::from_secs(2),
            _budget: None,
        });
        assert_eq!(w.arrival(8_000), t0 + Duration::from_millis(500));
        assert_eq!(w.arrival(24_000), t0 + Duration::from_millis(1500));
        w.trim(10_000);
        assert_eq!(w.start, 10_000);
        assert_eq!(
            w.slice(15_990, 16_010),
            [vec![1.0; 10], vec![2.0; 10]].concat()
        );
        assert_eq!(w.slice(0, 10_002), vec![1.0; 2]);
    }
}
