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

/// Every kind of error the server counts. Its name is both the `kind` label of
/// `gazelle_errors_total` and the `kind` a client sees in `gazelle_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ErrorKind {
    /// Malformed JSON from a client.
    BadJson,
    /// A Vocode message of an unknown type.
    UnknownType,
    /// A Vocode message with missing fields or wrong types.
    BadMessage,
    /// Audio data that is not base64.
    BadBase64,
    /// Audio that cannot be decoded (bad WAV header, unsupported rate).
    BadAudio,
    /// A WAV header that changes a call's audio format.
    FormatChanged,
    /// One message with more audio than a call may have in flight.
    AudioTooLong,
    /// A websocket frame over the size limit.
    FrameTooLarge,
    /// A binary websocket frame where the protocol has text.
    BinaryFrame,
    /// A message before the call's start message.
    NotStarted,
    /// A second start message.
    AlreadyStarted,
    /// An invalid start message (rates, encodings).
    BadConfig,
    /// A system prompt or first message over its limit.
    TextTooLong,
    /// A call id that is too long or has characters outside the allowed set.
    BadId,
    /// A call id that a live call already has.
    IdInUse,
    /// A call that could not start (the model could not open a session).
    CallStart,
    /// A caller turned away at the call or pending-socket limit.
    Busy,
    /// A socket that sent no start message in time.
    StartTimeout,
    /// A call that received nothing for the idle timeout.
    IdleTimeout,
    /// A write to a caller that stalled.
    SendTimeout,
    /// A reply cut at its character limit.
    ReplyTooLong,
    /// A request with missing, wrong, expired or reused credentials.
    Auth,
    /// A browser from an origin that is not allowed.
    Origin,
    /// A connection over the per-address cap, or a websocket over its address's share of the
    /// sockets waiting to start.
    TooManyConnectionsPerIp,
    /// Every HTTP connection slot was taken, so the connection that had waited longest for a
    /// request's headers was closed to make room for a new one.
    ConnectionsFull,
    /// The voice-activity detector failed.
    Vad,
    /// The speech-language model failed mid-reply.
    Slm,
    /// Speech synthesis failed mid-reply.
    Tts,
    /// A Twilio request with a missing or bad signature.
    TwilioSignature,
    /// A Twilio request while Twilio's routes are closed.
    TwilioClosed,
    /// A Twilio webhook body too large or too slow.
    TwilioBadBody,
    /// A media-stream event that is not valid JSON or not a known event.
    TwilioBadEvent,
    /// A media payload that is not base64.
    TwilioBadPayload,
    /// A mark name we never sent.
    TwilioUnknownMark,
    /// A media-stream event before `start`.
    TwilioBeforeStart,
    /// `connected` or `start` after the stream began.
    TwilioRepeatedStart,
    /// A binary frame on a media stream.
    TwilioBinary,
    /// A media stream not in µ-law 8 kHz mono.
    TwilioBadFormat,
    /// A media stream without a valid per-call token.
    TwilioStreamToken,
    /// A turn refused because too many turns already wait for the model.
    ModelBusy,
}

