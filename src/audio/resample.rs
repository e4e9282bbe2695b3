//! Streaming sample-rate conversion on top of rubato's FFT resampler. The stream keeps the
//! filter state and any partial chunk across calls, trims the filter delay so output sample n lines
//! up with input sample n × ratio, and flushes the tail at the end.

use audioadapter_buffers::direct::SequentialSliceOfVecs;
use rubato::{Fft, FixedSync, Indexing, Resampler as _};

use super::MAX_RATE;

#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    #[error("cannot resample {from} Hz to {to} Hz: {reason}")]
    Construct { from: u32, to: u32, reason: String },
    #[error("resampler failed: {0}")]
    Process(String),
}

/// Target length of one processing chunk. Short enough to add little latency, long enough to keep
/// the FFT efficient.
const CHUNK_MS: u32 = 10;

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub(crate) struct StreamResampler {
    from: u32,
    to: u32,
    inner: Option<Fft<f32>>,
    pending: Vec<f32>,
    out_buf: Vec<Vec<f32>>,
    /// Output samples still to drop at the start (the filter's delay).
    to_trim: usize,
    consumed: u64,
    produced: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StreamResampler({} Hz -> {} Hz)", self.from, self.to)
    }
}

impl StreamResampler {
    pub(crate) fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let err = |reason: String| ResampleError::Construct { from, to, reason };
        if !(1..=MAX_RATE).contains(&from) || !(1..=MAX_RATE).contains(&to) {
            return Err(err(format!("rates must be within 1..={MAX_RATE} Hz")));
        }
        let inner = if from == to {
            None
        } else {
            // The FFT resampler needs chunks that are a multiple of from / gcd(from, to).
            let unit = (from / gcd(from, to)) as usize;
            let target = (from as u64 * CHUNK_MS as u64 / 1000) as usize;
            let chunk = target.div_ceil(unit).max(1) * unit;
            let fft = Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
                .map_err(|e| err(e.to_string()))?;
            Some(fft)
        };
        let (out_buf, to_trim) = match &inner {
            Some(r) => (vec![vec![0.0; r.output_frames_max()]], r.output_delay()),
            None => (vec![Vec::new()], 0),
        };
        Ok(StreamResampler {
            from,
            to,
            inner,
            pending: Vec::new(),
            out_buf,
            to_trim,
            consumed: 0,
            produced: 0,
        })
    }

    pub(crate) fn input_rate(&self) -> u32 {
        self.from
    }

    /// Output samples owed for everything pushed so far.
    fn expected(&self) -> u64 {
        (self.consumed * self.to as u64).div_ceil(self.from as u64)
    }

    fn emit(&mut self, produced: usize, out: &mut Vec<f32>) {
        let skip = self.to_trim.min(produced);
        self.to_trim -= skip;
        out.extend_from_slice(&self.out_buf[0][skip..produced]);
        self.produced += (produced - skip) as u64;
    }

    /// Runs one FFT chunk (`chunk` holds exactly `input_frames_next` samples, of which the first
    /// `valid` are real) and appends its output to `out`.
    fn process(
        &mut self,
        chunk: Vec<f32>,
        valid: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ResampleError> {
        let err = |e: String| ResampleError::Process(e);
        let r = self.inner.as_mut().expect("only called when resampling");
        let need = chunk.len();
        let chunk = [chunk];
        let inp = SequentialSliceOfVecs::new(&chunk, 1, need).map_err(|e| err(e.to_string()))?;
        let frames = self.out_buf[0].len();
        let mut outp = SequentialSliceOfVecs::new_mut(&mut self.out_buf, 1, frames)
            .map_err(|e| err(e.to_string()))?;
        let idx = (valid < need).then(|| Indexing::new().partial_len(valid));
        let (_, produced) = r
            .process_into_buffer(&inp, &mut outp, idx.as_ref())
            .map_err(|e| err(e.to_string()))?;
        self.emit(produced, out);
        Ok(())
    }

    /// Converts a chunk; output may be shorter than the ideal length until the next call or
    /// `flush`, because whole FFT chunks are processed at a time.
    pub(crate) fn push(&mut self, input: &[f32]) -> Result<Vec<f32>, ResampleError> {
        self.consumed += input.len() as u64;
        let Some(r) = self.inner.as_ref() else {
            self.produced += input.len() as u64;
            return Ok(input.to_vec());
        };
        let need = r.input_frames_next();
        self.pending.extend_from_slice(input);
        let mut out = Vec::with_capacity(input.len() * self.to as usize / self.from as usize + 64);
        let mut start = 0;
        while self.pending.len() - start >= need {
            let chunk = self.pending[start..start + need].to_vec();
            self.process(chunk, need, &mut out)?;
            start += need;
        }
        self.pending.drain(..start);
        Ok(out)
    }

    /// Pushes silence through the filter so every input sample has produced its output, then
    /// resets for a new stream.
    pub(crate) fn flush(&mut self) -> Result<Vec<f32>, ResampleError> {
        let mut out = Vec::new();
        let expected = self.expected();
        if let Some(r) = self.inner.as_ref() {
            let need = r.input_frames_next();
            while self.produced < expected {
                let valid = self.pending.len().min(need);
                let mut chunk = std::mem::take(&mut self.pending);
                chunk.resize(need, 0.0);
                self.process(chunk, valid, &mut out)?;
            }
            let surplus = (self.produced - expected) as usize;
            out.truncate(out.len().saturating_sub(surplus));
        }
        self.reset();
        Ok(out)
    }

    /// Forgets all state, for a new independent stream.
    pub(crate) fn reset(&mut self) {
        if let Some(r) = self.inner.as_mut() {
            r.reset();
            self.to_trim = r.output_delay();
        }
        self.pending.clear();
        self.consumed = 0;
        self.produced = 0;
    }
}

