//! Offline segmentation: a whole clip through the model and the turn detector, frame by frame, as
//! the live pipeline would hear it. For `gazelle vad`, the accuracy tests and the comparison with
//! the reference Python package.

use serde::Serialize;

use super::silero::frame_len;
use super::{SileroModel, SileroState, TurnDetector, TurnEvent, TurnSettings, VadError};

/// A stretch of speech in samples, pads included (like `get_speech_timestamps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
}

/// Segments `samples` at `rate` (8 or 16 kHz). A turn still open at the end of the clip closes
/// there.
pub fn segments(
    model: &mut SileroModel,
    samples: &[f32],
    rate: u32,
    settings: TurnSettings,
) -> Result<Vec<Segment>, VadError> {
    let mut state = SileroState::new(rate)?;
    let mut detector = TurnDetector::new(settings, rate);
    let flen = frame_len(rate);
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut open: Option<u64> = None;
    for (k, frame) in samples.chunks_exact(flen).enumerate() {
        let p = model.infer(&mut [&mut state], &[frame])?[0];
        let a = (k * flen) as u64;
        detector.push(a, a + flen as u64, p, &mut events);
        for e in events.drain(..) {
            match e {
                TurnEvent::SpeechStart { start } => open = Some(start),
                TurnEvent::SpeechEnd { start, end, .. } => {
                    open = None;
                    out.push(Segment { start, end });
                }
                TurnEvent::Interruption { .. }
                | TurnEvent::Sustained
                | TurnEvent::Pause { .. }
                | TurnEvent::Resume
                | TurnEvent::Dropped => {}
            }
        }
    }
    if let Some(start) = open {
        out.push(Segment {
            start,
            end: samples.len() as u64,
        });
    }
    Ok(out)
}
