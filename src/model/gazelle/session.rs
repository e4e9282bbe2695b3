//! One call's model state: `GazelleSession` (its KV cache and conversation, owned by that call),
//! on the `LoadedGazelle` every call shares (`loaded.rs`).
//!
//! A session keeps one KV cache across turns. Each turn re-renders the whole conversation with
//! the chat template, tokenizes it, and compares it with the ids already in the cache: only the
//! part after the longest common prefix is run through the model. For an ordinary new user turn
//! that is `</s>[INST] <audio> [/INST]`; after a barge-in the cache is first cut back to the
//! tokens actually spoken. Re-rendering instead of hand-building the suffix keeps the cache
//! exactly equal to what a full re-prefill of the same history would produce.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::decoder::KvCache;
use super::generation::{generate, GenerationParams, ReplyDecoder, StopReason};
use super::loaded::reply_room;
pub use super::loaded::{HistoryAudio, LoadedGazelle};
use super::prompt::{
    user_content_with_audio, ChatMessage, PromptError, TextStream, AUDIO_PLACEHOLDER,
};

/// Errors from a session step.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("model error: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("generate() needs a user turn first; call append_user_audio_turn")]
    NoUserTurn,
    #[error(
        "the newest turn needs {needed} positions with the system prompt and room for a reply, \
         more than the call's context of {max} (slm.gazelle.max_context, at most the model's \
         max_position_embeddings); shorten the turn (pipeline.vad max turn length) or the \
         system prompt"
    )]
    TurnTooLong { needed: usize, max: usize },
}

impl LoadedGazelle {
    /// A new per-call session. The system prompt (if any) is prefilled with the first turn.
    pub fn open_session(
        self: &Arc<Self>,
        system_prompt: Option<&str>,
    ) -> candle_core::Result<GazelleSession> {
        GazelleSession::new(self.clone(), system_prompt)
    }
}

/// How much of the last reply reached the user before a barge-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spoken<'a> {
    /// The first n generated tokens.
    #[cfg(test)]
    Tokens(usize),
    /// The text that was spoken, a prefix of the reply text (whitespace at the ends ignored).
    Text(&'a str),
}

/// Work done to bring the cache up to date with the conversation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TurnStats {
    /// Audio tokens of the new clip (T/8 + 1).
    pub audio_tokens: usize,
    pub encoder_ms: f64,
    /// Positions kept from the cache.
    pub reused_positions: usize,
    /// Positions run through the decoder for this turn.
    pub prefill_positions: usize,
    pub prefill_ms: f64,
    /// Token ids of the whole conversation so far (each clip counts as one `<|audio|>` id).
    pub prompt_ids: usize,
}

/// One finished (or cancelled) reply.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinishedReply {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// Seconds from the start of generate() to the first token.
    pub first_token_s: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone)]
struct LastReply {
    message: usize,
    /// Index in `ids` where the reply's tokens start.
    start: usize,
    tokens: Vec<u32>,
}

/// A turn in a history given up front (see [`GazelleSession::with_history`]).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) enum HistoryTurn<'a> {
    User { audio_16k: &'a [f32], text: &'a str },
    Assistant(&'a str),
}

/// One call's decoder state.
#[derive(Debug)]
pub struct GazelleSession {
    engine: Arc<LoadedGazelle>,
    cache: KvCache,
    messages: Vec<ChatMessage>,
    /// [1, N, D] embeddings of each clip, in the order of their `<|audio|>` tokens.
    clips: Vec<Tensor>,
    /// Ids whose keys/values are in the cache (an `<|audio|>` id stands for its whole clip).
    ids: Vec<u32>,
    /// Cache length after each entry of `ids`.
    ends: Vec<usize>,
    /// [V] f32 next-token logits after `ids`, when they are current.
    logits: Option<Tensor>,
    last_reply: Option<LastReply>,
    /// The state before a tentative turn, while one is open (see [`Self::begin_turn`]).
    checkpoint: Option<Checkpoint>,
}

