//! Whole calls against the real server on loopback: a simulated caller streams espeak-ng speech in
//! real time over the Vocode protocol, with the scripted model and the local voice answering.

mod common;

use std::time::{Duration, Instant};

use gazelle::audio::level::speech_span;
use gazelle::audio::{resample::resample_all, Encoding};
use gazelle::config::Config;
use gazelle::transport::vocode::client::{ClientConfig, Event, EventKind, VocodeClient};
use gazelle::vad::{offline::segments, TurnSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REPLY: &str = "Sure, I can help with that. The weather today is sunny and warm. \
                     Tomorrow brings some rain in the afternoon, so take an umbrella.";

/// The silence policy, for the tests that are not about turn-taking: under the smart policy where
/// a turn ends depends on the end-of-turn model's score of espeak-ng speech (0.2–0.7, around its
/// 0.5 line, and the CPU's int8 kernels move it) and on how soon that score comes.
fn config(reply: &str) -> Config {
    let mut c = Config::default();
    c.slm.reply = reply.into();
    c.slm.token_delay_ms = 5;
    c.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    c
}

/// The default (smart) turn policy, for the turn-taking tests: they speak recorded human speech
/// whose scores stand far from the thresholds on every CPU (src/vad/smart_turn.rs). They judge
/// the model's verdicts, so every verdict is awaited: on a test machine busy with other servers
/// one can come after `verdict_timeout_ms` (the load fallback, tested in `pipeline::listen`).
fn smart(reply: &str) -> Config {
    let mut c = config(reply);
    c.pipeline.turn = Default::default();
    c.pipeline.turn.verdict_timeout_ms = 0;
    c
}

/// Streams `clip`, then silence in 100 ms steps until `done` holds for the events so far;
/// panics, naming `what`, after `secs`. Waiting on what the caller must see rather than for a
/// fixed time keeps a test independent of how busy the machine is.
async fn talk_until(
    client: &mut VocodeClient,
    clip: &[f32],
    rate: u32,
    secs: u64,
    what: &str,
    done: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut events = talk(client, clip, rate, 0).await;
    while !done(&events) {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        events.extend(talk(client, &[], rate, 100).await);
    }
    events
}

/// Streams `clip` then `tail_ms` of silence in real time, collecting the server's events.
async fn talk(client: &mut VocodeClient, clip: &[f32], rate: u32, tail_ms: u32) -> Vec<Event> {
    let mut all = clip.to_vec();
    all.extend(common::silence(tail_ms, rate));
    client.stream_realtime(&all, 20).await.unwrap();
    drain(client)
}

fn drain(client: &mut VocodeClient) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(e) = client.events.try_recv() {
        events.push(e);
    }
    events
}

fn audio_of(events: &[Event]) -> (Vec<f32>, Option<u32>) {
    let mut out = Vec::new();
    let mut rate = None;
    for e in events {
        if let EventKind::Audio { samples, rate: r } = &e.kind {
            out.extend(samples);
            rate = Some(*r);
        }
    }
    (out, rate)
}

