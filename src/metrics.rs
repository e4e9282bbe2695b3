//! Prometheus instruments for the whole server, in one registry that `/metrics` renders. Buckets
//! are sized to what each measures: the VAD to its 32 ms frame budget, turn stages to the
//! end-of-speech → first-audio budget.

use std::time::{Duration, Instant};

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Playback gaps shorter than this are timer noise, not an underrun.
pub(crate) const UNDERRUN_TOLERANCE: Duration = Duration::from_millis(1);

/// An enum whose variants are label values: each variant's label is written once, beside it,
/// and `as_str` and `ALL` follow.
macro_rules! labels {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $label:literal,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every value, in declaration order.
            #[allow(dead_code)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The label value.
            pub(crate) const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }
    };
}

labels! {
    /// Every kind of error the server counts. Its name is both the `kind` label of
    /// `gazelle_errors_total` and the `kind` a client sees in `gazelle_error`.
    pub(crate) enum ErrorKind {
        /// Malformed JSON from a client.
        BadJson = "bad_json",
        /// A Vocode message of an unknown type.
        UnknownType = "unknown_type",
        /// A Vocode message with missing fields or wrong types.
        BadMessage = "bad_message",
        /// Audio data that is not base64.
        BadBase64 = "bad_base64",
        /// Audio that cannot be decoded (bad WAV header, unsupported rate).
        BadAudio = "bad_audio",
        /// A WAV header that changes a call's audio format.
        FormatChanged = "format_changed",
        /// One message with more audio than a call may have in flight.
        AudioTooLong = "audio_too_long",
        /// A websocket frame over the size limit.
        FrameTooLarge = "frame_too_large",
        /// A binary websocket frame where the protocol has text.
        BinaryFrame = "binary_frame",
        /// A message before the call's start message.
        NotStarted = "not_started",
        /// A second start message.
        AlreadyStarted = "already_started",
        /// An invalid start message (rates, encodings).
        BadConfig = "bad_config",
        /// A system prompt or first message over its limit.
        TextTooLong = "text_too_long",
        /// A call id that is too long or has characters outside the allowed set.
        BadId = "bad_id",
        /// A call id that a live call already has.
        IdInUse = "id_in_use",
        /// A call that could not start (the model could not open a session).
        CallStart = "call_start",
        /// A caller turned away at the call or pending-socket limit.
        Busy = "busy",
        /// A socket that sent no start message in time.
        StartTimeout = "start_timeout",
        /// A call that received nothing for the idle timeout.
        IdleTimeout = "idle_timeout",
        /// A write to a caller that stalled.
        SendTimeout = "send_timeout",
        /// A reply cut at its character limit.
        ReplyTooLong = "reply_too_long",
        /// A request with missing, wrong, expired or reused credentials.
        Auth = "auth",
        /// A browser from an origin that is not allowed.
        Origin = "origin",
        /// A connection over the per-address cap, or a websocket over its address's share of the
        /// sockets waiting to start.
        TooManyConnectionsPerIp = "too_many_connections_per_ip",
        /// Every HTTP connection slot was taken, so the connection that had waited longest for a
        /// request's headers was closed to make room for a new one.
        ConnectionsFull = "connections_full",
        /// The voice-activity detector failed.
        Vad = "vad",
        /// The speech-language model failed mid-reply.
        Slm = "slm",
        /// Speech synthesis failed mid-reply.
        Tts = "tts",
        /// A Twilio request with a missing or bad signature.
        TwilioSignature = "twilio_signature",
        /// A Twilio request while Twilio's routes are closed.
        TwilioClosed = "twilio_closed",
        /// A Twilio webhook body too large or too slow.
        TwilioBadBody = "twilio_bad_body",
        /// A media-stream event that is not valid JSON or not a known event.
        TwilioBadEvent = "twilio_bad_event",
        /// A media payload that is not base64.
        TwilioBadPayload = "twilio_bad_payload",
        /// A mark name we never sent.
        TwilioUnknownMark = "twilio_unknown_mark",
        /// A media-stream event before `start`.
        TwilioBeforeStart = "twilio_before_start",
        /// `connected` or `start` after the stream began.
        TwilioRepeatedStart = "twilio_repeated_start",
        /// A binary frame on a media stream.
        TwilioBinary = "twilio_binary",
        /// A media stream not in µ-law 8 kHz mono.
        TwilioBadFormat = "twilio_bad_format",
        /// A media stream without a valid per-call token.
        TwilioStreamToken = "twilio_stream_token",
        /// A turn refused because too many turns already wait for the model.
        ModelBusy = "model_busy",
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

labels! {
    /// What a barge-in cut into (the `during` label of `gazelle_barge_ins_total`).
    pub(crate) enum BargeIn {
        /// The user talked over the bot for `min_interruption_ms`.
        Interruption = "interruption",
        /// A whole user turn ended while the bot was still talking.
        Turn = "turn",
        /// The server's drain timed out and the call is told goodbye.
        Drain = "drain",
    }
}

labels! {
    /// Why a caller's playback ran dry (the `cause` label of `gazelle_output_underrun_seconds`).
    pub(crate) enum UnderrunCause {
        /// The audio was not synthesized in time.
        Synthesis = "synthesis",
        /// It was ready, but the pacer sent it late (an overloaded server).
        Scheduling = "scheduling",
        /// It was handed over in time, but written to the socket late.
        Transport = "transport",
    }
}

labels! {
    /// A stage of a reply's latency timeline (the `stage` label of `gazelle_turn_stage_seconds`).
    pub(crate) enum TurnStage {
        VadEnd = "vad_end",
        FirstToken = "first_token",
        FirstUnit = "first_unit",
        FirstSynthByte = "first_synth_byte",
        FirstAudioSent = "first_audio_sent",
    }
}

/// Declares every instrument once: its doc comment is its help text, its field name its
/// metric name (counters get `_total`), and the constructor its kind, buckets and labels. The
/// struct, the registration and the construction follow.
macro_rules! instruments {
    ($($(#[doc = $doc:literal])+ $field:ident: $ty:ty = $make:ident($($arg:expr),* $(,)?);)*) => {
        pub struct Metrics {
            pub registry: Registry,
            $($(#[doc = $doc])+ pub $field: $ty,)*
        }

        impl Metrics {
            pub fn new() -> Self {
                let registry =
                    Registry::new_custom(Some("gazelle".into()), None).expect("valid prefix");
                $(
                    let $field: $ty = $make(stringify!($field), &help(&[$($doc),+]), $($arg),*);
                    registry
                        .register(Box::new($field.clone()))
                        .expect("unique metric names");
                )*
                Metrics { registry, $($field),* }
            }
        }
    };
}

/// Doc-comment lines as one line of help text.
fn help(lines: &[&str]) -> String {
    lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn counter(name: &str, help: &str) -> Counter {
    Counter::new(format!("{name}_total"), help).expect("valid metric")
}

fn int_counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(format!("{name}_total"), help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(format!("{name}_total"), help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid metric")
}

fn histogram_vec(name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric")
}

/// Engine durations, from a millisecond to ten seconds.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

instruments! {
    /// Calls with an open transport.
    active_calls: IntGauge = gauge();
    /// Websockets open but not yet started as calls (waiting for their start message).
    pending_sockets: IntGauge = gauge();
    /// TCP connections the HTTP server is serving (requests and idle keep-alives; a websocket
    /// leaves this count once upgraded and is counted as a pending socket or a call).
    open_connections: IntGauge = gauge();
    /// Seconds callers were made to wait because they sent audio faster than real time.
    input_throttled_seconds: Counter = counter();
    /// Seconds from the true end of the user's speech to each stage of the reply.
    turn_stage_seconds: HistogramVec = histogram_vec(
        &[
            0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
            3.0, 5.0,
        ],
        &["stage"],
    );
    /// Seconds of Silero inference per frame, by batch size class.
    vad_frame_seconds: HistogramVec = histogram_vec(
        &[
            10e-6, 20e-6, 40e-6, 60e-6, 80e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 2e-3, 4e-3,
            8e-3, 16e-3, 32e-3,
        ],
        &["batch"],
    );
    /// Errors by kind (the names of `ErrorKind`: bad_json, bad_audio, tts, slm, …).
    errors: IntCounterVec = counter_vec(&["kind"]);
    /// Replies cut off by the user, by what they cut into.
    barge_ins: IntCounterVec = counter_vec(&["during"]);
    /// Seconds from a text unit reaching a speech provider to its first audio byte, by provider
    /// (from sub-millisecond, a loopback or LAN server, to seconds, a cold cloud voice).
    tts_ttfb_seconds: HistogramVec = histogram_vec(
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
            2.0, 5.0,
        ],
        &["provider"],
    );
    /// Replies a speech provider failed during, by provider (the fallback, if any, took over).
    tts_failures: IntCounterVec = counter_vec(&["provider"]);
    /// Seconds a caller's playback ran dry mid-reply before the next frame went out, by cause:
    /// `synthesis` (its audio was not ready), `scheduling` (ready, but the pacer sent it late) or
    /// `transport` (handed over in time, but written to the socket late).
    output_underrun_seconds: HistogramVec = histogram_vec(
        &[0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
        &["cause"],
    );
    /// Sequences in each batched decode step of the model engine.
    engine_batch_size: Histogram = histogram(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]);
    /// Seconds per engine step (prefill chunk plus batched decode).
    engine_step_seconds: Histogram = histogram(SECONDS);
    /// Seconds a turn waited from the call's request to its first prefill chunk.
    engine_queue_wait_seconds: Histogram = histogram(SECONDS);
    /// Seconds from a turn's request to its first sampled token.
    engine_first_token_seconds: Histogram = histogram(SECONDS);
    /// KV-cache positions allocated by all calls.
    engine_kv_used_positions: IntGauge = gauge();
    /// KV-cache bytes allocated by all calls.
    engine_kv_used_bytes: IntGauge = gauge();
    /// KV-cache positions the pool may hold.
    engine_kv_budget_positions: IntGauge = gauge();
    /// Idle calls' KV caches freed to make room.
    engine_evictions: IntCounter = int_counter();
    /// Replies waiting for their call to take tokens.
    engine_parked: IntGauge = gauge();
    /// Turns waiting for admission (encoder and KV memory).
    engine_waiting_turns: IntGauge = gauge();
    /// Replies generating.
    engine_running: IntGauge = gauge();
    /// Seconds per end-of-turn model inference (one batch of turns).
    end_of_turn_seconds: Histogram = histogram(&[
        0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    ]);
    /// Seconds from asking the end-of-turn model about a pause to its verdict, as the call
    /// waits for it (the worker's queue included).
    end_of_turn_delay_seconds: Histogram = histogram(&[
        0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 1.5,
    ]);
    /// End-of-turn requests waiting for the worker.
    end_of_turn_queued: IntGauge = gauge();
    /// End-of-turn decisions at a pause: `complete` (the turn ended there), `likely` (it ends
    /// after a shorter silence) or `incomplete`; `fallback` (no verdict in time: the turn ends on
    /// silence) and `withdrawn` (the pause was over before the model reached it: not run).
    end_of_turn_decisions: IntCounterVec = counter_vec(&["decision"]);
    /// Preemptive replies by outcome: `started`, `committed`, `discarded`.
    preemptive_replies: IntCounterVec = counter_vec(&["outcome"]);
    /// Seconds discarded preemptive replies ran before they were taken back.
    preemptive_wasted_seconds: Counter = counter();
    /// Replies paused by speech over them, by outcome: `resumed` (a false interruption: too
    /// short, or no turn) or `cut` (a barge-in).
    paused_replies: IntCounterVec = counter_vec(&["outcome"]);
}

impl Metrics {
    /// What the end-of-turn model said at a pause: `complete`, `likely` or `incomplete`; or
    /// `withdrawn`, a request not run because the pause was over when the worker reached it.
    pub(crate) fn end_of_turn(&self, decision: &str) {
        self.end_of_turn_decisions
            .with_label_values(&[decision])
            .inc();
    }

    /// A preemptive reply was started, committed or discarded (after running `wasted`).
    pub(crate) fn preemptive(&self, outcome: &str, wasted: Option<Duration>) {
        self.preemptive_replies.with_label_values(&[outcome]).inc();
        if let Some(w) = wasted {
            self.preemptive_wasted_seconds.inc_by(w.as_secs_f64());
        }
    }

    /// A reply paused by speech over it was `resumed` or `cut`.
    pub(crate) fn paused_reply(&self, outcome: &str) {
        self.paused_replies.with_label_values(&[outcome]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// A gap of `by` in a caller's playback, by cause.
    pub(crate) fn underrun(&self, cause: UnderrunCause, by: Duration) {
        self.output_underrun_seconds
            .with_label_values(&[cause.as_str()])
            .observe(by.as_secs_f64());
    }

    /// A reply cut off by the user.
    pub(crate) fn barge_in(&self, during: BargeIn) {
        self.barge_ins.with_label_values(&[during.as_str()]).inc();
    }

    /// How long after the true end of the user's speech a reply reached `stage`.
    pub(crate) fn turn_stage(&self, stage: TurnStage, seconds: f64) {
        self.turn_stage_seconds
            .with_label_values(&[stage.as_str()])
            .observe(seconds);
    }

    /// A transport has just written an audio frame that the caller's playback needed at `due`;
    /// a write after that is a gap the caller hears, caused by the transport.
    pub(crate) fn frame_delivered(&self, due: Option<Instant>) {
        let Some(due) = due else { return };
        let now = tokio::time::Instant::now().into_std();
        if now > due + UNDERRUN_TOLERANCE {
            self.underrun(UnderrunCause::Transport, now - due);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `p` quantile (0..=1) of sorted values, by nearest rank; NaN when there are none. The one
/// rule every benchmark table uses.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_is_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(
            (quantile(&v, 0.0), quantile(&v, 0.5), quantile(&v, 1.0)),
            (1.0, 3.0, 4.0)
        );
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    fn transport_gaps(m: &Metrics) -> (u64, f64) {
        let h = m.output_underrun_seconds.with_label_values(&["transport"]);
        (h.get_sample_count(), h.get_sample_sum())
    }

    #[test]
    fn error_kinds_have_distinct_snake_case_names() {
        let names: std::collections::HashSet<&str> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for n in names {
            let snake = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
            assert!(n.chars().all(snake), "{n}");
        }
        let m = Metrics::new();
        m.error(ErrorKind::FormatChanged);
        assert!(m
            .render()
            .contains("gazelle_errors_total{kind=\"format_changed\"} 1"));
    }

    #[tokio::test]
    async fn a_frame_written_after_its_due_time_is_a_transport_underrun() {
        let m = Metrics::new();
        let now = Instant::now();
        m.frame_delivered(None); // it started playback: nothing was waiting for it
        m.frame_delivered(Some(now + Duration::from_millis(200))); // in time
        assert_eq!(transport_gaps(&m).0, 0);
        m.frame_delivered(Some(now - Duration::from_millis(50)));
        let (n, secs) = transport_gaps(&m);
        assert_eq!(n, 1);
        assert!((0.05..0.2).contains(&secs), "{secs}");
        let text = m.render();
        assert!(
            text.contains("gazelle_output_underrun_seconds_count{cause=\"transport\"} 1"),
            "{text}"
        );
    }
}
