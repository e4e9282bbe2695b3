//! The output pacer: takes a reply's synthesized audio, converts it to the caller's rate, cuts it
//! into frames and hands each frame to the transport no earlier than `lead` ahead of real time.
//! Because the client never holds more than `lead` of audio, a barge-in silences it within that
//! lead. The pacer also keeps the playout ledger: when each unit's samples play on the client, so
//! the call can tell how much of the reply was heard.

mod queue;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Outbound, Playable};
use crate::audio::resample::{ResampleError, StreamResampler};
use crate::tts::AudioStream;
use queue::FrameQueue;

/// Where each unit's audio plays on the client's clock.
#[derive(Debug, Clone, Default)]
pub(crate) struct Playout {
    pub sample_rate: u32,
    pub units: Vec<UnitPlayout>,
    /// When the client will have played everything sent so far.
    pub ends_at: Option<Instant>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct UnitPlayout {
    /// Contiguous runs of this unit's samples: (when the run starts playing, samples in it).
    pub runs: Vec<(Instant, u64)>,
    /// Total samples of the unit, once synthesis finished it.
    pub total: Option<u64>,
}

impl Playout {
    /// The share of unit `unit` that its first `samples` samples are (of its total once known,
    /// else of what was sent of it).
    pub(crate) fn unit_fraction(&self, unit: usize, samples: u64) -> f64 {
        let Some(u) = self.units.get(unit) else {
            return 0.0;
        };
        let total = u.total.unwrap_or_else(|| u.runs.iter().map(|r| r.1).sum());
        if total == 0 {
            return 0.0;
        }
        (samples as f64 / total as f64).min(1.0)
    }

