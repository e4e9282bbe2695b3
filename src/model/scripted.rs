//! The scripted speech-language model: answers every turn with a fixed reply, one word-piece token
//! at a time with a fixed delay. It lets a user check microphone, VAD, TTS and network without a
//! GPU or weights, and lets benchmarks measure the pipeline without model cost.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
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
        Ok(Box::new(ScriptedSession {
            model: self.clone(),
            decision: None,
        }))
    }
}

/// One call's scripted session: its open tentative reply, if any.
struct ScriptedSession {
    model: ScriptedModel,
    /// Set to `Some(true)` on commit, `Some(false)` on discard.
    decision: Option<watch::Sender<Option<bool>>>,
}

impl ScriptedSession {
    fn start(&mut self, cancel: CancellationToken, tentative: bool) -> TokenStream {
        let (tx, rx) = mpsc::channel(TOKEN_QUEUE);
        let tokens = self.model.tokens();
        let delay = self.model.token_delay;
        // A tentative reply streams like any other (the call holds it back from the user); a
        // discard ends it where it stands.
        let (decide, decided) = watch::channel(None);
        self.decision = tentative.then_some(decide);
        tokio::spawn(async move {
            for t in tokens {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if cancel.is_cancelled() || *decided.borrow() == Some(false) {
                    return;
                }
                if tx.send(Ok(t)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    fn decide(&mut self, commit: bool) {
        if let Some(d) = self.decision.take() {
            let _ = d.send(Some(commit));
        }
    }
}

impl SlmSession for ScriptedSession {
    fn respond(&mut self, _turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(cancel, false)
    }

    fn begin_tentative(&mut self, _turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(cancel, true)
    }

    fn commit(&mut self) {
        self.decide(true);
    }

    fn discard(&mut self) {
        self.decide(false);
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

    /// On tokio's paused clock, so a busy machine cannot stretch it: the stream ends without
    /// waiting out the next token's delay.
    #[tokio::test(start_paused = true)]
    async fn cancel_stops_the_stream() {
        let mut m = ScriptedModel::new("one two three four", Duration::from_millis(20))
            .open_session(None)
            .unwrap();
        let cancel = CancellationToken::new();
        let turn = UserTurn {
            audio: Arc::from(vec![0.0f32; 10]),
        };
        let mut rx = m.respond(turn, cancel.clone());
        assert_eq!(rx.recv().await.unwrap().unwrap(), "one");
        cancel.cancel();
        let started = tokio::time::Instant::now();
        assert!(rx.recv().await.is_none());
        assert!(started.elapsed() < Duration::from_millis(20));
    }

    /// The whole text of a token stream, once it ends.
    async fn text_of(mut rx: TokenStream) -> String {
        let mut got = String::new();
        while let Some(t) = rx.recv().await {
            got.push_str(&t.unwrap());
        }
        got
    }

    fn turn() -> UserTurn {
        UserTurn {
            audio: Arc::from(vec![0.0f32; 10]),
        }
    }

    #[tokio::test]
    async fn a_tentative_reply_streams_and_a_commit_keeps_it_whole() {
        let model = ScriptedModel::new("a b c d e f", Duration::from_millis(20));
        let mut s = model.open_session(None).unwrap();
        let mut rx = s.begin_tentative(turn(), CancellationToken::new());
        let first = rx.recv().await.unwrap().unwrap();
        assert_eq!(first, "a", "tokens stream before the commit");
        s.commit();
        assert_eq!(format!("{first}{}", text_of(rx).await), "a b c d e f");
    }

    /// On tokio's paused clock: no token is due between the discard and the check.
    #[tokio::test(start_paused = true)]
    async fn a_discarded_reply_ends_where_it_stands() {
        let model = ScriptedModel::new("one two three four five", Duration::from_millis(20));
        let mut s = model.open_session(None).unwrap();
        let mut rx = s.begin_tentative(turn(), CancellationToken::new());
        assert_eq!(rx.recv().await.unwrap().unwrap(), "one");
        s.discard();
        let mut rest = 0;
        while rx.recv().await.is_some() {
            rest += 1;
        }
        assert_eq!(
            rest, 0,
            "the reply stopped at the discard ({rest} more tokens)"
        );
        // The session goes on with an ordinary reply.
        let mut rx = s.respond(turn(), CancellationToken::new());
        assert_eq!(rx.recv().await.unwrap().unwrap(), "one");
    }
}
