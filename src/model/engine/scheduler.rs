//! The engine's scheduler: every call's model state, the queues of turns, and one step of work
//! (admit, prefill a chunk, decode a batch, deliver tokens). It is plain synchronous code, driven
//! by the engine thread in production and step by step in tests; the policy it follows is
//! written in the module doc of `engine`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pool::{Ask, Grant, KvPool};
use super::EngineSettings;
use crate::metrics::Metrics;
use crate::model::gazelle::generation::Next;
use crate::model::gazelle::session::{ActiveReply, Prefill, SessionError};
use crate::model::gazelle::{GazelleEngine, GazelleSession, Spoken};
use crate::model::SlmError;

/// Identifies one call's session inside the engine.
pub(crate) type CallId = u64;

type TokenSender = mpsc::Sender<Result<String, SlmError>>;

/// Replies and truncations of one call waiting behind its current reply; a call makes one of
/// each at a time, so this only fills if the caller misbehaves, and then the turn is refused.
const CALL_BACKLOG: usize = 8;

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

enum Phase {
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

struct Job {
    phase: Phase,
    out: Outbox,
    cancel: CancellationToken,
    asked_at: Instant,
    first_prefill_at: Option<Instant>,
    first_token: bool,
}

impl Job {
    /// The call no longer wants this reply.
    fn abandoned(&self) -> bool {
        self.cancel.is_cancelled() || self.out.tokens.is_closed()
    }

    /// It has a token for the next decode step and its call is keeping up.
    fn ready_to_decode(&self) -> bool {
        !self.out.parked() && matches!(self.phase, Phase::Decoding { feed: Some(_), .. })
    }
}

/// A reply's way to its call.
struct Outbox {
    tokens: TokenSender,
    /// The turn is tentative: its tokens stream (the call holds them back from the user), but
    /// the job stays until the call commits or discards it.
    tentative: bool,
    /// Pieces the call has not taken yet (waiting for room in its channel).
    undelivered: VecDeque<Result<String, SlmError>>,
}

impl Outbox {
    /// Waiting for its call to take tokens before it may go on.
    fn parked(&self) -> bool {
        !self.undelivered.is_empty()
    }