async fn full_turn(rate: u32, encoding: Encoding, wav_header_first: bool) {
    let server = common::start_server(config(REPLY)).await;
    let mut cc = ClientConfig::new(rate, encoding);
    cc.wav_header_first = wav_header_first;
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut clip = common::silence(300, rate);
    clip.extend(common::speech("Hi there, what is the weather like today?", rate).await);
    let events = talk(&mut client, &clip, rate, 9_000).await;

    // Reply audio arrived at the caller's rate, and it is speech.
    let (audio, got_rate) = audio_of(&events);
    assert_eq!(got_rate, Some(rate), "audio at the caller's output rate");
    let secs = audio.len() as f64 / rate as f64;
    assert!(secs > 3.0, "only {secs:.2} s of reply audio");
    let audio16 = resample_all(&audio, rate, 16_000).unwrap();
    let speech = segments(
        &mut common::silero(),
        &audio16,
        16_000,
        TurnSettings::default(),
    )
    .unwrap();
    let voiced: u64 = speech.iter().map(|s| s.end - s.start).sum();
    assert!(
        voiced as f64 / 16_000.0 > 2.0,
        "reply audio is not speech: {speech:?}"
    );

    // The transcript is the reply, unit by unit.
    let transcript: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Transcript { text: t, .. } => Some(t.clone()),
            _ => None,
        })
        .collect();
    assert!(transcript.len() >= 3, "{transcript:?}");
    assert_eq!(
        transcript.join(" "),
        REPLY.split_whitespace().collect::<Vec<_>>().join(" ")
    );

    // Every latency stage was recorded, in order.
    let timeline = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Timeline(t) => Some(t.clone()),
            _ => None,
        })
        .expect("a gazelle_timeline message");
    let stage = |k: &str| {
        timeline[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {timeline}"))
    };
    // The reply's stages come in order. A preemptive reply reaches them before the turn is
    // judged over (vad_end), but no audio leaves before that.
    for (a, b) in [
        ("first_token_ms", "first_unit_ms"),
        ("first_unit_ms", "first_synth_byte_ms"),
        ("first_synth_byte_ms", "first_audio_sent_ms"),
        ("vad_end_ms", "first_audio_sent_ms"),
    ] {
        assert!(stage(a) <= stage(b), "{a} after {b}: {timeline}");
    }
    eprintln!("{rate} Hz {encoding:?}: {timeline}");
    // The end-of-turn silence (500 ms) dominates; our own share must be small. About 40 ms on
    // an idle machine (scripts/bench-calls measures it); the bound leaves room for a busy one.
    let vad_end = timeline["vad_end_ms"].as_f64().unwrap();
    let first_audio = timeline["first_audio_sent_ms"].as_f64().unwrap();
    assert!(
        first_audio - vad_end < 1_000.0,
        "VAD end → first audio took {} ms",
        first_audio - vad_end
    );

    let metrics = http_get(&server, "/metrics").await;
    for stage in [
        "vad_end",
        "first_token",
        "first_unit",
        "first_synth_byte",
        "first_audio_sent",
    ] {
        let needle = format!("gazelle_turn_stage_seconds_count{{stage=\"{stage}\"}} 1");
        assert!(metrics.contains(&needle), "{needle} not in /metrics");
    }
    client.stop().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_turn_linear16_16k() {
    full_turn(16_000, Encoding::Linear16, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_turn_linear16_48k_with_wav_header_on_first_blob() {
    full_turn(48_000, Encoding::Linear16, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_turn_mulaw_8k() {
    full_turn(8_000, Encoding::Mulaw, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_stops_audio_and_keeps_only_what_was_heard() {
    let rate = 16_000;
    let long_reply = "This is a long answer. It goes on for a while so that you can interrupt it. \
                      Here is another sentence about nothing in particular. And one more after \
                      that, with several more words in it. Finally the last one ends the reply.";
    let server = common::start_server(config(long_reply)).await;
    let mut client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(rate, Encoding::Linear16),
    )
    .await
    .unwrap();
    let mut clip = common::silence(300, rate);
    clip.extend(common::speech("Tell me a long story please.", rate).await);
    client.stream_realtime(&clip, 20).await.unwrap();

    // Keep the line open with silence until 1.5 s of reply audio has arrived.
    let mut events = Vec::new();
    let mut first_audio: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    let paced = tokio::time::Instant::now();
    for i in 1.. {
        client.send_audio(&common::silence(20, rate)).await.unwrap();
        tokio::time::sleep_until(paced + Duration::from_millis(20 * i)).await;
        events.extend(drain(&mut client));
        if first_audio.is_none() {
            first_audio = events
                .iter()
                .find(|e| matches!(e.kind, EventKind::Audio { .. }))
                .map(|e| e.at);
        }
        if first_audio.is_some_and(|t| t.elapsed() > Duration::from_millis(1_500)) {
            break;
        }
        assert!(Instant::now() < deadline, "no reply audio");
    }

    // Talk over the bot.
    let interrupt = common::speech("Wait, stop, I have a question.", rate).await;
    let (onset, offset) = common::active_span(&interrupt, 0.01).unwrap();
    let sent = client.stream_realtime(&interrupt, 20).await.unwrap();
    let speech_began = sent[onset / 320];
    let speech_ended = sent[(offset / 320).min(sent.len() - 1)];
    events.extend(drain(&mut client));
    let clear = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Clear {
                reply, spoken_text, ..
            } => Some((e.at, *reply, spoken_text.clone())),
            _ => None,
        })
        .expect("a gazelle_clear message");
    let (cleared_at, cut_reply, spoken) = clear;
    // The clear names the reply whose text the transcript carried.
    let transcript_replies: Vec<u64> = events
        .iter()
        .filter(|e| e.at < cleared_at)
        .filter_map(|e| match &e.kind {
            EventKind::Transcript { reply, .. } => Some(*reply),
            _ => None,
        })
        .collect();
    assert!(
        !transcript_replies.is_empty(),
        "no transcript before the clear"
    );
    assert!(
        transcript_replies.iter().all(|&r| r == cut_reply),
        "transcript replies {transcript_replies:?}, clear names {cut_reply}"
    );
    let delay = cleared_at.saturating_duration_since(speech_began);
    eprintln!("clear {delay:?} after the interrupting speech began; heard {spoken:?}");
    // About 150 ms on an idle machine (min_interruption_ms and one VAD frame); the bound asks
    // that it came while the caller still spoke, with room for a busy machine.
    assert!(
        delay <= Duration::from_millis(1_000),
        "clear came {delay:?} after speech began"
    );
    // No audio of the cut reply after the clear: none until the next reply's first text (the
    // smart turn policy may end the interrupting turn at its own pause, "Wait, stop,"), or
    // until the interrupting speech ended.
    let next_reply = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Transcript { reply, .. } if *reply != cut_reply => Some(e.at),
            _ => None,
        })
        .unwrap_or(speech_ended)
        .min(speech_ended);
    let late = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Audio { .. }))
        .filter(|e| e.at > cleared_at && e.at < next_reply)
        .count();
    assert_eq!(late, 0, "{late} audio messages after the clear");

    // What was heard is a proper prefix of the reply, about as long as the audio played.
    let words: Vec<&str> = long_reply.split_whitespace().collect();
    let heard: Vec<&str> = spoken.split_whitespace().collect();
    assert!(
        !heard.is_empty() && heard.len() < words.len(),
        "heard {heard:?}"
    );
    assert_eq!(heard, words[..heard.len()], "not a prefix");
    let played = cleared_at
        .duration_since(first_audio.unwrap())
        .as_secs_f64();
    // espeak at 175 wpm speaks about 2.9 words a second; allow a wide margin.
    let expected = played * 175.0 / 60.0;
    assert!(
        (heard.len() as f64) < expected * 1.6 + 2.0 && (heard.len() as f64) > expected * 0.4 - 2.0,
        "heard {} words after {played:.2} s of playback",
        heard.len()
    );

    // The history holds only what was heard.
    // Let the interrupting turn end (at most 1.5 s of silence) so it is in the history too.
    client
        .stream_realtime(&common::silence(1_900, rate), 20)
        .await
        .unwrap();
    let history = common::history(&mut client).await;
    let turns = history["turns"].as_array().unwrap();
    assert_eq!(turns[0]["role"], "user");
    assert_eq!(turns[1]["role"], "bot");
    assert_eq!(turns[1]["text"], spoken.as_str());
    assert_eq!(turns[1]["interrupted"], true);
    assert_eq!(
        turns[2]["role"], "user",
        "the interruption is the next user turn: {history}"
    );
    client.stop().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_errors_and_the_call_goes_on() {
    let rate = 16_000;
    let mut c = config("Fine, thanks.");
    c.server.max_frame_bytes = 64 * 1024;
    let server = common::start_server(c).await;

    // Before the config, audio is refused but the socket stays usable.
    let (mut raw, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .unwrap();
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    raw.send(Message::Text(
        r#"{"type":"websocket_audio","data":""}"#.into(),
    ))
    .await
    .unwrap();
    let Some(Ok(Message::Text(t))) = raw.next().await else {
        panic!("no reply")
    };
    assert!(t.contains("not_started"), "{t}");
    drop(raw);

    let mut client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(rate, Encoding::Linear16),
    )
    .await
    .unwrap();
    let big = format!(
        r#"{{"type":"websocket_audio","data":"{}"}}"#,
        "A".repeat(100_000)
    );
    let bad: Vec<(&str, String)> = vec![
        ("bad_json", "{oops".into()),
        ("unknown_type", r#"{"type":"websocket_dance"}"#.into()),
        ("bad_message", r#"{"type":"websocket_audio"}"#.into()),
        ("bad_base64", r#"{"type":"websocket_audio","data":"***"}"#.into()),
        ("frame_too_large", big),
        ("bad_audio", format!(r#"{{"type":"websocket_audio","data":"{}"}}"#, "UklGRgAAAABXQVZFZm10IBAAAAABAAEA")),
        (
            "already_started",
            r#"{"type":"websocket_audio_config_start","input_audio_config":{"sampling_rate":16000,"audio_encoding":"linear16"},"output_audio_config":{"sampling_rate":16000,"audio_encoding":"linear16"}}"#.into(),
        ),
    ];
    for (_, msg) in &bad {
        client.send_text(msg).await.unwrap();
    }
    client.send_binary(vec![1, 2, 3]).await.unwrap();
    let mut want: Vec<String> = bad.iter().map(|(k, _)| k.to_string()).collect();
    want.push("binary_frame".into());
    let errors = |events: &[Event]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Error { kind, .. } => Some(kind.clone()),
                _ => None,
            })
            .collect()
    };
    let events = talk_until(&mut client, &[], rate, 5, "an error per bad message", |e| {
        errors(e).len() >= want.len()
    })
    .await;
    assert_eq!(errors(&events), want);

    // The call still hears and answers.
    let mut clip = common::silence(300, rate);
    clip.extend(common::speech("How are you doing?", rate).await);
    talk_until(
        &mut client,
        &clip,
        rate,
        10,
        "a reply after bad input",
        |events| {
            events.iter().any(
            |e| matches!(&e.kind, EventKind::Transcript { text: t, .. } if t == "Fine, thanks."),
        )
        },
    )
    .await;
    let metrics = http_get(&server, "/metrics").await;
    assert!(
        metrics.contains("gazelle_errors_total{kind=\"bad_json\"} 1"),
        "{metrics}"
    );
    client.stop().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_or_hangup_ends_the_call_and_limits_are_enforced() {
    let mut c = config("Hi.");
    c.server.max_calls = 1;
    let server = common::start_server(c).await;
    let health = http_get(&server, "/health").await;
    assert!(health.contains("\"status\":\"ok\""), "{health}");

    let client = VocodeClient::connect(
        &server.ws_url(),
        ClientConfig::new(16_000, Encoding::Linear16),
    )
    .await
    .unwrap();
    wait_for_active(&server, 1).await;
    // A second caller is refused while the only slot is taken.
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    let err = refused
        .expect_err("second call must be refused")
        .to_string();
    assert!(err.contains("503"), "{err}");
    client.stop().await.unwrap();
    wait_for_active(&server, 0).await;

    // Dropping the socket without a stop message ends the call as well.
    let client = VocodeClient::connect(&server.ws_url(), ClientConfig::new(8_000, Encoding::Mulaw))
        .await
        .unwrap();
    wait_for_active(&server, 1).await;
    drop(client);
    wait_for_active(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_message_is_spoken_at_call_start() {
    let server = common::start_server(config("unused")).await;
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.first_message = Some("Welcome to the line.".into());
    cc.system_prompt = Some("Be brief.".into());
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    talk_until(&mut client, &[], 16_000, 10, "the first message", |events| {
        audio_of(events).0.len() > 16_000 / 2
            && events.iter().any(|e| {
                matches!(&e.kind, EventKind::Transcript { text: t, .. } if t == "Welcome to the line.")
            })
    })
    .await;
    // The greeting joins the history once it has played out.
    let history = common::history_until(&mut client, 10, |h| h["turns"][0].is_object()).await;
    assert_eq!(history["system_prompt"], "Be brief.");
    assert_eq!(history["turns"][0]["text"], "Welcome to the line.");
    client.stop().await.unwrap();
    server.shutdown().await;
}

async fn wait_for_active(server: &common::TestServer, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.state.services.metrics.active_calls.get() != n {
        assert!(
            Instant::now() < deadline,
            "active calls stuck at {}",
            server.state.services.metrics.active_calls.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.0 GET, so the tests need no HTTP client crate.
async fn http_get(server: &common::TestServer, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

/// A recorded clip from tests/fixtures/smart-turn (16 kHz), cut to its speech.
fn recorded(name: &str) -> Vec<f32> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smart-turn")
        .join(name);
    let wav = gazelle::audio::wav::read(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(wav.sample_rate, 16_000);
    let (start, end) = speech_span(&wav.samples, 16_000).unwrap();
    wav.samples[start..end].to_vec()
}

/// Streams 300 ms of silence, `speech`, then `tail_ms` of silence in real time. Returns the
/// events and when the last sample of speech was sent.
async fn say(client: &mut VocodeClient, speech: &[f32], tail_ms: u32) -> (Vec<Event>, Instant) {
    let lead = common::silence(300, 16_000);
    let mut all = lead.clone();
    all.extend_from_slice(speech);
    let sent = Instant::now();
    let events = talk(client, &all, 16_000, tail_ms).await;
    let true_end = sent + Duration::from_secs_f64(all.len() as f64 / 16_000.0);
    (events, true_end)
}

/// Bot audio that starts this long before the end of the speech (by loudness) cut the speaker
/// off; within it, it overlaps the fading last sound of a finished utterance.
const CUT_OFF_MS: f64 = 250.0;

/// `a - b` in milliseconds, negative when `a` came first.
fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1e3
    } else {
        -(b - a).as_secs_f64() * 1e3
    }
}

fn first_audio(events: &[Event]) -> Option<Instant> {
    events
        .iter()
        .find(|e| matches!(e.kind, EventKind::Audio { .. }))
        .map(|e| e.at)
}

/// Recorded finished utterances, each a complete turn, are answered at their pause, without the
/// wait a merely likely end gets: the first bot audio comes under 1 s after the true end of
/// speech (median of three; the end by loudness, `gazelle::audio::level`), under the default
/// smart turn policy with preemptive replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_utterance_is_answered_at_its_pause() {
    let server = common::start_server(smart("Sure.")).await;
    let mut dead_air = Vec::new();
    // Finished utterances with no pause inside them (a prompt like "Please enter your password
    // ... followed by the pound key" can be judged finished at its inner pause).
    for name in ["vm-savefolder.wav", "goforward.wav", "sense-0870-full.wav"] {
        let cc = ClientConfig::new(16_000, Encoding::Linear16);
        let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
        let (events, true_end) = say(&mut client, &recorded(name), 2_000).await;
        let first = first_audio(&events).unwrap_or_else(|| panic!("{name}: no reply"));
        let ms = signed_ms(first, true_end);
        assert!(
            ms > -CUT_OFF_MS,
            "{name}: the bot spoke {ms:.0} ms before the end"
        );
        eprintln!("{name}: first audio {ms:.0} ms after the end of speech");
        dead_air.push(ms);
        client.stop().await.unwrap();
    }
    dead_air.sort_by(f64::total_cmp);
    let eot = common::metric(&server, "gazelle_end_of_turn_seconds_sum").await
        / common::metric(&server, "gazelle_end_of_turn_seconds_count").await;
    eprintln!("end-of-turn inference {:.1} ms on average", eot * 1e3);
    // The decision, not the speed: a turn judged complete at its pause is answered within a few
    // hundred milliseconds (280 ms median on an idle machine; scripts/bench-turns measures it),
    // one only judged likely waits likely_silence_ms (1.1 s) first. The bound tells them apart
    // with room for a busy machine.
    assert!(dead_air[1] < 1_000.0, "median dead air {dead_air:?} ms");
    server.shutdown().await;
}

/// The end-of-turn model is asked about every turn of a call, not only the first. A turn ended
/// by its "complete" verdict left the count of pauses asked about at one, so the next turn's
/// pause went unjudged and waited the full `max_silence_ms` (1.5 s) every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_turn_of_a_call_is_judged_at_its_pause() {
    let server = common::start_server(smart("Sure.")).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut dead_air = Vec::new();
    // The same finished utterance three times: it scores far above the confident threshold,
    // as it is (others, trimmed to their speech, can fall in the "likely" band).
    for name in ["goforward.wav"; 3] {
        let (events, true_end) = say(&mut client, &recorded(name), 2_000).await;
        let first = first_audio(&events).unwrap_or_else(|| panic!("{name}: no reply"));
        dead_air.push(signed_ms(first, true_end));
    }
    let complete = common::metric(
        &server,
        "gazelle_end_of_turn_decisions_total{decision=\"complete\"}",
    )
    .await;
    assert_eq!(
        complete, 3.0,
        "verdicts for 3 turns; dead air {dead_air:?} ms"
    );
    // Answered at their pauses, not at max_silence_ms (the median, as in the test above).
    let mut sorted = dead_air.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted[1] < 1_000.0, "dead air {dead_air:?} ms");
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// "Unless to be rather cold hearted and" … 700 ms … "go forward ten meters": the model judges
/// the pause incomplete, so no bot audio comes before the speaker's true end (up to the fading
/// last sound, `CUT_OFF_MS`). The reply started
/// preemptively at the pause is discarded unheard: the history holds one user turn (the whole
/// utterance) and one reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mid_sentence_pause_is_not_a_turn_end_and_leaves_no_trace() {
    let server = common::start_server(smart("Sure.")).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let head = recorded("sense-0890-cut.wav");
    let tail = recorded("goforward.wav");
    let mut speech = head.clone();
    speech.extend(common::silence(700, 16_000));
    speech.extend_from_slice(&tail);
    let (events, true_end) = say(&mut client, &speech, 2_500).await;
    let first = first_audio(&events).expect("a reply");
    let ms = signed_ms(first, true_end);
    assert!(ms > -CUT_OFF_MS, "bot audio {ms:.0} ms after the true end");
    let history = common::history_until(&mut client, 10, |h| {
        h["turns"].as_array().is_some_and(|t| t.len() >= 2)
    })
    .await;
    let turns = history["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{history}");
    assert_eq!(turns[0]["role"], "user");
    // Both parts are in it (the VAD's edges differ from the loudness span by a few frames).
    let heard_ms = turns[0]["duration_ms"].as_f64().unwrap();
    let spoken_ms = speech.len() as f64 / 16.0;
    assert!(
        (heard_ms - spoken_ms).abs() < 300.0,
        "the turn holds {heard_ms} ms of the {spoken_ms} ms utterance"
    );
    assert_eq!(turns[1]["role"], "bot");
    assert_eq!(turns[1]["text"], "Sure.");
    let discarded = common::metric(
        &server,
        "gazelle_preemptive_replies_total{outcome=\"discarded\"}",
    )
    .await;
    assert!(discarded >= 1.0, "no preemptive reply was discarded");
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// A short sound over the bot, 1.5 s into its reply: the first 300 ms of a recorded word
/// (Asterisk's "agent-pass"), which the VAD takes for speech as it would a cough or an "uh-huh",
/// but shorter than `false_interruption_ms`. The reply is paused (a `gazelle_clear` with
/// `paused`), then plays on from where it stopped; it is never cut, the sound is not answered,
/// and the history holds the whole reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sound_over_the_bot_pauses_the_reply_and_it_resumes() {
    let rate = 16_000;
    let reply = "This is a reply that takes a few seconds to say. It goes on after the \
                 sound and ends here.";
    let server = common::start_server(config(reply)).await;
    let cc = ClientConfig::new(rate, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let mut clip = common::silence(300, rate);
    clip.extend(common::speech("Tell me something please.", rate).await);
    client.stream_realtime(&clip, 20).await.unwrap();
    // Silence until 1.5 s of reply audio has arrived.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let paced = tokio::time::Instant::now();
    for i in 1.. {
        client.send_audio(&common::silence(20, rate)).await.unwrap();
        tokio::time::sleep_until(paced + Duration::from_millis(20 * i)).await;
        events.extend(drain(&mut client));
        if first_audio(&events).is_some_and(|t| t.elapsed() > Duration::from_millis(1_500)) {
            break;
        }
        assert!(Instant::now() < deadline, "no reply audio");
    }
    let word = recorded("agent-pass.wav");
    let mut sound = word[..rate as usize * 3 / 10].to_vec();
    let fade = rate as usize / 50;
    let n = sound.len();
    for (k, x) in sound[n - fade..].iter_mut().enumerate() {
        *x *= 1.0 - k as f32 / fade as f32;
    }
    let sent = client.stream_realtime(&sound, 20).await.unwrap();
    let sound_began = sent[0];
    // Then silence while the reply plays out.
    let rest = talk(&mut client, &[], rate, 6_000).await;
    events.extend(rest);
    let clears: Vec<(Instant, bool)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Clear { paused, .. } => Some((e.at, *paused)),
            _ => None,
        })
        .collect();
    assert_eq!(clears.len(), 1, "one clear, a pause: {clears:?}");
    let (paused_at, paused) = clears[0];
    assert!(paused, "the sound paused the reply rather than cutting it");
    let delay = paused_at.saturating_duration_since(sound_began);
    // About 150 ms on an idle machine; the bound leaves room for a busy one.
    assert!(
        delay <= Duration::from_millis(1_000),
        "paused {delay:?} after the sound began"
    );
    let after: usize = events
        .iter()
        .filter(|e| e.at > paused_at)
        .filter_map(|e| match &e.kind {
            EventKind::Audio { samples, .. } => Some(samples.len()),
            _ => None,
        })
        .sum();
    assert!(
        after > rate as usize,
        "only {after} samples of the reply after the pause"
    );
    let resumed =
        common::metric(&server, "gazelle_paused_replies_total{outcome=\"resumed\"}").await;
    assert_eq!(resumed, 1.0);
    let history = common::history_until(&mut client, 10, |h| {
        h["turns"].as_array().is_some_and(|t| t.len() >= 2)
    })
    .await;
    let turns = history["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "the sound is no turn: {history}");
    assert_eq!(turns[1]["role"], "bot");
    assert_eq!(
        turns[1]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        reply.split_whitespace().collect::<Vec<_>>()
    );
    assert_eq!(turns[1]["interrupted"], false);
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// A `gazelle serve` process on a free port with `config` (TOML); its address, from the line it
/// prints.
async fn spawn_server(
    config: &str,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    tempfile::TempDir,
) {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gazelle.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gazelle"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("gazelle listening on http://") {
                return a.trim().parse().unwrap();
            }
        }
        panic!("the server exited before listening")
    })
    .await
    .expect("the server listens within 60 s");
    // Keep reading so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr, dir)
}

/// A plain HTTP GET: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Streams silence to the call until `until` holds or `max_ms` passes; the events meanwhile.
async fn listen(
    client: &mut VocodeClient,
    max_ms: u64,
    until: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    let paced = tokio::time::Instant::now();
    for i in 1..=(max_ms / 20) {
        events.extend(drain(client));
        if until(&events) {
            break;
        }
        if client
            .send_audio(&common::silence(20, 16_000))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep_until(paced + Duration::from_millis(20 * i)).await;
    }
    events
}

/// SIGTERM with a live call: `/health` answers 503 `draining`, a new call is refused with 503,
/// the live call's reply plays out whole, and once the caller hangs up the process exits 0.
/// Then with a short drain timeout and a goodbye: the call still live when it runs out hears the
/// goodbye and is ended by the server, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_calls_then_exits_0() {
    let reply = "Sure. Here is a reply that takes a few seconds to say out loud.";
    let base = format!("[slm]\nreply = \"{reply}\"\ntoken_delay_ms = 5\n[server]\nport = 0\n");
    // A drain that waits for the call.
    let (mut child, addr, _dir) = spawn_server(&format!("{base}drain_timeout_ms = 20000\n")).await;
    let url = format!("ws://{addr}/conversation");
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&url, cc.clone()).await.unwrap();
    let mut clip = common::silence(300, 16_000);
    clip.extend(common::speech("Tell me something.", 16_000).await);
    client.stream_realtime(&clip, 20).await.unwrap();
    let mut events = listen(&mut client, 5_000, |e| {
        e.iter().any(|e| matches!(e.kind, EventKind::Audio { .. }))
    })
    .await;
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = get(addr, "/health").await;
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "draining");
    assert_eq!(health["active_calls"], 1);
    let refused = VocodeClient::connect(&url, cc.clone()).await;
    let e = refused.err().expect("a new call is refused").to_string();
    assert!(e.contains("503"), "{e}");
    events.extend(listen(&mut client, 8_000, |e| common::transcript(e) == reply).await);
    // Let the last unit play out, then hang up.
    events.extend(listen(&mut client, 1_500, |_| false).await);
    assert_eq!(common::transcript(&events), reply);
    assert!(!events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Clear { .. })));
    let history = common::history_until(&mut client, 10, |h| h["turns"][1].is_object()).await;
    assert_eq!(history["turns"][1]["text"], reply, "{history}");
    client.stop().await.unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let status = exited.expect("exits once the call ends").unwrap();
    assert!(status.success(), "{status}");

    // A drain that runs out: the live call hears the goodbye and is ended.
    let config = format!("{base}drain_timeout_ms = 1000\ndrain_goodbye = \"Goodbye for now.\"\n");
    let (mut child, addr, _dir) = spawn_server(&config).await;
    let url = format!("ws://{addr}/conversation");
    let mut client = VocodeClient::connect(&url, cc).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&child);
    let events = listen(&mut client, 8_000, |e| {
        e.iter()
            .any(|e| matches!(e.kind, EventKind::Stop | EventKind::Closed { .. }))
    })
    .await;
    assert_eq!(common::transcript(&events), "Goodbye for now.");
    let exited = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let status = exited.expect("exits after the goodbye").unwrap();
    assert!(status.success(), "{status}");
}