impl ErrorKind {
    #[cfg(test)]
    pub(crate) const ALL: [ErrorKind; 40] = [
        ErrorKind::BadJson,
        ErrorKind::UnknownType,
        ErrorKind::BadMessage,
        ErrorKind::BadBase64,
        ErrorKind::BadAudio,
        ErrorKind::FormatChanged,
        ErrorKind::AudioTooLong,
        ErrorKind::FrameTooLarge,
        ErrorKind::BinaryFrame,
        ErrorKind::NotStarted,
        ErrorKind::AlreadyStarted,
        ErrorKind::BadConfig,
        ErrorKind::TextTooLong,
        ErrorKind::BadId,
        ErrorKind::IdInUse,
        ErrorKind::CallStart,
        ErrorKind::Busy,
        ErrorKind::StartTimeout,
        ErrorKind::IdleTimeout,
        ErrorKind::SendTimeout,
        ErrorKind::ReplyTooLong,
        ErrorKind::Auth,
        ErrorKind::Origin,
        ErrorKind::TooManyConnectionsPerIp,
        ErrorKind::ConnectionsFull,
        ErrorKind::Vad,
        ErrorKind::Slm,
        ErrorKind::Tts,
        ErrorKind::TwilioSignature,
        ErrorKind::TwilioClosed,
        ErrorKind::TwilioBadBody,
        ErrorKind::TwilioBadEvent,
        ErrorKind::TwilioBadPayload,
        ErrorKind::TwilioUnknownMark,
        ErrorKind::TwilioBeforeStart,
        ErrorKind::TwilioRepeatedStart,
        ErrorKind::TwilioBinary,
        ErrorKind::TwilioBadFormat,
        ErrorKind::TwilioStreamToken,
        ErrorKind::ModelBusy,
    ];

    /// The label and the client's `kind`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadJson => "bad_json",
            ErrorKind::UnknownType => "unknown_type",
            ErrorKind::BadMessage => "bad_message",
            ErrorKind::BadBase64 => "bad_base64",
            ErrorKind::BadAudio => "bad_audio",
            ErrorKind::FormatChanged => "format_changed",
            ErrorKind::AudioTooLong => "audio_too_long",
            ErrorKind::FrameTooLarge => "frame_too_large",
            ErrorKind::BinaryFrame => "binary_frame",
            ErrorKind::NotStarted => "not_started",
            ErrorKind::AlreadyStarted => "already_started",
            ErrorKind::BadConfig => "bad_config",
            ErrorKind::TextTooLong => "text_too_long",
            ErrorKind::BadId => "bad_id",
            ErrorKind::IdInUse => "id_in_use",
            ErrorKind::CallStart => "call_start",
            ErrorKind::Busy => "busy",
            ErrorKind::StartTimeout => "start_timeout",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::SendTimeout => "send_timeout",
            ErrorKind::ReplyTooLong => "reply_too_long",
            ErrorKind::Auth => "auth",
            ErrorKind::Origin => "origin",
            ErrorKind::TooManyConnectionsPerIp => "too_many_connections_per_ip",
            ErrorKind::ConnectionsFull => "connections_full",
            ErrorKind::Vad => "vad",
            ErrorKind::Slm => "slm",
            ErrorKind::Tts => "tts",
            ErrorKind::TwilioSignature => "twilio_signature",
            ErrorKind::TwilioClosed => "twilio_closed",
            ErrorKind::TwilioBadBody => "twilio_bad_body",
            ErrorKind::TwilioBadEvent => "twilio_bad_event",
            ErrorKind::TwilioBadPayload => "twilio_bad_payload",
            ErrorKind::TwilioUnknownMark => "twilio_unknown_mark",
            ErrorKind::TwilioBeforeStart => "twilio_before_start",
            ErrorKind::TwilioRepeatedStart => "twilio_repeated_start",
            ErrorKind::TwilioBinary => "twilio_binary",
            ErrorKind::TwilioBadFormat => "twilio_bad_format",
            ErrorKind::TwilioStreamToken => "twilio_stream_token",
            ErrorKind::ModelBusy => "model_busy",
        }
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

/// What a barge-in cut into (the `during` label of `gazelle_barge_ins_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BargeIn {
    /// The user talked over the bot for `min_interruption_ms`.
    Interruption,
    /// A whole user turn ended while the bot was still talking.
    Turn,
    /// The server's drain timed out and the call is told goodbye.
    Drain,
}

impl BargeIn {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            BargeIn::Interruption => "interruption",
            BargeIn::Turn => "turn",
            BargeIn::Drain => "drain",
        }
    }
}

/// Why a caller's playback ran dry (the `cause` label of `gazelle_output_underrun_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnderrunCause {
    /// The audio was not synthesized in time.
    Synthesis,
    /// It was ready, but the pacer sent it late (an overloaded server).
    Scheduling,
    /// It was handed over in time, but written to the socket late.
    Transport,
}

