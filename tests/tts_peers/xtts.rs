//! The coqui xtts-streaming-server peer: `/clone_speaker`, `/studio_speakers`, `/tts_stream`.

use super::*;

fn speaker_json() -> serde_json::Value {
    serde_json::json!({"speaker_embedding": [0.25, -0.5, 1.0], "gpt_cond_latent": [[0.1, 0.2], [0.3, 0.4]]})
}

pub(super) async fn clone_speaker(
    State(log): State<Arc<PeerLog>>,
    body: axum::body::Bytes,
) -> Response {
    let has_file =
        body.windows(8).any(|w| w == b"wav_file") && body.windows(4).any(|w| w == b"RIFF");
    log.push(format!("clone_speaker file={has_file}"));
    axum::Json(speaker_json()).into_response()
}

pub(super) async fn studio_speakers(State(log): State<Arc<PeerLog>>) -> Response {
    log.push("studio_speakers");
    axum::Json(serde_json::json!({"Ana Florence": speaker_json(), "Other": {"speaker_embedding": [9], "gpt_cond_latent": [[9]]}}))
        .into_response()
}

pub(super) async fn tts_stream(State(log): State<Arc<PeerLog>>, body: String) -> Response {
    let b = log.next();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ok = v["speaker_embedding"] == speaker_json()["speaker_embedding"]
        && v["gpt_cond_latent"] == speaker_json()["gpt_cond_latent"]
        && v["add_wav_header"] == false
        && v["language"].is_string();
    let text = v["text"].as_str().unwrap_or_default().to_string();
    log.push(format!("tts_stream speaker_ok={ok} {text}"));
    if !ok {
        return status(422);
    }
    if let Behavior::Status(c) = b {
        return status(c);
    }
    stream_body(
        log.clone(),
        format!("xtts {text}"),
        b,
        tone_bytes(&text, Enc::Pcm),
        Vec::new(),
    )
}
