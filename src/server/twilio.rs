//! Twilio's HTTP side: the voice webhook that answers with TwiML connecting the call to our media
//! stream (or saying why not and hanging up, when the model is not ready or the server is full), the
//! media-stream websocket route, and request-signature checks when an auth token is
//! configured.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, RawForm, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::model::ModelStatus;
use crate::transport::twilio::{handler, protocol};

/// A request whose `X-Twilio-Signature` is missing or wrong.
pub struct BadSignature;

impl IntoResponse for BadSignature {
    fn into_response(self) -> Response {
        (StatusCode::FORBIDDEN, "invalid X-Twilio-Signature").into_response()
    }
}

/// Twilio settings resolved at start-up.
#[derive(Clone, Default)]
pub struct TwilioSettings {
    /// The public base URL Twilio reaches us at (e.g. `https://voice.example.com`); else the
    /// request's Host header with https/wss.
    pub public_url: Option<String>,
    /// When set, every Twilio request must carry a valid `X-Twilio-Signature`.
    pub auth_token: Option<Arc<str>>,
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
    ) -> Result<(), BadSignature> {
        let Some(token) = &self.auth_token else {
            return Ok(());
        };
        let given = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok());
        match given {
            Some(sig) if protocol::verify(token, url, params, sig) => Ok(()),
            _ => {
                tracing::warn!(%url, "rejected a Twilio request with a missing or bad signature");
                Err(BadSignature)
            }
        }
    }
}

/// `POST /twilio/voice`: TwiML that connects the call to `/twilio/stream`. Query parameters
/// `system_prompt`, `first_message` and `voice` (e.g. `/twilio/voice?system_prompt=…` as the
/// number's webhook) pass through to the stream as `<Parameter>`s.
pub async fn voice(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    RawForm(body): RawForm,
) -> Response {
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let url = state.twilio.url(&headers, &uri, "https");
    if let Err(r) = state.twilio.check(&headers, &url, &form) {
        state.services.metrics.error("twilio_signature");
        return r.into_response();
    }
    let call = form.get("CallSid").map(String::as_str).unwrap_or("?");
    // A caller hears why, instead of dead air, when no conversation can start.
    let unavailable = match state.services.slm.status() {
        ModelStatus::Ready if state.calls.available_permits() == 0 => {
            state.services.metrics.error("busy");
            Some(("at its call limit", BUSY_SAY))
        }
        ModelStatus::Ready => None,
        ModelStatus::Loading { .. } => Some(("model still loading", LOADING_SAY)),
        ModelStatus::Failed(_) => Some(("model failed to load", UNAVAILABLE_SAY)),
    };
    if let Some((why, say)) = unavailable {
        tracing::warn!(call, why, "Twilio call turned away");
        return (
            [(header::CONTENT_TYPE, "text/xml")],
            protocol::twiml_say_and_hang_up(say),
        )
            .into_response();
    }
    let stream_url = state
        .twilio
        .url(&headers, &"/twilio/stream".parse().expect("valid"), "wss");
    let parameters: BTreeMap<String, String> = query
        .into_iter()
        .filter(|(k, _)| matches!(k.as_str(), "system_prompt" | "first_message" | "voice"))
        .collect();
    tracing::info!(call, "Twilio call");
    (
        [(header::CONTENT_TYPE, "text/xml")],
        protocol::twiml_connect(&stream_url, &parameters),
    )
        .into_response()
}

const BUSY_SAY: &str = "Sorry, all our lines are busy. Please call again in a few minutes.";
const LOADING_SAY: &str =
    "Sorry, the assistant is still starting up. Please call again in a minute.";
const UNAVAILABLE_SAY: &str =
    "Sorry, the assistant is unavailable right now. Please try again later.";

/// `GET /twilio/stream`: the bidirectional media-stream websocket.
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    let url = state.twilio.url(&headers, &uri, "wss");
    if let Err(r) = state.twilio.check(&headers, &url, &BTreeMap::new()) {
        state.services.metrics.error("twilio_signature");
        return r.into_response();
    }
    let Ok(permit) = state.calls.clone().try_acquire_owned() else {
        state.services.metrics.error("busy");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is at its call limit",
        )
            .into_response();
    };
    ws.on_upgrade(move |socket| async move {
        handler::serve(socket, state.services, state.cancel).await;
        drop(permit);
    })
}