/// Resamples a whole clip in one go.
pub fn resample_all(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>, ResampleError> {
    let mut r = StreamResampler::new(from, to)?;
    let mut out = r.push(input)?;
    out.extend(r.flush()?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::SUPPORTED_RATES;

    fn tone(freq: f32, rate: u32, secs: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5)
            .collect()
    }

    /// Goertzel power of one frequency, normalised by length.
    fn power(x: &[f32], freq: f32, rate: u32) -> f32 {
        let w = 2.0 * std::f32::consts::PI * freq / rate as f32;
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for &v in x {
            let s = v + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2) / (x.len() as f32).powi(2)
    }

    #[test]
    fn every_rate_pair_keeps_length_and_a_tone() {
        for &from in &SUPPORTED_RATES {
            for &to in &SUPPORTED_RATES {
                let input = tone(440.0, from, 0.5);
                // Push in odd-sized pieces to exercise the carried state.
                let mut r = StreamResampler::new(from, to).unwrap();
                let mut out = Vec::new();
                for piece in input.chunks(317) {
                    out.extend(r.push(piece).unwrap());
                }
                out.extend(r.flush().unwrap());
                let expect = (input.len() as u64 * to as u64).div_ceil(from as u64) as usize;
                assert_eq!(out.len(), expect, "{from} -> {to}");
                // The tone is still there at full strength, in the middle of the clip.
                let mid = &out[out.len() / 4..out.len() * 3 / 4];
                let p = power(mid, 440.0, to);
                assert!((p - 0.0625).abs() < 0.01, "{from} -> {to}: power {p}");
            }
        }
    }

    #[test]
    fn streaming_equals_one_shot() {
        let input = tone(1000.0, 48_000, 0.3);
        let whole = resample_all(&input, 48_000, 16_000).unwrap();
        let mut r = StreamResampler::new(48_000, 16_000).unwrap();
        let mut pieces = Vec::new();
        for piece in input.chunks(960) {
            pieces.extend(r.push(piece).unwrap());
        }
        pieces.extend(r.flush().unwrap());
        assert_eq!(whole.len(), pieces.len());
        assert!(whole.iter().zip(&pieces).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn output_is_aligned_with_input_time() {
        // A click at 100 ms must come out at 100 ms after the delay is trimmed.
        let mut input = vec![0.0f32; 8_000];
        input[800] = 1.0;
        let out = resample_all(&input, 8_000, 16_000).unwrap();
        let peak = out
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(i, _)| i)
            .unwrap();
        assert!((peak as i64 - 1600).abs() <= 2, "peak at {peak}");
    }

    #[test]
    fn bad_rates_are_refused() {
        assert!(StreamResampler::new(0, 16_000).is_err());
        // Once an overflow in the chunk size (from * CHUNK_MS in u32) and a 3 GB allocation.
        assert!(StreamResampler::new(u32::MAX, 16_000).is_err());
        assert!(StreamResampler::new(16_000, u32::MAX).is_err());
    }
}
