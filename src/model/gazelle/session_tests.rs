//! Multi-turn sessions on the tiny fixtures: turn-by-turn appends must equal one full re-prefill.

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::generation::{GenerationParams, StopReason};
use super::model::Precision;
use super::parity_tests::{fixture_dir, load_fixture_with, rel_err};
use super::prompt::ChatPrompt;
use super::session::{GazelleSession, HistoryTurn, LoadedGazelle, SessionError, Spoken};

fn engine(variant: &str) -> (Arc<LoadedGazelle>, Vec<f32>, Vec<f32>) {
    engine_with(variant, usize::MAX)
}

/// The fixture's engine with each call's context limited to `max_context` positions, and its
/// two clips.
pub(crate) fn engine_with(
    variant: &str,
    max_context: usize,
) -> (Arc<LoadedGazelle>, Vec<f32>, Vec<f32>) {
    let (model, refs) = load_fixture_with(variant, Precision::uniform(DType::F32));
    let d = fixture_dir(variant);
    let prompt = ChatPrompt::from_files(
        &d.join("tokenizer.json"),
        Some(&d.join("tokenizer_config.json")),
        None,
    )
    .unwrap();
    let a0 = refs["c0.audio"].to_vec1().unwrap();
    let a1 = refs["c1.audio"].to_vec1().unwrap();
    let engine = LoadedGazelle::new(model, prompt)
        .unwrap()
        .with_max_context(max_context);
    (Arc::new(engine), a0, a1)
}

fn greedy(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: n,
        stop_on_eos: false,
        ..Default::default()
    }
}

fn assert_close(a: &Tensor, b: &Tensor) {
    let e = rel_err(a, b);
    assert!(
        e < 1e-4,
        "incremental vs full re-prefill logits: rel err {e}"
    );
}

