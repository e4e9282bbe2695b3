//! The engine benchmark behind `gazelle bench-model --concurrency`: the real scheduler, driven
//! on the calling thread, on a model with random weights.
//!
//! For each concurrency C it runs two phases:
//! 1. **Decode.** C calls each send one turn at once, and each reply is forced to
//!    `decode_tokens` tokens. Steps that only decode, with all C sequences in the batch, give the
//!    aggregate and per-sequence decode rates.
//! 2. **Poisson.** Turns arrive on new calls as a Poisson process at 80 % of the rate phase 1
//!    served them (C turns over their mean time from arrival to last token, audio encoder and
//!    prefill included): a load the engine can carry, with queues that come and go. Each
//!    turn's time to first token runs from its arrival to the step that samples its first token.
//!
//! It also measures the two rates that bound a decode step: weight bandwidth (a batch-1 decode
//! step reads every decoder weight once) and the matmul flop rate (a prefill chunk), and from
//! them the batch size past which a step stops being bound by reading weights.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::scheduler::{CallId, Command, Scheduler, TurnRequest};
use super::{pool_for, EngineSettings, KvBudget};
use crate::metrics::quantile;
use crate::model::gazelle::prompt::{ChatPrompt, PromptError};
use crate::model::gazelle::{Gazelle, GenerationParams, LoadedGazelle};
use crate::model::SlmError;

/// What to measure.
#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    pub concurrency: Vec<usize>,
    /// The clip every turn carries (16 kHz).
    pub audio: Vec<f32>,
    /// Tokens each reply is forced to.
    pub decode_tokens: usize,
    pub prefill_chunk: usize,
    /// Poisson turns per concurrency level: at least this many, and at least 3 × C.
    pub poisson_turns: usize,
    /// Bytes of decoder weights one decode step reads (all layers built, and the lm_head).
    pub weight_bytes_per_step: u64,
    /// Multiply-adds per generated token (2 flops each), for the flop rate.
    pub macs_per_token: u64,
    pub seed: u64,
}

/// One concurrency level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    /// Decode-only steps with every sequence in the batch.
    pub full_steps: usize,
    pub step_ms: f64,
    pub aggregate_tokens_per_s: f64,
    pub per_sequence_tokens_per_s: f64,
    /// Phase 1's mean time from a turn's arrival to its last token.
    pub turn_s: f64,
    /// Poisson phase: arrival rate, turns, and time to first token.
    pub arrivals_per_s: f64,
    pub turns: usize,
    pub mean_batch: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub ttft_max_ms: f64,
}

/// The whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineBenchReport {
    pub levels: Vec<LevelReport>,
    /// Positions one turn prefills (prompt text and audio tokens).
    pub turn_positions: usize,
    pub weight_bytes_per_step: u64,
    /// Weight bytes over the time of a batch-1 decode step.
    pub weight_bandwidth_gb_s: f64,
    /// Flops of a prefill chunk over its time.
    pub matmul_gflop_s: f64,
    /// Batch size at which a step's flops take as long as reading its weights: beyond it,
    /// aggregate throughput stops growing.
    pub saturation_batch: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineBenchError {
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error("the engine failed: {0}")]
    Engine(String),
    #[error("no concurrency levels to measure")]
    NoLevels,
}

/// The Poisson phase's load: its arrival rate over the rate phase 1 served.
const LOAD: f64 = 0.8;

struct Turn {
    rx: mpsc::Receiver<Result<String, SlmError>>,
    at: Instant,
    first: Option<Instant>,
    tokens: usize,
    done: bool,
    _link: Arc<()>,
}

impl Turn {
    /// Takes what arrived; errors end the benchmark.
    fn poll(&mut self) -> Result<(), EngineBenchError> {
        loop {
            match self.rx.try_recv() {
                Ok(Ok(_)) => {
                    self.first.get_or_insert_with(Instant::now);
                    self.tokens += 1;
                }
                Ok(Err(e)) => return Err(EngineBenchError::Engine(e.to_string())),
                Err(mpsc::error::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.done = true;
                    return Ok(());
                }
            }
        }
    }
}

struct Bench {
    s: Scheduler,
    next_id: CallId,
    audio: Arc<[f32]>,
}

