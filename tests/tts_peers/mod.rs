//! Loopback stand-ins for the speech providers, speaking each one's documented wire format:
//! ElevenLabs (HTTP stream, `stream-input`, `multi-stream-input`), coqui xtts-streaming-server,
//! OpenAI-compatible `/v1/audio/speech` and PlayHT `/api/v2/tts/stream`. Each unit of text becomes
//! a constant tone whose level is derived from the text ([`level`]), so a test can check both the
//! order and the content of what came through. A schedule tells the peer how to answer each
//! request: normally, slowly, with an HTTP error, hanging, or cutting the stream short. The peer
//! logs what it saw (requests, keys, closed contexts, dropped connections).
#![allow(dead_code)]

mod elevenlabs;
mod openai;
mod playht;
mod xtts;

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
        .route("/v1/text-to-speech/{voice}/stream", post(elevenlabs::http))
        .route(
            "/v1/text-to-speech/{voice}/stream-input",
            get(elevenlabs::single),
        )
        .route(
            "/v1/text-to-speech/{voice}/multi-stream-input",
            get(elevenlabs::multi),
        )
        .route("/clone_speaker", post(xtts::clone_speaker))
        .route("/studio_speakers", get(xtts::studio_speakers))
        .route("/tts_stream", post(xtts::tts_stream))
        .route("/v1/audio/speech", post(openai::speech))
        .route("/api/v2/tts/stream", post(playht::stream))
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
