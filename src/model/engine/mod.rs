//! The Gazelle engine: one scheduler thread that owns the weights and every call's model state,
//! and serves all calls at once by continuous batching. Calls reach it only through the
//! pipeline's seam ([`SpeechLanguageModel`] / [`SlmSession`]); each call's handle sends typed
//! commands over one bounded channel and receives its tokens over its own bounded channel.
//!
//! # Scheduling policy
//!
//! Each step of the scheduler thread does, in order:
//!
//! 1. **Reap.** Replies whose call cancelled them (barge-in) or hung up leave now: a reply keeps
//!    the tokens already fed, a prefill is cut back to what reached the cache (see
//!    [`GazelleSession::abort_prefill`](crate::model::gazelle::GazelleSession)). Calls whose token
//!    channel had filled get what now fits.
//! 2. **Admit** waiting turns, first come first served, as many as this step's prefill budget
//!    can start on: run the audio encoder and projector, plan
//!    the prefill against the call's cache, and grant the turn its KV memory (prompt plus a whole
//!    reply) from the pool. If the pool is short, idle calls' caches are evicted, longest idle
//!    first (their next turn recomputes them; nothing said is lost). If it is still short, the
//!    turn waits at the head of the queue until running replies end. At most
//!    `max_waiting_turns` turns wait; a turn beyond that gets `model_busy` at once.
//! 3. **Prefill** admitted turns, oldest first, up to `prefill_chunk` positions in all. A turn
//!    whose prefill completes samples its first token in the same step.
//! 4. **Decode** one token for every generating sequence that is not parked, in one batched
//!    forward pass (at most `max_batch` rows; beyond that, rows take turns).
//!
//! So the classes come in this order: **a new turn's first token first** (prefill runs before
//! the step's decode, and a turn's first token is sampled as soon as its prefill ends), because
//! the time to the first token is the product's metric; then **decode fairness** (every running
//! sequence advances one token per step); and **first come first served** within each class.
//! A long prefill delays the running replies by at most one chunk per step.
//!
//! Tokens are handed over with `try_send` only. A call whose channel is full is **parked**: it
//! leaves the batch until the call takes its tokens, while the others go on.
//!
//! A **tentative** turn ([`SlmSession::begin_tentative`]) runs and streams like any other (the
//! call keeps its reply from the user), but it stays open until the call decides: a commit makes
//! it final, and a discard ends the reply and restores the call's state exactly as before the
//! turn. An ordinary turn takes no snapshot and pays nothing for this.
//!
//! The same code runs on the CPU and on CUDA; only the tensors' device differs.

pub mod bench;
mod pool;
pub(crate) mod scheduler;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::pool::KvPool;
use self::scheduler::{CallId, Command, Scheduler, TurnRequest};
use super::gazelle::{GenerationParams, LoadedGazelle};
use super::{SlmError, SlmSession, SpeechLanguageModel, TokenStream, UserTurn, TOKEN_QUEUE};
use crate::metrics::Metrics;

/// Commands from all calls waiting for the scheduler thread. A call sends a handful per turn, so
/// this fills only under a flood; then new sessions and turns get `model_busy`.
const COMMAND_QUEUE: usize = 4096;

/// How long the thread waits for commands while parked calls drain their channels.
const PARKED_POLL: Duration = Duration::from_millis(2);

/// How often an idle engine looks for calls that vanished without closing.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How much KV memory all calls together may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum KvBudget {
    /// A share of the device's free memory once the weights are loaded (see
    /// [`crate::model::device::free_memory`]).
    Auto,
    Bytes(u64),
    Positions(usize),
}

/// Share of free device memory the automatic KV budget takes.
const AUTO_SHARE_CUDA: f64 = 0.85;
const AUTO_SHARE_CPU: f64 = 0.5;

/// How the engine schedules.
#[derive(Debug, Clone)]
pub(crate) struct EngineSettings {
    pub params: GenerationParams,
    /// Prefill positions per step, over all new turns (the step's token budget for prefill).
    pub prefill_chunk: usize,
    /// Most sequences in one decode step.
    pub max_batch: usize,
    pub kv_budget: KvBudget,
    /// Turns that may wait for admission before new ones get `model_busy`.
    pub max_waiting_turns: usize,
}

/// The pool for `budget` on the engine's device.
pub(crate) fn pool_for(engine: &LoadedGazelle, budget: KvBudget) -> KvPool {
    let per = engine.kv_bytes_per_position().max(1);
    let positions = match budget {
        KvBudget::Positions(p) => p,
        KvBudget::Bytes(b) => (b / per as u64) as usize,
        KvBudget::Auto => {
            let dev = engine.model.device();
            let share = if dev.is_cpu() {
                AUTO_SHARE_CPU
            } else {
                AUTO_SHARE_CUDA
            };
            match crate::model::device::free_memory(dev) {
                Some(free) => ((free as f64 * share) as u64 / per as u64) as usize,
                None => {
                    tracing::warn!("free device memory unknown; KV budget: 64 full contexts");
                    64 * engine.max_positions()
                }
            }
        }
    };
    let pool = KvPool::new(positions, per);
    tracing::info!(
        positions = pool.budget(),
        mib = pool.bytes(pool.budget()) / (1 << 20),
        full_contexts = pool.budget() / engine.max_positions().max(1),
        "KV memory pool"
    );
    pool
}

