//! Model code: the Gazelle speech-language model and its command-line entry points.

pub mod bench;
pub mod cli;
pub mod gazelle;