/// A loopback OTLP/HTTP receiver: decodes each `POST /v1/traces` body (protobuf) and keeps the
/// spans, with their resources' `service.name`.
async fn otlp_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    type Spans = std::sync::Arc<
        std::sync::Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>,
    >;
    let spans: Spans = Default::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| format!("{:?}", a.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            kept.lock().unwrap().push((service.clone(), s));
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, spans)
}

fn attr(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        Some(match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => s.clone(),
            Value::BoolValue(b) => b.to_string(),
            Value::IntValue(i) => i.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    })
}

/// A two-turn call on a server exporting traces to a loopback OTLP/HTTP receiver: the call's
/// span joins the trace of the upgrade request's `traceparent`; each turn has a span under it,
/// with the call's attributes, its stage latencies and a child span per stage whose length is
/// that latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_turn_call_exports_its_spans_over_otlp() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";
    let (receiver, spans) = otlp_receiver().await;
    let config = format!(
        "[slm]\nreply = \"Sure, here you go.\"\n[server]\nport = 0\n[telemetry]\n\
         otlp_endpoint = \"http://{receiver}\"\n"
    );
    let (mut child, addr, _dir) = spawn_server(&config).await;
    let mut cc = ClientConfig::new(16_000, Encoding::Linear16);
    cc.headers = vec![("traceparent".into(), format!("00-{TRACE}-{PARENT}-01"))];
    cc.conversation_id = Some("traced-call".into());
    let mut client = VocodeClient::connect(&format!("ws://{addr}/conversation"), cc)
        .await
        .unwrap();
    for question in [
        "What is the weather like today?",
        "And what about tomorrow?",
    ] {
        let mut clip = common::silence(300, 16_000);
        clip.extend(common::speech(question, 16_000).await);
        client.stream_realtime(&clip, 20).await.unwrap();
        let events = listen(&mut client, 6_000, |e| {
            common::transcript(e).contains("go.")
        })
        .await;
        assert!(
            common::transcript(&events).contains("go."),
            "no reply to {question:?}"
        );
        // Let it play out.
        let _ = listen(&mut client, 2_500, |_| false).await;
    }
    client.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigterm(&child);
    let exited = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    assert!(exited.expect("exits").unwrap().success());
    let spans = spans.lock().unwrap().clone();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let call = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.name == "call")
        .expect("a call span");
    assert!(
        spans.iter().all(|(svc, _)| svc.contains("gazelle")),
        "service.name"
    );
    assert_eq!(
        hex(&call.trace_id),
        TRACE,
        "the call joins the caller's trace"
    );
    assert_eq!(hex(&call.parent_span_id), PARENT);
    assert_eq!(
        attr(call, "gazelle.call.id").as_deref(),
        Some("traced-call")
    );
    assert_eq!(attr(call, "gazelle.transport").as_deref(), Some("vocode"));
    let turns: Vec<_> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "turn")
        .collect();
    assert_eq!(turns.len(), 2, "one span per turn");
    // The stage names of `gazelle_timeline` (less `_ms`) and of the metric's labels.
    let stages = [
        "vad_end",
        "first_token",
        "first_unit",
        "first_synth_byte",
        "first_audio_sent",
    ];
    for turn in turns {
        assert_eq!(
            turn.parent_span_id, call.span_id,
            "a turn is a child of its call"
        );
        assert_eq!(turn.trace_id, call.trace_id);
        assert_eq!(
            attr(turn, "gazelle.call.id").as_deref(),
            Some("traced-call")
        );
        assert_eq!(attr(turn, "gazelle.model").as_deref(), Some("scripted"));
        assert_eq!(attr(turn, "gazelle.voice").as_deref(), Some("espeak"));
        assert_eq!(attr(turn, "gazelle.barge_in").as_deref(), Some("false"));
        for stage in stages {
            let ms: f64 = attr(turn, &format!("gazelle.{stage}_ms"))
                .unwrap_or_else(|| panic!("{stage} latency on the turn"))
                .parse()
                .unwrap();
            let child = spans
                .iter()
                .map(|(_, s)| s)
                .find(|s| s.name == stage && s.parent_span_id == turn.span_id)
                .unwrap_or_else(|| panic!("a {stage} span under the turn"));
            let length = (child.end_time_unix_nano - child.start_time_unix_nano) as f64 / 1e6;
            assert!(
                (length - ms.max(0.0)).abs() < 1.0,
                "{stage}: {length} ms span, {ms} ms latency"
            );
            assert!(child.start_time_unix_nano >= turn.start_time_unix_nano);
            assert!(child.end_time_unix_nano <= turn.end_time_unix_nano + 1_000_000);
        }
    }
}
