//! The VAD on real speech: espeak-ng utterances separated by known silences must be found within
//! ±100 ms of where the speech really starts and ends.

mod common;

use gazelle::vad::offline::segments;
use gazelle::vad::TurnSettings;

#[tokio::test]
async fn boundaries_fall_within_100ms_of_the_truth() {
    let rate = 16_000;
    let parts = [
        "The quick brown fox jumps over the lazy dog.",
        "Please call me back tomorrow morning at nine.",
        "Yes.",
    ];
    let mut clip = common::silence(700, rate);
    let mut truth = Vec::new();
    for text in parts {
        let s = common::speech(text, rate).await;
        let (a, b) = common::active_span(&s, 0.01).expect("espeak produced sound");
        truth.push((clip.len() + a, clip.len() + b));
        clip.extend(&s);
        clip.extend(common::silence(1_500, rate));
    }
    let settings = TurnSettings::default();
    let pad = (settings.speech_pad_ms * rate / 1000) as i64;
    let found = segments(&mut common::silero(), &clip, rate, settings).unwrap();
    assert_eq!(
        found.len(),
        truth.len(),
        "segments {found:?} vs truth {truth:?}"
    );
    for (seg, (a, b)) in found.iter().zip(&truth) {
        let start_err = (seg.start as i64 + pad - *a as i64) as f64 / rate as f64 * 1000.0;
        let end_err = (seg.end as i64 - pad - *b as i64) as f64 / rate as f64 * 1000.0;
        eprintln!("segment {seg:?}: start off by {start_err:.0} ms, end off by {end_err:.0} ms");
        assert!(start_err.abs() <= 100.0, "start off by {start_err} ms");
        assert!(end_err.abs() <= 100.0, "end off by {end_err} ms");
    }
}

#[tokio::test]
async fn silence_and_noise_floor_make_no_turns() {
    let rate = 16_000;
    let mut clip = common::silence(3_000, rate);
    // A faint hum, far below speech level.
    for (i, x) in clip.iter_mut().enumerate() {
        *x = 0.002 * (i as f32 * 0.05).sin();
    }
    let found = segments(&mut common::silero(), &clip, rate, TurnSettings::default()).unwrap();
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test]
async fn runs_at_8khz_too() {
    let s8 = common::speech("Hello, can you hear me on the phone line?", 8_000).await;
    let mut clip = common::silence(500, 8_000);
    clip.extend(&s8);
    clip.extend(common::silence(1_000, 8_000));
    let found = segments(&mut common::silero(), &clip, 8_000, TurnSettings::default()).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
}
