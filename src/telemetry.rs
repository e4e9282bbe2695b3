//! OpenTelemetry traces (`[telemetry]`): with `otlp_endpoint` set, spans go to an OTLP/HTTP
//! collector (protobuf, batched); off otherwise. One span per call (the `call` tracing span,
//! exported through tracing-opentelemetry), and one per turn, from the start of the user's speech
//! to the end of the reply, with a child span per latency stage (from the true end of speech to
//! the stage). A call's span takes its parent from the W3C `traceparent` of the request that
//! opened it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _};
use opentelemetry::{global, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP root, e.g. `http://otel-collector:4318`; spans go to
    /// `{otlp_endpoint}/v1/traces`. Unset: no traces.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of every span.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "gazelle".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint {0:?} is not an http(s) URL")]
    Endpoint(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Whether spans are exported: turn spans are only built then.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Flushes the spans still batched when dropped (at the end of `serve`).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::SeqCst);
        if let Err(e) = self.0.shutdown() {
            eprintln!("could not flush the last traces: {e}");
        }
    }
}

/// The exporter's HTTP client: our reqwest client, run on the server's tokio runtime (the batch
/// exporter calls it from its own thread).
#[derive(Debug)]
struct Client {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = client.execute(request).await?;
            let mut out = http::Response::builder().status(response.status());
            for (k, v) in response.headers() {
                out = out.header(k, v);
            }
            let body = response.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        });
        sent.await?
    }
}

/// The tracing layer that exports spans, and the guard that flushes them; `None` when
/// `otlp_endpoint` is unset. Export runs on `runtime`.
pub fn layer<S>(
    config: &TelemetryConfig,
    runtime: tokio::runtime::Handle,
) -> Result<Option<(impl tracing_subscriber::Layer<S>, Guard)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    let url =
        reqwest::Url::parse(endpoint).map_err(|_| TelemetryError::Endpoint(endpoint.clone()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TelemetryError::Endpoint(endpoint.clone()));
    }
    let client = crate::net::client(Duration::from_secs(5))
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client { client, runtime })
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    global::set_tracer_provider(provider.clone());
    ENABLED.store(true, Ordering::SeqCst);
    use opentelemetry::trace::TracerProvider as _;
    let tracer = provider.tracer("gazelle");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.target().starts_with("gazelle::telemetry")
        }));
    use tracing_subscriber::Layer as _;
    Ok(Some((layer, Guard(provider))))
}

/// What a call's spans say about it.
#[derive(Debug, Clone)]
pub(crate) struct CallInfo {
    pub id: String,
    pub transport: &'static str,
    pub model: String,
    pub voice: String,
}

impl CallInfo {
    fn attributes(&self) -> Vec<KeyValue> {
        vec![
            KeyValue::new("gazelle.call.id", self.id.clone()),
            KeyValue::new("gazelle.transport", self.transport),
            KeyValue::new("gazelle.model", self.model.clone()),
            KeyValue::new("gazelle.voice", self.voice.clone()),
        ]
    }
}

/// The span of one call, a child of the W3C `traceparent` (and `tracestate`) of the request that
/// opened it when there is a valid one.
pub(crate) fn call_span(
    info: &CallInfo,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: "gazelle::telemetry",
        "call",
        gazelle.call.id = %info.id,
        gazelle.transport = info.transport,
        gazelle.model = %info.model,
        gazelle.voice = %info.voice,
    );
    if let Some(tp) = traceparent {
        let mut carrier = std::collections::HashMap::new();
        carrier.insert("traceparent".to_string(), tp.to_string());
        if let Some(ts) = tracestate {
            carrier.insert("tracestate".to_string(), ts.to_string());
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// One reply to a user turn, for its span.
pub(crate) struct TurnTrace<'a> {
    pub reply: u64,
    /// When the user's speech started and truly ended.
    pub speech_start: Instant,
    pub true_end: Instant,
    /// When the reply ended (played out, cut, or the call ended).
    pub ended: Instant,
    pub barge_in: bool,
    /// Each stage and when it was reached, in milliseconds after the true end.
    pub stages: &'a [(&'static str, Option<f64>)],
}

/// Exports a turn's span, with a child per stage, under the call's span.
pub(crate) fn record_turn(call: &tracing::Span, info: &CallInfo, t: &TurnTrace) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    let (now, wall) = (Instant::now(), SystemTime::now());
    let at = |i: Instant| wall - now.saturating_duration_since(i);
    let after_end = |ms: f64| at(t.true_end) + Duration::from_secs_f64(ms.max(0.0) / 1e3);
    let tracer = global::tracer("gazelle");
    let parent = call.context();
    let mut attributes = info.attributes();
    attributes.push(KeyValue::new("gazelle.reply", t.reply as i64));
    attributes.push(KeyValue::new("gazelle.barge_in", t.barge_in));
    for (name, ms) in t.stages {
        if let Some(ms) = ms {
            attributes.push(KeyValue::new(format!("gazelle.{name}_ms"), *ms));
        }
    }
    let turn = tracer
        .span_builder("turn")
        .with_start_time(at(t.speech_start))
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let turn_cx = parent.with_span(turn);
    for (name, ms) in t.stages {
        let Some(ms) = ms else { continue };
        let mut stage = tracer
            .span_builder(*name)
            .with_start_time(at(t.true_end))
            .with_attributes(vec![KeyValue::new("gazelle.latency_ms", *ms)])
            .start_with_context(&tracer, &turn_cx);
        stage.end_with_timestamp(after_end(*ms));
    }
    turn_cx.span().end_with_timestamp(at(t.ended));
}
