//! Soak test (run through `scripts/soak`): N simulated callers hold real-time conversations with a
//! fresh `gazelle serve` (scripted model, local voice) for T minutes, with a barge-in every third
//! turn, while the server process is sampled (RSS, threads, open file descriptors, CPU, and the
//! gauges of `/metrics`). Each caller hangs up after a call of one to three minutes and dials
//! again, so calls start and end all through the run; at the end every caller hangs up and the
//! gauges must return to 0.
//!
//! Pass: RSS flat while every caller is on a call (each minute's median within ±5 % of the
//! median of all samples after the warm-up), RSS back within 20 % of the idle server's (measured
//! once it is ready, before the first call) within `--release-s` of the last hang-up, no late or
//! missing reply (first reply audio more than
//! `--late-ms` after the caller's speech ended), no stale audio (a frame of a cut reply after its
//! `gazelle_clear`), every barge-in cleared, and the gauges back to 0. Prints a table; `--json
//! FILE` writes it too, and `--rejudge FILE` judges a saved run's samples again.

#[path = "load/mod.rs"]
mod load;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gazelle::transport::vocode::client::{ClientConfig, EventKind, VocodeClient};
use load::{http_get, metric, CHUNK_MS, RATE};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/gazelle")]
    bin: PathBuf,
    #[arg(long, default_value_t = 50)]
    calls: usize,
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// RSS is judged against its level at the end of this; default max(2 min, 10 %).
    #[arg(long)]
    warmup_minutes: Option<f64>,
    #[arg(long, default_value_t = 10)]
    sample_s: u64,
    /// A reply whose first audio comes later than this after the end of speech is late.
    #[arg(long, default_value_t = 1_500)]
    late_ms: u64,
    #[arg(long, default_value_t = 39_300)]
    port: u16,
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the last hang-up, RSS must come back within 20 % of the idle server's within this.
    #[arg(long, default_value_t = 90)]
    release_s: u64,
    /// Judge the samples of an earlier run's JSON again (and rewrite it) instead of running.
    #[arg(long)]
    rejudge: Option<PathBuf>,
}

const REPLY: &str = "Sure, I can help with that. The store opens at nine in the morning and \
                     closes at six in the evening. On Sundays it opens at ten.";

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Sample {
    minute: f64,
    rss_mb: f64,
    threads: u64,
    open_fds: u64,
    cpu_pct: f64,
    active_calls: f64,
    pending_sockets: f64,
    open_connections: f64,
}

#[derive(Debug, Default)]
struct CallerStats {
    turns: u64,
    replies: u64,
    late: u64,
    missing: u64,
    barge_ins: u64,
    clears: u64,
    stale_frames: u64,
    /// Interruptions answered before their speech ended: the turn was judged over at a pause
    /// inside it (a turn-taking miss, reported, not stale audio).
    early_replies: u64,
    latencies: Vec<f64>,
    error: Option<String>,
}

/// What one caller hears after it stops talking.
struct Listen {
    /// When the caller's speech ended.
    spoke_until: Instant,
    /// Barge in after this much reply audio (a barge-in turn).
    barge_after: Option<Duration>,
}