impl UnderrunCause {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            UnderrunCause::Synthesis => "synthesis",
            UnderrunCause::Scheduling => "scheduling",
            UnderrunCause::Transport => "transport",
        }
    }
}

/// A stage of a reply's latency timeline (the `stage` label of `gazelle_turn_stage_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TurnStage {
    VadEnd,
    FirstToken,
    FirstUnit,
    FirstSynthByte,
    FirstAudioSent,
}

impl TurnStage {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            TurnStage::VadEnd => "vad_end",
            TurnStage::FirstToken => "first_token",
            TurnStage::FirstUnit => "first_unit",
            TurnStage::FirstSynthByte => "first_synth_byte",
            TurnStage::FirstAudioSent => "first_audio_sent",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// Calls with an open transport.
    pub active_calls: IntGauge,
    /// Websockets open but not yet started as calls (waiting for their start message).
    pub pending_sockets: IntGauge,
    /// TCP connections the HTTP server is serving (requests and idle keep-alives; a websocket
    /// leaves this count once upgraded and is counted as a pending socket or a call).
    pub open_connections: IntGauge,
    /// Seconds callers were made to wait because they sent audio faster than real time.
    pub input_throttled_seconds: Counter,
    /// Seconds from the true end of the user's speech to each turn stage.
    pub turn_stage_seconds: HistogramVec,
    /// Seconds of Silero inference per frame, by batch size class.
    pub vad_frame_seconds: HistogramVec,
    /// Errors by kind (bad_json, bad_audio, tts, slm, …).
    pub errors: IntCounterVec,
    /// Barge-ins that cancelled a reply.
    pub barge_ins: IntCounterVec,
    /// Seconds from a text unit reaching a speech provider to its first audio byte, by provider.
    pub tts_ttfb_seconds: HistogramVec,
    /// Replies a speech provider failed during, by provider (the fallback, if any, took over).
    pub tts_failures: IntCounterVec,
    /// Seconds a caller's playback ran dry mid-reply before the next frame went out, by cause:
    /// `synthesis` (its audio was not ready), `scheduling` (ready, but the pacer sent it late) or
    /// `transport` (handed over in time, but written to the socket late).
    pub output_underrun_seconds: HistogramVec,
    /// Sequences in each batched decode step of the model engine.
    pub engine_batch_size: Histogram,
    /// Seconds per engine step (prefill chunk plus batched decode).
    pub engine_step_seconds: Histogram,
    /// Seconds a turn waited from the call's request to its first prefill chunk.
    pub engine_queue_wait_seconds: Histogram,
    /// Seconds from a turn's request to its first sampled token.
    pub engine_first_token_seconds: Histogram,
    /// KV-cache positions allocated by all calls, and the pool's budget.
    pub engine_kv_used_positions: IntGauge,
    pub engine_kv_used_bytes: IntGauge,
    pub engine_kv_budget_positions: IntGauge,
    /// Idle calls' caches freed to make room.
    pub engine_evictions: IntCounter,
    /// Replies waiting for their call to take tokens.
    pub engine_parked: IntGauge,
    /// Turns waiting for admission (encoder and KV memory).
    pub engine_waiting_turns: IntGauge,
    /// Replies generating.
    pub engine_running: IntGauge,
    /// Seconds per end-of-turn model inference (one batch of turns).
    pub end_of_turn_seconds: Histogram,
    /// Seconds from asking the end-of-turn model about a pause to its verdict, as the call
    /// waits for it (the worker's queue included).
    pub end_of_turn_delay_seconds: Histogram,
    /// End-of-turn requests waiting for the worker.
    pub end_of_turn_queued: IntGauge,
    /// End-of-turn decisions at a pause: `complete` (the turn ended there), `likely` (it ends
    /// after a shorter silence) or `incomplete`.
    pub end_of_turn_decisions: IntCounterVec,
    /// Preemptive replies by outcome: `started`, `committed`, `discarded`.
    pub preemptive_replies: IntCounterVec,
    /// Seconds discarded preemptive replies ran before they were taken back.
    pub preemptive_wasted_seconds: Counter,
    /// Replies paused by speech over them, by outcome: `resumed` (a false interruption: too
    /// short, or no turn) or `cut` (a barge-in).
    pub paused_replies: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("gazelle".into()), None).expect("valid prefix");
        let active_calls =
            IntGauge::new("active_calls", "Calls with an open transport").expect("valid metric");
        let pending_sockets = IntGauge::new(
            "pending_sockets",
            "Websockets waiting for their start message",
        )
        .expect("valid metric");
        let open_connections =
            IntGauge::new("open_connections", "HTTP connections being served").expect("valid");
        let input_throttled_seconds = Counter::new(
            "input_throttled_seconds_total",
            "Seconds callers waited because they sent audio faster than real time",
        )
        .expect("valid metric");
        let turn_stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "turn_stage_seconds",
                "Seconds from the true end of user speech to each stage of the reply",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0,
            ]),
            &["stage"],
        )
        .expect("valid metric");
        let vad_frame_seconds = HistogramVec::new(
            HistogramOpts::new("vad_frame_seconds", "Silero inference seconds per frame").buckets(
                vec![
                    10e-6, 20e-6, 40e-6, 60e-6, 80e-6, 100e-6, 150e-6, 250e-6, 500e-6, 1e-3, 2e-3,
                    4e-3, 8e-3, 16e-3, 32e-3,
                ],
            ),
            &["batch"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(Opts::new("errors_total", "Errors by kind"), &["kind"])
            .expect("valid metric");
        let barge_ins = IntCounterVec::new(
            Opts::new("barge_ins_total", "Replies cut off by the user"),
            &["during"],
        )
        .expect("valid metric");
        // From sub-millisecond (a loopback or LAN server) to seconds (a cold cloud voice).
        let tts_ttfb_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tts_ttfb_seconds",
                "Seconds from a text unit reaching the speech provider to its first audio byte",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                1.0, 2.0, 5.0,
            ]),
            &["provider"],
        )
        .expect("valid metric");
        let tts_failures = IntCounterVec::new(
            Opts::new(
                "tts_failures_total",
                "Replies a speech provider failed during, by provider",
            ),
            &["provider"],
        )
        .expect("valid metric");
        let output_underrun_seconds = HistogramVec::new(
            HistogramOpts::new(
                "output_underrun_seconds",
                "Seconds a caller's playback ran dry mid-reply before the next frame, by cause",
            )
            .buckets(vec![
                0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
            ]),
            &["cause"],
        )
        .expect("valid metric");
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let seconds = vec![
            0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
        ];
        let engine_batch_size = hist(
            "engine_batch_size",
            "Sequences in each batched decode step",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
        );
        let engine_step_seconds = hist(
            "engine_step_seconds",
            "Seconds per engine step",
            seconds.clone(),
        );
        let engine_queue_wait_seconds = hist(
            "engine_queue_wait_seconds",
            "Seconds from a turn's request to its first prefill chunk",
            seconds.clone(),
        );
        let engine_first_token_seconds = hist(
            "engine_first_token_seconds",
            "Seconds from a turn's request to its first token",
            seconds,
        );
        let engine_kv_used_positions = gauge(
            "engine_kv_used_positions",
            "KV positions allocated by all calls",
        );
        let engine_kv_used_bytes = gauge("engine_kv_used_bytes", "KV bytes allocated by all calls");
        let engine_kv_budget_positions = gauge(
            "engine_kv_budget_positions",
            "KV positions the pool may hold",
        );
        let engine_evictions = IntCounter::new(
            "engine_evictions_total",
            "Idle calls' KV caches freed to make room",
        )
        .expect("valid metric");
        let engine_parked = gauge(
            "engine_parked",
            "Replies waiting for their call to take tokens",
        );
        let engine_waiting_turns = gauge("engine_waiting_turns", "Turns waiting for admission");
        let engine_running = gauge("engine_running", "Replies generating");
        let end_of_turn_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "end_of_turn_seconds",
                "Seconds per end-of-turn model inference (one batch)",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
            ]),
        )
        .expect("valid metric");
        let end_of_turn_delay_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "end_of_turn_delay_seconds",
                "Seconds from asking the end-of-turn model about a pause to its verdict (queue \
                 included)",
            )
            .buckets(vec![
                0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0, 1.5,
            ]),
        )
        .expect("valid metric");
        let end_of_turn_queued = gauge(
            "end_of_turn_queued",
            "End-of-turn requests waiting for the worker",
        );
        let end_of_turn_decisions = IntCounterVec::new(
            Opts::new(
                "end_of_turn_decisions_total",
                "End-of-turn model decisions at a pause (complete, likely, incomplete), and \
                 requests withdrawn: the pause was over before the model reached it, not run",
            ),
            &["decision"],
        )
        .expect("valid metric");
        let preemptive_replies = IntCounterVec::new(
            Opts::new(
                "preemptive_replies_total",
                "Replies started at a pause, by outcome (started, committed, discarded)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let preemptive_wasted_seconds = Counter::new(
            "preemptive_wasted_seconds_total",
            "Seconds discarded preemptive replies ran before they were taken back",
        )
        .expect("valid metric");
        let paused_replies = IntCounterVec::new(
            Opts::new(
                "paused_replies_total",
                "Replies paused by speech over them, by outcome (resumed, cut)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [
            Box::new(end_of_turn_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(end_of_turn_delay_seconds.clone()),
            Box::new(end_of_turn_queued.clone()),
            Box::new(paused_replies.clone()),
            Box::new(end_of_turn_decisions.clone()),
            Box::new(preemptive_replies.clone()),
            Box::new(preemptive_wasted_seconds.clone()),
            Box::new(engine_batch_size.clone()),
            Box::new(engine_step_seconds.clone()),
            Box::new(engine_queue_wait_seconds.clone()),
            Box::new(engine_first_token_seconds.clone()),
            Box::new(engine_kv_used_positions.clone()),
            Box::new(engine_kv_used_bytes.clone()),
            Box::new(engine_kv_budget_positions.clone()),
            Box::new(engine_evictions.clone()),
            Box::new(engine_parked.clone()),
            Box::new(engine_waiting_turns.clone()),
            Box::new(engine_running.clone()),
            Box::new(active_calls.clone()),
            Box::new(pending_sockets.clone()),
            Box::new(open_connections.clone()),
            Box::new(input_throttled_seconds.clone()),
            Box::new(turn_stage_seconds.clone()),
            Box::new(vad_frame_seconds.clone()),
            Box::new(errors.clone()),
            Box::new(barge_ins.clone()),
            Box::new(tts_ttfb_seconds.clone()),
            Box::new(tts_failures.clone()),
            Box::new(output_underrun_seconds.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            active_calls,
            pending_sockets,
            open_connections,
            input_throttled_seconds,
            turn_stage_seconds,
            vad_frame_seconds,
            errors,
            barge_ins,
            tts_ttfb_seconds,
            tts_failures,
            output_underrun_seconds,
            engine_batch_size,
            engine_step_seconds,
            engine_queue_wait_seconds,
            engine_first_token_seconds,
            engine_kv_used_positions,
            engine_kv_used_bytes,
            engine_kv_budget_positions,
            engine_evictions,
            engine_parked,
            engine_waiting_turns,
            engine_running,
            end_of_turn_seconds,
            end_of_turn_delay_seconds,
            end_of_turn_queued,
            end_of_turn_decisions,
            preemptive_replies,
            preemptive_wasted_seconds,
            paused_replies,
        }
    }

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