impl Bench {
    fn turn(&mut self) -> Turn {
        let id = self.next_id;
        self.next_id += 1;
        let link = Arc::new(());
        self.s.command(Command::Open {
            id,
            system_prompt: Some("You are a helpful voice assistant. Answer briefly.".into()),
            link: Arc::downgrade(&link),
        });
        let (tx, rx) = mpsc::channel(1 << 16);
        let at = Instant::now();
        self.s.command(Command::Turn {
            id,
            turn: TurnRequest {
                audio: self.audio.clone(),
                tokens: tx,
                cancel: CancellationToken::new(),
                tentative: false,
                at,
            },
        });
        Turn {
            rx,
            at,
            first: None,
            tokens: 0,
            done: false,
            _link: link,
        }
    }
}

/// Runs the benchmark on `model`; `progress` hears about each phase.
pub fn run(
    model: Gazelle,
    options: &EngineBenchOptions,
    mut progress: impl FnMut(&str),
) -> Result<EngineBenchReport, EngineBenchError> {
    if options.concurrency.is_empty() {
        return Err(EngineBenchError::NoLevels);
    }
    let cfg = model.config().clone();
    let prompt = ChatPrompt::synthetic(cfg.text.vocab_size, cfg.audio_token_index)?;
    let engine = Arc::new(LoadedGazelle::new(model, prompt)?.with_max_context(2048));
    let most = options.concurrency.iter().copied().max().unwrap_or(1);
    let settings = EngineSettings {
        params: GenerationParams {
            max_new_tokens: options.decode_tokens,
            stop_on_eos: false,
            ..Default::default()
        },
        prefill_chunk: options.prefill_chunk,
        max_batch: most,
        kv_budget: KvBudget::Positions(4 * most.max(options.poisson_turns) * 2048),
        max_waiting_turns: 4096,
    };
    let new_bench = || {
        let pool = pool_for(&engine, settings.kv_budget);
        Bench {
            s: Scheduler::new(engine.clone(), settings.clone(), pool, None),
            next_id: 0,
            audio: Arc::from(options.audio.as_slice()),
        }
    };

    // The two rates that bound a step.
    progress("measuring weight bandwidth and the matmul flop rate");
    let lm = engine.model.language_model();
    let mut cache = engine.model.new_cache(512)?;
    let warm = lm.embed(&[5; 256])?;
    lm.forward_embeds(&warm, &mut cache)?;
    cache.truncate(0);
    let t = Instant::now();
    lm.forward_embeds(&warm, &mut cache)?;
    let chunk_s = t.elapsed().as_secs_f64();
    let matmul_gflop_s = 2.0 * options.macs_per_token as f64 * 256.0 / chunk_s / 1e9;
    let mut step_times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        lm.decode_batch(&[7], &mut [&mut cache])?;
        step_times.push(t.elapsed().as_secs_f64());
    }
    step_times.sort_by(f64::total_cmp);
    let weight_bandwidth_gb_s = options.weight_bytes_per_step as f64 / step_times[2] / 1e9;
    let bytes_per_flop =
        options.weight_bytes_per_step as f64 / (2.0 * options.macs_per_token as f64);
    let saturation_batch = matmul_gflop_s * bytes_per_flop / weight_bandwidth_gb_s;

    let mut turn_positions = 0;
    let mut levels = Vec::new();
    for &c in &options.concurrency {
        // Phase 1: C replies decoding together.
        progress(&format!(
            "concurrency {c}: {c} replies of {} tokens",
            options.decode_tokens
        ));
        let mut b = new_bench();
        let mut turns: Vec<Turn> = (0..c).map(|_| b.turn()).collect();
        let (mut full_steps, mut full_time, mut full_tokens) = (0usize, 0.0, 0usize);
        let mut turn_times = Vec::new();
        while !turns.iter().all(|t| t.done) {
            let t = Instant::now();
            let r = b.s.step();
            let dt = t.elapsed().as_secs_f64();
            if r.prefilled == 0 && r.batch == c {
                full_steps += 1;
                full_time += dt;
                full_tokens += c;
            }
            for t in turns.iter_mut() {
                let was_done = t.done;
                t.poll()?;
                if t.done && !was_done {
                    turn_times.push(t.at.elapsed().as_secs_f64());
                }
            }
            if r.prefilled == 0 && r.batch == 0 && !b.s.has_work() {
                break;
            }
        }
        let turn_s = turn_times.iter().sum::<f64>() / turn_times.len().max(1) as f64;
        if turn_positions == 0 {
            // The cache holds the turn and every reply token but the last.
            let cached = b.s.positions_of(0).unwrap_or(0);
            turn_positions = cached.saturating_sub(options.decode_tokens.saturating_sub(1));
        }
        let aggregate = full_tokens as f64 / full_time.max(1e-9);
        let per_seq = aggregate / c as f64;
        let step_ms = full_time / full_steps.max(1) as f64 * 1e3;

        // Phase 2: Poisson arrivals at 80 % of the rate phase 1 served.
        let rate = LOAD * c as f64 / turn_s.max(1e-9);
        let n = options.poisson_turns.max(3 * c);
        progress(&format!(
            "concurrency {c}: {n} turns arriving at {rate:.2}/s (Poisson)"
        ));
        let mut rng = StdRng::seed_from_u64(options.seed ^ c as u64);
        let start = Instant::now();
        let mut at = 0.0;
        let arrivals: Vec<Duration> = (0..n)
            .map(|_| {
                at += -(1.0 - rng.random::<f64>()).ln() / rate;
                Duration::from_secs_f64(at)
            })
            .collect();
        let mut b = new_bench();
        let mut live: HashMap<usize, Turn> = HashMap::new();
        let mut ttft = Vec::new();
        let (mut rows, mut steps) = (0usize, 0usize);
        let mut next = 0;
        while ttft.len() < n || live.values().any(|t| !t.done) {
            while next < n && start.elapsed() >= arrivals[next] {
                live.insert(next, b.turn());
                next += 1;
            }
            let r = b.s.step();
            if r.batch > 0 {
                rows += r.batch;
                steps += 1;
            }
            for t in live.values_mut() {
                let had = t.first.is_some();
                t.poll()?;
                if let (false, Some(f)) = (had, t.first) {
                    ttft.push((f - t.at).as_secs_f64() * 1e3);
                }
            }
            live.retain(|_, t| !t.done);
            if r.prefilled == 0 && r.batch == 0 && !b.s.has_work() {
                if next >= n && live.is_empty() {
                    break;
                }
                if next < n {
                    let wait = arrivals[next].saturating_sub(start.elapsed());
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                }
            }
        }
        ttft.sort_by(f64::total_cmp);
        levels.push(LevelReport {
            concurrency: c,
            full_steps,
            step_ms,
            aggregate_tokens_per_s: aggregate,
            per_sequence_tokens_per_s: per_seq,
            turn_s,
            arrivals_per_s: rate,
            turns: n,
            mean_batch: rows as f64 / steps.max(1) as f64,
            ttft_p50_ms: quantile(&ttft, 0.5),
            ttft_p99_ms: quantile(&ttft, 0.99),
            ttft_max_ms: ttft.last().copied().unwrap_or(0.0),
        });
    }
    Ok(EngineBenchReport {
        levels,
        turn_positions,
        weight_bytes_per_step: options.weight_bytes_per_step,
        weight_bandwidth_gb_s,
        matmul_gflop_s,
        saturation_batch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gazelle::model::Precision;
    use crate::model::gazelle::parity_tests::load_fixture_with;
    use candle_core::DType;

    /// The benchmark runs end to end on the tiny fixture and reports sane numbers.
    #[test]
    fn measures_every_level() {
        let (model, refs) = load_fixture_with("mistral", Precision::uniform(DType::F32));
        let audio: Vec<f32> = refs["c0.audio"].to_vec1().unwrap();
        let options = EngineBenchOptions {
            concurrency: vec![1, 3],
            audio,
            decode_tokens: 8,
            prefill_chunk: 512,
            poisson_turns: 4,
            weight_bytes_per_step: 1_000_000,
            macs_per_token: 500_000,
            seed: 1,
        };
        let mut phases = 0;
        let r = run(model, &options, |_| phases += 1).unwrap();
        assert_eq!(phases, 1 + 2 * 2);
        assert_eq!(r.levels.len(), 2);
        assert!(r.turn_positions > 10, "{r:?}");
        for l in &r.levels {
            assert!(l.full_steps >= 4, "{l:?}");
            assert!(
                l.aggregate_tokens_per_s > 0.0 && l.ttft_p50_ms > 0.0,
                "{l:?}"
            );
            assert!(l.ttft_p99_ms >= l.ttft_p50_ms && l.ttft_max_ms >= l.ttft_p99_ms);
            assert_eq!(l.turns, 4.max(3 * l.concurrency));
        }
        assert!(r.saturation_batch > 0.0);
    }
}
