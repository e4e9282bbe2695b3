//! Twilio's HTTP side: the voice webhook that answers with TwiML connecting the call to our media
//! stream (or saying why not and hanging up, when the model is not ready or the server is full), the
//! media-stream websocket route, and request-signature checks when an auth token is
//! configured.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::metrics::ErrorKind;
use crate::model::ModelStatus;
use crate::transport::guard::Untrusted;
use crate::transport::twilio::handler::{self, StreamAuth, STREAM_TOKEN};
use crate::transport::twilio::protocol;
use crate::transport::waiting::Door;

/// Largest webhook body; Twilio's are a few kilobytes.
const MAX_WEBHOOK_BODY: usize = 64 * 1024;
/// A webhook body must arrive within this.
const WEBHOOK_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Twilio settings resolved at start-up.
#[derive(Clone, Default)]
pub struct TwilioSettings {
    /// The public base URL Twilio reaches us at (e.g. `https://voice.example.com`); else the
    /// request's Host header with https/wss.
    pub public_url: Option<String>,
    /// When set, every Twilio request must carry a valid `X-Twilio-Signature`.
    pub auth_token: Option<Arc<str>>,
    /// Streams must carry the per-call token of the webhook's TwiML.
    pub require_stream_token: bool,
}

impl std::fmt::Debug for TwilioSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioSettings")
            .field("public_url", &self.public_url)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl TwilioSettings {
    /// The URL Twilio used for this request, with `scheme` (https or wss) when reconstructed.
    fn url(&self, headers: &HeaderMap, uri: &Uri, scheme: &str) -> String {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match &self.public_url {
            Some(base) => {
                let base = base.trim_end_matches('/');
                let base = if scheme == "wss" {
                    base.replacen("https://", "wss://", 1)
                        .replacen("http://", "ws://", 1)
                } else {
                    base.to_string()
                };
                format!("{base}{path}")
            }
            None => {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("");
                format!("{scheme}://{host}{path}")
            }
        }
    }

    fn check(
        &self,
        headers: &HeaderMap,
        url: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let Some(token) = &self.auth_token else {
            return Ok(());
        };
        let given = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok());
        match given {
            Some(sig) if protocol::verify(token, url, params, sig) => Ok(()),
            _ => {
                let url = Untrusted(url);
                tracing::warn!(%url, "rejected a Twilio request with a missing or bad signature");
                Err(ApiError::BadSignature)
            }
        }
    }
}

/// `POST /twilio/voice`: TwiML that connects the call to `/twilio/stream`. Query parameters
/// `system_prompt`, `first_message` and `voice` (e.g. `/twilio/voice?system_prompt=…` as the
/// number's webhook) pass through to the stream as `<Parameter>`s.
pub(crate) async fn voice(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    state
        .auth
        .check_twilio_open()
        .map_err(|e| state.refuse(e))?;
    let read = axum::body::to_bytes(body, MAX_WEBHOOK_BODY);
    let body = match tokio::time::timeout(WEBHOOK_BODY_TIMEOUT, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            let why = format!("the webhook body exceeds {MAX_WEBHOOK_BODY} bytes or broke off");
            return Err(state.refuse(ApiError::TooLarge(why)));
        }
        Err(_) => {
            let why = "the webhook body took too long";
            return Err(state.refuse(ApiError::Timeout(why)));
        }
    };
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let url = state.twilio.url(&headers, &uri, "https");
    state
        .twilio
        .check(&headers, &url, &form)
        .map_err(|e| state.refuse(e))?;
    let call_sid = form.get("CallSid").map(String::as_str).unwrap_or("");
    if !call_sid.is_empty() {
        crate::pipeline::limits::check_id(call_sid)
            .map_err(|e| state.refuse(ApiError::BadRequest(e.kind(), e.to_string())))?;
    }
    let call = Untrusted(call_sid);
    // A caller hears why, instead of dead air, when no conversation can start.
    let unavailable = match state.services.slm.status() {
        _ if state.drain.draining() => {
            state.services.metrics.error(ErrorKind::Busy);
            Some(("server draining", DRAINING_SAY))
        }
        ModelStatus::Ready if state.calls.available_permits() == 0 => {
            state.services.metrics.error(ErrorKind::Busy);
            Some(("at its call limit", BUSY_SAY))
        }
        ModelStatus::Ready => None,
        ModelStatus::Loading { .. } => Some(("model still loading", LOADING_SAY)),
        ModelStatus::Failed(_) => Some(("model failed to load", UNAVAILABLE_SAY)),
    };
    if let Some((why, say)) = unavailable {
        tracing::warn!(%call, why, "Twilio call turned away");
        return Ok(twiml(protocol::twiml_say_and_hang_up(say)));
    }
    let stream_url = state
        .twilio
        .url(&headers, &"/twilio/stream".parse().expect("valid"), "wss");
    let mut parameters: BTreeMap<String, String> = query
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "system_prompt" | "first_message" | "voice"))
        .collect();
    let texts = state.services.limits.check_texts(
        parameters.get("system_prompt").map(String::as_str),
        parameters.get("first_message").map(String::as_str),
    );
    if let Err(e) = texts {
        tracing::warn!(%call, error = %e, "Twilio webhook parameters over the limits");
        return Err(state.refuse(ApiError::BadRequest(e.kind(), e.to_string())));
    }
    // The webhook's trace context goes with the stream, so the call's span joins the trace.
    let trace = crate::pipeline::call::TraceContext::from_headers(&headers);
    for (k, v) in [
        ("traceparent", trace.traceparent),
        ("tracestate", trace.tracestate),
    ] {
        if let Some(v) = v {
            parameters.insert(k.into(), v);
        }
    }
    // The stream must show this token, signed for this call, to start: a captured stream URL or
    // signature opens nothing.
    parameters.insert(STREAM_TOKEN.into(), state.auth.mint_stream_token(call_sid));
    tracing::info!(%call, "Twilio call");
    Ok(twiml(protocol::twiml_connect(&stream_url, &parameters)))
}

fn twiml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

const BUSY_SAY: &str = "Sorry, all our lines are busy. Please call again in a few minutes.";
const DRAINING_SAY: &str = "Sorry, the assistant is restarting. Please call again in a moment.";
const LOADING_SAY: &str =
    "Sorry, the assistant is still starting up. Please call again in a minute.";
const UNAVAILABLE_SAY: &str =
    "Sorry, the assistant is unavailable right now. Please try again later.";

/// `GET /twilio/stream`: the bidirectional media-stream websocket.
pub(crate) async fn stream(
    State(state): State<AppState>,
    peer: super::Peer,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    state
        .auth
        .check_twilio_open()
        .map_err(|e| state.refuse(e))?;
    let url = state.twilio.url(&headers, &uri, "wss");
    state
        .twilio
        .check(&headers, &url, &BTreeMap::new())
        .map_err(|e| state.refuse(e))?;
    // A stream is the second half of a call its webhook accepted, maybe just before a drain
    // began: it is let in (the webhook refuses new calls while draining).
    let admission = super::admit(&state, false, Door::Phone, peer)?;
    let settings = state.twilio_socket;
    let trace = crate::pipeline::call::TraceContext::from_headers(&headers);
    let stream_auth = StreamAuth {
        auth: state.auth.clone(),
        required: state.twilio.require_stream_token,
    };
    Ok(ws
        .max_message_size(settings.max_frame_bytes)
        .max_frame_size(settings.max_frame_bytes)
        .on_upgrade(move |socket| {
            handler::serve(
                socket,
                state.services,
                admission,
                settings,
                stream_auth,
                state.cancel,
                trace,
            )
        }))
}
