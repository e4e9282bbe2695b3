//! Audio formats and conversions: PCM sample formats, G.711 µ-law, WAV files and streams, and
//! streaming resampling. Everything here is synchronous and free of IO.

pub mod mulaw;
pub mod pcm;
pub mod resample;
pub mod wav;

/// Sample encodings that cross the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Signed 16-bit little-endian PCM.
    Linear16,
    /// G.711 µ-law, one byte per sample.
    Mulaw,
}

/// Sample rates the server converts between.
pub const SUPPORTED_RATES: [u32; 6] = [8_000, 16_000, 22_050, 24_000, 44_100, 48_000];

/// The rate the VAD and the speech-language model work at.
pub const MODEL_RATE: u32 = 16_000;
