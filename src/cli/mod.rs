//! The `gazelle` binary's subcommands, one file each; only `main.rs` uses them, and only they use
//! `anyhow`. The library they drive is the `gazelle` crate.

pub mod bench;
mod bench_suite;
pub mod download;
pub mod generate;
pub mod serve;
pub mod vad;

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
