//! gazelle: a voice server with a joint speech-language model.

pub mod model;
