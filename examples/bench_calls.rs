//! Call-capacity benchmark (run through `scripts/bench-calls`). For each N it starts a fresh
//! `gazelle serve` (the scripted model, or with `--model DIR` the Gazelle engine on that
//! checkpoint, e.g. the tiny fixture; local voice; the default turn policy unless `--policy`),
//! connects N simulated callers over loopback that talk in real time (recorded human speech,
//! Asterisk's "Which folder should I save the message to?", since the end-of-turn model judges
//! espeak-ng's prosody unfinished; then silence while the reply plays, then a pause, again and
//! again), and measures what callers feel: from the true end of their speech to the first reply
//! audio they receive (the headline), and beside it the server's VAD-end → first-audio-sent
//! time, the end-of-turn verdict's delay (asked → answered, queue included, from `/metrics`) and
//! the worker's queue, the turns ended by the load fallback, late output frames at the callers
//! and by the server's own clock (`gazelle_output_underrun_seconds`), the VAD cost per frame, RSS
//! per call and server CPU. Capacity is the largest N whose p50 and p99 stay within 100 ms of
//! the first (quietest) step's. Prints a table; `--json FILE` writes it too.

#[path = "load/mod.rs"]
mod load;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};
use load::{cpu_seconds, http_get, metric, rss_mb, CHUNK_MS, RATE};

#[derive(Parser)]
struct Args {
    /// The gazelle binary to benchmark.
    #[arg(long, default_value = "target/release/gazelle")]
    bin: PathBuf,
    /// Caller counts to try, in order; stops after the first that fails the target (judged by the
    /// server's clock).
    #[arg(long, value_delimiter = ',', default_value = "10,50,100,200,300,400")]
    calls: Vec<usize>,
    /// `[pipeline.turn] policy`: smart (the default) or silence.
    #[arg(long, default_value = "smart")]
    policy: String,
    /// Seconds of conversation per step.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    #[arg(long, default_value_t = 39_100)]
    port: u16,
    /// Keep going after a step fails the target.
    #[arg(long)]
    all: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Serve the Gazelle engine on this local checkpoint (f32) instead of the scripted model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With --model: tokens per reply at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
}

const REPLY: &str = "Sure, I can help with that. Let me check.";
/// A step serves its callers while its p50 and p99 (speech end → first audio) stay within this of
/// the quietest step's.
const WITHIN_MS: f64 = 100.0;

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Row {
    calls: usize,
    replies: usize,
    failed_turns: usize,
    /// The caller's true end of speech → the first reply audio it received.
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The server's VAD end → first audio sent (its timeline).
    vad_end_p50_ms: f64,
    vad_end_p99_ms: f64,
    /// End-of-turn verdicts: mean delay and the bucket bound under which 99 % came.
    verdict_mean_ms: f64,
    verdict_p99_ms: f64,
    verdict_queue_max: f64,
    /// Turns ended by the load fallback, and requests withdrawn unrun.
    fallback_turns: u64,
    withdrawn: u64,
    /// VAD end → the model's first token.
    first_token_p50_ms: f64,
    first_token_p99_ms: f64,
    late_frames: usize,
    max_late_ms: f64,
    /// Frames the server itself sent after the caller's playback had run dry, by cause.
    server_late_synthesis: u64,
    server_late_scheduling: u64,
    server_late_transport: u64,
    frames: usize,
    vad_us_per_frame: f64,
    rss_idle_mb: f64,
    rss_peak_mb: f64,
    rss_per_call_kb: f64,
    server_cpu_pct: f64,
    /// p50 and p99 within `WITHIN_MS` of the quietest step's, no failed turn, and no frame late
    /// as the callers saw it.
    pass: bool,
    /// The same, but with no frame late by the server's own clock (the callers' own scheduling
    /// on the shared cores left out).
    pass_server: bool,
}

#[derive(Default)]
struct CallerStats {
    latencies: Vec<f64>,
    vad_end: Vec<f64>,
    first_tokens: Vec<f64>,
    late: usize,
    max_late_ms: f64,
    frames: usize,
    failed: usize,
}

