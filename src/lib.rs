//! gazelle: a voice server that runs a whole spoken conversation in one process. Audio arrives
//! over a websocket ([`transport`]), Silero finds the turns ([`vad`]), a speech-language model
//! hears each turn and answers in text ([`model`]), a synthesizer speaks it ([`tts`]), and the
//! call actor ties the stages together and handles barge-in ([`pipeline`]).

pub mod assets;
pub mod audio;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pipeline;
pub mod server;
pub mod telemetry;
pub mod transport;
pub mod tts;
pub mod vad;
