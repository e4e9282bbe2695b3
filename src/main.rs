//! The `gazelle` binary: subcommands over the library.

use clap::{Parser, Subcommand};
use gazelle::model::{bench, cli};

#[derive(Parser)]
#[command(name = "gazelle", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one audio clip with the Gazelle speech-language model.
    Generate(cli::GenerateArgs),
    /// Download a model into the Hugging Face cache.
    Download(cli::DownloadArgs),
    /// Measure encoder, prefill and decode speed at a real shape with random weights.
    BenchModel(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(a) => cli::run_generate(a),
        Command::Download(a) => cli::run_download(a),
        Command::BenchModel(a) => bench::run_bench(a),
    }
}
