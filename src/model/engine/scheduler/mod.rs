//! The engine's scheduler: every call's model state, the queues of turns, and one step of work
//! (admit, prefill a chunk, decode a batch, deliver tokens). It is plain synchronous code, driven
//! by the engine thread in production and step by step in tests; the policy it follows is
//! written in the module doc of `engine`.
//!
//! Each call's job records its phase, and the queues are read off the phases ([`call::Queue`]),
//! so there is one record of where a turn stands. [`call`] holds a call's state, [`admit`] the
//! admission to KV memory, [`run`] the model's work; in tests every step ends with a check of
//! the invariants.

mod admit;
mod call;
mod run;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use self::call::{end_phase, truncate, Backlogged, Call, Job, Offer, Queue, TokenSender};
use super::pool::KvPool;
use super::EngineSettings;
use crate::metrics::Metrics;
use crate::model::gazelle::{GazelleSession, LoadedGazelle};
use crate::model::SlmError;

/// Identifies one call's session inside the engine.
pub(crate) type CallId = u64;

/// What calls ask of the engine.
pub(crate) enum Command {
    Open {
        id: CallId,
        system_prompt: Option<String>,
        /// Dropped with the call's handle, so a call that vanished without `Close` is noticed.
        link: Weak<()>,
    },
    Turn {
        id: CallId,
        turn: TurnRequest,
    },
    Commit {
        id: CallId,
    },
    Discard {
        id: CallId,
    },
    Truncate {
        id: CallId,
        spoken: String,
    },
    Close {
        id: CallId,
    },
}

/// One user turn to answer.
pub(crate) struct TurnRequest {
    pub audio: Arc<[f32]>,
    pub tokens: TokenSender,
    pub cancel: CancellationToken,
    /// Withhold the reply's tokens until a commit; a discard takes the turn back.
    pub tentative: bool,
    /// When the call asked.
    pub at: Instant,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StepReport {
    /// Positions prefilled.
    pub prefilled: usize,
    /// Sequences in the decode batch.
    pub batch: usize,
}

/// Every call's model state and the queues of work.
pub(crate) struct Scheduler {
    engine: Arc<LoadedGazelle>,
    settings: EngineSettings,
    pool: KvPool,
    calls: HashMap<CallId, Call>,
    /// Counts jobs' moves between queues: the order within each ([`Job::enter`]).
    clock: u64,
    /// Where the next decode batch starts in the decode queue when not all fit in one.
    rotate: usize,
    steps: u64,
    metrics: Option<Arc<Metrics>>,
    /// Every logits row each call sampled from, for the equivalence tests.
    #[cfg(test)]
    pub(crate) trace: HashMap<CallId, Vec<Vec<f32>>>,
}

impl Scheduler {
    pub(crate) fn new(
        engine: Arc<LoadedGazelle>,
        settings: EngineSettings,
        pool: KvPool,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.engine_kv_budget_positions.set(pool.budget() as i64);
        }
        Self {
            engine,
            settings,
            pool,
            calls: HashMap::new(),
            clock: 0,
            rotate: 0,
            steps: 0,
            metrics,
            #[cfg(test)]
            trace: HashMap::new(),
        }
    }

    /// Whether a step would do anything now (other than wait for parked calls to drain).
    pub(crate) fn has_work(&self) -> bool {
        self.count(Queue::Prefill) > 0
            || self.head_admissible()
            || self.calls.values().any(|c| {
                c.job
                    .as_ref()
                    .is_some_and(|j| j.abandoned() || j.ready_to_decode())
            })
    }

    /// Whether some reply waits for its call to take tokens.
    pub(crate) fn has_parked(&self) -> bool {
        self.calls
            .values()
            .any(|c| c.job.as_ref().is_some_and(|j| j.out.parked()))
    }

