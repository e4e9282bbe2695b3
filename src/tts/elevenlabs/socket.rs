//! One ElevenLabs websocket, owned by one task. Replies talk to it through a bounded command
//! queue and get their context's events on a channel of their own, so a multi-context socket can
//! serve reply after reply (and a barge-in can close one context) without reconnecting.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};

use super::PROVIDER;
use crate::tts::http::{self, ApiKey};
use crate::tts::TtsError;

/// Commands waiting for the socket task. Replies send a handful per unit; a full queue makes the
/// reply wait, which is the backpressure we want.
const COMMAND_QUEUE: usize = 64;
/// Events waiting for a reply's context task; a full queue makes the socket task wait to read,
/// which backs the server off through TCP.
pub(crate) const EVENT_QUEUE: usize = 64;

pub(crate) enum Command {
    /// A JSON message for the server.
    Send(String),
    /// Routes a context's events (None: a single-context socket) to `sink`.
    Register(Option<String>, mpsc::Sender<Event>),
    Unregister(Option<String>),
}

#[derive(Debug)]
pub(crate) enum Event {
    /// Decoded base64 audio, and how many characters of text it speaks when the server said.
    Audio {
        bytes: Vec<u8>,
        chars: Option<usize>,
    },
    /// The server finished the context.
    Final,
    /// The socket failed or the server reported an error; nothing more will come.
    Failed(TtsError),
}

/// The handle replies hold. Dropping every handle closes the socket with a close frame.
#[derive(Clone)]
pub(crate) struct Socket {
    commands: mpsc::Sender<Command>,
}

impl Socket {
    /// Starts connecting in the background; commands queue until the handshake is done.
    /// `hello` is sent first (a single-context socket's opening message).
    pub(crate) fn open(url: String, key: ApiKey, connect: Duration, hello: Option<String>) -> Self {
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        tokio::spawn(run(url, key, connect, hello, rx));
        Socket { commands }
    }

    /// False once the socket task has ended (the server closed it, or it never connected).
    pub(crate) fn is_alive(&self) -> bool {
        !self.commands.is_closed()
    }

