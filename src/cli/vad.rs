//! `gazelle vad FILE`: the speech segments the VAD finds in a WAV file, as the live pipeline
//! would find them.

use std::path::PathBuf;

use anyhow::Context;

use gazelle::config::Config;

#[derive(clap::Args)]
pub struct VadArgs {
    /// A WAV file (PCM16, float32 or µ-law; any rate and channel count).
    wav: PathBuf,
    /// Print JSON: {"sample_rate": 16000, "segments": [{"start": samples, "end": samples}]}.
    #[arg(long)]
    json: bool,
    /// Run the model at 8000 Hz instead of 16000 Hz.
    #[arg(long, default_value_t = 16_000)]
    rate: u32,
    /// TOML config file whose [pipeline.vad] settings to use.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    #[arg(long)]
    vad_model: Option<PathBuf>,
}

pub fn run(args: VadArgs) -> anyhow::Result<()> {
    use gazelle::{assets, audio, vad};
    let config = Config::load(args.config.as_deref())?;
    let bytes =
        std::fs::read(&args.wav).with_context(|| format!("reading {}", args.wav.display()))?;
    let clip =
        audio::wav::read(&bytes).with_context(|| format!("decoding {}", args.wav.display()))?;
    let samples = audio::resample::resample_all(&clip.samples, clip.sample_rate, args.rate)?;
    let env = vad::silero::init_runtime(&assets::ort_lib(args.ort_lib.as_deref())?)?;
    let mut model = vad::SileroModel::load(env, &assets::vad_model(args.vad_model.as_deref())?)?;
    let segments = vad::offline::segments(&mut model, &samples, args.rate, config.pipeline.vad)?;
    if args.json {
        let out = serde_json::json!({ "sample_rate": args.rate, "segments": segments });
        println!("{out}");
    } else {
        for s in &segments {
            let r = args.rate as f64;
            println!("{:8.3} s – {:8.3} s", s.start as f64 / r, s.end as f64 / r);
        }
    }
    Ok(())
}
