//! Phone calls through Twilio Media Streams against the real server on loopback. The simulated
//! caller follows Twilio's documented protocol: `connected`, `start`, 20 ms µ-law `media` frames
//! in real time; it plays what it receives in real time, echoes each mark when playback reaches
//! it, and empties its buffer on `clear` (echoing the marks it drops, as Twilio does).

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use gazelle::audio::{mulaw, resample::resample_all};
use gazelle::config::Config;
use gazelle::model::scripted::ScriptedModel;
use gazelle::pipeline::sentence::{SentenceAccumulator, SentenceSettings};
use gazelle::transport::twilio::protocol;
use gazelle::vad::{offline::segments, TurnSettings};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const RATE: u32 = 8_000;
const FRAME: usize = 160; // 20 ms at 8 kHz

#[derive(Debug, Clone)]
enum Log {
    Media {
        bytes: Vec<u8>,
        at: Instant,
    },
    MarkReceived(String),
    MarkPlayed(String),
    /// `played`: samples of bot audio the phone had played when the clear came.
    Clear {
        at: Instant,
        played: usize,
    },
}

enum Queued {
    Audio(Vec<u8>),
    Mark(String),
}

struct Caller {
    out: mpsc::UnboundedSender<String>,
    log: Arc<Mutex<Vec<Log>>>,
    seq: u64,
}

