//! The HTTP server: the router (`/conversation`, `/auth/token`, `/health`, `/metrics`, the call
//! registry, Twilio's routes, and the web page at `/` from [`frontend`]), the shared state every
//! connection gets, admission (credentials, origin, a slot for a socket waiting to start and one
//! per call), and graceful shutdown: a drain (new calls refused, `/health` 503 `draining`, live
//! calls go on until they end or the drain times out, then a goodbye), then stop accepting,
//! cancel every call, and wait for them.

pub(crate) mod error;
pub(crate) mod frontend;
pub mod listener;
pub mod setup;
pub(crate) mod twilio;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::model::ModelStatus;
use crate::pipeline::call::Services;
use crate::transport::socket::{Admission, SocketSettings};
use crate::transport::vocode::handler;
use crate::transport::waiting::{Door, Refusal, WaitingRoom};
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    /// The bounds of a Vocode call's socket.
    pub(crate) socket: SocketSettings,
    /// The bounds of a Twilio media stream.
    pub(crate) twilio_socket: SocketSettings,
    /// Cancelled on shutdown; every call's token is a child of it.
    pub cancel: CancellationToken,
    /// One permit per call in progress; refuses callers beyond `max_calls`.
    pub calls: Arc<Semaphore>,
    /// A seat per websocket waiting for its start message (`max_pending_sockets`), shared out
    /// by client address and door.
    pub pending: Arc<WaitingRoom>,
    pub twilio: twilio::TwilioSettings,
    pub auth: Arc<crate::transport::auth::Auth>,
    pub(crate) listen: listener::ListenSettings,
    pub drain: Arc<Drain>,
}

/// The server's drain: set on the first shutdown signal.
#[derive(Debug, Default)]
pub struct Drain {
    pub(crate) started: std::sync::atomic::AtomicBool,
    /// How long live calls may go on once it starts.
    pub timeout: std::time::Duration,
    /// Spoken to the calls still live when it times out.
    pub goodbye: Option<String>,
}

