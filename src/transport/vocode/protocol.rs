//! The Vocode wire format: JSON text frames tagged by `type`, parsed and produced as pure
//! functions so the handler stays about IO.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audio::{wav, Encoding};
use crate::metrics::ErrorKind;
use crate::pipeline::conversation::Conversation;
use crate::pipeline::Timeline;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct InputAudioConfig {
    pub sampling_rate: u32,
    pub audio_encoding: Encoding,
    #[serde(default)]
    pub chunk_size: Option<u32>,
    #[serde(default)]
    pub downsampling: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct OutputAudioConfig {
    pub sampling_rate: u32,
    pub audio_encoding: Encoding,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct AudioConfigStart {
    pub input_audio_config: InputAudioConfig,
    pub output_audio_config: OutputAudioConfig,
    #[serde(default)]
    pub conversation_id: Option<String>,
    #[serde(default)]
    pub subscribe_transcript: Option<bool>,
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub first_message: Option<String>,
}

/// Client → server messages. Unknown fields are ignored, as the SDK sends more than we need.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum ClientMessage {
    #[serde(rename = "websocket_audio_config_start")]
    AudioConfigStart(AudioConfigStart),
    #[serde(rename = "websocket_audio")]
    Audio { data: String },
    #[serde(rename = "websocket_stop")]
    Stop,
    /// Extension: asks for a `gazelle_history` reply.
    #[serde(rename = "gazelle_get_history")]
    GetHistory,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum ProtocolError {
    #[error("malformed JSON: {0}")]
    BadJson(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("message {kind:?} is missing fields or has wrong types: {detail}")]
    BadMessage { kind: String, detail: String },
    #[error("audio data is not valid base64: {0}")]
    BadBase64(String),
}

impl ProtocolError {
    /// The `kind` reported to the client and counted in metrics.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::BadJson(_) => ErrorKind::BadJson,
            ProtocolError::UnknownType(_) => ErrorKind::UnknownType,
            ProtocolError::BadMessage { .. } => ErrorKind::BadMessage,
            ProtocolError::BadBase64(_) => ErrorKind::BadBase64,
        }
    }
}

const KNOWN: &[&str] = &[
    "websocket_audio_config_start",
    "websocket_audio",
    "websocket_stop",
    "gazelle_get_history",
];

pub(crate) fn parse(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| ProtocolError::BadMessage {
            kind: String::new(),
            detail: "no string field \"type\"".into(),
        })?
        .to_string();
    if !KNOWN.contains(&kind.as_str()) {
        return Err(ProtocolError::UnknownType(kind));
    }
    serde_json::from_value(value).map_err(|e| ProtocolError::BadMessage {
        kind,
        detail: e.to_string(),
    })
}

pub(crate) fn decode_base64(data: &str) -> Result<Vec<u8>, ProtocolError> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ProtocolError::BadBase64(e.to_string()))
}

