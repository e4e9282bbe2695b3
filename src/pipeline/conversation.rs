//! Conversation context: the system prompt, the optional first message, and the turns so far. The
//! bot's turns hold only what was actually played to the user. A call keeps its last
//! [`MAX_TURNS`] turns, so even a call that goes on for days holds bounded memory; the model
//! keeps its own, shorter context.

use std::collections::VecDeque;

use serde::Serialize;

/// Turns a call's history keeps; older ones are dropped (and counted).
pub(crate) const MAX_TURNS: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub(crate) enum Turn {
    /// A user turn; joint models hear audio, so there is no text, only its length.
    User { duration_ms: u64 },
    /// A bot turn: the text the user heard, and whether it was cut short.
    Bot { text: String, interrupted: bool },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Conversation {
    pub system_prompt: Option<String>,
    pub first_message: Option<String>,
    /// The newest turns, oldest first.
    pub turns: VecDeque<Turn>,
    /// Turns dropped from the front to keep at most [`MAX_TURNS`].
    pub dropped_turns: u64,
}

impl Conversation {
    pub(crate) fn new(system_prompt: Option<String>, first_message: Option<String>) -> Self {
        Conversation {
            system_prompt,
            first_message,
            ..Default::default()
        }
    }

    pub(crate) fn push(&mut self, turn: Turn) {
        if self.turns.len() == MAX_TURNS {
            self.turns.pop_front();
            self.dropped_turns += 1;
        }
        self.turns.push_back(turn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_call_keeps_its_newest_turns() {
        let mut c = Conversation::default();
        for i in 0..(MAX_TURNS as u64 + 5) {
            c.push(Turn::User { duration_ms: i });
        }
        assert_eq!(c.turns.len(), MAX_TURNS);
        assert_eq!(c.dropped_turns, 5);
        assert_eq!(c.turns[0], Turn::User { duration_ms: 5 });
    }
}
