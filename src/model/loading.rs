//! A speech-language model that loads in the background. Fetching and loading a 7B model takes
//! from seconds to many minutes, so the server listens at once: `/health` says `loading` (and
//! how long it has taken) and new calls are refused with a clear error until the model is ready,
//! or says `error` with the reason if loading failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{ModelError, ModelStatus, SlmError, SlmSession, SpeechLanguageModel};

enum State {
    Loading,
    Ready(Arc<dyn SpeechLanguageModel>),
    Failed(ModelError),
}

/// A model whose loader runs on its own thread; calls reach the loaded model once it is there.
pub(crate) struct LoadingModel {
    name: String,
    started: Instant,
    state: watch::Receiver<State>,
}

impl LoadingModel {
    /// Starts `load` on a new thread and returns at once.
    pub(crate) fn spawn<F>(name: &str, load: F) -> Self
    where
        F: FnOnce() -> Result<Arc<dyn SpeechLanguageModel>, ModelError> + Send + 'static,
    {
        let (tx, rx) = watch::channel(State::Loading);
        let label = name.to_string();
        std::thread::Builder::new()
            .name("model-load".into())
            .spawn(move || {
                let started = Instant::now();
                let state = match load() {
                    Ok(m) => {
                        let secs = started.elapsed().as_secs_f64();
                        tracing::info!(model = %label, secs, "model ready");
                        State::Ready(m)
                    }
                    Err(e) => {
                        tracing::error!(model = %label, error = %e, "the model failed to load");
                        State::Failed(e)
                    }
                };
                tx.send_replace(state);
            })
            .expect("spawn the model loader");
        LoadingModel {
            name: name.to_string(),
            started: Instant::now(),
            state: rx,
        }
    }

    /// Resolves with the reason once loading has failed; never resolves if it succeeds.
    pub(crate) async fn failure(&self) -> ModelError {
        let mut rx = self.state.clone();
        let outcome = rx
            .wait_for(|s| !matches!(s, State::Loading))
            .await
            .map(|s| match &*s {
                State::Failed(e) => Some(e.clone()),
                _ => None,
            });
        match outcome {
            Ok(Some(e)) => e,
            Ok(None) => std::future::pending().await,
            Err(_) => stopped(),
        }
    }

    /// Waits until the model is ready (`Ok`) or has failed to load (`Err` with the reason).
    #[cfg(test)]
    pub(crate) async fn ready(&self) -> Result<(), ModelError> {
        let mut rx = self.state.clone();
        let s = rx
            .wait_for(|s| !matches!(s, State::Loading))
            .await
            .map_err(|_| stopped())?;
        match &*s {
            State::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }
}

impl SpeechLanguageModel for LoadingModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> ModelStatus {
        match &*self.state.borrow() {
            State::Loading => ModelStatus::Loading {
                elapsed: self.started.elapsed(),
            },
            State::Ready(m) => m.status(),
            State::Failed(e) => ModelStatus::Failed(e.to_string()),
        }
    }

    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError> {
        let model = match &*self.state.borrow() {
            State::Ready(m) => m.clone(),
            State::Loading => {
                return Err(SlmError::Loading {
                    name: self.name.clone(),
                    secs: self.started.elapsed().as_secs(),
                });
            }
            State::Failed(e) => {
                return Err(SlmError::LoadFailed {
                    name: self.name.clone(),
                    source: e.clone(),
                })
            }
        };
        model.open_session(system_prompt)
    }
}

/// The loader thread ended without saying how (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("the model loader stopped without a result")]
struct LoaderStopped;

fn stopped() -> ModelError {
    Arc::new(LoaderStopped)
}

impl ModelStatus {
    /// How `/health` words it: `ok`, `loading` or `error`.
    pub(crate) fn word(&self) -> &'static str {
        match self {
            ModelStatus::Ready => "ok",
            ModelStatus::Loading { .. } => "loading",
            ModelStatus::Failed(_) => "error",
        }
    }

    /// Loading time so far, while loading.
    pub(crate) fn loading_for(&self) -> Option<Duration> {
        match self {
            ModelStatus::Loading { elapsed } => Some(*elapsed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::scripted::ScriptedModel;

    #[tokio::test]
    async fn refuses_calls_until_loaded_then_serves_them() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let m = LoadingModel::spawn("slow", move || {
            go_rx.recv().map_err(|e| Arc::new(e) as ModelError)?;
            Ok(Arc::new(ScriptedModel::new("Hi.", Duration::ZERO)) as Arc<dyn SpeechLanguageModel>)
        });
        assert_eq!(m.status().word(), "loading");
        assert!(m.status().loading_for().is_some());
        let Err(e) = m.open_session(None) else {
            panic!("a session opened before the model loaded")
        };
        assert!(e.to_string().contains("still loading"), "{e}");
        go_tx.send(()).unwrap();
        m.ready().await.unwrap();
        assert_eq!(m.status().word(), "ok");
        assert!(m.open_session(None).is_ok());
    }

    #[tokio::test]
    async fn a_failed_load_is_reported_with_its_reason() {
        let m = LoadingModel::spawn("broken", || {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, "config.json: no such file");
            Err(Arc::new(e) as ModelError)
        });
        assert_eq!(m.failure().await.to_string(), "config.json: no such file");
        assert!(matches!(m.status(), ModelStatus::Failed(ref e) if e.contains("config.json")));
        assert_eq!(m.status().word(), "error");
        let Err(e) = m.open_session(None) else {
            panic!("a session opened on a failed model")
        };
        assert!(
            e.to_string().contains("broken failed to load: config.json"),
            "{e}"
        );
        assert!(m.ready().await.is_err());
    }
}
