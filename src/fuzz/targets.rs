//! The fuzz targets: each reads what a caller could send, the way the server reads it, and
//! checks what must hold besides "no panic" (outputs bounded by inputs, errors with a kind).

use base64::Engine as _;

use super::Target;
use crate::audio::wav::{self, SampleFormat, StreamDecoder, WavFormat};
use crate::audio::{is_supported_rate, mulaw, Encoding, SUPPORTED_RATES};
use crate::pipeline::limits::{check_id, Limits};
use crate::pipeline::sentence::{SentenceAccumulator, SentenceSettings};
use crate::transport::guard::Untrusted;
use crate::transport::twilio::protocol as twilio;
use crate::transport::vocode::input::AudioInput;
use crate::transport::vocode::protocol::{self as vocode, ClientMessage};

pub(crate) const ALL: &[Target] = &[
    Target {
        name: "vocode_messages",
        seeds: vocode_seeds,
        run: vocode_messages,
        json: true,
    },
    Target {
        name: "twilio_events",
        seeds: twilio_seeds,
        run: twilio_events,
        json: true,
    },
    Target {
        name: "wav_stream",
        seeds: wav_seeds,
        run: wav_stream,
        json: false,
    },
    Target {
        name: "base64",
        seeds: base64_seeds,
        run: base64_round_trip,
        json: false,
    },
    Target {
        name: "mulaw",
        seeds: mulaw_seeds,
        run: mulaw_round_trip,
        json: false,
    },
    Target {
        name: "sentence",
        seeds: text_seeds,
        run: sentences,
        json: false,
    },
    Target {
        name: "log_escape",
        seeds: text_seeds,
        run: log_escape,
        json: false,
    },
];

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tone(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.07).sin() * 0.4).collect()
}

