//! The engine against each sequence run alone, on the tiny f32 fixtures: random interleavings of
//! up to 8 calls that join, generate, are cancelled mid-prefill or mid-reply, are truncated (after
//! a barge-in, or after a whole reply only part of which was spoken) and leave at different steps, with clips from one 8-frame group to a long full-scale one. The
//! reference is the single-sequence path (`GazelleSession` with `Gazelle::step`), so every test
//! also compares the batched decode forward with the unbatched one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pool::KvPool;
use super::scheduler::{CallId, Command, Scheduler, TurnRequest};
use super::{pool_for, EngineSettings, KvBudget};
use crate::model::gazelle::generation::Next;
use crate::model::gazelle::session::GazelleSession;
use crate::model::gazelle::session_tests::engine_with;
use crate::model::gazelle::{GenerationParams, LoadedGazelle, Spoken};
use crate::model::SlmError;

type Rx = mpsc::Receiver<Result<String, SlmError>>;

const SYSTEM: &str = "Be brief.";

fn params(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        stop_on_eos: false,
        ..Default::default()
    }
}

fn settings(max_new_tokens: usize, prefill_chunk: usize) -> EngineSettings {
    EngineSettings {
        params: params(max_new_tokens),
        prefill_chunk,
        max_batch: 8,
        kv_budget: KvBudget::Positions(1 << 20),
        max_waiting_turns: 64,
    }
}

fn scheduler(engine: &Arc<LoadedGazelle>, s: EngineSettings) -> Scheduler {
    let pool = pool_for(engine, s.kv_budget);
    Scheduler::new(engine.clone(), s, pool, None)
}

