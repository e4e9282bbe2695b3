//! The network speech providers against loopback peers that speak their wire formats
//! (tests/tts_peers): audio arrives in order and intact, cancellation reaches the peer, every
//! failure maps to its error, the fallback takes over (also end to end through the real server),
//! and API keys never reach the logs.

mod common;
mod tts_peers;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gazelle::audio::Encoding;
use gazelle::metrics::Metrics;
use gazelle::tts::elevenlabs::{ElevenLabs, ElevenLabsConfig, ElevenLabsMode};
use gazelle::tts::fallback::Fallback;
use gazelle::tts::http::ProviderTimeouts;
use gazelle::tts::openai::{OpenAi, OpenAiConfig, OpenAiFormat};
use gazelle::tts::playht::{PlayHt, PlayHtConfig};
use gazelle::tts::xtts::{Xtts, XttsConfig};
use gazelle::tts::{OutputHint, SynthChunk, Synthesizer, TextUnit, TtsError, Voice};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tts_peers::{level, Behavior, Peer, KEY, UNIT_SAMPLES, USER};

const TEXTS: [&str; 3] = ["Hello there.", "This is the second unit.", "And a third!"];
const KEY_ENV: &str = "GAZELLE_TEST_TTS_KEY";
const USER_ENV: &str = "GAZELLE_TEST_TTS_USER";

/// Everything logged by this test binary, at debug level for gazelle.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber and the keys, once per binary.
fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var(KEY_ENV, KEY);
        std::env::set_var(USER_ENV, USER);
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn,gazelle=debug"))
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .init();
    });
}

/// One registry for the providers these tests build, to check what they report.
fn shared_metrics() -> Arc<Metrics> {
    static M: OnceLock<Arc<Metrics>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Metrics::new())).clone()
}

/// A loopback peer answers in milliseconds; these leave room for a busy machine, and the
/// hanging peers still time out within the test's patience.
fn timeouts() -> ProviderTimeouts {
    ProviderTimeouts {
        connect_ms: 2_000,
        first_byte_ms: 1_500,
        stall_ms: 1_500,
    }
}

fn hint(sample_rate: u32, encoding: Encoding) -> OutputHint {
    OutputHint {
        sample_rate,
        encoding,
    }
}

fn eleven(peer: &Peer, mode: ElevenLabsMode) -> ElevenLabs {
    let c = ElevenLabsConfig {
        base_url: peer.url(),
        voice_id: "voice1".into(),
        mode,
        api_key_env: KEY_ENV.into(),
        timeouts: timeouts(),
        ..Default::default()
    };
    ElevenLabs::new(&c, shared_metrics()).unwrap()
}

fn openai(peer: &Peer, format: OpenAiFormat) -> OpenAi {
    let c = OpenAiConfig {
        base_url: peer.url(),
        format,
        api_key_env: KEY_ENV.into(),
        timeouts: timeouts(),
        ..Default::default()
    };
    OpenAi::new(&c, shared_metrics()).unwrap()
}

fn playht(peer: &Peer) -> PlayHt {
    let c = PlayHtConfig {
        base_url: peer.url(),
        api_key_env: KEY_ENV.into(),
        user_id_env: USER_ENV.into(),
        timeouts: timeouts(),
        ..Default::default()
    };
    PlayHt::new(&c, shared_metrics()).unwrap()
}

fn xtts(peer: &Peer, studio: bool) -> Xtts {
    let mut c = XttsConfig {
        base_url: peer.url(),
        timeouts: timeouts(),
        ..Default::default()
    };
    if studio {
        c.studio_speaker = Some("Ana Florence".into());
    } else {
        let path = std::env::temp_dir().join(format!("gazelle-speaker-{}.wav", std::process::id()));
        std::fs::write(
            &path,
            gazelle::audio::wav::write(&[0.1; 800], 16_000, Encoding::Linear16),
        )
        .unwrap();
        c.speaker_wav = Some(path);
    }
    Xtts::new(&c, shared_metrics()).unwrap()
}