/// A turn's positions on their way through the decoder, fed in chunks by
/// [`GazelleSession::prefill`].
#[derive(Debug)]
pub(crate) struct Prefill {
    /// [1, L, D] embeddings of the positions after the reused prefix.
    embeds: Tensor,
    done: usize,
    started: Instant,
    stats: TurnStats,
}

impl Prefill {
    /// Positions still to run.
    pub(crate) fn remaining(&self) -> usize {
        self.embeds.dim(1).unwrap_or(0) - self.done
    }

    pub(crate) fn stats(&self) -> &TurnStats {
        &self.stats
    }
}

/// A reply being generated: the decode loop's state, the context for the repetition penalty,
/// and the text stream that turns ids into pieces.
#[derive(Debug)]
pub(crate) struct ActiveReply {
    pub(crate) decoder: ReplyDecoder,
    /// Every id in the cache, and each reply token once fed (for the repetition penalty).
    pub(crate) context: Vec<u32>,
    /// Index in `ids` where the reply starts.
    start: usize,
    stream: TextStream,
}

impl ActiveReply {
    /// The text that token `id` (the newest sampled) adds to the reply.
    pub(crate) fn piece(
        &mut self,
        engine: &LoadedGazelle,
        id: u32,
    ) -> Result<String, SessionError> {
        Ok(self.stream.push(&engine.prompt, id)?)
    }

    /// The newest token went into the cache.
    pub(crate) fn fed(&mut self, id: u32) {
        self.context.push(id);
        self.decoder.fed_one();
    }
}

/// Everything a tentative turn may change, as it was before the turn: a discard puts it back.
#[derive(Debug)]
struct Checkpoint {
    messages: Vec<ChatMessage>,
    clips: Vec<Tensor>,
    ids: Vec<u32>,
    ends: Vec<usize>,
    cache_len: usize,
    logits: Option<Tensor>,
    last_reply: Option<LastReply>,
    /// When the turn cut the cache below `cache_len` (its rendering changed an earlier
    /// position, or old exchanges were dropped): where the cut began, and the keys and values
    /// it removed.
    saved: Option<(usize, Vec<(Tensor, Tensor)>)>,
}

impl GazelleSession {
    pub(crate) fn new(
        engine: Arc<LoadedGazelle>,
        system_prompt: Option<&str>,
    ) -> candle_core::Result<Self> {
        Self::with_capacity(engine, system_prompt, 1024)
    }

    /// A session whose cache starts with room for `capacity` positions (the engine starts with
    /// none and grants room per turn from its memory pool).
    pub(crate) fn with_capacity(
        engine: Arc<LoadedGazelle>,
        system_prompt: Option<&str>,
        capacity: usize,
    ) -> candle_core::Result<Self> {
        let mut cache = engine
            .model
            .new_cache(capacity.min(engine.max_positions()))?;
        cache.limit(engine.max_positions());
        let messages = system_prompt
            .filter(|s| !s.trim().is_empty())
            .map(|s| vec![ChatMessage::new("system", s)])
            .unwrap_or_default();
        Ok(Self {
            engine,
            cache,
            messages,
            clips: Vec::new(),
            ids: Vec::new(),
            ends: Vec::new(),
            logits: None,
            last_reply: None,
            checkpoint: None,
        })
    }

