//! The server against hostile and careless clients, on loopback with no credentials unless a test
//! sets them: one regression test per finding of the security review (issue 9), each sending the
//! input that once broke the server and asserting a clear error, the designed fate of the call
//! (survives or ends with a close code), that the server still serves others, and that memory
//! stays bounded. A binary of its own: these tests load the server on purpose, and the latency
//! assertions of the other suites must not share the cores with them.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use gazelle::audio::{pcm, wav, Encoding};
use gazelle::config::Config;
use gazelle::transport::auth::AuthConfig;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The whole test process must stay far below the gigabytes the findings asked for.
const PEAK_RSS_LIMIT_MB: f64 = 1_500.0;

/// Under the silence policy: these tests are about hostile input, and a smart-policy turn's end
/// depends on the end-of-turn model's score of espeak-ng speech and on how soon it comes.
fn config(reply: &str) -> Config {
    let mut c = Config::default();
    c.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    c.slm.reply = reply.into();
    c.slm.token_delay_ms = 5;
    c
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn assert_memory_bounded() {
    let peak = peak_rss_mb();
    assert!(peak < PEAK_RSS_LIMIT_MB, "peak RSS {peak:.0} MB");
}

async fn connect(url: &str, headers: &[(&'static str, &str)]) -> Result<Ws, String> {
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(e) => Err(e.to_string()),
    }
}

fn start_message(rate: u32, extra: serde_json::Value) -> String {
    let mut m = serde_json::json!({
        "type": "websocket_audio_config_start",
        "input_audio_config": {"sampling_rate": rate, "audio_encoding": "linear16"},
        "output_audio_config": {"sampling_rate": rate, "audio_encoding": "linear16"},
        "subscribe_transcript": true,
    });
    if let serde_json::Value::Object(o) = extra {
        for (k, v) in o {
            m[k] = v;
        }
    }
    m.to_string()
}

fn audio_message(bytes: &[u8]) -> String {
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    serde_json::json!({"type": "websocket_audio", "data": data}).to_string()
}

/// What the server said until it closed (or `within` passed): its JSON messages and the close
/// frame's code and reason.
async fn read_to_close(
    ws: &mut Ws,
    within: Duration,
) -> (Vec<serde_json::Value>, Option<(u16, String)>) {
    let mut texts = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) | Err(_) => return (texts, None),
        };
        match msg {
            Message::Text(t) => texts.push(serde_json::from_str(&t).unwrap()),
            Message::Close(f) => {
                return (texts, f.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            _ => {}
        }
    }
}

/// Reads until a message of `kind` arrives.
async fn expect_message(ws: &mut Ws, kind: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} within 5 s"))
            .expect("open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// The next `gazelle_error`'s kind and message.
async fn next_error(ws: &mut Ws) -> (String, String) {
    let v = expect_message(ws, "gazelle_error").await;
    (
        v["kind"].as_str().unwrap().to_string(),
        v["message"].as_str().unwrap().to_string(),
    )
}

/// A call that must still work: it hears a question and answers it.
async fn still_answers(server: &common::TestServer) {
    let mut client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(16_000, Encoding::Linear16),
    )
    .await
    .expect("a new call is accepted");
    let mut clip = common::silence(300, 16_000);
    clip.extend(common::speech("Are you still there?", 16_000).await);
    // Past [pipeline.turn] max_silence_ms (1.5 s): the turn ends whatever the model judges.
    clip.extend(common::silence(2_000, 16_000));
    client.stream_realtime(&clip, 20).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), client.events.recv())
            .await
            .expect("an answer within 5 s")
            .expect("connection open");
        if matches!(e.kind, EventKind::Audio { .. }) {
            break;
        }
        assert!(Instant::now() < deadline, "no answer");
    }
    client.stop().await.unwrap();
}

/// The end of a hostile test: the server still answers a new call, memory stayed bounded, and
/// it shuts down cleanly.
async fn finish(server: common::TestServer) {
    still_answers(&server).await;
    assert_memory_bounded();
    server.shutdown().await;
}