#[test]
fn first_turn_matches_pytorch_greedy_tokens() {
    let (engine, a0, _) = engine("mistral");
    let refs = load_fixture_with("mistral", Precision::uniform(DType::F32)).1;
    let expected: Vec<u32> = refs["c0.greedy_tokens"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut s = engine
        .open_session(Some("You are a helpful voice assistant."))
        .unwrap();
    s.append_user_audio_turn(&a0, "Transcribe the audio. <|audio|>")
        .unwrap();
    let mut streamed = String::new();
    let reply = s
        .generate(&greedy(24), |_, piece| {
            streamed.push_str(piece);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(reply.tokens, expected);
    assert_eq!(reply.stop, StopReason::MaxTokens);
    assert_eq!(streamed, reply.text);
}

#[test]
fn turn_by_turn_append_equals_full_reprefill() {
    for variant in ["mistral", "llama"] {
        let (engine, a0, a1) = engine(variant);
        let system = Some("Be brief.");
        let mut s = engine.open_session(system).unwrap();
        let t1 = s.append_user_audio_turn(&a0, "").unwrap();
        assert_eq!(t1.reused_positions, 0);
        let reply = s
            .generate(&greedy(6), |_, _| ControlFlow::Continue(()))
            .unwrap();
        let t2 = s.append_user_audio_turn(&a1, "And now?").unwrap();
        // The whole first turn stays cached. (These random models' replies do not always
        // re-tokenize to the sampled ids, e.g. a first token without the word-start marker; the
        // common-prefix rule then recomputes from that point, as a full re-prefill would.)
        assert!(t2.reused_positions >= t1.prefill_positions, "{t1:?} {t2:?}");

        let history = [
            HistoryTurn::User {
                audio_16k: &a0,
                text: "",
            },
            HistoryTurn::Assistant(&reply.text),
            HistoryTurn::User {
                audio_16k: &a1,
                text: "And now?",
            },
        ];
        let (full, stats) =
            super::session::GazelleSession::with_history(engine.clone(), system, &history).unwrap();
        assert_eq!(stats.reused_positions, 0);
        assert_eq!(full.cache().len(), s.cache().len());
        assert_close(s.next_logits().unwrap(), full.next_logits().unwrap());
    }
}

#[test]
fn barge_in_truncates_cache_to_spoken_tokens() {
    let (engine, a0, a1) = engine("mistral");
    let mut s = engine.open_session(None).unwrap();
    s.append_user_audio_turn(&a0, "").unwrap();
    let mut seen = 0;
    // Cancel after 8 tokens, as a barge-in would; then say only 3 were spoken.
    let reply = s
        .generate(&greedy(24), |_, _| {
            seen += 1;
            if seen == 8 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!((reply.tokens.len(), reply.stop), (8, StopReason::Cancelled));
    let before = s.cache().len();
    assert_eq!(s.truncate_reply_to(Spoken::Tokens(3)).unwrap(), 3);
    assert_eq!(
        s.cache().len(),
        before - 4,
        "7 fed reply tokens cut back to 3"
    );
    s.append_user_audio_turn(&a1, "").unwrap();

    let spoken = engine.prompt.decode(&reply.tokens[..3]).unwrap();
    let history = [
        HistoryTurn::User {
            audio_16k: &a0,
            text: "",
        },
        HistoryTurn::Assistant(&spoken),
        HistoryTurn::User {
            audio_16k: &a1,
            text: "",
        },
    ];
    let (full, _) =
        super::session::GazelleSession::with_history(engine.clone(), None, &history).unwrap();
    assert_close(s.next_logits().unwrap(), full.next_logits().unwrap());

    // The same cut expressed as spoken text.
    let mut s2 = engine.open_session(None).unwrap();
    s2.append_user_audio_turn(&a0, "").unwrap();
    s2.generate(&greedy(8), |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(
        s2.truncate_reply_to(Spoken::Text(&format!("{spoken} ")))
            .unwrap(),
        3
    );
}

#[test]
fn generate_without_a_turn_is_an_error() {
    let (engine, _, _) = engine("llama");
    let mut s = engine.open_session(None).unwrap();
    let err = s
        .generate(&greedy(2), |_, _| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.to_string().contains("append_user_audio_turn"));
}

#[test]
fn engine_is_shareable_and_session_movable_across_threads() {
    fn shared<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shared::<LoadedGazelle>();
    movable::<super::session::GazelleSession>();
}

/// A call longer than the context: the oldest exchanges go, the system prompt and the newest
/// turn stay, the cache never outgrows `max_position_embeddings`, and what is left equals a fresh
/// prefill of the kept conversation.
#[test]
fn a_long_call_drops_its_oldest_exchanges_and_goes_on() {
    let (engine, a0, a1) = engine("llama");
    let system = "Be brief.";
    let mut s = engine.open_session(Some(system)).unwrap();
    let max = s.cache().max_len();
    let mut audio_of_turn: Vec<&[f32]> = Vec::new();
    let mut drops = 0;
    for turn in 0..30 {
        let audio: &[f32] = if turn % 2 == 0 { &a0 } else { &a1 };
        audio_of_turn.push(audio);
        let before = s.messages().len();
        s.append_user_audio_turn(audio, "").unwrap();
        if s.messages().len() <= before {
            drops += 1;
        }
        assert!(s.cache().len() <= max, "cache {} > {max}", s.cache().len());
        let reply = s
            .generate(&greedy(24), |_, _| ControlFlow::Continue(()))
            .unwrap();
        assert_eq!(reply.tokens.len(), 24);
        assert!(s.cache().len() <= max);
    }
    assert!(
        drops >= 2,
        "a 30-turn call on a {max}-position model dropped {drops} times"
    );
    assert_eq!(s.messages()[0].role, "system");

    // One more turn, then compare with a session prefilled from the kept messages in one go.
    audio_of_turn.push(&a0);
    s.append_user_audio_turn(&a0, "").unwrap();
    let kept = &s.messages()[1..];
    assert_eq!(kept.last().unwrap().role, "user");
    let users = kept.iter().filter(|m| m.role == "user").count();
    let mut audio = audio_of_turn[audio_of_turn.len() - users..].iter();
    let history: Vec<HistoryTurn> = kept
        .iter()
        .map(|m| match m.role.as_str() {
            "user" => HistoryTurn::User {
                audio_16k: audio.next().unwrap(),
                text: "",
            },
            _ => HistoryTurn::Assistant(&m.content),
        })
        .collect();
    let (fresh, _) = GazelleSession::with_history(engine.clone(), Some(system), &history).unwrap();
    assert_eq!(fresh.cache().len(), s.cache().len());
    assert_close(s.next_logits().unwrap(), fresh.next_logits().unwrap());
}

/// A turn that cannot fit even alone is refused with a clear error and forgotten; the call goes
/// on with the next, shorter turn.
#[test]
fn a_turn_longer_than_the_context_is_refused_and_forgotten() {
    let (engine, a0, _) = engine("mistral");
    let mut s = engine.open_session(None).unwrap();
    let max = s.cache().max_len();
    let long: Vec<f32> = a0
        .iter()
        .copied()
        .cycle()
        .take(16_000 * 8 * max / 50)
        .collect();
    let err = s.append_user_audio_turn(&long, "").unwrap_err();
    assert!(
        matches!(err, SessionError::TurnTooLong { max: m, .. } if m == max),
        "{err}"
    );
    assert!(err.to_string().contains("max_position_embeddings"), "{err}");
    assert!(s.messages().is_empty());
    s.append_user_audio_turn(&a0, "").unwrap();
    let reply = s
        .generate(&greedy(4), |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(reply.tokens.len(), 4);
}

/// Generation stops, without an error, when the context is full.
#[test]
fn generation_stops_when_the_context_is_full() {
    let (engine, a0, _) = engine("mistral");
    let mut s = engine.open_session(None).unwrap();
    let max = s.cache().max_len();
    s.append_user_audio_turn(&a0, "").unwrap();
    let reply = s
        .generate(&greedy(10 * max), |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(reply.stop, StopReason::ContextFull);
    assert_eq!(s.cache().len(), max);
}

/// `max_context` below the model's limit bounds each call's cache; the call goes on past it.
#[test]
fn a_context_limit_bounds_the_cache() {
    let (engine, a0, _) = engine_with("llama", 200);
    assert_eq!(engine.max_positions(), 200);
    let mut s = engine.open_session(None).unwrap();
    assert_eq!(s.cache().max_len(), 200);
    let mut most = 0;
    for _ in 0..12 {
        s.append_user_audio_turn(&a0, "").unwrap();
        s.generate(&greedy(16), |_, _| ControlFlow::Continue(()))
            .unwrap();
        most = most.max(s.cache().len());
    }
    assert!(most <= 200 && most > 100, "largest cache {most}");
}

/// `history_audio = "current"`: a new turn strips the earlier turns' audio from the prompt, so
/// only the newest clip is in the cache, and the call goes on.
#[test]
fn only_the_current_turns_audio_can_be_kept() {
    let (engine, a0, a1) = engine("llama");
    let engine = Arc::new(
        Arc::try_unwrap(engine)
            .unwrap()
            .with_history_audio(super::session::HistoryAudio::Current),
    );
    let audio_id = engine.model.config().audio_token_index;
    let mut s = engine.open_session(Some("Be brief.")).unwrap();
    s.append_user_audio_turn(&a0, "").unwrap();
    let first = s.cached();
    s.generate(&greedy(4), |_, _| ControlFlow::Continue(()))
        .unwrap();
    let t2 = s.append_user_audio_turn(&a1, "").unwrap();
    assert_eq!(s.ids().iter().filter(|&&i| i == audio_id).count(), 1);
    assert!(s.messages().iter().filter(|m| m.role == "user").count() == 2);
    assert!(
        !s.messages()[1].content.contains("<|audio|>"),
        "{:?}",
        s.messages()
    );
    assert!(
        t2.reused_positions < first,
        "the first turn's audio left the cache"
    );
    let reply = s
        .generate(&greedy(4), |_, _| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(reply.tokens.len(), 4);
}
