//! Audio formats and conversions: PCM sample formats, G.711 µ-law, WAV files and streams,
//! streaming resampling, Whisper log-mel features, and loudness-based speech spans. Everything here is synchronous and free of
//! IO.

pub mod level;
pub mod mel;
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

/// The sample rates a caller may use, in a config message or a WAV header: the usual hardware and
/// codec rates from 8 to 96 kHz. Anything else (a header saying 1 Hz or 4 GHz) is refused before a
/// resampler is built for it.
pub(crate) const SUPPORTED_RATES: [u32; 11] = [
    8_000, 11_025, 12_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 88_200, 96_000,
];

/// Whether callers may use `rate`.
pub(crate) fn is_supported_rate(rate: u32) -> bool {
    SUPPORTED_RATES.contains(&rate)
}

/// The supported rates as text, for error messages.
pub(crate) fn supported_rates_text() -> String {
    let rates: Vec<String> = SUPPORTED_RATES.iter().map(u32::to_string).collect();
    rates.join(", ")
}

/// Highest rate anything here handles (a WAV file we read, a resampler); callers are held to
/// [`SUPPORTED_RATES`] before that.
pub(crate) const MAX_RATE: u32 = 384_000;

/// Most channels a WAV header may declare (they are downmixed to mono).
pub(crate) const MAX_CHANNELS: u16 = 8;

/// The rate the VAD and the speech-language model work at.
pub const MODEL_RATE: u32 = 16_000;
