//! The `gazelle` binary's subcommands, one file each; only `main.rs` uses them, and only they use
//! `anyhow`. The library they drive is the `gazelle` crate.

pub mod bench;
mod bench_suite;
pub mod download;
pub mod generate;
pub mod serve;
pub mod vad;

use gazelle::model::device::{open_device, DeviceKind, WeightDtype};
use gazelle::model::gazelle::Precision;

/// Where and in what precision the model runs (`generate` and `bench-model`).
#[derive(Debug, Clone, clap::Args)]
pub struct PrecisionArgs {
    /// Language model dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: WeightDtype,
    /// Audio tower and projector dtype (f32 keeps them within 1e-4 of PyTorch; they are small).
    #[arg(long, value_enum, default_value = "f32")]
    pub audio_dtype: WeightDtype,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceKind,
}

impl PrecisionArgs {
    /// Opens the device and says how the model's parts are stored and computed there.
    pub fn open(&self) -> anyhow::Result<(candle_core::Device, Precision)> {
        let device = open_device(self.device)?;
        let precision = Precision::new(self.dtype.into(), self.audio_dtype.into(), &device);
        Ok((device, precision))
    }
}

pub fn init_logging(json: bool) {
    let _ = init_logging_and_traces(json, None);
}

/// Logs to stderr (filtered by `RUST_LOG`, default `info`), and, with `traces` (the telemetry
/// config and the runtime its exporter runs on) and an `otlp_endpoint` in it, exports spans;
/// the guard flushes them when dropped.
pub fn init_logging_and_traces(
    json: bool,
    traces: Option<(&gazelle::telemetry::TelemetryConfig, tokio::runtime::Handle)>,
) -> anyhow::Result<Option<gazelle::telemetry::Guard>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let (otel, guard) = match traces {
        Some((config, runtime)) => match gazelle::telemetry::layer(config, runtime)? {
            Some((layer, guard)) => (Some(layer), Some(guard)),
            None => (None, None),
        },
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(guard)
}