async fn wait_until(what: &str, within: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wav_header(rate: u32) -> Vec<u8> {
    let mut h = wav::write(&[], 16_000, Encoding::Linear16);
    h[24..28].copy_from_slice(&rate.to_le_bytes());
    h
}

/// Finding 1: a WAV header's sample rate was never checked. 4,294,967,295 Hz in a 3.3 KB message
/// aborted the process; 1 Hz multiplied 40 KB of audio 96,000 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f1_absurd_wav_rates_get_an_error_and_the_call_goes_on() {
    let server = common::start_server(config("Yes, I am here.")).await;
    let mut ws = connect(&server.ws_url(), &[]).await.unwrap();
    ws.send(Message::Text(
        start_message(16_000, serde_json::json!({})).into(),
    ))
    .await
    .unwrap();
    expect_message(&mut ws, "websocket_ready").await;
    for (rate, payload) in [(u32::MAX, 3_300), (1, 40_000)] {
        let mut blob = wav_header(rate);
        blob.extend(vec![0x11u8; payload]);
        ws.send(Message::Text(audio_message(&blob).into()))
            .await
            .unwrap();
        let (kind, message) = next_error(&mut ws).await;
        assert_eq!(kind, "bad_audio", "{message}");
        assert!(message.contains(&rate.to_string()), "{message}");
    }
    // The same socket still carries audio, and the server still answers others.
    ws.send(Message::Text(audio_message(&[0u8; 640]).into()))
        .await
        .unwrap();
    finish(server).await;
}

