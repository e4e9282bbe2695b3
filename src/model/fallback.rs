//! A speech-language model with a second one behind it (`[slm] fallback`): a turn whose reply
//! fails before its first token (the primary's server down, refusing or silent) is answered by
//! the fallback instead, from the same audio; the next turn tries the primary again. A failure
//! after the first token ends the reply as usual: the caller has heard part of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::TOKEN_QUEUE;
use super::{ModelStatus, SlmError, SlmSession, SpeechLanguageModel, TokenStream, UserTurn};

pub(crate) struct FallbackModel {
    primary: Arc<dyn SpeechLanguageModel>,
    fallback: Arc<dyn SpeechLanguageModel>,
}

impl FallbackModel {
    pub(crate) fn new(
        primary: Arc<dyn SpeechLanguageModel>,
        fallback: Arc<dyn SpeechLanguageModel>,
    ) -> Self {
        FallbackModel { primary, fallback }
    }
}

impl SpeechLanguageModel for FallbackModel {
    fn name(&self) -> &str {
        self.primary.name()
    }

    fn status(&self) -> ModelStatus {
        match self.primary.status() {
            ModelStatus::Ready => ModelStatus::Ready,
            // Calls can go on with the fallback alone.
            _ => self.fallback.status(),
        }
    }

    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError> {
        let fallback = self.fallback.open_session(system_prompt)?;
        let primary = match self.primary.open_session(system_prompt) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "the primary model cannot take the call; its fallback answers");
                None
            }
        };
        Ok(Box::new(FallbackSession {
            primary,
            fallback: Arc::new(Mutex::new(fallback)),
            used: Arc::new(AtomicBool::new(false)),
        }))
    }
}

struct FallbackSession {
    primary: Option<Box<dyn SlmSession>>,
    fallback: Arc<Mutex<Box<dyn SlmSession>>>,
    /// Whether the fallback answers the current turn.
    used: Arc<AtomicBool>,
}

impl FallbackSession {
    fn start(&mut self, turn: UserTurn, cancel: CancellationToken, tentative: bool) -> TokenStream {
        self.used.store(false, Ordering::SeqCst);
        let open = move |s: &mut Box<dyn SlmSession>, turn: UserTurn, cancel: CancellationToken| {
            if tentative {
                s.begin_tentative(turn, cancel)
            } else {
                s.respond(turn, cancel)
            }
        };
        let Some(primary) = self.primary.as_mut() else {
            self.used.store(true, Ordering::SeqCst);
            let mut f = self.fallback.lock().expect("not poisoned");
            return open(&mut f, turn, cancel);
        };
        let mut first = open(primary, turn.clone(), cancel.clone());
        let (tx, rx) = mpsc::channel(TOKEN_QUEUE);
        let fallback = self.fallback.clone();
        let used = self.used.clone();
        tokio::spawn(async move {
            let head = tokio::select! {
                _ = cancel.cancelled() => return,
                t = first.recv() => t,
            };
            let mut rest = match head {
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the primary model failed the turn; its fallback answers");
                    used.store(true, Ordering::SeqCst);
                    let mut f = fallback.lock().expect("not poisoned");
                    open(&mut f, turn, cancel.clone())
                }
                Some(Ok(t)) => {
                    if tx.send(Ok(t)).await.is_err() {
                        return;
                    }
                    first
                }
                None => return,
            };
            while let Some(t) = tokio::select! {
                _ = cancel.cancelled() => None,
                t = rest.recv() => t,
            } {
                if tx.send(t).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Runs `f` on the session that answers the current turn (both for commit and discard,
    /// which a session without a tentative turn ignores).
    fn each(&mut self, f: impl Fn(&mut Box<dyn SlmSession>)) {
        if let Some(p) = self.primary.as_mut() {
            f(p);
        }
        f(&mut self.fallback.lock().expect("not poisoned"));
    }
}

impl SlmSession for FallbackSession {
    fn respond(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel, false)
    }

    fn begin_tentative(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel, true)
    }

    fn commit(&mut self) {
        self.each(|s| s.commit());
    }

    fn discard(&mut self) {
        self.each(|s| s.discard());
    }

    fn reply_truncated(&mut self, spoken: &str) {
        if self.used.load(Ordering::SeqCst) {
            self.fallback
                .lock()
                .expect("not poisoned")
                .reply_truncated(spoken);
        } else if let Some(p) = self.primary.as_mut() {
            p.reply_truncated(spoken);
        }
    }
}
