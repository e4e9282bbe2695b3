//! The Twilio wire formats as pure functions: media-stream events in and out, the TwiML answer,
//! and the `X-Twilio-Signature` check.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;

/// Events Twilio sends on the media stream. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Event {
    Connected {
        #[serde(default)]
        protocol: Option<String>,
    },
    Start {
        start: Start,
        #[serde(rename = "streamSid", default)]
        stream_sid: Option<String>,
    },
    Media {
        media: Media,
    },
    Dtmf {
        dtmf: Dtmf,
    },
    Mark {
        mark: MarkBody,
    },
    Stop {
        #[serde(default)]
        stop: Option<serde_json::Value>,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Start {
    pub stream_sid: String,
    #[serde(default)]
    pub call_sid: Option<String>,
    #[serde(default)]
    pub account_sid: Option<String>,
    #[serde(default)]
    pub tracks: Vec<String>,
    pub media_format: MediaFormat,
    #[serde(default)]
    pub custom_parameters: HashMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MediaFormat {
    pub encoding: String,
    pub sample_rate: u32,
    pub channels: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Media {
    #[serde(default)]
    pub track: Option<String>,
    pub payload: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Dtmf {
    pub digit: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct MarkBody {
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum TwilioError {
    #[error("malformed event JSON: {0}")]
    Json(String),
    #[error("unknown or malformed event {event:?}: {detail}")]
    Event { event: String, detail: String },
    #[error("media payload is not valid base64: {0}")]
    Payload(String),
    #[error("unsupported media format {0}; Twilio streams audio/x-mulaw at 8000 Hz, mono")]
    Format(String),
}

pub(crate) fn parse(text: &str) -> Result<Event, TwilioError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| TwilioError::Json(e.to_string()))?;
    let event = value
        .get("event")
        .and_then(|e| e.as_str())
        .unwrap_or("")
        .to_string();
    serde_json::from_value(value).map_err(|e| TwilioError::Event {
        event,
        detail: e.to_string(),
    })
}

impl TwilioError {
    /// The event a message named, when it named one that could not be read.
    pub(crate) fn event(&self) -> Option<&str> {
        match self {
            TwilioError::Event { event, .. } => Some(event),
            _ => None,
        }
    }
}

pub(crate) fn decode_payload(payload: &str) -> Result<Vec<u8>, TwilioError> {
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| TwilioError::Payload(e.to_string()))
}

impl MediaFormat {
    pub(crate) fn check(&self) -> Result<(), TwilioError> {
        if self.encoding == "audio/x-mulaw" && self.sample_rate == 8_000 && self.channels == 1 {
            Ok(())
        } else {
            Err(TwilioError::Format(format!(
                "{} at {} Hz, {} channel(s)",
                self.encoding, self.sample_rate, self.channels
            )))
        }
    }
}

/// Outbound audio: µ-law bytes with no file header.
pub(crate) fn media(stream_sid: &str, mulaw: &[u8]) -> String {
    let payload = base64::engine::general_purpose::STANDARD.encode(mulaw);
    json!({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}}).to_string()
}

pub(crate) fn mark(stream_sid: &str, name: &str) -> String {
    json!({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}).to_string()
}

pub(crate) fn clear(stream_sid: &str) -> String {
    json!({"event": "clear", "streamSid": stream_sid}).to_string()
}

/// The name of the mark placed after unit `unit` of reply `reply` (`within` is `None`), or
/// after its first `within` samples.
pub fn mark_name(reply: u64, unit: usize, within: Option<u64>) -> String {
    match within {
        None => format!("r{reply}.u{unit}"),
        Some(n) => format!("r{reply}.u{unit}.s{n}"),
    }
}

/// The inverse of [`mark_name`].
pub fn parse_mark_name(name: &str) -> Option<(u64, usize, Option<u64>)> {
    let (r, rest) = name.strip_prefix('r')?.split_once(".u")?;
    let (u, within) = match rest.split_once(".s") {
        Some((u, n)) => (u, Some(n.parse().ok()?)),
        None => (rest, None),
    };
    Some((r.parse().ok()?, u.parse().ok()?, within))
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The TwiML that connects a call to our media-stream websocket, passing `parameters` through.
pub(crate) fn twiml_connect(stream_url: &str, parameters: &BTreeMap<String, String>) -> String {
    let mut params = String::new();
    for (k, v) in parameters {
        params.push_str(&format!(
            "<Parameter name=\"{}\" value=\"{}\"/>",
            xml_escape(k),
            xml_escape(v)
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Connect><Stream url=\"{}\">{}\
         </Stream></Connect></Response>",
        xml_escape(stream_url),
        params
    )
}

/// The TwiML that tells the caller why no conversation can start now, then hangs up.
pub(crate) fn twiml_say_and_hang_up(message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>{}</Say><Hangup/></Response>",
        xml_escape(message)
    )
}

/// Twilio's request signature: base64(HMAC-SHA1(auth token, full URL followed by every POST
/// parameter's name and value, sorted by name)).
pub fn signature(auth_token: &str, url: &str, params: &BTreeMap<String, String>) -> String {
    let mac = signed(auth_token, url, params);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The HMAC over what Twilio signs.
fn signed(auth_token: &str, url: &str, params: &BTreeMap<String, String>) -> Hmac<sha1::Sha1> {
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    for (k, v) in params {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    mac
}

/// Checks a request's `X-Twilio-Signature` in constant time.
pub(crate) fn verify(
    auth_token: &str,
    url: &str,
    params: &BTreeMap<String, String>,
    given: &str,
) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(given) else {
        return false;
    };
    signed(auth_token, url, params).verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_events() {
        let start = r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1",
            "streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],
            "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},
            "customParameters":{"system_prompt":"Be brief."}},"streamSid":"MZ1"}"#;
        let Event::Start { start, .. } = parse(start).unwrap() else {
            panic!()
        };
        assert_eq!(start.stream_sid, "MZ1");
        assert_eq!(start.call_sid.as_deref(), Some("CA1"));
        assert_eq!(start.custom_parameters["system_prompt"], "Be brief.");
        start.media_format.check().unwrap();
        let media = r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound",
            "chunk":"1","timestamp":"5","payload":"//8="},"streamSid":"MZ1"}"#;
        assert!(matches!(parse(media).unwrap(), Event::Media { .. }));
        let mark = r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"r2.u3"}}"#;
        let Event::Mark { mark } = parse(mark).unwrap() else {
            panic!()
        };
        assert_eq!(parse_mark_name(&mark.name), Some((2, 3, None)));
        assert_eq!(
            parse_mark_name(&mark_name(2, 3, Some(4_000))),
            Some((2, 3, Some(4_000)))
        );
        assert_eq!(parse_mark_name("r2.u3.sx"), None);
        let dtmf = r#"{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"5"}}"#;
        assert!(matches!(parse(dtmf).unwrap(), Event::Dtmf { .. }));
        assert!(matches!(
            parse(r#"{"event":"stop","stop":{}}"#).unwrap(),
            Event::Stop { .. }
        ));
        assert!(matches!(
            parse(r#"{"event":"connected","protocol":"Call"}"#).unwrap(),
            Event::Connected { .. }
        ));
    }

    #[test]
    fn malformed_events_are_errors() {
        assert!(matches!(parse("nope").unwrap_err(), TwilioError::Json(_)));
        assert!(matches!(
            parse(r#"{"event":"dance"}"#).unwrap_err(),
            TwilioError::Event { .. }
        ));
        assert!(matches!(
            parse(r#"{"event":"media"}"#).unwrap_err(),
            TwilioError::Event { .. }
        ));
        assert!(decode_payload("***").is_err());
        let f = MediaFormat {
            encoding: "audio/l16".into(),
            sample_rate: 16_000,
            channels: 1,
        };
        assert!(f.check().is_err());
        assert_eq!(parse_mark_name("bogus"), None);
    }

    #[test]
    fn twiml_escapes_and_carries_parameters() {
        let mut p = BTreeMap::new();
        p.insert(
            "system_prompt".to_string(),
            "Say \"hi\" & <bye>".to_string(),
        );
        let x = twiml_connect("wss://example.com/twilio/stream", &p);
        assert!(x.contains("<Connect><Stream url=\"wss://example.com/twilio/stream\">"));
        assert!(x.contains(
            "<Parameter name=\"system_prompt\" value=\"Say &quot;hi&quot; &amp; &lt;bye&gt;\"/>"
        ));
    }

    #[test]
    fn signature_matches_twilios_documented_example() {
        // The worked example from Twilio's request-validation documentation (twilio-php).
        let mut p = BTreeMap::new();
        for (k, v) in [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ] {
            p.insert(k.to_string(), v.to_string());
        }
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let sig = signature("12345", url, &p);
        assert_eq!(sig, "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert!(verify("12345", url, &p, &sig));
        assert!(!verify("12346", url, &p, &sig));
        assert!(!verify("12345", url, &p, "not base64!"));
    }
}
