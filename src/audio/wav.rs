//! WAV (RIFF/WAVE) reading and writing, for whole files and for streams where only the first blob
//! carries a header (what the Vocode web client's WAV MediaRecorder sends). Reading tolerates extra
//! chunks, PCM16, float32, µ-law and WAVE_FORMAT_EXTENSIBLE, and downmixes any channel count to
//! mono. Writing produces self-contained mono files in PCM16 or µ-law.

use super::{mulaw, pcm, Encoding};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WavError {
    #[error("not a WAV file: missing RIFF/WAVE header")]
    NotWav,
    #[error("WAV header is truncated ({0} bytes); send the whole header in the first blob")]
    Truncated(usize),
    #[error("WAV has no fmt chunk before its data chunk")]
    NoFormat,
    #[error(
        "unsupported WAV sample format: tag {tag:#06x}, {bits} bits (use PCM16, float32 or µ-law)"
    )]
    Unsupported { tag: u16, bits: u16 },
    #[error("WAV declares {0} channels; 1 to {max} are supported", max = super::MAX_CHANNELS)]
    BadChannels(u16),
    #[error("WAV declares {0} Hz, which is not a sample rate")]
    BadRate(u32),
    #[error(
        "WAV header declares {0} Hz; callers may send {rates} Hz",
        rates = super::supported_rates_text()
    )]
    UnsupportedRate(u32),
    #[error(
        "WAV header changes the stream's format mid-call ({from}, then {to}); a call keeps one \
         format: open a new call for another"
    )]
    FormatChanged { from: WavFormat, to: WavFormat },
}

/// How samples are laid out in a WAV data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    Pcm16,
    Float32,
    Mulaw,
}

impl SampleFormat {
    pub(crate) fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::Pcm16 => 2,
            SampleFormat::Float32 => 4,
            SampleFormat::Mulaw => 1,
        }
    }
}

impl From<Encoding> for SampleFormat {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::Linear16 => SampleFormat::Pcm16,
            Encoding::Mulaw => SampleFormat::Mulaw,
        }
    }
}

/// The parts of a fmt chunk we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavFormat {
    pub sample_format: SampleFormat,
    pub channels: u16,
    pub sample_rate: u32,
}

impl std::fmt::Display for WavFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.sample_format {
            SampleFormat::Pcm16 => "PCM16",
            SampleFormat::Float32 => "float32",
            SampleFormat::Mulaw => "µ-law",
        };
        write!(f, "{name} {} Hz x{}", self.sample_rate, self.channels)
    }
}

const TAG_PCM: u16 = 1;
const TAG_FLOAT: u16 = 3;
const TAG_MULAW: u16 = 7;
const TAG_EXTENSIBLE: u16 = 0xFFFE;

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn parse_fmt(body: &[u8]) -> Result<WavFormat, WavError> {
    if body.len() < 16 {
        return Err(WavError::Truncated(body.len()));
    }
    let mut tag = u16_at(body, 0);
    let channels = u16_at(body, 2);
    let sample_rate = u32_at(body, 4);
    let bits = u16_at(body, 14);
    if tag == TAG_EXTENSIBLE && body.len() >= 26 {
        // The sub-format GUID starts with the plain format tag.
        tag = u16_at(body, 24);
    }
    if channels == 0 || channels > super::MAX_CHANNELS {
        return Err(WavError::BadChannels(channels));
    }
    if sample_rate == 0 || sample_rate > super::MAX_RATE {
        return Err(WavError::BadRate(sample_rate));
    }
    let sample_format = match (tag, bits) {
        (TAG_PCM, 16) => SampleFormat::Pcm16,
        (TAG_FLOAT, 32) => SampleFormat::Float32,
        (TAG_MULAW, 8) => SampleFormat::Mulaw,
        _ => return Err(WavError::Unsupported { tag, bits }),
    };
    Ok(WavFormat {
        sample_format,
        channels,
        sample_rate,
    })
}

