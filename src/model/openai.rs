//! The speech-language model behind an OpenAI-compatible chat-completions API: vLLM serving an
//! audio model (Ultravox, Qwen2-Audio), or a hosted service that speaks the same API. Each turn
//! is one streamed `POST {base_url}/v1/chat/completions` whose newest user message carries the
//! turn as an `input_audio` part (base64 WAV, 16 kHz mono 16-bit). The session keeps the
//! conversation: the bot's replies as text, cut to what the caller heard; the user's newest
//! `history_audio_turns` turns as audio, and a short text note for each older one (the model
//! heard them, and we keep no transcript). Dropping the response closes its connection, which is
//! how a barge-in or a discarded tentative turn stops the server's work.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{SlmError, SlmSession, SpeechLanguageModel, TokenStream, UserTurn, TOKEN_QUEUE};
use crate::audio::{wav, Encoding, MODEL_RATE};
use crate::net::{self, ApiKey};

/// `[slm.openai]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiSlmConfig {
    /// The server's root; requests go to `{base_url}/v1/chat/completions`.
    pub base_url: String,
    /// The model name the server serves.
    pub model: String,
    /// The environment variable holding the API key, sent as a bearer token when set.
    pub api_key_env: String,
    /// TCP and TLS setup.
    pub connect_timeout_ms: u64,
    /// From sending a turn to the reply's first token.
    pub first_token_timeout_ms: u64,
    /// Longest wait between two pieces of a reply's text once it has started; keep-alive comments
    /// and empty deltas do not count, so a server that only keeps the connection open stalls.
    pub stall_timeout_ms: u64,
    pub max_tokens: u32,
    /// Unset: the server's default.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The newest user turns sent as audio, the current one included; older ones go as a text
    /// note. vLLM takes one audio item per prompt unless started with a higher
    /// `--limit-mm-per-prompt`.
    pub history_audio_turns: usize,
    /// Exchanges kept in the conversation; older ones are dropped.
    pub max_history_turns: usize,
}

impl Default for OpenAiSlmConfig {
    fn default() -> Self {
        OpenAiSlmConfig {
            base_url: "http://127.0.0.1:8000".into(),
            model: "fixie-ai/ultravox-v0_5-llama-3_1-8b".into(),
            api_key_env: "GAZELLE_SLM_API_KEY".into(),
            connect_timeout_ms: 2_000,
            first_token_timeout_ms: 10_000,
            stall_timeout_ms: 5_000,
            max_tokens: 256,
            temperature: None,
            top_p: None,
            history_audio_turns: 1,
            max_history_turns: 32,
        }
    }
}

impl OpenAiSlmConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|e| format!("slm.openai.base_url {:?}: {e}", self.base_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "slm.openai.base_url must be http or https, not {}",
                url.scheme()
            ));
        }
        if self.model.trim().is_empty() {
            return Err("slm.openai.model must name the served model".into());
        }
        if self.connect_timeout_ms == 0
            || self.first_token_timeout_ms == 0
            || self.stall_timeout_ms == 0
        {
            return Err("slm.openai timeouts must all be above 0 ms".into());
        }
        if self.history_audio_turns == 0 || self.max_history_turns == 0 || self.max_tokens == 0 {
            return Err(
                "slm.openai.history_audio_turns, max_history_turns and max_tokens must be at \
                 least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What went wrong with a reply from the model server.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("cannot reach the model server at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the model server refused our credentials (HTTP {status}); set its API key in ${env}")]
    Unauthorized { status: u16, env: String },
    #[error("the model server does not serve the model {model:?} (HTTP 404): {detail}")]
    NoModel { model: String, detail: String },
    #[error("the model server is rate-limiting us (HTTP 429): {detail}")]
    RateLimited { detail: String },
    #[error("the model server failed (HTTP {status}): {detail}")]
    Server { status: u16, detail: String },
    #[error("the model server rejected the request (HTTP {status}): {detail}")]
    Rejected { status: u16, detail: String },
    #[error("the model server sent no token within {ms} ms")]
    NoFirstToken { ms: u64 },
    #[error("the model server's reply stalled: no text for {ms} ms")]
    Stalled { ms: u64 },
    #[error("the model server's stream broke off: {0}")]
    Broken(String),
    #[error("the model server sent an error in its stream: {0}")]
    InStream(String),
    #[error("the model server's answer is not a chat-completions stream: {0}")]
    Protocol(String),
}

/// A line of the event stream longer than this is not one we read.
const MAX_LINE: usize = 1 << 20;
/// The most of an error body read, for its message.
const MAX_ERROR_BODY: usize = 16 << 10;

/// The text that stands for a user turn whose audio is no longer sent.
const EARLIER_TURN: &str = "(an earlier spoken turn; its audio is not repeated)";

struct Shared {
    cfg: OpenAiSlmConfig,
    url: String,
    client: reqwest::Client,
    key: Option<ApiKey>,
}

/// The backend; one HTTP client shared by every call.
pub(crate) struct OpenAiModel {
    shared: Arc<Shared>,
}

impl OpenAiModel {
    pub(crate) fn new(cfg: &OpenAiSlmConfig) -> Result<Self, SlmError> {
        cfg.validate().map_err(|e| SlmError::LoadFailed {
            name: "openai".into(),
            source: Arc::new(std::io::Error::other(e)),
        })?;
        let client = net::client(Duration::from_millis(cfg.connect_timeout_ms)).map_err(|e| {
            SlmError::LoadFailed {
                name: "openai".into(),
                source: Arc::new(e),
            }
        })?;
        let key = ApiKey::from_env(&cfg.api_key_env);
        if key.is_none() {
            tracing::info!(env = %cfg.api_key_env, "no model server key in the environment; sending requests without one");
        }
        let url = format!("{}/v1/chat/completions", cfg.base_url.trim_end_matches('/'));
        Ok(OpenAiModel {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                url,
                client,
                key,
            }),
        })
    }
}

