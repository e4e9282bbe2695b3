//! The VAD worker: one thread that owns the Silero session and serves every call. Calls send their
//! state and frames over a bounded channel and get them back with the probabilities; whatever is
//! queued when the thread wakes runs as one batch, so load amortises instead of queueing.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::silero::{frame_len, SileroModel, SileroState, VadError};
use crate::metrics::Metrics;

/// Most streams in one inference. Beyond this the per-frame cost stops falling.
const MAX_BATCH: usize = 64;
/// Queued requests before senders wait: backpressure reaches the calls' audio inputs.
const QUEUE: usize = 1024;

struct Job {
    state: SileroState,
    /// A whole number of frames at the state's rate.
    frames: Vec<f32>,
    reply: oneshot::Sender<Result<(SileroState, Vec<f32>), VadError>>,
}

/// A cloneable handle to the VAD worker thread. The thread stops when the last handle drops.
#[derive(Clone)]
pub(crate) struct VadHandle {
    tx: mpsc::Sender<Job>,
}

impl VadHandle {
    pub(crate) fn spawn(model: SileroModel, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("vad-worker".into())
            .spawn(move || run(model, rx, metrics))
            .expect("spawn the VAD thread");
        VadHandle { tx }
    }

    /// Runs `frames` (a whole number of frames) through the model for one stream, in order.
    /// Returns the updated state and one probability per frame.
    pub(crate) async fn infer(
        &self,
        state: SileroState,
        frames: Vec<f32>,
    ) -> Result<(SileroState, Vec<f32>), VadError> {
        let flen = frame_len(state.rate());
        if !frames.len().is_multiple_of(flen) {
            return Err(VadError::Inference(format!(
                "{} samples is not a whole number of {flen}-sample frames",
                frames.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                state,
                frames,
                reply,
            })
            .await
            .map_err(|_| VadError::WorkerGone)?;
        rx.await.map_err(|_| VadError::WorkerGone)?
    }
}

/// Waits for a request, then takes whatever else is queued, up to `max` in `jobs` (emptied by
/// the caller after each batch). False once every sender is gone.
pub(crate) fn next_batch<T>(rx: &mut mpsc::Receiver<T>, jobs: &mut Vec<T>, max: usize) -> bool {
    let Some(first) = rx.blocking_recv() else {
        return false;
    };
    jobs.push(first);
    take_queued(rx, jobs, max);
    true
}

/// Adds to `jobs` what is already queued, until it holds `max`.
pub(crate) fn take_queued<T>(rx: &mut mpsc::Receiver<T>, jobs: &mut Vec<T>, max: usize) {
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
}

fn run(mut model: SileroModel, mut rx: mpsc::Receiver<Job>, metrics: Arc<Metrics>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut rx, &mut jobs, MAX_BATCH) {
        for rate in [16_000, 8_000] {
            let group: Vec<Job> = {
                let (g, rest): (Vec<Job>, Vec<Job>) =
                    jobs.drain(..).partition(|j| j.state.rate() == rate);
                jobs = rest;
                g
            };
            if !group.is_empty() {
                serve(&mut model, group, rate, &metrics);
            }
        }
    }
}

/// Steps every job in the group frame by frame; at step k the batch is every job with a k-th frame.
fn serve(model: &mut SileroModel, mut group: Vec<Job>, rate: u32, metrics: &Metrics) {
    let flen = frame_len(rate);
    // Longest first, so the jobs still active at any step are a prefix.
    group.sort_by_key(|j| std::cmp::Reverse(j.frames.len()));
    let steps = group.first().map_or(0, |j| j.frames.len() / flen);
    let mut probs: Vec<Vec<f32>> = group
        .iter()
        .map(|j| Vec::with_capacity(j.frames.len() / flen))
        .collect();
    let mut failed: Option<String> = None;
    for k in 0..steps {
        let n = group
            .iter()
            .take_while(|j| j.frames.len() / flen > k)
            .count();
        let (states, frames): (Vec<&mut SileroState>, Vec<&[f32]>) = group[..n]
            .iter_mut()
            .map(|j| (&mut j.state, &j.frames[k * flen..(k + 1) * flen]))
            .unzip();
        let mut states = states;
        let started = Instant::now();
        match model.infer(&mut states, &frames) {
            Ok(p) => {
                let per_frame = started.elapsed().as_secs_f64() / n as f64;
                metrics
                    .vad_frame_seconds
                    .with_label_values(&[batch_class(n)])
                    .observe(per_frame);
                for (dst, p) in probs.iter_mut().zip(p) {
                    dst.push(p);
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    for (job, p) in group.into_iter().zip(probs) {
        let result = match &failed {
            Some(e) => Err(VadError::Inference(e.clone())),
            None => Ok((job.state, p)),
        };
        // A call that hung up no longer waits for its answer; nothing to do then.
        let _ = job.reply.send(result);
    }
}

fn batch_class(n: usize) -> &'static str {
    match n {
        1 => "1",
        2..=4 => "2-4",
        5..=16 => "5-16",
        _ => "17+",
    }
}
