//! The pacer alone, on tokio's paused clock: holds, rewinds, leads and marks.

use super::*;
use crate::tts::SynthChunk;

fn chunk(unit: usize, secs: f32, rate: u32, done: bool) -> SynthChunk {
    SynthChunk {
        unit,
        samples: vec![0.1; (secs * rate as f32) as usize],
        sample_rate: rate,
        unit_done: done,
    }
}

/// A gate that is open from the start.
fn released() -> Gate {
    watch::channel(None).1
}

/// A held reply synthesizes (its first audio is reported) but sends nothing until released;
/// then it goes out as usual, from its first sample.
#[tokio::test(start_paused = true)]
async fn a_held_reply_sends_nothing_until_released() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, mut erx) = mpsc::channel(16);
    let (ltx, _lrx) = watch::channel(Playout::default());
    let (hold, gate) = watch::channel(Some(now()));
    let settings = PacerSettings {
        reply: 1,
        output_rate: 16_000,
        frame_ms: 20,
        lead: Duration::from_millis(100),
        max_ahead: Duration::from_secs(10),
    };
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        gate,
        CancellationToken::new(),
    ));
    atx.send(Ok(chunk(0, 0.5, 16_000, true))).await.unwrap();
    drop(atx);
    assert!(matches!(
        erx.recv().await,
        Some(PacerEvent::FirstSynthAudio(_))
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(frx.try_recv().is_err(), "nothing was sent while held");
    let released_at = now();
    hold.send(None).unwrap();
    let mut got = 0;
    let mut first = None;
    while let Some(out) = frx.recv().await {
        if let Outbound::Audio { samples, .. } = out {
            first.get_or_insert(now());
            got += samples.len();
        }
    }
    task.await.unwrap();
    assert_eq!(got, 8_000, "all of it, once");
    assert_eq!(first, Some(released_at), "at once on release");
}

/// The call holds the gate and then queues the pause's `Clear`; the pacer may queue a frame in
/// between, before it sees the hold (it runs on another thread). Such a frame reaches the
/// transport after the `Clear`, so it must be dropped there even though the pacer has not yet
/// taken it back. Here the pacer task has not run since the hold when the frames are read.
#[tokio::test(start_paused = true)]
async fn a_frame_queued_as_the_call_holds_the_reply_is_dropped() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, _erx) = mpsc::channel(16);
    let (ltx, _lrx) = watch::channel(Playout::default());
    let (hold, gate) = watch::channel(None);
    let settings = PacerSettings {
        reply: 1,
        output_rate: 16_000,
        frame_ms: 20,
        lead: Duration::from_millis(200),
        max_ahead: Duration::from_secs(10),
    };
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        gate,
        CancellationToken::new(),
    ));
    atx.send(Ok(chunk(0, 1.0, 16_000, true))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = Vec::new();
    while let Ok(m) = frx.try_recv() {
        queued.push(m);
    }
    let live = |m: &Outbound| match m {
        Outbound::Audio { playable, .. } => Some(!playable.is_stale()),
        _ => None,
    };
    assert!(
        queued.iter().filter_map(live).count() > 10 && queued.iter().filter_map(live).all(|l| l),
        "frames out before any hold are playable"
    );
    // Two frames queued by the pacer but not yet taken by the transport.
    tokio::time::sleep(Duration::from_millis(40)).await;
    hold.send(Some(now())).unwrap();
    let mut late = Vec::new();
    while let Ok(m) = frx.try_recv() {
        late.push(m);
    }
    let late: Vec<bool> = late.iter().filter_map(live).collect();
    assert!(
        !late.is_empty(),
        "the pacer queued frames before it saw the hold"
    );
    assert!(
        late.iter().all(|l| !l),
        "{late:?}: a frame reached the transport while held"
    );
    hold.send(None).unwrap();
    drop(atx);
    task.await.unwrap();
}

