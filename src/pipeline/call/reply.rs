//! The bookkeeping of one reply in flight: its cancellation token, its latency timeline, the
//! units it spoke, what the client acknowledged, the milestones its stages report, the playout
//! ledger from which the call learns how much of it was heard, the gate that holds its audio (a
//! preemptive reply until its turn is final, a playing one while the user makes a sound over
//! it), and the messages held with a preemptive reply.

use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::pipeline::pacer::{self, PacerEvent, Playout};
use crate::pipeline::sentence::stage::TextEvent;
use crate::pipeline::{Outbound, Timeline};

/// When the user's turn ended (the true end of speech, the VAD's decision) and how long it was,
/// in milliseconds.
pub(super) type TurnEnd = (Instant, Instant, f64);

pub(super) struct Reply {
    pub id: u64,
    pub cancel: CancellationToken,
    /// The user turn it answers; `None` for the first message.
    turn_end: Option<TurnEnd>,
    pub timeline: Timeline,
    timeline_sent: bool,
    pub units: Vec<String>,
    /// Units the client acknowledged as played, from the start.
    acked: usize,
    /// How far into the next unit the client acknowledged playing: (unit, samples).
    acked_within: Option<(usize, u64)>,
    text_events: Option<mpsc::Receiver<TextEvent>>,
    pacer_events: Option<mpsc::Receiver<PacerEvent>>,
    ledger: watch::Receiver<Playout>,
    pub text_done: bool,
    /// Its text stopped short of the model's (the character limit, or the model failed): the
    /// model's session must be told what was spoken, or its history keeps the rest.
    pub cut_short: bool,
    /// When the client finishes playing the reply, once all audio is out.
    pub plays_until: Option<Instant>,
    /// Set while the reply is preemptive: its turn may still grow.
    pub tentative: Option<Tentative>,
    /// Holds the pacer's output while `Some` (from that instant).
    gate: watch::Sender<Option<Instant>>,
    /// When the reply was paused by speech over it, while it is.
    pub paused: Option<Instant>,
}

/// A preemptive reply, started at a pause before the turn was known to be over.
pub(super) struct Tentative {
    /// The turn it answers, in samples: a turn that ends with the same audio commits it.
    pub turn_samples: usize,
    pub started: Instant,
    /// Messages for the client, sent only if the reply is committed.
    pub held: Vec<Outbound>,
}

/// What the client heard of a reply that is being stopped.
#[derive(Debug, PartialEq)]
pub(super) enum Heard {
    /// All of it: it had finished playing.
    All,
    /// This much (possibly nothing): it is cut here.
    Cut(String),
}

