//! `gazelle serve` with the Gazelle model: the tiny random Llama-variant Gazelle from the
//! fixtures, the real VAD and the local voice, through two spoken turns over the websocket. The
//! model's text is nonsense (random weights), but every stage is real: audio tower, projector,
//! spliced prompt, KV-cache decode per call, sentence units, speech.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use gazelle::audio::Encoding;
use gazelle::config::{Config, SlmKind};
use gazelle::model::device::WeightDtype;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};

/// Tests that load the model with calls run one at a time: the 16-call test saturates both cores,
/// and the others' replies would then miss their listening windows.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server listens while the model loads; /health says so until it is ready. Returns the
/// ready /health body.
async fn wait_until_loaded(server: &common::TestServer) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = common::http(server, "GET", "/health", &[], "").await;
        if code == 200 {
            return body;
        }
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"status\":\"loading\""), "{body}");
        assert!(Instant::now() < deadline, "still loading: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `gazelle serve` on the tiny Llama-variant fixture, in f32.
fn tiny_gazelle_config(max_new_tokens: usize) -> Config {
    let mut config = Config::default();
    config.slm.kind = SlmKind::Gazelle;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gazelle/llama");
    config.slm.gazelle.model = fixture.display().to_string();
    config.slm.gazelle.offline = true;
    config.slm.gazelle.dtype = WeightDtype::F32;
    config.slm.gazelle.max_new_tokens = max_new_tokens;
    // Not a turn-taking test: a fixed silence ends each turn, so how many turns (and requests)
    // there are does not hang on the end-of-turn model's score of espeak-ng speech.
    config.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spoken_turns_through_gazelle() {
    let _serial = HEAVY.lock().await;
    let config = tiny_gazelle_config(24);
    let server = common::start_server(config).await;
    let health = wait_until_loaded(&server).await;
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
        "What is the weather like today?",
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

    // The history holds both user turns and both replies, as spoken (once the second reply has
    // played out: a reply joins the history when it ends).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        client.request_history().await.unwrap();
        let history = loop {
            let e = client.events.recv().await.expect("connection open");
            if let EventKind::History(h) = e.kind {
                break h;
            }
        };
        let roles: Vec<String> = history["turns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["role"].as_str().unwrap().to_string())
            .collect();
        if roles.len() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert_eq!(roles, ["user", "bot", "user", "bot"], "{history}");
        break;
    }
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

/// What one call heard back: each reply's text, each turn's first-token time (ms after the VAD
/// ended the turn, so the fixed end-of-turn silence is not counted), and, when asked, the
/// model's compute for each turn (seconds of engine steps, read from /metrics: valid only for a
/// call alone).
#[derive(Debug)]
struct Heard {
    replies: Vec<String>,
    first_token_ms: Vec<f64>,
    turn_steps_s: Vec<f64>,
}

const STEPS: &str = "gazelle_engine_step_seconds_sum";

/// One call: each clip streamed at real time, then silence until the reply has played out, so
/// that no turn barges in on the last reply and every call keeps the same history.
async fn call(server: &common::TestServer, clips: &[Vec<f32>], measure: bool) -> Heard {
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.system_prompt = Some("You are a helpful assistant.".into());
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut heard = Heard {
        replies: Vec::new(),
        first_token_ms: Vec::new(),
        turn_steps_s: Vec::new(),
    };
    let mut replies: BTreeMap<u64, String> = BTreeMap::new();
    // Whole VAD frames (512 samples), so that however many pauses a call needs, its next turn
    // meets the detector at the same frame phase and is cut the same way.
    let pause = vec![0.0; 512 * 8];
    for clip in clips {
        let before = if measure {
            metric(server, STEPS).await
        } else {
            0.0
        };
        let turn = heard.first_token_ms.len();
        client.stream_realtime(clip, 20).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last_audio = Instant::now();
        loop {
            while let Ok(e) = client.events.try_recv() {
                match e.kind {
                    EventKind::Timeline(t) => heard.first_token_ms.push(
                        t["first_token_ms"].as_f64().unwrap() - t["vad_end_ms"].as_f64().unwrap(),
                    ),
                    EventKind::Transcript { reply, text } => {
                        replies.entry(reply).or_default().push_str(&text)
                    }
                    EventKind::Audio { .. } => last_audio = e.at,
                    EventKind::Clear { .. } => panic!("a turn barged in on a reply"),
                    EventKind::Error { kind, message } => panic!("{kind}: {message}"),
                    _ => {}
                }
            }
            let replied = heard.first_token_ms.len() > turn;
            if replied && last_audio.elapsed() > Duration::from_millis(1_500) {
                break;
            }
            assert!(Instant::now() < deadline, "no reply to turn {turn}");
            client.stream_realtime(&pause, 20).await.unwrap();
        }
        if measure {
            heard
                .turn_steps_s
                .push(metric(server, STEPS).await - before);
        }
    }
    client.stop().await.unwrap();
    heard.replies = replies.into_values().collect();
    heard
}

/// A counter or histogram sum from /metrics, which must be there.
async fn metric(server: &common::TestServer, name: &str) -> f64 {
    let (_, body) = common::http(server, "GET", "/metrics", &[], "").await;
    assert!(body.contains(name), "{name} not in /metrics");
    common::metric(server, name).await
}

/// Sixteen calls at once, two spoken turns each, through one engine: every reply is the reply
/// the same turns get on a call alone, and the last call's first token comes far sooner than
/// a one-reply-at-a-time model could give it (after the other fifteen whole turns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_calls_share_one_engine() {
    let _serial = HEAVY.lock().await;
    let server = common::start_server(tiny_gazelle_config(64)).await;
    wait_until_loaded(&server).await;
    // Two turns whose greedy replies on this fixture run long (dozens of tokens), so that a
    // serial model's wait is long enough to measure against.
    let mut clips = Vec::new();
    for question in ["And tomorrow?", "What is the weather like today?"] {
        let mut clip = common::silence(300, 16_000);
        clip.extend(common::speech(question, 16_000).await);
        clip.extend(common::silence(1_000, 16_000));
        clips.push(clip);
    }

    // One call alone: the expected replies, and the model's compute for each turn.
    let alone = call(&server, &clips, true).await;
    assert_eq!(alone.replies.len(), 2, "{alone:?}");
    assert!(alone.replies.iter().all(|r| r.len() > 40), "{alone:?}");

    let started = metric(&server, STEPS).await;
    let heard = futures::future::join_all((0..16).map(|_| call(&server, &clips, false))).await;
    let busy = metric(&server, STEPS).await - started;
    for h in &heard {
        assert_eq!(
            h.replies, alone.replies,
            "a reply differs from the call alone"
        );
        assert_eq!(h.first_token_ms.len(), 2);
    }
    for (turn, per_turn) in alone.turn_steps_s.iter().enumerate() {
        // A model that runs one turn at a time gives the last of 16 simultaneous turns its
        // first token after the other 15 whole turns.
        let serial_ms = 15.0 * per_turn * 1e3;
        let last = heard
            .iter()
            .map(|h| h.first_token_ms[turn])
            .fold(0.0, f64::max);
        eprintln!(
            "turn {turn}: the last call's first token came {last:.0} ms after its turn ended; \
             one turn at a time it would come after {serial_ms:.0} ms (a turn alone: {:.0} ms \
             of model steps; all 16 calls: {:.0} ms of steps in all)",
            per_turn * 1e3,
            busy * 1e3
        );
        assert!(
            last < 0.4 * serial_ms,
            "turn {turn}: the last call's first token took {last:.0} ms, not far below the \
             {serial_ms:.0} ms a serial model would take"
        );
    }
    let rows = metric(&server, "gazelle_engine_batch_size_sum").await;
    let steps = metric(&server, "gazelle_engine_batch_size_count").await;
    assert!(
        rows / steps > 2.0,
        "decode steps averaged {:.2} sequences",
        rows / steps
    );
    server.shutdown().await;
}

/// `scripts/serve --dry-run` under a stub `nvidia-smi` (and `nvcc`) on PATH: with a GPU it builds
/// with CUDA and serves Gazelle v0.2 on it; without one it says why, in one line, and serves the
/// scripted model.
#[test]
fn scripts_serve_takes_the_gpu_path_only_with_a_gpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stub = |dir: &Path, name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let serve = |dir: &Path, args: &[&str]| {
        let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/serve"))
            .arg("--dry-run")
            .args(args)
            .env("PATH", path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let gpu = tempfile::tempdir().unwrap();
    stub(
        gpu.path(),
        "nvidia-smi",
        r#"case "$1" in -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-0)";; *) echo "9.0";; esac"#,
    );
    stub(gpu.path(), "nvcc", "echo nvcc");
    let (run, said) = serve(gpu.path(), &[]);
    assert!(said.contains("NVIDIA H200 found"), "{said}");
    assert!(
        run.contains("+ env CUDA_COMPUTE_CAP=90 cargo build --quiet --release --features cuda"),
        "{run}"
    );
    assert!(
        run.contains(
            "+ exec target/release/gazelle serve --model tincans-ai/gazelle-v0.2 --device cuda \
             --dtype bf16"
        ),
        "{run}"
    );
    assert!(!run.contains("cargo run"), "{run}");
    // Without nvcc it builds with the PyPI toolchain; arguments pass through unchanged.
    std::fs::remove_file(gpu.path().join("nvcc")).unwrap();
    let (run, _) = serve(gpu.path(), &["--port", "4000"]);
    assert!(
        run.contains("+ env SKIP_TESTS=1 scripts/build-cuda"),
        "{run}"
    );
    assert!(
        run.contains("+ exec target/release/gazelle serve --port 4000"),
        "{run}"
    );

    let none = tempfile::tempdir().unwrap();
    stub(
        none.path(),
        "nvidia-smi",
        "echo 'NVIDIA-SMI has failed' >&2; exit 9",
    );
    let (run, said) = serve(none.path(), &[]);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains("no NVIDIA GPU found") && said.contains("scripted model"),
        "{said}"
    );
    assert!(
        said.contains("scripts/serve --model tincans-ai/gazelle-v0.2"),
        "{said}"
    );
    assert!(
        run.contains("+ exec cargo run --quiet --release -- serve"),
        "{run}"
    );
    assert!(!run.contains("cuda"), "{run}");
}