/// Server → client messages.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub(crate) enum ServerMessage<'a> {
    #[serde(rename = "websocket_ready")]
    Ready,
    #[serde(rename = "websocket_audio")]
    Audio { data: String },
    #[serde(rename = "websocket_transcript")]
    Transcript {
        text: &'a str,
        sender: &'static str,
        timestamp: String,
        /// Extension: which reply the text belongs to (matches `gazelle_clear.reply`).
        reply: u64,
    },
    #[serde(rename = "websocket_stop")]
    Stop,
    /// Extension: stop playback now (barge-in); `spoken_text` is what the user heard. With
    /// `paused`, the reply may resume (its audio follows) if the sound over it proves no turn.
    #[serde(rename = "gazelle_clear")]
    Clear {
        reply: u64,
        spoken_text: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        paused: bool,
    },
    /// Extension: a reply's latency timeline.
    #[serde(rename = "gazelle_timeline")]
    Timeline(&'a Timeline),
    /// Extension: the conversation so far.
    #[serde(rename = "gazelle_history")]
    History { conversation: &'a Conversation },
    /// Extension: a recoverable error; the call goes on.
    #[serde(rename = "gazelle_error")]
    Error { kind: ErrorKind, message: &'a str },
}

impl ServerMessage<'_> {
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

/// One self-contained WAV message of bot audio, as the SDK's `decodeAudioData` needs.
pub(crate) fn audio_message(samples: &[f32], rate: u32, encoding: Encoding) -> String {
    let bytes = wav::write(samples, rate, encoding);
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    ServerMessage::Audio { data }.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_sdk_sends() {
        let start = r#"{"type":"websocket_audio_config_start",
            "input_audio_config":{"sampling_rate":48000,"audio_encoding":"linear16","chunk_size":2048},
            "output_audio_config":{"sampling_rate":48000,"audio_encoding":"linear16"},
            "conversation_id":null,"subscribe_transcript":true,"system_prompt":"Be brief.",
            "first_message":"Hi!","extra":1}"#;
        let ClientMessage::AudioConfigStart(c) = parse(start).unwrap() else {
            panic!()
        };
        assert_eq!(c.input_audio_config.sampling_rate, 48_000);
        assert_eq!(c.input_audio_config.audio_encoding, Encoding::Linear16);
        assert_eq!(c.subscribe_transcript, Some(true));
        assert_eq!(c.first_message.as_deref(), Some("Hi!"));
        assert_eq!(
            parse(r#"{"type":"websocket_audio","data":"AAA="}"#).unwrap(),
            ClientMessage::Audio {
                data: "AAA=".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"websocket_stop"}"#).unwrap(),
            ClientMessage::Stop
        );
    }

    #[test]
    fn each_bad_input_has_its_own_error() {
        assert_eq!(parse("{nope").unwrap_err().kind().as_str(), "bad_json");
        assert_eq!(
            parse(r#"{"type":"websocket_dance"}"#)
                .unwrap_err()
                .kind()
                .as_str(),
            "unknown_type"
        );
        assert_eq!(
            parse(r#"{"data":"x"}"#).unwrap_err().kind().as_str(),
            "bad_message"
        );
        assert_eq!(
            parse(r#"{"type":"websocket_audio"}"#)
                .unwrap_err()
                .kind()
                .as_str(),
            "bad_message"
        );
        let bad_enc = r#"{"type":"websocket_audio_config_start",
            "input_audio_config":{"sampling_rate":8000,"audio_encoding":"opus"},
            "output_audio_config":{"sampling_rate":8000,"audio_encoding":"mulaw"}}"#;
        assert_eq!(parse(bad_enc).unwrap_err().kind().as_str(), "bad_message");
        assert_eq!(
            decode_base64("!!!").unwrap_err().kind().as_str(),
            "bad_base64"
        );
    }

    #[test]
    fn audio_messages_are_whole_wav_files() {
        let msg = audio_message(&[0.0; 160], 8_000, Encoding::Mulaw);
        let v: serde_json::Value = serde_json::from_str(&msg).unwrap();
        assert_eq!(v["type"], "websocket_audio");
        let bytes = decode_base64(v["data"].as_str().unwrap()).unwrap();
        let d = wav::read(&bytes).unwrap();
        assert_eq!((d.sample_rate, d.samples.len()), (8_000, 160));
    }

    #[test]
    fn extension_messages_have_stable_names() {
        let m = ServerMessage::Clear {
            reply: 3,
            spoken_text: "Hello",
            paused: false,
        }
        .to_json();
        assert_eq!(
            m,
            r#"{"type":"gazelle_clear","reply":3,"spoken_text":"Hello"}"#
        );
        let m = ServerMessage::Clear {
            reply: 3,
            spoken_text: "Hello",
            paused: true,
        }
        .to_json();
        assert_eq!(
            m,
            r#"{"type":"gazelle_clear","reply":3,"spoken_text":"Hello","paused":true}"#
        );
        assert_eq!(
            ServerMessage::Ready.to_json(),
            r#"{"type":"websocket_ready"}"#
        );
    }
}