fn vocode_seeds() -> Vec<Vec<u8>> {
    let start = r#"{"type":"websocket_audio_config_start","input_audio_config":{"sampling_rate":48000,"audio_encoding":"linear16","chunk_size":960},"output_audio_config":{"sampling_rate":48000,"audio_encoding":"mulaw"},"conversation_id":"c-1","subscribe_transcript":true,"system_prompt":"Be brief.","first_message":"Hi!"}"#;
    let header_blob = wav::write(&tone(480), 44_100, Encoding::Linear16);
    let mulaw_blob = wav::write(&tone(160), 8_000, Encoding::Mulaw);
    let audio = |bytes: &[u8]| format!(r#"{{"type":"websocket_audio","data":"{}"}}"#, b64(bytes));
    vec![
        start.as_bytes().to_vec(),
        audio(&header_blob).into_bytes(),
        audio(&mulaw_blob).into_bytes(),
        audio(&crate::audio::pcm::f32_to_s16le(&tone(320))).into_bytes(),
        format!("{}\n{}", audio(&header_blob), audio(&[1, 2, 3, 4, 5])).into_bytes(),
        br#"{"type":"websocket_stop"}"#.to_vec(),
        br#"{"type":"gazelle_get_history"}"#.to_vec(),
    ]
}

/// Up to three messages (one per line) on one call, as the handler reads them.
fn vocode_messages(input: &[u8]) -> Result<bool, String> {
    let text = String::from_utf8_lossy(input);
    let rate =
        SUPPORTED_RATES[input.first().copied().unwrap_or(0) as usize % SUPPORTED_RATES.len()];
    let encoding = if input.len().is_multiple_of(2) {
        Encoding::Linear16
    } else {
        Encoding::Mulaw
    };
    let limits = Limits::default();
    let max_ms = limits.max_buffered_audio_ms as u64;
    let mut audio = AudioInput::new(rate, encoding, max_ms);
    let mut deep = false;
    for line in text.split('\n').take(3) {
        let message = match vocode::parse(line) {
            Ok(m) => m,
            Err(_) => continue,
        };
        match message {
            ClientMessage::AudioConfigStart(c) => {
                deep = true;
                let _ = crate::transport::vocode::handler::validate(&c);
                let _ = limits.check_texts(c.system_prompt.as_deref(), c.first_message.as_deref());
                if let Some(id) = &c.conversation_id {
                    let _ = check_id(id);
                }
            }
            ClientMessage::Audio { data } => {
                if let Ok(samples) = audio.push(&data) {
                    deep = true;
                    // The in-flight bound, at the call's rate, plus one resampler chunk.
                    let bound = rate as u64 * max_ms / 1000 + 8_192;
                    if samples.len() as u64 > bound {
                        return Err(format!("{} samples from one message", samples.len()));
                    }
                }
            }
            ClientMessage::Stop | ClientMessage::GetHistory => {}
        }
    }
    Ok(deep)
}

fn twilio_seeds() -> Vec<Vec<u8>> {
    let payload = b64(&mulaw::encode_from_f32(&tone(160)));
    vec![
        br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.to_vec(),
        br#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1},"customParameters":{"system_prompt":"Be brief.","gazelle_stream_token":"t1.1.2.3"}},"streamSid":"MZ1"}"#.to_vec(),
        format!(r#"{{"event":"media","sequenceNumber":"3","media":{{"track":"inbound","chunk":"1","timestamp":"5","payload":"{payload}"}},"streamSid":"MZ1"}}"#).into_bytes(),
        br#"{"event":"mark","streamSid":"MZ1","mark":{"name":"r2.u3"}}"#.to_vec(),
        br#"{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"5"}}"#.to_vec(),
        br#"{"event":"stop","stop":{}}"#.to_vec(),
    ]
}

fn twilio_events(input: &[u8]) -> Result<bool, String> {
    let text = String::from_utf8_lossy(input);
    let mut deep = false;
    for line in text.split('\n').take(3) {
        let Ok(event) = twilio::parse(line) else {
            continue;
        };
        deep = true;
        match event {
            twilio::Event::Media { media } => {
                if let Ok(bytes) = twilio::decode_payload(&media.payload) {
                    let samples = mulaw::decode_to_f32(&bytes);
                    if samples.len() != bytes.len() {
                        return Err("µ-law must give one sample per byte".into());
                    }
                }
            }
            twilio::Event::Mark { mark } => {
                if let Some((r, u, w)) = twilio::parse_mark_name(&mark.name) {
                    let again = twilio::parse_mark_name(&twilio::mark_name(r, u, w));
                    if again != Some((r, u, w)) {
                        return Err(format!("mark {r}.{u} does not round-trip"));
                    }
                }
                log_escape(mark.name.as_bytes())?;
            }
            twilio::Event::Start { start, .. } => {
                let _ = start.media_format.check();
                if let Some(sid) = &start.call_sid {
                    let _ = check_id(sid);
                }
            }
            twilio::Event::Dtmf { dtmf } => {
                log_escape(dtmf.digit.as_bytes())?;
            }
            twilio::Event::Connected { .. } | twilio::Event::Stop { .. } => {}
        }
    }
    Ok(deep)
}

fn wav_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (rate, enc) in [
        (48_000, Encoding::Linear16),
        (8_000, Encoding::Mulaw),
        (44_100, Encoding::Linear16),
    ] {
        let mut s = vec![0x01, 0x40];
        s.extend(wav::write(&tone(300), rate, enc));
        seeds.push(s);
    }
    seeds
}

/// A WAV stream in blobs whose size the first two bytes choose, then the same bytes as a file.
fn wav_stream(input: &[u8]) -> Result<bool, String> {
    if input.len() < 2 {
        return Ok(false);
    }
    let step = 1 + (u16::from_le_bytes([input[0], input[1]]) as usize % 4_096);
    let body = &input[2..];
    let default = WavFormat {
        sample_format: [
            SampleFormat::Pcm16,
            SampleFormat::Mulaw,
            SampleFormat::Float32,
        ][input[0] as usize % 3],
        channels: 1 + (input[1] as u16 % 2),
        sample_rate: 16_000,
    };
    let mut dec = StreamDecoder::new(default);
    let mut out = 0usize;
    let mut deep = false;
    for blob in body.chunks(step) {
        if let Ok(samples) = dec.push(blob) {
            deep |= blob.starts_with(b"RIFF");
            out += samples.len();
            if !is_supported_rate(dec.format().sample_rate) {
                return Err(format!("accepted {} Hz", dec.format().sample_rate));
            }
        }
    }
    if out > body.len() {
        return Err(format!("{out} samples from {} bytes", body.len()));
    }
    if let Ok(d) = wav::read(body) {
        if d.samples.len() > body.len() || d.sample_rate == 0 {
            return Err(format!(
                "{} samples at {} Hz from {} bytes",
                d.samples.len(),
                d.sample_rate,
                body.len()
            ));
        }
        deep = true;
    }
    Ok(deep)
}

fn base64_seeds() -> Vec<Vec<u8>> {
    vec![
        b64(b"hello world").into_bytes(),
        b"AAAA".to_vec(),
        b"QQ==".to_vec(),
        b"".to_vec(),
    ]
}

fn base64_round_trip(input: &[u8]) -> Result<bool, String> {
    let text = String::from_utf8_lossy(input);
    if let Ok(bytes) = vocode::decode_base64(&text) {
        if bytes.len() > text.len() {
            return Err("base64 decoded to more bytes than characters".into());
        }
        let again = vocode::decode_base64(&b64(&bytes)).map_err(|e| e.to_string())?;
        if again != bytes {
            return Err("base64 does not round-trip".into());
        }
        return Ok(true);
    }
    Ok(false)
}

fn mulaw_seeds() -> Vec<Vec<u8>> {
    vec![(0..=255u8).collect(), mulaw::encode_from_f32(&tone(400))]
}

fn mulaw_round_trip(input: &[u8]) -> Result<bool, String> {
    let x = mulaw::decode_to_f32(input);
    let again = mulaw::decode_to_f32(&mulaw::encode_from_f32(&x));
    if again != x {
        return Err("µ-law decode → encode → decode changed the samples".into());
    }
    Ok(!input.is_empty())
}

fn text_seeds() -> Vec<Vec<u8>> {
    [
        "Hello there. How are you? Mr. Smith met Dr. Jones at 3.14 p.m. today... Then left!",
        "¿Qué tal? Muy bien, gracias. Das ist z. B. ein Test. Die Straße ist schön.",
        "こんにちは。元気ですか？はい、元気です。「行く。」と言った。",
        "I love it 😀. Next 🎉! Steps:\n1. Open it.\n2. Close it.",
        "r1.u2\nINFO forged \u{202E} line \u{1b}[31m \"quoted\" \\ back",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Text streamed as tokens of a size the first byte chooses, with settings the next bytes choose.
fn sentences(input: &[u8]) -> Result<bool, String> {
    let (head, body) = input.split_at(input.len().min(3));
    let max_chars = 20 + head.first().copied().unwrap_or(0) as usize;
    let first_clause_words = head.get(1).copied().unwrap_or(4) as usize % 6;
    let token = 1 + head.get(2).copied().unwrap_or(7) as usize % 24;
    let text = String::from_utf8_lossy(body);
    let settings = SentenceSettings {
        first_clause_words,
        max_chars,
    };
    let mut acc = SentenceAccumulator::new(settings);
    let chars: Vec<char> = text.chars().collect();
    let mut units = Vec::new();
    for piece in chars.chunks(token) {
        units.extend(acc.push(&piece.iter().collect::<String>()));
    }
    units.extend(acc.finish());
    for u in &units {
        if u.is_empty() || u.trim() != u || u.chars().count() > max_chars {
            return Err(format!("bad unit {u:?} (max {max_chars})"));
        }
    }
    let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    if squash(&units.concat()) != squash(&text) {
        return Err("the units lost or changed text".into());
    }
    Ok(!units.is_empty())
}

/// What an untrusted string looks like in a log: one line, bounded.
fn log_escape(input: &[u8]) -> Result<bool, String> {
    let text = String::from_utf8_lossy(input);
    let shown = Untrusted(&text).to_string();
    if shown.chars().any(|c| c.is_control()) {
        return Err(format!("control character in {shown:?}"));
    }
    // 80 characters, each escaped to at most 10, plus quotes and the "cut" note.
    if shown.chars().count() > 80 * 10 + 40 {
        return Err(format!("{} characters shown", shown.chars().count()));
    }
    Ok(true)
}
