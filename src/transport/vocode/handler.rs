//! One Vocode websocket connection: waits for the audio config, starts a call, then runs a
//! receive loop (decode → call) and a send loop (call → encode) until either side stops. Bad
//! input gets a `gazelle_error` message and the call goes on.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, AudioConfigStart, ClientMessage, ServerMessage};
use crate::audio::resample::StreamResampler;
use crate::audio::wav::{SampleFormat, StreamDecoder, WavFormat};
use crate::audio::Encoding;
use crate::metrics::Metrics;
use crate::pipeline::call::{self, CallHandle, CallOptions, Services};
use crate::pipeline::Outbound;

/// Messages from the call waiting for the socket. The pacer keeps audio within its lead, so this
/// only fills if the socket stalls; then the call waits rather than dropping anything.
const OUT_QUEUE: usize = 128;
/// Rates we accept from and send to clients.
const RATES: std::ops::RangeInclusive<u32> = 8_000..=96_000;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest text frame accepted; larger ones get a `frame_too_large` error and are dropped.
    pub max_frame_bytes: usize,
}

fn error_json(kind: &str, message: &str) -> String {
    ServerMessage::Error { kind, message }.to_json()
}

/// Serves one connection to the end.
pub async fn serve(
    mut socket: WebSocket,
    services: Services,
    limits: Limits,
    server: CancellationToken,
) {
    let metrics = services.metrics.clone();
    // Phase 1: nothing but the config is meaningful until a call exists.
    let config = loop {
        let msg = tokio::select! {
            _ = server.cancelled() => return,
            m = socket.recv() => m,
        };
        let rejection = match classify(msg, limits) {
            Incoming::Closed | Incoming::Message(ClientMessage::Stop) => return,
            Incoming::Skip => continue,
            Incoming::Message(ClientMessage::AudioConfigStart(c)) => match validate(&c) {
                Ok(()) => break c,
                Err(e) => ("bad_config", e),
            },
            Incoming::Message(_) => (
                "not_started",
                "send websocket_audio_config_start before audio or other messages".into(),
            ),
            Incoming::Reject(kind, message) => (kind, message),
        };
        metrics.error(rejection.0);
        let e = error_json(rejection.0, &rejection.1);
        if socket.send(Message::Text(e.into())).await.is_err() {
            return;
        }
    };

    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let (ctl_tx, ctl_rx) = mpsc::channel::<String>(OUT_QUEUE);
    let options = CallOptions {
        id: config.conversation_id.clone(),
        input_rate: config.input_audio_config.sampling_rate,
        output_rate: config.output_audio_config.sampling_rate,
        output_encoding: config.output_audio_config.audio_encoding,
        system_prompt: config.system_prompt.clone(),
        first_message: config.first_message.clone(),
        subscribe_transcript: config.subscribe_transcript.unwrap_or(false),
        playback_acks: false,
    };
    let call = match call::start(services.clone(), options, out_tx.clone(), &server) {
        Ok(c) => c,
        Err(e) => {
            metrics.error("call_start");
            let _ = socket
                .send(Message::Text(
                    error_json("call_start", &e.to_string()).into(),
                ))
                .await;
            return;
        }
    };
    if socket
        .send(Message::Text(ServerMessage::Ready.to_json().into()))
        .await
        .is_err()
    {
        return;
    }
    let (sink, stream) = socket.split();
    let output = (
        config.output_audio_config.sampling_rate,
        config.output_audio_config.audio_encoding,
    );
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        ctl_rx,
        output,
        services.metrics.clone(),
        stop.clone(),
    ));
    read_loop(
        stream, &call, &config, limits, ctl_tx, &services, &stop, &server,
    )
    .await;
    drop(call);
    stop.cancel();
    let _ = writer.await;
}