    /// The fraction of each unit played by `now`. A unit whose synthesis had not finished counts
    /// against the samples known so far.
    pub(crate) fn played_fraction(&self, now: Instant) -> Vec<f64> {
        let rate = self.sample_rate.max(1) as f64;
        self.units
            .iter()
            .map(|u| {
                let played: f64 = u
                    .runs
                    .iter()
                    .map(|&(start, n)| {
                        let secs = now.saturating_duration_since(start).as_secs_f64();
                        (secs * rate).min(n as f64)
                    })
                    .sum();
                let total = u.total.unwrap_or_else(|| u.runs.iter().map(|r| r.1).sum()) as f64;
                if total <= 0.0 {
                    if u.total.is_some() {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    (played / total).min(1.0)
                }
            })
            .collect()
    }
}

/// What the pacer tells the call as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacerEvent {
    FirstSynthAudio(Instant),
    FirstAudioSent(Instant),
    /// Everything was handed over; the client finishes playing at the given instant.
    Finished {
        plays_until: Instant,
    },
    /// The caller's playback ran dry for `by` before this frame went out: a gap the caller
    /// hears. `synthesis` says the audio was not ready in time; otherwise it was ready but the
    /// pacer ran late (an overloaded server).
    Underrun {
        by: Duration,
        synthesis: bool,
    },
    Failed,
}

use crate::metrics::UNDERRUN_TOLERANCE;

/// How often the pacer reports a point inside the unit being sent (`Outbound::UnitSent` with
/// `within`), in audio.
const MARK_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub(crate) struct PacerSettings {
    /// The reply's number, for `Outbound::UnitSent`.
    pub reply: u64,
    pub output_rate: u32,
    pub frame_ms: u32,
    pub lead: Duration,
    /// Most synthesized audio held beyond what was sent; synthesis of the reply waits beyond it,
    /// so a long reply never sits in memory whole.
    pub max_ahead: Duration,
}

/// The call's hold on a reply's output: `None` lets it play; `Some(t)` holds it as of `t`. A
/// preemptive reply starts held, before anything is sent. A reply held while it plays (the user
/// made a sound over it) is rewound to where the client's playback stood at `t`: what was sent
/// after that is dropped (the call tells the client to clear) and goes out again on release.
pub(crate) type Gate = watch::Receiver<Option<Instant>>;

/// Runs the pacer until the audio stream ends and has played, or `cancel` fires. `send`
/// delivers frames to the transport; `events` reports milestones; `ledger` is updated as frames
/// go out. Synthesized audio is taken as soon as it is ready, up to `max_ahead` of it (so
/// synthesis rarely waits and every unit's length is known early); only sending is held to the
/// lead, and to the `gate`.
pub(crate) async fn run(
    settings: PacerSettings,
    mut audio: AudioStream,
    send: mpsc::Sender<Outbound>,
    events: mpsc::Sender<PacerEvent>,
    ledger: watch::Sender<Playout>,
    mut gate: Gate,
    cancel: CancellationToken,
) {
    let mut p = Pacer::new(settings, ledger, &cancel, gate.clone());
    let mut input_open = true;
    // The hold the pacer has acted on, whether the call still holds the gate, and whether
    // `Finished` went out for what is queued.
    let mut held_since: Option<Instant> = None;
    let mut gate_alive = true;
    let mut finished = false;
    loop {
        let hold = *gate.borrow_and_update();
        match (held_since, hold) {
            (None, Some(at)) => p.rewind(at),
            // The call forgot the `Finished` it got while the reply was held: say it again.
            (Some(_), None) => {
                p.restart();
                finished = false;
            }
            _ => {}
        }
        held_since = hold;
        let held = hold.is_some();
        let sendable = !held && p.queue.sendable(p.frame_len, input_open);
        if !held && !sendable && !input_open {
            if !finished {
                finished = true;
                let _ = events
                    .send(PacerEvent::Finished {
                        plays_until: p.plays_until,
                    })
                    .await;
            }
            if !gate_alive {
                return;
            }
            // All is out, but the call may still hold the reply while the client plays it.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                changed = gate.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(p.plays_until.into()) => return,
            }
            continue;
        }
        let room = p.secs(p.queue.len()) < settings.max_ahead;
        let send_at = p.send_at();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = gate.changed(), if gate_alive => {
                if changed.is_err() {
                    // The call let go of the gate: the reply is gone if it was held.
                    if held {
                        return;
                    }
                    gate_alive = false;
                }
            }
            chunk = audio.recv(), if input_open && room => match chunk {
                Some(Ok(c)) => {
                    if let Err(e) = p.take(c, &events).await {
                        tracing::error!(error = %e, "pacer cannot resample synthesized audio");
                        let _ = events.send(PacerEvent::Failed).await;
                        return;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "synthesis failed mid-reply");
                    let _ = events.send(PacerEvent::Failed).await;
                    input_open = false;
                }
                None => input_open = false,
            },
            _ = tokio::time::sleep_until(send_at.into()), if sendable => {
                if p.send_frame(&send, &events).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A frame handed to the transport whose playback may not have ended yet.
struct SentFrame {
    /// When the client starts playing it.
    start: Instant,
    samples: Vec<f32>,
    /// (unit, offset, samples), as in [`queue::QueuedFrame`].
    runs: Vec<(usize, usize, usize)>,
}

/// The pacer's state between `select!` rounds.
struct Pacer {
    settings: PacerSettings,
    frame_len: usize,
    resampler: Option<StreamResampler>,
    queue: FrameQueue,
    ledger: watch::Sender<Playout>,
    /// When the client will have played everything sent so far.
    plays_until: Instant,
    first_synth: bool,
    first_sent: bool,
    /// When the newest synthesized audio arrived, to tell the causes of an underrun apart.
    last_input_at: Instant,
    /// The unit being sent and how many of its samples went out so far.
    sent_of: (usize, u64),
    /// Samples sent since the last point reported inside a unit.
    since_mark: usize,
    /// Frames sent whose playback had not ended when last looked at, oldest first: what a hold
    /// takes back.
    sent: VecDeque<SentFrame>,
    /// The reply's token, for a child per stretch of playback.
    reply: CancellationToken,
    /// The token frames and marks carry: cancelled when a hold takes them back, so the transport
    /// drops those still queued.
    segment: CancellationToken,
    /// The call's hold, for the transport to drop frames that reach it while the reply is held.
    gate: Gate,
}

impl Pacer {
    fn new(
        settings: PacerSettings,
        ledger: watch::Sender<Playout>,
        reply: &CancellationToken,
        gate: Gate,
    ) -> Self {
        let rate = settings.output_rate;
        ledger.send_modify(|l| {
            *l = Playout {
                sample_rate: rate,
                ..Default::default()
            }
        });
        Pacer {
            settings,
            frame_len: (rate * settings.frame_ms / 1000) as usize,
            resampler: None,
            queue: FrameQueue::default(),
            ledger,
            plays_until: now(),
            first_synth: true,
            first_sent: true,
            last_input_at: now(),
            sent_of: (0, 0),
            since_mark: 0,
            sent: VecDeque::new(),
            reply: reply.clone(),
            segment: reply.child_token(),
            gate,
        }
    }

    /// Takes back what the client had not played by `at`: its audio goes to the front of the
    /// queue, the ledger forgets it, and the frames and marks still on their way are dropped.
    fn rewind(&mut self, at: Instant) {
        let rate = self.settings.output_rate as f64;
        let mut samples = Vec::new();
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut trims: Vec<(usize, Instant, u64, u64)> = Vec::new();
        for f in std::mem::take(&mut self.sent) {
            let since = at.saturating_duration_since(f.start).as_secs_f64();
            let played = ((since * rate) as usize).min(f.samples.len());
            if played == f.samples.len() {
                continue;
            }
            samples.extend_from_slice(&f.samples[played..]);
            for &(u, off, k) in &f.runs {
                let kept = played.saturating_sub(off).min(k);
                if kept < k {
                    match runs.last_mut() {
                        Some((v, n)) if *v == u => *n += k - kept,
                        _ => runs.push((u, k - kept)),
                    }
                    let run_start = f.start + self.secs(off);
                    trims.push((u, run_start, k as u64, kept as u64));
                }
            }
        }
        if samples.is_empty() {
            return;
        }
        self.segment.cancel();
        self.segment = self.reply.child_token();
        self.queue.unpop(&samples, &runs);
        self.ledger.send_modify(|l| {
            for &(u, start, k, kept) in &trims {
                let Some(unit) = l.units.get_mut(u) else {
                    continue;
                };
                if let Some(i) = unit.runs.iter().rposition(|&r| r == (start, k)) {
                    if kept == 0 {
                        unit.runs.remove(i);
                    } else {
                        unit.runs[i].1 = kept;
                    }
                }
            }
            l.ends_at = Some(at);
        });
        let first = runs[0].0;
        let sent_of_first: u64 = self.ledger.borrow().units[first]
            .runs
            .iter()
            .map(|r| r.1)
            .sum();
        self.sent_of = (first, sent_of_first);
        self.since_mark = 0;
        self.plays_until = self.plays_until.min(at);
        tracing::debug!(
            reply = self.settings.reply,
            taken_back = samples.len(),
            "held: unplayed audio taken back"
        );
    }

    /// The hold is lifted: playback starts afresh (the client's queue is empty).
    fn restart(&mut self) {
        self.plays_until = now();
    }

    fn secs(&self, n: usize) -> Duration {
        Duration::from_secs_f64(n as f64 / self.settings.output_rate as f64)
    }

    /// When the next frame may go: sending it then leaves at most `lead` queued on the client.
    fn send_at(&self) -> Instant {
        let n = self.frame_len.min(self.queue.len());
        let at = self.plays_until.max(now()) + self.secs(n);
        at.checked_sub(self.settings.lead).unwrap_or(at)
    }

    /// Takes one chunk of synthesized audio: converts it to the caller's rate and queues it.
    async fn take(
        &mut self,
        chunk: crate::tts::SynthChunk,
        events: &mpsc::Sender<PacerEvent>,
    ) -> Result<(), ResampleError> {
        self.last_input_at = now();
        if self.first_synth && !chunk.samples.is_empty() {
            self.first_synth = false;
            let _ = events.send(PacerEvent::FirstSynthAudio(now())).await;
        }
        let rate = self.settings.output_rate;
        let r = match &mut self.resampler {
            Some(r) if r.input_rate() == chunk.sample_rate => r,
            slot => slot.insert(StreamResampler::new(chunk.sample_rate, rate)?),
        };
        let mut out = r.push(&chunk.samples)?;
        if chunk.unit_done {
            // Flush so the unit's last samples are attributed to it.
            out.extend(r.flush()?);
        }
        let unit = chunk.unit;
        if let Some(queued) = self.queue.push(unit, out, chunk.unit_done) {
            self.ledger.send_modify(|l| {
                ensure_unit(l, unit);
                let sent: u64 = l.units[unit].runs.iter().map(|r| r.1).sum();
                l.units[unit].total = Some(sent + queued);
            });
        }
        Ok(())
    }

    /// Sends the next frame, records where it plays, and marks the units it completes. `Err`
    /// when the transport is gone.
    async fn send_frame(
        &mut self,
        send: &mpsc::Sender<Outbound>,
        events: &mpsc::Sender<PacerEvent>,
    ) -> Result<(), ()> {
        let frame = self.queue.pop(self.frame_len);
        let frame_samples = frame.samples.len();
        let at = now();
        if !self.first_sent && at > self.plays_until + UNDERRUN_TOLERANCE {
            let by = at - self.plays_until;
            let synthesis = self.last_input_at > self.plays_until;
            let _ = events.send(PacerEvent::Underrun { by, synthesis }).await;
        }
        let start = self.plays_until.max(at);
        self.plays_until = start + self.secs(frame.samples.len());
        let plays_until = self.plays_until;
        let runs: Vec<(usize, Instant, u64)> = frame
            .runs
            .iter()
            .map(|&(u, offset, k)| (u, start + self.secs(offset), k as u64))
            .collect();
        self.ledger.send_modify(|l| {
            for &(u, at, k) in &runs {
                ensure_unit(l, u);
                l.units[u].runs.push((at, k));
            }
            l.ends_at = Some(plays_until);
        });
        let due = (plays_until > at).then_some(plays_until);
        while self
            .sent
            .front()
            .is_some_and(|f| f.start + self.secs(f.samples.len()) <= at)
        {
            self.sent.pop_front();
        }
        self.sent.push_back(SentFrame {
            start,
            samples: frame.samples.clone(),
            runs: frame.runs.clone(),
        });
        let playable = Playable {
            segment: self.segment.clone(),
            gate: self.gate.clone(),
        };
        let out = Outbound::Audio {
            samples: frame.samples,
            playable: playable.clone(),
            due,
        };
        send.send(out).await.map_err(|_| ())?;
        for &(u, _, k) in &frame.runs {
            if self.sent_of.0 != u {
                self.sent_of = (u, 0);
            }
            self.sent_of.1 += k as u64;
        }
        self.since_mark += frame_samples;
        let finished = !frame.finished.is_empty();
        for unit in frame.finished {
            let done = Outbound::UnitSent {
                reply: self.settings.reply,
                unit,
                within: None,
                playable: playable.clone(),
            };
            send.send(done).await.map_err(|_| ())?;
        }
        // A point inside the unit being spoken, every MARK_EVERY of audio, so a transport that
        // learns what was played learns it to within a word or two.
        let (unit, sent) = self.sent_of;
        let unit_open = frame.runs.last().is_some_and(|r| r.0 == unit) && sent > 0;
        if finished {
            self.since_mark = 0;
        } else if unit_open && self.secs(self.since_mark) >= MARK_EVERY {
            self.since_mark = 0;
            let mark = Outbound::UnitSent {
                reply: self.settings.reply,
                unit,
                within: Some(sent),
                playable,
            };
            send.send(mark).await.map_err(|_| ())?;
        }
        if self.first_sent {
            self.first_sent = false;
            let _ = events.send(PacerEvent::FirstAudioSent(now())).await;
        }
        Ok(())
    }
}

/// The current time on tokio's clock (which tests can pause), as a std instant.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn ensure_unit(l: &mut Playout, unit: usize) {
    if l.units.len() <= unit {
        l.units.resize_with(unit + 1, UnitPlayout::default);
    }
}

/// The words of `units` heard by `now`: whole units played in full, then the share of the words
/// of a partly played unit that matches the share of its audio played.
pub(crate) fn spoken_text(units: &[String], playout: &Playout, now: Instant) -> (String, bool) {
    words_heard(units, &playout.played_fraction(now))
}

/// The words of `units` heard when `fractions[i]` of unit `i` has played (a unit's words are
/// taken as evenly spread over its audio); also whether all of it was.
pub(crate) fn words_heard(units: &[String], fractions: &[f64]) -> (String, bool) {
    let mut words: Vec<&str> = Vec::new();
    let mut complete = true;
    for (i, text) in units.iter().enumerate() {
        let f = fractions.get(i).copied().unwrap_or(0.0);
        let all: Vec<&str> = text.split_whitespace().collect();
        if f >= 0.999 {
            words.extend(all);
            continue;
        }
        complete = false;
        let k = (f * all.len() as f64).floor() as usize;
        words.extend(&all[..k]);
        break;
    }
    (words.join(" "), complete)
}

#[cfg(test)]
mod tests;
