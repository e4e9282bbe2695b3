//! The blocking engine API the call pipeline wraps: `GazelleEngine` (immutable weights and
//! tokenizer, shared by every call behind an `Arc`) and `GazelleSession` (one call's KV cache and
//! conversation, owned by that call).
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
use super::generation::{generate, GenerationParams, StopReason};
use super::model::Gazelle;
use super::prompt::{
    user_content_with_audio, ChatMessage, ChatPrompt, PromptError, TextStream, AUDIO_PLACEHOLDER,
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

/// Positions kept free for the reply when a turn is appended: when the conversation would leave
/// less than this of the context, its oldest exchanges are dropped.
fn reply_room(max_len: usize) -> usize {
    (max_len / 8).clamp(16, 1024)
}

/// Weights plus tokenizer; one per process.
#[derive(Debug)]
pub struct GazelleEngine {
    pub model: Gazelle,
    pub(crate) prompt: ChatPrompt,
    stop_ids: Vec<u32>,
    /// Positions a call's KV cache may hold; older exchanges are dropped beyond it.
    max_context: usize,
}

impl GazelleEngine {
    pub(crate) fn new(model: Gazelle, prompt: ChatPrompt) -> Result<Self, PromptError> {
        prompt.check_audio_token(model.config().audio_token_index)?;
        let mut stop_ids = model.config().text.eos_token_ids.clone();
        stop_ids.extend(prompt.eos_token_id());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let max_context = model.config().text.max_position_embeddings;
        Ok(Self {
            model,
            prompt,
            stop_ids,
            max_context,
        })
    }

    /// Limits every call's context to `positions` (at most `max_position_embeddings`), which
    /// bounds a call's KV-cache memory and so sets how many calls fit on a device.
    pub(crate) fn with_max_context(mut self, positions: usize) -> Self {
        self.max_context = positions.clamp(1, self.max_context);
        self
    }

    #[cfg(test)]
    pub(crate) fn max_context(&self) -> usize {
        self.max_context
    }

    pub(crate) fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

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
pub struct Reply {
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
    engine: Arc<GazelleEngine>,
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
}

impl GazelleSession {
    pub(crate) fn new(
        engine: Arc<GazelleEngine>,
        system_prompt: Option<&str>,
    ) -> candle_core::Result<Self> {
        let mut cache = engine.model.new_cache(1024.min(engine.max_context))?;
        cache.limit(engine.max_context);
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
        })
    }

    /// A session whose history is prefilled in one pass: the reference for tests of the
    /// incremental path.
    #[cfg(test)]
    pub(crate) fn with_history(
        engine: Arc<GazelleEngine>,
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
    pub(crate) fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// [V] f32 logits for the next token, if a turn is pending.
    #[cfg(test)]
    pub(crate) fn next_logits(&self) -> Option<&Tensor> {
        self.logits.as_ref()
    }

    fn push_user(&mut self, clip: Tensor, text: &str) {
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
        let t = Instant::now();
        let clip = self.engine.model.encode_audio(audio_16k)?;
        let encoder_ms = t.elapsed().as_secs_f64() * 1e3;
        let audio_tokens = clip.dim(1)?;
        self.push_user(clip, text);
        let stats = match self.sync() {
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
        Ok(TurnStats {
            audio_tokens,
            encoder_ms,
            ..stats
        })
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
    fn sync(&mut self) -> Result<TurnStats, SessionError> {
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
        self.cache.truncate(reused);
        let audio_id = engine.model.config().audio_token_index;
        let suffix = &new_ids[keep..];
        let first_clip = self.ids.iter().filter(|&&i| i == audio_id).count();
        let n_clips = suffix.iter().filter(|&&i| i == audio_id).count();
        let clips: Vec<&Tensor> = self.clips[first_clip..first_clip + n_clips]
            .iter()
            .collect();
        let embeds = engine.model.splice(suffix, &clips)?;
        let hidden = engine.model.forward_embeds(&embeds, &mut self.cache)?;
        self.logits = Some(engine.model.language_model().last_logits(&hidden)?);
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
        debug_assert_eq!(end, self.cache.len());
        Ok(TurnStats {
            reused_positions: reused,
            prefill_positions: self.cache.len() - reused,
            prefill_ms: t.elapsed().as_secs_f64() * 1e3,
            prompt_ids: self.ids.len(),
            ..Default::default()
        })
    }

    /// Generates the assistant's reply, handing `(id, text piece)` to `on_token` as each token
    /// is sampled. Returning `Break` stops after that token (cancellation/barge-in); the reply so
    /// far stays in the conversation until [`Self::truncate_reply_to`] cuts it.
    pub fn generate(
        &mut self,
        params: &GenerationParams,
        mut on_token: impl FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<Reply, SessionError> {
        let logits = self.logits.take().ok_or(SessionError::NoUserTurn)?;
        let engine = self.engine.clone();
        let start = self.ids.len();
        let mut context = self.ids.clone();
        let mut stream = TextStream::new();
        let mut prompt_err = None;
        let out = generate(
            &engine.model,
            &mut self.cache,
            &logits,
            &mut context,
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
        for &id in &out.tokens[..out.fed] {
            self.ids.push(id);
            self.ends.push(self.ends.last().copied().unwrap_or(0) + 1);
        }
        let text = engine.prompt.decode(&out.tokens)?;
        self.messages
            .push(ChatMessage::new("assistant", text.clone()));
        self.last_reply = Some(LastReply {
            message: self.messages.len() - 1,
            start,
            tokens: out.tokens.clone(),
        });
        Ok(Reply {
            decode_tokens_per_s: out.decode_tokens_per_s(),
            tokens: out.tokens,
            text,
            stop: out.stop,
            first_token_s: out.first_token_s,
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
