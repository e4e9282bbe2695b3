//! The turn detector's table and its pause, resume and sustained-speech paths, at 1 kHz.

use super::*;

/// 100 frames per second at 1 kHz make the arithmetic readable: frame k is samples
/// [10k, 10k+10), 10 ms each.
fn run(settings: TurnSettings, probs: &[f32]) -> Vec<(usize, TurnEvent)> {
    let mut det = TurnDetector::new(settings, 1_000);
    let mut events = Vec::new();
    for (k, &p) in probs.iter().enumerate() {
        let mut out = Vec::new();
        det.push(10 * k as u64, 10 * (k as u64 + 1), p, &mut out);
        events.extend(out.into_iter().map(|e| (k, e)));
    }
    events
}

fn settings() -> TurnSettings {
    TurnSettings {
        start_threshold: 0.5,
        end_threshold: 0.3,
        min_speech_ms: 50,
        min_silence_ms: 100,
        speech_pad_ms: 20,
        max_turn_ms: 1_000,
        min_interruption_ms: 30,
    }
}

fn seq(parts: &[(f32, usize)]) -> Vec<f32> {
    parts
        .iter()
        .flat_map(|&(p, n)| std::iter::repeat_n(p, n))
        .collect()
}

#[test]
fn table() {
    use TurnEvent::*;
    type Case = (&'static str, Vec<f32>, Vec<(usize, TurnEvent)>);
    let cases: Vec<Case> = vec![
        ("silence only", seq(&[(0.0, 50)]), vec![]),
        (
            "one clean turn",
            seq(&[(0.0, 10), (0.9, 30), (0.0, 20)]),
            vec![
                (12, Interruption { start: 80 }),
                (14, SpeechStart { start: 80 }),
                (
                    49,
                    SpeechEnd {
                        start: 80,
                        end: 420,
                        forced: false,
                    },
                ),
            ],
        ),
        (
            "a blip shorter than min_speech is no turn, and says so",
            seq(&[(0.9, 4), (0.0, 30)]),
            vec![(2, Interruption { start: 0 }), (13, Dropped)],
        ),
        (
            "hysteresis: mid probabilities neither end nor restart a turn",
            seq(&[(0.9, 10), (0.4, 30), (0.1, 10)]),
            vec![
                (2, Interruption { start: 0 }),
                (4, SpeechStart { start: 0 }),
                (
                    49,
                    SpeechEnd {
                        start: 0,
                        end: 420,
                        forced: false,
                    },
                ),
            ],
        ),
        (
            "a short pause does not end the turn",
            seq(&[(0.9, 10), (0.0, 5), (0.9, 10), (0.0, 10)]),
            vec![
                (2, Interruption { start: 0 }),
                (4, SpeechStart { start: 0 }),
                (
                    34,
                    SpeechEnd {
                        start: 0,
                        end: 270,
                        forced: false,
                    },
                ),
            ],
        ),
        (
            "max turn length cuts and restarts",
            seq(&[(0.9, 110)]),
            vec![
                (2, Interruption { start: 0 }),
                (4, SpeechStart { start: 0 }),
                (
                    99,
                    SpeechEnd {
                        start: 0,
                        end: 1000,
                        forced: true,
                    },
                ),
                (104, SpeechStart { start: 980 }),
            ],
        ),
    ];
    for (name, probs, want) in cases {
        assert_eq!(run(settings(), &probs), want, "{name}");
    }
}

#[test]
fn pending_speech_survives_short_dips_but_not_long_silence() {
    use TurnEvent::*;
    let s = settings();
    // A soft onset with a dip: the turn starts at the first speech frame.
    let events = run(
        s,
        &seq(&[(0.0, 5), (0.9, 2), (0.0, 3), (0.9, 10), (0.0, 20)]),
    );
    assert!(
        events.contains(&(12, SpeechStart { start: 30 })),
        "{events:?}"
    );
    // A blip, then silence longer than min_silence: the candidate is dropped.
    let events = run(s, &seq(&[(0.9, 3), (0.0, 12), (0.9, 3), (0.0, 20)]));
    assert!(
        events.iter().all(|(_, e)| !matches!(e, SpeechStart { .. })),
        "{events:?}"
    );
}

/// Pauses at 40 ms of silence, ends at 100 ms: a pause, a resume when speech comes back, a
/// second pause, and `end_now` ending the turn where a full silence would have.
#[test]
fn pauses_resume_and_end_now() {
    use TurnEvent::*;
    let mut det = TurnDetector::new(settings(), 1_000).with_pauses(&[40]);
    let probs = seq(&[(0.9, 10), (0.0, 6), (0.9, 10), (0.0, 5)]);
    let mut events = Vec::new();
    for (k, &p) in probs.iter().enumerate() {
        let mut out = Vec::new();
        det.push(10 * k as u64, 10 * (k as u64 + 1), p, &mut out);
        events.extend(out.into_iter().map(|e| (k, e)));
    }
    assert_eq!(
        events,
        vec![
            (2, Interruption { start: 0 }),
            (4, SpeechStart { start: 0 }),
            (13, Pause { start: 0, end: 120 }),
            (16, Resume),
            (29, Pause { start: 0, end: 280 }),
        ]
    );
    assert_eq!(
        det.end_now(),
        Some(SpeechEnd {
            start: 0,
            end: 280,
            forced: false
        }),
        "the same turn a full silence would have ended"
    );
    assert_eq!(det.end_now(), None, "idle now");
    // Without a pause reported, end_now does nothing; silence still ends the turn.
    let mut det = TurnDetector::new(settings(), 1_000).with_pauses(&[40]);
    let mut out = Vec::new();
    for k in 0..12u64 {
        det.push(10 * k, 10 * (k + 1), 0.9, &mut out);
    }
    assert_eq!(det.end_now(), None);
    for k in 12..30u64 {
        det.push(10 * k, 10 * (k + 1), 0.0, &mut out);
    }
    assert_eq!(
        out.last(),
        Some(&SpeechEnd {
            start: 0,
            end: 140,
            forced: false
        })
    );
    assert_eq!(out.iter().filter(|e| matches!(e, Pause { .. })).count(), 1);
}

/// With two pause lengths, one silence reports a pause at each, with the same turn.
#[test]
fn a_longer_silence_reports_a_second_pause() {
    let mut det = TurnDetector::new(settings(), 1_000).with_pauses(&[40, 70]);
    let mut out = Vec::new();
    for k in 0..22u64 {
        let p = if k < 10 { 0.9 } else { 0.0 };
        det.push(10 * k, 10 * (k + 1), p, &mut out);
    }
    let pauses: Vec<&TurnEvent> = out
        .iter()
        .filter(|e| matches!(e, TurnEvent::Pause { .. }))
        .collect();
    assert_eq!(
        pauses,
        [&TurnEvent::Pause { start: 0, end: 120 }; 2],
        "{out:?}"
    );
}

/// `end_after` ends a paused turn at a shorter silence; after a resume it no longer holds.
#[test]
fn end_after_shortens_the_silence_for_this_pause_only() {
    use TurnEvent::*;
    let mut det = TurnDetector::new(settings(), 1_000).with_pauses(&[40]);
    let mut out = Vec::new();
    let mut k = 0u64;
    let mut feed = |det: &mut TurnDetector, p: f32, n: u64, out: &mut Vec<TurnEvent>| {
        for _ in 0..n {
            det.push(10 * k, 10 * (k + 1), p, out);
            k += 1;
        }
    };
    feed(&mut det, 0.9, 10, &mut out);
    feed(&mut det, 0.0, 5, &mut out);
    assert!(matches!(out.last(), Some(Pause { .. })));
    det.end_after(60);
    feed(&mut det, 0.9, 5, &mut out);
    assert_eq!(out.last(), Some(&Resume));
    // A new pause: the old 60 ms no longer applies (60 ms of silence end nothing).
    feed(&mut det, 0.0, 6, &mut out);
    assert!(
        !out.iter().any(|e| matches!(e, SpeechEnd { .. })),
        "{out:?}"
    );
    // Given again, it ends the turn at once (70 ms of silence so far).
    det.end_after(60);
    feed(&mut det, 0.0, 1, &mut out);
    assert_eq!(
        out.last(),
        Some(&SpeechEnd {
            start: 0,
            end: 220,
            forced: false
        })
    );
}

/// `Sustained` comes once per turn, when its speech (first to latest speech frame, dips
/// inside included, trailing silence not) reaches the length given: never for a shorter turn,
/// and again for the next turn.
#[test]
fn sustained_speech_is_reported_once_per_turn_at_its_length() {
    use TurnEvent::*;
    let sustained_at = |probs: &[f32]| -> Vec<usize> {
        let mut det = TurnDetector::new(settings(), 1_000).with_sustained(150);
        let mut at = Vec::new();
        for (k, &p) in probs.iter().enumerate() {
            let mut out = Vec::new();
            det.push(10 * k as u64, 10 * (k as u64 + 1), p, &mut out);
            at.extend(out.iter().filter(|e| **e == Sustained).map(|_| k));
        }
        at
    };
    // Speech from frame 0: 150 ms have passed at the end of frame 14.
    assert_eq!(sustained_at(&seq(&[(0.9, 30), (0.0, 20)])), [14]);
    // 140 ms of speech, then silence long enough to end the turn: never.
    assert!(sustained_at(&seq(&[(0.9, 14), (0.0, 20)])).is_empty());
    // A dip inside the turn counts once speech returns (80 + 50 + 20 ms at frame 14), but the
    // silence itself does not: 100 ms of speech and 90 ms of quiet stay short.
    assert_eq!(sustained_at(&seq(&[(0.9, 8), (0.0, 5), (0.9, 10)])), [14]);
    assert!(sustained_at(&seq(&[(0.9, 10), (0.0, 9)])).is_empty());
    // Two turns, each long enough: once each.
    assert_eq!(
        sustained_at(&seq(&[(0.9, 20), (0.0, 15), (0.9, 20), (0.0, 15)])),
        [14, 49]
    );
    // Off unless asked for.
    let mut det = TurnDetector::new(settings(), 1_000).with_sustained(0);
    let mut out = Vec::new();
    for k in 0..40u64 {
        det.push(10 * k, 10 * (k + 1), 0.9, &mut out);
    }
    assert!(!out.contains(&Sustained), "{out:?}");
}

#[test]
fn validate_rejects_inverted_thresholds() {
    let s = TurnSettings {
        end_threshold: 0.8,
        ..TurnSettings::default()
    };
    assert!(s.validate().is_err());
    assert!(TurnSettings::default().validate().is_ok());
}