impl Drain {
    pub(crate) fn draining(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How [`serve`] is told to stop: `drain` starts a graceful drain (the first SIGTERM or
/// Ctrl-C); `now` ends the server at once (a second signal, or a model that failed to load).
#[derive(Clone, Default)]
pub struct Stop {
    pub drain: CancellationToken,
    pub now: CancellationToken,
}

pub(crate) fn app(state: AppState) -> Router {
    Router::new()
        .route("/conversation", get(conversation))
        .route("/auth/token", post(call_token))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/calls", get(list_calls))
        .route("/calls/{id}/history", get(call_history))
        .route("/twilio/voice", post(twilio::voice))
        .route("/twilio/stream", get(twilio::stream))
        .merge(frontend::routes())
        .with_state(state)
}

impl AppState {
    /// Counts a refusal under its error kind and passes it on.
    fn refuse(&self, e: impl Into<ApiError>) -> ApiError {
        let e = e.into();
        if let Some(kind) = e.kind() {
            self.services.metrics.error(kind);
        }
        e
    }
}

/// A websocket's place before its call starts: refused with 503 when every call slot or every
/// seat its door may use is taken, with 429 when its address holds its share of seats, or
/// (`new_call`) while the server drains.
fn admit(state: &AppState, new_call: bool, door: Door, peer: Peer) -> Result<Admission, ApiError> {
    if new_call && state.drain.draining() {
        return Err(state.refuse(ApiError::Draining));
    }
    if state.calls.available_permits() == 0 {
        return Err(state.refuse(ApiError::Busy(
            "the server is at its call limit (server.max_calls); try again later",
        )));
    }
    let seat = state.pending.enter(door, peer.0).map_err(|r| {
        state.refuse(match r {
            Refusal::Full => ApiError::Busy(
                "too many connections are waiting to start a call (server.max_pending_sockets); \
                 try again later",
            ),
            Refusal::AddressFull => ApiError::TooManyFromAddress(
                "this address has too many connections waiting to start a call \
                 (server.max_pending_per_address); start or close them first",
            ),
        })
    })?;
    Ok(Admission::new(seat, state.calls.clone()))
}

/// The client's address as our listener saw it (the unspecified address where the router runs
/// without it, as in tests through `oneshot`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(Peer(ip))
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

async fn conversation(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    state
        .auth
        .check_origin(&headers)
        .map_err(|e| state.refuse(e))?;
    // Capacity before credentials, so a refused caller does not spend its single-use token.
    let admission = admit(&state, true, Door::Web, peer)?;
    state
        .auth
        .check_call(&headers, query.token.as_deref())
        .map_err(|e| state.refuse(e))?;
    // Frames between our limit and twice it get a `frame_too_large` error; larger ones never
    // reach memory whole: the socket layer refuses them and the call ends (1009).
    let socket_limit = state.socket.max_frame_bytes.saturating_mul(2);
    let trace = crate::pipeline::call::TraceContext::from_headers(&headers);
    Ok(ws
        .max_message_size(socket_limit)
        .max_frame_size(socket_limit)
        .on_upgrade(move |socket| {
            handler::serve(
                socket,
                state.services,
                admission,
                state.socket,
                state.cancel,
                trace,
            )
        }))
}

/// `POST /auth/token`: a single-use call token for a holder of the API key.
async fn call_token(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let token = state
        .auth
        .mint_call_token(&headers)
        .map_err(|e| state.refuse(e))?;
    Ok(Json(serde_json::json!({
        "token": token,
        "expires_in": state.auth.token_ttl().as_secs(),
    })))
}

/// `status` is `ok` (200) once calls can start, `degraded` (200) while sockets waiting to start
/// are being refused (within the last 10 s; `pending_fill` says how full their room is),
/// `loading` (503, with `loading_s`) while the model loads, `error` (503, with `error`) if it
/// failed to load, and `draining` (503) once the server is shutting down: a load balancer sends
/// it no more calls. `degraded` stays 200 so that a flood of sockets cannot take the server out
/// of its balancer's rotation.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let model = state.services.slm.status();
    let m = &state.services.metrics;
    let draining = state.drain.draining();
    let pressure = state.pending.pressure();
    let status = match &model {
        _ if draining => "draining",
        // Up, but new callers are being turned away: a socket was refused a seat lately.
        ModelStatus::Ready if pressure.refusing => "degraded",
        _ => model.word(),
    };
    let mut body = serde_json::json!({
        "status": status,
        "active_calls": m.active_calls.get(),
        "pending_sockets": m.pending_sockets.get(),
        "pending_fill": (pressure.fill * 1000.0).round() / 1000.0,
        "open_connections": m.open_connections.get(),
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
        ModelStatus::Ready if !draining => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(body))
}

/// `GET /calls`: the live calls' ids (admin token only).
async fn list_calls(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .auth
        .check_admin(&headers)
        .map_err(|e| state.refuse(e))?;
    Ok(Json(
        serde_json::json!({ "calls": state.services.registry.ids() }),
    ))
}

/// The conversation so far of a live call, by its id (the Twilio call SID, the Vocode
/// `conversation_id`, or the generated id); admin token only.
async fn call_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<crate::pipeline::conversation::Conversation>, ApiError> {
    state
        .auth
        .check_admin(&headers)
        .map_err(|e| state.refuse(e))?;
    let shown = crate::transport::guard::Untrusted(&id);
    let commands = state
        .services
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no live call {shown}")))?;
    let history = crate::pipeline::call::history(&commands).await;
    history
        .map(Json)
        .map_err(|_| ApiError::NotFound(format!("call {shown} has ended")))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.services.metrics.render(),
    )
}

/// Gives freed heap memory back to the system once a minute, and as soon as the last call ends.
/// glibc's allocator keeps what calls free for reuse, so under steady call turnover the
/// process's RSS drifts up by a few percent while live memory stays flat; trimming makes RSS
/// (what a container limit sees) track what the calls actually hold, and a server whose calls
/// have ended returns to its idle size. It only walks the free lists; the call count is read
/// once a second.
async fn trim_heap(metrics: Arc<crate::metrics::Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_trim = 0u32;
    let mut had_calls = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        since_trim += 1;
        let calls = metrics.active_calls.get() > 0;
        let all_ended = had_calls && !calls;
        had_calls |= calls;
        if since_trim < 60 && !all_ended {
            continue;
        }
        since_trim = 0;
        had_calls = calls;
        crate::memory::release_free_heap();
    }
}

/// Serves until told to stop. On `stop.drain` it drains: new calls are refused and `/health`
/// says `draining`, while live calls go on until they end or `drain.timeout` passes; then the
/// calls still live hear the goodbye, if one is set, and end. On `stop.now` (at any point) it
/// skips what is left of the drain. Then it stops accepting, cancels every call and waits for
/// calls, sockets and requests to end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    stop_when: Stop,
) -> std::io::Result<()> {
    let max_calls = state.calls.available_permits() as u32;
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let stop = CancellationToken::new();
    crate::memory::bound_retained_heap();
    tokio::spawn(trim_heap(state.services.metrics.clone(), stop.clone()));
    let accept = tokio::spawn(listener::serve(
        listener,
        app(state.clone()),
        state.listen,
        state.services.metrics.clone(),
        stop.clone(),
    ));
    tokio::select! {
        _ = stop_when.drain.cancelled() => {}
        _ = stop_when.now.cancelled() => {}
    }
    if !stop_when.now.is_cancelled() {
        tokio::select! {
            _ = drain(&state, max_calls) => {}
            _ = stop_when.now.cancelled() => tracing::info!("second signal: ending every call now"),
        }
    }
    tracing::info!("shutting down: ending calls");
    stop.cancel();
    state.cancel.cancel();
    let _ = accept.await;
    // Every call holds a permit, and every socket waiting to start a seat, until its tasks are
    // done.
    let _ = state.calls.acquire_many(max_calls).await;
    state.pending.emptied().await;
    Ok(())
}

/// The longest a goodbye at the end of a drain may take to be spoken.
const GOODBYE_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Refuses new calls and waits for the live ones to end, up to the drain timeout; then asks the
/// calls still live to say the goodbye and hang up, and waits for that (bounded).
async fn drain(state: &AppState, max_calls: u32) {
    state
        .drain
        .started
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let live = |s: &AppState| max_calls as usize - s.calls.available_permits();
    tracing::info!(
        live_calls = live(state),
        timeout_s = state.drain.timeout.as_secs_f64(),
        "draining: refusing new calls; live calls go on"
    );
    let idle = async {
        while live(state) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(state.drain.timeout, idle)
        .await
        .is_ok()
    {
        tracing::info!("drained: no live calls");
        return;
    }
    let Some(text) = state.drain.goodbye.clone() else {
        tracing::info!(
            live_calls = live(state),
            "drain timed out; ending the calls left"
        );
        return;
    };
    tracing::info!(
        live_calls = live(state),
        "drain timed out; saying goodbye to the calls left"
    );
    for id in state.services.registry.ids() {
        if let Some(commands) = state.services.registry.get(&id) {
            crate::pipeline::call::goodbye(&commands, text.clone()).await;
        }
    }
    let said = async {
        while live(state) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(GOODBYE_LIMIT, said).await;
}
