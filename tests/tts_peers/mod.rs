//! Loopback stand-ins for the speech providers, speaking each one's documented wire format:
//! ElevenLabs (HTTP stream, `stream-input`, `multi-stream-input`), coqui xtts-streaming-server,
//! OpenAI-compatible `/v1/audio/speech` and PlayHT `/api/v2/tts/stream`. Each unit of text becomes
//! a constant tone whose level is derived from the text ([`level`]), so a test can check both the
//! order and the content of what came through. A schedule tells the peer how to answer each
//! request: normally, slowly, with an HTTP error, hanging, or cutting the stream short. The peer
//! logs what it saw (requests, keys, closed contexts, dropped connections).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Notify};

pub const KEY: &str = "sk-test-SECRET-4242";
pub const USER: &str = "user-SECRET-77";
/// Samples of tone per unit.
pub const UNIT_SAMPLES: usize = 2_400;

/// How the peer answers one request (or one websocket unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Ok,
    /// The first byte after this delay.
    Delay(Duration),
    /// The unit's audio in many small pieces over about two seconds.
    Slow,
    Status(u16),
    /// Accept, then never send audio.
    Hang,
    /// Send part of the audio, then drop the connection.
    Truncate,
    /// Websocket routes answer 200 without upgrading (a proxy that drops websockets).
    NoUpgrade,
}

/// The tone level of a unit's text.
pub fn level(text: &str) -> i16 {
    ((text.trim().bytes().map(u32::from).sum::<u32>() % 40 + 1) * 700) as i16
}

#[derive(Default)]
pub struct PeerLog {
    events: Mutex<Vec<(Instant, String)>>,
    pub notify: Notify,
    schedule: Mutex<Vec<Behavior>>,
    requests: Mutex<usize>,
    /// (request arrived, first audio byte written) per answered unit.
    pub stamps: Mutex<Vec<(Instant, Instant)>>,
}

impl PeerLog {
    pub fn push(&self, event: impl Into<String>) {
        self.events
            .lock()
            .unwrap()
            .push((Instant::now(), event.into()));
        self.notify.notify_waiters();
    }

    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.1.clone())
            .collect()
    }

    /// When the first event containing `needle` was logged, waiting up to `timeout`.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            if let Some(at) = self.find(needle) {
                return Some(at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.find(needle);
            }
        }
    }

    fn find(&self, needle: &str) -> Option<Instant> {
        let ev = self.events.lock().unwrap();
        ev.iter().find(|e| e.1.contains(needle)).map(|e| e.0)
    }

    /// The behaviour for the next request: the schedule's n-th entry, or its last.
    fn next(&self) -> Behavior {
        let mut n = self.requests.lock().unwrap();
        let s = self.schedule.lock().unwrap();
        let b = s.get(*n).or(s.last()).copied().unwrap_or(Behavior::Ok);
        *n += 1;
        b
    }
}

pub struct Peer {
    pub addr: SocketAddr,
    pub log: Arc<PeerLog>,
}

impl Peer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts every provider's routes on one loopback port.
pub async fn start(schedule: Vec<Behavior>) -> Peer {
    let log = Arc::new(PeerLog::default());
    *log.schedule.lock().unwrap() = schedule;
    let app = Router::new()
        .route("/v1/text-to-speech/{voice}/stream", post(eleven_http))
        .route(
            "/v1/text-to-speech/{voice}/stream-input",
            get(eleven_single),
        )
        .route(
            "/v1/text-to-speech/{voice}/multi-stream-input",
            get(eleven_multi),
        )
        .route("/clone_speaker", post(xtts_clone))
        .route("/studio_speakers", get(xtts_studio))
        .route("/tts_stream", post(xtts_stream))
        .route("/v1/audio/speech", post(openai_speech))
        .route("/api/v2/tts/stream", post(playht_stream))
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Nagle off, like a real streaming server: small audio writes go out at once.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Peer { addr, log }
}