fn main() -> anyhow::Result<()> {
    load::block_on(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let utterance = load::recording("smart-turn/vm-savefolder.wav")?;
    let speech_chunks = Arc::new(utterance.0);
    let speech_end_chunk = utterance.1;
    let silence = Arc::new(load::silence_message());
    let mut rows = Vec::new();
    let dir = tempfile::tempdir()?;
    // One config file: the turn policy, and the engine's model when one is asked for.
    let mut toml = format!("[pipeline.turn]\npolicy = {:?}\n", args.policy);
    let mut server_args: Vec<String> = Vec::new();
    match &args.model {
        None => server_args.extend(["--reply", REPLY, "--token-delay-ms", "0"].map(String::from)),
        Some(model) => {
            let model = std::fs::canonicalize(model)?;
            toml += &format!(
                "[slm]\nkind = \"gazelle\"\n[slm.gazelle]\nmodel = {:?}\noffline = true\n\
                 dtype = \"f32\"\nmax_new_tokens = {}\n",
                model.display().to_string(),
                args.max_new_tokens
            );
        }
    }
    let config = dir.path().join("gazelle.toml");
    std::fs::write(&config, toml)?;
    server_args.extend(["--config".into(), config.display().to_string()]);
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    println!(
        "model: {}; turn policy: {}; callers speak a recorded question",
        args.model.as_ref().map_or("scripted".into(), |m| format!(
            "gazelle engine on {}",
            m.display()
        )),
        args.policy
    );
    println!(
        "{:>6} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>6} {:>9} {:>9} {:>7} {:>9} {:>10} {:>9} {:>10} {:>8} {:>5}",
        "calls",
        "replies",
        "failed",
        "p50 ms",
        "p99 ms",
        "max ms",
        "vad p50",
        "vad p99",
        "verdict ms",
        "verd. p99",
        "queue",
        "fallback",
        "withdrawn",
        "late",
        "srv late",
        "VAD µs/fr",
        "RSS MB",
        "RSS/call",
        "CPU %",
        "ok"
    );
    let mut quiet: Option<(f64, f64)> = None;
    for (i, &n) in args.calls.iter().enumerate() {
        let port = args.port + i as u16;
        let mut server = load::start_server(&args.bin, port, &server_args).await?;
        load::wait_until_ready(port).await?;
        let pid = server.id();
        let rss_idle = rss_mb(pid);
        let cpu0 = cpu_seconds(pid);
        let started = Instant::now();
        let end = started + Duration::from_secs(args.seconds);
        let mut tasks = Vec::new();
        for k in 0..n {
            let url = format!("ws://127.0.0.1:{port}/conversation");
            let speech = speech_chunks.clone();
            let silence = silence.clone();
            // Spread the callers over one conversation cycle so turns do not line up.
            let offset = Duration::from_millis((k as u64 * 6_000) / n as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                caller(&url, &speech, speech_end_chunk, &silence, end).await
            }));
        }
        let mut rss_peak = rss_idle;
        let mut queue_max: f64 = 0.0;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss_peak = rss_peak.max(rss_mb(pid));
            let m = http_get(port, "/metrics").await.unwrap_or_default();
            queue_max = queue_max.max(metric(&m, "gazelle_end_of_turn_queued"));
        }
        let mut stats = CallerStats::default();
        for t in tasks {
            match t.await? {
                Ok(s) => {
                    stats.latencies.extend(s.latencies);
                    stats.vad_end.extend(s.vad_end);
                    stats.first_tokens.extend(s.first_tokens);
                    stats.late += s.late;
                    stats.max_late_ms = stats.max_late_ms.max(s.max_late_ms);
                    stats.frames += s.frames;
                    stats.failed += s.failed;
                }
                Err(e) => {
                    eprintln!("caller failed: {e}");
                    stats.failed += 1;
                }
            }
        }
        let cpu = (cpu_seconds(pid) - cpu0) / started.elapsed().as_secs_f64() * 100.0;
        let metrics = http_get(port, "/metrics").await.unwrap_or_default();
        let vad = metric(&metrics, "gazelle_vad_frame_seconds_sum")
            / metric(&metrics, "gazelle_vad_frame_seconds_count")
            * 1e6;
        let underruns = |cause: &str| {
            let key = format!("gazelle_output_underrun_seconds_count{{cause=\"{cause}\"}}");
            metric(&metrics, &key) as u64
        };
        let decisions = |d: &str| {
            let key = format!("gazelle_end_of_turn_decisions_total{{decision=\"{d}\"}}");
            metric(&metrics, &key) as u64
        };
        let verdicts = metric(&metrics, "gazelle_end_of_turn_delay_seconds_count");
        let verdict_mean_ms = if verdicts > 0.0 {
            metric(&metrics, "gazelle_end_of_turn_delay_seconds_sum") / verdicts * 1e3
        } else {
            0.0
        };
        let verdict_p99_ms = histogram_bound(&metrics, "gazelle_end_of_turn_delay_seconds", 0.99)
            .map_or(0.0, |s| s * 1e3);
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = server.wait();
        stats.latencies.sort_by(f64::total_cmp);
        stats.vad_end.sort_by(f64::total_cmp);
        stats.first_tokens.sort_by(f64::total_cmp);
        let pct = |p: f64| load::quantile(&stats.latencies, p);
        let mut row = Row {
            calls: n,
            replies: stats.latencies.len(),
            failed_turns: stats.failed,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            vad_end_p50_ms: load::quantile(&stats.vad_end, 0.5),
            vad_end_p99_ms: load::quantile(&stats.vad_end, 0.99),
            verdict_mean_ms,
            verdict_p99_ms,
            verdict_queue_max: queue_max,
            fallback_turns: decisions("fallback"),
            withdrawn: decisions("withdrawn"),
            first_token_p50_ms: load::quantile(&stats.first_tokens, 0.5),
            first_token_p99_ms: load::quantile(&stats.first_tokens, 0.99),
            late_frames: stats.late,
            max_late_ms: stats.max_late_ms,
            server_late_synthesis: underruns("synthesis"),
            server_late_scheduling: underruns("scheduling"),
            server_late_transport: underruns("transport"),
            frames: stats.frames,
            vad_us_per_frame: vad,
            rss_idle_mb: rss_idle,
            rss_peak_mb: rss_peak,
            rss_per_call_kb: (rss_peak - rss_idle) * 1024.0 / n as f64,
            server_cpu_pct: cpu,
            pass: false,
            pass_server: false,
        };
        let (q50, q99) = *quiet.get_or_insert((row.p50_ms, row.p99_ms));
        let served = row.p50_ms <= q50 + WITHIN_MS
            && row.p99_ms <= q99 + WITHIN_MS
            && row.failed_turns == 0
            && row.replies > 0;
        let server_late =
            row.server_late_synthesis + row.server_late_scheduling + row.server_late_transport;
        row.pass = served && row.late_frames == 0;
        row.pass_server = served && server_late == 0;
        println!(
            "{:>6} {:>8} {:>7} {:>8.0} {:>8.0} {:>8.0} {:>9.1} {:>9.1} {:>10.0} {:>10.0} {:>6.0} {:>9} {:>9} {:>7} {:>9} {:>10.1} {:>9.0} {:>8.0}KB {:>8.0} {:>5}",
            row.calls,
            row.replies,
            row.failed_turns,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.vad_end_p50_ms,
            row.vad_end_p99_ms,
            row.verdict_mean_ms,
            row.verdict_p99_ms,
            row.verdict_queue_max,
            row.fallback_turns,
            row.withdrawn,
            row.late_frames,
            server_late,
            row.vad_us_per_frame,
            row.rss_peak_mb,
            row.rss_per_call_kb,
            row.server_cpu_pct,
            match (row.pass, row.pass_server) {
                (true, _) => "yes",
                (false, true) => "srv",
                (false, false) => "no",
            }
        );
        let pass = row.pass_server;
        rows.push(row);
        if !pass && !args.all {
            break;
        }
    }
    let best = rows.iter().filter(|r| r.pass).map(|r| r.calls).max();
    let best_server = rows.iter().filter(|r| r.pass_server).map(|r| r.calls).max();
    let say = |n: Option<usize>| n.map_or("none".to_string(), |n| n.to_string());
    println!(
        "largest N with p50 and p99 (speech end → first audio) within {WITHIN_MS} ms of the \
         {}-call step's and no late frame: {} as the callers saw it, {} by the server's clock \
         (ok: yes = both, srv = server only)",
        args.calls.first().copied().unwrap_or(0),
        say(best),
        say(best_server)
    );
    if let Some(path) = args.json {
        let out = serde_json::json!({
            "model": args.model.as_ref().map(|m| m.display().to_string()),
            "policy": args.policy,
            "within_ms": WITHIN_MS,
            "best": best,
            "best_server": best_server,
            "rows": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// The upper bound of the first bucket of histogram `name` holding at least `q` of its samples
/// (Prometheus exposition); None without samples.
fn histogram_bound(exposition: &str, name: &str, q: f64) -> Option<f64> {
    let total = metric(exposition, &format!("{name}_count"));
    if total <= 0.0 {
        return None;
    }
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            Some((le.parse::<f64>().ok()?, count.trim().parse::<f64>().ok()?))
        })
        .find(|&(_, count)| count >= q * total)
        .map(|(le, _)| le)
}

/// One simulated caller: talk, listen to the whole reply, pause, repeat until `end`.
async fn caller(
    url: &str,
    speech: &[String],
    speech_end_chunk: usize,
    silence: &str,
    end: Instant,
) -> anyhow::Result<CallerStats> {
    let mut cc = ClientConfig::new(RATE, gazelle::audio::Encoding::Linear16);
    cc.subscribe_transcript = false;
    let mut client = VocodeClient::connect(url, cc).await?;
    let mut stats = CallerStats::default();
    let tick = Duration::from_millis(CHUNK_MS);
    let mut next = tokio::time::Instant::now();
    while Instant::now() + Duration::from_secs(6) < end {
        let mut spoke_until = Instant::now();
        for (i, m) in speech.iter().enumerate() {
            client.send_text(m).await?;
            if i == speech_end_chunk {
                spoke_until = Instant::now();
            }
            next += tick;
            tokio::time::sleep_until(next).await;
        }
        // Listen: keep the line open with silence until the reply has played out.
        let mut playout_start: Option<Instant> = None;
        let mut queued = Duration::ZERO;
        let mut timeline: Option<f64> = None;
        let give_up = Instant::now() + Duration::from_secs(12);
        loop {
            client.send_text(silence).await?;
            next += tick;
            tokio::time::sleep_until(next).await;
            while let Ok(ev) = client.events.try_recv() {
                match ev.kind {
                    EventKind::Audio { samples, rate } => {
                        if playout_start.is_none() {
                            let after = ev.at.saturating_duration_since(spoke_until);
                            stats.latencies.push(after.as_secs_f64() * 1e3);
                        }
                        let start = *playout_start.get_or_insert(ev.at);
                        stats.frames += 1;
                        let due = start + queued;
                        if ev.at > due + Duration::from_millis(1) {
                            stats.late += 1;
                            let ms = (ev.at - due).as_secs_f64() * 1000.0;
                            stats.max_late_ms = stats.max_late_ms.max(ms);
                        }
                        queued += Duration::from_secs_f64(samples.len() as f64 / rate as f64);
                    }
                    EventKind::Timeline(t) => {
                        let (a, b) = (t["vad_end_ms"].as_f64(), t["first_audio_sent_ms"].as_f64());
                        if let (Some(a), Some(b)) = (a, b) {
                            timeline = Some(b - a);
                        }
                        if let (Some(a), Some(f)) = (a, t["first_token_ms"].as_f64()) {
                            stats.first_tokens.push(f - a);
                        }
                    }
                    EventKind::Error { kind, message } => {
                        eprintln!("caller got {kind}: {message}");
                        stats.failed += 1;
                    }
                    EventKind::Closed { .. } | EventKind::Stop => {
                        anyhow::bail!("server closed the call")
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            if let Some(s) = playout_start {
                if now > s + queued + Duration::from_millis(400) {
                    break;
                }
            }
            if now > give_up {
                stats.failed += 1;
                break;
            }
        }
        if let Some(t) = timeline {
            stats.vad_end.push(t);
        }
        // A short pause before talking again.
        for _ in 0..25 {
            client.send_text(silence).await?;
            next += tick;
            tokio::time::sleep_until(next).await;
        }
    }
    client.stop().await?;
    Ok(stats)
}