impl SpeechLanguageModel for OpenAiModel {
    fn name(&self) -> &str {
        "openai"
    }

    fn open_session(&self, system_prompt: Option<&str>) -> Result<Box<dyn SlmSession>, SlmError> {
        Ok(Box::new(OpenAiSession {
            shared: self.shared.clone(),
            system: system_prompt.map(str::to_string),
            history: Vec::new(),
            current: None,
        }))
    }
}

#[derive(Debug, Clone)]
enum Entry {
    /// A user turn, with its audio while it is among the newest `history_audio_turns`.
    User(Option<Arc<[f32]>>),
    Bot(String),
}

/// The reply in flight.
struct Current {
    /// What it has said so far.
    text: Arc<Mutex<String>>,
    /// Drops its request.
    stop: CancellationToken,
}

struct OpenAiSession {
    shared: Arc<Shared>,
    system: Option<String>,
    history: Vec<Entry>,
    current: Option<Current>,
}

impl OpenAiSession {
    /// Files the last reply, in full, in the history (unless it was cut: see `reply_truncated`).
    fn settle(&mut self) {
        if let Some(c) = self.current.take() {
            let text = c.text.lock().expect("not poisoned").trim().to_string();
            if !text.is_empty() {
                self.history.push(Entry::Bot(text));
            }
        }
    }

    fn start(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.settle();
        self.history.push(Entry::User(Some(turn.audio)));
        self.forget_old();
        let body = request_body(&self.shared.cfg, self.system.as_deref(), &self.history);
        let (tx, rx) = mpsc::channel(TOKEN_QUEUE);
        let text = Arc::new(Mutex::new(String::new()));
        let stop = cancel.child_token();
        tokio::spawn(stream_reply(
            self.shared.clone(),
            body,
            tx,
            stop.clone(),
            text.clone(),
        ));
        self.current = Some(Current { text, stop });
        rx
    }

    /// Keeps the newest `max_history_turns` user turns and the audio of the newest
    /// `history_audio_turns`.
    fn forget_old(&mut self) {
        let cfg = &self.shared.cfg;
        let mut users = 0;
        let mut cut = 0;
        for (i, e) in self.history.iter_mut().enumerate().rev() {
            if let Entry::User(audio) = e {
                users += 1;
                if users > cfg.history_audio_turns {
                    *audio = None;
                }
                if users > cfg.max_history_turns {
                    cut = i + 1;
                    break;
                }
            }
        }
        self.history.drain(..cut);
        // The conversation starts with the user.
        while matches!(self.history.first(), Some(Entry::Bot(_))) {
            self.history.remove(0);
        }
    }
}

impl SlmSession for OpenAiSession {
    fn respond(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel)
    }

    fn begin_tentative(&mut self, turn: UserTurn, cancel: CancellationToken) -> TokenStream {
        self.start(turn, cancel)
    }

    fn commit(&mut self) {}

    fn discard(&mut self) {
        if let Some(c) = self.current.take() {
            c.stop.cancel();
            if matches!(self.history.last(), Some(Entry::User(_))) {
                self.history.pop();
            }
        }
    }

    fn reply_truncated(&mut self, spoken: &str) {
        let spoken = spoken.trim();
        match self.current.take() {
            Some(c) => {
                c.stop.cancel();
                if !spoken.is_empty() {
                    self.history.push(Entry::Bot(spoken.to_string()));
                }
            }
            None => {
                if let Some(Entry::Bot(text)) = self.history.last_mut() {
                    if spoken.is_empty() {
                        self.history.pop();
                    } else {
                        *text = spoken.to_string();
                    }
                }
            }
        }
    }
}

