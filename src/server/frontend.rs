//! The web page served at `/`: the built assets of `frontend/` (committed in `frontend/dist/`),
//! embedded in the binary at compile time so `gazelle serve` needs no Node and no files beside it,
//! and `GET /config`, which tells the page what the server offers.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;

const INDEX: &str = include_str!("../../frontend/dist/index.html");
const APP_JS: &str = include_str!("../../frontend/dist/app.js");
const WORKLET_JS: &str = include_str!("../../frontend/dist/worklet.js");
const STYLE_CSS: &str = include_str!("../../frontend/dist/style.css");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The page's routes, merged into the server's router.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route("/assets/app.js", get(|| async { asset(JS, APP_JS) }))
        .route(
            "/assets/worklet.js",
            get(|| async { asset(JS, WORKLET_JS) }),
        )
        .route("/assets/style.css", get(|| async { asset(CSS, STYLE_CSS) }))
        .route("/config", get(config))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    // The assets change with the binary, so caches must ask again; `no-cache` still allows
    // revalidation, which keeps reloads during development honest.
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// What the page needs to draw its controls: the voices on offer (the choice is shown only when
/// there is more than one), the server's default prompt and first message, and whether calls
/// need a call token (`"auth": "token"`, minted with the access key) or nothing (`"none"`).
async fn config(State(state): State<AppState>) -> impl IntoResponse {
    let settings = &state.services.settings;
    Json(serde_json::json!({
        "slm": state.services.slm.name(),
        "voices": [state.services.tts.name()],
        "system_prompt": settings.system_prompt,
        "first_message": settings.first_message,
        "auth": if state.auth.required() { "token" } else { "none" },
    }))
}
