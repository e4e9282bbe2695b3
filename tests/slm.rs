//! The OpenAI-compatible speech-language model backend, through the real server: a loopback peer
//! speaks the chat-completions streaming wire format as vLLM does (role chunk, content deltas, a
//! finish chunk, `[DONE]`) and validates each request as vLLM would: the model name, `stream`,
//! roles that alternate and end with the user, and the newest turn as a base64 WAV `input_audio`
//! part that is 16 kHz mono 16-bit. It records every request, and when a stream was closed
//! before it finished.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use gazelle::audio::Encoding;
use gazelle::config::{Config, SlmKind};
use gazelle::transport::vocode::client::{ClientConfig, Event, EventKind, VocodeClient};
use serde_json::{json, Value};

const MODEL: &str = "test/ultravox";

/// What the peer does with the next request.
#[derive(Debug, Clone)]
enum Plan {
    /// Streams `text` word by word, `delay` apart.
    Reply { text: String, delay: Duration },
    /// Answers with this HTTP status and an OpenAI-shaped error.
    Status(u16, &'static str),
    /// Accepts the request and never answers.
    Hang,
    /// Streams `n` words, then goes quiet with the stream open.
    StallAfter(usize),
    /// Streams `n` words, then only keep-alive comments and empty deltas, every 100 ms, as a
    /// hung or overloaded server behind a proxy does.
    KeepAliveAfter(usize),
}

/// One request as the peer saw it.
#[derive(Debug, Clone)]
struct Seen {
    body: Value,
    /// Seconds of audio of each `input_audio` part, in order.
    audio_secs: Vec<f64>,
    /// Why vLLM would have refused it.
    problems: Vec<String>,
    /// When its stream was closed by the client before it finished.
    closed_early: Option<Instant>,
    finished: bool,
}

#[derive(Default)]
struct PeerState {
    plan: VecDeque<Plan>,
    /// What a request gets once the plan is used up.
    default: Option<Plan>,
    seen: Vec<Seen>,
}

#[derive(Clone)]
struct Peer {
    url: String,
    state: Arc<Mutex<PeerState>>,
}

impl Peer {
    async fn start(plan: Vec<Plan>, default: Plan) -> Peer {
        let state = Arc::new(Mutex::new(PeerState {
            plan: plan.into(),
            default: Some(default),
            seen: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Peer {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

/// Checks a request as vLLM's OpenAI server would.
fn validate(body: &Value) -> (Vec<String>, Vec<f64>) {
    let mut problems = Vec::new();
    let mut secs = Vec::new();
    if body["model"] != MODEL {
        problems.push(format!("model {}", body["model"]));
    }
    if body["stream"] != true {
        problems.push("not streamed".into());
    }
    let Some(messages) = body["messages"].as_array() else {
        return (vec!["no messages".into()], secs);
    };
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap_or("?"))
        .collect();
    let turns: Vec<&str> = roles
        .iter()
        .copied()
        .skip_while(|r| *r == "system")
        .collect();
    let alternate = turns
        .iter()
        .enumerate()
        .all(|(i, r)| *r == if i % 2 == 0 { "user" } else { "assistant" });
    if !alternate || turns.last() != Some(&"user") {
        problems.push(format!("roles {roles:?}"));
    }
    for m in messages {
        let Some(parts) = m["content"].as_array() else {
            continue;
        };
        for p in parts {
            if p["type"] != "input_audio" {
                continue;
            }
            if p["input_audio"]["format"] != "wav" {
                problems.push("audio not wav".into());
            }
            let data = p["input_audio"]["data"].as_str().unwrap_or("");
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data) else {
                problems.push("audio not base64".into());
                continue;
            };
            let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
            let ok = bytes.len() > 44 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE";
            if !ok || u16_at(22) != 1 || u16_at(34) != 16 {
                problems.push("audio not mono 16-bit WAV".into());
                continue;
            }
            let rate = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
            if rate != 16_000 {
                problems.push(format!("audio at {rate} Hz"));
            }
            let wav = gazelle::audio::wav::read(&bytes).unwrap();
            secs.push(wav.samples.len() as f64 / rate as f64);
        }
    }
    let last_audio = messages
        .last()
        .and_then(|m| m["content"].as_array())
        .is_some_and(|parts| parts.iter().any(|p| p["type"] == "input_audio"));
    if !last_audio {
        problems.push("the newest turn carries no audio".into());
    }
    (problems, secs)
}

/// Marks its request closed early if dropped before the stream finished.
struct Watch {
    state: Arc<Mutex<PeerState>>,
    index: usize,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap();
        let seen = &mut s.seen[self.index];
        if self.done {
            seen.finished = true;
        } else {
            seen.closed_early = Some(Instant::now());
        }
    }
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    format!("data: {c}\n\n")
}

async fn completions(
    State(state): State<Arc<Mutex<PeerState>>>,
    Json(body): Json<Value>,
) -> Response {
    let (problems, audio_secs) = validate(&body);
    let (plan, index) = {
        let mut s = state.lock().unwrap();
        let plan = s.plan.pop_front().or(s.default.clone()).unwrap();
        s.seen.push(Seen {
            body,
            audio_secs,
            problems: problems.clone(),
            closed_early: None,
            finished: false,
        });
        (plan, s.seen.len() - 1)
    };
    if !problems.is_empty() {
        let e = json!({"error": {"message": problems.join("; "), "type": "BadRequestError", "code": 400}});
        return (axum::http::StatusCode::BAD_REQUEST, Json(e)).into_response();
    }
    let (words, delay, stall, keep_alive) = match plan {
        Plan::Status(code, message) => {
            let e = json!({"error": {"message": message, "type": "Error", "code": code}});
            let status = axum::http::StatusCode::from_u16(code).unwrap();
            return (status, Json(e)).into_response();
        }
        Plan::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!()
        }
        Plan::Reply { text, delay } => (words_of(&text), delay, false, false),
        Plan::StallAfter(n) => (
            words_of("one two three four five six")[..n].to_vec(),
            Duration::ZERO,
            true,
            false,
        ),
        Plan::KeepAliveAfter(n) => (
            words_of("one two three four five six")[..n].to_vec(),
            Duration::ZERO,
            true,
            true,
        ),
    };
    let watch = Watch {
        state,
        index,
        done: false,
    };
    let mut pieces: VecDeque<String> = words
        .into_iter()
        .map(|w| chunk(json!({"content": w}), None))
        .collect();
    pieces.push_front(chunk(json!({"role": "assistant", "content": ""}), None));
    let stream = futures::stream::unfold(
        (pieces, Some(watch), true),
        move |(mut pieces, watch, first)| async move {
            // The finish went out and the watch recorded it: the stream ends.
            let mut watch = watch?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match pieces.pop_front() {
                Some(p) => Some((Ok::<_, Infallible>(p), (pieces, Some(watch), false))),
                None if keep_alive => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let nothing =
                        format!(": keep-alive\n\n{}", chunk(json!({"content": ""}), None));
                    Some((Ok(nothing), (pieces, Some(watch), false)))
                }
                None if stall => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    None
                }
                None => {
                    watch.done = true;
                    drop(watch);
                    let end = format!("{}data: [DONE]\n\n", chunk(json!({}), Some("stop")));
                    Some((Ok(end), (pieces, None, false)))
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

/// Word pieces with their leading spaces, as a tokenizer streams them.
fn words_of(text: &str) -> Vec<String> {
    text.split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// Under the silence policy, but for the preemptive test: where a smart-policy turn ends depends on
/// the end-of-turn model's score of espeak-ng speech (around its 0.5 line; the CPU's int8 kernels
/// move it) and on how soon that score comes, so requests would come and go with the machine.
fn config(peer_url: &str) -> Config {
    let mut c = Config::default();
    c.pipeline.turn.policy = gazelle::vad::PolicyKind::Silence;
    c.slm.kind = SlmKind::Openai;
    c.slm.openai.base_url = peer_url.into();
    c.slm.openai.model = MODEL.into();
    c.slm.openai.first_token_timeout_ms = 600;
    c.slm.openai.stall_timeout_ms = 600;
    c
}

fn reply(text: &str, delay_ms: u64) -> Plan {
    Plan::Reply {
        text: text.into(),
        delay: Duration::from_millis(delay_ms),
    }
}

fn drain(client: &mut VocodeClient) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(e) = client.events.try_recv() {
        events.push(e);
    }
    events
}

/// Speaks `text` (after 300 ms of silence), then streams silence until `until` says the events
/// so far are enough, or `max_ms` passes.
async fn say(
    client: &mut VocodeClient,
    text: &str,
    max_ms: u64,
    until: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut clip = common::silence(300, 16_000);
    clip.extend(common::speech(text, 16_000).await);
    client.stream_realtime(&clip, 20).await.unwrap();
    let mut events = drain(client);
    let paced = tokio::time::Instant::now();
    for i in 1..=(max_ms / 20) {
        if until(&events) {
            break;
        }
        client
            .send_audio(&common::silence(20, 16_000))
            .await
            .unwrap();
        tokio::time::sleep_until(paced + Duration::from_millis(20 * i)).await;
        events.extend(drain(client));
    }
    events
}

fn errors(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Error { kind, message } => Some((kind.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

fn has_audio(events: &[Event]) -> bool {
    events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Audio { .. }))
}

/// Two spoken turns: each reply is the peer's, spoken; the second request carries the first
/// turn's audio as a note (one audio item per prompt, vLLM's default), the first reply as the
/// assistant's text, and the second turn as 16 kHz mono WAV of about its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_turn_call_on_an_openai_compatible_server() {
    let peer = Peer::start(vec![], reply("Hello from the peer.", 0)).await;
    let server = common::start_server(config(&peer.url)).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let done = |e: &[Event]| common::transcript(e).contains("peer.") && has_audio(e);
    let first = say(&mut client, "What is the capital of France?", 6_000, done).await;
    assert_eq!(common::transcript(&first), "Hello from the peer.");
    // Let the reply play out so it is kept whole.
    let _ = say(&mut client, "", 2_500, |_| false).await;
    let second = say(&mut client, "And what about Spain?", 6_000, done).await;
    assert_eq!(common::transcript(&second), "Hello from the peer.");
    let _ = say(&mut client, "", 2_500, |_| false).await;
    let seen = peer.seen();
    for s in &seen {
        assert!(s.problems.is_empty(), "{:?}", s.problems);
    }
    let finished: Vec<&Seen> = seen.iter().filter(|s| s.finished).collect();
    let last = finished.last().expect("a finished request");
    let m = last.body["messages"].as_array().unwrap();
    let roles: Vec<&str> = m.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{}", last.body);
    assert_eq!(m[0]["content"][0]["type"], "text");
    assert_eq!(m[1]["content"], "Hello from the peer.");
    let secs = last.audio_secs[0];
    assert!((1.0..3.5).contains(&secs), "the turn is {secs} s of audio");
    let h = common::history_until(&mut client, 10, |h| {
        h["turns"].as_array().is_some_and(|t| t.len() >= 4)
    })
    .await;
    assert_eq!(h["turns"].as_array().unwrap().len(), 4, "{h}");
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// A reply that streams for about 7 s at 100 ms a word: still going when the caller cuts in.
const LONG_STORY: &str = "This is a long answer that goes on and on, so that there is time to \
    interrupt it while the server is still sending it. It has many more words in it than anyone \
    would wait for, and it keeps going for several seconds after the first sentence has been \
    spoken by the voice. Then it tells of a walk by the river, of the birds that sang there, of \
    the boats that went by, and of the old bridge where the story ends.";

/// A call whose model peer streams `LONG_STORY` (and then answers "Yes?"), asked for a story:
/// returns once the reply has played for 1.2 s, with the events so far. The set-up of the tests
/// that talk over the bot.
async fn a_long_reply_playing() -> (Peer, common::TestServer, VocodeClient, Vec<Event>) {
    let peer = Peer::start(vec![reply(LONG_STORY, 100)], reply("Yes?", 0)).await;
    let server = common::start_server(config(&peer.url)).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let speaking = |e: &[Event]| {
        e.iter()
            .find(|e| matches!(e.kind, EventKind::Audio { .. }))
            .is_some_and(|a| a.at.elapsed() > Duration::from_millis(1_200))
    };
    let events = say(&mut client, "Tell me a long story.", 8_000, speaking).await;
    assert!(speaking(&events), "no reply audio");
    (peer, server, client, events)
}

/// A barge-in while the peer is still streaming: the peer sees the stream closed within 500 ms
/// of the cut, and the next request carries only the words the caller heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barge_in_closes_the_stream_and_the_next_request_carries_what_was_heard() {
    let (peer, server, mut client, mut events) = a_long_reply_playing().await;
    let cut = |e: &[Event]| {
        e.iter()
            .any(|e| matches!(e.kind, EventKind::Clear { paused: false, .. }))
    };
    events.extend(say(&mut client, "Wait, stop, I have a question.", 4_000, cut).await);
    let (cleared_at, spoken) = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Clear {
                spoken_text,
                paused: false,
                ..
            } => Some((e.at, spoken_text.clone())),
            _ => None,
        })
        .expect("the reply was cut");
    let seen = peer.seen();
    let closed = seen[0].closed_early.expect("the stream was closed early");
    let ms = |a: Instant, b: Instant| {
        if a >= b {
            (a - b).as_secs_f64() * 1e3
        } else {
            -((b - a).as_secs_f64() * 1e3)
        }
    };
    eprintln!(
        "the peer saw its stream closed {:.1} ms after the caller got the cut",
        ms(closed, cleared_at)
    );
    // A few milliseconds on an idle machine; the bound leaves room for a busy one.
    assert!(
        closed <= cleared_at + Duration::from_millis(500),
        "closed {:?} after the cut",
        closed.saturating_duration_since(cleared_at)
    );
    // The interrupting turn is answered; its request carries the heard words.
    let _ = say(&mut client, "", 3_000, |e| {
        common::transcript(e).contains("Yes?")
    })
    .await;
    let seen = peer.seen();
    let next = seen.last().unwrap();
    assert!(next.problems.is_empty(), "{:?}", next.problems);
    let m = next.body["messages"].as_array().unwrap();
    let assistant: Vec<&str> = m
        .iter()
        .filter(|m| m["role"] == "assistant")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert!(!spoken.is_empty() && LONG_STORY.starts_with(spoken.trim_end_matches(',')));
    assert_eq!(assistant, [spoken.as_str()], "{}", next.body);
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// Second probe, finding 4: a reply cut at `limits.max_reply_chars` kept the model's whole output
/// in the history, and the next request carried it (2 MB of it, every turn). Now the next request
/// carries exactly what the caller heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cut_at_the_character_limit_leaves_only_what_was_spoken() {
    let long = "This sentence goes on. ".repeat(40);
    let peer = Peer::start(vec![reply(&long, 0)], reply("Fine.", 0)).await;
    let mut c = config(&peer.url);
    c.limits.max_reply_chars = 60;
    let server = common::start_server(c).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let first = say(&mut client, "Tell me everything.", 8_000, has_audio).await;
    assert!(has_audio(&first), "no reply audio");
    // Once it has played out, the history holds what was spoken.
    let h = common::history_until(&mut client, 15, |h| h["turns"][1].is_object()).await;
    let spoken = h["turns"][1]["text"].as_str().unwrap().to_string();
    assert!(
        !spoken.is_empty() && spoken.chars().count() <= 60,
        "{spoken:?}"
    );
    let _ = say(&mut client, "And then?", 6_000, |e| {
        common::transcript(e).contains("Fine.")
    })
    .await;
    let seen = peer.seen();
    let next = seen.last().unwrap();
    let m = next.body["messages"].as_array().unwrap();
    let roles: Vec<&str> = m.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user"], "{}", next.body);
    assert_eq!(m[1]["content"], spoken.as_str(), "{}", next.body);
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// Each failure of the model server becomes a clear error on the call (kind `slm`), and the call
/// goes on to the next turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_server_failures_become_clear_call_errors() {
    let plan = vec![
        Plan::Status(401, "invalid api key"),
        Plan::Status(404, "The model `test/ultravox` does not exist."),
        Plan::Status(429, "slow down"),
        Plan::Status(503, "overloaded"),
        Plan::Hang,
        Plan::StallAfter(2),
        Plan::KeepAliveAfter(2),
    ];
    let expected = [
        "refused our credentials (HTTP 401); set its API key in $GAZELLE_SLM_API_KEY",
        "does not serve the model \"test/ultravox\" (HTTP 404): The model `test/ultravox` does not exist.",
        "rate-limiting us (HTTP 429): slow down",
        "failed (HTTP 503): overloaded",
        "sent no token within 600 ms",
        "stalled: no text for 600 ms",
        // Keep-alives and empty deltas are not text: the stall is measured all the same.
        "stalled: no text for 600 ms",
    ];
    let peer = Peer::start(plan, reply("Fine.", 0)).await;
    let mut c = config(&peer.url);
    // One request per turn: no preemptive replies.
    c.pipeline.turn.preemptive = false;
    let server = common::start_server(c).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    for want in expected {
        let events = say(&mut client, "What time is it now?", 5_000, |e| {
            !errors(e).is_empty()
        })
        .await;
        let errs = errors(&events);
        assert_eq!(errs.len(), 1, "{want}: {errs:?}");
        assert_eq!(errs[0].0, "slm");
        assert!(errs[0].1.contains(want), "{want}: {}", errs[0].1);
    }
    // The stalled replies' fragments ("one two") were not spoken and are in no history; the
    // call still answers.
    let events = say(&mut client, "Are you there?", 5_000, |e| {
        common::transcript(e).contains("Fine.")
    })
    .await;
    assert_eq!(common::transcript(&events), "Fine.");
    let seen = peer.seen();
    let last = seen.last().unwrap();
    assert!(
        !last.body["messages"].to_string().contains("one two"),
        "a fragment nobody heard reached the history: {}",
        last.body
    );
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// Nothing listens at the model server's address: without a fallback the turn gets a clear
/// error; with `[slm] fallback = "scripted"` the scripted model answers instead, unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_an_error_or_the_fallback_answers() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    for fallback in [false, true] {
        let mut c = config(&closed);
        c.slm.reply = "The fallback speaks.".into();
        if fallback {
            c.slm.fallback = Some(SlmKind::Scripted);
        }
        let server = common::start_server(c).await;
        let cc = ClientConfig::new(16_000, Encoding::Linear16);
        let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
        let done = |e: &[Event]| !errors(e).is_empty() || common::transcript(e).contains("speaks.");
        let events = say(&mut client, "Hello, is anyone there?", 5_000, done).await;
        if fallback {
            assert!(errors(&events).is_empty(), "{:?}", errors(&events));
            assert_eq!(common::transcript(&events), "The fallback speaks.");
        } else {
            let errs = errors(&events);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].1.contains("cannot reach the model server at"),
                "{}",
                errs[0].1
            );
        }
        client.stop().await.unwrap();
        server.shutdown().await;
    }
}

/// A preemptive reply started at a mid-sentence pause and discarded when the speaker goes on
/// cancels its request; the request that answers the whole utterance carries no trace of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_preemptive_reply_cancels_its_request() {
    // 300 ms a word: the preemptive request still streams when the speaker goes on after the
    // 700 ms pause, however soon the machine started it.
    let peer = Peer::start(
        vec![],
        reply("Sure, I can do that for you right away.", 300),
    )
    .await;
    let mut c = config(&peer.url);
    c.pipeline.turn = Default::default();
    // The 700 ms pause must be judged, not ended by the load fallback on a busy test machine.
    c.pipeline.turn.verdict_timeout_ms = 0;
    let server = common::start_server(c).await;
    let cc = ClientConfig::new(16_000, Encoding::Linear16);
    let mut client = VocodeClient::connect(&server.ws_url(), cc).await.unwrap();
    let recorded = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smart-turn")
            .join(name);
        let wav = gazelle::audio::wav::read(&std::fs::read(path).unwrap()).unwrap();
        let (a, b) = gazelle::audio::level::speech_span(&wav.samples, 16_000).unwrap();
        wav.samples[a..b].to_vec()
    };
    let mut speech = common::silence(300, 16_000);
    speech.extend(recorded("sense-0890-cut.wav"));
    speech.extend(common::silence(700, 16_000));
    speech.extend(recorded("goforward.wav"));
    let total = speech.len() as f64 / 16_000.0 - 0.3;
    client.stream_realtime(&speech, 20).await.unwrap();
    let _ = say(&mut client, "", 4_000, |e| {
        common::transcript(e).contains("away.")
    })
    .await;
    let seen = peer.seen();
    assert!(seen.len() >= 2, "{} requests", seen.len());
    assert!(
        seen.iter().any(|s| s.closed_early.is_some()),
        "the preemptive request was not cancelled"
    );
    let last = seen.last().unwrap();
    assert!(last.problems.is_empty(), "{:?}", last.problems);
    let m = last.body["messages"].as_array().unwrap();
    assert_eq!(m.len(), 1, "one user turn and nothing else: {}", last.body);
    let secs = last.audio_secs[0];
    assert!(
        (secs - total).abs() < 0.4,
        "{secs} s of a {total} s utterance"
    );
    client.stop().await.unwrap();
    server.shutdown().await;
}

