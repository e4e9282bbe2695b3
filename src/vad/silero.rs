//! The Silero VAD model (v5/v6 ONNX) through `ort`. The session is owned by whoever runs it (the
//! VAD worker thread); each call owns a [`SileroState`] with its context samples and recurrent
//! state, so frames of many calls can be batched into one inference.

use std::path::Path;

use ort::environment::Environment;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("could not load ONNX Runtime from {path}: {reason}")]
    Runtime { path: String, reason: String },
    #[error("could not load the {what} model from {path}: {reason}")]
    Model {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("Silero VAD inference failed: {0}")]
    Inference(String),
    #[error("end-of-turn model inference failed: {0}")]
    TurnInference(String),
    #[error("Silero VAD runs at 8000 or 16000 Hz, not {0}")]
    Rate(u32),
    #[error("the VAD worker has stopped")]
    WorkerGone,
}

const STATE_LEN: usize = 128;

/// Samples per frame at a rate: 512 at 16 kHz, 256 at 8 kHz.
pub(crate) fn frame_len(rate: u32) -> usize {
    if rate == 8_000 {
        256
    } else {
        512
    }
}

/// Context samples carried from the previous frame: 64 at 16 kHz, 32 at 8 kHz.
fn context_len(rate: u32) -> usize {
    frame_len(rate) / 8
}

/// One stream's model state: the tail of the previous frame and the recurrent state.
#[derive(Debug, Clone)]
pub struct SileroState {
    rate: u32,
    context: Vec<f32>,
    /// [2, 128]: the two layers of the recurrent state for this stream.
    state: Vec<f32>,
}

impl SileroState {
    pub(crate) fn new(rate: u32) -> Result<Self, VadError> {
        if rate != 8_000 && rate != 16_000 {
            return Err(VadError::Rate(rate));
        }
        Ok(SileroState {
            rate,
            context: vec![0.0; context_len(rate)],
            state: vec![0.0; 2 * STATE_LEN],
        })
    }

    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }
}

/// Loads the ONNX Runtime shared library once per process and returns its environment. The
/// library cannot be unloaded or swapped, so a later call with another path gets the first one.
pub fn init_runtime(lib: &Path) -> Result<&'static Environment, VadError> {
    static ENV: std::sync::OnceLock<Result<Environment, String>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let builder = ort::init_from(lib).map_err(|e| e.to_string())?;
        builder
            .with_name("gazelle")
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|reason| VadError::Runtime {
        path: lib.display().to_string(),
        reason: reason.clone(),
    })
}

