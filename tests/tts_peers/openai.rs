//! The OpenAI-compatible peer: `POST /v1/audio/speech` streaming pcm or wav.

use super::*;

pub(super) async fn speech(
    State(log): State<Arc<PeerLog>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let b = log.next();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {KEY}") {
        return status(401);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["input"].as_str().unwrap_or_default().to_string();
    let fmt = v["response_format"].as_str().unwrap_or("mp3").to_string();
    log.push(format!(
        "speech format={fmt} model={} voice={} {text}",
        v["model"], v["voice"]
    ));
    let header = match fmt.as_str() {
        "pcm" => Vec::new(),
        "wav" => {
            // A streaming header: the data length is unknown.
            let mut h = gazelle::audio::wav::write(&[], 24_000, gazelle::audio::Encoding::Linear16);
            let n = h.len();
            h[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
            h
        }
        _ => return status(400),
    };
    stream_body(
        log.clone(),
        format!("openai {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        header,
    )
}