/// Finding 5: a header whose rate changed on every blob rebuilt a resampler each time; two such
/// clients took `/health` offline. A call now keeps one format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f5_a_changing_wav_format_is_refused_and_others_are_served() {
    let server = common::start_server(config("Yes, I am here.")).await;
    let mut attackers = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(&server.ws_url(), &[]).await.unwrap();
        ws.send(Message::Text(
            start_message(16_000, serde_json::json!({})).into(),
        ))
        .await
        .unwrap();
        expect_message(&mut ws, "websocket_ready").await;
        attackers.push(ws);
    }
    let started = Instant::now();
    let rates = [8_000u32, 11_025, 16_000, 22_050, 24_000, 44_100, 48_000];
    for i in 0..500 {
        for ws in attackers.iter_mut() {
            let mut blob = wav_header(rates[i % rates.len()]);
            blob.extend(vec![0u8; 483]); // a 527-byte message, as in the finding
            ws.send(Message::Text(audio_message(&blob).into()))
                .await
                .unwrap();
        }
    }
    let sent = started.elapsed();
    // Health answers at once while the flood is being read.
    health_within(&server, Duration::from_secs(2), "while the flood is read").await;
    let mut kinds = std::collections::BTreeMap::new();
    let (texts, _) = read_to_close(&mut attackers[0], Duration::from_millis(1_500)).await;
    for v in texts.iter().filter(|v| v["type"] == "gazelle_error") {
        *kinds
            .entry(v["kind"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    // The client is told (errors beyond what its writer can keep up with are only counted, by
    // design), and the server counts every one: the blobs whose rate is not the first one's,
    // 2 × (500 − 72).
    assert!(
        kinds.contains_key("format_changed"),
        "{kinds:?} after {sent:?}"
    );
    let server_ref = &server;
    let key = "gazelle_errors_total{kind=\"format_changed\"}";
    wait_until(
        "every changed format counted",
        Duration::from_secs(5),
        async || common::metric(server_ref, key).await == 856.0,
    )
    .await;
    finish(server).await;
}

/// Finding 2: the Twilio stream had no frame limit (tungstenite's 64 MiB) and its input queue
/// counted chunks: 8 MiB media payloads took RSS from 320 MB to 6 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_huge_twilio_frames_end_the_stream_with_1009() {
    let server = common::start_server(config("Hello caller.")).await;
    let mut ws = twilio_dial(&server, "CA0001").await;
    let payload = base64::engine::general_purpose::STANDARD.encode(vec![0xFFu8; 6 << 20]);
    let big = serde_json::json!({"event":"media","streamSid":"MZ1","media":{"payload":payload}});
    // The server may close while the frame is still being written; that is the point.
    let _ = ws.send(Message::Text(big.to_string().into())).await;
    // The server closes at once (1009). The close frame itself may be lost: closing a socket
    // with unread bytes in it resets the connection.
    let (_, close) = read_to_close(&mut ws, Duration::from_secs(5)).await;
    assert!(matches!(close, None | Some((1009, _))), "{close:?}");
    assert!(
        ws.next().await.is_none_or(|m| m.is_err()),
        "the stream must be closed"
    );
    assert_eq!(
        common::metric(&server, "gazelle_errors_total{kind=\"frame_too_large\"}").await,
        1.0
    );
    // A frame under the limit but holding 6 s of audio is over the in-flight budget: refused,
    // counted, and the stream goes on.
    let mut ws = twilio_dial(&server, "CA0002").await;
    let payload = base64::engine::general_purpose::STANDARD.encode(vec![0xFFu8; 48_000]);
    let long = serde_json::json!({"event":"media","streamSid":"MZ1","media":{"payload":payload}});
    ws.send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    let server_ref = &server;
    wait_until(
        "audio_too_long counted",
        Duration::from_secs(3),
        async || {
            common::metric(server_ref, "gazelle_errors_total{kind=\"audio_too_long\"}").await >= 1.0
        },
    )
    .await;
    let (_, close) = read_to_close(&mut ws, Duration::from_millis(300)).await;
    assert_eq!(close, None, "the stream must survive an over-long chunk");
    finish(server).await;
}

/// Places a Twilio call the way Twilio does (webhook, then the stream with the TwiML's
/// parameters) and returns the stream after `start`.
async fn twilio_dial(server: &common::TestServer, call_sid: &str) -> Ws {
    let params = twilio_parameters(server, call_sid).await;
    let mut ws = connect(&format!("ws://{}/twilio/stream", server.addr), &[])
        .await
        .unwrap();
    ws.send(Message::Text(twilio_start(call_sid, params).into()))
        .await
        .unwrap();
    ws
}

async fn twilio_parameters(server: &common::TestServer, call_sid: &str) -> serde_json::Value {
    let (status, twiml) = common::http(
        server,
        "POST",
        "/twilio/voice",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!("CallSid={call_sid}"),
    )
    .await;
    assert_eq!(status, 200, "{twiml}");
    common::twiml_parameters(&twiml).into()
}

fn twilio_start(call_sid: &str, params: serde_json::Value) -> String {
    serde_json::json!({
        "event": "start", "streamSid": "MZ1",
        "start": {
            "streamSid": "MZ1", "accountSid": "AC1", "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    })
    .to_string()
}

/// Findings 3 and 9: a 1 MB `first_message` was buffered whole (9.4 GB asked), split in
/// quadratic time, and with no spaces became one unit that blocked the shared voice for 17 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f3_f9_huge_first_messages_are_refused_and_long_ones_are_split() {
    let mut c = config("unused");
    // Frames big enough to carry the 1 MB message to the text limit.
    c.server.max_frame_bytes = 4 << 20;
    let server = common::start_server(c).await;
    let started = Instant::now();
    let mut ws = connect(&server.ws_url(), &[]).await.unwrap();
    let huge = "x".repeat(1 << 20);
    let start = start_message(16_000, serde_json::json!({"first_message": huge}));
    ws.send(Message::Text(start.into())).await.unwrap();
    let (texts, close) = read_to_close(&mut ws, Duration::from_secs(5)).await;
    let error = texts
        .iter()
        .find(|v| v["type"] == "gazelle_error")
        .expect("an error");
    assert_eq!(error["kind"], "text_too_long", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_first_message_chars"),
        "{error}"
    );
    assert_eq!(close.map(|c| c.0), Some(1008));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // At the limit, with no space at all: spoken in units of at most max_unit_chars, and
    // another caller's greeting is not held up behind it.
    let long = "ab".repeat(1_000);
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.first_message = Some(long.clone());
    let mut talker = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut victim_cc = ClientConfig::new(16_000, Encoding::Linear16);
    victim_cc.first_message = Some("Hello there.".into());
    let victim_start = Instant::now();
    let mut victim = VocodeClient::connect(&server.ws_url(), victim_cc)
        .await
        .unwrap();
    let first_audio = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), victim.events.recv())
            .await
            .expect("the victim's greeting within 5 s")
            .unwrap();
        if matches!(e.kind, EventKind::Audio { .. }) {
            break e.at - victim_start;
        }
    };
    assert!(
        first_audio < Duration::from_secs(3),
        "greeting after {first_audio:?}"
    );
    let mut units = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(e)) =
            tokio::time::timeout(Duration::from_millis(200), talker.events.recv()).await
        {
            if let EventKind::Transcript { text, .. } = e.kind {
                units.push(text);
            }
        }
    }
    assert!(units.len() >= 8, "{} units", units.len());
    let max = Config::default().pipeline.max_unit_chars;
    assert!(units.iter().all(|u| u.chars().count() <= max));
    let joined = units.concat();
    assert_eq!(joined.as_str(), &long[..joined.len()]);
    drop(talker);
    victim.stop().await.unwrap();
    assert_memory_bounded();
    server.shutdown().await;
}