    /// Applies one command from a call.
    pub(crate) fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Open {
                id,
                system_prompt,
                link,
            } => match GazelleSession::with_capacity(
                self.engine.clone(),
                system_prompt.as_deref(),
                1,
            ) {
                Ok(session) => {
                    self.calls.insert(
                        id,
                        Call {
                            session,
                            job: None,
                            backlog: VecDeque::new(),
                            last_active: self.steps,
                            link,
                        },
                    );
                }
                Err(e) => tracing::warn!(error = %e, "could not open a model session"),
            },
            Command::Turn { id, turn } => self.turn(id, turn),
            Command::Commit { id } => {
                let Some(call) = self.calls.get_mut(&id) else {
                    return;
                };
                call.session.commit_turn();
                if let Some(job) = call.job.as_mut() {
                    job.out.tentative = false;
                }
                self.settle(id);
            }
            Command::Discard { id } => {
                let Some(call) = self.calls.get_mut(&id) else {
                    return;
                };
                if let Some(job) = call.job.take() {
                    end_phase(&mut call.session, job.phase);
                }
                if let Err(e) = call.session.discard_turn() {
                    tracing::warn!(error = %e, "could not take back a tentative turn");
                }
                self.settle(id);
            }
            Command::Truncate { id, spoken } => {
                let Some(call) = self.calls.get_mut(&id) else {
                    return;
                };
                match call.queue_if_busy(Backlogged::Truncate(spoken)) {
                    Offer::RunNow(Backlogged::Truncate(spoken)) => {
                        truncate(&mut call.session, &spoken)
                    }
                    Offer::Full(_) => {
                        tracing::warn!("too many queued model requests; a truncation is lost")
                    }
                    Offer::RunNow(Backlogged::Turn(_)) | Offer::Waits => {}
                }
            }
            Command::Close { id } => self.close(id),
        }
    }

    fn turn(&mut self, id: CallId, turn: TurnRequest) {
        let Some(call) = self.calls.get_mut(&id) else {
            let _ = turn.tokens.try_send(Err(SlmError::WorkerGone));
            return;
        };
        match call.queue_if_busy(Backlogged::Turn(turn)) {
            Offer::RunNow(Backlogged::Turn(turn)) => self.start_turn(id, turn),
            Offer::Full(Backlogged::Turn(turn)) => {
                let _ = turn.tokens.try_send(Err(SlmError::Backlog));
            }
            Offer::RunNow(Backlogged::Truncate(_))
            | Offer::Full(Backlogged::Truncate(_))
            | Offer::Waits => {}
        }
    }

    /// Puts a turn in the admission queue (or refuses it there with `model_busy`); the call has
    /// no reply in flight.
    fn start_turn(&mut self, id: CallId, turn: TurnRequest) {
        let waiting = self.count(Queue::Admission);
        let Some(call) = self.calls.get_mut(&id) else {
            let _ = turn.tokens.try_send(Err(SlmError::WorkerGone));
            return;
        };
        if waiting >= self.settings.max_waiting_turns {
            let _ = turn.tokens.try_send(Err(SlmError::Busy { waiting }));
            self.metric(|m| m.error(crate::metrics::ErrorKind::ModelBusy));
            return;
        }
        call.job = Some(Job::new(turn, &mut self.clock));
    }

    fn close(&mut self, id: CallId) {
        if let Some(mut call) = self.calls.remove(&id) {
            if let Some(job) = call.job.take() {
                end_phase(&mut call.session, job.phase);
            }
        }
    }

    /// Drops calls whose handles are gone without a `Close` (a full command queue at hang-up).
    pub(crate) fn sweep(&mut self) {
        let dead: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.link.strong_count() == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.close(id);
        }
    }

    /// One step: reap cancelled replies, deliver what parked calls can now take, admit turns,
    /// prefill one chunk's worth, run one batched decode.
    pub(crate) fn step(&mut self) -> StepReport {
        let started = Instant::now();
        self.steps += 1;
        self.reap();
        self.admit();
        let prefilled = self.prefill();
        let batch = self.decode();
        let report = StepReport { prefilled, batch };
        if prefilled > 0 || batch > 0 {
            self.metric(|m| {
                m.engine_step_seconds
                    .observe(started.elapsed().as_secs_f64());
                if batch > 0 {
                    m.engine_batch_size.observe(batch as f64);
                }
            });
        }
        self.publish_gauges();
        #[cfg(test)]
        self.check_invariants();
        report
    }

    /// Ends replies their calls no longer want, and retries delivery to parked calls.
    fn reap(&mut self) {
        let mut busy = Vec::new();
        for (&id, call) in self.calls.iter_mut() {
            let Some(job) = call.job.as_mut() else {
                continue;
            };
            if !job.abandoned() && !job.out.deliver() {
                job.cancel.cancel();
            }
            if job.abandoned() {
                if let Some(job) = call.job.take() {
                    end_phase(&mut call.session, job.phase);
                }
            }
            busy.push(id);
        }
        for id in busy {
            self.settle(id);
        }
    }

    /// Ends a finished job once its tokens are delivered, then starts what the call queued.
    fn settle(&mut self, id: CallId) {
        loop {
            let Some(call) = self.calls.get_mut(&id) else {
                return;
            };
            if let Some(job) = &call.job {
                if !job.delivered() || job.out.tentative {
                    return;
                }
                // Dropping the sender ends the call's token stream.
                call.job = None;
            }
            match call.backlog.pop_front() {
                None => return,
                Some(Backlogged::Truncate(spoken)) => truncate(&mut call.session, &spoken),
                // Not `turn()`: with more still queued it would go to the back, behind them.
                Some(Backlogged::Turn(turn)) => self.start_turn(id, turn),
            }
        }
    }

    fn metric(&self, f: impl FnOnce(&Metrics)) {
        if let Some(m) = &self.metrics {
            f(m);
        }
    }

    fn publish_gauges(&self) {
        let Some(m) = &self.metrics else { return };
        let (used, _) = self.usage(None);
        m.engine_kv_used_positions.set(used as i64);
        m.engine_kv_used_bytes.set(self.pool.bytes(used) as i64);
        let parked = self
            .calls
            .values()
            .filter(|c| c.job.as_ref().is_some_and(|j| j.out.parked()))
            .count();
        m.engine_parked.set(parked as i64);
        m.engine_waiting_turns
            .set(self.count(Queue::Admission) as i64);
        m.engine_running.set(self.count(Queue::Decode) as i64);
    }

    /// The calls whose job is in `queue`, in the order they entered it.
    fn queue(&self, queue: Queue) -> Vec<CallId> {
        let mut q: Vec<(u64, CallId)> = self
            .calls
            .iter()
            .filter(|(_, c)| c.queue() == Some(queue))
            .map(|(&id, c)| (c.job.as_ref().map_or(0, |j| j.entered), id))
            .collect();
        q.sort_unstable();
        q.into_iter().map(|(_, id)| id).collect()
    }

    /// The first call in `queue`.
    fn head(&self, queue: Queue) -> Option<CallId> {
        self.calls
            .iter()
            .filter(|(_, c)| c.queue() == Some(queue))
            .min_by_key(|(_, c)| c.job.as_ref().map_or(0, |j| j.entered))
            .map(|(&id, _)| id)
    }

    fn count(&self, queue: Queue) -> usize {
        self.calls
            .values()
            .filter(|c| c.queue() == Some(queue))
            .count()
    }

    /// What must hold between steps; checked after every step in tests.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut entered = std::collections::HashSet::new();
        for (id, c) in &self.calls {
            assert!(
                c.backlog.is_empty() || c.job.is_some(),
                "call {id}: requests wait behind no reply"
            );
            let Some(j) = &c.job else { continue };
            assert!(entered.insert(j.entered), "two jobs share a place");
            assert!(j.entered <= self.clock);
            use call::Phase;
            match &j.phase {
                Phase::Decoding { feed, .. } => {
                    assert!(feed.is_some(), "call {id}: decoding with nothing to feed")
                }
                Phase::Done => assert!(
                    !j.out.undelivered.is_empty() || j.out.tentative,
                    "call {id}: a finished job that nothing holds"
                ),
                Phase::Waiting(_) | Phase::Planned(_) | Phase::Prefilling(_) => {}
            }
        }
        let (used, _) = self.usage(None);
        assert!(
            used <= self.pool.budget(),
            "{used} positions allocated of a pool of {}",
            self.pool.budget()
        );
    }

    /// Positions in a call's cache.
    pub(crate) fn positions_of(&self, id: CallId) -> Option<usize> {
        self.calls.get(&id).map(|c| c.session.cached())
    }

    /// Positions allocated by all calls (for tests).
    #[cfg(test)]
    pub(crate) fn kv_used(&self) -> usize {
        self.usage(None).0
    }

    #[cfg(test)]
    pub(crate) fn session(&self, id: CallId) -> Option<&GazelleSession> {
        self.calls.get(&id).map(|c| &c.session)
    }
}