/// Clips of every size class: one 8-frame group (2 audio tokens), the fixture's two, and a long
/// full-scale one.
fn clips(engine: &LoadedGazelle, a0: &[f32], a1: &[f32]) -> Vec<Vec<f32>> {
    let audio = &engine.model.config().audio;
    let n8 = (1..20_000).find(|&n| audio.num_frames(n) == 8).unwrap();
    let short: Vec<f32> = a0.iter().copied().cycle().take(n8).collect();
    let long: Vec<f32> = (0..48_000)
        .map(|i| {
            let t = i as f32 / 16_000.0;
            let s = (t * 440.0 * std::f32::consts::TAU * (1.0 + t)).sin();
            if s >= 0.0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect();
    vec![short, a0.to_vec(), a1.to_vec(), long]
}

fn open(s: &mut Scheduler, id: CallId, link: &Arc<()>) {
    s.command(Command::Open {
        id,
        system_prompt: Some(SYSTEM.into()),
        link: Arc::downgrade(link),
    });
}

fn ask(
    s: &mut Scheduler,
    id: CallId,
    audio: &[f32],
    tentative: bool,
    capacity: usize,
) -> (Rx, CancellationToken) {
    let (tx, rx) = mpsc::channel(capacity);
    let cancel = CancellationToken::new();
    s.command(Command::Turn {
        id,
        turn: TurnRequest {
            audio: Arc::from(audio),
            tokens: tx,
            cancel: cancel.clone(),
            tentative,
            at: Instant::now(),
        },
    });
    (rx, cancel)
}

/// Takes what is in the channel: the text, and whether the stream has ended.
fn drain(rx: &mut Rx) -> (String, bool) {
    let mut text = String::new();
    loop {
        match rx.try_recv() {
            Ok(Ok(t)) => text.push_str(&t),
            Ok(Err(e)) => panic!("the engine failed: {e}"),
            Err(mpsc::error::TryRecvError::Empty) => return (text, false),
            Err(mpsc::error::TryRecvError::Disconnected) => return (text, true),
        }
    }
}

/// Relative difference of two logit rows (max |a-b| over max |b|).
fn row_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn assert_rows_close(engine_rows: &[Vec<f32>], solo_rows: &[Vec<f32>], what: &str) {
    assert_eq!(engine_rows.len(), solo_rows.len(), "{what}: logit rows");
    for (i, (a, b)) in engine_rows.iter().zip(solo_rows).enumerate() {
        let e = row_err(a, b);
        assert!(e < 1e-4, "{what}: row {i} differs by {e}");
    }
}

/// A reply run alone on the single-sequence path: `n` tokens sampled (the last not fed, as
/// when a reply ends), recording the logits of each.
fn solo_reply(
    engine: &LoadedGazelle,
    s: &mut GazelleSession,
    p: &GenerationParams,
    n: usize,
    rows: &mut Vec<Vec<f32>>,
) {
    let (mut r, logits) = s.begin_reply(p).unwrap();
    let mut logits: Vec<f32> = logits.to_vec1().unwrap();
    loop {
        rows.push(logits.clone());
        let Next::Token(id) = r.decoder.sample(&logits, &r.context, engine.stop_ids()) else {
            break;
        };
        r.piece(engine, id).unwrap();
        if r.decoder.tokens.len() >= n {
            r.decoder.cancel();
            break;
        }
        if !r.decoder.wants_feed(s.cached(), s.max_positions()) {
            break;
        }
        logits = engine
            .model
            .step(id, s.cache_mut())
            .unwrap()
            .to_vec1()
            .unwrap();
        r.fed(id);
    }
    s.finish_reply(r).unwrap();
}

/// How a turn went in the engine, to replay alone.
#[derive(Debug, Clone)]
enum Outcome {
    /// Cancelled before it was encoded: the model never saw it.
    Dropped,
    /// Cancelled during its prefill: the turn is heard, with no reply.
    NoReply,
    /// `n` tokens sampled, then cut to what `spoken` covers if set.
    Reply { n: usize, spoken: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cancel {
    Never,
    /// Before the engine takes the turn up: it is dropped unheard.
    AtOnce,
    DuringPrefill,
    AfterTokens(usize),
}

#[derive(Debug, Clone)]
struct Plan {
    join: usize,
    turns: Vec<(usize, Cancel)>,
    /// Steps between the end of a turn and the next.
    gap: usize,
}

struct Live {
    rx: Option<Rx>,
    cancel: CancellationToken,
    turn: usize,
    rows_at_start: usize,
    messages_at_start: usize,
    text: String,
    next_at: Option<usize>,
    cancelled: Option<Cancel>,
    outcomes: Vec<Outcome>,
    _link: Arc<()>,
}

fn random_plans(rng: &mut StdRng, calls: usize, n_clips: usize) -> Vec<Plan> {
    (0..calls)
        .map(|_| {
            let n_turns = rng.random_range(1..=2);
            let turns = (0..n_turns)
                .map(|_| {
                    let cancel = match rng.random_range(0..5) {
                        0 => Cancel::AtOnce,
                        1 => Cancel::DuringPrefill,
                        2 => Cancel::AfterTokens(rng.random_range(1..6)),
                        _ => Cancel::Never,
                    };
                    (rng.random_range(0..n_clips), cancel)
                })
                .collect();
            Plan {
                join: rng.random_range(0..12),
                turns,
                gap: rng.random_range(0..4),
            }
        })
        .collect()
}

/// Runs `plans` through one scheduler; returns each call's turn outcomes.
fn run_engine(s: &mut Scheduler, plans: &[Plan], clips: &[Vec<f32>]) -> Vec<Vec<Outcome>> {
    let mut live: Vec<Option<Live>> = plans.iter().map(|_| None).collect();
    for step in 0..2_000 {
        for (i, plan) in plans.iter().enumerate() {
            let id = i as CallId;
            if step == plan.join {
                let link = Arc::new(());
                open(s, id, &link);
                live[i] = Some(Live {
                    rx: None,
                    cancel: CancellationToken::new(),
                    turn: 0,
                    rows_at_start: 0,
                    messages_at_start: 0,
                    text: String::new(),
                    next_at: Some(step),
                    cancelled: None,
                    outcomes: Vec::new(),
                    _link: link,
                });
            }
            let Some(l) = live[i].as_mut() else { continue };
            if l.next_at == Some(step) && l.turn < plan.turns.len() {
                l.next_at = None;
                l.rows_at_start = s.trace.get(&id).map_or(0, Vec::len);
                l.messages_at_start = s.session(id).unwrap().messages().len();
                l.text.clear();
                l.cancelled = None;
                let (rx, cancel) = ask(s, id, &clips[plan.turns[l.turn].0], false, 256);
                if plan.turns[l.turn].1 == Cancel::AtOnce {
                    cancel.cancel();
                    l.cancelled = Some(Cancel::AtOnce);
                }
                l.rx = Some(rx);
                l.cancel = cancel;
            }
        }
        s.step();
        let mut all_done = true;
        for (i, plan) in plans.iter().enumerate() {
            let id = i as CallId;
            let Some(l) = live[i].as_mut() else {
                all_done = false;
                continue;
            };
            if l.turn >= plan.turns.len() {
                continue;
            }
            all_done = false;
            let Some(rx) = l.rx.as_mut() else { continue };
            let (text, ended) = drain(rx);
            l.text.push_str(&text);
            let rows = s.trace.get(&id).map_or(0, Vec::len) - l.rows_at_start;
            let cancel = plan.turns[l.turn].1;
            if l.cancelled.is_none() && !ended {
                let now = match cancel {
                    Cancel::DuringPrefill => rows == 0,
                    Cancel::AfterTokens(k) => rows >= k,
                    Cancel::Never | Cancel::AtOnce => false,
                };
                if now {
                    l.cancel.cancel();
                    l.cancelled = Some(cancel);
                }
                continue;
            }
            if !ended {
                continue;
            }
            // The turn is over (the stream ended after a cancel or at max tokens).
            let messages = s.session(id).unwrap().messages().len();
            let outcome = if rows > 0 {
                // Half was heard: a barge-in after some tokens, or (on odd calls) a reply that
                // ran to its end but was cut at `limits.max_reply_chars`.
                let cut = match l.cancelled {
                    Some(Cancel::AfterTokens(_)) => true,
                    None => id % 2 == 1,
                    Some(_) => false,
                };
                let spoken = cut.then(|| {
                    let half: String = l.text.chars().take(l.text.chars().count() / 2).collect();
                    s.command(Command::Truncate {
                        id,
                        spoken: half.clone(),
                    });
                    half
                });
                Outcome::Reply { n: rows, spoken }
            } else if messages > l.messages_at_start {
                Outcome::NoReply
            } else {
                Outcome::Dropped
            };
            l.outcomes.push(outcome);
            l.rx = None;
            l.turn += 1;
            l.next_at = Some(step + 1 + plan.gap);
        }
        if all_done {
            return live
                .into_iter()
                .map(|l| l.expect("joined").outcomes)
                .collect();
        }
    }
    panic!("the engine did not finish the plans in 2000 steps: {plans:?}");
}

/// Replays one call's turns alone and compares every logit row, the ids in the cache and the
/// conversation with the engine's.
fn check_against_solo(
    engine: &Arc<LoadedGazelle>,
    s: &Scheduler,
    id: CallId,
    plan: &Plan,
    outcomes: &[Outcome],
    clips: &[Vec<f32>],
    p: &GenerationParams,
) {
    let mut solo = engine.open_session(Some(SYSTEM)).unwrap();
    let mut rows = Vec::new();
    for ((clip, _), outcome) in plan.turns.iter().zip(outcomes) {
        match outcome {
            Outcome::Dropped => {}
            Outcome::NoReply => {
                solo.append_user_audio_turn(&clips[*clip], "").unwrap();
            }
            Outcome::Reply { n, spoken } => {
                solo.append_user_audio_turn(&clips[*clip], "").unwrap();
                solo_reply(engine, &mut solo, p, *n, &mut rows);
                if let Some(text) = spoken {
                    solo.truncate_reply_to(Spoken::Text(text)).unwrap();
                }
            }
        }
    }
    let what = format!("call {id} {plan:?} {outcomes:?}");
    let empty = Vec::new();
    assert_rows_close(s.trace.get(&id).unwrap_or(&empty), &rows, &what);
    let ours = s.session(id).unwrap();
    assert_eq!(ours.messages(), solo.messages(), "{what}: conversation");
    let heard = outcomes
        .iter()
        .rev()
        .find(|o| !matches!(o, Outcome::Dropped));
    if matches!(heard, Some(Outcome::NoReply)) {
        // The engine keeps what its cancelled prefill reached; the rest is recomputed with the
        // next turn, as the common-prefix rule would recompute it alone.
        assert!(
            solo.ids().starts_with(ours.ids()),
            "{what}: ids in the cache"
        );
    } else {
        assert_eq!(ours.ids(), solo.ids(), "{what}: ids in the cache");
        assert_eq!(ours.cached(), solo.cached(), "{what}: cache length");
    }
}

#[test]
fn random_interleavings_equal_each_sequence_alone() {
    let mut kinds = HashMap::new();
    for (variant, seeds) in [("llama", 0..4u64), ("mistral", 4..7u64)] {
        let (engine, a0, a1) = engine_with(variant, usize::MAX);
        let clips = clips(&engine, &a0, &a1);
        for seed in seeds {
            let mut rng = StdRng::seed_from_u64(seed);
            let n_calls = rng.random_range(3..=8);
            let plans = random_plans(&mut rng, n_calls, clips.len());
            let chunk = [5, 16, 64][seed as usize % 3];
            let st = settings(10, chunk);
            let p = st.params.clone();
            let mut s = scheduler(&engine, st);
            let outcomes = run_engine(&mut s, &plans, &clips);
            for (i, (plan, out)) in plans.iter().zip(&outcomes).enumerate() {
                for o in out {
                    *kinds.entry(std::mem::discriminant(o)).or_insert(0usize) += 1;
                }
                check_against_solo(&engine, &s, i as CallId, plan, out, &clips, &p);
            }
        }
    }
    assert_eq!(
        kinds.len(),
        3,
        "every outcome (dropped, no reply, reply) was exercised"
    );
}

/// Several calls decode in one step: the batch really is shared.
#[test]
fn concurrent_replies_share_decode_steps() {
    let (engine, a0, a1) = engine_with("llama", usize::MAX);
    let mut s = scheduler(&engine, settings(12, 512));
    let links: Vec<Arc<()>> = (0..6).map(|_| Arc::new(())).collect();
    let mut rxs = Vec::new();
    for (i, link) in links.iter().enumerate() {
        open(&mut s, i as CallId, link);
        rxs.push(ask(
            &mut s,
            i as CallId,
            if i % 2 == 0 { &a0 } else { &a1 },
            false,
            256,
        ));
    }
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(s.step().batch);
    }
    assert_eq!(most, 6, "all six replies decoded in one step");
    for (rx, _) in rxs.iter_mut() {
        assert!(drain(rx).1, "every reply finished");
    }
}

/// A call whose token channel is full is parked; the others go on; it resumes when drained, and
/// its reply is still exactly its reply alone.
#[test]
fn a_full_channel_parks_only_its_call() {
    let (engine, a0, a1) = engine_with("llama", usize::MAX);
    let st = settings(24, 512);
    let p = st.params.clone();
    let mut s = scheduler(&engine, st);
    let (la, lb) = (Arc::new(()), Arc::new(()));
    open(&mut s, 0, &la);
    open(&mut s, 1, &lb);
    let (mut slow, _c0) = ask(&mut s, 0, &a0, false, 2);
    let (mut fast, _c1) = ask(&mut s, 1, &a1, false, 256);
    for _ in 0..10 {
        s.step();
        drain(&mut fast);
    }
    let parked_rows = s.trace[&0].len();
    assert!(s.has_parked(), "the slow call is parked");
    assert!(
        parked_rows < 10,
        "the slow call stopped at {parked_rows} tokens"
    );
    assert!(s.trace[&1].len() >= 10, "the other call went on");
    // Drain slowly: it advances as room appears, and finishes.
    let mut done = false;
    for _ in 0..200 {
        s.step();
        if drain(&mut slow).1 {
            done = true;
            break;
        }
    }
    assert!(done, "the parked call finished once drained");
    let mut solo = engine.open_session(Some(SYSTEM)).unwrap();
    solo.append_user_audio_turn(&a0, "").unwrap();
    let mut rows = Vec::new();
    solo_reply(&engine, &mut solo, &p, 24, &mut rows);
    assert_rows_close(&s.trace[&0], &rows, "parked call");
    assert_eq!(s.session(0).unwrap().ids(), solo.ids());
}

/// A tentative turn streams its reply; a discard stops it and leaves the call exactly as if the
/// turn had never happened (cache contents compared by equality), and a committed one ends up
/// the same as an ordinary turn.
#[test]
fn a_discarded_tentative_turn_leaves_no_trace() {
    let (engine, a0, a1) = engine_with("mistral", usize::MAX);
    let st = settings(8, 16);
    let mut s = scheduler(&engine, st);
    let (la, lb) = (Arc::new(()), Arc::new(()));
    open(&mut s, 0, &la);
    open(&mut s, 1, &lb);
    // Both calls hear the same first turn and reply.
    let mut first: Vec<Rx> = (0..2).map(|i| ask(&mut s, i, &a0, false, 256).0).collect();
    for _ in 0..30 {
        s.step();
    }
    assert!(first.iter_mut().all(|rx| drain(rx).1));
    // Call 0 as a session that never saw the tentative turn.
    let never = {
        let a = s.session(0).unwrap();
        (
            a.messages().to_vec(),
            a.ids().to_vec(),
            a.cache().contents(),
        )
    };
    // Call 0 starts a tentative second turn, generates, and discards it.
    let (mut rx, _cancel) = ask(&mut s, 0, &a1, true, 256);
    for _ in 0..12 {
        s.step();
    }
    assert!(s.trace[&0].len() > s.trace[&1].len(), "it generated");
    let (streamed, ended) = drain(&mut rx);
    assert!(
        !streamed.is_empty() && !ended,
        "its tokens stream while it is open"
    );
    s.command(Command::Discard { id: 0 });
    s.step();
    assert!(drain(&mut rx).1, "the discarded reply's stream ends");
    let a = s.session(0).unwrap();
    assert_eq!(a.messages(), &never.0[..]);
    assert_eq!(a.ids(), &never.1[..]);
    assert!(a.cache().contents() == never.2, "cache rolled back exactly");
    // And it matches the other call, which never began a second turn, up to batching noise.
    assert_eq!(a.ids(), s.session(1).unwrap().ids());

    // Now a tentative turn that is committed part-way: the reply and the session end up equal
    // to an ordinary turn's.
    let (mut t0, _c0) = ask(&mut s, 0, &a1, true, 256);
    let (mut t1, _c1) = ask(&mut s, 1, &a1, false, 256);
    let mut texts = [String::new(), String::new()];
    for _ in 0..4 {
        s.step();
        texts[0].push_str(&drain(&mut t0).0);
        texts[1].push_str(&drain(&mut t1).0);
    }
    s.command(Command::Commit { id: 0 });
    for _ in 0..30 {
        s.step();
        texts[0].push_str(&drain(&mut t0).0);
        texts[1].push_str(&drain(&mut t1).0);
    }
    assert!(!texts[0].is_empty());
    assert_eq!(texts[0], texts[1]);
    assert_eq!(s.session(0).unwrap().ids(), s.session(1).unwrap().ids());
}

/// A tentative turn that cuts into the cache (it merges with an unanswered user turn, so an
/// earlier position changes) is restored exactly from its snapshot.
#[test]
fn a_discard_restores_positions_the_turn_had_cut() {
    let (engine, a0, a1) = engine_with("llama", usize::MAX);
    let mut s = engine.open_session(None).unwrap();
    let mut fresh = engine.open_session(None).unwrap();
    s.append_user_audio_turn(&a0, "").unwrap();
    fresh.append_user_audio_turn(&a0, "").unwrap();
    let before = s.cached();
    let mut p = s.begin_turn(&a1, "", true).unwrap();
    assert!(
        p.stats().reused_positions < before,
        "the merged turn cut the cache ({} of {before} kept)",
        p.stats().reused_positions
    );
    s.prefill(&mut p, usize::MAX).unwrap();
    let mut rows = Vec::new();
    solo_reply(&engine, &mut s, &params(5), 5, &mut rows);
    s.discard_turn().unwrap();
    assert_eq!(s.messages(), fresh.messages());
    assert_eq!(s.ids(), fresh.ids());
    assert!(
        s.cache().contents() == fresh.cache().contents(),
        "cache restored exactly"
    );
    assert!(!s.is_tentative());
}

/// The KV pool: turns beyond the budget wait, turns beyond the queue get `model_busy` at once,
/// idle caches are evicted for new turns, and an evicted call's next reply is unchanged.
#[test]
fn the_kv_pool_queues_refuses_and_evicts() {
    let (engine, a0, a1) = engine_with("llama", usize::MAX);
    let mut st = settings(8, 512);
    st.max_waiting_turns = 1;
    let p = st.params.clone();
    // Room for two calls' turns at a time (a turn of a0 is about 60 positions plus the reply).
    let mut probe = engine.open_session(Some(SYSTEM)).unwrap();
    let one = probe.append_user_audio_turn(&a0, "").unwrap();
    let per_turn = one.prefill_positions + p.max_new_tokens + 1;
    let budget = 2 * per_turn + per_turn / 2;
    let pool = KvPool::new(budget, engine.kv_bytes_per_position());
    let mut s = Scheduler::new(engine.clone(), st, pool, None);
    let links: Vec<Arc<()>> = (0..4).map(|_| Arc::new(())).collect();
    for (i, l) in links.iter().enumerate() {
        open(&mut s, i as CallId, l);
    }
    let mut rxs: Vec<Rx> = Vec::new();
    for i in 0..2 {
        rxs.push(ask(&mut s, i, &a0, false, 256).0);
        s.step();
    }
    assert_eq!(s.trace.len(), 2, "two calls run");
    // The third turn waits for memory; the fourth is refused, since one already waits.
    rxs.push(ask(&mut s, 2, &a0, false, 256).0);
    let (mut refused, _) = ask(&mut s, 3, &a0, false, 256);
    match refused.try_recv() {
        Ok(Err(SlmError::Busy { waiting: 1 })) => {}
        other => panic!("expected model_busy, got {other:?}"),
    }
    s.step();
    assert!(s.kv_used() <= budget, "{} > {budget}", s.kv_used());
    assert_eq!(s.trace.len(), 2, "the third waits for memory");
    let mut steps = 0;
    while !rxs.iter_mut().all(|rx| drain(rx).1) {
        s.step();
        assert!(s.kv_used() <= budget);
        steps += 1;
        assert!(steps < 200, "the waiting turn never ran");
    }
    assert_eq!(s.trace.len(), 3, "the waiting turn ran once memory freed");
    // All three are idle now, holding their caches; a fourth call's turn evicts the oldest.
    let (mut rx, _) = ask(&mut s, 3, &a1, false, 256);
    for _ in 0..20 {
        s.step();
    }
    assert!(drain(&mut rx).1);
    assert!(s.kv_used() <= budget);
    let evicted = (0..3)
        .filter(|&i| s.session(i).unwrap().cached() == 0)
        .count();
    assert!(evicted >= 1, "an idle cache was evicted");
    // An evicted call's next turn recomputes its history and replies as if nothing happened.
    let victim = (0..3)
        .find(|&i| s.session(i).unwrap().cached() == 0)
        .unwrap();
    let rows_before = s.trace[&victim].len();
    let (mut rx, _) = ask(&mut s, victim, &a1, false, 256);
    for _ in 0..30 {
        s.step();
    }
    assert!(drain(&mut rx).1);
    let mut solo = engine.open_session(Some(SYSTEM)).unwrap();
    let mut rows = Vec::new();
    for clip in [&a0, &a1] {
        solo.append_user_audio_turn(clip, "").unwrap();
        solo_reply(&engine, &mut solo, &p, p.max_new_tokens, &mut rows);
    }
    assert_rows_close(&s.trace[&victim], &rows, "evicted call");
    assert!(s.trace[&victim].len() > rows_before);
}

/// A turn larger than the whole pool gets a clear error, not a hang.
#[test]
fn a_turn_larger_than_the_pool_is_refused_clearly() {
    let (engine, a0, _) = engine_with("llama", usize::MAX);
    let st = settings(8, 512);
    let pool = KvPool::new(20, engine.kv_bytes_per_position());
    let mut s = Scheduler::new(engine.clone(), st, pool, None);
    let link = Arc::new(());
    open(&mut s, 0, &link);
    let (mut rx, _) = ask(&mut s, 0, &a0, false, 256);
    s.step();
    match rx.try_recv() {
        Ok(Err(e)) => assert!(e.to_string().contains("kv_budget"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A call's queued requests run in the order it made them: a turn queued behind a reply, then a
/// truncation, cuts the reply to that turn, not the one before.
#[test]
fn queued_requests_keep_their_order() {
    let (engine, a0, a1) = engine_with("llama", usize::MAX);
    let mut s = scheduler(&engine, settings(6, 512));
    let link = Arc::new(());
    open(&mut s, 0, &link);
    let (mut first, _c0) = ask(&mut s, 0, &a0, false, 256);
    let (mut second, _c1) = ask(&mut s, 0, &a1, false, 256);
    s.command(Command::Truncate {
        id: 0,
        spoken: String::new(),
    });
    for _ in 0..40 {
        s.step();
        drain(&mut first);
        drain(&mut second);
    }
    let m = s.session(0).unwrap().messages();
    let replies: Vec<&str> = m
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(replies.len(), 2, "{m:?}");
    assert!(!replies[0].is_empty(), "the first reply stays whole: {m:?}");
    assert_eq!(replies[1], "", "the truncation cut the second reply: {m:?}");
}
