//! Turn-taking benchmark (run through `scripts/bench-turns`). For each turn policy it starts a
//! fresh `gazelle serve` (scripted model, local voice) and streams a labelled set of utterances
//! to it in real time over loopback, one caller per utterance, several at once:
//!
//! - **complete** utterances: recorded human speech (tests/fixtures/smart-turn: LibriVox, the
//!   pocketsphinx test data and Asterisk prompts) and espeak-ng sentences;
//! - **paused** utterances: an unfinished phrase, a silence of 0.3–1.0 s, then more speech.
//!
//! For a complete utterance it measures the dead air: from the true end of speech (the last
//! 10 ms frame whose RMS is within 26 dB of the clip's loudest, as sent in real time;
//! `gazelle::audio::level`) to the first bot audio the caller receives, negative when the reply
//! starts during the last, fading sound. A paused utterance is a false cut-off when bot audio
//! arrives more than 250 ms before its true end. Prints a table per policy and source; `--json FILE` writes it.

#[path = "load/mod.rs"]
mod load;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gazelle::audio::level::speech_span;
use gazelle::audio::resample::resample_all;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};
use gazelle::tts::espeak::{Espeak, EspeakConfig};
use load::{CHUNK_MS, RATE};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/gazelle")]
    bin: PathBuf,
    #[arg(long, default_value_t = 39_300)]
    port: u16,
    /// Callers at once.
    #[arg(long, default_value_t = 6)]
    parallel: usize,
    /// Times each complete utterance is played.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Policies to run: silence-500, smart, smart-preemptive.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "silence-500,smart,smart-preemptive"
    )]
    policies: Vec<String>,
    /// Override `[pipeline.turn] pause_ms` for the smart policies.
    #[arg(long)]
    pause_ms: Option<u32>,
    /// Override `[pipeline.turn] complete_threshold` for the smart policies.
    #[arg(long)]
    threshold: Option<f32>,
    /// Override `[pipeline.turn] likely_silence_ms` for the smart policies.
    #[arg(long)]
    likely_silence_ms: Option<u32>,
    /// The scripted model's delay per token, standing in for a slower model.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const FIXTURES: &str = "tests/fixtures/smart-turn";
/// Recorded complete utterances.
const REAL_COMPLETE: [&str; 5] = [
    "sense-0870-full.wav",
    "sense-0880-full.wav",
    "goforward.wav",
    "vm-savefolder.wav",
    "agent-pass.wav",
];
/// Recorded unfinished phrases (each followed, after the pause, by `REAL_ENDING`).
const REAL_UNFINISHED: [&str; 4] = [
    "sense-0890-cut.wav",
    "sense-0920-cut.wav",
    "conf-thereare.wav",
    "confbridge-leave-in.wav",
];
const REAL_ENDING: &str = "goforward.wav";
const ESPEAK_COMPLETE: [&str; 4] = [
    "What time does the bakery open tomorrow?",
    "Can you book me a table for two at seven?",
    "I would like to cancel my order, please.",
    "Is it going to rain this afternoon?",
];
const ESPEAK_PAUSED: [(&str, &str); 3] = [
    ("I'd like to book a flight to", "Boston, please."),
    ("My phone number is five five five", "one two three four."),
    ("Can you tell me about the", "weather tomorrow?"),
];
const PAUSES_MS: [u64; 4] = [300, 500, 700, 1_000];
/// Silence before each utterance, and after it while the caller waits for the reply.
const LEAD_MS: u64 = 300;
const TAIL_MS: u64 = 3_000;
/// A reply that starts this long before the true end of an utterance cut the speaker off; one
/// that starts within it overlaps the last, fading sound of a finished utterance.
const CUT_OFF_MS: f64 = 250.0;

#[derive(Clone)]
struct Utterance {
    name: String,
    source: &'static str,
    complete: bool,
    samples: Vec<f32>,
    /// Sample index just past the true end of speech.
    true_end: usize,
}

