//! A Vocode protocol client: connects to `/conversation`, streams audio in the caller's format
//! (optionally with a RIFF header on the first blob, as the web SDK does), and turns the server's
//! messages into timestamped events. The integration tests and the call benchmark use it as the
//! simulated caller; it can also check a remote server from the command line.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::audio::{mulaw, pcm, wav, Encoding};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the server refused the call: {0}")]
    Refused(String),
    #[error("the connection closed")]
    Closed,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub input_rate: u32,
    pub input_encoding: Encoding,
    pub output_rate: u32,
    pub output_encoding: Encoding,
    /// Put a WAV header on the first audio blob only, like the SDK's WAV MediaRecorder.
    pub wav_header_first: bool,
    pub subscribe_transcript: bool,
    pub system_prompt: Option<String>,
    pub first_message: Option<String>,
    pub conversation_id: Option<String>,
    /// Sent as `Authorization: Bearer …` (the server's API key, or a call token).
    pub bearer: Option<String>,
    /// A call token from `POST /auth/token`, sent as `?token=` (what a browser page does).
    pub token: Option<String>,
    /// More headers on the upgrade request (e.g. a W3C `traceparent`).
    pub headers: Vec<(String, String)>,
}

impl ClientConfig {
    pub fn new(rate: u32, encoding: Encoding) -> Self {
        ClientConfig {
            input_rate: rate,
            input_encoding: encoding,
            output_rate: rate,
            output_encoding: encoding,
            wav_header_first: false,
            subscribe_transcript: true,
            system_prompt: None,
            first_message: None,
            conversation_id: None,
            bearer: None,
            token: None,
            headers: Vec::new(),
        }
    }
}

/// Something the server sent, with when it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Instant,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    /// Bot audio, decoded from its WAV message to f32 at `rate`.
    Audio {
        samples: Vec<f32>,
        rate: u32,
    },
    /// Bot text of reply `reply`.
    Transcript {
        reply: u64,
        text: String,
    },
    Clear {
        reply: u64,
        spoken_text: String,
        /// Only paused: the reply may go on.
        paused: bool,
    },
    Timeline(serde_json::Value),
    History(serde_json::Value),
    Error {
        kind: String,
        message: String,
    },
    Stop,
    /// Anything else, verbatim.
    Other(serde_json::Value),
    /// The connection ended; with the server's close code and reason when it sent a close frame.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

