//! Finding a Gazelle checkpoint's files: a local directory, or a Hugging Face Hub repo in the
//! standard cache layout (`<cache>/models--org--name/{refs/<rev>, snapshots/<commit>/…}`), which
//! Python's `huggingface_hub` shares.
//!
//! hf-hub 0.5 (sync API) does the downloads, with its indicatif progress bar. Cache lookups are
//! ours, because 0.5 ignores `HF_HUB_OFFLINE` and cannot resolve a commit-hash revision from the
//! cache: offline mode must never touch the network.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use candle_core::Device;

use super::config::{GazelleConfig, GazelleConfigError};
use super::model::{Gazelle, Precision};
use super::prompt::{ChatPrompt, PromptError};
use super::session::LoadedGazelle;

/// The Mistral-7B based release.
pub const DEFAULT_REPO: &str = "tincans-ai/gazelle-v0.2";

/// Errors that say which file is missing where, and what to try next.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{file}` is missing from {location}. {hint}")]
    Missing {
        file: String,
        location: String,
        hint: String,
    },
    #[error(
        "downloading `{file}` from {repo}@{revision} failed: {message}. Check the network or \
             HF_TOKEN, or use --offline to load only from the cache at {cache}"
    )]
    Download {
        file: String,
        repo: String,
        revision: String,
        message: String,
        cache: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors index: {message}")]
    BadIndex { path: String, message: String },
    #[error("`{0}` is neither a directory nor a Hub repo id like `tincans-ai/gazelle-v0.2`")]
    BadModel(String),
}

/// Where and how to look for a Hub model.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Branch, tag or commit; `main` when unset.
    pub revision: Option<String>,
    /// Use only the cache (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The hub cache root; else `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Hub endpoint; else `HF_ENDPOINT` or huggingface.co.
    pub endpoint: Option<String>,
    /// Show a progress bar per downloaded file.
    pub progress: bool,
}

impl HubOptions {
    pub(crate) fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    pub(crate) fn cache_dir(&self) -> PathBuf {
        if let Some(d) = &self.cache_dir {
            return d.clone();
        }
        if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
            return d.into();
        }
        if let Some(d) = std::env::var_os("HF_HOME") {
            return Path::new(&d).join("hub");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        Path::new(&home).join(".cache/huggingface/hub")
    }

    pub(crate) fn offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
            })
    }
}

/// The files a Gazelle needs.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Human-readable origin, e.g. `tincans-ai/gazelle-v0.2@main (cache)`.
    pub origin: String,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    /// One file, or the shards named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
}

enum Source {
    Dir(PathBuf),
    Cache {
        snapshot: Option<PathBuf>,
        repo: String,
        revision: String,
        cache: PathBuf,
    },
    Online {
        api: Box<hf_hub::api::sync::ApiRepo>,
        repo: String,
        revision: String,
        cache: PathBuf,
    },
}

/// Looks a file up in the standard cache: `refs/<revision>` names the snapshot, unless the
/// revision is itself a commit hash with a snapshot folder.
pub(crate) fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let direct = root.join("snapshots").join(revision);
    if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) && direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(root.join("refs").join(revision)).ok()?;
    let snap = root.join("snapshots").join(commit.trim());
    snap.is_dir().then_some(snap)
}

impl Source {
    fn location(&self) -> String {
        match self {
            Source::Dir(d) => format!("directory {}", d.display()),
            Source::Cache {
                repo,
                revision,
                cache,
                ..
            } => {
                format!(
                    "the cache for {repo}@{revision} in {} (offline)",
                    cache.display()
                )
            }
            Source::Online { repo, revision, .. } => format!("{repo}@{revision}"),
        }
    }

    /// An optional file: `None` if the source lacks it, or if the Hub cannot be reached and the
    /// cache lacks it (as Python's hub client falls back to the cache).
    fn get(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        match self.fetch(file) {
            Err(e @ HubError::Download { .. }) => {
                tracing::warn!("optional file skipped: {e}");
                Ok(None)
            }
            other => other,
        }
    }