/// Parses a RIFF header up to the start of the data chunk's payload. Returns the format and the
/// offset of the first sample byte. The data chunk's length is ignored: streaming recorders write 0
/// or 0xFFFFFFFF there.
pub(crate) fn parse_header(bytes: &[u8]) -> Result<(WavFormat, usize), WavError> {
    if bytes.len() < 12 {
        return if bytes.starts_with(&b"RIFF"[..bytes.len().min(4)]) {
            Err(WavError::Truncated(bytes.len()))
        } else {
            Err(WavError::NotWav)
        };
    }
    if &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(WavError::NotWav);
    }
    let mut pos = 12;
    let mut format = None;
    loop {
        if pos + 8 > bytes.len() {
            return Err(WavError::Truncated(bytes.len()));
        }
        let id = &bytes[pos..pos + 4];
        let len = u32_at(bytes, pos + 4) as usize;
        let body = pos + 8;
        if id == b"data" {
            let format = format.ok_or(WavError::NoFormat)?;
            return Ok((format, body));
        }
        let end = body
            .checked_add(len)
            .ok_or(WavError::Truncated(bytes.len()))?;
        if end > bytes.len() {
            return Err(WavError::Truncated(bytes.len()));
        }
        if id == b"fmt " {
            format = Some(parse_fmt(&bytes[body..end])?);
        }
        // Chunks are word-aligned.
        pos = end + (len & 1);
    }
}

/// Decodes interleaved sample bytes (a whole number of frames) to mono f32.
fn decode_frames(bytes: &[u8], format: &WavFormat, out: &mut Vec<f32>) {
    let ch = format.channels as usize;
    let width = format.sample_format.bytes_per_sample();
    let frame = ch * width;
    out.reserve(bytes.len() / frame);
    for f in bytes.chunks_exact(frame) {
        let mut acc = 0.0f32;
        for s in f.chunks_exact(width) {
            acc += match format.sample_format {
                SampleFormat::Pcm16 => pcm::i16_to_f32(i16::from_le_bytes([s[0], s[1]])),
                SampleFormat::Float32 => f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
                SampleFormat::Mulaw => pcm::i16_to_f32(mulaw::decode(s[0])),
            };
        }
        out.push(acc / ch as f32);
    }
}

/// A whole WAV file decoded to mono f32.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// Reads a whole WAV file from memory.
pub fn read(bytes: &[u8]) -> Result<Decoded, WavError> {
    let (format, start) = parse_header(bytes)?;
    // Honour the declared data length when it is sane, so trailing chunks are not read as audio.
    let declared = u32_at(bytes, start - 4) as usize;
    let end = if declared > 0 && declared != u32::MAX as usize && start + declared <= bytes.len() {
        start + declared
    } else {
        bytes.len()
    };
    let mut samples = Vec::new();
    decode_frames(&bytes[start..end], &format, &mut samples);
    Ok(Decoded {
        sample_rate: format.sample_rate,
        samples,
    })
}

