//! Shared pieces of the integration tests: the real server on a loopback port, and real speech
//! from the espeak-ng voice. Missing runtime files fail the tests with the setup hint; nothing is
//! skipped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::OnceLock;

use gazelle::assets;
use gazelle::audio::resample::resample_all;
use gazelle::config::Config;
use gazelle::server::{self, AppState};
use gazelle::tts::espeak::{Espeak, EspeakConfig};
use gazelle::vad::{self, SileroModel};
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    /// The model's background load (Gazelle); ready at once for the scripted model.
    pub load: server::setup::ModelLoad,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/conversation", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server and waits until every call has ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.take().expect("running").send(());
        self.task
            .take()
            .expect("running")
            .await
            .expect("server task");
    }
}

pub async fn start_server(config: Config) -> TestServer {
    start_server_with(config, |_| {}).await
}

/// Starts the server after `adjust` has changed its state (e.g. to set a Twilio auth token).
pub async fn start_server_with(config: Config, adjust: impl FnOnce(&mut AppState)) -> TestServer {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let (services, load) = server::setup::services(&config).unwrap_or_else(|e| {
        panic!("cannot start the server's services: {e}\n(run scripts/setup first)")
    });
    let mut state = server::setup::state(&config, services);
    adjust(&mut state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let s = state.clone();
    let task = tokio::spawn(async move {
        let stop = server::Stop::default();
        let now = stop.now.clone();
        tokio::spawn(async move {
            let _ = stopped.await;
            now.cancel();
        });
        server::serve(listener, s, stop).await.unwrap();
    });
    TestServer {
        addr,
        state,
        load,
        stop: Some(stop),
        task: Some(task),
    }
}

/// The admin token [`with_admin`] sets.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Server state with credentials: an optional API key and the admin token [`ADMIN_TOKEN`],
/// as `GAZELLE_API_KEY` and `GAZELLE_ADMIN_TOKEN` would set them (tests run in parallel, so they
/// never touch the process environment).
pub fn credentials(
    state: &mut AppState,
    api_key: Option<&str>,
    config: gazelle::transport::auth::AuthConfig,
) {
    use gazelle::transport::auth::{Auth, AuthSettings, Secret};
    state.auth = std::sync::Arc::new(Auth::new(AuthSettings {
        api_key: api_key.map(Secret::new),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        twilio_token: state.twilio.auth_token.as_deref().map(Secret::new),
        config,
        twilio_token_env: "TWILIO_AUTH_TOKEN".into(),
    }));
}

/// Opens the call registry with [`ADMIN_TOKEN`].
pub fn with_admin(state: &mut AppState) {
    credentials(state, None, Default::default());
}

pub fn espeak() -> Espeak {
    let dir = assets::espeak_dir(None).expect("the espeak-ng voice (run scripts/setup)");
    Espeak::start(&EspeakConfig {
        dir,
        voice: "en-us".into(),
        rate_wpm: 175,
        cache_units: 0,
    })
    .unwrap()
}

/// `text` spoken by espeak-ng, at `rate`.
pub async fn speech(text: &str, rate: u32) -> Vec<f32> {
    let e = espeak();
    let raw = e.speak(text).await.unwrap();
    resample_all(&raw, e.sample_rate(), rate).unwrap()
}

pub fn silence(ms: u32, rate: u32) -> Vec<f32> {
    vec![0.0; (rate as u64 * ms as u64 / 1000) as usize]
}

/// A Silero session of our own, to check what the server sends is speech.
pub fn silero() -> SileroModel {
    static ENV: OnceLock<()> = OnceLock::new();
    let lib = assets::ort_lib(None).expect("ONNX Runtime (run scripts/setup)");
    let env = vad::silero::init_runtime(&lib).unwrap();
    ENV.get_or_init(|| ());
    SileroModel::load(
        env,
        &assets::vad_model(None).expect("the Silero model (run scripts/setup)"),
    )
    .unwrap()
}

/// First and last sample above `threshold` in magnitude: the truth for where speech is.
pub fn active_span(x: &[f32], threshold: f32) -> Option<(usize, usize)> {
    let first = x.iter().position(|v| v.abs() > threshold)?;
    let last = x.iter().rposition(|v| v.abs() > threshold)?;
    Some((first, last + 1))
}

/// A plain HTTP/1.0 request, so the tests need no HTTP client crate. Returns (status, body).
/// The sum of the samples in `/metrics` whose name (with labels) starts with `key`; 0 when none.
pub async fn metric(server: &TestServer, key: &str) -> f64 {
    let (_, body) = http(server, "GET", "/metrics", &[], "").await;
    body.lines()
        .filter(|l| l.starts_with(key))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

pub async fn http(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\n", server.addr);
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The `<Parameter>`s of a TwiML answer, unescaped.
pub fn twiml_parameters(twiml: &str) -> serde_json::Map<String, serde_json::Value> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    let mut out = serde_json::Map::new();
    for part in twiml.split("<Parameter name=\"").skip(1) {
        let (name, rest) = part.split_once('"').unwrap();
        let value = rest
            .split_once("value=\"")
            .unwrap()
            .1
            .split_once('"')
            .unwrap()
            .0;
        out.insert(unescape(name), serde_json::Value::String(unescape(value)));
    }
    out
}

/// The call's history once `done` holds for it, asked for over the Vocode socket every 100 ms
/// for up to `secs` (a bot turn joins it once played out, which a busy machine delays).
pub async fn history_until(
    client: &mut gazelle::transport::vocode::client::VocodeClient,
    secs: u64,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let h = history(client).await;
        if done(&h) {
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the history within {secs} s: {h}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The call's conversation history, asked for over the Vocode socket (within 5 s).
pub async fn history(
    client: &mut gazelle::transport::vocode::client::VocodeClient,
) -> serde_json::Value {
    use gazelle::transport::vocode::client::EventKind;
    client.request_history().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline.into(), client.events.recv())
            .await
            .expect("a gazelle_history message within 5 s")
            .expect("connection open");
        if let EventKind::History(h) = e.kind {
            return h;
        }
    }
}

/// The bot's text units in `events`, joined by spaces.
pub fn transcript(events: &[gazelle::transport::vocode::client::Event]) -> String {
    use gazelle::transport::vocode::client::EventKind;
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Transcript { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}