/// Medians of the server's timeline for complete utterances, ms after the true end of speech
/// as the server saw it.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct ServerStages {
    pause_ms: f64,
    turn_end_ms: f64,
    first_token_ms: f64,
    first_synth_byte_ms: f64,
    first_audio_sent_ms: f64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Row {
    server: ServerStages,
    policy: String,
    source: String,
    complete_runs: usize,
    dead_air_p50_ms: f64,
    dead_air_p90_ms: f64,
    /// Complete utterances that got no reply within the tail.
    no_reply: usize,
    /// Complete utterances the bot cut off at a pause inside them (a reply more than 250 ms
    /// before their end); their dead air is left out of the percentiles.
    complete_cutoffs: usize,
    paused_runs: usize,
    false_cutoffs: usize,
    false_cutoff_rate: f64,
}

fn main() -> anyhow::Result<()> {
    load::block_on(run(Args::parse()))
}

/// The first sample of speech (see `gazelle::audio::level`).
fn speech_start(x: &[f32]) -> usize {
    speech_span(x, RATE).map_or(0, |(s, _)| s)
}

/// The sample just past the end of speech.
fn speech_end(x: &[f32]) -> usize {
    speech_span(x, RATE).map_or(x.len(), |(_, e)| e)
}

fn clip(name: &str) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(Path::new(FIXTURES).join(name))?;
    let wav = gazelle::audio::wav::read(&bytes)?;
    anyhow::ensure!(wav.sample_rate == RATE, "{name} is not 16 kHz");
    Ok(wav.samples)
}

async fn speak(voice: &Espeak, text: &str) -> anyhow::Result<Vec<f32>> {
    let raw = voice.speak(text).await?;
    let x = resample_all(&raw, voice.sample_rate(), RATE)?;
    // espeak pads with silence; keep up to the speech end.
    let end = speech_end(&x);
    Ok(x[..end].to_vec())
}

fn silence(ms: u64) -> Vec<f32> {
    vec![0.0; (RATE as u64 * ms / 1000) as usize]
}

fn joined(a: &[f32], pause_ms: u64, b: &[f32]) -> Vec<f32> {
    [a, &silence(pause_ms), b].concat()
}

async fn labelled_set(repeat: usize) -> anyhow::Result<Vec<Utterance>> {
    let voice = Espeak::start(&EspeakConfig {
        dir: gazelle::assets::espeak_dir(None)?,
        voice: "en-us".into(),
        rate_wpm: 175,
        cache_units: 0,
    })?;
    let mut set = Vec::new();
    let mut push = |name: String, source, complete, samples: Vec<f32>| {
        let true_end = speech_end(&samples);
        set.push(Utterance {
            name,
            source,
            complete,
            samples,
            true_end,
        });
    };
    for _ in 0..repeat {
        for name in REAL_COMPLETE {
            push(name.into(), "recorded", true, clip(name)?);
        }
        for text in ESPEAK_COMPLETE {
            push(text.into(), "espeak-ng", true, speak(&voice, text).await?);
        }
    }
    let ending = clip(REAL_ENDING)?;
    // The pause is the silence between the words: no leading silence of the second part.
    let ending = &ending[speech_start(&ending)..];
    for pause in PAUSES_MS {
        for name in REAL_UNFINISHED {
            let head = clip(name)?;
            let head = &head[..speech_end(&head)];
            push(
                format!("{name} +{pause} ms+ {REAL_ENDING}"),
                "recorded",
                false,
                joined(head, pause, ending),
            );
        }
        for (a, b) in ESPEAK_PAUSED {
            let (head, tail) = (speak(&voice, a).await?, speak(&voice, b).await?);
            let tail = &tail[speech_start(&tail)..];
            push(
                format!("{a} +{pause} ms+ {b}"),
                "espeak-ng",
                false,
                joined(&head, pause, tail),
            );
        }
    }
    Ok(set)
}

/// What one caller saw: the dead air after the true end (None: no reply), and whether any bot
/// audio came before the true end.
struct Outcome {
    dead_air_ms: Option<f64>,
    cut_off: bool,
    /// The server's timeline of the reply (ms after the true end of speech it saw).
    timeline: Option<serde_json::Value>,
}