    /// A session whose history is prefilled in one pass: the reference for tests of the
    /// incremental path.
    #[cfg(test)]
    pub(crate) fn with_history(
        engine: Arc<LoadedGazelle>,
        system_prompt: Option<&str>,
        turns: &[HistoryTurn<'_>],
    ) -> Result<(Self, TurnStats), SessionError> {
        let mut s = Self::new(engine, system_prompt)?;
        let mut stats = TurnStats::default();
        for turn in turns {
            match turn {
                HistoryTurn::User { audio_16k, text } => {
                    let t = Instant::now();
                    let clip = s.engine.model.encode_audio(audio_16k)?;
                    stats.encoder_ms += t.elapsed().as_secs_f64() * 1e3;
                    s.push_user(clip, text);
                }
                HistoryTurn::Assistant(text) => {
                    s.messages.push(ChatMessage::new("assistant", *text));
                }
            }
        }
        let sync = s.sync()?;
        stats.reused_positions = sync.reused_positions;
        stats.prefill_positions = sync.prefill_positions;
        stats.prefill_ms = sync.prefill_ms;
        stats.prompt_ids = sync.prompt_ids;
        Ok((s, stats))
    }

    #[cfg(test)]
    pub(crate) fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    #[cfg(test)]
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    #[cfg(test)]
    pub(crate) fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// [V] f32 logits for the next token, if a turn is pending.
    #[cfg(test)]
    pub(crate) fn next_logits(&self) -> Option<&Tensor> {
        self.logits.as_ref()
    }

    fn push_user(&mut self, clip: Tensor, text: &str) {
        if self.engine.history_audio() == HistoryAudio::Current {
            // Earlier turns keep their text only.
            for m in self.messages.iter_mut().filter(|m| m.role == "user") {
                if m.content.contains(AUDIO_PLACEHOLDER) {
                    m.content = m.content.replace(AUDIO_PLACEHOLDER, "").trim().to_string();
                }
            }
            self.clips.clear();
        }
        let content = user_content_with_audio(text);
        self.clips.push(clip);
        // Two user turns in a row (no reply in between) become one message, since chat
        // templates insist on alternating roles.
        match self.messages.last_mut() {
            Some(last) if last.role == "user" => {
                last.content = format!("{}\n{content}", last.content);
            }
            _ => self.messages.push(ChatMessage::new("user", content)),
        }
    }

    /// Encodes a user turn's 16 kHz audio and appends it to the cache. `text` is the user's
    /// message around the audio (`<|audio|>` marks the spot; otherwise the audio comes first).
    pub fn append_user_audio_turn(
        &mut self,
        audio_16k: &[f32],
        text: &str,
    ) -> Result<TurnStats, SessionError> {
        let mut p = self.begin_turn(audio_16k, text, false)?;
        self.prefill(&mut p, usize::MAX)?;
        Ok(p.stats)
    }

    /// Encodes a user turn and plans its prefill: afterwards the conversation holds the turn and
    /// the cache is cut back to the prefix it shares with it; [`Self::prefill`] runs the rest.
    ///
    /// A `tentative` turn may still be taken back: [`Self::discard_turn`] then restores the
    /// session exactly as it was before this call (cache included), and
    /// [`Self::commit_turn`] makes the turn final. An ordinary turn costs nothing extra.
    pub(crate) fn begin_turn(
        &mut self,
        audio_16k: &[f32],
        text: &str,
        tentative: bool,
    ) -> Result<Prefill, SessionError> {
        let t = Instant::now();
        let clip = self.engine.model.encode_audio(audio_16k)?;
        let encoder_ms = t.elapsed().as_secs_f64() * 1e3;
        let audio_tokens = clip.dim(1)?;
        self.checkpoint = tentative.then(|| Checkpoint {
            messages: self.messages.clone(),
            clips: self.clips.clone(),
            ids: self.ids.clone(),
            ends: self.ends.clone(),
            cache_len: self.cache.len(),
            logits: self.logits.clone(),
            last_reply: self.last_reply.clone(),
            saved: None,
        });
        self.push_user(clip, text);
        let mut p = match self.plan() {
            Err(e @ SessionError::TurnTooLong { .. }) => {
                // The turn can never fit: forget it, so the call can go on with shorter ones.
                if let Some(m) = self.messages.pop() {
                    let n = m.content.matches(AUDIO_PLACEHOLDER).count();
                    self.clips.truncate(self.clips.len().saturating_sub(n));
                }
                return Err(e);
            }
            r => r?,
        };
        p.stats.audio_tokens = audio_tokens;
        p.stats.encoder_ms = encoder_ms;
        Ok(p)
    }

    /// Runs up to `max` more positions of a planned turn through the decoder. True when the
    /// whole turn is in the cache and the next-token logits are ready.
    pub(crate) fn prefill(&mut self, p: &mut Prefill, max: usize) -> Result<bool, SessionError> {
        let n = p.remaining().min(max.max(1));
        if n > 0 {
            let chunk = p.embeds.narrow(1, p.done, n)?;
            let hidden = self.engine.model.forward_embeds(&chunk, &mut self.cache)?;
            p.done += n;
            if p.remaining() == 0 {
                self.logits = Some(self.engine.model.language_model().last_logits(&hidden)?);
            }
        }
        p.stats.prefill_ms = p.started.elapsed().as_secs_f64() * 1e3;
        Ok(p.remaining() == 0)
    }

    /// A turn's prefill stopped part-way (cancelled or failed): the ids whose positions did not
    /// all reach the cache are forgotten, so ids and cache agree again.
    pub(crate) fn abort_prefill(&mut self) {
        let len = self.cache.len();
        let keep = self.ends.iter().take_while(|&&e| e <= len).count();
        self.ids.truncate(keep);
        self.ends.truncate(keep);
        self.cache.truncate(self.ends.last().copied().unwrap_or(0));
        self.logits = None;
    }

    /// Makes the open tentative turn final (a no-op without one).
    pub(crate) fn commit_turn(&mut self) {
        self.checkpoint = None;
    }

    /// Takes back the open tentative turn and its reply: the conversation, the ids and the
    /// cache are restored exactly as they were before [`Self::begin_turn`].
    pub(crate) fn discard_turn(&mut self) -> Result<(), SessionError> {
        let Some(cp) = self.checkpoint.take() else {
            return Ok(());
        };
        self.messages = cp.messages;
        self.clips = cp.clips;
        self.ids = cp.ids;
        self.ends = cp.ends;
        self.logits = cp.logits;
        self.last_reply = cp.last_reply;
        match cp.saved {
            Some((from, kv)) => self.cache.restore(from, &kv)?,
            None => self.cache.truncate(cp.cache_len),
        }
        debug_assert_eq!(self.cache.len(), cp.cache_len);
        Ok(())
    }

    /// Whether a tentative turn is open.
    #[cfg(test)]
    pub(crate) fn is_tentative(&self) -> bool {
        self.checkpoint.is_some()
    }

    /// Frees the cache of an idle call to make room for others; its next turn recomputes the
    /// conversation from the start. Nothing said is lost.
    pub(crate) fn evict(&mut self) -> Result<(), SessionError> {
        self.cache.release()?;
        self.ids.clear();
        self.ends.clear();
        self.logits = None;
        Ok(())
    }

    /// Positions this session's cache holds allocated.
    pub(crate) fn allocated(&self) -> usize {
        self.cache.allocated()
    }

    /// Positions in the cache now.
    pub(crate) fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Grows the cache to `positions` (at most the call's context).
    pub(crate) fn reserve_positions(&mut self, positions: usize) -> Result<(), SessionError> {
        Ok(self.cache.ensure_capacity(positions)?)
    }

    /// The most positions this call's cache may hold.
    pub(crate) fn max_positions(&self) -> usize {
        self.cache.max_len()
    }

    /// The cache, for the engine's batched decode step.
    pub(crate) fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The rendered conversation's ids, and the cache positions they take.
    fn render(&self) -> Result<(Vec<u32>, usize), SessionError> {
        let text = self.engine.prompt.render(&self.messages, true)?;
        let ids = self.engine.prompt.encode(&text)?;
        let audio_id = self.engine.model.config().audio_token_index;
        let n_audio = ids.iter().filter(|&&id| id == audio_id).count();
        let mut positions = ids.len() - n_audio;
        for clip in self.clips.iter().take(n_audio) {
            positions += clip.dim(1)?;
        }
        Ok((ids, positions))
    }

    /// Drops the oldest exchange (a user message and the replies after it, with any greeting
    /// before it); the system prompt and the newest user message stay. False if nothing is left
    /// to drop.
    fn drop_oldest_exchange(&mut self) -> bool {
        let first = usize::from(self.messages.first().is_some_and(|m| m.role == "system"));
        let users: Vec<usize> = (first..self.messages.len())
            .filter(|&i| self.messages[i].role == "user")
            .collect();
        let [_, next, ..] = users[..] else {
            return false;
        };
        let clips: usize = self.messages[first..next]
            .iter()
            .map(|m| m.content.matches(AUDIO_PLACEHOLDER).count())
            .sum();
        self.messages.drain(first..next);
        self.clips.drain(..clips.min(self.clips.len()));
        self.last_reply = None;
        true
    }

    /// Brings the cache in line with the rendered conversation, reusing the common prefix. When
    /// the conversation would crowd out the reply, the oldest exchanges go first, down to half the
    /// context so that the re-prefill this costs happens rarely.
    #[cfg(test)]
    fn sync(&mut self) -> Result<TurnStats, SessionError> {
        let mut p = self.plan()?;
        self.prefill(&mut p, usize::MAX)?;
        Ok(p.stats)
    }

    /// Plans bringing the cache in line with the rendered conversation (see `sync`): cuts the
    /// cache back to the common prefix and returns the embeddings of the rest.
    fn plan(&mut self) -> Result<Prefill, SessionError> {
        let t = Instant::now();
        let engine = self.engine.clone();
        let max = self.cache.max_len();
        let room = reply_room(max);
        let (mut new_ids, mut positions) = self.render()?;
        if positions + room > max {
            let before = self.messages.len();
            while positions + room > max / 2 && self.drop_oldest_exchange() {
                (new_ids, positions) = self.render()?;
            }
            tracing::info!(
                dropped_messages = before - self.messages.len(),
                positions,
                max,
                "context full: dropped the oldest exchanges"
            );
            if positions + room > max {
                return Err(SessionError::TurnTooLong {
                    needed: positions + room,
                    max,
                });
            }
        }
        let mut keep = self
            .ids
            .iter()
            .zip(&new_ids)
            .take_while(|(a, b)| a == b)
            .count();
        if keep == new_ids.len() {
            // Nothing new, but we need fresh logits: recompute the last position.
            keep = keep.saturating_sub(1);
        }
        self.ids.truncate(keep);
        self.ends.truncate(keep);
        let reused = self.ends.last().copied().unwrap_or(0);
        if let Some(cp) = self.checkpoint.as_mut() {
            if cp.saved.is_none() && reused < cp.cache_len && self.cache.len() == cp.cache_len {
                // A tentative turn cuts into what came before it: keep the cut positions, so that
                // a discard puts them back exactly.
                cp.saved = Some((reused, self.cache.snapshot(reused)?));
            }
        }
        self.cache.truncate(reused);
        self.logits = None;
        let audio_id = engine.model.config().audio_token_index;
        let suffix = &new_ids[keep..];
        let first_clip = self.ids.iter().filter(|&&i| i == audio_id).count();
        let n_clips = suffix.iter().filter(|&&i| i == audio_id).count();
        let clips: Vec<&Tensor> = self.clips[first_clip..first_clip + n_clips]
            .iter()
            .collect();
        let embeds = engine.model.splice(suffix, &clips)?;
        let mut clip_iter = clips.iter();
        let mut end = reused;
        for &id in suffix {
            end += if id == audio_id {
                clip_iter.next().expect("counted").dim(1)?
            } else {
                1
            };
            self.ids.push(id);
            self.ends.push(end);
        }
        debug_assert_eq!(end - reused, embeds.dim(1)?);
        Ok(Prefill {
            stats: TurnStats {
                reused_positions: reused,
                prefill_positions: end - reused,
                prompt_ids: self.ids.len(),
                ..Default::default()
            },
            embeds,
            done: 0,
            started: t,
        })
    }

    /// Generates the assistant's reply, handing `(id, text piece)` to `on_token` as each token
    /// is sampled. Returning `Break` stops after that token (cancellation/barge-in); the reply so
    /// far stays in the conversation until [`Self::truncate_reply_to`] cuts it.
    pub fn generate(
        &mut self,
        params: &GenerationParams,
        mut on_token: impl FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<FinishedReply, SessionError> {
        let (mut reply, logits) = self.begin_reply(params)?;
        let engine = self.engine.clone();
        let mut prompt_err = None;
        let stream = &mut reply.stream;
        let out = generate(
            &engine.model,
            &mut self.cache,
            &logits,
            &mut reply.context,
            params,
            engine.stop_ids(),
            |id| match stream.push(&engine.prompt, id) {
                Ok(piece) => on_token(id, &piece),
                Err(e) => {
                    prompt_err = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        if let Some(e) = prompt_err {
            return Err(e.into());
        }
        let decode_tokens_per_s = out.decode_tokens_per_s();
        reply.decoder.tokens = out.tokens;
        reply.decoder.fed = out.fed;
        reply.decoder.stop = Some(out.stop);
        let mut r = self.finish_reply(reply)?;
        r.first_token_s = out.first_token_s;
        r.decode_tokens_per_s = decode_tokens_per_s;
        Ok(r)
    }

    /// Starts the reply to the newest turn (whose prefill is done): its decode state, and the
    /// [V] f32 logits of its first token.
    pub(crate) fn begin_reply(
        &mut self,
        params: &GenerationParams,
    ) -> Result<(ActiveReply, Tensor), SessionError> {
        let logits = self.logits.take().ok_or(SessionError::NoUserTurn)?;
        Ok((
            ActiveReply {
                decoder: ReplyDecoder::new(params),
                context: self.ids.clone(),
                start: self.ids.len(),
                stream: TextStream::new(),
            },
            logits,
        ))
    }

    /// Ends a reply (finished or cancelled): its fed tokens join the ids, and its text joins the
    /// conversation as the assistant's message.
    pub(crate) fn finish_reply(
        &mut self,
        reply: ActiveReply,
    ) -> Result<FinishedReply, SessionError> {
        let d = reply.decoder;
        let fed = d.fed.min(d.tokens.len());
        for &id in &d.tokens[..fed] {
            self.ids.push(id);
            self.ends.push(self.ends.last().copied().unwrap_or(0) + 1);
        }
        debug_assert_eq!(self.ends.last().copied().unwrap_or(0), self.cache.len());
        let text = self.engine.prompt.decode(&d.tokens)?;
        self.messages
            .push(ChatMessage::new("assistant", text.clone()));
        self.last_reply = Some(LastReply {
            message: self.messages.len() - 1,
            start: reply.start,
            tokens: d.tokens.clone(),
        });
        Ok(FinishedReply {
            tokens: d.tokens,
            text,
            stop: d.stop.unwrap_or(StopReason::Cancelled),
            first_token_s: 0.0,
            decode_tokens_per_s: 0.0,
        })
    }

    /// After a barge-in: keeps only what was spoken of the last reply, in the conversation and
    /// in the cache. Returns the number of reply tokens kept.
    pub(crate) fn truncate_reply_to(&mut self, spoken: Spoken<'_>) -> Result<usize, SessionError> {
        let Some(reply) = self.last_reply.clone() else {
            return Ok(0);
        };
        let prompt = &self.engine.prompt;
        let n = match spoken {
            #[cfg(test)]
            Spoken::Tokens(n) => n.min(reply.tokens.len()),
            Spoken::Text(text) => {
                let text = text.trim();
                let mut best = 0;
                for n in 1..=reply.tokens.len() {
                    let prefix = prompt.decode(&reply.tokens[..n])?;
                    if text.starts_with(prefix.trim()) {
                        best = n;
                    } else if prefix.trim().len() > text.len() {
                        break;
                    }
                }
                best
            }
        };
        let content = prompt.decode(&reply.tokens[..n])?;
        self.messages[reply.message].content = content;
        let in_cache = (reply.start + n).min(self.ids.len());
        self.ids.truncate(in_cache);
        self.ends.truncate(in_cache);
        self.cache.truncate(self.ends.last().copied().unwrap_or(0));
        self.logits = None;
        self.last_reply = Some(LastReply {
            tokens: reply.tokens[..n].to_vec(),
            ..reply
        });
        Ok(n)
    }
}
