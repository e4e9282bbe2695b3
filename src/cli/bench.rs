//! `gazelle bench-model`: speed of a real-shape Gazelle with random weights (no download). It
//! measures the three numbers a voice turn pays for: audio encoding (ms per second of audio),
//! prefill of the spliced prompt, and decode tokens per second with a forced length.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;

use super::bench_suite::{self, random_audio, text_id, token_ids, SuiteOptions};

use gazelle::model::engine::bench::{self as engine_bench, EngineBenchOptions};
use gazelle::model::gazelle::random::random_gazelle;
use gazelle::model::gazelle::GazelleConfig;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Real-shape preset, mistral-7b (gazelle-v0.2) or llama2-7b (gazelle-v0.1), or any Gazelle
    /// config.json (or a directory holding one).
    #[arg(long, default_value = "mistral-7b")]
    pub random_weights: String,
    /// Build only this many decoder layers (memory); times are also scaled to the full depth.
    #[arg(long)]
    pub layers: Option<usize>,
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// Seconds of (random) audio in the turn.
    #[arg(long, default_value_t = 5.0)]
    pub audio_seconds: f64,
    /// Text tokens around the audio (system prompt + template).
    #[arg(long, default_value_t = 40)]
    pub prompt_tokens: usize,
    /// Forced decode length.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Timed repetitions; the best is reported (after one warm-up run).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Also write the results here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Run the GPU suite instead (decode per context, prefill, encoder, time to first token,
    /// memory, roofline; see bench_suite.rs). Medians of --repeats runs.
    #[arg(long)]
    pub suite: bool,
    /// --suite: context lengths for decode tok/s.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 1024, 4096])]
    pub contexts: Vec<usize>,
    /// --suite: prompt lengths for prefill.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 512])]
    pub prefill_lengths: Vec<usize>,
    /// Benchmark the continuous-batching engine instead, at these numbers of concurrent calls
    /// (e.g. 1,2,4,8,16): decode rates per batch size, and time to first token under Poisson
    /// arrivals of turns. Uses --audio-seconds and --decode-tokens.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// --concurrency: prefill positions per engine step.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// --concurrency: Poisson turns per level (at least 3 × the concurrency).
    #[arg(long, default_value_t = 12)]
    pub poisson_turns: usize,
    /// --suite: clip lengths (seconds) for the audio encoder.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0f64, 5.0, 15.0])]
    pub encoder_seconds: Vec<f64>,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Run {
    encoder_ms: f64,
    prefill_ms: f64,
    decode_tokens_per_s: f64,
    /// A second user turn (same clip, 8 template tokens) appended to the warm cache.
    append_turn_ms: f64,
}

/// A preset name, or a Gazelle config.json (or a directory holding one) at any shape.
fn random_config(spec: &str) -> anyhow::Result<GazelleConfig> {
    if let Some(c) = GazelleConfig::preset(spec) {
        return Ok(c);
    }
    let path = std::path::Path::new(spec);
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    if !file.is_file() {
        bail!(
            "`{spec}` is neither a preset (mistral-7b, llama2-7b) nor a Gazelle config.json or \
             a directory holding one"
        );
    }
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut cfg = GazelleConfig::from_json_str(&text)
        .with_context(|| format!("parsing {}", file.display()))?;
    // The vocabulary must hold the `<|audio|>` id (checkpoints take it from the embedding).
    cfg.text.vocab_size = cfg.text.vocab_size.max(cfg.audio_token_index as usize + 1);
    Ok(cfg)
}