/// Finding 4: non-ASCII text panicked the sentence stage (a byte slice through a multi-byte
/// character), and the reply was lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_replies_in_any_script_are_spoken_whole() {
    let reply = format!(
        "¿Qué tal? Muy bien. Die Straße ist schön. a{} こんにちは。元気ですか？ 😀 ¡Adiós!",
        "é".repeat(300)
    );
    let server = common::start_server(config(&reply)).await;
    let mut client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(16_000, Encoding::Linear16),
    )
    .await
    .unwrap();
    let mut clip = common::silence(300, 16_000);
    clip.extend(common::speech("Say something in other languages.", 16_000).await);
    clip.extend(common::silence(2_000, 16_000));
    client.stream_realtime(&clip, 20).await.unwrap();
    let mut units: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    while squash(&units.concat()) != squash(&reply) {
        let e = tokio::time::timeout_at(deadline.into(), client.events.recv())
            .await
            .unwrap_or_else(|_| panic!("reply incomplete: {units:?}"))
            .unwrap();
        match e.kind {
            EventKind::Transcript { text, .. } => units.push(text),
            EventKind::Error { kind, message } => panic!("{kind}: {message}"),
            _ => {}
        }
    }
    let max = Config::default().pipeline.max_unit_chars;
    assert!(units.iter().all(|u| u.chars().count() <= max), "{units:?}");
    // A CJK full stop ends a sentence with no space after it.
    assert!(units.contains(&"元気ですか？".to_string()), "{units:?}");
    client.stop().await.unwrap();
    assert_memory_bounded();
    server.shutdown().await;
}

