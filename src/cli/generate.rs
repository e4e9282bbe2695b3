//! `gazelle generate`: answer one audio clip with the Gazelle model, streaming the text (or one
//! JSON object with tokens and timings).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use gazelle::audio::{resample::resample_all, wav, MODEL_RATE};
#[cfg(test)]
use gazelle::model::device::{DeviceKind, WeightDtype};
use gazelle::model::gazelle::hub::{self, HubOptions, DEFAULT_REPO};
use gazelle::model::gazelle::GenerationParams;

/// Where the model comes from (shared by generate, download and serve).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hub repo id or a local directory with config.json, tokenizer.json and safetensors.
    #[arg(long, env = "GAZELLE_MODEL", default_value = DEFAULT_REPO)]
    pub model: String,
    /// Hub branch, tag or commit to pin.
    #[arg(long)]
    pub revision: Option<String>,
    /// Use only the local Hub cache (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Hub cache root (default: HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

impl ModelArgs {
    pub fn hub_options(&self, progress: bool) -> HubOptions {
        HubOptions {
            revision: self.revision.clone(),
            offline: self.offline,
            cache_dir: self.cache_dir.clone(),
            endpoint: None,
            progress,
        }
    }
}

/// `gazelle generate`: answer one audio clip.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// WAV file (PCM 16-bit or float; other rates are resampled to 16 kHz).
    #[arg(long)]
    pub audio: PathBuf,
    /// The user message; `<|audio|>` marks where the audio goes, else it goes first.
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    generate_to(args, &mut std::io::stdout().lock())
}

/// `gazelle generate`, writing the streamed text (or the JSON object) to `out`.
fn generate_to(args: GenerateArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let (device, precision) = args.precision.open()?;
    let audio = read_wav_16k(&args.audio)?;
    let files = hub::resolve(&args.model.model, &args.model.hub_options(!args.json))?;
    let t = Instant::now();
    let engine = hub::load_engine(&files, precision, &device)?;
    let engine = Arc::new(engine);
    tracing::info!(
        "loaded {} in {:.1}s",
        files.origin,
        t.elapsed().as_secs_f64()
    );
    let mut session = engine.open_session(args.system.as_deref())?;
    let turn = session.append_user_audio_turn(&audio, &args.prompt)?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop_on_eos: true,
    };
    let json = args.json;
    let mut write_err = None;
    let reply = session.generate(&params, |_, piece| {
        if json {
            return ControlFlow::Continue(());
        }
        match write!(out, "{piece}").and_then(|_| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                write_err = Some(e); // e.g. a closed pipe: stop generating
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if json {
        let json = serde_json::json!({
            "tokens": reply.tokens,
            "text": reply.text,
            "prompt_tokens": turn.prompt_ids,
            "audio_embeddings": turn.audio_tokens,
            "stop": reply.stop,
            "timings": {
                "encoder_ms": turn.encoder_ms,
                "prefill_ms": turn.prefill_ms,
                // From the start of audio encoding to the first sampled token.
                "first_token_ms": turn.encoder_ms + turn.prefill_ms + reply.first_token_s * 1e3,
                "decode_tokens_per_s": reply.decode_tokens_per_s,
            },
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

/// Reads a WAV file as mono f32 at 16 kHz (channels averaged, resampled if needed).
pub fn read_wav_16k(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let clip = wav::read(&bytes).with_context(|| format!("decoding {}", path.display()))?;
    Ok(resample_all(&clip.samples, clip.sample_rate, MODEL_RATE)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_cli_runs_on_the_tiny_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("a.wav");
        let samples: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.07).sin() * 0.25).collect();
        let bytes = gazelle::audio::wav::write(&samples, 16000, gazelle::audio::Encoding::Linear16);
        std::fs::write(&wav, bytes).unwrap();
        let model =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gazelle/llama");
        let args = GenerateArgs {
            model: ModelArgs {
                model: model.to_string_lossy().into(),
                revision: None,
                offline: true,
                cache_dir: None,
            },
            audio: wav,
            prompt: "What did you hear?".into(),
            system: Some("Be brief.".into()),
            max_new_tokens: 5,
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            repetition_penalty: 1.1,
            seed: 3,
            precision: super::super::PrecisionArgs {
                dtype: WeightDtype::F32,
                audio_dtype: WeightDtype::F32,
                device: DeviceKind::Cpu,
            },
            json: true,
        };
        let mut out = Vec::new();
        generate_to(args.clone(), &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let tokens = v["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 5, "{v}");
        // 1 s of audio: 49 wav2vec2 frames, padded to 56, stacked by 8.
        assert_eq!(v["audio_embeddings"], 7, "{v}");
        assert!(v["prompt_tokens"].as_u64().unwrap() > 7, "{v}");
        let t = &v["timings"];
        assert!(t["encoder_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(
            t["first_token_ms"].as_f64() >= t["encoder_ms"].as_f64(),
            "{v}"
        );

        // Streaming text mode prints the same reply (same seed) and a newline.
        let mut text = Vec::new();
        generate_to(
            GenerateArgs {
                json: false,
                ..args
            },
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.trim_end_matches('\n'), v["text"].as_str().unwrap());
    }
}
