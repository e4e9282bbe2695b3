//! The loaded Gazelle model every call shares behind an `Arc`: weights, chat prompt and stop
//! tokens, with the limits that bound each call's context. One per process; a call's own state is
//! a `GazelleSession` (`session.rs`, which also opens one: `LoadedGazelle::open_session`).

use super::model::Gazelle;
use super::prompt::{ChatPrompt, PromptError};

/// Which turns' audio a call's prompt keeps. Gazelle was trained on single turns, so keeping the
/// audio of earlier turns in the cache goes beyond anything it saw; there is no reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryAudio {
    /// Every turn's audio stays in the prompt (and the cache), so the model hears the whole call.
    #[default]
    All,
    /// Only the newest turn's audio: earlier user turns keep only their text (none, unless the
    /// client sent some), and the replies stay. Each turn then recomputes the cache from the
    /// first earlier user turn on.
    Current,
}

/// Weights plus tokenizer; one per process.
#[derive(Debug)]
pub struct LoadedGazelle {
    pub model: Gazelle,
    pub(crate) prompt: ChatPrompt,
    stop_ids: Vec<u32>,
    /// Positions a call's KV cache may hold; older exchanges are dropped beyond it.
    max_context: usize,
    history_audio: HistoryAudio,
}

impl LoadedGazelle {
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
            history_audio: HistoryAudio::All,
        })
    }

    /// Limits every call's context to `positions` (at most `max_position_embeddings`), which
    /// bounds a call's KV-cache memory and so sets how many calls fit on a device.
    pub(crate) fn with_max_context(mut self, positions: usize) -> Self {
        self.max_context = positions.clamp(1, self.max_context);
        self
    }

    /// Which turns' audio each call's prompt keeps.
    pub(crate) fn with_history_audio(mut self, mode: HistoryAudio) -> Self {
        self.history_audio = mode;
        self
    }

    /// What becomes of each call's system prompt.
    pub(crate) fn with_system_prompt(mut self, mode: super::prompt::SystemPromptMode) -> Self {
        self.prompt.set_system_mode(mode);
        self
    }

    /// Bytes one cache position takes: keys and values of every layer, in the compute dtype.
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        let t = &self.model.config().text;
        2 * t.num_hidden_layers
            * t.num_key_value_heads
            * t.head_dim
            * self.model.dtype().size_in_bytes()
    }

    /// Positions each call's cache may hold.
    pub(crate) fn max_positions(&self) -> usize {
        self.max_context
    }

    /// Which turns' audio each call's prompt keeps.
    pub(crate) fn history_audio(&self) -> HistoryAudio {
        self.history_audio
    }

    pub(crate) fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }
}

/// Positions kept free for the reply when a turn is appended: when the conversation would leave
/// less than this of the context, its oldest exchanges are dropped.
pub(crate) fn reply_room(max_len: usize) -> usize {
    (max_len / 8).clamp(16, 1024)
}