/// Finding 6: idle sockets held call slots for ever (no start deadline, no ping, no idle
/// timeout), and `/health` said ok with 0 calls while every caller got 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f6_idle_sockets_hold_no_call_slot_and_are_closed() {
    let mut c = config("Hi.");
    c.server.max_calls = 3;
    c.server.start_timeout_ms = 800;
    c.server.ping_interval_ms = 200;
    c.server.idle_timeout_ms = 700;
    let server = common::start_server(c).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(&server.ws_url(), &[]).await.unwrap());
    }
    let (_, health) = common::http(&server, "GET", "/health", &[], "").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["pending_sockets"], 3, "{health}");
    // A real caller still gets a slot.
    let client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(16_000, Encoding::Linear16),
    )
    .await
    .expect("idle sockets must not hold call slots");
    drop(client);
    // The silent sockets are told why and closed at the start deadline.
    for ws in silent.iter_mut() {
        let (texts, close) = read_to_close(ws, Duration::from_secs(3)).await;
        assert!(
            texts.iter().any(|v| v["kind"] == "start_timeout"),
            "{texts:?}"
        );
        assert_eq!(close.map(|c| c.0), Some(1008));
    }
    let server_ref = &server;
    wait_until(
        "pending sockets back to 0",
        Duration::from_secs(2),
        async || server_ref.state.services.metrics.pending_sockets.get() == 0,
    )
    .await;
    // A started call that then sends nothing (it still answers pings) is ended at the idle
    // timeout with a normal close.
    let mut ws = connect(&server.ws_url(), &[]).await.unwrap();
    ws.send(Message::Text(
        start_message(16_000, serde_json::json!({})).into(),
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let (_, close) = read_to_close(&mut ws, Duration::from_secs(3)).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.contains("nothing received"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(700));
    wait_until(
        "active calls back to 0",
        Duration::from_secs(2),
        async || server_ref.state.services.metrics.active_calls.get() == 0,
    )
    .await;
    assert_memory_bounded();
    server.shutdown().await;
}

/// Finding 7: no header-read deadline; 1,100 half-open connections exhausted the file
/// descriptors until they closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f7_half_open_connections_are_dropped_and_health_answers() {
    gazelle::server::listener::raise_fd_limit();
    let mut c = config("Hi.");
    c.server.header_read_timeout_ms = 1_000;
    c.server.max_connections = 1_024;
    // All come from 127.0.0.1: the per-address cap would refuse them first.
    c.server.max_connections_per_ip = 0;
    let server = common::start_server(c).await;
    let mut slow = Vec::new();
    for _ in 0..1_100 {
        slow.push(half_open_from("127.0.0.1", &server).await);
    }
    health_within(
        &server,
        Duration::from_secs(4),
        "with 1,100 half-open connections",
    )
    .await;
    // Every half-open connection is closed by the server.
    for s in slow.iter_mut() {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await;
        assert!(r.is_ok(), "a half-open connection was kept open");
    }
    let server_ref = &server;
    wait_until(
        "open connections back to 0",
        Duration::from_secs(3),
        async || server_ref.state.services.metrics.open_connections.get() == 0,
    )
    .await;
    drop(slow);

    // One address over its cap gets its extra connections closed at once.
    let mut c = config("Hi.");
    c.server.max_connections_per_ip = 4;
    let server = common::start_server(c).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let mut extra = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
        .await
        .expect("the extra connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    drop(held);
    assert_memory_bounded();
    server.shutdown().await;
}

/// Finding 8: no authentication on `/calls` or `/calls/{id}/history`, sequential ids, and no
/// Origin check on `/conversation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_every_entry_point_checks_who_is_calling() {
    // An open server still keeps the registry off and checks the browser's origin.
    let server = common::start_server(config("Hi.")).await;
    let (_, page_config) = common::http(&server, "GET", "/config", &[], "").await;
    assert!(page_config.contains("\"auth\":\"none\""), "{page_config}");
    let (status, body) = common::http(&server, "GET", "/calls", &[], "").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("GAZELLE_ADMIN_TOKEN"), "{body}");
    let own = format!("http://{}", server.addr);
    let err = connect(&server.ws_url(), &[("origin", "https://evil.example")])
        .await
        .expect_err("a foreign origin is refused");
    assert!(err.contains("403"), "{err}");
    let ws = connect(&server.ws_url(), &[("origin", &own)]).await;
    assert!(ws.is_ok(), "{:?}", ws.err());
    server.shutdown().await;

    // With an API key: a bearer key or a single-use call token; the registry behind the admin
    // token; random ids; Twilio closed unless Twilio signs.
    let server = common::start_server_with(config("Hi."), |s| {
        common::credentials(s, Some("the-key"), AuthConfig::default())
    })
    .await;
    let (_, page_config) = common::http(&server, "GET", "/config", &[], "").await;
    assert!(page_config.contains("\"auth\":\"token\""), "{page_config}");
    let err = connect(&server.ws_url(), &[])
        .await
        .expect_err("no credentials");
    assert!(err.contains("401"), "{err}");
    let err = connect(&server.ws_url(), &[("authorization", "Bearer wrong")])
        .await
        .expect_err("a wrong key");
    assert!(err.contains("401"), "{err}");
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.bearer = Some("the-key".into());
    let a = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    // The key itself is refused in the URL (second probe, finding 7).
    let err = connect(&format!("{}?token=the-key", server.ws_url()), &[])
        .await
        .expect_err("the key in the URL");
    assert!(err.contains("401"), "{err}");
    let (status, body) = common::http(
        &server,
        "POST",
        "/auth/token",
        &[("Authorization", "Bearer the-key")],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_string();
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.token = Some(token.clone());
    let b = VocodeClient::connect(&server.ws_url(), cc.clone())
        .await
        .unwrap();
    let reused = VocodeClient::connect(&server.ws_url(), cc).await;
    assert!(reused.err().unwrap().to_string().contains("401"));
    let (status, _) = common::http(&server, "POST", "/auth/token", &[], "").await;
    assert_eq!(status, 401);
    let (status, body) = common::http(&server, "GET", "/calls", &[], "").await;
    assert_eq!(status, 401);
    assert!(body.contains("admin token"), "{body}");
    let admin = format!("Bearer {}", common::ADMIN_TOKEN);
    let (status, body) =
        common::http(&server, "GET", "/calls", &[("Authorization", &admin)], "").await;
    assert_eq!(status, 200, "{body}");
    let ids: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = ids["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    for id in &ids {
        assert!(id.starts_with("call-") && id.len() == 37, "{id}");
    }
    let (status, _) = common::http(&server, "POST", "/twilio/voice", &[], "CallSid=CA1").await;
    assert_eq!(status, 403);
    drop((a, b));
    server.shutdown().await;

    // Twilio streams need the per-call token the webhook signed, once, for that call.
    let server = common::start_server(config("Hi.")).await;
    let params = twilio_parameters(&server, "CA0100").await;
    for (sid, p) in [
        ("CA0100", serde_json::json!({})),
        ("CA0999", params.clone()),
        (
            "CA0100",
            serde_json::json!({"gazelle_stream_token": "t1.1.2.3"}),
        ),
    ] {
        let mut ws = connect(&format!("ws://{}/twilio/stream", server.addr), &[])
            .await
            .unwrap();
        ws.send(Message::Text(twilio_start(sid, p).into()))
            .await
            .unwrap();
        let (_, close) = read_to_close(&mut ws, Duration::from_secs(3)).await;
        assert_eq!(close.map(|c| c.0), Some(1008), "{sid}");
    }
    let mut ws = connect(&format!("ws://{}/twilio/stream", server.addr), &[])
        .await
        .unwrap();
    ws.send(Message::Text(twilio_start("CA0100", params.clone()).into()))
        .await
        .unwrap();
    let (_, close) = read_to_close(&mut ws, Duration::from_millis(500)).await;
    assert_eq!(close, None, "the signed stream is accepted");
    let mut replay = connect(&format!("ws://{}/twilio/stream", server.addr), &[])
        .await
        .unwrap();
    replay
        .send(Message::Text(twilio_start("CA0100", params).into()))
        .await
        .unwrap();
    let (_, close) = read_to_close(&mut replay, Duration::from_secs(3)).await;
    assert_eq!(
        close.map(|c| c.0),
        Some(1008),
        "a replayed token is refused"
    );
    assert_memory_bounded();
    server.shutdown().await;
}

