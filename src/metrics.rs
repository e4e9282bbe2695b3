//! Prometheus instruments for the whole server, in one registry that `/metrics` renders. Buckets
//! are sized to what each measures: the VAD to its 32 ms frame budget, turn stages to the
//! end-of-speech → first-audio budget.

use std::time::{Duration, Instant};

use prometheus::{
    Counter, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Playback gaps shorter than this are timer noise, not an underrun.
pub const UNDERRUN_TOLERANCE: Duration = Duration::from_millis(1);

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
    /// Seconds a caller's playback ran dry mid-reply before the next frame went out, by cause:
    /// `synthesis` (its audio was not ready), `scheduling` (ready, but the pacer sent it late) or
    /// `transport` (handed over in time, but written to the socket late).
    pub output_underrun_seconds: HistogramVec,
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
        for c in [
            Box::new(active_calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pending_sockets.clone()),
            Box::new(open_connections.clone()),
            Box::new(input_throttled_seconds.clone()),
            Box::new(turn_stage_seconds.clone()),
            Box::new(vad_frame_seconds.clone()),
            Box::new(errors.clone()),
            Box::new(barge_ins.clone()),
            Box::new(tts_ttfb_seconds.clone()),
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
            output_underrun_seconds,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// A gap of `by` in a caller's playback, by cause (`synthesis`, `scheduling`, `transport`).
    pub fn underrun(&self, cause: &str, by: Duration) {
        self.output_underrun_seconds
            .with_label_values(&[cause])
            .observe(by.as_secs_f64());
    }

    /// A transport has just written an audio frame that the caller's playback needed at `due`;
    /// a write after that is a gap the caller hears, caused by the transport.
    pub fn frame_delivered(&self, due: Option<Instant>) {
        let Some(due) = due else { return };
        let now = tokio::time::Instant::now().into_std();
        if now > due + UNDERRUN_TOLERANCE {
            self.underrun("transport", now - due);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport_gaps(m: &Metrics) -> (u64, f64) {
        let h = m.output_underrun_seconds.with_label_values(&["transport"]);
        (h.get_sample_count(), h.get_sample_sum())
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
