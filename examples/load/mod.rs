//! What the load tools share (`bench_calls`, `soak`): a `gazelle serve` child process on a
//! port, the caller's speech as ready-made websocket messages, and readings of the server
//! process (`/proc`) and of its `/metrics`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gazelle::audio::{pcm, resample::resample_all};
pub use gazelle::metrics::quantile;
use gazelle::tts::espeak::{Espeak, EspeakConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The callers' rate and message length.
pub const RATE: u32 = 16_000;
pub const CHUNK_MS: u64 = 20;

/// Runs the tool on two worker threads (the callers share the machine with the server).
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

/// `text` spoken by espeak-ng as 20 ms websocket messages, and the index of the message in which
/// speech ends.
pub async fn utterance(text: &str) -> anyhow::Result<(Vec<String>, usize)> {
    let dir = gazelle::assets::espeak_dir(None)?;
    let voice = Espeak::start(&EspeakConfig {
        dir,
        voice: "en-us".into(),
        rate_wpm: 175,
        cache_units: 0,
    })?;
    let raw = voice.speak(text).await?;
    Ok(messages(resample_all(&raw, voice.sample_rate(), RATE)?))
}

/// A recording of human speech (a WAV file under `tests/fixtures`) as 20 ms websocket messages,
/// and the index of the message in which speech ends. Turn-taking judged on espeak-ng's prosody
/// is not what callers get: Smart Turn finds most of its questions unfinished.
pub fn recording(fixture: &str) -> anyhow::Result<(Vec<String>, usize)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let wav = gazelle::audio::wav::read(&std::fs::read(&path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(messages(resample_all(&wav.samples, wav.sample_rate, RATE)?))
}

/// Speech as 20 ms messages, and the index of the message in which it ends (the last sample
/// above -40 dBFS).
fn messages(mut speech: Vec<f32>) -> (Vec<String>, usize) {
    let last = speech.iter().rposition(|x| x.abs() > 0.01).unwrap_or(0);
    let chunk = (RATE as u64 * CHUNK_MS / 1000) as usize;
    speech.resize(speech.len().div_ceil(chunk) * chunk, 0.0);
    let messages = speech.chunks(chunk).map(message).collect();
    (messages, last / chunk)
}

/// One `websocket_audio` message of PCM16.
pub fn message(samples: &[f32]) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(pcm::f32_to_s16le(samples));
    serde_json::json!({"type": "websocket_audio", "data": data}).to_string()
}

/// 20 ms of silence as a message.
pub fn silence_message() -> String {
    message(&vec![0.0; (RATE as u64 * CHUNK_MS / 1000) as usize])
}

/// Starts `bin serve --port PORT ARGS…` and waits until it answers `/health`.
pub async fn start_server(bin: &Path, port: u16, args: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new(bin)
        .args(["serve", "--port", &port.to_string()])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/health").await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not come up on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(child)
}

/// Waits until `/health` says the model is ready (a model loads after the server listens).
pub async fn wait_until_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let health = http_get(port, "/health").await.unwrap_or_default();
        if health.contains("\"status\":\"ok\"") {
            return Ok(());
        }
        anyhow::ensure!(
            !health.contains("\"status\":\"error\"") && Instant::now() < deadline,
            "the model did not become ready: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// The sum of the samples in a Prometheus text exposition whose name (with labels) starts with
/// `key`.
pub fn metric(exposition: &str, key: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(key))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A numeric field of `/proc/PID/status` (its first number).
fn status_field(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn rss_mb(pid: u32) -> f64 {
    status_field(pid, "VmRSS:").map_or(0.0, |kb| kb / 1024.0)
}

pub fn threads(pid: u32) -> u64 {
    status_field(pid, "Threads:").unwrap_or(0.0) as u64
}

pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}