/// Medium: one client pushing audio at hundreds of times real time cost other calls their
/// replies; a chosen id could be taken over; the close code was 1005.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_audio_is_throttled_ids_are_not_shared_and_ends_have_codes() {
    let mut c = config("Yes, I am here.");
    c.limits.realtime_burst_ms = 500;
    let server = common::start_server(c).await;
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.conversation_id = Some("my-call".into());
    let mut fast = VocodeClient::connect(&server.ws_url(), cc.clone())
        .await
        .unwrap();
    let chunk = pcm::f32_to_s16le(&vec![0.0; 1_600]);
    let msg = audio_message(&chunk);
    let sending = tokio::spawn(async move {
        for _ in 0..40 {
            fast.send_text(&msg).await.unwrap(); // 4 s of audio at once
        }
        fast
    });
    let server_ref = &server;
    wait_until("throttling", Duration::from_secs(8), async || {
        common::metric(server_ref, "gazelle_input_throttled_seconds_total").await >= 2.5
    })
    .await;
    let taken = VocodeClient::connect(&server.ws_url(), cc).await;
    let err = taken.err().expect("a live id is refused").to_string();
    assert!(err.contains("my-call"), "{err}");
    still_answers(&server).await;
    let mut fast = sending.await.unwrap();
    fast.send_text(r#"{"type":"websocket_stop"}"#)
        .await
        .unwrap();
    let closed = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), fast.events.recv())
            .await
            .expect("the server closes")
            .unwrap();
        if let EventKind::Closed { code, .. } = e.kind {
            break code;
        }
    };
    assert_eq!(closed, Some(1000));
    assert_memory_bounded();
    server.shutdown().await;
}

/// Medium: a client that stopped reading kept its slot for ever (no send timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_at_the_send_timeout() {
    let mut c = config("unused");
    c.server.send_timeout_ms = 500;
    c.pipeline.output_lead_ms = 2_000;
    let server = common::start_server(c).await;
    // A tiny receive window, so the server's writes stall soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), stream)
        .await
        .unwrap();
    let greeting =
        "This greeting goes on and on so that there is a lot of audio to send. ".repeat(20);
    let start = serde_json::json!({
        "type": "websocket_audio_config_start",
        "input_audio_config": {"sampling_rate": 48_000, "audio_encoding": "linear16"},
        "output_audio_config": {"sampling_rate": 48_000, "audio_encoding": "linear16"},
        "first_message": greeting,
    });
    ws.send(Message::Text(start.to_string().into()))
        .await
        .unwrap();
    // Never read again.
    let server_ref = &server;
    wait_until("the call to start", Duration::from_secs(3), async || {
        server_ref.state.services.metrics.active_calls.get() == 1
    })
    .await;
    wait_until(
        "the stalled call to end",
        Duration::from_secs(20),
        async || server_ref.state.services.metrics.active_calls.get() == 0,
    )
    .await;
    assert!(common::metric(&server, "gazelle_errors_total{kind=\"send_timeout\"}").await >= 1.0);
    drop(ws);
    assert_memory_bounded();
    server.shutdown().await;
}

