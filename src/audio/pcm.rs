//! Conversions between signed 16-bit PCM (as samples or little-endian bytes) and f32 in [-1, 1).

/// i16 → f32 in [-1, 1).
#[inline]
pub(crate) fn i16_to_f32(s: i16) -> f32 {
    s as f32 / 32768.0
}

/// f32 → i16, clamped, rounded to nearest.
#[inline]
pub(crate) fn f32_to_i16(x: f32) -> i16 {
    let v = (x * 32768.0).round();
    v.clamp(i16::MIN as f32, i16::MAX as f32) as i16
}

/// Decodes s16le bytes. A trailing odd byte is ignored; streaming callers carry it themselves.
#[cfg(test)]
pub(crate) fn s16le_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| i16_to_f32(i16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// Encodes f32 samples as s16le bytes.
pub fn f32_to_s16le(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for &s in samples {
        out.extend_from_slice(&f32_to_i16(s).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_i16_round_trips_through_f32() {
        for v in i16::MIN..=i16::MAX {
            assert_eq!(f32_to_i16(i16_to_f32(v)), v);
        }
    }

    #[test]
    fn clamps_out_of_range_floats() {
        assert_eq!(f32_to_i16(2.0), i16::MAX);
        assert_eq!(f32_to_i16(-2.0), i16::MIN);
        assert_eq!(f32_to_i16(0.0), 0);
    }

    #[test]
    fn bytes_round_trip_and_odd_byte_is_dropped() {
        let samples = [0.0, 0.5, -0.5, -1.0];
        let bytes = f32_to_s16le(&samples);
        assert_eq!(bytes.len(), 8);
        assert_eq!(s16le_to_f32(&bytes), samples);
        let mut odd = bytes.clone();
        odd.push(7);
        assert_eq!(s16le_to_f32(&odd).len(), 4);
    }
}