    /// The file's local path, `None` if the source does not have it.
    fn fetch(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        match self {
            Source::Dir(d) => Ok(Some(d.join(file)).filter(|p| p.is_file())),
            Source::Cache { snapshot, .. } => Ok(snapshot
                .as_ref()
                .map(|s| s.join(file))
                .filter(|p| p.is_file())),
            Source::Online {
                api,
                repo,
                revision,
                cache,
            } => match api.get(file) {
                Ok(p) => Ok(Some(p)),
                // hf-hub 0.5 wraps ureq's status errors; a 404 means the repo lacks the file.
                Err(e) if e.to_string().contains("404") => Ok(None),
                Err(e) => Err(HubError::Download {
                    file: file.into(),
                    repo: repo.clone(),
                    revision: revision.clone(),
                    message: e.to_string(),
                    cache: cache.display().to_string(),
                }),
            },
        }
    }

    fn require(&self, file: &str, hint: &str) -> Result<PathBuf, HubError> {
        self.fetch(file)?.ok_or_else(|| HubError::Missing {
            file: file.into(),
            location: self.location(),
            hint: hint.into(),
        })
    }
}

fn open_source(model: &str, opts: &HubOptions) -> Result<Source, HubError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(Source::Dir(path.to_path_buf()));
    }
    let valid_id = model.split('/').count() == 2 && !model.starts_with(['.', '/']);
    if !valid_id || path.exists() {
        return Err(HubError::BadModel(model.into()));
    }
    let (repo, revision, cache) = (
        model.to_string(),
        opts.revision().to_string(),
        opts.cache_dir(),
    );
    if opts.offline() {
        let snapshot = cached_snapshot(&cache, &repo, &revision);
        return Ok(Source::Cache {
            snapshot,
            repo,
            revision,
            cache,
        });
    }
    let mut builder =
        ApiBuilder::from_cache(Cache::new(cache.clone())).with_progress(opts.progress);
    if let Some(e) = opts
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
    {
        builder = builder.with_endpoint(e);
    }
    let api = builder.build().map_err(|e| HubError::Download {
        file: "(client setup)".into(),
        repo: repo.clone(),
        revision: revision.clone(),
        message: e.to_string(),
        cache: cache.display().to_string(),
    })?;
    let api = Box::new(api.repo(Repo::with_revision(
        repo.clone(),
        RepoType::Model,
        revision.clone(),
    )));
    Ok(Source::Online {
        api,
        repo,
        revision,
        cache,
    })
}

/// Finds (downloading if allowed) config, tokenizer and weights for `model`: a directory, or a
/// Hub repo id (default [`DEFAULT_REPO`]).
pub fn resolve(model: &str, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    let src = open_source(model, opts)?;
    if let Source::Cache {
        snapshot: None,
        repo,
        revision,
        cache,
    } = &src
    {
        return Err(HubError::Missing {
            file: format!("refs/{revision} or snapshots/{revision}"),
            location: format!("the cache for {repo} in {} (offline)", cache.display()),
            hint: format!(
                "Run `gazelle download {repo}` with network access, or copy the \
                           models--{} folder from another machine.",
                repo.replace('/', "--")
            ),
        });
    }
    let config = src.require("config.json", "Is this a Gazelle checkpoint?")?;
    // gazelle-v0.1 ships only the SentencePiece model, which is converted at load.
    let tokenizer = match src.fetch("tokenizer.json")? {
        Some(t) => t,
        None => src.require(
            "tokenizer.model",
            "Gazelle needs tokenizer.json or a SentencePiece tokenizer.model; neither was found.",
        )?,
    };
    let tokenizer_config = src.get("tokenizer_config.json")?;
    let chat_template = src.get("chat_template.jinja")?;
    let weights = match src.get("model.safetensors.index.json")? {
        Some(index) => {
            let text = std::fs::read_to_string(&index).map_err(|source| HubError::Io {
                path: index.display().to_string(),
                source,
            })?;
            let bad = |message: String| HubError::BadIndex {
                path: index.display().to_string(),
                message,
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| bad("no weight_map".into()))?;
            let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.sort_unstable();
            shards.dedup();
            shards
                .into_iter()
                .map(|s| src.require(s, "The index names this shard; the download is incomplete."))
                .collect::<Result<Vec<_>, _>>()?
        }
        None => vec![src.require(
            "model.safetensors",
            "Neither model.safetensors nor model.safetensors.index.json was found; PyTorch .bin \
             weights are not supported (convert them to safetensors).",
        )?],
    };
    Ok(ModelFiles {
        origin: src.location(),
        config,
        tokenizer,
        tokenizer_config,
        chat_template,
        weights,
    })
}

