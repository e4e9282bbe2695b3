//! `gazelle serve`: the voice server. Flags override the TOML config, which overrides the
//! defaults; the model may go on loading after the server listens, and a failed load ends it.

use std::path::PathBuf;

use anyhow::Context;

use gazelle::config::{Config, SlmKind};
use gazelle::model::device::{DeviceKind, WeightDtype};
use gazelle::server;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// TOML config file; flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long, short)]
    port: Option<u16>,
    /// The speech-language model.
    #[arg(long, value_enum)]
    slm: Option<SlmKind>,
    /// The scripted model's reply.
    #[arg(long)]
    reply: Option<String>,
    /// Use Gazelle from this Hub repo id or local directory (implies --slm gazelle).
    #[arg(long)]
    model: Option<String>,
    /// Hub branch, tag or commit of --model.
    #[arg(long)]
    revision: Option<String>,
    /// Load --model from the local Hub cache only.
    #[arg(long)]
    offline: bool,
    /// Gazelle language-model dtype.
    #[arg(long, value_enum)]
    dtype: Option<WeightDtype>,
    /// Where Gazelle runs (cuda needs a build with --features cuda).
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// An OpenAI-compatible server with an audio model, e.g. vLLM serving Ultravox (implies
    /// --slm openai; its key in $GAZELLE_SLM_API_KEY or [slm.openai] api_key_env).
    #[arg(long)]
    slm_url: Option<String>,
    /// The model name that server serves.
    #[arg(long)]
    slm_model: Option<String>,
    /// Answers a turn the model fails before its first token.
    #[arg(long, value_enum)]
    slm_fallback: Option<SlmKind>,
    /// Delay before each token of the scripted reply, in milliseconds.
    #[arg(long)]
    token_delay_ms: Option<u64>,
    /// The ONNX Runtime shared library (else $GAZELLE_ORT_LIB, $ORT_DYLIB_PATH, the cache).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
    /// The Silero VAD model (else $GAZELLE_VAD_MODEL, the cache).
    #[arg(long)]
    vad_model: Option<PathBuf>,
    /// Folder with libespeak-ng.so and espeak-ng-data (else $GAZELLE_ESPEAK_DIR, the cache).
    #[arg(long)]
    espeak_dir: Option<PathBuf>,
    /// espeak-ng voice name.
    #[arg(long)]
    voice: Option<String>,
    /// Spoken at the start of each call unless the client sends its own.
    #[arg(long)]
    first_message: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn merged_config(a: &ServeArgs) -> anyhow::Result<Config> {
    let mut c = Config::load(a.config.as_deref())?;
    if let Some(h) = &a.host {
        c.server.host = h.clone();
    }
    if let Some(p) = a.port {
        c.server.port = p;
    }
    if let Some(k) = a.slm {
        c.slm.kind = k;
    }
    if let Some(r) = &a.reply {
        c.slm.reply = r.clone();
    }
    if let Some(m) = &a.model {
        c.slm.kind = SlmKind::Gazelle;
        c.slm.gazelle.model = m.clone();
    }
    if let Some(r) = &a.revision {
        c.slm.gazelle.revision = Some(r.clone());
    }
    c.slm.gazelle.offline |= a.offline;
    if let Some(d) = a.dtype {
        c.slm.gazelle.dtype = d;
    }
    if let Some(d) = a.device {
        c.slm.gazelle.device = d;
    }
    if let Some(u) = &a.slm_url {
        c.slm.kind = SlmKind::Openai;
        c.slm.openai.base_url = u.clone();
    }
    if let Some(m) = &a.slm_model {
        c.slm.openai.model = m.clone();
    }
    if let Some(f) = a.slm_fallback {
        c.slm.fallback = Some(f);
    }
    if let Some(d) = a.token_delay_ms {
        c.slm.token_delay_ms = d;
    }
    if let Some(p) = &a.ort_lib {
        c.assets.ort_lib = Some(p.clone());
    }
    if let Some(p) = &a.vad_model {
        c.assets.vad_model = Some(p.clone());
    }
    if let Some(p) = &a.espeak_dir {
        c.assets.espeak_dir = Some(p.clone());
    }
    if let Some(v) = &a.voice {
        c.tts.espeak.voice = v.clone();
    }
    if let Some(m) = &a.first_message {
        c.pipeline.first_message = Some(m.clone());
    }
    c.server.log_json |= a.log_json;
    c.validate()?;
    Ok(c)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = merged_config(&args)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let traces = super::init_logging_and_traces(
        config.server.log_json,
        Some((&config.telemetry, runtime.handle().clone())),
    )?;
    if let Some(e) = &config.telemetry.otlp_endpoint {
        tracing::info!(endpoint = %e, "exporting traces over OTLP/HTTP");
    }
    check_fd_limit(&config);
    let (services, load) = server::setup::services(&config)?;
    let state = server::setup::state(&config, services);
    runtime.block_on(async move {
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("gazelle listening on http://{}", listener.local_addr()?);
        // A model that fails to load ends the server, with the reason, instead of leaving it up
        // and useless.
        let failed = std::sync::Arc::new(std::sync::OnceLock::new());
        let stop = server::Stop::default();
        {
            let (failed, stop) = (failed.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    e = load.failure() => {
                        let _ = failed.set(e);
                        stop.now.cancel();
                        return;
                    }
                }
                eprintln!("draining: new calls are refused; live calls go on (a second signal ends them now)");
                stop.drain.cancel();
                shutdown_signal().await;
                stop.now.cancel();
            });
        }
        server::serve(listener, state, stop).await?;
        // The last spans go out before the runtime stops.
        let _ = tokio::task::spawn_blocking(move || drop(traces)).await;
        if let Some(e) = failed.get() {
            anyhow::bail!("cannot load the speech-language model: {e}");
        }
        anyhow::Ok(())
    })
}

/// Raises the open-file limit and warns when the connection caps could still exceed it.
fn check_fd_limit(config: &Config) {
    let s = &config.server;
    let needed = (s.max_connections + s.max_pending_sockets + s.max_calls) as u64 + 256;
    match server::listener::raise_fd_limit() {
        Some(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit is below server.max_connections + max_pending_sockets + \
             max_calls (+256 for the rest); lower those or raise `ulimit -n`"
        ),
        Some(_) => {}
        None => tracing::warn!("cannot read the open-file limit"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