/// The chat-completions request for the conversation so far. User turns with no bot reply
/// between them (a reply cut before a word was heard) go as one user message, so the roles
/// alternate.
fn request_body(cfg: &OpenAiSlmConfig, system: Option<&str>, history: &[Entry]) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        messages.push(json!({"role": "system", "content": s}));
    }
    for e in history {
        match e {
            Entry::User(audio) => {
                let part = match audio {
                    Some(a) => {
                        let bytes = wav::write(a, MODEL_RATE, Encoding::Linear16);
                        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
                        json!({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
                    }
                    None => json!({"type": "text", "text": EARLIER_TURN}),
                };
                match messages.last_mut() {
                    Some(m) if m["role"] == "user" => {
                        m["content"].as_array_mut().expect("parts").push(part)
                    }
                    _ => messages.push(json!({"role": "user", "content": [part]})),
                }
            }
            Entry::Bot(text) => messages.push(json!({"role": "assistant", "content": text})),
        }
    }
    let mut body = json!({
        "model": cfg.model,
        "stream": true,
        "max_tokens": cfg.max_tokens,
        "messages": messages,
    });
    if let Some(t) = cfg.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = cfg.top_p {
        body["top_p"] = json!(p);
    }
    body
}

/// Streams one reply into `tx` until it ends, fails, or `stop` fires (which drops the request).
async fn stream_reply(
    shared: Arc<Shared>,
    body: Value,
    tx: mpsc::Sender<Result<String, SlmError>>,
    stop: CancellationToken,
    text: Arc<Mutex<String>>,
) {
    let result = tokio::select! {
        _ = stop.cancelled() => return,
        r = read_reply(&shared, &body, &tx, &text) => r,
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "the model server failed a turn");
        let _ = tx.send(Err(SlmError::Generation(Arc::new(e)))).await;
    }
}

