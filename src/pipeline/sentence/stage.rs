//! The sentence stage of a reply: a task that feeds the model's tokens through the accumulator,
//! sends each unit to the synthesizer as soon as it is complete, and reports the text milestones
//! to the call. A reply stops at its character limit; one whose model fails mid-way keeps its
//! complete units and drops the unfinished rest.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{SentenceAccumulator, SentenceSettings};
use crate::model::TokenStream;
use crate::tts::TextUnit;

/// Milestones of the text side of a reply.
pub(crate) enum TextEvent {
    FirstToken(Instant),
    Unit(String, Instant),
    Done,
    Failed(crate::model::SlmError),
    /// The reply reached this many characters and was cut there.
    TooLong(usize),
}

/// The sentence-accumulator stage: tokens in, text units out to the synthesizer. A reply stops
/// at `max_chars` characters (the rest of the token stream is dropped, which stops generation).
pub(crate) async fn accumulate(
    mut tokens: TokenStream,
    settings: SentenceSettings,
    max_chars: usize,
    units: mpsc::Sender<TextUnit>,
    events: mpsc::Sender<TextEvent>,
    cancel: CancellationToken,
) {
    let mut acc = SentenceAccumulator::new(settings);
    let mut index = 0;
    let mut first = true;
    let mut chars = 0usize;
    loop {
        let token = tokio::select! {
            _ = cancel.cancelled() => return,
            t = tokens.recv() => t,
        };
        let mut last = !matches!(token, Some(Ok(_)));
        let ready = match token {
            Some(Ok(t)) => {
                if first {
                    first = false;
                    let _ = events.send(TextEvent::FirstToken(Instant::now())).await;
                }
                let n = t.chars().count();
                if chars + n <= max_chars {
                    chars += n;
                    acc.push(&t)
                } else {
                    let keep: String = t.chars().take(max_chars - chars).collect();
                    let _ = events.send(TextEvent::TooLong(max_chars)).await;
                    last = true;
                    let mut ready = acc.push(&keep);
                    ready.extend(acc.finish());
                    ready
                }
            }
            // The complete units went out as they came; the unfinished rest would be spoken as
            // a fragment ("The weather today is"), so it is dropped.
            Some(Err(e)) => {
                let _ = events.send(TextEvent::Failed(e)).await;
                Vec::new()
            }
            None => acc.finish().into_iter().collect(),
        };
        for text in ready {
            let _ = events
                .send(TextEvent::Unit(text.clone(), Instant::now()))
                .await;
            if units.send(TextUnit { index, text }).await.is_err() {
                return;
            }
            index += 1;
        }
        if last {
            let _ = events.send(TextEvent::Done).await;
            return;
        }
    }
}
