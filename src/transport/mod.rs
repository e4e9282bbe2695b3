//! Transports: the wire protocols callers speak. Each turns its frames into calls to a
//! [`crate::pipeline::call::CallHandle`] and encodes the call's [`crate::pipeline::Outbound`]
//! messages for the wire.

pub mod auth;
pub(crate) mod guard;
pub(crate) mod socket;
pub mod twilio;
pub mod vocode;
pub mod waiting;