pub fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut cfg = random_config(&args.random_weights)?;
    let full_layers = cfg.text.num_hidden_layers;
    let layers = args.layers.unwrap_or(full_layers).clamp(1, full_layers);
    cfg.text.num_hidden_layers = layers;
    let (device, precision) = args.precision.open()?;
    let (dtype, audio_dtype): (DType, DType) = (precision.weights, precision.audio);
    let name = &args.random_weights;
    eprintln!(
        "building random {name} ({layers}/{full_layers} layers, {dtype:?}, {audio_dtype:?} audio)"
    );
    let t = Instant::now();
    let model = random_gazelle(&cfg, precision, &device, 1)?;
    let build_s = t.elapsed().as_secs_f64();
    if args.suite {
        let options = SuiteOptions {
            contexts: args.contexts.clone(),
            prefill_lengths: args.prefill_lengths.clone(),
            encoder_seconds: args.encoder_seconds.clone(),
            decode_tokens: args.decode_tokens,
            repeats: args.repeats,
        };
        let report = bench_suite::run_suite(&model, &options)?;
        bench_suite::print_suite(&report);
        if let Some(path) = &args.json {
            let out = stamped(
                serde_json::to_value(&report)?,
                &args,
                layers,
                full_layers,
                build_s,
            );
            std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        }
        return Ok(());
    }

    if !args.concurrency.is_empty() {
        return run_engine_bench(&args, model, &cfg, dtype, (full_layers, build_s));
    }

    let audio = random_audio(args.audio_seconds);
    let audio_id = cfg.audio_token_index;
    let mut ids = token_ids(&cfg, args.prompt_tokens);
    ids.insert(ids.len() / 2, audio_id);

    let mut runs = Vec::new();
    let mut positions = 0;
    for rep in 0..=args.repeats {
        let t = Instant::now();
        let clip = model.encode_audio(&audio)?;
        let encoder_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut cache = model.new_cache(1024)?;
        let t = Instant::now();
        let embeds = model.splice(&ids, &[&clip])?;
        let hidden = model.forward_embeds(&embeds, &mut cache)?;
        let logits = model.language_model().last_logits(&hidden)?;
        let mut tok = logits.argmax(0)?.to_scalar::<u32>()?;
        let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
        positions = cache.len();
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            let l: Tensor = model.step(tok, &mut cache)?;
            tok = l.argmax(0)?.to_scalar::<u32>()?;
        }
        let decode_tokens_per_s = args.decode_tokens as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        // `</s>[INST] <audio> [/INST]` in Mistral's vocabulary.
        let mut turn: Vec<u32> = [2, 733, 16289, 28793, 0, 733, 28748, 16289]
            .map(|i| text_id(&cfg, i))
            .to_vec();
        turn[4] = audio_id;
        let embeds = model.splice(&turn, &[&clip])?;
        let hidden = model.forward_embeds(&embeds, &mut cache)?;
        model.language_model().last_logits(&hidden)?;
        let append_turn_ms = t.elapsed().as_secs_f64() * 1e3;
        let run = Run {
            encoder_ms,
            prefill_ms,
            decode_tokens_per_s,
            append_turn_ms,
        };
        eprintln!("{} {run:?}", if rep == 0 { "warm-up" } else { "run" });
        if rep > 0 {
            runs.push(run);
        }
    }
    let min = |f: fn(&Run) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
    let best = Run {
        encoder_ms: min(|r| r.encoder_ms),
        prefill_ms: min(|r| r.prefill_ms),
        decode_tokens_per_s: runs
            .iter()
            .map(|r| r.decode_tokens_per_s)
            .fold(0.0, f64::max),
        append_turn_ms: min(|r| r.append_turn_ms),
    };
    // Decoder time is nearly linear in depth; embedding/lm_head make this an upper bound.
    let scale = full_layers as f64 / layers as f64;
    let scaled = Run {
        encoder_ms: best.encoder_ms,
        prefill_ms: best.prefill_ms * scale,
        decode_tokens_per_s: best.decode_tokens_per_s / scale,
        append_turn_ms: best.append_turn_ms * scale,
    };
    let threads = candle_core::utils::get_num_threads();
    let compute = precision.compute;
    println!(
        "| {name} random weights: decoder {dtype:?} weights / {compute:?} compute, audio \
         {audio_dtype:?}, {threads} threads | measured ({layers} layers) \
         | scaled to {full_layers} layers |"
    );
    println!("|---|---|---|");
    println!(
        "| encoder ms per second of audio ({:.1} s clip) | {:.0} | {:.0} |",
        args.audio_seconds,
        best.encoder_ms / args.audio_seconds,
        scaled.encoder_ms / args.audio_seconds
    );
    println!(
        "| prefill ms ({positions} positions: {} text + {} audio) | {:.0} | {:.0} |",
        args.prompt_tokens,
        positions - args.prompt_tokens,
        best.prefill_ms,
        scaled.prefill_ms
    );
    println!(
        "| decode tok/s ({} forced tokens) | {:.2} | {:.2} |",
        args.decode_tokens, best.decode_tokens_per_s, scaled.decode_tokens_per_s
    );
    println!(
        "| append a 2nd turn ({} positions onto {} cached) | {:.0} | {:.0} |",
        positions - args.prompt_tokens + 7,
        positions + args.decode_tokens,
        best.append_turn_ms,
        scaled.append_turn_ms
    );
    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "preset": args.random_weights,
            "dtype": format!("{dtype:?}"),
            "compute_dtype": format!("{:?}", precision.compute),
            "audio_dtype": format!("{audio_dtype:?}"),
            "threads": threads,
            "layers_built": layers,
            "layers_full": full_layers,
            "build_s": build_s,
            "audio_seconds": args.audio_seconds,
            "prefill_positions": positions,
            "decode_tokens": args.decode_tokens,
            "measured": best,
            "scaled_to_full_depth": scaled,
            "runs": runs,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// `--concurrency`: the engine under load (see `gazelle::model::engine::bench`).
