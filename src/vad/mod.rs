//! Voice activity detection: the Silero model on ONNX Runtime (one session shared by every call,
//! run on its own thread), and the turn detector that turns frame probabilities into speech-start,
//! barge-in and speech-end events.

pub mod offline;
pub mod silero;
pub(crate) mod turn;
pub(crate) mod worker;

pub use silero::{SileroModel, SileroState, VadError};
pub use turn::{TurnDetector, TurnEvent, TurnSettings};
pub(crate) use worker::VadHandle;