impl Caller {
    /// Places a call as Twilio does: the voice webhook first (with `params` in its query, as a
    /// number's webhook URL would carry them), then the media stream with the `<Parameter>`s of
    /// the TwiML it answered, the per-call stream token among them.
    async fn dial(server: &common::TestServer, call_sid: &str, params: &[(&str, &str)]) -> Self {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let (status, twiml) = common::http(
            server,
            "POST",
            &format!("/twilio/voice?{query}"),
            &[("Content-Type", "application/x-www-form-urlencoded")],
            &format!("CallSid={call_sid}"),
        )
        .await;
        assert_eq!(status, 200, "{twiml}");
        let custom = common::twiml_parameters(&twiml);
        assert!(custom.contains_key(protocol_token()), "{twiml}");
        let url = format!("ws://{}/twilio/stream", server.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(Message::Text(m.into())).await.is_err() {
                    return;
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        // The phone: plays 20 ms every 20 ms and echoes marks as playback reaches them.
        let (lg, echo) = (log.clone(), out.clone());
        tokio::spawn(async move {
            let mut buffer: VecDeque<Queued> = VecDeque::new();
            let mut played = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let echo_mark = |name: &str| {
                let m = serde_json::json!({"event":"mark","streamSid":"MZ1","mark":{"name":name}});
                let _ = echo.send(m.to_string());
            };
            loop {
                tokio::select! {
                    msg = stream.next() => {
                        let Some(Ok(Message::Text(t))) = msg else { return };
                        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                        let now = Instant::now();
                        match v["event"].as_str().unwrap() {
                            "media" => {
                                assert_eq!(v["streamSid"], "MZ1");
                                let b = base64::engine::general_purpose::STANDARD
                                    .decode(v["media"]["payload"].as_str().unwrap())
                                    .unwrap();
                                assert!(!b.starts_with(b"RIFF"), "media must have no file header");
                                lg.lock().unwrap().push(Log::Media { bytes: b.clone(), at: now });
                                buffer.push_back(Queued::Audio(b));
                            }
                            "mark" => {
                                let name = v["mark"]["name"].as_str().unwrap().to_string();
                                lg.lock().unwrap().push(Log::MarkReceived(name.clone()));
                                buffer.push_back(Queued::Mark(name));
                            }
                            "clear" => {
                                lg.lock().unwrap().push(Log::Clear { at: now, played });
                                for q in buffer.drain(..) {
                                    if let Queued::Mark(name) = q {
                                        echo_mark(&name);
                                    }
                                }
                            }
                            other => panic!("unexpected event from the server: {other}"),
                        }
                    }
                    _ = tick.tick() => {
                        let mut left = FRAME;
                        while let Some(front) = buffer.front_mut() {
                            match front {
                                Queued::Mark(name) => {
                                    let name = name.clone();
                                    buffer.pop_front();
                                    echo_mark(&name);
                                    lg.lock().unwrap().push(Log::MarkPlayed(name));
                                }
                                Queued::Audio(b) if left == 0 => { let _ = b; break; }
                                Queued::Audio(b) => {
                                    let take = left.min(b.len());
                                    b.drain(..take);
                                    left -= take;
                                    played += take;
                                    if b.is_empty() {
                                        buffer.pop_front();
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
        let connected =
            serde_json::json!({"event":"connected","protocol":"Call","version":"1.0.0"});
        let start = serde_json::json!({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
            "start": {
                "streamSid": "MZ1", "accountSid": "AC1", "callSid": call_sid,
                "tracks": ["inbound"], "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
            }
        });
        out.send(connected.to_string()).unwrap();
        out.send(start.to_string()).unwrap();
        Caller { out, log, seq: 1 }
    }

    fn send_raw(&self, text: &str) {
        self.out.send(text.to_string()).unwrap();
    }

    /// Streams `samples` as 20 ms µ-law media frames in real time; returns each frame's send time.
    async fn talk(&mut self, samples: &[f32]) -> Vec<Instant> {
        let start = tokio::time::Instant::now();
        let mut sent = Vec::new();
        for (i, frame) in samples.chunks(FRAME).enumerate() {
            tokio::time::sleep_until(start + Duration::from_millis(20 * i as u64)).await;
            self.seq += 1;
            let payload =
                base64::engine::general_purpose::STANDARD.encode(mulaw::encode_from_f32(frame));
            let m = serde_json::json!({
                "event": "media", "sequenceNumber": self.seq.to_string(), "streamSid": "MZ1",
                "media": {"track": "inbound", "chunk": i.to_string(),
                          "timestamp": (i * 20).to_string(), "payload": payload}
            });
            self.send_raw(&m.to_string());
            sent.push(Instant::now());
        }
        sent
    }

    async fn silence(&mut self, ms: u32) {
        self.talk(&common::silence(ms, RATE)).await;
    }

    /// Streams silence in 100 ms steps until `done` holds for the log; panics, naming `what`,
    /// after `secs`. Waiting on what the caller must see, not for a fixed time, keeps a test
    /// independent of how busy the machine is.
    async fn silence_until(&mut self, secs: u64, what: &str, done: impl Fn(&[Log]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(&self.log()) {
            assert!(Instant::now() < deadline, "{what} within {secs} s");
            self.silence(100).await;
        }
    }

    fn log(&self) -> Vec<Log> {
        self.log.lock().unwrap().clone()
    }

    fn hang_up(&self) {
        self.send_raw(r#"{"event":"stop","sequenceNumber":"999","streamSid":"MZ1","stop":{}}"#);
    }
}

fn protocol_token() -> &'static str {
    gazelle::transport::twilio::handler::STREAM_TOKEN
}

/// The silence policy: these tests are about the phone line, not turn-taking, and under the
/// smart policy where a turn ends depends on the end-of-turn model's score of espeak-ng speech
/// (0.2–0.7, around its 0.5 line, and the int8 kernels move it) and on how soon it comes.
fn config(reply: &str) -> Config {
    let mut c = Config::default();
    c.slm.reply = reply.into();
    c.slm.token_delay_ms = 5;
    c.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    c
}

/// The text units the server will speak for a scripted reply.
fn units_of(reply: &str) -> Vec<String> {
    let mut acc = SentenceAccumulator::new(SentenceSettings::default());
    let model = ScriptedModel::new(reply, Duration::ZERO);
    let mut units: Vec<String> = model.tokens().iter().flat_map(|t| acc.push(t)).collect();
    units.extend(acc.finish());
    units
}

async fn history(server: &common::TestServer, call_sid: &str) -> serde_json::Value {
    let bearer = format!("Bearer {}", common::ADMIN_TOKEN);
    let (status, body) = common::http(
        server,
        "GET",
        &format!("/calls/{call_sid}/history"),
        &[("Authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_phone_turn_with_marks() {
    let reply = "Hello caller. This is the gazelle phone line. Goodbye for now.";
    let server = common::start_server_with(config(reply), common::with_admin).await;
    let mut caller = Caller::dial(&server, "CA100", &[("system_prompt", "Be brief.")]).await;
    let mut clip = common::silence(300, RATE);
    clip.extend(common::speech("Hello, is anybody there?", RATE).await);
    caller.talk(&clip).await;
    let units = units_of(reply);
    let last_end = units.len() - 1;
    caller
        .silence_until(20, "the reply's last end mark played", |log| {
            log.iter().any(|l| {
                matches!(l, Log::MarkPlayed(n)
                    if matches!(protocol::parse_mark_name(n), Some((_, u, None)) if u == last_end))
            })
        })
        .await;

    let log = caller.log();
    let audio: Vec<f32> = log
        .iter()
        .filter_map(|l| match l {
            Log::Media { bytes, .. } => Some(mulaw::decode_to_f32(bytes)),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(
        audio.len() as f32 / RATE as f32 > 2.0,
        "only {} samples of reply",
        audio.len()
    );
    assert!(log
        .iter()
        .all(|l| !matches!(l, Log::Media { bytes, .. } if bytes.len() > FRAME)));
    let a16 = resample_all(&audio, RATE, 16_000).unwrap();
    let voiced = segments(&mut common::silero(), &a16, 16_000, TurnSettings::default()).unwrap();
    assert!(!voiced.is_empty(), "the reply is not speech");
    let played: Vec<String> = log
        .iter()
        .filter_map(|l| match l {
            Log::MarkPlayed(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    // The reply's number (a reply started preemptively at a pause and taken back used one).
    let reply_id = log
        .iter()
        .find_map(|l| match l {
            Log::MarkReceived(name) => protocol::parse_mark_name(name).map(|(r, _, _)| r),
            _ => None,
        })
        .expect("marks");
    let want: Vec<String> = (0..units.len())
        .map(|u| protocol::mark_name(reply_id, u, None))
        .collect();
    let sent: Vec<String> = log
        .iter()
        .filter_map(|l| match l {
            Log::MarkReceived(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    let unit_ends = |names: &[String]| -> Vec<String> {
        names
            .iter()
            .filter(|n| matches!(protocol::parse_mark_name(n), Some((_, _, None))))
            .cloned()
            .collect()
    };
    assert_eq!(unit_ends(&sent), want, "one mark after each unit, in order");
    assert_eq!(played, sent, "every mark echoed once played, in order");
    // Marks inside the units too, every 250 ms of audio (not at a unit's end), in order.
    let inside: Vec<(usize, u64)> = sent
        .iter()
        .filter_map(|n| match protocol::parse_mark_name(n) {
            Some((_, u, Some(s))) => Some((u, s)),
            _ => None,
        })
        .collect();
    let secs = audio.len() as f32 / RATE as f32;
    assert!(
        inside.len() as f32 >= secs * 4.0 - 2.0 * units.len() as f32,
        "{} marks inside units over {secs:.1} s",
        inside.len()
    );
    assert!(inside.windows(2).all(|w| w[0] < w[1]), "{inside:?}");

    let h = history(&server, "CA100").await;
    assert_eq!(h["system_prompt"], "Be brief.");
    assert_eq!(h["turns"][0]["role"], "user");
    assert_eq!(h["turns"][1]["text"], units.join(" "));
    assert_eq!(h["turns"][1]["interrupted"], false);
    caller.hang_up();
    server.shutdown().await;
}

/// How many of `unit`'s words had played after `played` samples of it at 8 kHz: the longest
/// prefix of its words whose own espeak-ng rendering (the server's voice) is no longer.
async fn words_played(unit: &str, played: usize) -> usize {
    let voice = common::espeak();
    let to_8k = RATE as f64 / voice.sample_rate() as f64;
    let words: Vec<&str> = unit.split_whitespace().collect();
    let mut k = 0;
    for n in 1..=words.len() {
        let prefix = voice.speak(&words[..n].join(" ")).await.unwrap().len() as f64 * to_8k;
        if prefix <= played as f64 {
            k = n;
        } else {
            break;
        }
    }
    k
}

/// A barge-in mid-sentence: Twilio is cleared at once, and the history keeps the words the
/// caller heard, within one, from the marks the phone echoed (one every 250 ms of audio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_clears_twilio_and_keeps_only_marked_text() {
    let reply = "Thanks for calling. Our store opens at nine in the morning. It closes at six \
                 in the evening. We are closed on public holidays. Is there anything else?";
    let units = units_of(reply);
    let server = common::start_server_with(config(reply), common::with_admin).await;
    let mut caller = Caller::dial(&server, "CA200", &[]).await;
    let mut clip = common::silence(300, RATE);
    clip.extend(common::speech("When are you open?", RATE).await);
    caller.talk(&clip).await;
    // Listen until 2.5 s of the reply has played.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        caller.silence(100).await;
        let first = caller.log().iter().find_map(|l| match l {
            Log::Media { at, .. } => Some(*at),
            _ => None,
        });
        if first.is_some_and(|t| t.elapsed() > Duration::from_millis(2_500)) {
            break;
        }
        assert!(Instant::now() < deadline, "no reply audio");
    }
    // No comma: a pause inside it could end the turn there (smart turn policy) and start the
    // next reply within the window checked below.
    let interrupt = common::speech("I have one more question", RATE).await;
    let (onset, _) = common::active_span(&interrupt, 0.01).unwrap();
    let sent = caller.talk(&interrupt).await;
    let speech_began = sent[onset / FRAME];
    // Past [pipeline.turn] max_silence_ms (1.5 s): the interrupting turn has ended.
    caller.silence(2_000).await;

    let log = caller.log();
    let cleared = log
        .iter()
        .find_map(|l| match l {
            Log::Clear { at, .. } => Some(*at),
            _ => None,
        })
        .expect("a clear event");
    let delay = cleared.saturating_duration_since(speech_began);
    eprintln!("clear {delay:?} after the interrupting speech began");
    // min_interruption_ms (120) and a 32 ms VAD frame make it about 150 ms on an idle machine
    // (scripts/bench-calls measures it); the bound only asks that it came while the caller was
    // still speaking, with room for a busy machine.
    assert!(
        delay <= Duration::from_millis(1_000),
        "clear came {delay:?} after speech began"
    );
    // What the caller really heard: the audio the phone had played at the clear, laid over
    // the units (each ends where its end mark sits in the stream); in the unit it was cut in,
    // the words whose own audio fits in the part that played.
    let played = log
        .iter()
        .find_map(|l| match l {
            Log::Clear { played, .. } => Some(*played),
            _ => None,
        })
        .unwrap();
    // The unit being played at the clear starts after the last end mark before that point.
    let (mut unit_start, mut received, mut unit) = (0usize, 0usize, 0usize);
    for l in &log {
        match l {
            Log::Media { bytes, .. } => received += bytes.len(),
            Log::MarkReceived(name) => {
                if let Some((_, u, None)) = protocol::parse_mark_name(name) {
                    if received > played {
                        break;
                    }
                    (unit_start, unit) = (received, u + 1);
                }
            }
            _ => {}
        }
    }
    assert!(
        unit < units.len(),
        "the clear came after the reply had played"
    );
    let before: usize = units[..unit]
        .iter()
        .map(|t| t.split_whitespace().count())
        .sum();
    let truth = before + words_played(&units[unit], played - unit_start).await;
    // No audio of the cut reply after the clear until the caller's new turn is answered.
    let late = log
        .iter()
        .filter(|l| matches!(l, Log::Media { at, .. } if *at > cleared && *at < cleared + Duration::from_millis(600)))
        .count();
    assert_eq!(late, 0, "{late} media frames after clear");

    let h = history(&server, "CA200").await;
    let bot = &h["turns"][1];
    assert_eq!(bot["interrupted"], true);
    let kept: Vec<&str> = bot["text"].as_str().unwrap().split_whitespace().collect();
    let all: Vec<&str> = reply.split_whitespace().collect();
    assert_eq!(
        kept,
        all[..kept.len()],
        "the history holds a prefix of the reply"
    );
    eprintln!(
        "heard {truth} words; the history keeps {}: {kept:?}",
        kept.len()
    );
    assert!(
        kept.len().abs_diff(truth) <= 1,
        "the history keeps {} words, the caller heard {truth}",
        kept.len()
    );
    assert_eq!(h["turns"][2]["role"], "user");
    caller.hang_up();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_logged_and_the_call_survives() {
    let server = common::start_server(config("Still here.")).await;
    let url = format!("ws://{}/twilio/stream", server.addr);
    let mut caller = Caller::dial(&server, "CA300", &[]).await;
    caller.send_raw("this is not json");
    caller.send_raw(r#"{"event":"dance","streamSid":"MZ1"}"#);
    caller.send_raw(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"***"}}"#);
    caller.send_raw(r#"{"event":"media","streamSid":"MZ1"}"#);
    caller.send_raw(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"not-ours"}}"#);
    caller.send_raw(
        r#"{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"7"}}"#,
    );
    let mut clip = common::silence(300, RATE);
    clip.extend(common::speech("Are you still there?", RATE).await);
    caller.talk(&clip).await;
    caller
        .silence_until(10, "an answer after the bad events", |log| {
            log.iter().any(|l| matches!(l, Log::Media { .. }))
        })
        .await;
    let (_, metrics) = common::http(&server, "GET", "/metrics", &[], "").await;
    for (kind, n) in [
        ("twilio_bad_event", 3),
        ("twilio_bad_payload", 1),
        ("twilio_unknown_mark", 1),
    ] {
        let line = format!("gazelle_errors_total{{kind=\"{kind}\"}} {n}");
        assert!(metrics.contains(&line), "{line} missing from /metrics");
    }
    caller.hang_up();
    drop(url);
    server.shutdown().await;
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twiml_webhook_and_signatures() {
    let server = common::start_server(config("Hi.")).await;
    let form = "CallSid=CA9&From=%2B15550001111&To=%2B15550002222";
    let (status, body) = common::http(
        &server,
        "POST",
        "/twilio/voice?system_prompt=Be%20kind%20%26%20brief",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("traceparent", TRACEPARENT),
        ],
        form,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The webhook's trace context goes to the stream, so the call's span joins its trace.
    assert!(
        body.contains(&format!(
            "<Parameter name=\"traceparent\" value=\"{TRACEPARENT}\"/>"
        )),
        "{body}"
    );
    let stream_url = format!("wss://{}/twilio/stream", server.addr);
    assert!(
        body.contains(&format!("<Connect><Stream url=\"{stream_url}\">")),
        "{body}"
    );
    assert!(body.contains("<Parameter name=\"system_prompt\" value=\"Be kind &amp; brief\"/>"));
    server.shutdown().await;

    // At the call limit, the caller is told so and the call ends, instead of dead air.
    let server = common::start_server_with(config("Hi."), |s| {
        s.calls = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    })
    .await;
    let ct = ("Content-Type", "application/x-www-form-urlencoded");
    let (status, body) = common::http(&server, "POST", "/twilio/voice", &[ct], form).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<Say>Sorry, all our lines are busy."),
        "{body}"
    );
    assert!(
        body.contains("<Hangup/>") && !body.contains("<Connect>"),
        "{body}"
    );
    server.shutdown().await;

    // With an auth token, unsigned or wrongly signed requests are refused.
    let server = common::start_server_with(config("Hi."), |s| {
        s.twilio.auth_token = Some("secret-token".into());
        s.twilio.public_url = Some("https://voice.example.com".into());
    })
    .await;
    let ct = ("Content-Type", "application/x-www-form-urlencoded");
    let (status, _) = common::http(&server, "POST", "/twilio/voice", &[ct], form).await;
    assert_eq!(status, 403);
    let params: BTreeMap<String, String> = [
        ("CallSid", "CA9"),
        ("From", "+15550001111"),
        ("To", "+15550002222"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let good = protocol::signature(
        "secret-token",
        "https://voice.example.com/twilio/voice",
        &params,
    );
    let bad = protocol::signature(
        "other-token",
        "https://voice.example.com/twilio/voice",
        &params,
    );
    let (status, _) = common::http(
        &server,
        "POST",
        "/twilio/voice",
        &[ct, ("X-Twilio-Signature", &bad)],
        form,
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = common::http(
        &server,
        "POST",
        "/twilio/voice",
        &[ct, ("X-Twilio-Signature", &good)],
        form,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("wss://voice.example.com/twilio/stream"),
        "{body}"
    );
    // The media-stream websocket is checked too.
    let ws = format!("ws://{}/twilio/stream", server.addr);
    let err = tokio_tungstenite::connect_async(ws)
        .await
        .expect_err("unsigned stream refused");
    assert!(err.to_string().contains("403"), "{err}");
    server.shutdown().await;
}
