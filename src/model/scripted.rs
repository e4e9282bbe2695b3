//! The scripted speech-language model: answers every turn with a fixed reply, one word-piece token
//! at a time with a fixed delay. It lets a user check microphone, VAD, TTS and network without a
//! GPU or weights, and lets benchmarks measure the pipeline without model cost.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SlmSession, SpeechLanguageModel, TokenStream, UserTurn, TOKEN_QUEUE};

#[derive(Debug, Clone)]
pub struct ScriptedModel {
    reply: String,
    token_delay: Duration,
}

impl ScriptedModel {
    pub fn new(reply: impl Into<String>, token_delay: Duration) -> Self {
        ScriptedModel {
            reply: reply.into(),
            token_delay,
        }
    }

    /// The reply split the way a subword model streams it: each piece carries its leading space.
    pub fn tokens(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for ch in self.reply.chars() {
            if ch.is_whitespace() && !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.push(ch);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

impl SpeechLanguageModel for ScriptedModel {
    fn name(&self) -> &str {
        "scripted"
    }

    fn open_session(
        &self,
        _system_prompt: Option<&str>,
    ) -> Result<Box<dyn SlmSession>, super::SlmError> {
        Ok(Box::new(self.clone()))
    }
}

impl SlmSession for ScriptedModel {
    fn respond(&mut self, _turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        let (tx, rx) = mpsc::channel(TOKEN_QUEUE);
        let tokens = self.tokens();
        let delay = self.token_delay;
        tokio::spawn(async move {
            for t in tokens {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if cancel.is_cancelled() || tx.send(Ok(t)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn tokens_keep_leading_spaces_and_rebuild_the_reply() {
        let m = ScriptedModel::new("Hello there, friend.  Bye!", Duration::ZERO);
        let t = m.tokens();
        assert_eq!(t, vec!["Hello", " there,", " friend.", "  Bye!"]);
        assert_eq!(t.concat(), "Hello there, friend.  Bye!");
    }

    #[tokio::test]
    async fn cancel_stops_the_stream() {
        let mut m = ScriptedModel::new("one two three four", Duration::from_millis(20));
        let cancel = CancellationToken::new();
        let turn = UserTurn {
            audio: Arc::from(vec![0.0f32; 10]),
        };
        let mut rx = m.respond(turn, cancel.clone());
        assert_eq!(rx.recv().await.unwrap().unwrap(), "one");
        cancel.cancel();
        let started = std::time::Instant::now();
        assert!(rx.recv().await.is_none());
        assert!(started.elapsed() < Duration::from_millis(15));
    }
}