/// The provider named `which`, against `peer`.
fn provider(which: &str, peer: &Peer) -> Box<dyn Synthesizer> {
    match which {
        "elevenlabs-multi" => Box::new(eleven(peer, ElevenLabsMode::Multi)),
        "elevenlabs-single" => Box::new(eleven(peer, ElevenLabsMode::Single)),
        "elevenlabs-http" => Box::new(eleven(peer, ElevenLabsMode::Http)),
        "openai" => Box::new(openai(peer, OpenAiFormat::Pcm)),
        "openai-wav" => Box::new(openai(peer, OpenAiFormat::Wav)),
        "playht" => Box::new(playht(peer)),
        "xtts" => Box::new(xtts(peer, false)),
        "xtts-studio" => Box::new(xtts(peer, true)),
        other => panic!("no provider {other}"),
    }
}

const ALL: [&str; 8] = [
    "elevenlabs-multi",
    "elevenlabs-single",
    "elevenlabs-http",
    "openai",
    "openai-wav",
    "playht",
    "xtts",
    "xtts-studio",
];

fn units(texts: &[&str]) -> mpsc::Receiver<TextUnit> {
    let (tx, rx) = mpsc::channel(16);
    for (index, t) in texts.iter().enumerate() {
        tx.try_send(TextUnit {
            index,
            text: t.to_string(),
        })
        .unwrap();
    }
    rx
}

/// Speaks `texts` as one reply: every chunk, or the first error.
async fn speak(voice: &mut Box<dyn Voice>, texts: &[&str]) -> Result<Vec<SynthChunk>, TtsError> {
    let mut audio = voice.synthesize(units(texts), CancellationToken::new());
    let mut chunks = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), audio.recv()).await {
            Err(_) => panic!("no end of the reply within 10 s"),
            Ok(None) => return Ok(chunks),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(c))) => chunks.push(c),
        }
    }
}

/// Each unit's audio arrived in order, whole, ended by `unit_done`, and carries its own tone.
fn check_units(chunks: &[SynthChunk], texts: &[&str], rate: u32, tolerance: f32) {
    let mut next = 0;
    let mut samples = Vec::new();
    for c in chunks {
        assert_eq!(c.unit, next, "chunks out of order");
        if !c.samples.is_empty() {
            assert_eq!(c.sample_rate, rate);
        }
        samples.extend_from_slice(&c.samples);
        if c.unit_done {
            assert_eq!(
                samples.len(),
                UNIT_SAMPLES,
                "unit {next} has the wrong length: {:?}",
                chunks
                    .iter()
                    .map(|c| (c.unit, c.samples.len(), c.unit_done))
                    .collect::<Vec<_>>()
            );
            let want = level(texts[next]) as f32 / 32768.0;
            for s in &samples {
                assert!(
                    (s - want).abs() <= tolerance.max(1e-6),
                    "unit {next}: {s} != {want}"
                );
            }
            samples.clear();
            next += 1;
        }
    }
    assert_eq!(next, texts.len(), "not every unit finished");
}

