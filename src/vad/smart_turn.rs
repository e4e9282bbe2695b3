//! The end-of-turn model: Smart Turn v3.2 (pipecat-ai, BSD-2) on ONNX Runtime. It hears the last
//! 8 s of the turn so far (left-padded with silence), normalised to zero mean and unit variance,
//! as Whisper log-mel features, and says how likely the speaker has finished. One thread owns the
//! session and serves every call's requests in turn (up to [`MAX_BATCH`] in one inference).
//!
//! Memory: the session's arena keeps what its largest batch needed (about 20 MB a turn), so
//! batches are small. While turns keep coming the arena stays (growing and shrinking it every
//! time the queue ran dry made RSS swing by 90 MB at 50 calls); after [`GIVE_BACK_AFTER`] without
//! one it gives back all it holds, so a server whose calls have ended returns to its idle size.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use tokio::sync::{mpsc, oneshot};

use super::silero::single_thread_session;
use super::worker::take_queued;
use super::VadError;
use crate::audio::mel::{LogMel, HOP, N_MELS, SAMPLE_RATE};
use crate::metrics::Metrics;

/// The model hears this much of the turn, the newest part.
pub const WINDOW_SAMPLES: usize = 8 * SAMPLE_RATE as usize;
const FRAMES: usize = WINDOW_SAMPLES / HOP;
/// Most turns in one inference: one. On one thread a turn costs no less in a batch (46 ms alone,
/// 60 ms each in a batch of 8 on this machine's AVX-512 VNNI core; 44–59 ms each for batches of
/// 1 to 16 in Python's run of the same library), so a batch only makes its first turns wait for
/// its last, and grows the arena to the largest batch seen, at whatever moment that batch comes
/// (16 turns: 325 MB above the loaded model; 4: 80 MB, which a 50-call soak first reached after
/// 14 minutes, a 26 MB step in RSS). One at a time, the arena has its size after the first turn.
const MAX_BATCH: usize = 1;
/// Queued requests before senders wait.
const QUEUE: usize = 256;
/// A worker this long without a request gives its arena back.
const GIVE_BACK_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// The model's input for one turn: `[N_MELS, 800]` features of its last 8 s.
pub(crate) fn features(mel: &LogMel, turn: &[f32]) -> Vec<f32> {
    let tail = &turn[turn.len().saturating_sub(WINDOW_SAMPLES)..];
    let mut x = vec![0f32; WINDOW_SAMPLES - tail.len()];
    x.extend_from_slice(tail);
    normalize(&mut x);
    mel.compute(&x)
}

/// Zero mean and unit variance, in f32 arithmetic as numpy does it for pipecat (pairwise sums,
/// `(x - mean) / sqrt(var + 1e-7)`): the model is sensitive enough that f64 statistics move its
/// output by a few hundredths on some turns.
fn normalize(x: &mut [f32]) {
    let n = x.len() as f32;
    let mean = pairwise_sum(x) / n;
    let squares: Vec<f32> = x.iter().map(|&v| (v - mean) * (v - mean)).collect();
    let var = pairwise_sum(&squares) / n;
    let std = (var + 1e-7).sqrt();
    for v in x {
        *v = (*v - mean) / std;
    }
}

/// numpy's float32 summation: blocks of up to 128 summed in 8 lanes, halves added pairwise.
fn pairwise_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        return a.iter().fold(0.0, |s, &v| s + v);
    }
    if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        for block in a[8..whole].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[whole..] {
            res += v;
        }
        return res;
    }
    let mut half = n / 2;
    half -= half % 8;
    pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
}

/// One ORT session of the model.
pub struct SmartTurnModel {
    session: Session,
    mel: LogMel,
}

impl SmartTurnModel {
    /// Loads the model and runs it once on a second of silence: ONNX Runtime sets up kernels and
    /// buffers on the first run (tens of MB, held for the process's life), so that cost falls on
    /// start-up rather than on the first caller's first turn, and an idle server already has the
    /// size it returns to when calls end.
    pub fn load(env: &Environment, model: &Path) -> Result<Self, VadError> {
        let mut m = SmartTurnModel {
            session: single_thread_session(env, model, "Smart Turn end-of-turn")?,
            mel: LogMel::new(),
        };
        m.give_back()?;
        Ok(m)
    }

