//! The `gazelle` command line: `serve` runs the voice server; `generate`, `download` and
//! `bench-model` drive the Gazelle model; `vad` prints the VAD's segments of a file; `machine`
//! prints the CPU kernels ONNX Runtime gets here. Each subcommand lives in `src/cli/`.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gazelle",
    version,
    about = "A voice server: VAD, a speech-language model and TTS in one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the voice server.
    Serve(cli::serve::ServeArgs),
    /// Print the speech segments the VAD finds in a WAV file (as the live pipeline would).
    Vad(cli::vad::VadArgs),
    /// Answer one audio clip with the Gazelle speech-language model.
    Generate(cli::generate::GenerateArgs),
    /// Download a model into the Hugging Face cache.
    Download(cli::download::DownloadArgs),
    /// Measure encoder, prefill and decode speed at a real shape with random weights.
    BenchModel(cli::bench::BenchArgs),
    /// Print this machine's CPU model, the ISA flags ONNX Runtime reads and the kernel sets it
    /// picks (they change the VAD's and the end-of-turn model's numbers in the last digits).
    Machine,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => cli::serve::run(args),
        Command::Vad(args) => cli::vad::run(args),
        Command::Generate(a) => {
            cli::init_logging(false);
            cli::generate::run_generate(a)
        }
        Command::Download(a) => {
            cli::init_logging(false);
            cli::download::run_download(a)
        }
        Command::Machine => {
            println!("{}", gazelle::vad::kernels::CpuReport::this_machine());
            Ok(())
        }
        Command::BenchModel(a) => {
            cli::init_logging(false);
            cli::bench::run_bench(a)
        }
    }
}
