//! A primary synthesizer backed by a second one. When the primary fails during a reply (before
//! its first audio or in the middle of a unit), the failed unit and every later unit of that reply
//! are spoken by the fallback, so the caller hears the whole reply and the call goes on; the next
//! reply tries the primary again. A unit cut off mid-way is spoken again from its start: repeating
//! half a sentence is better than losing the other half.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AudioStream, OutputHint, SynthChunk, Synthesizer, TextUnit, TtsError, Voice};
use crate::metrics::Metrics;

/// Units waiting for either voice of one reply; the pipeline's own unit queue is the real bound,
/// and a full queue only makes the forwarding task wait.
const UNIT_QUEUE: usize = 64;

pub struct Fallback {
    primary: Arc<dyn Synthesizer>,
    fallback: Arc<dyn Synthesizer>,
    metrics: Arc<Metrics>,
    name: String,
}

impl Fallback {
    pub fn new(
        primary: Arc<dyn Synthesizer>,
        fallback: Arc<dyn Synthesizer>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let name = format!("{} (fallback {})", primary.name(), fallback.name());
        Fallback {
            primary,
            fallback,
            metrics,
            name,
        }
    }
}

impl Synthesizer for Fallback {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&self, hint: OutputHint) -> Box<dyn Voice> {
        Box::new(FallbackVoice::new(
            self.primary.open(hint),
            self.fallback.open(hint),
            self.primary.name(),
            self.fallback.name(),
            self.metrics.clone(),
            None,
        ))
    }
}

/// Which primary errors the fallback takes over from; the others end the reply as they would
/// without it.
pub(crate) type Takeover = fn(&TtsError) -> bool;

/// A call's pair of voices. Also used inside a provider (ElevenLabs' websocket backed by its
/// HTTP API) with a [`Takeover`] filter.
pub(crate) struct FallbackVoice {
    primary: Box<dyn Voice>,
    fallback: Box<dyn Voice>,
    primary_name: String,
    fallback_name: String,
    metrics: Arc<Metrics>,
    only_if: Option<Takeover>,
}

impl FallbackVoice {
    /// Failures are counted in `tts_failures_total{provider="<primary_name>"}`.
    pub(crate) fn new(
        primary: Box<dyn Voice>,
        fallback: Box<dyn Voice>,
        primary_name: &str,
        fallback_name: &str,
        metrics: Arc<Metrics>,
        only_if: Option<Takeover>,
    ) -> Self {
        FallbackVoice {
            primary,
            fallback,
            primary_name: primary_name.to_string(),
            fallback_name: fallback_name.to_string(),
            metrics,
            only_if,
        }
    }
}

impl Voice for FallbackVoice {
    fn synthesize(
        &mut self,
        units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
    ) -> AudioStream {
        // The primary gets a child token so a failure can stop it (closing its stream or context)
        // without touching the reply.
        let primary_cancel = cancel.child_token();
        let (ptx, prx) = mpsc::channel(UNIT_QUEUE);
        let primary = self.primary.synthesize(prx, primary_cancel.clone());
        // Opened now, fed only after a failure: an unused fallback stream just ends empty.
        let (ftx, frx) = mpsc::channel(UNIT_QUEUE);
        let fallback = self.fallback.synthesize(frx, cancel.clone());
        let (out, rx) = mpsc::channel(super::AUDIO_QUEUE);
        let relay = Relay {
            units,
            cancel,
            primary_cancel,
            out,
            primary_name: self.primary_name.clone(),
            fallback_name: self.fallback_name.clone(),
            metrics: self.metrics.clone(),
            only_if: self.only_if,
        };
        tokio::spawn(relay.run(ptx, primary, ftx, fallback));
        rx
    }
}

struct Relay {
    units: mpsc::Receiver<TextUnit>,
    cancel: CancellationToken,
    primary_cancel: CancellationToken,
    out: mpsc::Sender<Result<SynthChunk, TtsError>>,
    primary_name: String,
    fallback_name: String,
    metrics: Arc<Metrics>,
    only_if: Option<Takeover>,
}

impl Relay {
    async fn run(
        mut self,
        ptx: mpsc::Sender<TextUnit>,
        mut primary: AudioStream,
        ftx: mpsc::Sender<TextUnit>,
        mut fallback: AudioStream,
    ) {
        // Units handed to the primary whose audio has not finished: what the fallback must
        // speak if the primary fails now.
        let mut pending: VecDeque<TextUnit> = VecDeque::new();
        let mut ptx = Some(ptx);
        let error = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                u = self.units.recv(), if ptx.is_some() => match u {
                    Some(u) => {
                        pending.push_back(u.clone());
                        let sent = match &ptx {
                            Some(tx) => tx.send(u).await.is_ok(),
                            None => false,
                        };
                        if !sent {
                            break TtsError::Synthesis("the primary voice stopped taking text".into());
                        }
                    }
                    None => ptx = None, // the primary finishes what it has, then ends
                },
                c = primary.recv() => match c {
                    Some(Ok(chunk)) => {
                        if chunk.unit_done && pending.front().is_some_and(|u| u.index == chunk.unit) {
                            pending.pop_front();
                        }
                        if self.out.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => break e,
                    None if self.cancel.is_cancelled() => return,
                    None if pending.is_empty() && ptx.is_none() => return,
                    None => break TtsError::Synthesis(format!(
                        "{} ended with {} unit(s) unspoken",
                        self.primary_name,
                        pending.len()
                    )),
                },
            }
        };
        self.primary_cancel.cancel();
        drop(ptx);
        self.metrics
            .tts_failures
            .with_label_values(&[&self.primary_name])
            .inc();
        if self.only_if.is_some_and(|takes| !takes(&error)) {
            let _ = self.out.send(Err(error)).await;
            return;
        }
        tracing::warn!(
            primary = %self.primary_name,
            fallback = %self.fallback_name,
            from_unit = pending.front().map(|u| u.index),
            error = %error,
            "primary voice failed; the fallback speaks the rest of this reply"
        );
        let mut ftx = Some(ftx);
        for u in pending {
            if let Some(tx) = &ftx {
                if tx.send(u).await.is_err() {
                    ftx = None;
                }
            }
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                u = self.units.recv(), if ftx.is_some() => match (u, &ftx) {
                    (Some(u), Some(tx)) => {
                        if tx.send(u).await.is_err() {
                            ftx = None;
                        }
                    }
                    _ => ftx = None,
                },
                c = fallback.recv() => match c {
                    Some(item) => {
                        let failed = item.is_err();
                        if self.out.send(item).await.is_err() || failed {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    }
}