/// Gazelle behind the pipeline's seam, served by the engine thread.
pub(crate) struct Engine {
    commands: SyncSender<Command>,
    next_id: AtomicU64,
}

impl Engine {
    /// Starts the scheduler thread.
    pub(crate) fn start(
        engine: Arc<LoadedGazelle>,
        settings: EngineSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let pool = pool_for(&engine, settings.kv_budget);
        let (commands, rx) = std_mpsc::sync_channel(COMMAND_QUEUE);
        let scheduler = Scheduler::new(engine, settings, pool, metrics);
        std::thread::Builder::new()
            .name("model-engine".into())
            .spawn(move || run(scheduler, rx))
            .expect("spawn the model engine");
        Engine {
            commands,
            next_id: AtomicU64::new(1),
        }
    }
}

impl SpeechLanguageModel for Engine {
    fn name(&self) -> &str {
        "gazelle"
    }

    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let link = Arc::new(());
        let cmd = Command::Open {
            id,
            system_prompt: system_prompt.map(str::to_string),
            link: Arc::downgrade(&link),
        };
        match self.commands.try_send(cmd) {
            Ok(()) => Ok(Box::new(EngineCall {
                id,
                commands: self.commands.clone(),
                _link: link,
            })),
            Err(TrySendError::Full(_)) => Err(SlmError::Busy {
                waiting: COMMAND_QUEUE,
            }),
            Err(TrySendError::Disconnected(_)) => Err(SlmError::WorkerGone),
        }
    }
}

/// A call's handle on its state in the engine.
struct EngineCall {
    id: CallId,
    commands: SyncSender<Command>,
    /// The engine holds the weak side: when this handle goes, so does the call's state.
    _link: Arc<()>,
}

impl EngineCall {
    fn start(&mut self, turn: UserTurn, cancel: CancellationToken, tentative: bool) -> TokenStream {
        let (tokens, rx) = mpsc::channel(TOKEN_QUEUE);
        let request = TurnRequest {
            audio: turn.audio,
            tokens: tokens.clone(),
            cancel,
            tentative,
            at: Instant::now(),
        };
        let error = match self.commands.try_send(Command::Turn {
            id: self.id,
            turn: request,
        }) {
            Ok(()) => return rx,
            Err(TrySendError::Full(_)) => SlmError::Busy {
                waiting: COMMAND_QUEUE,
            },
            Err(TrySendError::Disconnected(_)) => SlmError::WorkerGone,
        };
        let _ = tokens.try_send(Err(error));
        rx
    }

    fn control(&self, cmd: Command, what: &str) {
        if self.commands.try_send(cmd).is_err() {
            tracing::warn!("the model engine is flooded or gone; a {what} was dropped");
        }
    }
}

impl SlmSession for EngineCall {
    fn respond(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel, false)
    }

    fn begin_tentative(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel, true)
    }

    fn commit(&mut self) {
        self.control(Command::Commit { id: self.id }, "commit");
    }

    fn discard(&mut self) {
        self.control(Command::Discard { id: self.id }, "discard");
    }

    fn reply_truncated(&mut self, spoken: &str) {
        let cmd = Command::Truncate {
            id: self.id,
            spoken: spoken.to_string(),
        };
        self.control(cmd, "reply truncation");
    }
}

impl Drop for EngineCall {
    fn drop(&mut self) {
        // If the queue is full, the engine's sweep notices the dropped link instead.
        let _ = self.commands.try_send(Command::Close { id: self.id });
    }
}

/// The scheduler thread: apply commands, step while there is work, sleep when there is none.
fn run(mut s: Scheduler, rx: std_mpsc::Receiver<Command>) {
    let mut swept = Instant::now();
    loop {
        let first = if s.has_work() {
            rx.try_recv().map_err(|e| match e {
                TryRecvError::Empty => RecvTimeoutError::Timeout,
                TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else if s.has_parked() {
            rx.recv_timeout(PARKED_POLL)
        } else {
            rx.recv_timeout(SWEEP_EVERY)
        };
        match first {
            Ok(cmd) => s.command(cmd),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(cmd) = rx.try_recv() {
            s.command(cmd);
        }
        s.step();
        if swept.elapsed() >= SWEEP_EVERY {
            s.sweep();
            swept = Instant::now();
        }
    }
}