/// A reply held while it plays is rewound to where playback stood: frames still on their way
/// are marked dropped, the ledger keeps only what played, nothing goes out while held, and on
/// release exactly the unplayed rest goes out, with the unit's end mark again.
#[tokio::test(start_paused = true)]
async fn a_reply_held_while_playing_resumes_where_playback_stood() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, _erx) = mpsc::channel(16);
    let (ltx, lrx) = watch::channel(Playout::default());
    let (hold, gate) = watch::channel(None);
    let settings = PacerSettings {
        reply: 1,
        output_rate: 16_000,
        frame_ms: 20,
        lead: Duration::from_millis(200),
        max_ahead: Duration::from_secs(10),
    };
    let started = now();
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        gate,
        CancellationToken::new(),
    ));
    atx.send(Ok(chunk(0, 1.0, 16_000, true))).await.unwrap();
    drop(atx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused = now();
    hold.send(Some(paused)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut before = Vec::new();
    while let Ok(m) = frx.try_recv() {
        before.push(m);
    }
    let sent: usize = before
        .iter()
        .filter_map(|m| match m {
            Outbound::Audio { samples, .. } => Some(samples.len()),
            _ => None,
        })
        .sum();
    assert!(sent > 8_000, "{sent}: the lead went out before the hold");
    assert!(
        before.iter().all(|m| match m {
            Outbound::Audio { playable, .. } => playable.is_stale(),
            _ => true,
        }),
        "frames sent before the hold are marked taken back"
    );
    let l = lrx.borrow().clone();
    let played: u64 = l.units[0].runs.iter().map(|r| r.1).sum();
    assert_eq!(played, 8_000, "the ledger keeps what played by the hold");
    assert_eq!(l.ends_at, Some(paused));
    let units = vec!["one two three four".to_string()];
    assert_eq!(
        spoken_text(&units, &l, now()),
        ("one two".to_string(), false)
    );
    hold.send(None).unwrap();
    let resumed = now();
    let mut after = 0;
    let mut end_marks = 0;
    while let Some(m) = frx.recv().await {
        match m {
            Outbound::Audio {
                samples, playable, ..
            } => {
                assert!(!playable.is_stale());
                after += samples.len();
            }
            Outbound::UnitSent { within: None, .. } => end_marks += 1,
            _ => {}
        }
    }
    task.await.unwrap();
    assert_eq!(after, 8_000, "the unplayed half, once");
    assert_eq!(end_marks, 1);
    let l = lrx.borrow().clone();
    assert_eq!(
        spoken_text(&units, &l, resumed + Duration::from_millis(400)),
        ("one two three".to_string(), false)
    );
    assert_eq!(
        spoken_text(&units, &l, resumed + Duration::from_millis(500)),
        ("one two three four".to_string(), true)
    );
    assert!(started < paused);
}

#[tokio::test(start_paused = true)]
async fn holds_output_to_the_lead_and_fills_the_ledger() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, mut erx) = mpsc::channel(16);
    let (ltx, lrx) = watch::channel(Playout::default());
    let settings = PacerSettings {
        reply: 7,
        output_rate: 16_000,
        frame_ms: 20,
        lead: Duration::from_millis(100),
        max_ahead: Duration::from_secs(10),
    };
    let started = now();
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        released(),
        CancellationToken::new(),
    ));
    atx.send(Ok(chunk(0, 1.0, 16_000, true))).await.unwrap();
    atx.send(Ok(chunk(1, 0.5, 22_050, true))).await.unwrap();
    drop(atx);
    let mut got = 0usize;
    let mut max_ahead = Duration::ZERO;
    let mut units_sent = Vec::new();
    let mut inside = Vec::new();
    while let Some(out) = frx.recv().await {
        let samples = match out {
            Outbound::Audio { samples, .. } => samples,
            Outbound::UnitSent {
                reply,
                unit,
                within: None,
                ..
            } => {
                // Each unit's end follows its last sample.
                units_sent.push((reply, unit, got));
                continue;
            }
            Outbound::UnitSent {
                unit,
                within: Some(n),
                ..
            } => {
                inside.push((unit, n, got));
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        got += samples.len();
        let played = now() - started;
        let sent = Duration::from_secs_f64(got as f64 / 16_000.0);
        max_ahead = max_ahead.max(sent.saturating_sub(played));
    }
    task.await.unwrap();
    assert_eq!(got, 16_000 + 8_000);
    assert_eq!(units_sent, vec![(7, 0, 16_000), (7, 1, 24_000)]);
    // Inside the units, at the first 20 ms frame at or past each 250 ms of audio (13 frames,
    // 4 160 samples), counted within each unit.
    assert_eq!(
        inside,
        vec![
            (0, 4_160, 4_160),
            (0, 8_320, 8_320),
            (0, 12_480, 12_480),
            (1, 4_160, 20_160)
        ]
    );
    assert!(
        max_ahead <= Duration::from_millis(100),
        "ran {max_ahead:?} ahead"
    );
    assert_eq!(erx.recv().await, Some(PacerEvent::FirstSynthAudio(started)));
    let l = lrx.borrow().clone();
    assert_eq!(l.units[0].total, Some(16_000));
    assert_eq!(l.units[1].total, Some(8_000));
    let units = vec!["one two three four".to_string(), "five six".to_string()];
    let at_half = started + Duration::from_millis(500);
    assert_eq!(
        spoken_text(&units, &l, at_half),
        ("one two".to_string(), false)
    );
    let at_end = started + Duration::from_secs(2);
    assert_eq!(
        spoken_text(&units, &l, at_end),
        ("one two three four five six".into(), true)
    );
}

/// Audio that comes after the caller's playback ran dry is reported as a synthesis underrun;
/// audio that was ready in time is not reported at all.
#[tokio::test(start_paused = true)]
async fn a_late_unit_is_reported_as_a_synthesis_underrun() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, mut erx) = mpsc::channel(16);
    let (ltx, _lrx) = watch::channel(Playout::default());
    let settings = PacerSettings {
        reply: 1,
        output_rate: 8_000,
        frame_ms: 20,
        lead: Duration::from_millis(100),
        max_ahead: Duration::from_secs(10),
    };
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        released(),
        CancellationToken::new(),
    ));
    // 0.5 s of audio, then the next unit only 0.8 s later: 0.3 s of silence for the caller.
    atx.send(Ok(chunk(0, 0.5, 8_000, true))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    atx.send(Ok(chunk(1, 0.2, 8_000, true))).await.unwrap();
    drop(atx);
    while frx.recv().await.is_some() {}
    task.await.unwrap();
    let mut underruns = Vec::new();
    while let Ok(ev) = erx.try_recv() {
        if let PacerEvent::Underrun { by, synthesis } = ev {
            underruns.push((by, synthesis));
        }
    }
    assert_eq!(underruns.len(), 1, "{underruns:?}");
    let (by, synthesis) = underruns[0];
    assert!(synthesis);
    let ms = by.as_millis();
    assert!((290..=310).contains(&ms), "gap of {ms} ms");
}