pub struct VocodeClient {
    sink: futures::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    pub events: mpsc::UnboundedReceiver<Event>,
    config: ClientConfig,
    sent_header: bool,
    /// Owns the socket's read half; aborted on drop so dropping the client hangs up.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for VocodeClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl VocodeClient {
    /// Connects, sends the audio config and waits for `websocket_ready`.
    pub async fn connect(url: &str, config: ClientConfig) -> Result<Self, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = match &config.token {
            Some(t) => {
                let t: String = form_urlencoded::byte_serialize(t.as_bytes()).collect();
                format!("{url}?token={t}")
            }
            None => url.to_string(),
        };
        let mut request = url.into_client_request()?;
        if let Some(b) = &config.bearer {
            let value = format!("Bearer {b}").parse().map_err(|_| {
                ClientError::Refused("the bearer token is not a header value".into())
            })?;
            request.headers_mut().insert("authorization", value);
        }
        for (k, v) in &config.headers {
            let name = axum::http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ClientError::Refused(format!("{k:?} is not a header name")))?;
            let value = v
                .parse()
                .map_err(|_| ClientError::Refused(format!("{v:?} is not a header value")))?;
            request.headers_mut().insert(name, value);
        }
        // No Nagle: a real-time caller's 20 ms messages must not wait for the previous ACK.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
        let (mut sink, mut stream) = ws.split();
        let start = serde_json::json!({
            "type": "websocket_audio_config_start",
            "input_audio_config": {
                "sampling_rate": config.input_rate,
                "audio_encoding": config.input_encoding,
                "chunk_size": config.input_rate / 50,
            },
            "output_audio_config": {
                "sampling_rate": config.output_rate,
                "audio_encoding": config.output_encoding,
            },
            "conversation_id": config.conversation_id,
            "subscribe_transcript": config.subscribe_transcript,
            "system_prompt": config.system_prompt,
            "first_message": config.first_message,
        });
        sink.send(Message::Text(start.to_string().into())).await?;
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("websocket_ready") => break,
                        Some("gazelle_error") => {
                            return Err(ClientError::Refused(v["message"].to_string()))
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Closed),
            }
        }
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut close = (None, String::new());
            while let Some(msg) = stream.next().await {
                let at = Instant::now();
                let kind = match msg {
                    Ok(Message::Text(t)) => parse_event(&t),
                    Ok(Message::Close(frame)) => {
                        if let Some(f) = frame {
                            close = (Some(u16::from(f.code)), f.reason.to_string());
                        }
                        break;
                    }
                    Err(_) => break,
                    Ok(_) => continue,
                };
                if tx.send(Event { at, kind }).is_err() {
                    return;
                }
            }
            let (code, reason) = close;
            let _ = tx.send(Event {
                at: Instant::now(),
                kind: EventKind::Closed { code, reason },
            });
        });
        Ok(VocodeClient {
            sink,
            events,
            config,
            sent_header: false,
            reader,
        })
    }

    /// Sends one blob of audio at the input rate.
    pub async fn send_audio(&mut self, samples: &[f32]) -> Result<(), ClientError> {
        let bytes = if self.config.wav_header_first && !self.sent_header {
            self.sent_header = true;
            wav::write(samples, self.config.input_rate, self.config.input_encoding)
        } else {
            match self.config.input_encoding {
                Encoding::Linear16 => pcm::f32_to_s16le(samples),
                Encoding::Mulaw => mulaw::encode_from_f32(samples),
            }
        };
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        let msg = serde_json::json!({"type": "websocket_audio", "data": data});
        self.send_text(&msg.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        Ok(self
            .sink
            .send(Message::Text(text.to_string().into()))
            .await?)
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        Ok(self.sink.send(Message::Binary(bytes.into())).await?)
    }

    /// Streams `samples` (at the input rate) in `chunk_ms` blobs at real-time pace. Returns the
    /// instant each blob was sent.
    pub async fn stream_realtime(
        &mut self,
        samples: &[f32],
        chunk_ms: u32,
    ) -> Result<Vec<Instant>, ClientError> {
        let chunk = (self.config.input_rate * chunk_ms / 1000) as usize;
        let start = tokio::time::Instant::now();
        let mut sent = Vec::new();
        for (i, c) in samples.chunks(chunk).enumerate() {
            let due = start + Duration::from_millis(chunk_ms as u64 * i as u64);
            tokio::time::sleep_until(due).await;
            self.send_audio(c).await?;
            sent.push(Instant::now());
        }
        Ok(sent)
    }

    pub async fn request_history(&mut self) -> Result<(), ClientError> {
        self.send_text(r#"{"type":"gazelle_get_history"}"#).await
    }

    pub async fn stop(mut self) -> Result<(), ClientError> {
        self.send_text(r#"{"type":"websocket_stop"}"#).await?;
        let _ = self.sink.close().await;
        Ok(())
    }
}

fn parse_event(text: &str) -> EventKind {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return EventKind::Other(serde_json::Value::String(text.to_string())),
    };
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    match v["type"].as_str().unwrap_or_default() {
        "websocket_audio" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap_or_default())
                .ok()
                .and_then(|b| wav::read(&b).ok());
            match decoded {
                Some(d) => EventKind::Audio {
                    samples: d.samples,
                    rate: d.sample_rate,
                },
                None => EventKind::Other(v),
            }
        }
        "websocket_transcript" => EventKind::Transcript {
            reply: v["reply"].as_u64().unwrap_or_default(),
            text: s("text"),
        },
        "gazelle_clear" => EventKind::Clear {
            reply: v["reply"].as_u64().unwrap_or_default(),
            spoken_text: s("spoken_text"),
            paused: v["paused"].as_bool().unwrap_or(false),
        },
        "gazelle_timeline" => EventKind::Timeline(v),
        "gazelle_history" => EventKind::History(v["conversation"].clone()),
        "gazelle_error" => EventKind::Error {
            kind: s("kind"),
            message: s("message"),
        },
        "websocket_stop" => EventKind::Stop,
        _ => EventKind::Other(v),
    }
}
