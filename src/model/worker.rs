//! The Gazelle speech-language model behind the pipeline's traits. One inference thread (the
//! worker) runs every call's model work in turn; the weights (`Arc<GazelleEngine>`) are shared and
//! immutable, and each call's decoder state (its `GazelleSession`: KV cache and token history)
//! belongs to that call. A call's session lives in a small per-call task that lends it to the
//! worker for one job at a time, so a reply, a truncation after barge-in and the next reply run
//! in order. Batching across calls can later replace the worker's loop without changing this API.

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::gazelle::session::SessionError;
use super::gazelle::{GazelleEngine, GazelleSession, GenerationParams, Spoken};
use super::{SlmError, SlmSession, SpeechLanguageModel, TokenStream, UserTurn, TOKEN_QUEUE};

/// Jobs waiting for the inference thread. Calls wait (their replies start later) beyond this.
const WORKER_QUEUE: usize = 256;
/// Jobs of one call waiting for their turn; a call makes one reply and at most one truncation
/// at a time, so this only fills if the caller misbehaves, and then the job is refused.
const CALL_QUEUE: usize = 8;

enum Work {
    Respond {
        audio: Arc<[f32]>,
        tokens: mpsc::Sender<Result<String, SlmError>>,
        cancel: CancellationToken,
    },
    Truncate {
        spoken: String,
    },
}

/// One job for the inference thread: a call's session, lent for the job and sent back.
struct Job {
    session: Option<GazelleSession>,
    system_prompt: Option<String>,
    work: Work,
    done: oneshot::Sender<Option<GazelleSession>>,
}

/// Gazelle as the pipeline's speech-language model.
pub(crate) struct GazelleModel {
    jobs: mpsc::Sender<Job>,
}

impl GazelleModel {
    /// Starts the inference thread.
    pub(crate) fn start(engine: Arc<GazelleEngine>, params: GenerationParams) -> Self {
        let (jobs, rx) = mpsc::channel(WORKER_QUEUE);
        std::thread::Builder::new()
            .name("model-worker".into())
            .spawn(move || run(engine, params, rx))
            .expect("spawn the model worker");
        GazelleModel { jobs }
    }
}

impl SpeechLanguageModel for GazelleModel {
    fn name(&self) -> &str {
        "gazelle"
    }

    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError> {
        let (tx, rx) = mpsc::channel(CALL_QUEUE);
        tokio::spawn(call_task(rx, self.jobs.clone()));
        Ok(Box::new(GazelleCall {
            jobs: tx,
            system_prompt: system_prompt.map(str::to_string),
        }))
    }
}

/// A call's handle on its model session.
struct GazelleCall {
    jobs: mpsc::Sender<(Work, Option<String>)>,
    /// The session opens under it on the call's first turn.
    system_prompt: Option<String>,
}

impl SlmSession for GazelleCall {
    fn respond(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        let (tokens, rx) = mpsc::channel(TOKEN_QUEUE);
        let work = Work::Respond {
            audio: turn.audio,
            tokens: tokens.clone(),
            cancel,
        };
        if self
            .jobs
            .try_send((work, self.system_prompt.clone()))
            .is_err()
        {
            let _ = tokens.try_send(Err(SlmError::Backlog));
        }
        rx
    }

    fn reply_truncated(&mut self, spoken: &str) {
        let work = Work::Truncate {
            spoken: spoken.to_string(),
        };
        if self.jobs.try_send((work, None)).is_err() {
            tracing::warn!("could not queue a reply truncation; the model keeps the whole reply");
        }
    }
}

/// Owns one call's session between jobs and lends it to the worker for each, in order. Ends
/// when the call drops its handle.
async fn call_task(mut rx: mpsc::Receiver<(Work, Option<String>)>, worker: mpsc::Sender<Job>) {
    let mut session: Option<GazelleSession> = None;
    while let Some((work, system_prompt)) = rx.recv().await {
        let fail = match &work {
            Work::Respond { tokens, .. } => Some(tokens.clone()),
            Work::Truncate { .. } => None,
        };
        let (done, back) = oneshot::channel();
        let job = Job {
            session: session.take(),
            system_prompt,
            work,
            done,
        };
        if worker.send(job).await.is_err() {
            if let Some(t) = fail {
                let _ = t.send(Err(SlmError::WorkerGone)).await;
            }
            return;
        }
        match back.await {
            Ok(s) => session = s,
            Err(_) => return,
        }
    }
}

fn run(engine: Arc<GazelleEngine>, params: GenerationParams, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        let mut session = job.session;
        match job.work {
            Work::Respond {
                audio,
                tokens,
                cancel,
            } => {
                if cancel.is_cancelled() {
                    let _ = job.done.send(session);
                    continue;
                }
                let result = respond(
                    &engine,
                    &params,
                    &mut session,
                    &job.system_prompt,
                    &audio,
                    &tokens,
                    &cancel,
                );
                if let Err(e) = result {
                    tracing::warn!(error = %e, "Gazelle failed on a turn");
                    let _ = tokens.blocking_send(Err(SlmError::Generation(Arc::new(e))));
                }
            }
            Work::Truncate { spoken } => {
                if let Some(s) = session.as_mut() {
                    if let Err(e) = s.truncate_reply_to(Spoken::Text(&spoken)) {
                        tracing::warn!(error = %e, "could not cut the reply back to what was heard");
                    }
                }
            }
        }
        // A call that hung up no longer wants its session back.
        let _ = job.done.send(session);
    }
}

fn respond(
    engine: &Arc<GazelleEngine>,
    params: &GenerationParams,
    session: &mut Option<GazelleSession>,
    system_prompt: &Option<String>,
    audio: &[f32],
    tokens: &mpsc::Sender<Result<String, SlmError>>,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let s = match session {
        Some(s) => s,
        None => session.insert(engine.open_session(system_prompt.as_deref())?),
    };
    let stats = s.append_user_audio_turn(audio, "")?;
    tracing::debug!(
        audio_tokens = stats.audio_tokens,
        encoder_ms = stats.encoder_ms,
        prefill_ms = stats.prefill_ms,
        "user turn in the cache"
    );
    let reply = s.generate(params, |_, piece| {
        if cancel.is_cancelled() {
            return ControlFlow::Break(());
        }
        if !piece.is_empty() && tokens.blocking_send(Ok(piece.to_string())).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    tracing::debug!(
        tokens = reply.tokens.len(),
        stop = ?reply.stop,
        decode_tokens_per_s = reply.decode_tokens_per_s,
        "reply generated"
    );
    Ok(())
}
