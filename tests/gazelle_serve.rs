//! `gazelle serve` with the Gazelle model: the tiny random Llama-variant Gazelle from the
//! fixtures, the real VAD and the local voice, through two spoken turns over the websocket. The
//! model's text is nonsense (random weights), but every stage is real: audio tower, projector,
//! spliced prompt, KV-cache decode per call, sentence units, speech.

mod common;

use std::path::Path;

use gazelle::audio::Encoding;
use gazelle::config::{Config, SlmKind};
use gazelle::model::device::WeightDtype;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spoken_turns_through_gazelle() {
    let mut config = Config::default();
    config.slm.kind = SlmKind::Gazelle;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gazelle/llama");
    config.slm.gazelle.model = fixture.display().to_string();
    config.slm.gazelle.offline = true;
    config.slm.gazelle.dtype = WeightDtype::F32;
    config.slm.gazelle.max_new_tokens = 24;
    let server = common::start_server(config).await;
    // The server listens while the model loads; /health says so until it is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let health = loop {
        let (code, body) = common::http(&server, "GET", "/health", &[], "").await;
        if code == 200 {
            break body;
        }
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"status\":\"loading\""), "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "still loading: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(health.contains("\"slm\":\"gazelle\""), "{health}");

    let rate = 16_000;
    let mut cc = ClientConfig::new(rate, Encoding::Linear16);
    cc.system_prompt = Some("You are a helpful assistant.".into());
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut timelines = Vec::new();
    let mut transcripts = Vec::new();
    let mut audio_seconds = 0.0;
    for question in [
        "Hello, what is the weather like today?",
        "And what about tomorrow?",
    ] {
        let mut clip = common::silence(300, rate);
        clip.extend(common::speech(question, rate).await);
        clip.extend(common::silence(6_000, rate));
        client.stream_realtime(&clip, 20).await.unwrap();
        while let Ok(e) = client.events.try_recv() {
            match e.kind {
                EventKind::Timeline(t) => timelines.push(t),
                EventKind::Transcript { text: t, .. } => transcripts.push(t),
                EventKind::Audio { samples, rate } => {
                    audio_seconds += samples.len() as f64 / rate as f64
                }
                EventKind::Error { kind, message } => panic!("{kind}: {message}"),
                _ => {}
            }
        }
    }
    assert_eq!(timelines.len(), 2, "one timeline per turn: {timelines:?}");
    for t in &timelines {
        for stage in [
            "vad_end_ms",
            "first_token_ms",
            "first_unit_ms",
            "first_synth_byte_ms",
            "first_audio_sent_ms",
        ] {
            assert!(t[stage].as_f64().is_some(), "{stage} missing: {t}");
        }
    }
    assert!(!transcripts.is_empty() && transcripts.iter().all(|t| !t.trim().is_empty()));
    assert!(
        audio_seconds > 1.0,
        "only {audio_seconds:.2} s of reply audio"
    );
    eprintln!("gazelle said {transcripts:?}; timelines {timelines:?}");

    // The history holds both user turns and both replies, as spoken.
    client.request_history().await.unwrap();
    let history = loop {
        let e = client.events.recv().await.expect("connection open");
        if let EventKind::History(h) = e.kind {
            break h;
        }
    };
    let roles: Vec<&str> = history["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "bot", "user", "bot"], "{history}");
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// A model that cannot load: /health says why (503), a caller gets a `call_start` error naming
/// the reason, and nothing hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_is_reported() {
    let mut config = Config::default();
    config.slm.kind = SlmKind::Gazelle;
    let missing = std::env::temp_dir().join("gazelle-no-such-model-dir");
    config.slm.gazelle.model = missing.display().to_string();
    config.slm.gazelle.offline = true;
    let server = common::start_server(config).await;
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), server.load.failure())
        .await
        .expect("the load neither failed nor finished")
        .to_string();
    assert!(reason.contains("gazelle-no-such-model-dir"), "{reason}");
    let (code, body) = common::http(&server, "GET", "/health", &[], "").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"status\":\"error\""), "{body}");
    assert!(body.contains("gazelle-no-such-model-dir"), "{body}");

    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let err = match VocodeClient::connect(&server.ws_url(), cc).await {
        Ok(_) => panic!("a call started on a model that failed to load"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("failed to load"), "{err}");

    // A phone caller is told, and hung up on, rather than connected to a call that cannot start.
    let ct = ("Content-Type", "application/x-www-form-urlencoded");
    let (code, twiml) = common::http(&server, "POST", "/twilio/voice", &[ct], "CallSid=CA1").await;
    assert_eq!(code, 200, "{twiml}");
    assert!(
        twiml.contains("<Say>Sorry, the assistant is unavailable"),
        "{twiml}"
    );
    assert!(
        twiml.contains("<Hangup/>") && !twiml.contains("<Connect>"),
        "{twiml}"
    );
    server.shutdown().await;
}
