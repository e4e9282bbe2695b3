//! The end-of-turn model: Smart Turn v3.2 (pipecat-ai, BSD-2) on ONNX Runtime. It hears the last
//! 8 s of the turn so far (left-padded with silence), normalised to zero mean and unit variance,
//! as Whisper log-mel features, and says how likely the speaker has finished. One thread owns the
//! session and serves every call; requests queued while it works run as one batch.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ort::environment::Environment;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::Tensor;
use tokio::sync::{mpsc, oneshot};

use super::VadError;
use crate::audio::mel::{LogMel, HOP, N_MELS, SAMPLE_RATE};
use crate::metrics::Metrics;

/// The model hears this much of the turn, the newest part.
pub const WINDOW_SAMPLES: usize = 8 * SAMPLE_RATE as usize;
const FRAMES: usize = WINDOW_SAMPLES / HOP;
/// Most turns in one inference.
const MAX_BATCH: usize = 16;
/// Queued requests before senders wait.
const QUEUE: usize = 256;

/// The model's input for one turn: `[N_MELS, 800]` features of its last 8 s.
pub(crate) fn features(mel: &LogMel, turn: &[f32]) -> Vec<f32> {
    let tail = &turn[turn.len().saturating_sub(WINDOW_SAMPLES)..];
    let mut x = vec![0f32; WINDOW_SAMPLES - tail.len()];
    x.extend_from_slice(tail);
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let scale = 1.0 / (var + 1e-7).sqrt();
    for v in &mut x {
        *v = ((*v as f64 - mean) * scale) as f32;
    }
    mel.compute(&x)
}

/// One ORT session of the model.
pub struct SmartTurnModel {
    session: Session,
    mel: LogMel,
}

impl SmartTurnModel {
    pub fn load(env: &Environment, model: &Path) -> Result<Self, VadError> {
        let err = |e: String| VadError::Model {
            what: "Smart Turn end-of-turn",
            path: model.display().to_string(),
            reason: e,
        };
        if !model.is_file() {
            return Err(err("no such file".into()));
        }
        let session = Session::builder(env)
            .map_err(|e| err(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| err(e.to_string()))?
            // One thread, as for the VAD: the other core serves the sockets and the model.
            .with_intra_threads(1)
            .map_err(|e| err(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| err(e.to_string()))?
            .commit_from_file(model)
            .map_err(|e| err(e.to_string()))?;
        Ok(SmartTurnModel {
            session,
            mel: LogMel::new(),
        })
    }

    /// The probability that each turn is complete.
    pub fn predict(&mut self, turns: &[&[f32]]) -> Result<Vec<f32>, VadError> {
        if turns.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::with_capacity(turns.len() * N_MELS * FRAMES);
        for t in turns {
            input.extend(features(&self.mel, t));
        }
        let input = Tensor::from_array(([turns.len(), N_MELS, FRAMES], input))
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs!["input_features" => input])
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let (_, probs) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| VadError::Inference(e.to_string()))?;
        if probs.len() != turns.len() {
            return Err(VadError::Inference(format!(
                "the end-of-turn model gave {} outputs for {} turns",
                probs.len(),
                turns.len()
            )));
        }
        Ok(probs.to_vec())
    }
}

struct Job {
    turn: Arc<[f32]>,
    reply: oneshot::Sender<Result<f32, VadError>>,
}

/// A cloneable handle to the end-of-turn thread. The thread stops when the last handle drops.
#[derive(Clone)]
pub(crate) struct SmartTurnHandle {
    tx: mpsc::Sender<Job>,
}

impl SmartTurnHandle {
    pub(crate) fn spawn(model: SmartTurnModel, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("end-of-turn".into())
            .spawn(move || run(model, rx, metrics))
            .expect("spawn the end-of-turn thread");
        SmartTurnHandle { tx }
    }

    /// The probability that `turn` (16 kHz, the turn so far) is complete.
    pub(crate) async fn predict(&self, turn: Arc<[f32]>) -> Result<f32, VadError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { turn, reply })
            .await
            .map_err(|_| VadError::WorkerGone)?;
        rx.await.map_err(|_| VadError::WorkerGone)?
    }
}

fn run(mut model: SmartTurnModel, mut rx: mpsc::Receiver<Job>, metrics: Arc<Metrics>) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let turns: Vec<&[f32]> = jobs.iter().map(|j| &j.turn[..]).collect();
        let result = model.predict(&turns);
        metrics
            .end_of_turn_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(probs) => {
                for (job, p) in jobs.drain(..).zip(probs) {
                    let _ = job.reply.send(Ok(p));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "end-of-turn inference failed");
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(VadError::Inference(e.to_string())));
                }
            }
        }
    }
}
