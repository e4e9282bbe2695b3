//! Admission: encoding waiting turns and granting them KV memory, first come first served,
//! evicting idle calls' caches when the pool is short.

use std::sync::Arc;

use super::call::{Call, Job, Phase, Queue};
use super::{CallId, Scheduler};
use crate::model::engine::pool::{Ask, Grant};
use crate::model::gazelle::session::Prefill;
use crate::model::SlmError;

impl Scheduler {
    /// Whether the first turn in the admission queue can be admitted now.
    pub(super) fn head_admissible(&self) -> bool {
        let Some(id) = self.head(Queue::Admission) else {
            return false;
        };
        let call = &self.calls[&id];
        match call.job.as_ref().map(|j| &j.phase) {
            Some(Phase::Planned(p)) => {
                let (used, idle) = self.usage(Some(id));
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

    /// Encodes waiting turns and grants them memory, first come first served. Only as many are
    /// encoded as this step's prefill can start on, so a burst of turns does not run a burst of
    /// audio encoders ahead of everyone's decode.
    pub(super) fn admit(&mut self) {
        while let Some(id) = self.head(Queue::Admission) {
            let queued: usize = self
                .calls
                .values()
                .filter_map(|c| match &c.job.as_ref()?.phase {
                    Phase::Prefilling(p) => Some(p.remaining()),
                    _ => None,
                })
                .sum();
            if queued >= self.settings.prefill_chunk {
                return;
            }
            let call = self.calls.get_mut(&id).expect("the queue is made of calls");
            let job = call.job.as_mut().expect("queued calls have a job");
            if let Phase::Waiting(audio) = &job.phase {
                let audio = audio.clone();
                match call.session.begin_turn(&audio, "", job.out.tentative) {
                    // Planned stays in the admission queue, in its place.
                    Ok(p) => {
                        job.enter(Phase::Planned(p), &mut self.clock);
                    }
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
                unreachable!("the admission queue holds waiting and planned turns only")
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
            let Phase::Planned(p) = job.enter(Phase::Done, &mut self.clock) else {
                unreachable!("planned above")
            };
            job.enter(Phase::Prefilling(p), &mut self.clock);
        }
    }

    /// Positions allocated by all calls, and those that may be evicted: held by calls between
    /// turns or whose turn still waits to be encoded (their next turn recomputes them), other
    /// than `keep`'s.
    pub(super) fn usage(&self, keep: Option<CallId>) -> (usize, usize) {
        let mut used = 0;
        let mut idle = 0;
        for (&id, c) in &self.calls {
            used += c.session.allocated();
            if Some(id) != keep && c.evictable() {
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
            .filter(|(&id, c)| id != keep && c.evictable() && c.session.allocated() > 1)
            .map(|(&id, c)| (c.last_active, id))
            .collect();
        idle.sort_unstable();
        let mut freed = 0;
        for (_, id) in idle {
            if freed >= positions {
                break;
            }
            let Some(call) = self.calls.get_mut(&id) else {
                continue;
            };
            freed += call.session.allocated().saturating_sub(1);
            if let Err(e) = call.session.evict() {
                tracing::warn!(error = %e, "could not evict an idle cache");
            }
            self.metric(|m| m.engine_evictions.inc());
        }
        tracing::debug!(freed, "evicted idle KV caches");
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
