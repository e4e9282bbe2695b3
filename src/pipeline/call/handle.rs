//! The transport's side of a call: a [`CallHandle`] that feeds it audio (held to real time and to
//! the call's budget of samples in flight) and commands, and ends the call when dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::DropGuard;

use super::CallError;
use crate::metrics::Metrics;
use crate::pipeline::conversation::Conversation;
use crate::pipeline::limits::{InputBudget, RealtimeGate};
use crate::pipeline::listen::AudioIn;

#[derive(Debug)]
pub(crate) enum CallCommand {
    History(oneshot::Sender<Conversation>),
    /// The client has played unit `unit` of reply `reply` to its end (`within` is `None`), or
    /// its first `within` samples.
    Played {
        reply: u64,
        unit: usize,
        within: Option<u64>,
    },
    /// The server is going down: cut what is playing, say this, and end the call.
    Goodbye(String),
}

/// The transport's side of a call. Dropping it ends the call and every task in it.
pub(crate) struct CallHandle {
    /// The call's id in the registry.
    pub id: String,
    pub(super) audio: mpsc::Sender<AudioIn>,
    pub(super) commands: mpsc::Sender<CallCommand>,
    pub(super) input_rate: u32,
    pub(super) budget: InputBudget,
    pub(super) pace: RealtimeGate,
    pub(super) metrics: Arc<Metrics>,
    pub(super) _guard: DropGuard,
}

impl CallHandle {
    /// Caller audio at the input rate, mono f32. A chunk longer than the call's input budget is
    /// refused; otherwise this waits while audio runs ahead of real time by more than the burst
    /// allowance, and while the budget of samples in flight is spent, which pushes back on the
    /// socket instead of buffering.
    pub(crate) async fn audio(&mut self, samples: Vec<f32>) -> Result<(), CallError> {
        self.budget.check(samples.len())?;
        let secs = samples.len() as f64 / self.input_rate as f64;
        let wait = self.pace.admit(
            Duration::from_secs_f64(secs),
            tokio::time::Instant::now().into_std(),
        );
        if !wait.is_zero() {
            self.metrics
                .input_throttled_seconds
                .inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
        let permit = self.budget.acquire(samples.len()).await;
        self.audio
            .send((samples, permit))
            .await
            .map_err(|_| CallError::Ended)
    }

    pub(crate) async fn history(&self) -> Result<Conversation, CallError> {
        history(&self.commands).await
    }

    /// Reports how far the client has played (for `playback_acks` calls): unit `unit` to its
    /// end, or its first `within` samples.
    pub(crate) async fn played(
        &self,
        reply: u64,
        unit: usize,
        within: Option<u64>,
    ) -> Result<(), CallError> {
        let cmd = CallCommand::Played {
            reply,
            unit,
            within,
        };
        self.commands.send(cmd).await.map_err(|_| CallError::Ended)
    }
}

/// Asks a call for its conversation so far.
pub(crate) async fn history(
    commands: &mpsc::Sender<CallCommand>,
) -> Result<Conversation, CallError> {
    let (tx, rx) = oneshot::channel();
    let sent = commands.send(CallCommand::History(tx)).await;
    sent.map_err(|_| CallError::Ended)?;
    rx.await.map_err(|_| CallError::Ended)
}

/// Asks the call to say `text` and hang up (the end of a server drain); nothing if it has ended.
pub(crate) async fn goodbye(commands: &mpsc::Sender<CallCommand>, text: String) {
    let _ = commands.send(CallCommand::Goodbye(text)).await;
}