/// A long reply (a huge first message, say) is never held whole: synthesis waits once the
/// pacer holds `max_ahead` beyond what it sent.
#[tokio::test(start_paused = true)]
async fn holds_at_most_max_ahead_of_synthesized_audio() {
    let (atx, arx) = mpsc::channel(1);
    let (ftx, _frx) = mpsc::channel(4096);
    let (etx, _erx) = mpsc::channel(16);
    let (ltx, _lrx) = watch::channel(Playout::default());
    let cancel = CancellationToken::new();
    let settings = PacerSettings {
        reply: 1,
        output_rate: 8_000,
        frame_ms: 20,
        lead: Duration::from_millis(100),
        max_ahead: Duration::from_secs(3),
    };
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        released(),
        cancel.clone(),
    ));
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = taken.clone();
    tokio::spawn(async move {
        for i in 0..600 {
            if atx.send(Ok(chunk(0, 1.0, 8_000, i == 599))).await.is_err() {
                return;
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    // About 5 s played, 3 s held, one chunk in the channel and one in hand.
    let n = taken.load(std::sync::atomic::Ordering::SeqCst);
    assert!((5..=10).contains(&n), "took {n} one-second chunks in 5 s");
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_sending_at_once() {
    let (atx, arx) = mpsc::channel(8);
    let (ftx, mut frx) = mpsc::channel(1024);
    let (etx, _erx) = mpsc::channel(16);
    let (ltx, _lrx) = watch::channel(Playout::default());
    let cancel = CancellationToken::new();
    let settings = PacerSettings {
        reply: 7,
        output_rate: 8_000,
        frame_ms: 20,
        lead: Duration::from_millis(200),
        max_ahead: Duration::from_secs(10),
    };
    let task = tokio::spawn(run(
        settings,
        arx,
        ftx,
        etx,
        ltx,
        released(),
        cancel.clone(),
    ));
    atx.send(Ok(chunk(0, 5.0, 8_000, true))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    task.await.unwrap();
    let mut n = 0;
    while let Ok(out) = frx.try_recv() {
        if let Outbound::Audio { samples, .. } = out {
            n += samples.len();
        }
    }
    // 500 ms played plus at most the 200 ms lead.
    assert!(n <= 8 * 700 + 160, "sent {n} samples");
    assert!(n >= 8 * 500, "sent {n} samples");
}