#[tokio::test]
async fn every_provider_streams_units_in_order() {
    init();
    for which in ALL {
        let peer = tts_peers::start(vec![Behavior::Ok]).await;
        let synth = provider(which, &peer);
        let mut voice = synth.open(hint(16_000, Encoding::Linear16));
        for reply in 0..2 {
            let chunks = speak(&mut voice, &TEXTS)
                .await
                .unwrap_or_else(|e| panic!("{which}: {e}"));
            let rate = match which {
                w if w.starts_with("elevenlabs") || w == "playht" => 16_000,
                _ => 24_000,
            };
            check_units(&chunks, &TEXTS, rate, 0.0);
            eprintln!("{which} reply {reply}: {} chunks", chunks.len());
        }
        let ev = peer.log.events();
        let count = |needle: &str| ev.iter().filter(|e| e.contains(needle)).count();
        match which {
            // One warm connection for the whole call; a context per reply.
            "elevenlabs-multi" => {
                assert_eq!(
                    count("eleven_ws connect multi=true format=pcm_16000"),
                    1,
                    "{ev:?}"
                );
                assert_eq!(count("text ctx=reply-1 flush=true"), 3, "{ev:?}");
                assert_eq!(count("text ctx=reply-2 flush=true"), 3, "{ev:?}");
            }
            // A socket per reply, plus the next one opened ahead.
            "elevenlabs-single" => assert!(count("multi=false") >= 2, "{ev:?}"),
            "elevenlabs-http" => assert_eq!(count("format=pcm_16000"), 6, "{ev:?}"),
            "playht" => assert_eq!(count("playht rate=16000 format=\"raw\""), 6, "{ev:?}"),
            "openai" => assert_eq!(count("format=pcm"), 6, "{ev:?}"),
            "openai-wav" => assert_eq!(count("format=wav"), 6, "{ev:?}"),
            // The speaker is fetched once and sent with every unit.
            "xtts" => {
                assert_eq!(count("clone_speaker file=true"), 1, "{ev:?}");
                assert_eq!(count("speaker_ok=true"), 6, "{ev:?}");
            }
            "xtts-studio" => {
                assert_eq!(count("studio_speakers"), 1, "{ev:?}");
                assert_eq!(count("speaker_ok=true"), 6, "{ev:?}");
            }
            _ => unreachable!(),
        }
    }
    let m = shared_metrics().render();
    for p in ["elevenlabs", "openai", "playht", "xtts"] {
        let needle = format!("gazelle_tts_ttfb_seconds_count{{provider=\"{p}\"}}");
        assert!(m.contains(&needle), "no TTFB for {p}");
    }
}

#[tokio::test]
async fn elevenlabs_asks_for_ulaw_for_phone_callers() {
    init();
    for mode in [ElevenLabsMode::Multi, ElevenLabsMode::Http] {
        let peer = tts_peers::start(vec![Behavior::Ok]).await;
        let mut voice = eleven(&peer, mode).open(hint(8_000, Encoding::Mulaw));
        let chunks = speak(&mut voice, &TEXTS).await.unwrap();
        // µ-law is lossy: the tone comes back within its quantisation step.
        check_units(&chunks, &TEXTS, 8_000, 0.03);
        assert!(peer
            .log
            .events()
            .iter()
            .any(|e| e.contains("format=ulaw_8000")));
    }
}

#[tokio::test]
async fn cancellation_reaches_the_peer() {
    init();
    for which in ALL {
        let peer = tts_peers::start(vec![Behavior::Slow]).await;
        let synth = provider(which, &peer);
        let mut voice = synth.open(hint(16_000, Encoding::Linear16));
        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel(4);
        tx.send(TextUnit {
            index: 0,
            text: TEXTS[0].into(),
        })
        .await
        .unwrap();
        let mut audio = voice.synthesize(rx, cancel.clone());
        let first = tokio::time::timeout(Duration::from_secs(5), audio.recv()).await;
        assert!(
            matches!(first, Ok(Some(Ok(_)))),
            "{which}: no audio before cancelling"
        );
        let cancelled_at = Instant::now();
        cancel.cancel();
        let needle = match which {
            "elevenlabs-multi" => "close_context reply-1",
            "elevenlabs-single" => "ws closed by client",
            _ => "dropped",
        };
        let seen = peer.log.wait_for(needle, Duration::from_secs(2)).await;
        let seen = seen.unwrap_or_else(|| {
            panic!(
                "{which}: the peer never saw {needle:?}: {:?}",
                peer.log.events()
            )
        });
        let ms = seen.saturating_duration_since(cancelled_at).as_secs_f64() * 1e3;
        eprintln!("{which}: the peer saw the cancel after {ms:.1} ms");
        // A few milliseconds on an idle machine; the bound leaves room for a busy one.
        assert!(
            ms < 1_000.0,
            "{which}: cancel took {ms:.1} ms to reach the peer"
        );
        drop(tx);
        if which == "elevenlabs-multi" {
            // The same connection speaks the next reply.
            let chunks = speak(&mut voice, &TEXTS[1..]).await.unwrap();
            check_units(&chunks, &TEXTS[1..], 16_000, 0.0);
            let connects = peer
                .log
                .events()
                .iter()
                .filter(|e| e.contains("eleven_ws connect"))
                .count();
            assert_eq!(connects, 1);
        }
    }
}

