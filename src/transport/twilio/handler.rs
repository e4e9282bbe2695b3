//! One Twilio media stream: waits (until the start deadline) for `start`, checks the per-call
//! token the webhook signed into the TwiML, takes a call slot and starts a call (µ-law 8 kHz both
//! ways, playback acknowledged by marks), then runs a receive loop (media → call, marks → played
//! audio, keep-alive pings and an idle timeout) beside the shared writer (call → media frames, a
//! mark after each unit and every 250 ms inside one, `clear` on barge-in). Malformed events are
//! counted and logged (escaped, rate-limited); the call goes on.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::protocol::{self, Event, Start};
use crate::audio::{mulaw, Encoding};
use crate::metrics::ErrorKind;
use crate::pipeline::call::{self, CallHandle, CallOptions, Services};
use crate::pipeline::Outbound;
use crate::transport::auth::Auth;
use crate::transport::guard::{Untrusted, WarnLimiter};
use crate::transport::socket::{
    self, Admission, Control, Ending, Frame, Keepalive, SocketSettings, Writer,
};

/// Messages from the call waiting for the socket; the pacer bounds audio to its lead, so this
/// fills only if the socket stalls, and then the call waits (and the send timeout ends it).
const OUT_QUEUE: usize = 128;
/// Pings from the reader waiting for the socket.
const CONTROL_QUEUE: usize = 4;
const RATE: u32 = 8_000;
/// The `<Parameter>` that carries the per-call stream token.
pub const STREAM_TOKEN: &str = "gazelle_stream_token";

/// How streams prove they follow a webhook call.
#[derive(Clone)]
pub(crate) struct StreamAuth {
    pub auth: Arc<Auth>,
    /// `twilio.require_stream_token`.
    pub required: bool,
}

/// Counts a bad event, and logs it (escaped and cut short) unless this call already logged many.
struct Complaints<'a> {
    services: &'a Services,
    limiter: WarnLimiter,
}

impl Complaints<'_> {
    /// A frame's text; `None` to skip it (complaining if it is binary); or why the stream ends.
    fn text_of(&mut self, frame: Frame) -> ControlFlow<Ending, Option<Utf8Bytes>> {
        match frame {
            Frame::Text(t) => ControlFlow::Continue(Some(t)),
            Frame::Binary => {
                let why = "binary frames are not part of the protocol";
                self.bad(ErrorKind::TwilioBinary, why);
                ControlFlow::Continue(None)
            }
            Frame::TooBig => {
                let why = "a frame over twilio.max_frame_bytes";
                self.bad(ErrorKind::FrameTooLarge, why);
                ControlFlow::Break(Ending::TooBig)
            }
            Frame::Closed => ControlFlow::Break(Ending::Hangup),
            Frame::Other => ControlFlow::Continue(None),
        }
    }

    fn bad(&mut self, kind: ErrorKind, detail: &str) {
        self.services.metrics.error(kind);
        if self.limiter.allow(Instant::now()) {
            let detail = Untrusted(detail);
            tracing::warn!(kind = kind.as_str(), %detail, "bad Twilio media-stream event");
        }
    }
}

