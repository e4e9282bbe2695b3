//! The PlayHT peer: `POST /api/v2/tts/stream`.

use super::*;

pub(super) async fn stream(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let b = log.next();
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if h("authorization") != KEY || h("x-user-id") != USER {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    log.push(format!(
        "playht rate={} format={} engine={} {text}",
        v["sample_rate"], v["output_format"], v["voice_engine"]
    ));
    stream_body(
        log.clone(),
        format!("playht {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        Vec::new(),
    )
}
