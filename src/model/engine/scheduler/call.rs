//! One call's place in the scheduler: its session, the job in flight (a turn moving through the
//! phases admission → prefill → decode), the outbox its tokens wait in, and the requests queued
//! behind it. A job's phase is the only record of which queue it is in; [`Job::enter`] is the
//! one door between queues and stamps the order within the new one.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::TurnRequest;
use crate::model::gazelle::session::{ActiveReply, Prefill};
use crate::model::gazelle::{GazelleSession, Spoken};
use crate::model::SlmError;

pub(super) type TokenSender = mpsc::Sender<Result<String, SlmError>>;

/// Replies and truncations of one call waiting behind its current reply; a call makes one of
/// each at a time, so this only fills if the caller misbehaves, and then the turn is refused.
const CALL_BACKLOG: usize = 8;

pub(super) enum Phase {
    /// In the admission queue, not yet encoded.
    Waiting(Arc<[f32]>),
    /// Encoded and planned, waiting for KV memory (still in the admission queue).
    Planned(Prefill),
    Prefilling(Prefill),
    /// Generating; `feed` is the newest token, to go through the next decode step.
    Decoding {
        reply: Box<ActiveReply>,
        feed: Option<u32>,
    },
    /// Generation ended; only undelivered pieces remain.
    Done,
}

/// The scheduler's queues, each derived from the phases of the jobs in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queue {
    /// Turns waiting to be encoded and granted memory, first come first served.
    Admission,
    /// Turns being prefilled, in the order they were admitted.
    Prefill,
    /// Replies generating, in the order they started.
    Decode,
}

impl Phase {
    pub(super) fn queue(&self) -> Option<Queue> {
        match self {
            Phase::Waiting(_) | Phase::Planned(_) => Some(Queue::Admission),
            Phase::Prefilling(_) => Some(Queue::Prefill),
            Phase::Decoding { .. } => Some(Queue::Decode),
            Phase::Done => None,
        }
    }
}

pub(super) struct Job {
    pub(super) phase: Phase,
    /// When the job entered the queue its phase is in (the scheduler's counter): its place in
    /// that queue.
    pub(super) entered: u64,
    pub(super) out: Outbox,
    pub(super) cancel: CancellationToken,
    pub(super) asked_at: Instant,
    pub(super) first_prefill_at: Option<Instant>,
    pub(super) first_token: bool,
}

impl Job {
    /// A new turn, at the back of the admission queue.
    pub(super) fn new(turn: TurnRequest, clock: &mut u64) -> Self {
        *clock += 1;
        Job {
            phase: Phase::Waiting(turn.audio),
            entered: *clock,
            out: Outbox {
                tokens: turn.tokens,
                tentative: turn.tentative,
                undelivered: VecDeque::new(),
            },
            cancel: turn.cancel,
            asked_at: turn.at,
            first_prefill_at: None,
            first_token: false,
        }
    }

    /// Moves the job to `phase` and returns the one it leaves; a job that changes queues goes
    /// to the back of the new one.
    pub(super) fn enter(&mut self, phase: Phase, clock: &mut u64) -> Phase {
        if phase.queue() != self.phase.queue() {
            *clock += 1;
            self.entered = *clock;
        }
        std::mem::replace(&mut self.phase, phase)
    }

    /// The call no longer wants this reply.
    pub(super) fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.out.tokens.is_closed()
    }

    /// It has a token for the next decode step and its call is keeping up.
    pub(super) fn ready_to_decode(&self) -> bool {
        !self.out.parked() && matches!(self.phase, Phase::Decoding { feed: Some(_), .. })
    }

    /// Generation has ended and the call has taken every piece: nothing holds the job but a
    /// tentative turn's wait for its commit.
    pub(super) fn delivered(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.out.undelivered.is_empty()
    }
}

/// A reply's way to its call.
pub(super) struct Outbox {
    pub(super) tokens: TokenSender,
    /// The turn is tentative: its tokens stream (the call holds them back from the user), but
    /// the job stays until the call commits or discards it.
    pub(super) tentative: bool,
    /// Pieces the call has not taken yet (waiting for room in its channel).
    pub(super) undelivered: VecDeque<Result<String, SlmError>>,
}

impl Outbox {
    /// Waiting for its call to take tokens before it may go on.
    pub(super) fn parked(&self) -> bool {
        !self.undelivered.is_empty()
    }

    /// Hands over what the channel has room for, never waiting. False if the call is gone.
    pub(super) fn deliver(&mut self) -> bool {
        while let Some(piece) = self.undelivered.pop_front() {
            match self.tokens.try_send(piece) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(piece)) => {
                    self.undelivered.push_front(piece);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }
}

pub(super) enum Backlogged {
    Turn(TurnRequest),
    Truncate(String),
}

pub(super) struct Call {
    pub(super) session: GazelleSession,
    pub(super) job: Option<Job>,
    pub(super) backlog: VecDeque<Backlogged>,
    /// Step of the last work, for evicting the longest-idle cache first.
    pub(super) last_active: u64,
    pub(super) link: Weak<()>,
}

/// What became of a request offered to a call's backlog.
pub(super) enum Offer {
    /// Nothing is in the way: run it now.
    RunNow(Backlogged),
    /// It waits behind the reply in flight and the requests before it.
    Waits,
    /// The backlog is full.
    Full(Backlogged),
}

impl Call {
    /// Queues `item` behind the reply in flight (and anything queued before it), so the call's
    /// requests run in order.
    pub(super) fn queue_if_busy(&mut self, item: Backlogged) -> Offer {
        if self.job.is_none() && self.backlog.is_empty() {
            Offer::RunNow(item)
        } else if self.backlog.len() >= CALL_BACKLOG {
            Offer::Full(item)
        } else {
            self.backlog.push_back(item);
            Offer::Waits
        }
    }

    /// The queue its job is in, if any.
    pub(super) fn queue(&self) -> Option<Queue> {
        self.job.as_ref().and_then(|j| j.phase.queue())
    }

    /// Whether its cache may be freed for others: between turns, or with a turn not yet
    /// encoded (its next turn recomputes it).
    pub(super) fn evictable(&self) -> bool {
        matches!(
            self.job.as_ref().map(|j| &j.phase),
            None | Some(Phase::Waiting(_))
        )
    }
}

/// Stops a job's work part-way, leaving the session consistent.
pub(super) fn end_phase(session: &mut GazelleSession, phase: Phase) {
    match phase {
        Phase::Waiting(_) | Phase::Done => {}
        Phase::Planned(_) | Phase::Prefilling(_) => session.abort_prefill(),
        Phase::Decoding { mut reply, .. } => {
            reply.decoder.cancel();
            if let Err(e) = session.finish_reply(*reply) {
                tracing::warn!(error = %e, "could not keep a cancelled reply");
            }
        }
    }
}

pub(super) fn truncate(session: &mut GazelleSession, spoken: &str) {
    if let Err(e) = session.truncate_reply_to(Spoken::Text(spoken)) {
        tracing::warn!(error = %e, "could not cut the reply back to what was heard");
    }
}