/// Errors from turning resolved files into a ready engine.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("{path}: {source}")]
    Config {
        path: String,
        source: GazelleConfigError,
    },
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("loading weights from {origin}: {source}")]
    Weights {
        origin: String,
        source: candle_core::Error,
    },
}

/// Reads config, weights and tokenizer into an engine.
pub fn load_engine(
    files: &ModelFiles,
    precision: Precision,
    device: &Device,
) -> Result<LoadedGazelle, LoadError> {
    let config_err = |source| LoadError::Config {
        path: files.config.display().to_string(),
        source,
    };
    let text = std::fs::read_to_string(&files.config).map_err(|source| HubError::Io {
        path: files.config.display().to_string(),
        source,
    })?;
    let cfg = GazelleConfig::from_json_str(&text).map_err(config_err)?;
    let model = Gazelle::load(&cfg, &files.weights, precision, device).map_err(|source| {
        LoadError::Weights {
            origin: files.origin.clone(),
            source,
        }
    })?;
    let prompt = ChatPrompt::from_files(
        &files.tokenizer,
        files.tokenizer_config.as_deref(),
        files.chat_template.as_deref(),
    )?;
    let engine = LoadedGazelle::new(model, prompt)?;
    log_resolved(&engine, precision);
    Ok(engine)
}