    pub(crate) async fn send(&self, command: Command) -> bool {
        self.commands.send(command).await.is_ok()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Incoming {
    audio: Option<String>,
    #[serde(alias = "is_final")]
    is_final: Option<bool>,
    #[serde(alias = "context_id")]
    context_id: Option<String>,
    alignment: Option<Alignment>,
    #[serde(alias = "normalized_alignment")]
    normalized_alignment: Option<Alignment>,
    error: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct Alignment {
    #[serde(default)]
    chars: Vec<String>,
}

/// Characters that carry speech: whitespace is not counted, since servers normalise it.
pub(crate) fn spoken_chars(text: &str) -> usize {
    text.chars().filter(|c| !c.is_whitespace()).count()
}

fn handshake_error(e: tungstenite::Error, key: &ApiKey) -> TtsError {
    match e {
        tungstenite::Error::Http(resp) if resp.status().as_u16() >= 400 => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            http::status_error(
                PROVIDER,
                resp.status().as_u16(),
                &key.redact(&body),
                key.env(),
            )
        }
        other => TtsError::Connect {
            provider: PROVIDER,
            detail: format!("websocket handshake failed: {other}"),
        },
    }
}

/// An error the server sent in a message; ElevenLabs names quota and auth problems in text.
fn server_error(text: &str, key_env: &str) -> TtsError {
    let lower = text.to_ascii_lowercase();
    let detail = http::short(text);
    if lower.contains("quota") || lower.contains("rate limit") || lower.contains("too many") {
        TtsError::RateLimited {
            provider: PROVIDER,
            detail,
        }
    } else if lower.contains("api key") || lower.contains("api_key") || lower.contains("unauthor") {
        TtsError::Auth {
            provider: PROVIDER,
            status: 401,
            key_env: key_env.to_string(),
        }
    } else {
        TtsError::Server {
            provider: PROVIDER,
            status: 0,
            detail,
        }
    }
}

async fn run(
    url: String,
    key: ApiKey,
    connect: Duration,
    hello: Option<String>,
    mut commands: mpsc::Receiver<Command>,
) {
    crate::tts::install_crypto_provider();
    let connected = async {
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| TtsError::Config {
                provider: PROVIDER,
                detail: format!("bad websocket URL: {e}"),
            })?;
        let value = key.expose().parse().map_err(|_| TtsError::Config {
            provider: PROVIDER,
            detail: format!("the key in {} is not a valid header value", key.env()),
        })?;
        request.headers_mut().insert("xi-api-key", value);
        // Nagle off: a unit's text is one small frame, and on a reused socket it would otherwise
        // wait for the ACK of the previous one.
        let handshake = tokio_tungstenite::connect_async_with_config(request, None, true);
        match tokio::time::timeout(connect, handshake).await {
            Err(_) => Err(TtsError::Timeout {
                provider: PROVIDER,
                what: format!("connecting the websocket after {} ms", connect.as_millis()),
            }),
            Ok(Err(e)) => Err(handshake_error(e, &key)),
            Ok(Ok((ws, _))) => Ok(ws),
        }
    };
    let ws = match connected.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::warn!(provider = PROVIDER, error = %e, "websocket did not connect");
            // Tell the replies already waiting; later ones find the socket dead and reconnect.
            commands.close();
            while let Some(c) = commands.recv().await {
                if let Command::Register(_, sink) = c {
                    let _ = sink.send(Event::Failed(e.clone())).await;
                }
            }
            return;
        }
    };
    let (mut write, mut read) = ws.split();
    let mut sinks: HashMap<Option<String>, mpsc::Sender<Event>> = HashMap::new();
    if let Some(h) = hello {
        if write.send(Message::text(h)).await.is_err() {
            return;
        }
    }
    let failure = loop {
        tokio::select! {
            c = commands.recv() => match c {
                None => {
                    let _ = write.send(Message::Close(None)).await;
                    return;
                }
                Some(Command::Send(text)) => {
                    if let Err(e) = write.send(Message::text(text)).await {
                        break TtsError::Truncated { provider: PROVIDER, detail: format!("sending: {e}") };
                    }
                }
                Some(Command::Register(ctx, sink)) => { sinks.insert(ctx, sink); }
                Some(Command::Unregister(ctx)) => { sinks.remove(&ctx); }
            },
            m = read.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let Ok(msg) = serde_json::from_str::<Incoming>(&t) else {
                        tracing::debug!(provider = PROVIDER, "ignoring an unparsable message");
                        continue;
                    };
                    route(msg, &mut sinks, &key).await;
                }
                Some(Ok(Message::Close(frame))) => {
                    break TtsError::Truncated {
                        provider: PROVIDER,
                        detail: format!("the server closed the websocket ({frame:?})"),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    break TtsError::Truncated { provider: PROVIDER, detail: format!("websocket error: {e}") };
                }
                None => {
                    break TtsError::Truncated { provider: PROVIDER, detail: "the websocket closed".into() };
                }
            },
        }
    };
    for (_, sink) in sinks.drain() {
        let _ = sink.send(Event::Failed(failure.clone())).await;
    }
}

async fn route(
    msg: Incoming,
    sinks: &mut HashMap<Option<String>, mpsc::Sender<Event>>,
    key: &ApiKey,
) {
    let ctx = msg.context_id.clone();
    let Some(sink) = sinks.get(&ctx).or_else(|| sinks.get(&None)) else {
        return; // a closed context's late audio
    };
    if let Some(err) = msg
        .error
        .as_deref()
        .or(msg.message.as_deref().filter(|_| msg.audio.is_none()))
    {
        let _ = sink
            .send(Event::Failed(server_error(&key.redact(err), key.env())))
            .await;
        return;
    }
    if let Some(b64) = msg.audio.as_deref().filter(|a| !a.is_empty()) {
        match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(bytes) => {
                let chars = msg
                    .alignment
                    .as_ref()
                    .or(msg.normalized_alignment.as_ref())
                    .map(|a| a.chars.iter().map(|c| spoken_chars(c)).sum());
                if sink.send(Event::Audio { bytes, chars }).await.is_err() {
                    sinks.remove(&ctx);
                    return;
                }
            }
            Err(e) => {
                let detail = format!("bad base64 audio: {e}");
                let _ = sink
                    .send(Event::Failed(TtsError::Protocol {
                        provider: PROVIDER,
                        detail,
                    }))
                    .await;
                return;
            }
        }
    }
    if msg.is_final == Some(true) {
        let _ = sink.send(Event::Final).await;
    }
}