pub(crate) async fn serve(
    mut socket: WebSocket,
    services: Services,
    mut admission: Admission,
    settings: SocketSettings,
    stream_auth: StreamAuth,
    server: CancellationToken,
    trace: crate::pipeline::call::TraceContext,
) {
    let mut complaints = Complaints {
        services: &services,
        limiter: WarnLimiter::default(),
    };
    // Until `start`, only `connected` is expected.
    let deadline = tokio::time::Instant::now() + admission.start_timeout();
    let start: Start = loop {
        let msg = tokio::select! {
            _ = server.cancelled() => {
                socket::end(&mut socket, &Ending::Shutdown, settings.send_timeout).await;
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                complaints.bad(ErrorKind::StartTimeout, "no start event in time");
                let why = Ending::Policy("no start event within the start timeout".into());
                socket::end(&mut socket, &why, settings.send_timeout).await;
                return;
            }
            m = socket.recv() => m,
        };
        let text = match complaints.text_of(socket::frame(msg)) {
            ControlFlow::Continue(Some(t)) => t,
            ControlFlow::Continue(None) => continue,
            ControlFlow::Break(ending) => {
                socket::end(&mut socket, &ending, settings.send_timeout).await;
                return;
            }
        };
        match protocol::parse(&text) {
            Ok(Event::Start { start, .. }) => break start,
            Ok(Event::Connected { .. }) => {}
            Ok(Event::Stop { .. }) => return,
            Ok(other) => complaints.bad(ErrorKind::TwilioBeforeStart, &format!("{other:?}")),
            // A `start` that cannot be read will not be sent again: end now, saying why,
            // instead of waiting out the start deadline.
            Err(e) if e.event() == Some("start") => {
                complaints.bad(ErrorKind::TwilioBadEvent, &e.to_string());
                let why = Ending::Policy(format!("malformed start event: {e}"));
                socket::end(&mut socket, &why, settings.send_timeout).await;
                return;
            }
            Err(e) => complaints.bad(ErrorKind::TwilioBadEvent, &e.to_string()),
        }
    };
    let admitted = match check_start(&start, &stream_auth) {
        Err((kind, why)) => Err((kind, why)),
        Ok(()) => admission
            .start_call()
            .ok_or((ErrorKind::Busy, "at server.max_calls".to_string())),
    };
    drop(admission);
    let slot = match admitted {
        Ok(slot) => slot,
        Err((kind, why)) => {
            complaints.bad(kind, &why);
            let ending = match kind {
                ErrorKind::Busy => Ending::Busy,
                _ => Ending::Policy(why),
            };
            socket::end(&mut socket, &ending, settings.send_timeout).await;
            return;
        }
    };
    let params = &start.custom_parameters;
    let options = CallOptions {
        id: start.call_sid.clone(),
        input_rate: RATE,
        output_rate: RATE,
        output_encoding: Encoding::Mulaw,
        system_prompt: params.get("system_prompt").cloned(),
        first_message: params.get("first_message").cloned(),
        subscribe_transcript: false,
        playback_acks: true,
        transport: "twilio",
        // Carried from the webhook's request in the stream's parameters; else the upgrade's.
        trace: match params.get("traceparent") {
            Some(tp) => crate::pipeline::call::TraceContext {
                traceparent: Some(tp.clone()),
                tracestate: params.get("tracestate").cloned(),
            },
            None => trace,
        },
    };
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let mut call = match call::start(services.clone(), options, out_tx, &server, Some(slot)) {
        Ok(c) => c,
        Err(e) => {
            complaints.bad(e.kind(), &e.to_string());
            tracing::error!(error = %Untrusted(&e.to_string()), "cannot start the Twilio call");
            socket::close(
                &mut socket,
                &Ending::Policy(e.to_string()),
                settings.send_timeout,
            )
            .await;
            return;
        }
    };
    let stream_sid = start.stream_sid.clone();
    tracing::info!(call = %call.id, stream = %Untrusted(&stream_sid), "Twilio stream started");
    let (sink, mut stream) = socket.split();
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (finish_tx, finish_rx) = oneshot::channel();
    let dead = CancellationToken::new();
    let writer = Writer {
        encode: move |m| encode(m, &stream_sid),
        farewell: None,
        metrics: services.metrics.clone(),
        send_timeout: settings.send_timeout,
    };
    let writer = tokio::spawn(writer.run(sink, out_rx, ctl_rx, finish_rx, dead.clone()));
    let ending = read_loop(
        &mut stream,
        &mut call,
        &settings,
        ctl_tx,
        &mut complaints,
        &dead,
        &server,
    )
    .await;
    drop(call);
    let _ = finish_tx.send(ending.clone());
    let _ = writer.await;
    socket::await_close(&mut stream, &ending).await;
}