/// A websocket to `path` from the loopback address `source` (any of 127.0.0.0/8), as a client
/// at another address would connect.
async fn connect_from(source: &str, server: &common::TestServer, path: &str) -> Result<Ws, String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket
        .connect(server.addr)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("ws://{}{path}", server.addr)
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::client_async_tls(req, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(e) => Err(e.to_string()),
    }
}

/// Second probe, finding 1: one client held every seat of the waiting room (sockets upgraded,
/// no start message yet) and new callers, phone calls included, got 503 while `/health` said
/// ok. Now an address holds at most its share (429 past it), web sockets cannot take the phone
/// share, the start deadline shrinks as the room fills, and `/health` says `degraded` while
/// sockets are refused. Scaled down: 12 seats, 4 per address, 4 for phones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_one_address_cannot_fill_the_waiting_room() {
    let mut c = config("Hi.");
    c.server.max_pending_sockets = 12;
    c.server.max_pending_per_address = 4;
    c.server.pending_phone_share = 4;
    c.server.start_timeout_ms = 3_000;
    let server = common::start_server(c).await;
    // One attacker address holds idle sockets and keeps asking for more.
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..10 {
        match connect_from("127.0.0.2", &server, "/conversation").await {
            Ok(ws) => held.push(ws),
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(held.len(), 4, "one address's share; refused: {refused:?}");
    assert!(refused.iter().all(|e| e.contains("429")), "{refused:?}");
    let (code, health) = common::http(&server, "GET", "/health", &[], "").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["pending_sockets"], 4, "{health}");
    // A second address fills what web sockets may use (12 seats less 4 for phones); the seats
    // past half the room get shorter deadlines.
    for _ in 0..4 {
        held.push(
            connect_from("127.0.0.3", &server, "/conversation")
                .await
                .unwrap(),
        );
    }
    let e = connect_from("127.0.0.4", &server, "/conversation")
        .await
        .err()
        .expect("the web share is full");
    assert!(e.contains("503"), "{e}");
    // A phone call still gets its seat, starts, and frees it.
    let mut phone = twilio_dial(&server, "CA1000").await;
    let server_ref = &server;
    wait_until(
        "the phone call started",
        Duration::from_secs(5),
        async || server_ref.state.services.metrics.active_calls.get() == 1,
    )
    .await;
    // The first seat got the whole deadline, the last web seat (8 of 12) a third less.
    let (first, _) = read_to_close(&mut held[0], Duration::from_secs(5)).await;
    let (last, _) = read_to_close(&mut held[7], Duration::from_secs(5)).await;
    let said = |texts: &[serde_json::Value]| {
        texts
            .iter()
            .find(|v| v["kind"] == "start_timeout")
            .map(|v| v["message"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no start_timeout in {texts:?}"))
    };
    assert!(said(&first).ends_with("within 3 s"), "{}", said(&first));
    assert!(said(&last).ends_with("within 2 s"), "{}", said(&last));
    wait_until("the seats came back", Duration::from_secs(5), async || {
        server_ref.state.services.metrics.pending_sockets.get() == 0
    })
    .await;
    let _ = phone.close(None).await;
    drop(held);
    finish(server).await;
}

/// A TCP connection from `source` that sends the start of a request's headers and no more.
async fn half_open_from(source: &str, server: &common::TestServer) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    s
}

/// Asks `/health` and checks that it answers 200 within `bound`; returns its body.
async fn health_within(server: &common::TestServer, bound: Duration, while_what: &str) -> String {
    let t = Instant::now();
    let (status, body) = common::http(server, "GET", "/health", &[], "").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        t.elapsed() < bound,
        "/health took {:?} {while_what}",
        t.elapsed()
    );
    body
}

