//! One Vocode websocket connection: waits (until the start deadline) for the audio config, takes
//! a call slot and starts a call, then runs a receive loop (decode → call, with keep-alive pings
//! and an idle timeout) beside the shared writer (call → encode → socket, every write bounded by
//! the send timeout). Bad input gets a `gazelle_error` message and the call goes on; what ends a
//! call ends it with a close code that says why.

use std::time::Instant;

use axum::extract::ws::{Message, WebSocket};
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::input::AudioInput;
use super::protocol::{self, AudioConfigStart, ClientMessage, ServerMessage};
use crate::audio::{is_supported_rate, supported_rates_text, Encoding};
use crate::metrics::ErrorKind;
use crate::pipeline::call::{self, CallHandle, CallOptions, Services};
use crate::pipeline::Outbound;
use crate::transport::guard::{Untrusted, WarnLimiter};
use crate::transport::socket::{
    self, Admission, Control, Ending, Frame, Keepalive, SocketSettings, Writer,
};

/// Messages from the call waiting for the socket. The pacer keeps audio within its lead, so this
/// only fills if the socket stalls; then the call waits (and the send timeout ends it).
const OUT_QUEUE: usize = 128;
/// Error messages and pings from the reader waiting for the socket; when full, further errors
/// are counted but not sent.
const CONTROL_QUEUE: usize = 32;

async fn send_text(
    socket: &mut WebSocket,
    timeout: std::time::Duration,
    text: String,
) -> Result<(), socket::SendFailure> {
    socket::send_within(socket, Message::Text(text.into()), timeout).await
}

fn error_json(kind: ErrorKind, message: &str) -> String {
    ServerMessage::Error { kind, message }.to_json()
}

