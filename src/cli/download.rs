//! `gazelle download`: fill the Hugging Face cache with a model's files, with progress.

use std::path::PathBuf;

use clap::Args;

use gazelle::model::gazelle::hub::{self, HubOptions, DEFAULT_REPO};

/// `gazelle download`: fill the Hub cache with a model's files.
#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// Hub repo id.
    #[arg(default_value = DEFAULT_REPO)]
    pub model: String,
    #[arg(long)]
    pub revision: Option<String>,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run_download(args: DownloadArgs) -> anyhow::Result<()> {
    let opts = HubOptions {
        revision: args.revision,
        cache_dir: args.cache_dir,
        progress: true,
        ..Default::default()
    };
    let files = hub::resolve(&args.model, &opts)?;
    println!("{} is ready:", files.origin);
    let optional = [&files.tokenizer_config, &files.chat_template];
    let all = [&files.config, &files.tokenizer]
        .into_iter()
        .chain(optional.into_iter().flatten());
    for p in all.chain(files.weights.iter()) {
        println!("  {}", p.display());
    }
    Ok(())
}