/// Whether the server closed `s` within `wait`.
async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408 or similar before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Second probe, finding 2: a slowloris from many addresses. The per-address cap let 9 addresses
/// fill `max_connections` with connections that never finish their headers, reopened as the
/// header deadline dropped them, and `/health` waited 8 s in the kernel's accept queue. Now a
/// full pool closes the connection that has waited longest for its headers to let a new one in,
/// and the header deadline shrinks as the pool fills. Scaled down: 32 connections, 8 per
/// address, 5 addresses; the header deadline stays at 10 s, so a `/health` that waited for it
/// would take 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_many_addresses_cannot_hold_every_connection() {
    let mut c = config("Hi.");
    c.server.max_connections = 32;
    c.server.max_connections_per_ip = 8;
    c.server.header_read_timeout_ms = 10_000;
    let server = common::start_server(c).await;
    let mut slow = Vec::new();
    for a in 2..=6 {
        for _ in 0..8 {
            slow.push(half_open_from(&format!("127.0.0.{a}"), &server).await);
        }
    }
    health_within(&server, Duration::from_secs(3), "with the pool held").await;
    let ws = connect(&server.ws_url(), &[]).await;
    assert!(ws.is_ok(), "a caller is let in: {:?}", ws.err());
    // The first connections opened were the ones closed to make room.
    for (k, s) in slow.iter_mut().enumerate().take(8) {
        assert!(
            closed_within(s, Duration::from_secs(2)).await,
            "connection {k}, the longest waiting, is still open"
        );
    }
    let evicted = common::metric(&server, "gazelle_errors_total{kind=\"connections_full\"}").await;
    assert!(evicted >= 8.0, "{evicted} connections closed to make room");
    drop((slow, ws));
    finish(server).await;

    // The header deadline shrinks as the pool fills: of 8 slots, the first connection gets the
    // whole 10 s and the eighth one second.
    let mut c = config("Hi.");
    c.server.max_connections = 8;
    c.server.max_connections_per_ip = 0;
    c.server.header_read_timeout_ms = 10_000;
    let server = common::start_server(c).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_open_from("127.0.0.1", &server).await);
    }
    assert!(
        closed_within(&mut held[7], Duration::from_secs(3)).await,
        "the connection that filled the pool kept its headers' deadline past 3 s"
    );
    assert!(
        !closed_within(&mut held[0], Duration::from_secs(1)).await,
        "the first connection was closed early"
    );
    drop(held);
    finish(server).await;
}

/// Second probe, finding 8: a `start` event that cannot be read was answered only at the start
/// deadline, as "no start event". Now the stream ends at once, saying what was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_malformed_twilio_start_ends_the_stream_at_once() {
    let server = common::start_server(config("Hi.")).await;
    let mut ws = connect(&format!("ws://{}/twilio/stream", server.addr), &[])
        .await
        .unwrap();
    ws.send(Message::Text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.into(),
    ))
    .await
    .unwrap();
    let sent = Instant::now();
    ws.send(Message::Text(
        r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1"}"#.into(),
    ))
    .await
    .unwrap();
    let (_, close) = read_to_close(&mut ws, Duration::from_secs(5)).await;
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008);
    assert!(reason.contains("malformed start"), "{reason}");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "closed after {:?}, not at once",
        sent.elapsed()
    );
    finish(server).await;
}

/// Second probe, finding 6: the origin check trusted the `Host` header, so a DNS-rebinding page
/// (its own name pointed at this open server, `Host` and `Origin` both that name) got a call.
/// Now a name must be listed; the server's own page at an address still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_a_dns_rebinding_page_gets_no_call() {
    let server = common::start_server(config("Hi.")).await;
    let port = server.addr.port();
    let evil = format!("evil.example:{port}");
    let err = connect(
        &server.ws_url(),
        &[("host", &evil), ("origin", &format!("http://{evil}"))],
    )
    .await
    .expect_err("a rebinding page");
    assert!(err.contains("403"), "{err}");
    let own = server.addr.to_string();
    let ws = connect(
        &server.ws_url(),
        &[("host", &own), ("origin", &format!("http://{own}"))],
    )
    .await
    .expect("our own page at its address");
    drop(ws);
    let metrics = server.state.services.metrics.render();
    assert!(
        metrics.contains("gazelle_errors_total{kind=\"origin\"} 1"),
        "{metrics}"
    );
    finish(server).await;
}
