//! One reply spoken through an ElevenLabs websocket: text units go out as they arrive
//! (`try_trigger_generation`, `flush` at each unit's end), audio comes back and is cut into the
//! units it speaks by the characters the server's alignment covers. A multi-context socket closes
//! just this reply's context on barge-in (`close_context`); a single-context socket is dropped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::socket::{spoken_chars, Command, Event, Socket, EVENT_QUEUE};
use super::PROVIDER;
use crate::metrics::Metrics;
use crate::tts::http::{self, BodyDecoder, BodyFormat, Timeouts};
use crate::tts::{SynthChunk, TextUnit, TtsError};

#[derive(Serialize)]
struct Outgoing<'a> {
    text: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    try_trigger_generation: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    flush: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_id: Option<&'a str>,
}

#[derive(Serialize)]
struct CloseContext<'a> {
    context_id: &'a str,
    close_context: bool,
}

/// A unit sent to the server whose audio has not all arrived.
struct Pending {
    index: usize,
    /// Characters of the unit the alignment has not covered yet.
    chars_left: usize,
    /// When the server could start on it: sent, and the unit before it finished.
    started: Instant,
    got_audio: bool,
}

pub(crate) struct ContextTask {
    pub socket: Socket,
    /// Some: a context of a multi-context socket. None: the socket is this reply's own.
    pub context_id: Option<String>,
    pub format: BodyFormat,
    pub timeouts: Timeouts,
    pub metrics: Arc<Metrics>,
}

impl ContextTask {
    pub(crate) async fn run(
        self,
        mut units: mpsc::Receiver<TextUnit>,
        cancel: CancellationToken,
        out: mpsc::Sender<Result<SynthChunk, TtsError>>,
    ) {
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        let ctx = self.context_id.clone();
        if !self
            .socket
            .send(Command::Register(ctx.clone(), events_tx))
            .await
        {
            let _ = out.send(Err(dead())).await;
            return;
        }
        let result = self.speak(&mut units, &mut events, &cancel, &out).await;
        if let Err(e) = result {
            let _ = out.send(Err(e)).await;
        }
        if let Some(id) = &ctx {
            // Closing is also right after a finished reply: the context is not reused.
            let close = serde_json::to_string(&CloseContext {
                context_id: id,
                close_context: true,
            })
            .expect("serialisable");
            self.socket.send(Command::Send(close)).await;
        }
        self.socket.send(Command::Unregister(ctx)).await;
    }

    async fn speak(
        &self,
        units: &mut mpsc::Receiver<TextUnit>,
        events: &mut mpsc::Receiver<Event>,
        cancel: &CancellationToken,
        out: &mpsc::Sender<Result<SynthChunk, TtsError>>,
    ) -> Result<(), TtsError> {
        let ctx = self.context_id.as_deref();
        let mut decoder = BodyDecoder::new(self.format);
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut units_open = true;
        let mut last_audio = Instant::now();
        if let Some(id) = ctx {
            // A context opens with a space, as the API asks.
            self.send_text(" ", false, false, Some(id)).await?;
        }
        loop {
            if !units_open && pending.is_empty() {
                return Ok(());
            }
            let deadline = pending.front().map(|p| {
                if p.got_audio {
                    last_audio + self.timeouts.stall
                } else {
                    p.started + self.timeouts.first_byte
                }
            });
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                u = units.recv(), if units_open => match u {
                    Some(u) => {
                        // The trailing space keeps the next unit's first word apart.
                        let text = format!("{} ", u.text.trim());
                        self.send_text(&text, true, true, ctx).await?;
                        pending.push_back(Pending {
                            index: u.index,
                            chars_left: spoken_chars(&u.text),
                            started: Instant::now(),
                            got_audio: false,
                        });
                    }
                    None => {
                        units_open = false;
                        if ctx.is_none() {
                            // Empty text ends a single-context stream once it is spoken.
                            self.send_text("", false, false, None).await?;
                        }
                    }
                },
                e = events.recv() => match e {
                    None => return Err(dead()),
                    Some(Event::Failed(e)) => return Err(e),
                    Some(Event::Final) => {
                        while let Some(p) = pending.pop_front() {
                            if !send(out, done(p.index, decoder.sample_rate())).await {
                                return Ok(());
                            }
                        }
                        if !units_open {
                            return Ok(());
                        }
                    }
                    Some(Event::Audio { bytes, chars }) => {
                        let Some(front) = pending.front_mut() else {
                            continue; // audio for text we no longer wait for
                        };
                        last_audio = Instant::now();
                        if !front.got_audio {
                            front.got_audio = true;
                            http::record_ttfb(&self.metrics, PROVIDER, front.index, front.started.elapsed());
                        }
                        let samples = decoder
                            .push(&bytes)
                            .map_err(|detail| TtsError::Protocol { provider: PROVIDER, detail })?;
                        let unit = front.index;
                        if !samples.is_empty() {
                            let chunk = SynthChunk {
                                unit,
                                samples,
                                sample_rate: decoder.sample_rate(),
                                unit_done: false,
                            };
                            if !send(out, chunk).await {
                                return Ok(());
                            }
                        }
                        if !self.advance(&mut pending, chars, &decoder, out).await {
                            return Ok(());
                        }
                    }
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let got = pending.front().is_some_and(|p| p.got_audio);
                    let ms = if got { self.timeouts.stall } else { self.timeouts.first_byte }.as_millis();
                    return Err(TtsError::Timeout {
                        provider: PROVIDER,
                        what: if got {
                            format!("mid-stream: no audio for {ms} ms")
                        } else {
                            format!("after {ms} ms without audio")
                        },
                    });
                }
            }
        }
    }

    /// Counts `chars` against the oldest units, finishing those fully covered. False when the
    /// consumer is gone.
    async fn advance(
        &self,
        pending: &mut VecDeque<Pending>,
        chars: Option<usize>,
        decoder: &BodyDecoder,
        out: &mpsc::Sender<Result<SynthChunk, TtsError>>,
    ) -> bool {
        let Some(mut chars) = chars else { return true };
        while let Some(front) = pending.front_mut() {
            let used = chars.min(front.chars_left);
            front.chars_left -= used;
            chars -= used;
            if front.chars_left > 0 {
                break;
            }
            let index = front.index;
            pending.pop_front();
            if !send(out, done(index, decoder.sample_rate())).await {
                return false;
            }
            match pending.front_mut() {
                // The next unit's wait for audio starts now, not when its text was sent.
                Some(next) => next.started = next.started.max(Instant::now()),
                None => break,
            }
            if chars == 0 {
                break;
            }
        }
        true
    }

    async fn send_text(
        &self,
        text: &str,
        trigger: bool,
        flush: bool,
        context_id: Option<&str>,
    ) -> Result<(), TtsError> {
        let msg = serde_json::to_string(&Outgoing {
            text,
            try_trigger_generation: trigger,
            flush,
            context_id,
        })
        .expect("serialisable");
        if self.socket.send(Command::Send(msg)).await {
            Ok(())
        } else {
            Err(dead())
        }
    }
}

fn dead() -> TtsError {
    TtsError::Truncated {
        provider: PROVIDER,
        detail: "the websocket closed before the reply was spoken".into(),
    }
}

fn done(unit: usize, sample_rate: u32) -> SynthChunk {
    SynthChunk {
        unit,
        samples: Vec::new(),
        sample_rate,
        unit_done: true,
    }
}

async fn send(out: &mpsc::Sender<Result<SynthChunk, TtsError>>, chunk: SynthChunk) -> bool {
    out.send(Ok(chunk)).await.is_ok()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
