//! Voice activity detection and turn-taking: the Silero model on ONNX Runtime (one session shared
//! by every call, run on its own thread), the turn detector that turns frame probabilities into
//! speech-start, pause, barge-in and speech-end events, and the Smart Turn end-of-turn model that
//! judges a pause; [`kernels`] says which ONNX Runtime CPU kernels this machine runs them on.

pub mod kernels;
pub mod offline;
pub mod silero;
pub mod smart_turn;
pub(crate) mod turn;
pub(crate) mod worker;

pub use silero::{SileroModel, SileroState, VadError};
pub use turn::{PolicyKind, TurnDetector, TurnEvent, TurnPolicy, TurnSettings};
pub(crate) use worker::VadHandle;