#[derive(Clone, Copy)]
enum Enc {
    Pcm,
    Mulaw,
}

fn tone_bytes(text: &str, enc: Enc) -> Vec<u8> {
    let v = level(text);
    match enc {
        Enc::Pcm => std::iter::repeat_n(v.to_le_bytes(), UNIT_SAMPLES)
            .flatten()
            .collect(),
        Enc::Mulaw => vec![gazelle::audio::mulaw::encode(v); UNIT_SAMPLES],
    }
}

fn status(code: u16) -> Response {
    let s = StatusCode::from_u16(code).unwrap();
    (s, format!("{{\"detail\":\"peer says {code}\"}}")).into_response()
}

/// Logs "dropped <what>" if the body stream is dropped before its end (the client went away).
struct DropGuard {
    log: Arc<PeerLog>,
    what: String,
    finished: bool,
}

impl DropGuard {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.log.push(format!("dropped {}", self.what));
        }
    }
}

/// A streamed HTTP body of `bytes`, shaped by `behavior`. Pieces have odd sizes so samples
/// straddle network chunks.
fn stream_body(
    log: Arc<PeerLog>,
    what: String,
    behavior: Behavior,
    mut bytes: Vec<u8>,
    header: Vec<u8>,
) -> Response {
    let arrived = Instant::now();
    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let task_log = log.clone();
    tokio::spawn(async move {
        let (piece, gap) = match behavior {
            Behavior::Slow => (bytes.len() / 100 + 1, Duration::from_millis(20)),
            _ => (333, Duration::ZERO),
        };
        match behavior {
            Behavior::Delay(d) => tokio::time::sleep(d).await,
            Behavior::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            _ => {}
        }
        if behavior == Behavior::Truncate {
            bytes.truncate(bytes.len() / 3);
        }
        let mut first = true;
        let mut all = header;
        all.extend(bytes);
        for p in all.chunks(piece) {
            if first {
                task_log
                    .stamps
                    .lock()
                    .unwrap()
                    .push((arrived, Instant::now()));
                first = false;
            }
            if tx.send(Ok(p.to_vec())).await.is_err() {
                return;
            }
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
        if behavior == Behavior::Truncate {
            let _ = tx
                .send(Err(std::io::Error::other("peer cut the stream")))
                .await;
        }
    });
    let guard = DropGuard {
        log,
        what,
        finished: false,
    };
    let stream = futures::stream::unfold((rx, guard), |(mut rx, mut guard)| async move {
        match rx.recv().await {
            Some(item) => Some((item, (rx, guard))),
            None => {
                guard.finish();
                None
            }
        }
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn format_of(output_format: &str) -> Option<(Enc, u32)> {
    if output_format == "ulaw_8000" {
        return Some((Enc::Mulaw, 8_000));
    }
    let rate = output_format.strip_prefix("pcm_")?.parse().ok()?;
    Some((Enc::Pcm, rate))
}

async fn eleven_http(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    body: String,
) -> Response {
    let b = log.next();
    let fmt = q.get("output_format").cloned().unwrap_or_default();
    log.push(format!("eleven_http format={fmt}"));
    if headers.get("xi-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let Some((enc, _)) = format_of(&fmt) else {
        return status(422);
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    stream_body(
        log.clone(),
        format!("eleven_http {text}"),
        b,
        tone_bytes(&text, enc),
        Vec::new(),
    )
}

async fn eleven_single(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    eleven_ws(log, headers, q, ws, false).await
}

async fn eleven_multi(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    eleven_ws(log, headers, q, ws, true).await
}

async fn eleven_ws(
    log: Arc<PeerLog>,
    headers: HeaderMap,
    q: std::collections::HashMap<String, String>,
    ws: WebSocketUpgrade,
    multi: bool,
) -> Response {
    let fmt = q.get("output_format").cloned().unwrap_or_default();
    log.push(format!("eleven_ws connect multi={multi} format={fmt}"));
    if headers.get("xi-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
        return status(401);
    }
    // The schedule's first entry may refuse the handshake itself.
    let first = log.schedule.lock().unwrap().first().copied();
    match first {
        Some(Behavior::Status(c)) if *log.requests.lock().unwrap() == 0 => {
            *log.requests.lock().unwrap() += 1;
            return status(c);
        }
        Some(Behavior::NoUpgrade) => {
            *log.requests.lock().unwrap() += 1;
            return (StatusCode::OK, "no websockets here").into_response();
        }
        _ => {}
    }
    let Some((enc, _)) = format_of(&fmt) else {
        return status(422);
    };
    ws.on_upgrade(move |socket| eleven_session(socket, log, enc, multi))
}

async fn eleven_session(socket: WebSocket, log: Arc<PeerLog>, enc: Enc, multi: bool) {
    let (mut write, mut read) = socket.split();
    // Outgoing messages; None closes the socket (a truncated stream).
    let (tx, mut rx) = mpsc::channel::<Option<String>>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match m {
                Some(text) => {
                    if write.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => {
                    // Cut short: close without the context's end.
                    let _ = write.close().await;
                    return;
                }
            }
        }
    });
    let mut contexts: std::collections::HashMap<String, tokio_util::sync::CancellationToken> =
        Default::default();
    // Units of one context are spoken in order.
    let mut queues: std::collections::HashMap<String, mpsc::Sender<String>> = Default::default();
    while let Some(Ok(msg)) = read.next().await {
        let Message::Text(t) = msg else { continue };
        let v: serde_json::Value = match serde_json::from_str(&t) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let ctx = v["context_id"].as_str().unwrap_or("").to_string();
        if v["close_context"].as_bool() == Some(true) {
            log.push(format!("close_context {ctx}"));
            if let Some(c) = contexts.remove(&ctx) {
                c.cancel();
            }
            queues.remove(&ctx);
            continue;
        }
        let text = v["text"].as_str().unwrap_or("").to_string();
        if !multi && text.is_empty() {
            // End of a single-context stream: finish what is queued, then isFinal.
            log.push("end of input");
            if let Some(q) = queues.remove(&ctx) {
                let _ = q.send(String::new()).await;
            }
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        log.push(format!(
            "text ctx={ctx} flush={} {}",
            v["flush"],
            text.trim()
        ));
        let cancel = contexts.entry(ctx.clone()).or_default().clone();
        let q = queues.entry(ctx.clone()).or_insert_with(|| {
            let (qtx, qrx) = mpsc::channel(64);
            tokio::spawn(speak_context(
                qrx,
                tx.clone(),
                log.clone(),
                ctx.clone(),
                cancel,
                enc,
                multi,
            ));
            qtx
        });
        let _ = q.send(text).await;
    }
    log.push("ws closed by client");
    writer.abort();
}

async fn speak_context(
    mut texts: mpsc::Receiver<String>,
    out: mpsc::Sender<Option<String>>,
    log: Arc<PeerLog>,
    ctx: String,
    cancel: tokio_util::sync::CancellationToken,
    enc: Enc,
    multi: bool,
) {
    let id = (!ctx.is_empty()).then_some(ctx.clone());
    while let Some(text) = texts.recv().await {
        if text.is_empty() {
            let _ = out
                .send(Some(
                    serde_json::json!({"isFinal": true, "contextId": id}).to_string(),
                ))
                .await;
            return;
        }
        let arrived = Instant::now();
        let b = log.next();
        let pieces = match b {
            Behavior::Slow => 100,
            _ => 4,
        };
        match b {
            Behavior::Delay(d) => tokio::time::sleep(d).await,
            Behavior::Hang => {
                cancel.cancelled().await;
                return;
            }
            Behavior::Status(_) => {
                let msg = serde_json::json!({"error": "quota_exceeded", "message": "quota exceeded", "contextId": id});
                let _ = out.send(Some(msg.to_string())).await;
                return;
            }
            _ => {}
        }
        let bytes = tone_bytes(&text, enc);
        let chars: Vec<String> = text.trim_end().chars().map(String::from).collect();
        let per_bytes = bytes.len().div_ceil(pieces) | 1; // odd, so samples straddle messages
        let messages = bytes.len().div_ceil(per_bytes);
        // Each message's alignment covers the characters its audio speaks, the last one the end.
        let share =
            |i: usize| chars[i * chars.len() / messages..(i + 1) * chars.len() / messages].to_vec();
        for (i, p) in bytes.chunks(per_bytes).enumerate() {
            if cancel.is_cancelled() {
                return;
            }
            if i == 0 {
                log.stamps.lock().unwrap().push((arrived, Instant::now()));
            }
            if b == Behavior::Truncate && i == 1 {
                log.push("truncating");
                let _ = out.send(None).await;
                return;
            }
            let mut c = share(i);
            if i + 1 == messages {
                c.extend(text[text.trim_end().len()..].chars().map(String::from));
            }
            let msg = serde_json::json!({
                "audio": base64::engine::general_purpose::STANDARD.encode(p),
                "isFinal": null,
                "contextId": id,
                "alignment": {"chars": c, "charStartTimesMs": [], "charDurationsMs": []},
            });
            if out.send(Some(msg.to_string())).await.is_err() {
                return;
            }
            if b == Behavior::Slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = multi;
    }
}

fn speaker_json() -> serde_json::Value {
    serde_json::json!({"speaker_embedding": [0.25, -0.5, 1.0], "gpt_cond_latent": [[0.1, 0.2], [0.3, 0.4]]})
}

async fn xtts_clone(State(log): State<Arc<PeerLog>>, body: axum::body::Bytes) -> Response {
    let has_file =
        body.windows(8).any(|w| w == b"wav_file") && body.windows(4).any(|w| w == b"RIFF");
    log.push(format!("clone_speaker file={has_file}"));
    axum::Json(speaker_json()).into_response()
}

async fn xtts_studio(State(log): State<Arc<PeerLog>>) -> Response {
    log.push("studio_speakers");
    axum::Json(serde_json::json!({"Ana Florence": speaker_json(), "Other": {"speaker_embedding": [9], "gpt_cond_latent": [[9]]}}))
        .into_response()
}

async fn xtts_stream(State(log): State<Arc<PeerLog>>, body: String) -> Response {
    let b = log.next();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ok = v["speaker_embedding"] == speaker_json()["speaker_embedding"]
        && v["gpt_cond_latent"] == speaker_json()["gpt_cond_latent"]
        && v["add_wav_header"] == false
        && v["language"].is_string();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    log.push(format!("tts_stream speaker_ok={ok} {text}"));
    if !ok {
        return status(422);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    stream_body(
        log.clone(),
        format!("xtts {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        Vec::new(),
    )
}

async fn openai_speech(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let b = log.next();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {KEY}") {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["input"].as_str().unwrap_or_default().to_string();
    let fmt = v["response_format"].as_str().unwrap_or("mp3").to_string();
    log.push(format!(
        "speech format={fmt} model={} voice={} {text}",
        v["model"], v["voice"]
    ));
    let header = match fmt.as_str() {
        "pcm" => Vec::new(),
        "wav" => {
            // A streaming header: the data length is unknown.
            let mut h = gazelle::audio::wav::write(&[], 24_000, gazelle::audio::Encoding::Linear16);
            let n = h.len();
            h[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
            h
        }
        _ => return status(400),
    };
    stream_body(
        log.clone(),
        format!("openai {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        header,
    )
}

async fn playht_stream(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let b = log.next();
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if h("authorization") != KEY || h("x-user-id") != USER {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    log.push(format!(
        "playht rate={} format={} engine={} {text}",
        v["sample_rate"], v["output_format"], v["voice_engine"]
    ));
    stream_body(
        log.clone(),
        format!("playht {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        Vec::new(),
    )
}