    /// The probability that each turn is complete.
    pub fn predict(&mut self, turns: &[&[f32]]) -> Result<Vec<f32>, VadError> {
        self.predict_then(turns, Arena::Keep)
    }

    /// Gives back the session's scratch memory (ONNX Runtime frees its arena at the end of a
    /// run, here the smallest one) and trims the heap.
    fn give_back(&mut self) -> Result<(), VadError> {
        self.predict_then(&[&[0.0; SAMPLE_RATE as usize]], Arena::GiveBack)?;
        crate::memory::release_free_heap();
        Ok(())
    }

    /// [`predict`](Self::predict), then `arena` says whether the session keeps its scratch
    /// memory for the next run.
    fn predict_then(&mut self, turns: &[&[f32]], arena: Arena) -> Result<Vec<f32>, VadError> {
        if turns.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::with_capacity(turns.len() * N_MELS * FRAMES);
        for t in turns {
            input.extend(features(&self.mel, t));
        }
        let fail = |e: ort::Error| VadError::TurnInference(e.to_string());
        let input = Tensor::from_array(([turns.len(), N_MELS, FRAMES], input)).map_err(fail)?;
        let mut options = ort::session::RunOptions::new().map_err(fail)?;
        if arena == Arena::GiveBack {
            // ONNX Runtime frees the arena's regions that this run leaves unused.
            options
                .set("memory.enable_memory_arena_shrinkage", "cpu:0")
                .map_err(fail)?;
        }
        let outputs = self
            .session
            .run_with_options(ort::inputs!["input_features" => input], &options)
            .map_err(fail)?;
        let (_, probs) = outputs[0].try_extract_tensor::<f32>().map_err(fail)?;
        if probs.len() != turns.len() {
            return Err(VadError::TurnInference(format!(
                "the end-of-turn model gave {} outputs for {} turns",
                probs.len(),
                turns.len()
            )));
        }
        Ok(probs.to_vec())
    }
}

/// What the session does with its scratch memory after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arena {
    /// Keeps it for the next run.
    Keep,
    /// Gives back what it held beyond this run.
    GiveBack,
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
        Self::spawn_giving_back_after(model, metrics, GIVE_BACK_AFTER)
    }

    fn spawn_giving_back_after(
        model: SmartTurnModel,
        metrics: Arc<Metrics>,
        give_back_after: std::time::Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("end-of-turn".into())
            .spawn(move || run(model, rx, metrics, give_back_after))
            .expect("spawn the end-of-turn thread");
        SmartTurnHandle { tx }
    }

    /// A handle whose worker never answers, standing in for one far behind, and the queue it
    /// keeps (requests wait there until it drops).
    #[cfg(test)]
    pub(crate) fn never_answering() -> (Self, StuckQueue) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (SmartTurnHandle { tx }, StuckQueue(rx))
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