/// Writes mono samples as a self-contained WAV file in PCM16 or µ-law.
pub fn write(samples: &[f32], sample_rate: u32, encoding: Encoding) -> Vec<u8> {
    let (tag, bits, payload) = match encoding {
        Encoding::Linear16 => (TAG_PCM, 16u16, pcm::f32_to_s16le(samples)),
        Encoding::Mulaw => (TAG_MULAW, 8u16, mulaw::encode_from_f32(samples)),
    };
    let block_align = bits / 8;
    let mut out = Vec::with_capacity(44 + payload.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + payload.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&sample_rate.to_le_bytes());
    out.extend_from_slice(&(sample_rate * block_align as u32).to_le_bytes());
    out.extend_from_slice(&block_align.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a stream of blobs. A blob that starts with `RIFF` (normally only the first) sets the
/// format from its header; every other blob is raw sample bytes in the current format. Bytes that
/// do not complete a frame are carried into the next blob, so blob boundaries may fall anywhere.
///
/// A stream has one format: the first header may replace the default (as long as no audio was
/// decoded in the default yet), a later header must repeat it, and any header must declare one of
/// [`super::SUPPORTED_RATES`]. So whatever a caller sends, at most one resampler is ever needed.
#[derive(Debug)]
pub(crate) struct StreamDecoder {
    format: WavFormat,
    /// Set once audio was decoded or a header was read: the format can no longer change.
    locked: bool,
    carry: Vec<u8>,
}

impl StreamDecoder {
    /// `default` is the format of headerless blobs until a header says otherwise.
    pub(crate) fn new(default: WavFormat) -> Self {
        StreamDecoder {
            format: default,
            locked: false,
            carry: Vec::new(),
        }
    }

    pub(crate) fn format(&self) -> WavFormat {
        self.format
    }

    /// Decodes one blob to mono f32 at `self.format().sample_rate`.
    pub(crate) fn push(&mut self, blob: &[u8]) -> Result<Vec<f32>, WavError> {
        let mut payload = blob;
        if blob.starts_with(b"RIFF") {
            let (format, start) = parse_header(blob)?;
            if !super::is_supported_rate(format.sample_rate) {
                return Err(WavError::UnsupportedRate(format.sample_rate));
            }
            if self.locked && format != self.format {
                return Err(WavError::FormatChanged {
                    from: self.format,
                    to: format,
                });
            }
            if format != self.format {
                self.carry.clear();
            }
            self.format = format;
            self.locked = true;
            payload = &blob[start..];
        }
        let frame = self.format.channels as usize * self.format.sample_format.bytes_per_sample();
        let mut out = Vec::new();
        if !payload.is_empty() {
            self.locked = true;
        }
        if !self.carry.is_empty() {
            let need = frame - self.carry.len();
            if payload.len() < need {
                self.carry.extend_from_slice(payload);
                return Ok(out);
            }
            self.carry.extend_from_slice(&payload[..need]);
            let carried = std::mem::take(&mut self.carry);
            decode_frames(&carried, &self.format, &mut out);
            payload = &payload[need..];
        }
        let whole = payload.len() - payload.len() % frame;
        decode_frames(&payload[..whole], &self.format, &mut out);
        self.carry.extend_from_slice(&payload[whole..]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tag: u16, channels: u16, rate: u32, bits: u16, extra_chunk: bool) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(b"RIFF\0\0\0\0WAVE");
        if extra_chunk {
            // An odd-length LIST chunk exercises the pad byte.
            h.extend_from_slice(b"LIST\x03\0\0\0abc\0");
        }
        h.extend_from_slice(b"fmt \x10\0\0\0");
        h.extend_from_slice(&tag.to_le_bytes());
        h.extend_from_slice(&channels.to_le_bytes());
        h.extend_from_slice(&rate.to_le_bytes());
        let align = channels * bits / 8;
        h.extend_from_slice(&rate.wrapping_mul(align as u32).to_le_bytes());
        h.extend_from_slice(&align.to_le_bytes());
        h.extend_from_slice(&bits.to_le_bytes());
        h.extend_from_slice(b"data\xff\xff\xff\xff");
        h
    }

    #[test]
    fn write_then_read_round_trips_pcm16_and_mulaw() {
        let samples: Vec<f32> = (0..800).map(|i| (i as f32 * 0.05).sin() * 0.5).collect();
        let pcm = read(&write(&samples, 16_000, Encoding::Linear16)).unwrap();
        assert_eq!(pcm.sample_rate, 16_000);
        assert_eq!(pcm.samples.len(), 800);
        assert!(pcm
            .samples
            .iter()
            .zip(&samples)
            .all(|(a, b)| (a - b).abs() < 1e-4));
        let ulaw = read(&write(&samples, 8_000, Encoding::Mulaw)).unwrap();
        assert_eq!(ulaw.sample_rate, 8_000);
        assert!(ulaw
            .samples
            .iter()
            .zip(&samples)
            .all(|(a, b)| (a - b).abs() < 0.02));
    }

    #[test]
    fn written_header_is_canonical() {
        let w = write(&[0.0; 10], 48_000, Encoding::Linear16);
        assert_eq!(w.len(), 64);
        assert_eq!(&w[0..4], b"RIFF");
        assert_eq!(u32_at(&w, 4), 56);
        assert_eq!(u32_at(&w, 24), 48_000);
        assert_eq!(u32_at(&w, 40), 20);
    }

    #[test]
    fn tolerates_extra_chunks_and_downmixes_float_stereo() {
        let mut f = header(TAG_FLOAT, 2, 44_100, 32, true);
        for (l, r) in [(0.5f32, -0.5f32), (1.0, 0.0)] {
            f.extend_from_slice(&l.to_le_bytes());
            f.extend_from_slice(&r.to_le_bytes());
        }
        let d = read(&f).unwrap();
        assert_eq!(d.sample_rate, 44_100);
        assert_eq!(d.samples, vec![0.0, 0.5]);
    }

    #[test]
    fn reads_extensible_pcm16() {
        let mut h = b"RIFF\0\0\0\0WAVEfmt \x28\0\0\0".to_vec();
        h.extend_from_slice(&TAG_EXTENSIBLE.to_le_bytes());
        h.extend_from_slice(&1u16.to_le_bytes());
        h.extend_from_slice(&16_000u32.to_le_bytes());
        h.extend_from_slice(&32_000u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&22u16.to_le_bytes());
        h.extend_from_slice(&16u16.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&TAG_PCM.to_le_bytes());
        h.extend_from_slice(&[0u8; 14]);
        h.extend_from_slice(b"data\x02\0\0\0");
        h.extend_from_slice(&16384i16.to_le_bytes());
        assert_eq!(read(&h).unwrap().samples, vec![0.5]);
    }

    #[test]
    fn rejects_bad_headers_clearly() {
        assert_eq!(read(b"hello world!").unwrap_err(), WavError::NotWav);
        assert!(matches!(
            read(b"RIFF\0\0\0\0WAVEfm").unwrap_err(),
            WavError::Truncated(_)
        ));
        let h = header(TAG_PCM, 1, 8_000, 24, false);
        assert_eq!(
            read(&h).unwrap_err(),
            WavError::Unsupported { tag: 1, bits: 24 }
        );
        assert_eq!(
            read(b"RIFF\0\0\0\0WAVEdata\0\0\0\0").unwrap_err(),
            WavError::NoFormat
        );
    }

    #[test]
    fn stream_takes_header_from_first_blob_and_carries_split_frames() {
        let default = WavFormat {
            sample_format: SampleFormat::Pcm16,
            channels: 1,
            sample_rate: 16_000,
        };
        let mut dec = StreamDecoder::new(default);
        let mut first = header(TAG_PCM, 2, 48_000, 16, false);
        first.extend_from_slice(&1000i16.to_le_bytes());
        first.push(0xE8); // the low byte of a right-channel sample of 1000 (0x03E8)
        let out = dec.push(&first).unwrap();
        assert!(out.is_empty());
        assert_eq!(dec.format().sample_rate, 48_000);
        let mut second = vec![0x03];
        second.extend_from_slice(&(-2000i16).to_le_bytes());
        second.extend_from_slice(&2000i16.to_le_bytes());
        let out = dec.push(&second).unwrap();
        assert_eq!(out, vec![1000.0 / 32768.0, 0.0]);
    }

    fn pcm16_mono(rate: u32) -> WavFormat {
        WavFormat {
            sample_format: SampleFormat::Pcm16,
            channels: 1,
            sample_rate: rate,
        }
    }

    #[test]
    fn insane_headers_are_refused_before_any_allocation() {
        // The 3.3 KB message that once aborted the server: a header saying 4,294,967,295 Hz.
        let mut dec = StreamDecoder::new(pcm16_mono(16_000));
        let mut blob = header(TAG_PCM, 1, u32::MAX, 16, false);
        blob.extend_from_slice(&[0u8; 3_300]);
        assert_eq!(dec.push(&blob).unwrap_err(), WavError::BadRate(u32::MAX));
        // 1 Hz once multiplied the audio 96,000 times in the resampler.
        let blob = header(TAG_PCM, 1, 1, 16, false);
        assert!(matches!(
            dec.push(&blob).unwrap_err(),
            WavError::UnsupportedRate(1)
        ));
        let blob = header(TAG_PCM, 1, 44_101, 16, false);
        assert!(matches!(
            dec.push(&blob).unwrap_err(),
            WavError::UnsupportedRate(44_101)
        ));
        let blob = header(TAG_PCM, 9, 16_000, 16, false);
        assert_eq!(dec.push(&blob).unwrap_err(), WavError::BadChannels(9));
        // Nothing was accepted, so a good first header still sets the format.
        let mut blob = header(TAG_PCM, 1, 48_000, 16, false);
        blob.extend_from_slice(&[0u8; 4]);
        assert_eq!(dec.push(&blob).unwrap().len(), 2);
        assert_eq!(dec.format().sample_rate, 48_000);
    }

    #[test]
    fn a_stream_keeps_one_format() {
        let mut dec = StreamDecoder::new(pcm16_mono(16_000));
        let mut first = header(TAG_PCM, 1, 48_000, 16, false);
        first.extend_from_slice(&[0u8; 4]);
        dec.push(&first).unwrap();
        // Repeating the same header is fine; changing the rate is not.
        dec.push(&first).unwrap();
        let other = header(TAG_PCM, 1, 44_100, 16, false);
        let e = dec.push(&other).unwrap_err();
        assert!(matches!(e, WavError::FormatChanged { .. }), "{e}");
        assert!(e.to_string().contains("48000 Hz"), "{e}");
        assert_eq!(dec.format().sample_rate, 48_000);
        // Headerless audio in the default format locks it too.
        let mut dec = StreamDecoder::new(pcm16_mono(16_000));
        dec.push(&[0u8; 8]).unwrap();
        assert!(matches!(
            dec.push(&header(TAG_PCM, 1, 48_000, 16, false))
                .unwrap_err(),
            WavError::FormatChanged { .. }
        ));
    }

    #[test]
    fn headerless_stream_uses_the_default_format() {
        let default = WavFormat {
            sample_format: SampleFormat::Mulaw,
            channels: 1,
            sample_rate: 8_000,
        };
        let mut dec = StreamDecoder::new(default);
        let out = dec.push(&[0xFF, 0x7F, 0x00]).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], 0.0);
        assert!(out[2] < -0.9);
    }
}
