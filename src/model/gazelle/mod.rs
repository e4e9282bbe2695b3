//! Gazelle (tincans-ai/gazelle): a joint speech-language model that hears a user turn directly.
//! wav2vec2 audio tower -> stacking projector -> `<|audio|>` splice -> Llama/Mistral decoder.
//!
//! `Gazelle` holds the weights (shared by calls behind an `Arc`); `GazelleSession` holds one
//! call's KV cache and conversation; `generation` samples tokens; `hub` finds the files.

pub(crate) mod config;
pub(crate) mod decoder;
pub(crate) mod generation;
pub mod hub;
pub(crate) mod kv_cache;
pub(crate) mod linear;
pub(crate) mod loaded;
pub(crate) mod model;
pub(crate) mod ops;
pub(crate) mod projector;
pub(crate) mod prompt;
pub mod random;
pub(crate) mod sentencepiece;
pub(crate) mod session;
pub(crate) mod wav2vec2;

pub use config::{GazelleConfig, TextArch, TextConfig, Wav2Vec2Config};
pub use generation::{GenerationParams, StopReason};
pub use model::{AudioStages, Gazelle, Precision};
pub use prompt::SystemPromptMode;
pub(crate) use session::Spoken;
pub use session::{GazelleSession, HistoryAudio, LoadedGazelle};

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(test)]
pub(crate) mod parity_tests;
#[cfg(test)]
mod real_width_tests;
#[cfg(test)]
pub(crate) mod session_tests;