    /// Hands over what the channel has room for, never waiting. False if the call is gone.
    fn deliver(&mut self) -> bool {
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

enum Backlogged {
    Turn(TurnRequest),
    Truncate(String),
}

struct Call {
    session: GazelleSession,
    job: Option<Job>,
    backlog: VecDeque<Backlogged>,
    /// Step of the last work, for evicting the longest-idle cache first.
    last_active: u64,
    link: Weak<()>,
}

/// What became of a request offered to a call's backlog.
enum Offer {
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
    fn queue_if_busy(&mut self, item: Backlogged) -> Offer {
        if self.job.is_none() && self.backlog.is_empty() {
            Offer::RunNow(item)
        } else if self.backlog.len() >= CALL_BACKLOG {
            Offer::Full(item)
        } else {
            self.backlog.push_back(item);
            Offer::Waits
        }
    }
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
    engine: Arc<GazelleEngine>,
    settings: EngineSettings,
    pool: KvPool,
    calls: HashMap<CallId, Call>,
    /// Turns waiting to be encoded and granted memory, first come first served.
    admission: VecDeque<CallId>,
    /// Turns being prefilled, in the order they were admitted.
    prefilling: VecDeque<CallId>,
    /// Calls generating, in the order they started.
    decoding: Vec<CallId>,
    /// Where the next decode batch starts in `decoding` when not all fit in one.
    rotate: usize,
    steps: u64,
    metrics: Option<Arc<Metrics>>,
    /// Every logits row each call sampled from, for the equivalence tests.
    #[cfg(test)]
    pub(crate) trace: HashMap<CallId, Vec<Vec<f32>>>,
}

impl Scheduler {
    pub(crate) fn new(
        engine: Arc<GazelleEngine>,
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
            admission: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            rotate: 0,
            steps: 0,
            metrics,
            #[cfg(test)]
            trace: HashMap::new(),
        }
    }

    /// Whether a step would do anything now (other than wait for parked calls to drain).
    pub(crate) fn has_work(&self) -> bool {
        !self.prefilling.is_empty()
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

    /// Whether the first turn in the admission queue can be admitted now.
    fn head_admissible(&self) -> bool {
        let Some(call) = self.admission.front().and_then(|id| self.calls.get(id)) else {
            return false;
        };
        match call.job.as_ref().map(|j| &j.phase) {
            Some(Phase::Planned(p)) => {
                let (used, idle) = self.usage(Some(self.admission[0]));
                let ask = self.ask(call, p);
                self.pool.grant(ask, used, idle) != Grant::Wait
            }
            _ => true,
        }
    }

    /// What a planned turn asks of the pool: its prompt after prefill plus a whole reply.
    fn ask(&self, call: &Call, p: &Prefill) -> Ask {
        let s = p.stats();
        let after_prefill = s.reused_positions + s.prefill_positions;
        Ask {
            held: call.session.allocated(),
            needs: (after_prefill + self.settings.params.max_new_tokens + 1)
                .min(call.session.max_positions()),
        }
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
                if let Some(mut job) = call.job.take() {
                    job.out.undelivered.clear();
                    end_phase(&mut call.session, job.phase);
                }
                if let Err(e) = call.session.discard_turn() {
                    tracing::warn!(error = %e, "could not take back a tentative turn");
                }
                self.forget_queued(id);
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
        let waiting = self.admission.len();
        let Some(call) = self.calls.get_mut(&id) else {
            let _ = turn.tokens.try_send(Err(SlmError::WorkerGone));
            return;
        };
        if waiting >= self.settings.max_waiting_turns {
            let _ = turn.tokens.try_send(Err(SlmError::Busy { waiting }));
            self.metric(|m| m.error(crate::metrics::ErrorKind::ModelBusy));
            return;
        }
        call.job = Some(Job {
            phase: Phase::Waiting(turn.audio),
            out: Outbox {
                tokens: turn.tokens,
                tentative: turn.tentative,
                undelivered: VecDeque::new(),
            },
            cancel: turn.cancel,
            asked_at: turn.at,
            first_prefill_at: None,
            first_token: false,
        });
        self.admission.push_back(id);
    }

    fn close(&mut self, id: CallId) {
        if let Some(mut call) = self.calls.remove(&id) {
            if let Some(job) = call.job.take() {
                end_phase(&mut call.session, job.phase);
            }
        }
        self.forget_queued(id);
    }

    fn forget_queued(&mut self, id: CallId) {
        self.admission.retain(|&c| c != id);
        self.prefilling.retain(|&c| c != id);
        self.decoding.retain(|&c| c != id);
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
        report
    }

    /// Ends replies their calls no longer want, and retries delivery to parked calls.
    fn reap(&mut self) {
        let ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.job.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let call = self.calls.get_mut(&id).expect("listed");
            let job = call.job.as_mut().expect("listed");
            if !job.abandoned() && !job.out.deliver() {
                job.cancel.cancel();
            }
            if job.abandoned() {
                let job = call.job.take().expect("listed");
                end_phase(&mut call.session, job.phase);
                self.forget_queued(id);
            }
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
                let finished = matches!(job.phase, Phase::Done) && job.out.undelivered.is_empty();
                if !finished || job.out.tentative {
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

    /// Encodes waiting turns and grants them memory, first come first served. Only as many are
    /// encoded as this step's prefill can start on, so a burst of turns does not run a burst of
    /// audio encoders ahead of everyone's decode.
    fn admit(&mut self) {
        while let Some(&id) = self.admission.front() {
            let queued: usize = self
                .prefilling
                .iter()
                .filter_map(|c| match self.calls.get(c)?.job.as_ref()?.phase {
                    Phase::Prefilling(ref p) => Some(p.remaining()),
                    _ => None,
                })
                .sum();
            if queued >= self.settings.prefill_chunk {
                return;
            }
            let Some(call) = self.calls.get_mut(&id) else {
                self.admission.pop_front();
                continue;
            };
            let job = call.job.as_mut().expect("a queued call has a job");
            if let Phase::Waiting(audio) = &job.phase {
                let audio = audio.clone();
                match call.session.begin_turn(&audio, "", job.out.tentative) {
                    Ok(p) => job.phase = Phase::Planned(p),
                    Err(e) => {
                        self.fail(id, e);
                        continue;
                    }
                }
            }
            let call = &self.calls[&id];
            let Some(Job {
                phase: Phase::Planned(p),
                ..
            }) = &call.job
            else {
                unreachable!("admission holds waiting and planned turns only")
            };
            let ask = self.ask(call, p);
            let (used, idle) = self.usage(Some(id));
            match self.pool.grant(ask, used, idle) {
                Grant::Yes => {}
                Grant::AfterEvicting(short) => self.evict(short, id),
                Grant::Wait => return,
                Grant::Never => {
                    let e = SlmError::Generation(Arc::new(PoolTooSmall {
                        needs: ask.needs,
                        budget: self.pool.budget(),
                    }));
                    self.fail_with(id, e);
                    continue;
                }
            }
            let call = self.calls.get_mut(&id).expect("still here");
            if let Err(e) = call.session.reserve_positions(ask.needs) {
                self.fail(id, e);
                continue;
            }
            let job = call.job.as_mut().expect("still here");
            let Phase::Planned(p) = std::mem::replace(&mut job.phase, Phase::Done) else {
                unreachable!()
            };
            job.phase = Phase::Prefilling(p);
            self.admission.pop_front();
            self.prefilling.push_back(id);
        }
    }

    /// Positions allocated by all calls, and those that may be evicted: held by calls between
    /// turns or whose turn still waits to be encoded (their next turn recomputes them), other
    /// than `keep`'s.
    fn usage(&self, keep: Option<CallId>) -> (usize, usize) {
        let mut used = 0;
        let mut idle = 0;
        for (&id, c) in &self.calls {
            used += c.session.allocated();
            if Some(id) != keep && evictable(c) {
                idle += c.session.allocated().saturating_sub(1);
            }
        }
        (used, idle)
    }

    /// Frees at least `positions` from idle calls' caches, longest idle first, sparing `keep`.
    fn evict(&mut self, positions: usize, keep: CallId) {
        let mut idle: Vec<(u64, CallId)> = self
            .calls
            .iter()
            .filter(|(&id, c)| id != keep && evictable(c) && c.session.allocated() > 1)
            .map(|(&id, c)| (c.last_active, id))
            .collect();
        idle.sort_unstable();
        let mut freed = 0;
        for (_, id) in idle {
            if freed >= positions {
                break;
            }
            let s = &mut self.calls.get_mut(&id).expect("listed").session;
            freed += s.allocated().saturating_sub(1);
            if let Err(e) = s.evict() {
                tracing::warn!(error = %e, "could not evict an idle cache");
            }
            self.metric(|m| m.engine_evictions.inc());
        }
        tracing::debug!(freed, "evicted idle KV caches");
    }

    /// Runs prefill chunks under the step's budget, oldest turn first; a turn whose prefill
    /// completes gets its first token at once.
    fn prefill(&mut self) -> usize {
        let mut budget = self.settings.prefill_chunk.max(1);
        let mut done = 0;
        let metrics = self.metrics.clone();
        while budget > 0 {
            let Some(&id) = self.prefilling.front() else {
                break;
            };
            let call = self.calls.get_mut(&id).expect("prefilling calls exist");
            call.last_active = self.steps;
            let job = call.job.as_mut().expect("prefilling calls have a job");
            let Phase::Prefilling(p) = &mut job.phase else {
                unreachable!("the prefill queue holds prefilling turns")
            };
            if job.first_prefill_at.is_none() {
                let now = Instant::now();
                job.first_prefill_at = Some(now);
                let wait = now.saturating_duration_since(job.asked_at).as_secs_f64();
                if let Some(m) = &metrics {
                    m.engine_queue_wait_seconds.observe(wait);
                }
            }
            let n = p.remaining().min(budget);
            let finished = match call.session.prefill(p, n) {
                Ok(f) => f,
                Err(e) => {
                    call.session.abort_prefill();
                    self.fail(id, e);
                    continue;
                }
            };
            budget = budget.saturating_sub(n.max(1));
            done += n;
            if finished {
                self.prefilling.pop_front();
                self.start_reply(id);
            }
        }
        done
    }

    /// The turn is in the cache: sample its first token and join the decode batch.
    fn start_reply(&mut self, id: CallId) {
        let call = self.calls.get_mut(&id).expect("exists");
        let job = call.job.as_mut().expect("has a job");
        let (reply, logits) = match call
            .session
            .begin_reply(&self.settings.params)
            .and_then(|(r, l)| Ok((r, l.to_vec1::<f32>()?)))
        {
            Ok(x) => x,
            Err(e) => {
                job.phase = Phase::Done;
                self.fail(id, e);
                return;
            }
        };
        job.phase = Phase::Decoding {
            reply: Box::new(reply),
            feed: None,
        };
        self.decoding.push(id);
        self.advance(id, &logits);
    }

    /// Samples the next token of `id`'s reply from `logits`, hands it on, and decides whether it
    /// goes through the next decode step.
    fn advance(&mut self, id: CallId, logits: &[f32]) {
        #[cfg(test)]
        self.trace.entry(id).or_default().push(logits.to_vec());
        let engine = self.engine.clone();
        let call = self.calls.get_mut(&id).expect("exists");
        let job = call.job.as_mut().expect("has a job");
        let Job {
            phase: Phase::Decoding { reply, feed },
            out,
            cancel,
            first_token,
            asked_at,
            ..
        } = job
        else {
            unreachable!("advancing a reply that is not decoding")
        };
        *feed = None;
        let next = reply
            .decoder
            .sample(logits, &reply.context, engine.stop_ids());
        if let Next::Token(tok) = next {
            match reply.piece(&engine, tok) {
                Ok(piece) => {
                    if !*first_token {
                        *first_token = true;
                        let ttft = asked_at.elapsed().as_secs_f64();
                        if let Some(m) = &self.metrics {
                            m.engine_first_token_seconds.observe(ttft);
                        }
                    }
                    if !piece.is_empty() {
                        out.undelivered.push_back(Ok(piece));
                    }
                    if !out.deliver() {
                        cancel.cancel();
                        reply.decoder.cancel();
                    } else if reply
                        .decoder
                        .wants_feed(call.session.cached(), call.session.max_positions())
                    {
                        *feed = Some(tok);
                    }
                }
                Err(e) => {
                    reply.decoder.cancel();
                    out.undelivered
                        .push_back(Err(SlmError::Generation(Arc::new(e))));
                }
            }
        }
        if feed.is_none() {
            self.finish(id);
        }
    }

    /// Generation of `id`'s reply has ended: the reply joins its conversation.
    fn finish(&mut self, id: CallId) {
        self.decoding.retain(|&c| c != id);
        let call = self.calls.get_mut(&id).expect("exists");
        call.last_active = self.steps;
        let job = call.job.as_mut().expect("has a job");
        if let Phase::Decoding { reply, .. } = std::mem::replace(&mut job.phase, Phase::Done) {
            if let Err(e) = call.session.finish_reply(*reply) {
                job.out
                    .undelivered
                    .push_back(Err(SlmError::Generation(Arc::new(e))));
            }
        }
        if !job.out.deliver() {
            job.cancel.cancel();
        }
        self.settle(id);
    }

    /// One batched decode step over the generating calls that are not parked.
    fn decode(&mut self) -> usize {
        let ready: Vec<CallId> = self
            .decoding
            .iter()
            .copied()
            .filter(|id| {
                self.calls[id]
                    .job
                    .as_ref()
                    .is_some_and(Job::ready_to_decode)
            })
            .collect();
        if ready.is_empty() {
            return 0;
        }
        let max = self.settings.max_batch.max(1);
        let chosen: HashSet<CallId> = if ready.len() <= max {
            ready.iter().copied().collect()
        } else {
            // More sequences than fit: take turns, so every one advances equally often.
            let start = self.rotate % ready.len();
            self.rotate = start + max;
            ready
                .iter()
                .cycle()
                .skip(start)
                .take(max)
                .copied()
                .collect()
        };
        let mut rows: Vec<(CallId, &mut Call)> = self
            .calls
            .iter_mut()
            .filter(|(id, _)| chosen.contains(id))
            .map(|(&id, c)| (id, c))
            .collect();
        let tokens: Vec<u32> = rows
            .iter()
            .map(|(_, c)| match &c.job.as_ref().expect("chosen").phase {
                Phase::Decoding { feed: Some(t), .. } => *t,
                _ => unreachable!("chosen rows have a token to feed"),
            })
            .collect();
        let out = {
            let mut caches: Vec<_> = rows
                .iter_mut()
                .map(|(_, c)| c.session.cache_mut())
                .collect();
            self.engine
                .model
                .language_model()
                .decode_batch(&tokens, &mut caches)
                .and_then(|l| l.to_vec2::<f32>())
        };
        let ids: Vec<CallId> = rows.iter().map(|(id, _)| *id).collect();
        for (_, c) in rows.iter_mut() {
            c.last_active = self.steps;
        }
        drop(rows);
        let batch = ids.len();
        match out {
            Ok(logits) => {
                for ((id, row), tok) in ids.into_iter().zip(logits).zip(tokens) {
                    let call = self.calls.get_mut(&id).expect("exists");
                    if let Some(Job {
                        phase: Phase::Decoding { reply, .. },
                        ..
                    }) = call.job.as_mut()
                    {
                        reply.fed(tok);
                    }
                    self.advance(id, &row);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, batch, "a decode step failed");
                let e: crate::model::ModelError = Arc::new(SessionError::from(e));
                for id in ids {
                    self.fail_with(id, SlmError::Generation(e.clone()));
                }
            }
        }
        batch
    }

    /// Ends `id`'s reply with an error from the session.
    fn fail(&mut self, id: CallId, e: SessionError) {
        tracing::warn!(error = %e, "Gazelle failed on a turn");
        self.fail_with(id, SlmError::Generation(Arc::new(e)));
    }

    fn fail_with(&mut self, id: CallId, e: SlmError) {
        self.forget_queued(id);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let Some(mut job) = call.job.take() else {
            return;
        };
        let tentative = job.out.tentative;
        end_phase(
            &mut call.session,
            std::mem::replace(&mut job.phase, Phase::Done),
        );
        if tentative {
            // A tentative turn that failed is taken back whole.
            if let Err(e) = call.session.discard_turn() {
                tracing::warn!(error = %e, "could not take back a failed tentative turn");
            }
        }
        job.out.tentative = false;
        job.out.undelivered.push_back(Err(e));
        if !job.out.deliver() {
            job.out.undelivered.clear();
        }
        call.job = Some(job);
        self.settle(id);
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
        m.engine_waiting_turns.set(self.admission.len() as i64);
        m.engine_running.set(self.decoding.len() as i64);
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

/// A call whose cache may be freed for others: between turns, or with a turn not yet encoded.
fn evictable(c: &Call) -> bool {
    matches!(
        c.job.as_ref().map(|j| &j.phase),
        None | Some(Phase::Waiting(_))
    )
}

/// Stops a job's work part-way, leaving the session consistent.
fn end_phase(session: &mut GazelleSession, phase: Phase) {
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

fn truncate(session: &mut GazelleSession, spoken: &str) {
    if let Err(e) = session.truncate_reply_to(Spoken::Text(spoken)) {
        tracing::warn!(error = %e, "could not cut the reply back to what was heard");
    }
}

/// A turn that needs more KV memory than the whole pool.
#[derive(Debug, thiserror::Error)]
#[error(
    "this turn needs {needs} KV-cache positions, more than the whole pool of {budget} \
     (slm.gazelle.kv_budget_mb / kv_budget_positions); raise the budget or lower max_context"
)]
pub(crate) struct PoolTooSmall {
    needs: usize,
    budget: usize,
}