/// Serves one connection to the end.
pub(crate) async fn serve(
    mut socket: WebSocket,
    services: Services,
    mut admission: Admission,
    settings: SocketSettings,
    server: CancellationToken,
    trace: crate::pipeline::call::TraceContext,
) {
    let metrics = services.metrics.clone();
    let t = settings.send_timeout;
    // Phase 1: nothing but the config is meaningful until a call exists.
    let deadline = tokio::time::Instant::now() + admission.start_timeout();
    let config = loop {
        let msg = tokio::select! {
            _ = server.cancelled() => {
                socket::end(&mut socket, &Ending::Shutdown, settings.send_timeout).await;
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                metrics.error(ErrorKind::StartTimeout);
                let why = format!(
                    "no websocket_audio_config_start within {} s",
                    admission.start_timeout().as_secs_f64()
                );
                let _ = send_text(&mut socket, t, error_json(ErrorKind::StartTimeout, &why)).await;
                socket::end(&mut socket, &Ending::Policy(why), settings.send_timeout).await;
                return;
            }
            m = socket.recv() => m,
        };
        let rejection = match classify(socket::frame(msg), &settings) {
            Incoming::Closed => return,
            Incoming::Message(ClientMessage::Stop) => {
                socket::end(&mut socket, &Ending::Stopped, settings.send_timeout).await;
                return;
            }
            Incoming::TooBig => {
                metrics.error(ErrorKind::FrameTooLarge);
                socket::end(&mut socket, &Ending::TooBig, settings.send_timeout).await;
                return;
            }
            Incoming::Skip => continue,
            Incoming::Message(ClientMessage::AudioConfigStart(c)) => match validate(&c) {
                Ok(()) => break c,
                Err(e) => (ErrorKind::BadConfig, e),
            },
            Incoming::Message(_) => (
                ErrorKind::NotStarted,
                "send websocket_audio_config_start before audio or other messages".into(),
            ),
            Incoming::Reject(kind, message) => (kind, message),
        };
        metrics.error(rejection.0);
        if send_text(&mut socket, t, error_json(rejection.0, &rejection.1))
            .await
            .is_err()
        {
            return;
        }
    };

    let Some(slot) = admission.start_call() else {
        metrics.error(ErrorKind::Busy);
        let why = "the server is at its call limit (server.max_calls); try again later";
        let _ = send_text(&mut socket, t, error_json(ErrorKind::Busy, why)).await;
        socket::end(&mut socket, &Ending::Busy, settings.send_timeout).await;
        return;
    };
    drop(admission);
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let options = CallOptions {
        id: config.conversation_id.clone(),
        input_rate: config.input_audio_config.sampling_rate,
        output_rate: config.output_audio_config.sampling_rate,
        output_encoding: config.output_audio_config.audio_encoding,
        system_prompt: config.system_prompt.clone(),
        first_message: config.first_message.clone(),
        subscribe_transcript: config.subscribe_transcript.unwrap_or(false),
        playback_acks: false,
        transport: "vocode",
        trace,
    };
    let mut call = match call::start(services.clone(), options, out_tx, &server, Some(slot)) {
        Ok(c) => c,
        Err(e) => {
            let kind = e.kind();
            metrics.error(kind);
            let _ = send_text(&mut socket, t, error_json(kind, &e.to_string())).await;
            let ending = match kind {
                ErrorKind::CallStart => Ending::Error(e.to_string()),
                _ => Ending::Policy(e.to_string()),
            };
            socket::end(&mut socket, &ending, settings.send_timeout).await;
            return;
        }
    };
    if send_text(&mut socket, t, ServerMessage::Ready.to_json())
        .await
        .is_err()
    {
        return;
    }
    let (sink, mut stream) = socket.split();
    let (output_rate, output_encoding) = (
        config.output_audio_config.sampling_rate,
        config.output_audio_config.audio_encoding,
    );
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (finish_tx, finish_rx) = oneshot::channel();
    let dead = CancellationToken::new();
    let writer = Writer {
        encode: move |m| encode(m, output_rate, output_encoding),
        // The call ended on its own (e.g. its VAD failed): say so before closing.
        farewell: Some(ServerMessage::Stop.to_json()),
        metrics: metrics.clone(),
        send_timeout: settings.send_timeout,
    };
    let writer = tokio::spawn(writer.run(sink, out_rx, ctl_rx, finish_rx, dead.clone()));
    let max_ms = services.limits.max_buffered_audio_ms as u64;
    let input = AudioInput::new(
        config.input_audio_config.sampling_rate,
        config.input_audio_config.audio_encoding,
        max_ms,
    );
    let ending = read_loop(
        &mut stream,
        &mut call,
        input,
        &settings,
        ctl_tx,
        &services,
        &dead,
        &server,
    )
    .await;
    drop(call);
    let _ = finish_tx.send(ending.clone());
    let _ = writer.await;
    socket::await_close(&mut stream, &ending).await;
}

/// What one websocket message means to the protocol.
enum Incoming {
    Message(ClientMessage),
    /// A bad input: its error kind and message for the client.
    Reject(ErrorKind, String),
    /// Pings and pongs.
    Skip,
    /// Over the socket's own limit: the connection cannot go on.
    TooBig,
    Closed,
}

fn classify(frame: Frame, settings: &SocketSettings) -> Incoming {
    match frame {
        Frame::Text(t) if t.len() > settings.max_frame_bytes => {
            Incoming::Reject(ErrorKind::FrameTooLarge, too_large(t.len(), settings))
        }
        Frame::Text(t) => match protocol::parse(&t) {
            Ok(m) => Incoming::Message(m),
            Err(e) => Incoming::Reject(e.kind(), e.to_string()),
        },
        Frame::Binary => Incoming::Reject(
            ErrorKind::BinaryFrame,
            "binary frames are not part of the protocol; send JSON text".into(),
        ),
        Frame::TooBig => Incoming::TooBig,
        Frame::Closed => Incoming::Closed,
        Frame::Other => Incoming::Skip,
    }
}

fn too_large(len: usize, settings: &SocketSettings) -> String {
    format!(
        "a frame of {len} bytes exceeds the limit of {} bytes; send smaller chunks",
        settings.max_frame_bytes
    )
}

