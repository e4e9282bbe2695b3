//! The HTTP server: the router (`/conversation`, `/health`, `/metrics`, and the web page at `/`
//! from [`frontend`]), the shared state every connection gets, a cap on concurrent calls, and
//! graceful shutdown (signal → cancel every call → drain).

pub mod frontend;
pub mod setup;
pub mod twilio;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::model::ModelStatus;
use crate::pipeline::call::Services;
use crate::transport::vocode::handler::{self, Limits};

/// Largest websocket message the socket layer accepts; our own, smaller limit answers with an
/// error instead of dropping the connection.
const SOCKET_MESSAGE_LIMIT: usize = 16 << 20;

#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub limits: Limits,
    /// Cancelled on shutdown; every call's token is a child of it.
    pub cancel: CancellationToken,
    /// One permit per call in progress; refuses callers beyond `max_calls`.
    pub calls: Arc<Semaphore>,
    pub twilio: twilio::TwilioSettings,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/conversation", get(conversation))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/calls", get(list_calls))
        .route("/calls/{id}/history", get(call_history))
        .route("/twilio/voice", axum::routing::post(twilio::voice))
        .route("/twilio/stream", get(twilio::stream))
        .merge(frontend::routes())
        .with_state(state)
}

async fn conversation(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let Ok(permit) = state.calls.clone().try_acquire_owned() else {
        state.services.metrics.error("busy");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is at its call limit (server.max_calls); try again later",
        )
            .into_response();
    };
    ws.max_message_size(SOCKET_MESSAGE_LIMIT)
        .max_frame_size(SOCKET_MESSAGE_LIMIT)
        .on_upgrade(move |socket| async move {
            handler::serve(socket, state.services, state.limits, state.cancel).await;
            drop(permit);
        })
}

/// `status` is `ok` (200) once calls can start, `loading` (503, with `loading_s`) while the model
/// loads, and `error` (503, with `error`) if it failed to load.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let model = state.services.slm.status();
    let mut body = serde_json::json!({
        "status": model.word(),
        "active_calls": state.services.metrics.active_calls.get(),
        "slm": state.services.slm.name(),
        "tts": state.services.tts.name(),
    });
    if let Some(t) = model.loading_for() {
        body["loading_s"] = t.as_secs_f64().into();
    }
    if let ModelStatus::Failed(e) = &model {
        body["error"] = e.as_str().into();
    }
    let code = match model {
        ModelStatus::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(body))
}

async fn list_calls(State(state): State<AppState>) -> impl IntoResponse {
    Json(serde_json::json!({ "calls": state.services.registry.ids() }))
}

/// The conversation so far of a live call, by its id (the Twilio call SID, the Vocode
/// `conversation_id`, or the generated id).
async fn call_history(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Some(commands) = state.services.registry.get(&id) else {
        return (StatusCode::NOT_FOUND, format!("no live call {id:?}")).into_response();
    };
    match crate::pipeline::call::history(&commands).await {
        Ok(c) => Json(c).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, format!("call {id:?} has ended")).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.services.metrics.render(),
    )
}

/// Serves until `shutdown` resolves, then cancels every call and waits for them to end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cancel = state.cancel.clone();
    let calls = state.calls.clone();
    let max = calls.available_permits();
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: ending calls");
            cancel.cancel();
        })
        .await?;
    // Every call holds a permit until its tasks are done.
    let _ = calls.acquire_many(max as u32).await;
    Ok(())
}
