//! Twilio Media Streams phone calls: the TwiML webhook that connects a call to our websocket,
//! request signatures, and the bidirectional media stream (µ-law 8 kHz in and out, marks to learn
//! what was played, `clear` on barge-in). See PROTOCOL.md beside this file.

pub mod handler;
pub mod protocol;
