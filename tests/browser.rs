//! The web page in a real browser: the server runs in-process on a loopback port with the scripted
//! model and the local voice, and `frontend/tests/browser.mjs` drives headless Debian Chromium
//! (playwright-core) with an espeak-ng WAV as the fake microphone. Also checks that the committed
//! build in `frontend/dist/` matches its source. A missing Chromium or missing node modules fail
//! with the reason; nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use gazelle::audio::{wav, Encoding};
use gazelle::config::Config;

const REPLY: &str = "Sure, I can help with that. The weather today is sunny and warm. \
                     Tomorrow brings some rain in the afternoon, so take an umbrella.";
const CHROMIUM: &str = "/usr/bin/chromium";

fn frontend_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("frontend")
}

/// Node and the frontend's node modules, or a failure that says how to get them.
fn require_tools() {
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "node is not installed: the browser tests need Node 20 (apt-get install nodejs)"
    );
    let modules = frontend_dir().join("node_modules/playwright-core");
    assert!(
        modules.exists(),
        "frontend/node_modules is missing: run `npm ci` in frontend/ (scripts/test does it)"
    );
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser test needs Debian's chromium \
         (apt-get install --no-install-recommends chromium; scripts/test does it)"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn committed_build_matches_the_source() {
    require_tools();
    let out = scratch("frontend-build");
    let status = Command::new("node")
        .arg(frontend_dir().join("build.mjs"))
        .arg(&out)
        .status()
        .expect("run node build.mjs");
    assert!(status.success(), "frontend/build.mjs failed");
    for name in ["index.html", "app.js", "worklet.js", "style.css"] {
        let fresh = std::fs::read(out.join(name)).unwrap();
        let committed = std::fs::read(frontend_dir().join("dist").join(name)).unwrap();
        assert!(
            fresh == committed,
            "frontend/dist/{name} is stale: run `npm run build` in frontend/ and commit dist/"
        );
    }
}

/// The fake microphone: a question, ~2 s of silence while the reply starts playing, a second
/// utterance over the reply (barge-in), then a long silence so the second reply plays out before
/// Chromium loops the file.
async fn microphone_wav(path: &Path) -> f64 {
    const RATE: u32 = 16_000;
    let mut x = common::silence(1_000, RATE);
    x.extend(common::speech("Hi there, what is the weather like today?", RATE).await);
    x.extend(common::silence(2_000, RATE));
    x.extend(common::speech("Wait, stop, tell me about tomorrow.", RATE).await);
    x.extend(common::silence(16_000, RATE));
    std::fs::write(path, wav::write(&x, RATE, Encoding::Linear16)).unwrap();
    x.len() as f64 / RATE as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_talks_to_the_bot_in_chromium() {
    require_tools();
    let mut config = Config::default();
    config.slm.reply = REPLY.into();
    config.slm.token_delay_ms = 5;
    // Not a turn-taking test: a fixed silence ends each turn, whatever the machine.
    config.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    // The vocode SDK page is served by node on another port, so another origin; our own page is
    // same-origin and would pass without this.
    config.auth.allowed_origins = vec!["*".into()];
    let server = common::start_server(config).await;
    let out = scratch("browser");
    let wav_path = out.join("microphone.wav");
    let secs = microphone_wav(&wav_path).await;
    assert!(
        secs < 30.0,
        "the fake microphone file should stay short ({secs:.1} s)"
    );

    let url = server.http("/");
    let script = frontend_dir().join("tests/browser.mjs");
    let (wav_arg, out_arg) = (wav_path.clone(), out.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args(["--url", &url, "--reply", REPLY])
            .arg("--wav")
            .arg(wav_arg)
            .arg("--out")
            .arg(out_arg)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stderr}\n{stdout}"
    );
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUMMARY "))
        .expect("a SUMMARY line");
    let s: serde_json::Value = serde_json::from_str(summary).unwrap();
    let page = &s["page"];
    // The page says what it talks to, and what the scripted model is.
    assert_eq!(page["slm"], "scripted", "{page}");
    let about = page["about"].as_str().unwrap_or_default();
    assert!(
        about.starts_with("Model: scripted · voice: ") && about.contains("fixed reply"),
        "{about}"
    );
    assert!(page["scheduled"].as_u64().unwrap() > 0);
    assert!(page["clears"][0]["stopped"].as_u64().unwrap() > 0);
    for t in page["timelines"].as_array().unwrap() {
        let played = t["first_audio_played_ms"]
            .as_f64()
            .expect("first audio played");
        let sent = t["first_audio_sent_ms"].as_f64().unwrap();
        assert!(played >= sent, "heard before it was sent? {t}");
        // Loopback: the page should start playing within a fraction of a second of receiving
        // (tens of milliseconds on an idle machine); the bound leaves room for a busy one.
        assert!(
            played - sent < 1_500.0,
            "slow start of playback in the page: {t}"
        );
        eprintln!(
            "turn {}: user {:.0} ms, vad end {:.0}, first token {:.0}, first synth byte {:.0}, \
             first audio sent {sent:.0}, first audio played {played:.0} ms",
            t["reply"],
            t["user_audio_ms"].as_f64().unwrap(),
            t["vad_end_ms"].as_f64().unwrap(),
            t["first_token_ms"].as_f64().unwrap(),
            t["first_synth_byte_ms"].as_f64().unwrap(),
        );
    }
    assert!(
        s["sdk"]["wire"]["audio"].as_u64().unwrap() > 0,
        "the vocode SDK got no audio"
    );
    // The access-key flow: a fresh call token for each of two calls.
    assert_eq!(s["auth"]["token_requests"], 2, "{}", s["auth"]);
    for scenario in ["socket_busy", "socket_policy", "key_refused", "key_missing"] {
        assert!(
            s["errors"].get(scenario).is_some(),
            "error scenario {scenario} did not run: {}",
            s["errors"]
        );
    }
    eprintln!("screenshot: {}", page["screenshot"]);
    server.shutdown().await;
}
