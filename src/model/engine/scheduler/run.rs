//! The model's work in a step: prefill chunks, the first token of a finished prefill, one
//! batched decode, and ending replies (finished or failed).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::call::{end_phase, Call, Job, Phase, Queue};
use super::{CallId, Scheduler};
use crate::model::gazelle::generation::Next;
use crate::model::gazelle::session::SessionError;
use crate::model::SlmError;

impl Scheduler {
    /// Runs prefill chunks under the step's budget, oldest turn first; a turn whose prefill
    /// completes gets its first token at once.
    pub(super) fn prefill(&mut self) -> usize {
        let mut budget = self.settings.prefill_chunk.max(1);
        let mut done = 0;
        let metrics = self.metrics.clone();
        while budget > 0 {
            let Some(id) = self.head(Queue::Prefill) else {
                break;
            };
            let call = self.calls.get_mut(&id).expect("the queue is made of calls");
            call.last_active = self.steps;
            let Some(job) = call.job.as_mut() else {
                unreachable!("queued calls have a job")
            };
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
                self.start_reply(id);
            }
        }
        done
    }

    /// The turn is in the cache: sample its first token and join the decode batch.
    fn start_reply(&mut self, id: CallId) {
        let call = self.calls.get_mut(&id).expect("prefilled just now");
        let job = call.job.as_mut().expect("prefilled just now");
        let started = call
            .session
            .begin_reply(&self.settings.params)
            .and_then(|(r, l)| Ok((r, l.to_vec1::<f32>()?)));
        let (reply, logits) = match started {
            Ok(x) => x,
            Err(e) => {
                job.enter(Phase::Done, &mut self.clock);
                self.fail(id, e);
                return;
            }
        };
        let decoding = Phase::Decoding {
            reply: Box::new(reply),
            feed: None,
        };
        job.enter(decoding, &mut self.clock);
        self.advance(id, &logits);
    }

    /// Samples the next token of `id`'s reply from `logits`, hands it on, and decides whether it
    /// goes through the next decode step.
    fn advance(&mut self, id: CallId, logits: &[f32]) {
        #[cfg(test)]
        self.trace.entry(id).or_default().push(logits.to_vec());
        let engine = self.engine.clone();
        let call = self.calls.get_mut(&id).expect("decoding calls exist");
        let Some(Job {
            phase: Phase::Decoding { reply, feed },
            out,
            cancel,
            first_token,
            asked_at,
            ..
        }) = call.job.as_mut()
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
        let call = self.calls.get_mut(&id).expect("decoding calls exist");
        call.last_active = self.steps;
        let job = call.job.as_mut().expect("decoding calls have a job");
        if let Phase::Decoding { reply, .. } = job.enter(Phase::Done, &mut self.clock) {
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
    pub(super) fn decode(&mut self) -> usize {
        let ready: Vec<CallId> = self
            .queue(Queue::Decode)
            .into_iter()
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
        let mut rows: Vec<(CallId, u32, &mut Call)> = self
            .calls
            .iter_mut()
            .filter(|(id, _)| chosen.contains(id))
            .filter_map(|(&id, c)| match c.job.as_ref()?.phase {
                Phase::Decoding { feed: Some(t), .. } => Some((id, t, c)),
                _ => None,
            })
            .collect();
        let tokens: Vec<u32> = rows.iter().map(|(_, t, _)| *t).collect();
        let out = {
            let mut caches: Vec<_> = rows
                .iter_mut()
                .map(|(_, _, c)| c.session.cache_mut())
                .collect();
            self.engine
                .model
                .language_model()
                .decode_batch(&tokens, &mut caches)
                .and_then(|l| l.to_vec2::<f32>())
        };
        let ids: Vec<CallId> = rows.iter().map(|(id, _, _)| *id).collect();
        for (_, _, c) in rows.iter_mut() {
            c.last_active = self.steps;
        }
        drop(rows);
        let batch = ids.len();
        match out {
            Ok(logits) => {
                for ((id, row), tok) in ids.into_iter().zip(logits).zip(tokens) {
                    if let Some(Job {
                        phase: Phase::Decoding { reply, .. },
                        ..
                    }) = self.calls.get_mut(&id).and_then(|c| c.job.as_mut())
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
    pub(super) fn fail(&mut self, id: CallId, e: SessionError) {
        tracing::warn!(error = %e, "Gazelle failed on a turn");
        self.fail_with(id, SlmError::Generation(Arc::new(e)));
    }

    pub(super) fn fail_with(&mut self, id: CallId, e: SlmError) {
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let Some(mut job) = call.job.take() else {
            return;
        };
        let tentative = job.out.tentative;
        end_phase(&mut call.session, job.enter(Phase::Done, &mut self.clock));
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
}
