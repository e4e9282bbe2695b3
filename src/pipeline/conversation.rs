//! Conversation context: the system prompt, the optional first message, and the turns so far. The
//! bot's turns hold only what was actually played to the user.

use serde::Serialize;

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
    pub turns: Vec<Turn>,
}

impl Conversation {
    pub(crate) fn new(system_prompt: Option<String>, first_message: Option<String>) -> Self {
        Conversation {
            system_prompt,
            first_message,
            turns: Vec::new(),
        }
    }
}