/// A session of `model` (named `what` in errors) on one thread: its worker batches across calls
/// instead, and the other core is needed by the sockets and the model.
///
/// Quantized products run exactly on every x86-64 CPU: by default MLAS multiplies u8×s8 with
/// `vpmaddubsw` on AVX2 and AVX-512-without-VNNI CPUs, whose 16-bit pair sums saturate, so the
/// int8 Smart Turn model gave other probabilities there than on VNNI CPUs (sense-0870: 0.9768
/// against 0.9854; a cut phrase 0.280 against 0.035, see `tests/fixtures/smart-turn/README.md`).
/// On those CPUs the session sets `session.x64quantprecision` (exact u8×u8 products), and they
/// equal the VNNI CPUs' to the last bit. Elsewhere it is left off: it changes no number there,
/// but ONNX Runtime 1.31 applies it on VNNI CPUs too, where it made Smart Turn slower.
/// Float models (Silero) are unaffected either way.
///
/// Memory patterns are off: ONNX Runtime plans and keeps one arena block per input shape, and
/// batches of many sizes piled them up (Smart Turn: 552 MB after batches of ten sizes, against 397
/// MB without, at the same speed; Silero: no difference in speed either).
pub(crate) fn single_thread_session(
    env: &Environment,
    model: &Path,
    what: &'static str,
) -> Result<Session, VadError> {
    let err = |e: String| VadError::Model {
        what,
        path: model.display().to_string(),
        reason: e,
    };
    if !model.is_file() {
        return Err(err("no such file".into()));
    }
    let mut builder = Session::builder(env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| err(e.to_string()))?
        .with_intra_threads(1)
        .map_err(|e| err(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| err(e.to_string()))?
        .with_memory_pattern(false)
        .map_err(|e| err(e.to_string()))?;
    if exact_int8_needs_asking() {
        builder = builder.with_precise_qmm().map_err(|e| err(e.to_string()))?;
    }
    builder
        .commit_from_file(model)
        .map_err(|e| err(e.to_string()))
}

/// Whether this CPU's int8 kernels saturate unless asked for exact products (read once).
fn exact_int8_needs_asking() -> bool {
    static SATURATES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SATURATES.get_or_init(|| {
        crate::vad::kernels::CpuReport::this_machine()
            .int8
            .saturates_pairs()
    })
}

/// One ORT session of the Silero model.
pub struct SileroModel {
    session: Session,
}

impl SileroModel {
    /// Loads the model into a session of the given runtime environment, and runs it once on a
    /// silent frame (ONNX Runtime sets up on the first run; better at start-up than in a call).
    pub fn load(env: &Environment, model: &Path) -> Result<Self, VadError> {
        let mut m = SileroModel {
            session: single_thread_session(env, model, "Silero VAD")?,
        };
        let mut state = SileroState::new(16_000)?;
        m.infer(&mut [&mut state], &[&vec![0.0; frame_len(16_000)]])?;
        Ok(m)
    }

    /// Runs one frame for each stream in `streams` (all at the same rate) and returns one speech
    /// probability per stream. `frames[i]` must hold exactly `frame_len(rate)` samples.
    pub(crate) fn infer(
        &mut self,
        streams: &mut [&mut SileroState],
        frames: &[&[f32]],
    ) -> Result<Vec<f32>, VadError> {
        let b = streams.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let rate = streams[0].rate;
        let (flen, clen) = (frame_len(rate), context_len(rate));
        let width = flen + clen;
        let mut input = Vec::with_capacity(b * width);
        let mut state = vec![0.0f32; 2 * b * STATE_LEN];
        for (i, (s, f)) in streams.iter().zip(frames).enumerate() {
            if s.rate != rate || f.len() != flen {
                return Err(VadError::Inference(format!(
                    "batch mixes rates or frame sizes ({} Hz, {} samples)",
                    s.rate,
                    f.len()
                )));
            }
            input.extend_from_slice(&s.context);
            input.extend_from_slice(f);
            for layer in 0..2 {
                let dst = (layer * b + i) * STATE_LEN;
                state[dst..dst + STATE_LEN]
                    .copy_from_slice(&s.state[layer * STATE_LEN..(layer + 1) * STATE_LEN]);
            }
        }
        let input = Tensor::from_array(([b, width], input))
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let state_t = Tensor::from_array(([2, b, STATE_LEN], state))
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let sr = Tensor::from_array(((), vec![rate as i64]))
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs!["input" => input, "state" => state_t, "sr" => sr])
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let (_, probs) = outputs["output"]
            .try_extract_tensor::<f32>()
            .map_err(|e| VadError::Inference(e.to_string()))?;
        let (_, new_state) = outputs["stateN"]
            .try_extract_tensor::<f32>()
            .map_err(|e| VadError::Inference(e.to_string()))?;
        for (i, (s, f)) in streams.iter_mut().zip(frames).enumerate() {
            s.context.copy_from_slice(&f[flen - clen..]);
            for layer in 0..2 {
                let src = (layer * b + i) * STATE_LEN;
                s.state[layer * STATE_LEN..(layer + 1) * STATE_LEN]
                    .copy_from_slice(&new_state[src..src + STATE_LEN]);
            }
        }
        Ok(probs[..b].to_vec())
    }
}