/// The requests sent to [`SmartTurnHandle::never_answering`].
#[cfg(test)]
pub(crate) struct StuckQueue(#[allow(dead_code)] mpsc::Receiver<Job>);

fn run(
    mut model: SmartTurnModel,
    mut rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    give_back_after: std::time::Duration,
) {
    // A runtime of the thread's own, only to wait for requests with a deadline.
    let waiter = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a timer for the end-of-turn thread");
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    // Whether the arena holds memory from runs since it last gave it back.
    let mut holding = false;
    loop {
        let first = if holding {
            let next = async { tokio::time::timeout(give_back_after, rx.recv()).await };
            match waiter.block_on(next) {
                Ok(first) => first,
                Err(_quiet) => {
                    if let Err(e) = model.give_back() {
                        tracing::warn!(error = %e, "the end-of-turn model could not give its memory back");
                    }
                    holding = false;
                    continue;
                }
            }
        } else {
            waiter.block_on(rx.recv())
        };
        let Some(first) = first else { return };
        jobs.push(first);
        take_queued(&mut rx, &mut jobs, MAX_BATCH);
        metrics.end_of_turn_queued.set(rx.len() as i64);
        // A pause already over (speech resumed, or silence ended the turn) needs no verdict: its
        // asker has gone. When the worker falls behind, this keeps the backlog from feeding on
        // itself.
        let asked = jobs.len();
        jobs.retain(|j| !j.reply.is_closed());
        for _ in jobs.len()..asked {
            metrics.end_of_turn("withdrawn");
        }
        if jobs.is_empty() {
            continue;
        }
        holding = true;
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
                // Seen once in hundreds of batches under 300 calls (ONNX Runtime's
                // DequantizeLinear "GetElementType is not implemented"): each turn is asked
                // again on its own, and only a turn that fails alone gets the error.
                tracing::warn!(error = %e, batch = jobs.len(), "end-of-turn inference failed; asking turn by turn");
                for job in jobs.drain(..) {
                    let alone = model.predict(&[&job.turn[..]]).map(|p| p[0]);
                    if let Err(e) = &alone {
                        tracing::error!(error = %e, "end-of-turn inference failed");
                    }
                    let _ = job.reply.send(alone);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smart-turn")
            .join(name)
    }

    fn model() -> SmartTurnModel {
        let lib = crate::assets::ort_lib(None).expect("ONNX Runtime (run scripts/setup)");
        let env = crate::vad::silero::init_runtime(&lib).unwrap();
        let path =
            crate::assets::turn_model(None).expect("the Smart Turn model (run scripts/setup)");
        SmartTurnModel::load(env, &path).unwrap()
    }

    fn clip(name: &str) -> Vec<f32> {
        let wav = crate::audio::wav::read(&std::fs::read(fixture(name)).unwrap()).unwrap();
        assert_eq!(wav.sample_rate, SAMPLE_RATE);
        wav.samples
    }

    /// Our features equal transformers' `WhisperFeatureExtractor` on a recorded clip (the whole
    /// [80, 800] matrix), and our probabilities equal the Python onnxruntime run of the same
    /// model on every reference case (`scripts/make_smart_turn_fixtures.py`): alone and batched,
    /// including one past 8 s whose start is dropped.
    ///
    /// Why these bounds hold on any x86-64 CPU:
    /// - features, 1e-4: our own f64 FFT and mel product, whose kernels (rustfft's AVX/FMA
    ///   planner, matrixmultiply's FMA dgemm) are the same on every AVX2+FMA CPU; an all-f32
    ///   version of the recipe lands within 7e-6.
    /// - probabilities, 1e-4: the model is int8, and ONNX Runtime picks its integer kernels by
    ///   CPU. Without `session.x64quantprecision` the spread across kernel sets was up to 0.245
    ///   (AVX2 against AVX-512 VNNI, measured under QEMU's Haswell CPU model on this machine;
    ///   the committed 0.985435 against an AVX2 EPYC's 0.976837 is one case of it). With it,
    ///   which our sessions set, AVX-512 VNNI and AVX2 give bit-identical probabilities on every
    ///   case (this test binary too, run under QEMU's Haswell). CPUs without AVX (SSE4.2) run
    ///   other float kernels, which move some cases by many quantization steps (0.035 to 0.062):
    ///   they are held to their own measured column of `across-cpus.json`. The output is
    ///   quantized in steps of 0.039 in logit, at least 0.0005 in probability for these cases,
    ///   so 1e-4 fails on any kernel that lands on another step and passes f32 rounding. The
    ///   CPUs not measured add nothing new: AVX-512 without VNNI and AMX compute the same exact
    ///   integer sums and run the same AVX-512F float kernels as this AVX-512 VNNI machine.
    /// - batched against alone, 1e-5: one machine, one session; only the batch shape differs.
    #[test]
    fn features_and_probabilities_match_the_python_reference() {
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("reference.json")).unwrap()).unwrap();
        let mut m = model();
        let want: Vec<f32> = std::fs::read(fixture("features.f32"))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let ours = features(
            &m.mel,
            &clip(reference["features_f32"]["clip"].as_str().unwrap()),
        );
        assert_eq!(ours.len(), want.len());
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "features differ by up to {worst}");

        let cases = reference["cases"].as_array().unwrap();
        let turns: Vec<Vec<f32>> = cases
            .iter()
            .map(|c| {
                c["files"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|f| clip(f.as_str().unwrap()))
                    .collect()
            })
            .collect();
        assert!(
            turns.iter().any(|t| t.len() > WINDOW_SAMPLES),
            "a case past 8 s"
        );
        let refs: Vec<&[f32]> = turns.iter().map(Vec::as_slice).collect();
        let batched = m.predict(&refs).unwrap();
        let machine = crate::vad::kernels::CpuReport::this_machine();
        eprintln!("{machine}");
        // The measured spread (scripts/smart_turn_across_cpus.py): with exact int8 products the
        // AVX2 kernels give the reference (made on AVX-512 VNNI) to the last digit; the SSE4.2
        // kernels of CPUs without AVX differ in their float ops, and have their own column.
        let across: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("across-cpus.json")).unwrap()).unwrap();
        let measured = |kernels: &str, case: &str| {
            across["kernels"][kernels]["x64quantprecision"][case]
                .as_f64()
                .unwrap_or_else(|| panic!("across-cpus.json has no {kernels} {case}"))
                as f32
        };
        let name = |c: &serde_json::Value| {
            c.get("name")
                .or(c.get("file"))
                .and_then(|n| n.as_str())
                .unwrap()
                .to_string()
        };
        for c in cases {
            let reference = c["probability"].as_f64().unwrap() as f32;
            let avx2 = measured("AVX2", &name(c));
            assert!((avx2 - reference).abs() < 1e-6, "{}: AVX2 {avx2}", name(c));
        }
        let column = (machine.int8 == crate::vad::kernels::Int8Kernels::Sse).then_some("SSE4.2");
        for ((c, turn), b) in cases.iter().zip(&turns).zip(&batched) {
            let p = m.predict(&[turn]).unwrap()[0];
            let expected = match column {
                Some(k) => measured(k, &name(c)),
                None => c["probability"].as_f64().unwrap() as f32,
            };
            eprintln!("{}: ours {p:.6} python {expected:.6}", c["files"]);
            assert!(
                (p - expected).abs() < 1e-4,
                "{}: {p} vs {expected}, on this machine:\n{machine}",
                c["files"]
            );
            assert!((b - p).abs() < 1e-5, "batched {b} vs alone {p}");
        }
    }

    /// The worker answers, goes quiet long enough to give its arena back, and answers the same
    /// again afterwards (its wait for requests runs on a timer of its own).
    #[tokio::test]
    async fn the_worker_answers_alike_before_and_after_giving_its_memory_back() {
        let metrics = Arc::new(Metrics::new());
        let handle = SmartTurnHandle::spawn_giving_back_after(
            model(),
            metrics,
            std::time::Duration::from_millis(50),
        );
        let turn: Arc<[f32]> = clip("goforward.wav").into();
        let before = handle.predict(turn.clone()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let after = handle.predict(turn).await.unwrap();
        assert!(before > 0.9, "{before}");
        assert!((before - after).abs() < 1e-6, "{before} then {after}");
    }

    /// A request whose asker has gone by the time the worker reaches it (speech resumed, or the
    /// turn ended) is not run: counted as withdrawn, and the requests around it are answered.
    #[tokio::test]
    async fn a_request_withdrawn_while_queued_is_not_run() {
        let metrics = Arc::new(Metrics::new());
        let handle = SmartTurnHandle::spawn(model(), metrics.clone());
        let turn: Arc<[f32]> = clip("goforward.wav").into();
        let first = tokio::spawn({
            let (h, t) = (handle.clone(), turn.clone());
            async move { h.predict(t).await }
        });
        // Withdrawn before the worker can reach it, whichever it takes first.
        let (reply, gone) = oneshot::channel();
        drop(gone);
        handle
            .tx
            .send(Job {
                turn: turn.clone(),
                reply,
            })
            .await
            .unwrap();
        let third = handle.predict(turn).await.unwrap();
        let first = first.await.unwrap().unwrap();
        assert!(
            (first - third).abs() < 1e-6 && first > 0.9,
            "{first} {third}"
        );
        let count = |d: &str| metrics.end_of_turn_decisions.with_label_values(&[d]).get();
        assert_eq!(count("withdrawn"), 1);
        assert_eq!(
            metrics.end_of_turn_seconds.get_sample_count(),
            2,
            "two inferences, not three"
        );
    }

    /// The decisions the turn policy relies on: finished sentences and questions are judged
    /// complete, phrases cut at a word boundary incomplete.
    #[test]
    fn finished_sentences_are_complete_and_cut_phrases_are_not() {
        let mut m = model();
        for (name, complete) in [
            ("goforward.wav", true),
            ("vm-savefolder.wav", true),
            ("agent-pass.wav", true),
            ("sense-0890-cut.wav", false),
            ("sense-0920-cut.wav", false),
        ] {
            let p = m.predict(&[&clip(name)]).unwrap()[0];
            assert_eq!(p >= 0.5, complete, "{name}: {p}");
        }
    }
}