fn run_engine_bench(
    args: &BenchArgs,
    model: gazelle::model::gazelle::Gazelle,
    cfg: &GazelleConfig,
    weights: DType,
    (full_layers, build_s): (usize, f64),
) -> anyhow::Result<()> {
    let weight_bytes = weights.size_in_bytes() as u64;
    let options = EngineBenchOptions {
        concurrency: args.concurrency.clone(),
        audio: random_audio(args.audio_seconds),
        decode_tokens: args.decode_tokens,
        prefill_chunk: args.prefill_chunk,
        poisson_turns: args.poisson_turns,
        weight_bytes_per_step: bench_suite::weight_bytes_per_token(cfg, weight_bytes),
        macs_per_token: bench_suite::weight_bytes_per_token(cfg, 1),
        seed: 7,
    };
    let r = engine_bench::run(model, &options, |p| eprintln!("{p}"))?;
    let layers = cfg.text.num_hidden_layers;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "| {} random weights, {layers}/{full_layers} layers, {threads} threads; turns of {:.1} s \
         audio ({} positions), replies of {} tokens | step ms (full batch) | aggregate tok/s | \
         per-sequence tok/s | turn s (arrival → last token) | Poisson arrivals/s (turns) | mean \
         batch | TTFT p50 ms | TTFT p99 ms |",
        args.random_weights, args.audio_seconds, r.turn_positions, args.decode_tokens
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for l in &r.levels {
        println!(
            "| {} concurrent | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} ({}) | {:.1} | {:.0} | {:.0} |",
            l.concurrency,
            l.step_ms,
            l.aggregate_tokens_per_s,
            l.per_sequence_tokens_per_s,
            l.turn_s,
            l.arrivals_per_s,
            l.turns,
            l.mean_batch,
            l.ttft_p50_ms,
            l.ttft_p99_ms
        );
    }
    println!(
        "\nweights read per step {:.2} GB; measured weight bandwidth {:.1} GB/s (batch-1 step), \
         matmul rate {:.1} GFLOP/s (a 256-position prefill chunk); a step's flops match its \
         weight reads at batch ≈ {:.1}",
        r.weight_bytes_per_step as f64 / 1e9,
        r.weight_bandwidth_gb_s,
        r.matmul_gflop_s,
        r.saturation_batch
    );
    if let Some(path) = &args.json {
        let mut out = stamped(
            serde_json::to_value(&r)?,
            args,
            layers,
            full_layers,
            build_s,
        );
        out["threads"] = threads.into();
        out["audio_seconds"] = args.audio_seconds.into();
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// A JSON report with what every bench-model report says of the model it measured.
fn stamped(
    mut report: serde_json::Value,
    args: &BenchArgs,
    layers: usize,
    full_layers: usize,
    build_s: f64,
) -> serde_json::Value {
    report["preset"] = args.random_weights.clone().into();
    report["layers_built"] = layers.into();
    report["layers_full"] = full_layers.into();
    report["build_s"] = build_s.into();
    report["decode_tokens"] = args.decode_tokens.into();
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(argv: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(argv.iter().copied())).bench
    }

    /// Random weights at a config from a file (the tiny fixture's), measured and written as JSON.
    #[test]
    fn benchmarks_random_weights_at_a_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("bench.json");
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gazelle/mistral");
        let spec = fixture.join("config.json");
        let (spec, json_arg) = (spec.to_str().unwrap(), json.to_str().unwrap());
        let argv = [
            "--random-weights",
            spec,
            "--dtype",
            "f32",
            "--audio-seconds",
            "1",
            "--prompt-tokens",
            "6",
            "--decode-tokens",
            "3",
            "--repeats",
            "1",
            "--json",
            json_arg,
        ];
        run_bench(args(&argv)).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["decode_tokens"], 3, "{v}");
        assert_eq!(v["layers_built"], v["layers_full"], "{v}");
        // 6 text ids + 7 audio tokens for 1 s of audio.
        assert_eq!(v["prefill_positions"], 13, "{v}");
        let m = &v["measured"];
        for k in [
            "encoder_ms",
            "prefill_ms",
            "decode_tokens_per_s",
            "append_turn_ms",
        ] {
            assert!(m[k].as_f64().unwrap() > 0.0, "{k}: {v}");
        }
    }

    /// `--concurrency` runs the engine benchmark and writes its levels as JSON.
    #[test]
    fn benchmarks_the_engine_at_each_concurrency() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("engine.json");
        let fixture =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gazelle/llama");
        let spec = fixture.join("config.json");
        let argv = [
            "--random-weights",
            spec.to_str().unwrap(),
            "--dtype",
            "f32",
            "--audio-seconds",
            "1",
            "--decode-tokens",
            "5",
            "--concurrency",
            "1,2",
            "--poisson-turns",
            "3",
            "--json",
            json.to_str().unwrap(),
        ];
        run_bench(args(&argv)).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let levels = v["levels"].as_array().unwrap();
        assert_eq!(levels.len(), 2, "{v}");
        assert_eq!(levels[1]["concurrency"], 2, "{v}");
        assert!(
            levels[1]["aggregate_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        assert!(v["weight_bandwidth_gb_s"].as_f64().unwrap() > 0.0, "{v}");
    }

    #[test]
    fn an_unknown_spec_says_what_it_accepts() {
        let e = random_config("mistral-70b").unwrap_err().to_string();
        assert!(
            e.contains("neither a preset (mistral-7b, llama2-7b)"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let e = random_config(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
