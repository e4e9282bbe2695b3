//! Gazelle (tincans-ai/gazelle): a joint speech-language model that hears a user turn directly.
//! wav2vec2 audio tower -> stacking projector -> `<|audio|>` splice -> Llama/Mistral decoder.
//!
//! `Gazelle` holds the weights (shared by calls behind an `Arc`); `GazelleSession` holds one
//! call's KV cache and conversation; `generation` samples tokens; `hub` finds the files.

pub mod config;
pub mod decoder;
#[allow(clippy::module_inception)]
pub mod gazelle;
pub mod generation;
pub mod hub;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod linear;
pub mod projector;
pub mod prompt;
pub mod random;
pub mod session;
pub mod wav2vec2;

pub use config::{GazelleConfig, TextArch, TextConfig, Wav2Vec2Config};
pub use decoder::{CausalLm, KvCache};
pub use gazelle::{AudioStages, Gazelle, Precision};
pub use generation::{GenerationParams, StopReason};
pub use prompt::{ChatMessage, ChatPrompt};
pub use session::{GazelleEngine, GazelleSession, HistoryTurn, Reply, Spoken, TurnStats};

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(test)]
pub(crate) mod parity_tests;
#[cfg(test)]
mod session_tests;