fn expect_kind(which: &str, b: Behavior, e: &TtsError) {
    let ok = match b {
        Behavior::Status(401) => matches!(e, TtsError::Auth { status: 401, .. }),
        Behavior::Status(403) => matches!(e, TtsError::Auth { status: 403, .. }),
        Behavior::Status(429) => matches!(e, TtsError::RateLimited { .. }),
        Behavior::Status(500) => matches!(e, TtsError::Server { .. }),
        Behavior::Hang => matches!(e, TtsError::Timeout { .. }),
        Behavior::Truncate => matches!(e, TtsError::Truncated { .. }),
        _ => false,
    };
    assert!(ok, "{which} {b:?}: got {e:?}");
    let text = e.to_string();
    assert!(
        !text.contains(KEY) && !text.contains(USER),
        "secret in error: {text}"
    );
}

#[tokio::test]
async fn failures_map_to_clear_errors() {
    init();
    let http_cases = [
        Behavior::Status(401),
        Behavior::Status(403),
        Behavior::Status(429),
        Behavior::Status(500),
        Behavior::Hang,
        Behavior::Truncate,
    ];
    for which in ["elevenlabs-http", "openai", "playht", "xtts"] {
        for b in http_cases {
            let peer = tts_peers::start(vec![b]).await;
            let mut voice = provider(which, &peer).open(hint(16_000, Encoding::Linear16));
            let started = Instant::now();
            let e = speak(&mut voice, &TEXTS).await.expect_err("an error");
            expect_kind(which, b, &e);
            eprintln!("{which} {b:?}: {e} ({:?})", started.elapsed());
        }
    }
    // Websockets: a refused handshake, a server error message, a hang, a socket cut mid-unit.
    for (b, is) in [
        (Behavior::Status(401), Behavior::Status(401)),
        (Behavior::Status(403), Behavior::Status(403)),
        (Behavior::Status(429), Behavior::Status(429)),
        (Behavior::Status(500), Behavior::Status(500)),
        (Behavior::Hang, Behavior::Hang),
        (Behavior::Truncate, Behavior::Truncate),
    ] {
        for mode in [ElevenLabsMode::Multi, ElevenLabsMode::Single] {
            let peer = tts_peers::start(vec![b]).await;
            let mut voice = eleven(&peer, mode).open(hint(16_000, Encoding::Linear16));
            let e = speak(&mut voice, &TEXTS).await.expect_err("an error");
            expect_kind("elevenlabs-ws", is, &e);
            eprintln!("elevenlabs {mode:?} {b:?}: {e}");
        }
    }
    // An in-band quota message on an open socket.
    let peer = tts_peers::start(vec![Behavior::Ok, Behavior::Status(429)]).await;
    let mut voice = eleven(&peer, ElevenLabsMode::Multi).open(hint(16_000, Encoding::Linear16));
    let e = speak(&mut voice, &TEXTS).await.expect_err("an error");
    assert!(matches!(e, TtsError::RateLimited { .. }), "{e:?}");
}

#[tokio::test]
async fn elevenlabs_speaks_over_http_when_the_websocket_cannot_connect() {
    init();
    let peer = tts_peers::start(vec![Behavior::NoUpgrade, Behavior::Ok]).await;
    let mut voice = eleven(&peer, ElevenLabsMode::Multi).open(hint(16_000, Encoding::Linear16));
    let chunks = speak(&mut voice, &TEXTS).await.unwrap();
    check_units(&chunks, &TEXTS, 16_000, 0.0);
    let ev = peer.log.events();
    assert_eq!(
        ev.iter().filter(|e| e.contains("eleven_http")).count(),
        3,
        "{ev:?}"
    );
}