impl Reply {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        cancel: CancellationToken,
        turn_end: Option<TurnEnd>,
        text_events: mpsc::Receiver<TextEvent>,
        pacer_events: mpsc::Receiver<PacerEvent>,
        ledger: watch::Receiver<Playout>,
        gate: watch::Sender<Option<Instant>>,
        tentative: Option<Tentative>,
    ) -> Self {
        let mut timeline = Timeline {
            reply: id,
            ..Default::default()
        };
        if let Some((true_end, detected, ms)) = turn_end {
            timeline.user_audio_ms = ms;
            timeline.vad_end_ms = Some(Timeline::offset(true_end, detected));
        }
        Reply {
            id,
            cancel,
            turn_end,
            timeline,
            timeline_sent: false,
            units: Vec::new(),
            acked: 0,
            acked_within: None,
            text_events: Some(text_events),
            pacer_events: Some(pacer_events),
            ledger,
            text_done: false,
            cut_short: false,
            plays_until: None,
            tentative,
            gate,
            paused: None,
        }
    }

    /// Stops the reply's audio where the client's playback stands at `at`; the pacer takes back
    /// what was sent beyond it. Acknowledgements are not taken while it is paused: the marks a
    /// cleared client returns name audio it dropped.
    pub(crate) fn pause(&mut self, at: Instant) {
        self.paused = Some(at);
        self.plays_until = None;
        let _ = self.gate.send(Some(at));
    }

    /// Lets a paused reply play on from where it stopped; how long it was paused.
    pub(crate) fn resume(&mut self, at: Instant) -> Option<std::time::Duration> {
        let since = self.paused.take()?;
        let _ = self.gate.send(None);
        Some(at.saturating_duration_since(since))
    }

    /// The turn is over and this preemptive reply answers it: its audio may go out now. Returns
    /// the messages held until now, in order.
    pub(crate) fn commit(&mut self, at: Instant, detected: Instant) -> Vec<Outbound> {
        let Some(t) = self.tentative.take() else {
            return Vec::new();
        };
        let _ = self.gate.send(None);
        if let Some((true_end, _, ms)) = self.turn_end {
            self.turn_end = Some((true_end, detected, ms));
            self.timeline.vad_end_ms = Some(Timeline::offset(true_end, detected));
            self.timeline.commit_ms = Some(Timeline::offset(true_end, at));
            self.timeline.preemptive_start_ms = Some(Timeline::offset(true_end, t.started));
        }
        t.held
    }

    /// When the turn it answers ended, if it answers one.
    pub(crate) fn true_end(&self) -> Option<Instant> {
        self.turn_end.map(|(t, _, _)| t)
    }

    /// Records when a stage of the timeline was reached (the first time only); the first
    /// message, which answers no turn, has no timeline.
    pub(crate) fn stage(&mut self, at: Instant, pick: fn(&mut Timeline) -> &mut Option<f64>) {
        let Some((true_end, _, _)) = self.turn_end else {
            return;
        };
        let slot = pick(&mut self.timeline);
        if slot.is_none() {
            *slot = Some(Timeline::offset(true_end, at));
        }
    }

    /// The timeline, once, when it is complete enough to send (a reply to a user turn).
    pub(crate) fn take_timeline(&mut self) -> Option<Timeline> {
        if self.timeline_sent || self.turn_end.is_none() {
            return None;
        }
        self.timeline_sent = true;
        Some(self.timeline.clone())
    }

    /// The client played unit `unit` to its end (`within` is `None`), or its first `within`
    /// samples.
    pub(crate) fn acknowledge(&mut self, unit: usize, within: Option<u64>) {
        if self.paused.is_some() {
            return;
        }
        match within {
            None => self.acked = self.acked.max(unit + 1),
            Some(n) => {
                let further = self.acked_within.is_none_or(|(u, m)| (unit, n) > (u, m));
                if further {
                    self.acked_within = Some((unit, n));
                }
            }
        }
    }

    /// What the client has heard by `now`: the acknowledged units when the transport reports
    /// playback, else the share of the audio the playout clock says was played.
    pub(crate) fn heard(&self, now: Instant, playback_acks: bool) -> Heard {
        let ledger = self.ledger.borrow().clone();
        let silent = ledger.ends_at.is_none_or(|t| t <= now);
        if self.text_done && self.plays_until.is_some() && silent {
            // Finished playing; the timer just has not fired yet.
            return Heard::All;
        }
        Heard::Cut(if playback_acks {
            // Acknowledged units whole, and the acknowledged share of the one after them.
            let mut fractions = vec![1.0; self.acked.min(self.units.len())];
            if let Some((u, n)) = self.acked_within.filter(|&(u, _)| u == self.acked) {
                fractions.push(ledger.unit_fraction(u, n));
            }
            pacer::words_heard(&self.units, &fractions).0
        } else {
            pacer::spoken_text(&self.units, &ledger, now).0
        })
    }
}

pub(super) enum ReplyEvent {
    Text(TextEvent),
    Pacer(PacerEvent),
}

/// The next milestone of the reply in flight; pending while there is none. A stage's channel that
/// closes is forgotten so it cannot wake the actor again. Text events go first: a unit's event is
/// queued before the unit reaches the synthesizer, so taking text first keeps the timeline in
/// causal order (a unit is never seen after audio made from it).
pub(super) async fn next_reply_event(reply: &mut Option<Reply>) -> ReplyEvent {
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