async fn caller(url: String, u: Arc<Utterance>) -> anyhow::Result<Outcome> {
    let mut cc = ClientConfig::new(RATE, gazelle::audio::Encoding::Linear16);
    cc.subscribe_transcript = false;
    let mut client = VocodeClient::connect(&url, cc).await?;
    let chunk = (RATE as u64 * CHUNK_MS / 1000) as usize;
    let mut audio = silence(LEAD_MS);
    let true_end = audio.len() + u.true_end;
    audio.extend_from_slice(&u.samples);
    audio.extend(silence(TAIL_MS));
    let tick = Duration::from_millis(CHUNK_MS);
    let started = tokio::time::Instant::now();
    let mut end_sent: Option<Instant> = None;
    let mut first_audio: Option<Instant> = None;
    let mut timeline = None;
    for (k, c) in audio.chunks(chunk).enumerate() {
        client.send_text(&load::message(c)).await?;
        if end_sent.is_none() && (k + 1) * chunk >= true_end {
            end_sent = Some(Instant::now());
        }
        while let Ok(ev) = client.events.try_recv() {
            match ev.kind {
                EventKind::Audio { .. } => {
                    first_audio.get_or_insert(ev.at);
                }
                EventKind::Timeline(t) => timeline = Some(t),
                _ => {}
            }
        }
        if first_audio.is_some() && end_sent.is_some() && timeline.is_some() {
            break;
        }
        tokio::time::sleep_until(started + tick * (k as u32 + 1)).await;
    }
    let _ = client.stop().await;
    let end_sent = end_sent.expect("the whole utterance was sent");
    // Signed: a reply that starts during the last, fading sound counts as negative dead air.
    let dead_air_ms = first_audio.map(|at| {
        if at >= end_sent {
            (at - end_sent).as_secs_f64() * 1e3
        } else {
            -(end_sent - at).as_secs_f64() * 1e3
        }
    });
    Ok(Outcome {
        dead_air_ms,
        cut_off: dead_air_ms.is_some_and(|d| d < -CUT_OFF_MS),
        timeline,
    })
}