#[tokio::test]
async fn fallback_takes_over_mid_reply_and_the_next_reply_tries_the_primary() {
    init();
    // Reply 1: unit 0 fine, unit 1 fails. Reply 2: all fine.
    let primary_peer =
        tts_peers::start(vec![Behavior::Ok, Behavior::Status(500), Behavior::Ok]).await;
    let backup_peer = tts_peers::start(vec![Behavior::Ok]).await;
    let metrics = Arc::new(Metrics::new());
    let primary: Arc<dyn Synthesizer> = Arc::new(openai(&primary_peer, OpenAiFormat::Pcm));
    let backup: Arc<dyn Synthesizer> = Arc::new(playht(&backup_peer));
    let both = Fallback::new(primary, backup, metrics.clone());
    let mut voice = both.open(hint(24_000, Encoding::Linear16));
    let chunks = speak(&mut voice, &TEXTS).await.unwrap();
    check_units(&chunks, &TEXTS, 24_000, 0.0);
    let backup_saw: Vec<String> = backup_peer.log.events();
    assert_eq!(backup_saw.len(), 2, "{backup_saw:?}");
    assert!(backup_saw[0].ends_with(TEXTS[1]) && backup_saw[1].ends_with(TEXTS[2]));
    let chunks = speak(&mut voice, &TEXTS).await.unwrap();
    check_units(&chunks, &TEXTS, 24_000, 0.0);
    assert_eq!(
        backup_peer.log.events().len(),
        2,
        "reply 2 stayed on the primary"
    );
    assert!(metrics
        .render()
        .contains("gazelle_tts_failures_total{provider=\"openai\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_survives_a_failing_primary_through_the_espeak_fallback() {
    init();
    use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};
    let peer = tts_peers::start(vec![Behavior::Status(401)]).await;
    let mut config = gazelle::config::Config::default();
    // Not a turn-taking test: a fixed silence ends the turn, whatever the machine.
    config.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    config.slm.reply = "Sure. I can help with that today.".into();
    config.tts.provider = gazelle::config::TtsProvider::Elevenlabs;
    config.tts.fallback = Some(gazelle::config::TtsProvider::Espeak);
    config.tts.elevenlabs.base_url = peer.url();
    config.tts.elevenlabs.api_key_env = KEY_ENV.into();
    config.validate().unwrap();
    let server = common::start_server(config).await;
    let rate = 16_000;
    let mut client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(rate, Encoding::Linear16),
    )
    .await
    .unwrap();
    let mut clip = common::silence(300, rate);
    clip.extend(common::speech("Hello, can you help me?", rate).await);
    clip.extend(common::silence(4_000, rate));
    client.stream_realtime(&clip, 20).await.unwrap();
    let mut audio = 0usize;
    let mut errors = Vec::new();
    while let Ok(e) = client.events.try_recv() {
        match e.kind {
            EventKind::Audio { samples, .. } => audio += samples.len(),
            EventKind::Error { .. } => errors.push(format!("{:?}", e.kind)),
            _ => {}
        }
    }
    let secs = audio as f64 / rate as f64;
    assert!(secs > 1.0, "only {secs:.2} s of reply audio");
    assert!(errors.is_empty(), "{errors:?}");
    let metrics = server.state.services.metrics.render();
    assert!(
        metrics.contains("gazelle_tts_failures_total{provider=\"elevenlabs\"}"),
        "{metrics}"
    );
    assert!(peer
        .log
        .events()
        .iter()
        .any(|e| e.contains("eleven_ws connect")));
    client.stop().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn api_keys_never_reach_the_logs() {
    init();
    // Failures and successes of every provider, logged at debug level.
    for which in ALL {
        for b in [Behavior::Status(401), Behavior::Status(500), Behavior::Ok] {
            let peer = tts_peers::start(vec![b]).await;
            let synth = provider(which, &peer);
            tracing::info!(?b, "provider {which} config: {:?}", synth.name());
            let mut voice = synth.open(hint(16_000, Encoding::Linear16));
            let _ = speak(&mut voice, &TEXTS[..1]).await;
        }
    }
    let key = gazelle::net::ApiKey::from_env(KEY_ENV).unwrap();
    tracing::warn!(?key, "a key's Debug form");
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        logs.contains("first audio byte"),
        "the capture works: {logs}"
    );
    assert!(logs.contains("speech failed"), "errors were logged: {logs}");
    assert!(!logs.contains(KEY), "the API key leaked into the logs");
    assert!(
        !logs.contains(USER),
        "the PlayHT user id leaked into the logs"
    );
}