/// Says at load what the checkpoint resolved to, so a wrong shape or dtype shows in the log.
fn log_resolved(engine: &LoadedGazelle, precision: Precision) {
    let c = engine.model.config();
    let (a, t) = (&c.audio, &c.text);
    tracing::info!(
        audio_tower = a.model_type.as_deref().unwrap_or("wav2vec2"),
        audio_hidden = a.hidden_size,
        audio_layers = a.num_hidden_layers,
        projector_width = c.projector_hidden,
        stack_factor = c.stack_factor,
        text_arch = ?t.arch,
        layers = t.num_hidden_layers,
        hidden = t.hidden_size,
        heads = t.num_attention_heads,
        kv_heads = t.num_key_value_heads,
        head_dim = t.head_dim,
        vocab = t.vocab_size,
        rope_theta = t.rope_theta,
        sliding_window = ?t.sliding_window,
        weights = ?precision.weights,
        compute = ?precision.compute,
        audio_dtype = ?precision.audio,
        kv_bytes_per_position = engine.kv_bytes_per_position(),
        "Gazelle configuration"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gazelle::parity_tests::fixture_dir;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A cache folder as huggingface_hub lays it out (files copied instead of blob symlinks).
    fn fake_cache(root: &Path) {
        let repo = root.join("models--tiny-org--gazelle-tiny");
        let snap = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixture_dir("mistral").join(f), snap.join(f)).unwrap();
        }
    }

    #[test]
    fn offline_cache_resolves_branch_and_commit() {
        let tmp = tempfile::tempdir().unwrap();
        fake_cache(tmp.path());
        let mut opts = HubOptions {
            offline: true,
            cache_dir: Some(tmp.path().into()),
            ..Default::default()
        };
        let files = resolve("tiny-org/gazelle-tiny", &opts).unwrap();
        assert!(files.weights[0].ends_with("model.safetensors"));
        assert!(files.tokenizer_config.is_some() && files.chat_template.is_none());
        opts.revision = Some(COMMIT.into());
        assert!(resolve("tiny-org/gazelle-tiny", &opts).is_ok());
        opts.revision = Some("v9".into());
        let err = resolve("tiny-org/gazelle-tiny", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refs/v9") && err.contains("gazelle download"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_error_names_file_and_place() {
        let tmp = tempfile::tempdir().unwrap();
        fake_cache(tmp.path());
        let snap = tmp
            .path()
            .join("models--tiny-org--gazelle-tiny/snapshots")
            .join(COMMIT);
        std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
        let opts = HubOptions {
            offline: true,
            cache_dir: Some(tmp.path().into()),
            ..Default::default()
        };
        let err = resolve("tiny-org/gazelle-tiny", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`tokenizer.model` is missing")
                && err.contains("tokenizer.json or a SentencePiece tokenizer.model")
                && err.contains("offline"),
            "{err}"
        );
        // gazelle-v0.1's layout: no tokenizer.json, a tokenizer.model instead.
        std::fs::write(snap.join("tokenizer.model"), b"sp").unwrap();
        let files = resolve("tiny-org/gazelle-tiny", &opts).unwrap();
        assert!(files.tokenizer.ends_with("tokenizer.model"));
        let err = resolve("not a repo", &opts).unwrap_err().to_string();
        assert!(err.contains("neither a directory"), "{err}");
    }

    #[test]
    fn online_mode_serves_cached_files_without_network() {
        // An endpoint nobody listens on: every required file must come from the cache.
        let tmp = tempfile::tempdir().unwrap();
        fake_cache(tmp.path());
        let opts = HubOptions {
            cache_dir: Some(tmp.path().into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let files = resolve("tiny-org/gazelle-tiny", &opts).unwrap();
        assert!(files.origin.contains("tiny-org/gazelle-tiny@main"));
        let p = Precision::uniform(candle_core::DType::F32);
        let engine = std::sync::Arc::new(load_engine(&files, p, &Device::Cpu).unwrap());
        let mut s = engine.open_session(Some("Be brief.")).unwrap();
        s.append_user_audio_turn(&vec![0.1f32; 8000], "").unwrap();
        // A required file that is not cached gives a download error that suggests --offline.
        let snap = tmp
            .path()
            .join("models--tiny-org--gazelle-tiny/snapshots")
            .join(COMMIT);
        std::fs::remove_file(snap.join("config.json")).unwrap();
        let err = resolve("tiny-org/gazelle-tiny", &opts)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`config.json`") && err.contains("--offline"),
            "{err}"
        );
    }

    #[test]
    fn offline_cache_model_loads_and_generates() {
        let tmp = tempfile::tempdir().unwrap();
        fake_cache(tmp.path());
        let opts = HubOptions {
            offline: true,
            cache_dir: Some(tmp.path().into()),
            ..Default::default()
        };
        let files = resolve("tiny-org/gazelle-tiny", &opts).unwrap();
        let p = Precision::uniform(candle_core::DType::F32);
        let engine = std::sync::Arc::new(load_engine(&files, p, &Device::Cpu).unwrap());
        let mut s = engine.open_session(None).unwrap();
        s.append_user_audio_turn(&vec![0.1f32; 8000], "Hi").unwrap();
        let p = crate::model::gazelle::GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        };
        let reply = s
            .generate(&p, |_, _| std::ops::ControlFlow::Continue(()))
            .unwrap();
        assert!(!reply.tokens.is_empty());
    }

    #[test]
    fn local_directory_is_a_model() {
        let files = resolve(
            fixture_dir("llama").to_str().unwrap(),
            &HubOptions::default(),
        )
        .unwrap();
        assert_eq!(files.weights.len(), 1);
        assert!(files.origin.starts_with("directory"));
    }
}
