//! G.711 µ-law codec (ITU-T G.711, the variant used by telephony and Twilio). Decoding is a
//! 256-entry table; encoding is a 16 384-entry table indexed by the 14-bit magnitude, so both are
//! a single lookup per sample.

use std::sync::OnceLock;

const BIAS: i32 = 0x84;

/// The arithmetic definition of the encoder on the 14-bit magnitude (the two lowest bits of a
/// 16-bit sample never reach the code); the lookup table is built from it.
fn encode_arith(sample: i16) -> u8 {
    let mut v = (sample as i32) >> 2;
    let mask = if v < 0 {
        v = -v;
        0x7F
    } else {
        0xFF
    };
    let v = v.min(8159) + (BIAS >> 2);
    // The segment is how many bits the biased magnitude has above six.
    let segment = (32 - (v as u32).leading_zeros()).saturating_sub(6) as i32;
    if segment > 7 {
        return (0x7F ^ mask) as u8;
    }
    let code = (segment << 4) | ((v >> (segment + 1)) & 0x0F);
    (code ^ mask) as u8
}

fn decode_arith(code: u8) -> i16 {
    let u = !code;
    let exponent = ((u >> 4) & 0x07) as i32;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

fn decode_table() -> &'static [i16; 256] {
    static T: OnceLock<[i16; 256]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|c| decode_arith(c as u8)))
}

fn encode_table() -> &'static [u8] {
    // Indexed by (sample >> 2) + 8192: the encoder never looks at the two lowest bits.
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        (0..16384)
            .map(|i| encode_arith(((i - 8192) << 2) as i16))
            .collect()
    })
}

/// One µ-law byte → linear 16-bit sample.
#[inline]
pub(crate) fn decode(code: u8) -> i16 {
    decode_table()[code as usize]
}

/// One linear 16-bit sample → µ-law byte.
#[inline]
pub fn encode(sample: i16) -> u8 {
    encode_table()[((sample as i32 >> 2) + 8192) as usize]
}

/// µ-law bytes → f32 samples.
pub fn decode_to_f32(codes: &[u8]) -> Vec<f32> {
    codes
        .iter()
        .map(|&c| super::pcm::i16_to_f32(decode(c)))
        .collect()
}

/// f32 samples → µ-law bytes.
pub fn encode_from_f32(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .map(|&s| encode(super::pcm::f32_to_i16(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference encoder from the public-domain Sun Microsystems g711.c (linear2ulaw),
    /// written independently as a segment-table search so it shares no code with ours.
    fn reference_encode(pcm_val: i16) -> u8 {
        const SEG_UEND: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
        let mut v = (pcm_val as i32) >> 2;
        let mask;
        if v < 0 {
            v = -v;
            mask = 0x7F;
        } else {
            mask = 0xFF;
        }
        if v > 8159 {
            v = 8159;
        }
        v += 0x84 >> 2;
        let seg = SEG_UEND.iter().position(|&end| v <= end).unwrap_or(8);
        if seg >= 8 {
            return (0x7F ^ mask) as u8;
        }
        let uval = ((seg as i32) << 4) | ((v >> (seg + 1)) & 0xF);
        (uval ^ mask) as u8
    }

    /// g711.c's ulaw2linear.
    fn reference_decode(u_val: u8) -> i16 {
        let u = !u_val as i32;
        let mut t = ((u & 0x0F) << 3) + 0x84;
        t <<= (u & 0x70) >> 4;
        (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
    }

    #[test]
    fn all_256_codes_decode_like_the_reference() {
        for c in 0..=255u8 {
            assert_eq!(decode(c), reference_decode(c), "code {c:#04x}");
        }
    }

    #[test]
    fn every_int16_encodes_like_the_reference() {
        for s in i16::MIN..=i16::MAX {
            assert_eq!(encode(s), reference_encode(s), "sample {s}");
            assert_eq!(encode_arith(s), reference_encode(s), "arith, sample {s}");
        }
    }

    #[test]
    fn codes_survive_decode_then_encode() {
        // 0x7F (negative zero) maps back onto 0xFF (positive zero); every other code is exact.
        for c in 0..=255u8 {
            let back = encode(decode(c));
            if c == 0x7F {
                assert_eq!(back, 0xFF);
            } else {
                assert_eq!(back, c, "code {c:#04x}");
            }
        }
    }

    #[test]
    fn quantisation_error_stays_within_the_segment_step() {
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let err = (decode(encode(s)) as i32 - s as i32).abs();
            let bound = (s.unsigned_abs() as i32 / 16).max(16) + 4;
            assert!(err <= bound, "sample {s} error {err}");
        }
    }
}
