//! A Vocode caller's audio on its way in, as a pure function of the messages: base64 → WAV stream
//! decoder → (once, if the WAV header's rate differs from the configured one) a fixed resampler →
//! samples at the configured input rate. Every bound is checked before memory is spent on it: the
//! message's duration at its own rate, before resampling multiplies it.

use super::protocol::{self, ProtocolError};
use crate::audio::resample::{ResampleError, StreamResampler};
use crate::audio::wav::{SampleFormat, StreamDecoder, WavError, WavFormat};
use crate::audio::Encoding;
use crate::metrics::ErrorKind;
use crate::pipeline::limits::LimitError;

#[derive(Debug, thiserror::Error)]
pub(crate) enum InputError {
    #[error(transparent)]
    Base64(#[from] ProtocolError),
    #[error(transparent)]
    Wav(#[from] WavError),
    #[error(transparent)]
    TooLong(#[from] LimitError),
    #[error(transparent)]
    Resample(#[from] ResampleError),
}

impl InputError {
    /// The `gazelle_error` kind.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            InputError::Base64(e) => e.kind(),
            InputError::Wav(WavError::FormatChanged { .. }) => ErrorKind::FormatChanged,
            InputError::Wav(_) | InputError::Resample(_) => ErrorKind::BadAudio,
            InputError::TooLong(e) => e.kind(),
        }
    }
}

/// One call's audio decoder.
#[derive(Debug)]
pub(crate) struct AudioInput {
    rate: u32,
    decoder: StreamDecoder,
    /// Built once, when a WAV header sets another rate than the config declared.
    fixup: Option<StreamResampler>,
    max_ms: u64,
}

impl AudioInput {
    /// Audio declared as `encoding` at `rate` (a supported rate), at most `max_ms` per message.
    pub(crate) fn new(rate: u32, encoding: Encoding, max_ms: u64) -> Self {
        let sample_format = match encoding {
            Encoding::Linear16 => SampleFormat::Pcm16,
            Encoding::Mulaw => SampleFormat::Mulaw,
        };
        AudioInput {
            rate,
            decoder: StreamDecoder::new(WavFormat {
                sample_format,
                channels: 1,
                sample_rate: rate,
            }),
            fixup: None,
            max_ms,
        }
    }

    /// Decodes one `websocket_audio` payload to mono samples at the configured rate.
    pub(crate) fn push(&mut self, data: &str) -> Result<Vec<f32>, InputError> {
        let bytes = protocol::decode_base64(data)?;
        let samples = self.decoder.push(&bytes)?;
        let format = self.decoder.format();
        let ms = samples.len() as u64 * 1000 / format.sample_rate as u64;
        if ms > self.max_ms {
            let limit = self.max_ms as u32;
            return Err(LimitError::AudioTooLong { ms, limit }.into());
        }
        if format.sample_rate == self.rate {
            return Ok(samples);
        }
        // The decoder keeps one format per stream, so this resampler is built at most once.
        let fixup = match &mut self.fixup {
            Some(r) => r,
            slot => slot.insert(StreamResampler::new(format.sample_rate, self.rate)?),
        };
        Ok(fixup.push(&samples)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::wav;
    use base64::Engine as _;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_header_at_another_rate_is_resampled_with_one_resampler() {
        let mut input = AudioInput::new(16_000, Encoding::Linear16, 2_000);
        let tone: Vec<f32> = (0..4_800).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let first = wav::write(&tone, 48_000, Encoding::Linear16);
        let out = input.push(&b64(&first)).unwrap();
        let more = input
            .push(&b64(&crate::audio::pcm::f32_to_s16le(&tone)))
            .unwrap();
        // 2 × 100 ms at 48 kHz come out as about 2 × 1,600 samples at 16 kHz.
        let total = out.len() + more.len();
        assert!((2_900..=3_200).contains(&total), "{total}");
    }

    #[test]
    fn each_bad_message_has_its_kind() {
        let mut input = AudioInput::new(16_000, Encoding::Linear16, 500);
        assert_eq!(input.push("***").unwrap_err().kind(), ErrorKind::BadBase64);
        let rate_1hz = wav::write(&[0.0; 4], 1, Encoding::Linear16);
        assert_eq!(
            input.push(&b64(&rate_1hz)).unwrap_err().kind(),
            ErrorKind::BadAudio
        );
        let long = crate::audio::pcm::f32_to_s16le(&vec![0.0; 16_000]);
        let e = input.push(&b64(&long)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AudioTooLong, "{e}");
        input.push(&b64(&[0u8; 320])).unwrap();
        let other = wav::write(&[0.0; 4], 48_000, Encoding::Linear16);
        assert_eq!(
            input.push(&b64(&other)).unwrap_err().kind(),
            ErrorKind::FormatChanged
        );
    }
}