pub(crate) fn validate(c: &AudioConfigStart) -> Result<(), String> {
    for (what, rate) in [
        ("input", c.input_audio_config.sampling_rate),
        ("output", c.output_audio_config.sampling_rate),
    ] {
        if !is_supported_rate(rate) {
            return Err(format!(
                "{what} sampling_rate {rate} is not supported; use one of {} Hz",
                supported_rates_text()
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<S>(
    mut stream: S,
    call: &mut CallHandle,
    mut input: AudioInput,
    settings: &SocketSettings,
    ctl: mpsc::Sender<Control>,
    services: &Services,
    dead: &CancellationToken,
    server: &CancellationToken,
) -> Ending
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let metrics = &services.metrics;
    let call_id = call.id.clone();
    let mut warnings = WarnLimiter::default();
    let mut report = |kind: ErrorKind, message: String| {
        metrics.error(kind);
        if warnings.allow(Instant::now()) {
            let message = Untrusted(&message);
            let kind = kind.as_str();
            tracing::debug!(call = %call_id, kind, %message, "bad input from caller");
        }
        // When the writer is behind, errors are only counted: a flood of bad frames must not
        // queue a flood of replies.
        let _ = ctl.try_send(Control::Text(error_json(kind, &message)));
    };
    let mut keepalive = Keepalive::new(settings);
    loop {
        let frame = match socket::next_frame(&mut stream, &mut keepalive, &ctl, server, dead).await
        {
            Ok(f) => f,
            Err(ending) => {
                if let Ending::Idle(_) = ending {
                    metrics.error(ErrorKind::IdleTimeout);
                }
                return ending;
            }
        };
        match classify(frame, settings) {
            Incoming::Closed => return Ending::Hangup,
            Incoming::TooBig => {
                metrics.error(ErrorKind::FrameTooLarge);
                return Ending::TooBig;
            }
            Incoming::Skip => {}
            Incoming::Reject(kind, message) => report(kind, message),
            Incoming::Message(ClientMessage::Audio { data }) => {
                let samples = match input.push(&data) {
                    Ok(s) => s,
                    Err(e) => {
                        report(e.kind(), e.to_string());
                        continue;
                    }
                };
                if samples.is_empty() {
                    continue;
                }
                match call.audio(samples).await {
                    Ok(()) => {}
                    Err(call::CallError::Ended) => return Ending::CallEnded,
                    Err(e) => report(e.kind(), e.to_string()),
                }
            }
            Incoming::Message(ClientMessage::Stop) => return Ending::Stopped,
            Incoming::Message(ClientMessage::GetHistory) => match call.history().await {
                Ok(h) => {
                    let json = ServerMessage::History { conversation: &h }.to_json();
                    let _ = ctl.send(Control::Text(json)).await;
                }
                Err(_) => return Ending::CallEnded,
            },
            Incoming::Message(ClientMessage::AudioConfigStart(_)) => report(
                ErrorKind::AlreadyStarted,
                "the call is already configured; open a new socket for a new call".into(),
            ),
        }
    }
}

fn encode(m: Outbound, rate: u32, encoding: Encoding) -> Option<String> {
    Some(match m {
        Outbound::Audio {
            samples, playable, ..
        } => {
            if playable.is_stale() {
                return None; // cut off or held by a barge-in while it waited
            }
            protocol::audio_message(&samples, rate, encoding)
        }
        Outbound::Transcript { reply, text } => ServerMessage::Transcript {
            text: &text,
            reply,
            sender: "bot",
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        }
        .to_json(),
        Outbound::Clear {
            reply,
            spoken,
            paused,
        } => ServerMessage::Clear {
            reply,
            spoken_text: &spoken,
            paused,
        }
        .to_json(),
        Outbound::Timeline(t) => ServerMessage::Timeline(&t).to_json(),
        // Vocode has no playback acknowledgements; the pacer's playout clock stands in.
        Outbound::UnitSent { .. } => return None,
        Outbound::Error { kind, message } => error_json(kind, &message),
    })
}