/// The start event's format, call SID and stream token.
fn check_start(start: &Start, stream_auth: &StreamAuth) -> Result<(), (ErrorKind, String)> {
    start
        .media_format
        .check()
        .map_err(|e| (ErrorKind::TwilioBadFormat, e.to_string()))?;
    let sid = start.call_sid.as_deref().unwrap_or("");
    if let Some(sid) = &start.call_sid {
        crate::pipeline::limits::check_id(sid).map_err(|e| (e.kind(), e.to_string()))?;
    }
    if stream_auth.required {
        let missing = || {
            let why = format!(
                "no {STREAM_TOKEN} parameter: streams must come from the TwiML of POST /twilio/voice"
            );
            (ErrorKind::TwilioStreamToken, why)
        };
        let token = start
            .custom_parameters
            .get(STREAM_TOKEN)
            .ok_or_else(missing)?;
        stream_auth
            .auth
            .check_stream_token(token, sid)
            .map_err(|e| (ErrorKind::TwilioStreamToken, e.to_string()))?;
    }
    Ok(())
}

async fn read_loop<S>(
    mut stream: S,
    call: &mut CallHandle,
    settings: &SocketSettings,
    ctl: mpsc::Sender<Control>,
    complaints: &mut Complaints<'_>,
    dead: &CancellationToken,
    server: &CancellationToken,
) -> Ending
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let mut keepalive = Keepalive::new(settings);
    loop {
        let frame = match socket::next_frame(&mut stream, &mut keepalive, &ctl, server, dead).await
        {
            Ok(f) => f,
            Err(ending) => {
                if let Ending::Idle(_) = ending {
                    let why = "nothing received within the idle timeout";
                    complaints.bad(ErrorKind::IdleTimeout, why);
                }
                return ending;
            }
        };
        let text = match complaints.text_of(frame) {
            ControlFlow::Continue(Some(t)) => t,
            ControlFlow::Continue(None) => continue,
            ControlFlow::Break(ending) => return ending,
        };
        let event = match protocol::parse(&text) {
            Ok(e) => e,
            Err(e) => {
                complaints.bad(ErrorKind::TwilioBadEvent, &e.to_string());
                continue;
            }
        };
        match event {
            Event::Media { media } => {
                // Only the caller's side is heard; a stream never carries our own audio back.
                if media.track.as_deref().is_some_and(|t| t != "inbound") {
                    continue;
                }
                let bytes = match protocol::decode_payload(&media.payload) {
                    Ok(b) => b,
                    Err(e) => {
                        complaints.bad(ErrorKind::TwilioBadPayload, &e.to_string());
                        continue;
                    }
                };
                match call.audio(mulaw::decode_to_f32(&bytes)).await {
                    Ok(()) => {}
                    Err(call::CallError::Ended) => return Ending::CallEnded,
                    Err(e) => complaints.bad(e.kind(), &e.to_string()),
                }
            }
            Event::Mark { mark } => match protocol::parse_mark_name(&mark.name) {
                Some((reply, unit, within)) => {
                    if call.played(reply, unit, within).await.is_err() {
                        return Ending::CallEnded;
                    }
                }
                None => complaints.bad(ErrorKind::TwilioUnknownMark, &mark.name),
            },
            Event::Dtmf { dtmf } => {
                tracing::info!(call = %call.id, digit = %Untrusted(&dtmf.digit), "DTMF")
            }
            Event::Stop { .. } => return Ending::Stopped,
            Event::Connected { .. } | Event::Start { .. } => complaints.bad(
                ErrorKind::TwilioRepeatedStart,
                "connected/start after the stream began",
            ),
        }
    }
}

/// A call message as a media-stream event; frames and marks of a reply cut off or held while they
/// waited are never sent.
fn encode(m: Outbound, stream_sid: &str) -> Option<String> {
    Some(match m {
        Outbound::Audio {
            samples, playable, ..
        } if !playable.is_stale() => protocol::media(stream_sid, &mulaw::encode_from_f32(&samples)),
        Outbound::UnitSent {
            reply,
            unit,
            within,
            playable,
        } if !playable.is_stale() => {
            protocol::mark(stream_sid, &protocol::mark_name(reply, unit, within))
        }
        Outbound::Clear { .. } => protocol::clear(stream_sid),
        _ => return None,
    })
}