fn policy_config(policy: &str) -> anyhow::Result<&'static str> {
    Ok(match policy {
        "silence-500" => {
            "[pipeline.turn]\npolicy = \"silence\"\n[pipeline.vad]\nmin_silence_ms = 500\n"
        }
        "smart" => "[pipeline.turn]\npolicy = \"smart\"\npreemptive = false\n",
        "smart-preemptive" => "[pipeline.turn]\npolicy = \"smart\"\npreemptive = true\n",
        other => anyhow::bail!("unknown policy {other}"),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let set: Vec<Arc<Utterance>> = labelled_set(args.repeat)
        .await?
        .into_iter()
        .map(Arc::new)
        .collect();
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    println!(
        "{:<18} {:<10} {:>9} {:>12} {:>12} {:>9} {:>9} {:>7} {:>10} {:>12}",
        "policy",
        "speech",
        "complete",
        "dead p50 ms",
        "dead p90 ms",
        "no reply",
        "cut (c)",
        "paused",
        "cut-offs",
        "cut-off rate"
    );
    for (i, policy) in args.policies.iter().enumerate() {
        let config = dir.path().join(format!("{policy}.toml"));
        let mut turn = policy_config(policy)?.to_string();
        if policy.starts_with("smart") {
            if let Some(p) = args.pause_ms {
                turn.push_str(&format!("pause_ms = {p}\n"));
            }
            if let Some(t) = args.threshold {
                turn.push_str(&format!("complete_threshold = {t}\n"));
            }
            if let Some(ms) = args.likely_silence_ms {
                turn.push_str(&format!("likely_silence_ms = {ms}\n"));
            }
        }
        std::fs::write(
            &config,
            format!(
                "[slm]\nkind = \"scripted\"\nreply = \"Sure, I can help with that.\"\n\
                 token_delay_ms = {}\n{turn}",
                args.token_delay_ms
            ),
        )?;
        let port = args.port + i as u16;
        let config_arg = config.display().to_string();
        let mut server = load::start_server(&args.bin, port, &["--config", &config_arg]).await?;
        load::wait_until_ready(port).await?;
        let url = format!("ws://127.0.0.1:{port}/conversation");
        let mut outcomes = Vec::new();
        for batch in set.chunks(args.parallel) {
            let mut tasks = Vec::new();
            for (k, u) in batch.iter().enumerate() {
                let (url, u) = (url.clone(), u.clone());
                // Stagger starts so the callers' turns do not end together.
                let offset = Duration::from_millis(137 * k as u64);
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(offset).await;
                    (u.clone(), caller(url, u).await)
                }));
            }
            for t in tasks {
                let (u, o) = t.await?;
                outcomes.push((u, o?));
            }
        }
        let _ = Command::new("kill").arg(server.id().to_string()).status();
        let _ = server.wait();
        for source in ["recorded", "espeak-ng"] {
            let mine: Vec<&(Arc<Utterance>, Outcome)> = outcomes
                .iter()
                .filter(|(u, _)| u.source == source)
                .collect();
            let mut dead: Vec<f64> = mine
                .iter()
                .filter(|(u, o)| u.complete && !o.cut_off)
                .filter_map(|(_, o)| o.dead_air_ms)
                .collect();
            let complete_cutoffs = mine.iter().filter(|(u, o)| u.complete && o.cut_off).count();
            dead.sort_by(f64::total_cmp);
            let complete = mine.iter().filter(|(u, _)| u.complete).count();
            let paused: Vec<_> = mine.iter().filter(|(u, _)| !u.complete).collect();
            let cutoffs = paused.iter().filter(|(_, o)| o.cut_off).count();
            for (u, o) in &paused {
                if o.cut_off {
                    eprintln!("{policy}: cut off: {}", u.name);
                }
            }
            for (u, o) in mine.iter().filter(|(u, _)| u.complete) {
                let t = o.timeline.as_ref();
                let ms = |k: &str| t.and_then(|t| t.get(k)?.as_f64()).unwrap_or(f64::NAN);
                eprintln!(
                    "{policy}: {}: dead air {:.0} ms; server: pause {:.0}, p {:?}, turn end {:.0}, \
                     first audio sent {:.0} ms",
                    u.name,
                    o.dead_air_ms.unwrap_or(f64::NAN),
                    ms("pause_ms"),
                    t.and_then(|t| t.get("end_of_turn_probability")?.as_f64()),
                    ms("vad_end_ms"),
                    ms("first_audio_sent_ms"),
                );
            }
            let stage = |k: &str| {
                let mut v: Vec<f64> = mine
                    .iter()
                    .filter(|(u, o)| u.complete && !o.cut_off)
                    .filter_map(|(_, o)| o.timeline.as_ref()?.get(k)?.as_f64())
                    .collect();
                v.sort_by(f64::total_cmp);
                load::quantile(&v, 0.5)
            };
            let server = ServerStages {
                pause_ms: stage("pause_ms"),
                turn_end_ms: stage("vad_end_ms"),
                first_token_ms: stage("first_token_ms"),
                first_synth_byte_ms: stage("first_synth_byte_ms"),
                first_audio_sent_ms: stage("first_audio_sent_ms"),
            };
            eprintln!("{policy} {source}: server medians {server:?}");
            let row = Row {
                server,
                policy: policy.clone(),
                source: source.into(),
                complete_runs: complete,
                dead_air_p50_ms: load::quantile(&dead, 0.5),
                dead_air_p90_ms: load::quantile(&dead, 0.9),
                no_reply: complete - dead.len() - complete_cutoffs,
                complete_cutoffs,
                paused_runs: paused.len(),
                false_cutoffs: cutoffs,
                false_cutoff_rate: cutoffs as f64 / paused.len().max(1) as f64,
            };
            println!(
                "{:<18} {:<10} {:>9} {:>12.0} {:>12.0} {:>9} {:>9} {:>7} {:>10} {:>11.1}%",
                row.policy,
                row.source,
                row.complete_runs,
                row.dead_air_p50_ms,
                row.dead_air_p90_ms,
                row.no_reply,
                row.complete_cutoffs,
                row.paused_runs,
                row.false_cutoffs,
                row.false_cutoff_rate * 100.0
            );
            rows.push(row);
        }
    }
    if let Some(path) = args.json {
        let stamp = serde_json::json!({
            "benchmark": "bench-turns",
            "pause_ms": args.pause_ms,
            "token_delay_ms": args.token_delay_ms,
            "complete_threshold": args.threshold,
            "likely_silence_ms": args.likely_silence_ms,
            "lead_ms": LEAD_MS,
            "pauses_ms": PAUSES_MS,
            "rows": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&stamp)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
