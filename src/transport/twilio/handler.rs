//! One Twilio media stream: waits for `start`, starts a call (µ-law 8 kHz both ways, playback
//! acknowledged by marks), then runs a receive loop (media → call, marks → played units) and a
//! send loop (call → media frames, a mark after each unit, `clear` on barge-in). Malformed events
//! are logged and counted; the call goes on.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, Event, Start};
use crate::audio::{mulaw, Encoding};
use crate::metrics::Metrics;
use crate::pipeline::call::{self, CallHandle, CallOptions, Services};
use crate::pipeline::Outbound;

/// Messages from the call waiting for the socket; the pacer bounds audio to its lead, so this
/// fills only if the socket stalls, and then the call waits.
const OUT_QUEUE: usize = 128;
const RATE: u32 = 8_000;

/// Logs and counts a bad event; Twilio has no error message to send back.
fn bad(services: &Services, kind: &'static str, detail: &dyn std::fmt::Display) {
    services.metrics.error(kind);
    tracing::warn!(kind, %detail, "bad Twilio media-stream event");
}

pub async fn serve(mut socket: WebSocket, services: Services, server: CancellationToken) {
    // Until `start`, only `connected` is expected.
    let start: Start = loop {
        let msg = tokio::select! {
            _ = server.cancelled() => return,
            m = socket.recv() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                bad(
                    &services,
                    "twilio_binary",
                    &"binary frames are not part of the protocol",
                );
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => continue,
        };
        match protocol::parse(&text) {
            Ok(Event::Start { start, .. }) => break start,
            Ok(Event::Connected { .. }) => {}
            Ok(Event::Stop { .. }) => return,
            Ok(other) => bad(&services, "twilio_before_start", &format!("{other:?}")),
            Err(e) => bad(&services, "twilio_bad_event", &e),
        }
    };
    if let Err(e) = start.media_format.check() {
        bad(&services, "twilio_bad_format", &e);
        let _ = socket.close().await;
        return;
    }
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
    };
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let call = match call::start(services.clone(), options, out_tx, &server) {
        Ok(c) => c,
        Err(e) => {
            services.metrics.error("call_start");
            tracing::error!(error = %e, "cannot start the Twilio call");
            let _ = socket.close().await;
            return;
        }
    };
    tracing::info!(call = %call.id, stream = %start.stream_sid, "Twilio stream started");
    let (sink, stream) = socket.split();
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        start.stream_sid.clone(),
        services.metrics.clone(),
        stop.clone(),
    ));
    read_loop(stream, &call, &services, &stop, &server).await;
    drop(call);
    stop.cancel();
    let _ = writer.await;
}

async fn read_loop(
    mut stream: futures::stream::SplitStream<WebSocket>,
    call: &CallHandle,
    services: &Services,
    stop: &CancellationToken,
    server: &CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = server.cancelled() => return,
            _ = stop.cancelled() => return,
            m = stream.next() => m,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                bad(
                    services,
                    "twilio_binary",
                    &"binary frames are not part of the protocol",
                );
                continue;
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => continue,
        };
        let event = match protocol::parse(&text) {
            Ok(e) => e,
            Err(e) => {
                bad(services, "twilio_bad_event", &e);
                continue;
            }
        };
        match event {
            Event::Media { media } => {
                // Only the caller's side is heard; a stream never carries our own audio back.
                if media.track.as_deref().is_some_and(|t| t != "inbound") {
                    continue;
                }
                match protocol::decode_payload(&media.payload) {
                    Ok(bytes) => {
                        if call.audio(mulaw::decode_to_f32(&bytes)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => bad(services, "twilio_bad_payload", &e),
                }
            }
            Event::Mark { mark } => match protocol::parse_mark_name(&mark.name) {
                Some((reply, unit)) => {
                    if call.played(reply, unit).await.is_err() {
                        return;
                    }
                }
                None => bad(services, "twilio_unknown_mark", &mark.name),
            },
            Event::Dtmf { dtmf } => tracing::info!(call = %call.id, digit = %dtmf.digit, "DTMF"),
            Event::Stop { .. } => return,
            Event::Connected { .. } | Event::Start { .. } => bad(
                services,
                "twilio_repeated_start",
                &"connected/start after the stream began",
            ),
        }
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut calls: mpsc::Receiver<Outbound>,
    stream_sid: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let out = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            m = calls.recv() => match m { Some(m) => m, None => break },
        };
        let mut due = None;
        let json = match out {
            // Frames and marks of a reply cut off while they waited are never sent.
            Outbound::Audio {
                samples,
                reply,
                due: d,
            } if !reply.is_cancelled() => {
                due = d;
                protocol::media(&stream_sid, &mulaw::encode_from_f32(&samples))
            }
            Outbound::UnitSent { reply, unit, token } if !token.is_cancelled() => {
                protocol::mark(&stream_sid, &protocol::mark_name(reply, unit))
            }
            Outbound::Clear { .. } => protocol::clear(&stream_sid),
            _ => continue,
        };
        if sink.send(Message::Text(json.into())).await.is_err() {
            break;
        }
        metrics.frame_delivered(due);
    }
    let _ = sink.close().await;
    stop.cancel();
}
