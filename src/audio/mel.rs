//! Whisper's log-mel spectrogram, as transformers' `WhisperFeatureExtractor` computes it: a
//! centred (reflect-padded) 400-point STFT with a periodic Hann window and a 160-sample hop, the
//! power spectrum through 80 Slaney-normalised triangular mel filters (0–8 kHz, Slaney mel scale),
//! log10 with a 1e-10 floor, the last frame dropped, a floor 8 below the peak, and `(x + 4) / 4`.
//! It is the input of the end-of-turn model.

use std::sync::Arc;

use ndarray::Array2;
use realfft::{RealFftPlanner, RealToComplex};

pub const SAMPLE_RATE: u32 = 16_000;
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
pub const N_MELS: usize = 80;
const BINS: usize = N_FFT / 2 + 1;

/// The planned transform and the filters; build once, use from one thread at a time.
pub struct LogMel {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    /// [BINS, N_MELS]: the power spectrum's rows times this are the mel energies.
    filters: Array2<f64>,
}

impl Default for LogMel {
    fn default() -> Self {
        Self::new()
    }
}

impl LogMel {
    pub fn new() -> Self {
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        let filters = Array2::from_shape_vec((N_MELS, BINS), slaney_filters())
            .expect("N_MELS x BINS filters")
            .reversed_axes()
            .as_standard_layout()
            .into_owned();
        LogMel {
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT),
            window,
            filters,
        }
    }

    /// Features of `audio` (16 kHz): `[N_MELS, audio.len() / HOP]` row-major, one column per hop.
    /// The loops are plain indexing and the filter bank one matrix product, so this stays fast
    /// in unoptimised builds too.
    pub fn compute(&self, audio: &[f32]) -> Vec<f32> {
        let half = N_FFT / 2;
        let padded = reflect_pad(audio, half);
        // One frame per hop plus one, the last dropped as Whisper does.
        let kept = audio.len() / HOP;
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f64; kept * BINS];
        for f in 0..kept {
            let frame = &padded[f * HOP..f * HOP + N_FFT];
            for k in 0..N_FFT {
                input[k] = frame[k] * self.window[k];
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("buffers come from the plan");
            let row = &mut power[f * BINS..(f + 1) * BINS];
            for b in 0..BINS {
                row[b] = spectrum[b].norm_sqr();
            }
        }
        let power = Array2::from_shape_vec((kept, BINS), power).expect("kept x BINS");
        // [kept, N_MELS], through matrixmultiply's optimised kernel.
        let mel = power.dot(&self.filters);
        let mel = mel.as_slice().expect("a fresh product is contiguous");
        let mut logmel = vec![0f64; N_MELS * kept];
        let mut peak = f64::NEG_INFINITY;
        for f in 0..kept {
            for m in 0..N_MELS {
                let v = mel[f * N_MELS + m].max(1e-10).log10();
                peak = peak.max(v);
                logmel[m * kept + f] = v;
            }
        }
        let floor = peak - 8.0;
        let mut out = vec![0f32; logmel.len()];
        for i in 0..logmel.len() {
            out[i] = ((logmel[i].max(floor) + 4.0) / 4.0) as f32;
        }
        out
    }
}

/// `audio` with `pad` samples mirrored onto each end (numpy's "reflect": the edge sample is not
/// repeated), as f64.
fn reflect_pad(audio: &[f32], pad: usize) -> Vec<f64> {
    let n = audio.len();
    let at = |i: isize| -> f64 {
        let mut j = i;
        while n > 1 && (j < 0 || j >= n as isize) {
            j = if j < 0 { -j } else { 2 * (n as isize - 1) - j };
        }
        audio[j.clamp(0, n.saturating_sub(1) as isize) as usize] as f64
    };
    let mut out = Vec::with_capacity(n + 2 * pad);
    for i in 0..pad {
        out.push(at(i as isize - pad as isize));
    }
    for &x in audio {
        out.push(x as f64);
    }
    for i in 0..pad {
        out.push(at((n + i) as isize));
    }
    out
}

fn hz_to_mel(f: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        m * f_sp
    }
}

/// Triangular filters between mel-spaced edges, each scaled to unit area (Slaney).
fn slaney_filters() -> Vec<f64> {
    let nyquist = SAMPLE_RATE as f64 / 2.0;
    let fft_freqs: Vec<f64> = (0..BINS)
        .map(|k| k as f64 * nyquist / (BINS - 1) as f64)
        .collect();
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(nyquist));
    let edges: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
        .collect();
    let mut filters = vec![0f64; N_MELS * BINS];
    for m in 0..N_MELS {
        let (left, centre, right) = (edges[m], edges[m + 1], edges[m + 2]);
        let norm = 2.0 / (right - left);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let down = (f - left) / (centre - left);
            let up = (right - f) / (right - centre);
            filters[m * BINS + k] = down.min(up).max(0.0) * norm;
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_a_tone_lands_in_its_band() {
        let mel = LogMel::new();
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin() * 0.5)
            .collect();
        let f = mel.compute(&tone);
        let frames = 16_000 / HOP;
        assert_eq!(f.len(), N_MELS * frames);
        // Band energy in the middle frame: the peak is the band holding 440 Hz.
        let col = |m: usize| f[m * frames + frames / 2];
        let peak = (0..N_MELS)
            .max_by(|&a, &b| col(a).total_cmp(&col(b)))
            .unwrap();
        let centre = mel_to_hz(hz_to_mel(0.0) + (hz_to_mel(8000.0)) * (peak + 1) as f64 / 81.0);
        assert!(
            (centre - 440.0).abs() < 60.0,
            "band {peak} centred at {centre} Hz"
        );
        // The 8-below-peak floor bounds the range.
        let (lo, hi) = f
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(hi - lo <= 2.0 + 1e-6, "{lo}..{hi}");
    }
}