/// Speech over a paused reply that has lasted `false_interruption_ms` (500 ms by default) can no
/// longer be a false interruption: the reply is cut then and the model's stream closed (paid
/// tokens on a remote model, decode slots on the engine), not when the interrupting turn ends
/// (about 2.5 s after the speech began here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_over_the_bot_frees_the_model_once_it_lasts_false_interruption_ms() {
    let turn = config("").pipeline.turn;
    let false_interruption = Duration::from_millis(turn.false_interruption_ms as u64);
    assert!(!false_interruption.is_zero());
    let (peer, server, mut client, _) = a_long_reply_playing().await;
    // Talk over it, from the first sample, in real time.
    let speech = common::speech(
        "Wait please stop there I have a question about that",
        16_000,
    )
    .await;
    let (onset, end) = common::active_span(&speech, 0.02).unwrap();
    let sent = client.stream_realtime(&speech, 20).await.unwrap();
    // When a sample arrived, as the server reckons it: its chunk's arrival, less the samples
    // after it in the chunk.
    let chunk = 16_000 * 20 / 1000;
    let arrived = |i: usize| {
        let rest = (i / chunk + 1) * chunk - i;
        sent[i / chunk] - Duration::from_secs_f64(rest as f64 / 16_000.0)
    };
    let (spoke_at, spoke_until) = (arrived(onset), arrived(end - 1));
    let events = drain(&mut client);
    let clears: Vec<(Instant, bool)> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Clear { paused, .. } => Some((e.at, paused)),
            _ => None,
        })
        .collect();
    assert!(
        matches!(clears[..], [(_, true), (cut, false)] if cut < spoke_until),
        "paused, then cut while the caller still spoke: {clears:?}"
    );
    let closed = peer.seen()[0]
        .closed_early
        .expect("the reply's stream was closed");
    let due = spoke_at + false_interruption;
    let late_ms = if closed >= due {
        (closed - due).as_secs_f64() * 1e3
    } else {
        -(due - closed).as_secs_f64() * 1e3
    };
    eprintln!(
        "the stream closed {late_ms:.0} ms after the speech reached {false_interruption:?}; the \
         speech went on {:.0} ms more",
        (spoke_until - due).as_secs_f64() * 1e3
    );
    // The VAD finds the start of speech within a frame or two (32 ms each) of the loudness
    // onset, and sees a frame once all of it has arrived: the issue asks for 100 ms.
    assert!(
        (-100.0..100.0).contains(&late_ms),
        "closed {late_ms:.0} ms after the speech lasted {false_interruption:?}"
    );
    assert!(
        closed + Duration::from_millis(500) < spoke_until,
        "freed well before the interruption ended"
    );
    let _ = say(&mut client, "", 3_000, |e| {
        common::transcript(e).contains("Yes?")
    })
    .await;
    client.stop().await.unwrap();
    server.shutdown().await;
}