/// What one websocket message means to the protocol.
enum Incoming {
    Message(ClientMessage),
    /// A bad input: its error kind and message for the client.
    Reject(&'static str, String),
    /// Pings and pongs.
    Skip,
    Closed,
}

fn classify(msg: Option<Result<Message, axum::Error>>, limits: Limits) -> Incoming {
    match msg {
        Some(Ok(Message::Text(t))) if t.len() > limits.max_frame_bytes => {
            Incoming::Reject("frame_too_large", too_large(t.len(), limits))
        }
        Some(Ok(Message::Text(t))) => match protocol::parse(&t) {
            Ok(m) => Incoming::Message(m),
            Err(e) => Incoming::Reject(e.kind(), e.to_string()),
        },
        Some(Ok(Message::Binary(_))) => Incoming::Reject(
            "binary_frame",
            "binary frames are not part of the protocol; send JSON text".into(),
        ),
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Incoming::Closed,
        Some(Ok(_)) => Incoming::Skip,
    }
}

fn too_large(len: usize, limits: Limits) -> String {
    format!(
        "a frame of {len} bytes exceeds the limit of {} bytes; send smaller chunks",
        limits.max_frame_bytes
    )
}

fn validate(c: &AudioConfigStart) -> Result<(), String> {
    for (what, rate) in [
        ("input", c.input_audio_config.sampling_rate),
        ("output", c.output_audio_config.sampling_rate),
    ] {
        if !RATES.contains(&rate) {
            return Err(format!(
                "{what} sampling_rate {rate} is outside 8000..=96000"
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut stream: futures::stream::SplitStream<WebSocket>,
    call: &CallHandle,
    config: &AudioConfigStart,
    limits: Limits,
    ctl: mpsc::Sender<String>,
    services: &Services,
    stop: &CancellationToken,
    server: &CancellationToken,
) {
    let metrics = &services.metrics;
    let input = &config.input_audio_config;
    let sample_format = match input.audio_encoding {
        Encoding::Linear16 => SampleFormat::Pcm16,
        Encoding::Mulaw => SampleFormat::Mulaw,
    };
    let mut decoder = StreamDecoder::new(WavFormat {
        sample_format,
        channels: 1,
        sample_rate: input.sampling_rate,
    });
    // Only needed if a WAV header declares another rate than the config did.
    let mut fixup: Option<StreamResampler> = None;
    let report = |kind: &'static str, message: String| {
        metrics.error(kind);
        tracing::debug!(kind, %message, "bad input from caller");
        let ctl = ctl.clone();
        async move {
            let _ = ctl.send(error_json(kind, &message)).await;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = server.cancelled() => return,
            _ = stop.cancelled() => return,
            m = stream.next() => m,
        };
        match classify(msg, limits) {
            Incoming::Closed => return,
            Incoming::Skip => {}
            Incoming::Reject(kind, message) => report(kind, message).await,
            Incoming::Message(ClientMessage::Audio { data }) => {
                let bytes = match protocol::decode_base64(&data) {
                    Ok(b) => b,
                    Err(e) => {
                        report(e.kind(), e.to_string()).await;
                        continue;
                    }
                };
                let mut samples = match decoder.push(&bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        report("bad_audio", e.to_string()).await;
                        continue;
                    }
                };
                let rate = decoder.format().sample_rate;
                if rate != input.sampling_rate {
                    let r = match &mut fixup {
                        Some(r) if r.input_rate() == rate => r,
                        slot => match StreamResampler::new(rate, input.sampling_rate) {
                            Ok(r) => slot.insert(r),
                            Err(e) => {
                                report("bad_audio", e.to_string()).await;
                                continue;
                            }
                        },
                    };
                    samples = r.push(&samples).unwrap_or_default();
                }
                if !samples.is_empty() && call.audio(samples).await.is_err() {
                    return;
                }
            }
            Incoming::Message(ClientMessage::Stop) => return,
            Incoming::Message(ClientMessage::GetHistory) => match call.history().await {
                Ok(h) => {
                    let json = ServerMessage::History { conversation: &h }.to_json();
                    let _ = ctl.send(json).await;
                }
                Err(_) => return,
            },
            Incoming::Message(ClientMessage::AudioConfigStart(_)) => {
                report(
                    "already_started",
                    "the call is already configured; open a new socket for a new call".into(),
                )
                .await;
            }
        }
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut calls: mpsc::Receiver<Outbound>,
    mut control: mpsc::Receiver<String>,
    (rate, encoding): (u32, Encoding),
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let mut due = None;
        let json = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            c = control.recv() => match c { Some(j) => j, None => break },
            m = calls.recv() => match m {
                Some(m) => {
                    if let Outbound::Audio { due: d, .. } = &m {
                        due = *d;
                    }
                    match encode(m, rate, encoding) {
                        Some(j) => j,
                        None => continue,
                    }
                }
                // The call ended on its own (e.g. its VAD failed): say so and close.
                None => {
                    let _ = sink.send(Message::Text(ServerMessage::Stop.to_json().into())).await;
                    break;
                }
            },
        };
        if sink.send(Message::Text(json.into())).await.is_err() {
            break;
        }
        metrics.frame_delivered(due);
    }
    let _ = sink.close().await;
    stop.cancel();
}

fn encode(m: Outbound, rate: u32, encoding: Encoding) -> Option<String> {
    Some(match m {
        Outbound::Audio { samples, reply, .. } => {
            if reply.is_cancelled() {
                return None; // cut off by a barge-in while it waited
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
        Outbound::Clear { reply, spoken } => ServerMessage::Clear {
            reply,
            spoken_text: &spoken,
        }
        .to_json(),
        Outbound::Timeline(t) => ServerMessage::Timeline(&t).to_json(),
        // Vocode has no playback acknowledgements; the pacer's playout clock stands in.
        Outbound::UnitSent { .. } => return None,
        Outbound::History(c) => ServerMessage::History { conversation: &c }.to_json(),
        Outbound::Error { kind, message } => error_json(kind, &message),
    })
}

/// Shared server-side state a connection needs.
pub type SharedServices = Arc<Services>;