fn main() -> anyhow::Result<()> {
    load::block_on(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.rejudge {
        return rejudge(path);
    }
    // Human speech (Asterisk's prompt "Which folder should I save the message to?" and
    // pocketsphinx's "go forward ten meters"), so the default turn policy hears real prosody.
    let question = load::recording("smart-turn/vm-savefolder.wav")?;
    let interrupt = load::recording("smart-turn/goforward.wav")?;
    let (question, interrupt) = (Arc::new(question), Arc::new(interrupt));
    let calls_placed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let silence = Arc::new(load::silence_message());
    let mut server = load::start_server(
        &args.bin,
        args.port,
        &["--reply", REPLY, "--token-delay-ms", "0"],
    )
    .await?;
    let pid = server.id();
    load::wait_until_ready(args.port).await?;
    let idle_mb = load::rss_mb(pid);
    println!("idle server before the first call: {idle_mb:.0} MB");
    let started = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let end = started + total;
    let mut tasks = Vec::new();
    for k in 0..args.calls {
        let url = format!("ws://127.0.0.1:{}/conversation", args.port);
        let (q, i, s) = (question.clone(), interrupt.clone(), silence.clone());
        let placed = calls_placed.clone();
        let late = Duration::from_millis(args.late_ms);
        // Spread the callers so their turns do not line up.
        let offset = Duration::from_millis(k as u64 * 8_000 / args.calls as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut stats = CallerStats::default();
            // Calls of 60–180 s, back to back, until the end.
            let mut seed = k as u64 * 7_919 + 17;
            while Instant::now() + Duration::from_secs(12) < end {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let length = Duration::from_secs(60 + (seed >> 33) % 121);
                let hang_up = (Instant::now() + length).min(end);
                placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = caller(&url, &q, &i, &s, hang_up, late, k, &mut stats).await {
                    stats.error = Some(e.to_string());
                    break;
                }
            }
            stats
        }));
    }
    println!(
        "{:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>8} {:>8}",
        "minute", "RSS MB", "threads", "fds", "CPU %", "calls", "pending", "conns"
    );
    let mut samples = Vec::new();
    let mut cpu_prev = (load::cpu_seconds(pid), Instant::now());
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(args.sample_s).min(end - Instant::now())).await;
        let s = sample(pid, args.port, started, &mut cpu_prev).await;
        let minute_mark = (samples.len() as u64 * args.sample_s).is_multiple_of(60);
        if minute_mark || Instant::now() >= end {
            print_sample(&s);
        }
        samples.push(s);
    }
    let mut stats = CallerStats::default();
    let mut errors = Vec::new();
    for t in tasks {
        let s = t.await?;
        stats.turns += s.turns;
        stats.replies += s.replies;
        stats.late += s.late;
        stats.missing += s.missing;
        stats.barge_ins += s.barge_ins;
        stats.clears += s.clears;
        stats.stale_frames += s.stale_frames;
        stats.early_replies += s.early_replies;
        stats.latencies.extend(s.latencies);
        errors.extend(s.error);
    }
    // Every caller has hung up: the gauges must come back to 0.
    let mut after = sample(pid, args.port, started, &mut cpu_prev).await;
    let settle = Instant::now() + Duration::from_secs(10);
    while (after.active_calls + after.pending_sockets > 0.0) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = sample(pid, args.port, started, &mut cpu_prev).await;
    }
    print_sample(&after);
    let released = await_release(pid, idle_mb, Duration::from_secs(args.release_s)).await;
    released.print();
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let _ = server.wait();

    let warmup = args
        .warmup_minutes
        .unwrap_or((args.minutes * 0.1).max(2.0).min(args.minutes / 2.0));
    let rss = judge_rss(&samples, warmup, args.calls as f64);
    stats.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| load::quantile(&stats.latencies, p);
    let gauges_zero = after.active_calls == 0.0 && after.pending_sockets == 0.0;
    let pass = rss.flat
        && released.back
        && stats.late == 0
        && stats.missing == 0
        && stats.stale_frames == 0
        && stats.clears == stats.barge_ins
        && gauges_zero
        && errors.is_empty();
    let placed = calls_placed.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{} callers × {:.1} min, {placed} calls placed: {} turns, {} replies, {} barge-ins ({} \
         cleared), {} late, {} missing, {} stale frames, {} interruptions answered before they \
         ended; speech end → first audio p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        args.calls,
        args.minutes,
        stats.turns,
        stats.replies,
        stats.barge_ins,
        stats.clears,
        stats.late,
        stats.missing,
        stats.stale_frames,
        stats.early_replies,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    rss.print(warmup);
    println!(
        "gauges at the end: {} calls, {} pending, {} connections (the sampler's own); caller \
         errors: {}",
        after.active_calls,
        after.pending_sockets,
        after.open_connections,
        errors.len()
    );
    for e in errors.iter().take(5) {
        println!("  caller error: {e}");
    }
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if let Some(path) = &args.json {
        let out = serde_json::json!({
            "callers": args.calls,
            "calls_placed": placed,
            "minutes": args.minutes,
            "warmup_minutes": warmup,
            "late_ms": args.late_ms,
            "turns": stats.turns,
            "replies": stats.replies,
            "barge_ins": stats.barge_ins,
            "clears": stats.clears,
            "late": stats.late,
            "missing": stats.missing,
            "stale_frames": stats.stale_frames,
            "early_replies": stats.early_replies,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "rss_mb": rss,
            "rss_flat": rss.flat,
            "rss_released": released,
            "gauges_at_end": after,
            "caller_errors": errors,
            "pass": pass,
            "samples": samples,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    anyhow::ensure!(pass, "the soak failed its criteria");
    Ok(())
}

async fn sample(pid: u32, port: u16, started: Instant, cpu: &mut (f64, Instant)) -> Sample {
    let metrics = http_get(port, "/metrics").await.unwrap_or_default();
    let now = (load::cpu_seconds(pid), Instant::now());
    let cpu_pct = (now.0 - cpu.0) / (now.1 - cpu.1).as_secs_f64().max(1e-3) * 100.0;
    *cpu = now;
    Sample {
        minute: started.elapsed().as_secs_f64() / 60.0,
        rss_mb: load::rss_mb(pid),
        threads: load::threads(pid),
        open_fds: load::open_fds(pid),
        cpu_pct,
        active_calls: metric(&metrics, "gazelle_active_calls"),
        pending_sockets: metric(&metrics, "gazelle_pending_sockets"),
        open_connections: metric(&metrics, "gazelle_open_connections"),
    }
}

fn print_sample(s: &Sample) {
    println!(
        "{:>7.1} {:>8.0} {:>8} {:>6} {:>7.0} {:>7} {:>8} {:>8}",
        s.minute,
        s.rss_mb,
        s.threads,
        s.open_fds,
        s.cpu_pct,
        s.active_calls,
        s.pending_sockets,
        s.open_connections
    );
}

/// Sends messages in real time (20 ms apart) from `next`, draining events into `on_event`.
struct Line {
    client: VocodeClient,
    next: tokio::time::Instant,
}

impl Line {
    async fn send(&mut self, m: &str) -> anyhow::Result<()> {
        self.client.send_text(m).await?;
        self.next += Duration::from_millis(CHUNK_MS);
        tokio::time::sleep_until(self.next).await;
        Ok(())
    }
}

/// One caller: ask, listen (barging in on every third reply), pause, until `end`.
#[allow(clippy::too_many_arguments)]
async fn caller(
    url: &str,
    question: &(Vec<String>, usize),
    interrupt: &(Vec<String>, usize),
    silence: &str,
    end: Instant,
    late: Duration,
    k: usize,
    stats: &mut CallerStats,
) -> anyhow::Result<()> {
    let mut cc = ClientConfig::new(RATE, gazelle::audio::Encoding::Linear16);
    cc.subscribe_transcript = false;
    let client = VocodeClient::connect(url, cc).await?;
    let mut line = Line {
        client,
        next: tokio::time::Instant::now(),
    };
    let mut turn = k as u64 % 3;
    while Instant::now() + Duration::from_secs(12) < end {
        let spoke_until = speak(&mut line, question).await?;
        turn += 1;
        let barge_after = turn.is_multiple_of(3).then_some(Duration::from_millis(800));
        let turn_heard = Listen {
            spoke_until,
            barge_after,
        };
        if listen(&mut line, turn_heard, silence, late, stats).await? {
            stats.barge_ins += 1;
            let spoke_until = barge_in(&mut line, interrupt, stats).await?;
            let reply = Listen {
                spoke_until,
                barge_after: None,
            };
            listen(&mut line, reply, silence, late, stats).await?;
        }
        for _ in 0..25 {
            line.send(silence).await?;
        }
    }
    line.client.stop().await?;
    Ok(())
}

/// Speaks an utterance; returns when its speech ended.
async fn speak(line: &mut Line, utterance: &(Vec<String>, usize)) -> anyhow::Result<Instant> {
    let mut spoke_until = Instant::now();
    for (i, m) in utterance.0.iter().enumerate() {
        line.send(m).await?;
        if i == utterance.1 {
            spoke_until = Instant::now();
        }
    }
    Ok(spoke_until)
}

/// Listens to the reply to a turn (keeping the line open with silence) until it has played out,
/// or on a barge-in turn until it has played for a while: then returns true, and the caller
/// talks over it.
async fn listen(
    line: &mut Line,
    turn: Listen,
    silence: &str,
    late: Duration,
    stats: &mut CallerStats,
) -> anyhow::Result<bool> {
    stats.turns += 1;
    let mut first_audio: Option<Instant> = None;
    let mut queued = Duration::ZERO;
    loop {
        line.send(silence).await?;
        while let Ok(ev) = line.client.events.try_recv() {
            match ev.kind {
                EventKind::Audio { samples, rate } => {
                    if first_audio.is_none() {
                        first_audio = Some(ev.at);
                        let after = ev.at.saturating_duration_since(turn.spoke_until);
                        stats.replies += 1;
                        stats.latencies.push(after.as_secs_f64() * 1e3);
                        if after > late {
                            stats.late += 1;
                        }
                    }
                    queued += Duration::from_secs_f64(samples.len() as f64 / rate as f64);
                }
                EventKind::Closed { code, reason } => {
                    anyhow::bail!("the server closed the call ({code:?} {reason})")
                }
                EventKind::Error { kind, message } => anyhow::bail!("{kind}: {message}"),
                _ => {}
            }
        }
        let now = Instant::now();
        match (first_audio, turn.barge_after) {
            (None, _) if now > turn.spoke_until + Duration::from_secs(6) => {
                stats.missing += 1;
                return Ok(false);
            }
            (Some(t), Some(after)) if now > t + after => return Ok(true),
            (Some(t), None) if now > t + queued + Duration::from_millis(400) => return Ok(false),
            _ => {}
        }
    }
}

/// The fading last sound of an utterance, in messages: bot audio within it of the end by
/// loudness overlaps it rather than cutting the speaker off (as `tests/calls.rs` judges).
const FADE_CHUNKS: usize = (250 / CHUNK_MS) as usize;

/// Talks over the bot: expects a clear while speaking and no audio of the cut reply after it.
/// Stops sending where the interruption's speech ends (the reply to it may start in the silence
/// after, and `listen` hears that) and returns when.
async fn barge_in(
    line: &mut Line,
    interrupt: &(Vec<String>, usize),
    stats: &mut CallerStats,
) -> anyhow::Result<Instant> {
    let mut cleared: Option<Instant> = None;
    // The reply cut, and whether the reply to the interruption itself has started.
    let mut cut: Option<u64> = None;
    let mut answered = false;
    let mut counted_early = false;
    let mut spoke_until = Instant::now();
    for (i, m) in interrupt.0.iter().enumerate().take(interrupt.1 + 1) {
        line.send(m).await?;
        if i == interrupt.1 {
            spoke_until = Instant::now();
        }
        while let Ok(ev) = line.client.events.try_recv() {
            match ev.kind {
                EventKind::Clear { reply, .. } if cleared.is_none() => {
                    cleared = Some(ev.at);
                    cut = Some(reply);
                    stats.clears += 1;
                }
                EventKind::Transcript { reply, .. } if cut.is_some_and(|c| c != reply) => {
                    answered = true
                }
                // The reply to the interruption cannot start before its speech has ended (up to
                // its fading last sound: under the smart policy a turn judged complete may be
                // answered a moment before the end by loudness).
                EventKind::Audio { .. } if cleared.is_some() && i + FADE_CHUNKS < interrupt.1 => {
                    if !answered {
                        stats.stale_frames += 1
                    } else if !std::mem::replace(&mut counted_early, true) {
                        stats.early_replies += 1
                    }
                }
                EventKind::Closed { code, reason } => {
                    anyhow::bail!("the server closed the call ({code:?} {reason})")
                }
                _ => {}
            }
        }
    }
    Ok(spoke_until)
}

/// RSS while every caller is on a call, after the warm-up, judged by its median in each minute
/// (a sample taken right after the minutely heap trim dips for a moment) against the median of
/// every sample after the warm-up.
#[derive(Debug, Clone, serde::Serialize)]
struct RssVerdict {
    reference: f64,
    /// Lowest and highest per-minute median.
    min: f64,
    max: f64,
    /// Lowest and highest single sample, for the record.
    lowest_sample: f64,
    highest_sample: f64,
    /// Least-squares slope in MB per minute: a leak shows here.
    slope_per_min: f64,
    flat: bool,
}

impl RssVerdict {
    fn pct(&self, v: f64) -> f64 {
        (v / self.reference - 1.0) * 100.0
    }

    fn print(&self, warmup: f64) {
        println!(
            "RSS under full load after the {warmup:.1} min warm-up: reference {:.0} MB, \
             per-minute medians {:.0}–{:.0} MB ({:+.1} % / {:+.1} %), single samples {:.0}–{:.0} \
             MB, slope {:+.2} MB/min",
            self.reference,
            self.min,
            self.max,
            self.pct(self.min),
            self.pct(self.max),
            self.lowest_sample,
            self.highest_sample,
            self.slope_per_min
        );
    }
}

fn judge_rss(samples: &[Sample], warmup: f64, callers: f64) -> RssVerdict {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let full = |s: &&Sample| s.active_calls >= callers;
    let later: Vec<&Sample> = samples
        .iter()
        .filter(full)
        .filter(|s| s.minute > warmup)
        .collect();
    let reference = median(later.iter().map(|s| s.rss_mb).collect());
    let mut minutes: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for s in &later {
        minutes.entry(s.minute as u64).or_default().push(s.rss_mb);
    }
    let medians: Vec<f64> = minutes.into_values().map(median).collect();
    let fold = |v: &[f64], f: fn(f64, f64) -> f64, init| v.iter().copied().fold(init, f);
    let singles: Vec<f64> = later.iter().map(|s| s.rss_mb).collect();
    let n = later.len() as f64;
    let (mx, my) = (
        later.iter().map(|s| s.minute).sum::<f64>() / n,
        later.iter().map(|s| s.rss_mb).sum::<f64>() / n,
    );
    let sxy: f64 = later
        .iter()
        .map(|s| (s.minute - mx) * (s.rss_mb - my))
        .sum();
    let sxx: f64 = later.iter().map(|s| (s.minute - mx).powi(2)).sum();
    let mut v = RssVerdict {
        reference,
        min: fold(&medians, f64::min, f64::INFINITY),
        max: fold(&medians, f64::max, f64::NEG_INFINITY),
        lowest_sample: fold(&singles, f64::min, f64::INFINITY),
        highest_sample: fold(&singles, f64::max, f64::NEG_INFINITY),
        slope_per_min: if sxx > 0.0 { sxy / sxx } else { 0.0 },
        flat: false,
    };
    v.flat = !medians.is_empty() && v.pct(v.min).abs() <= 5.0 && v.pct(v.max).abs() <= 5.0;
    v
}

/// What RSS did after the last hang-up.
#[derive(Debug, Clone, serde::Serialize)]
struct Release {
    idle_mb: f64,
    /// RSS when every gauge was back to 0, and the last one measured.
    at_hang_up_mb: f64,
    after_mb: f64,
    /// Seconds from the hang-ups until RSS was within 20 % of idle (or the wait ran out).
    seconds: f64,
    back: bool,
}

impl Release {
    fn print(&self) {
        println!(
            "RSS after the last hang-up: {:.0} MB, then {:.0} MB after {:.0} s ({:+.1} % against \
             the idle {:.0} MB; {} within 20 %)",
            self.at_hang_up_mb,
            self.after_mb,
            self.seconds,
            (self.after_mb / self.idle_mb - 1.0) * 100.0,
            self.idle_mb,
            if self.back { "back" } else { "not back" }
        );
    }
}

/// Samples RSS every second until it is within 20 % of `idle_mb` or `wait` has passed (the server
/// gives freed heap back once a minute).
async fn await_release(pid: u32, idle_mb: f64, wait: Duration) -> Release {
    let started = Instant::now();
    let at_hang_up_mb = load::rss_mb(pid);
    let mut after_mb = at_hang_up_mb;
    while after_mb > idle_mb * 1.2 && started.elapsed() < wait {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after_mb = load::rss_mb(pid);
    }
    Release {
        idle_mb,
        at_hang_up_mb,
        after_mb,
        seconds: started.elapsed().as_secs_f64(),
        back: after_mb <= idle_mb * 1.2,
    }
}

/// Judges an earlier run's samples again and rewrites its JSON.
fn rejudge(path: &std::path::Path) -> anyhow::Result<()> {
    let mut run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let samples: Vec<Sample> = serde_json::from_value(run["samples"].clone())?;
    let warmup = run["warmup_minutes"].as_f64().unwrap_or(3.0);
    let callers = run["callers"].as_f64().unwrap_or(0.0);
    let rss = judge_rss(&samples, warmup, callers);
    rss.print(warmup);
    let zero = |k: &str| run[k].as_u64() == Some(0);
    let gauges = &run["gauges_at_end"];
    // Runs before the release check have no verdict for it.
    let released = match run["rss_released"]["back"].as_bool() {
        Some(back) => back,
        None => {
            println!("(this run predates the check that RSS comes back after the calls end)");
            true
        }
    };
    let pass = rss.flat
        && released
        && zero("late")
        && zero("missing")
        && zero("stale_frames")
        && run["clears"] == run["barge_ins"]
        && gauges["active_calls"].as_f64() == Some(0.0)
        && gauges["pending_sockets"].as_f64() == Some(0.0)
        && run["caller_errors"]
            .as_array()
            .is_some_and(|e| e.is_empty());
    run["rss_flat"] = rss.flat.into();
    run["rss_mb"] = serde_json::to_value(&rss)?;
    run["pass"] = pass.into();
    std::fs::write(path, serde_json::to_string_pretty(&run)?)?;
    println!("{}", if pass { "PASS" } else { "FAIL" });
    anyhow::ensure!(pass, "the soak failed its criteria");
    Ok(())
}