async fn read_reply(
    shared: &Shared,
    body: &Value,
    tx: &mpsc::Sender<Result<String, SlmError>>,
    text: &Mutex<String>,
) -> Result<(), RemoteError> {
    let cfg = &shared.cfg;
    let first_ms = cfg.first_token_timeout_ms;
    let first_deadline = Instant::now() + Duration::from_millis(first_ms);
    let stall = Duration::from_millis(cfg.stall_timeout_ms);
    let mut req = shared.client.post(&shared.url).json(body);
    if let Some(k) = &shared.key {
        req = req.bearer_auth(k.expose());
    }
    let resp = tokio::time::timeout_at(first_deadline, req.send())
        .await
        .map_err(|_| RemoteError::NoFirstToken { ms: first_ms })?
        .map_err(|e| RemoteError::Connect {
            url: shared.url.clone(),
            detail: net::error_chain(&e),
        })?;
    let status = resp.status().as_u16();
    if status != 200 {
        let detail = error_body(resp, first_deadline).await;
        let detail = match &shared.key {
            Some(k) => k.redact(&detail),
            None => detail,
        };
        let env = cfg.api_key_env.clone();
        return Err(match status {
            401 | 403 => RemoteError::Unauthorized { status, env },
            404 => RemoteError::NoModel {
                model: cfg.model.clone(),
                detail,
            },
            429 => RemoteError::RateLimited { detail },
            500..=599 => RemoteError::Server { status, detail },
            _ => RemoteError::Rejected { status, detail },
        });
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    // The stall is measured on text: keep-alive comments, role chunks and empty deltas keep a
    // connection open but say nothing, and a hung server sends them forever.
    let mut last_text: Option<Instant> = None;
    loop {
        let started = last_text.is_some();
        let deadline = match last_text {
            Some(t) => t + stall,
            None => first_deadline,
        };
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) if started => {
                return Err(RemoteError::Stalled {
                    ms: cfg.stall_timeout_ms,
                })
            }
            Err(_) => return Err(RemoteError::NoFirstToken { ms: first_ms }),
            Ok(None) => {
                return Err(RemoteError::Broken(
                    "the stream ended without [DONE]".into(),
                ))
            }
            Ok(Some(Err(e))) => return Err(RemoteError::Broken(net::error_chain(&e))),
            Ok(Some(Ok(b))) => b,
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            match parse_line(line.trim_end_matches(['\n', '\r']))? {
                Line::Done => return Ok(()),
                Line::Skip => {}
                Line::Text(t) if t.is_empty() => {}
                Line::Text(t) => {
                    last_text = Some(Instant::now());
                    text.lock().expect("not poisoned").push_str(&t);
                    if tx.send(Ok(t)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        if buf.len() > MAX_LINE {
            return Err(RemoteError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
    }
}

/// What one line of the event stream says.
#[derive(Debug, PartialEq)]
enum Line {
    Text(String),
    Done,
    /// A comment, an empty line, another field, or a chunk with no text (the role, the finish).
    Skip,
}

fn parse_line(line: &str) -> Result<Line, RemoteError> {
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(Line::Skip);
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Line::Done);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| RemoteError::Protocol(format!("{e} in {:?}", net::short(data))))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| err.to_string());
        return Err(RemoteError::InStream(net::short(&msg)));
    }
    let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
    Ok(if content.is_empty() {
        Line::Skip
    } else {
        Line::Text(content.to_string())
    })
}

/// The message of a failed response: at most `MAX_ERROR_BODY` bytes of it, read by `deadline`,
/// its `error.message` when it is OpenAI's JSON error shape.
async fn error_body(resp: reqwest::Response, deadline: Instant) -> String {
    let mut stream = resp.bytes_stream();
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(b))) => body.extend_from_slice(&b),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body).to_string();
    let message = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
        v["error"]["message"]
            .as_str()
            .or(v["message"].as_str())
            .map(str::to_string)
    });
    net::short(&message.unwrap_or(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lines_parse() {
        let text = r#"data: {"choices":[{"index":0,"delta":{"content":" there"}}]}"#;
        assert_eq!(parse_line(text).unwrap(), Line::Text(" there".into()));
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(parse_line(role).unwrap(), Line::Skip);
        assert_eq!(parse_line("data: [DONE]").unwrap(), Line::Done);
        assert_eq!(parse_line(": keep-alive").unwrap(), Line::Skip);
        assert_eq!(parse_line("").unwrap(), Line::Skip);
        let err = r#"data: {"error":{"message":"out of memory","code":500}}"#;
        assert!(matches!(parse_line(err), Err(RemoteError::InStream(m)) if m == "out of memory"));
        assert!(matches!(
            parse_line("data: {not json"),
            Err(RemoteError::Protocol(_))
        ));
    }

    fn user(n: usize) -> Entry {
        Entry::User(Some(Arc::from(vec![0.0f32; n])))
    }

    /// Only the newest `max_history_turns` user turns stay, only the newest
    /// `history_audio_turns` keep their audio, and the conversation still starts with the user.
    #[test]
    fn old_turns_are_dropped_and_lose_their_audio() {
        let cfg = OpenAiSlmConfig {
            max_history_turns: 2,
            history_audio_turns: 1,
            ..Default::default()
        };
        let model = OpenAiModel::new(&cfg).unwrap();
        let mut s = OpenAiSession {
            shared: model.shared.clone(),
            system: None,
            history: vec![
                user(1),
                Entry::Bot("a".into()),
                user(2),
                Entry::Bot("b".into()),
                user(3),
            ],
            current: None,
        };
        s.forget_old();
        assert!(
            matches!(
                &s.history[..],
                [Entry::User(None), Entry::Bot(b), Entry::User(Some(_))] if b == "b"
            ),
            "{:?}",
            s.history
        );
    }

    /// Roles alternate even when a reply was cut before a word was heard, older turns go as a
    /// note, and the system prompt leads.
    #[test]
    fn the_request_alternates_roles_and_keeps_audio_of_the_newest_turns() {
        let cfg = OpenAiSlmConfig::default();
        let history = vec![
            Entry::User(None),
            Entry::Bot("Hello.".into()),
            user(160),
            user(320),
        ];
        let body = request_body(&cfg, Some("Be brief."), &history);
        let m = body["messages"].as_array().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(m[1]["content"][0]["text"], EARLIER_TURN);
        let parts = m[3]["content"].as_array().unwrap();
        assert_eq!(parts.len(), 2, "two turns, one message");
        let data = parts[1]["input_audio"]["data"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let decoded = wav::read(&bytes).unwrap();
        assert_eq!((decoded.sample_rate, decoded.samples.len()), (16_000, 320));
        assert_eq!(body["stream"], true);
        assert!(body.get("temperature").is_none());
    }
}
