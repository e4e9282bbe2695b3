//! Where speech is in a clip by its loudness: the first and last 10 ms frames whose RMS is within
//! 26 dB of the loudest frame. Benchmarks and tests use it as the truth for where an utterance
//! starts and ends; the server itself uses the VAD.

/// `(start, end)` sample indices of the speech in `samples` at `rate`: `start` opens the first
/// frame within 26 dB of the loudest, `end` closes the last. None for an empty or silent clip.
pub fn speech_span(samples: &[f32], rate: u32) -> Option<(usize, usize)> {
    let frame = (rate as usize / 100).max(1);
    let rms: Vec<f32> = samples
        .chunks(frame)
        .map(|c| (c.iter().map(|v| v * v).sum::<f32>() / c.len() as f32).sqrt())
        .collect();
    let peak = rms.iter().copied().fold(0.0, f32::max);
    if peak <= 0.0 {
        return None;
    }
    let loud = |r: &f32| *r > peak * 0.05;
    let first = rms.iter().position(loud)?;
    let last = rms.iter().rposition(loud)?;
    Some((first * frame, ((last + 1) * frame).min(samples.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_loud_part_and_ignores_quiet_noise() {
        let rate = 16_000;
        let mut x = vec![0.001f32; 3_200];
        x.extend((0..8_000).map(|i| (i as f32 * 0.05).sin() * 0.5));
        x.extend(vec![0.002f32; 4_800]);
        assert_eq!(speech_span(&x, rate), Some((3_200, 11_200)));
        assert_eq!(speech_span(&[0.0; 100], rate), None);
    }
}
