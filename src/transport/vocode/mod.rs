//! The Vocode websocket protocol at `/conversation` (what the public `vocode` React SDK speaks in
//! self-hosted mode), with taolun's `system_prompt`/`first_message` and our `gazelle_*`
//! extensions. See PROTOCOL.md beside this file.

pub mod client;
pub(crate) mod handler;
pub(crate) mod input;
pub(crate) mod protocol;
