//! Exact FP8 and BF16 conversions, written from the formats' definitions by reasoning on bits.
//!
//! FP8 follows the OCP 8-bit floating point specification (OFP8, v1.0):
//!
//! | format | bias | mantissa bits | max finite | infinities | NaN              |
//! |--------|------|---------------|------------|------------|------------------|
//! | E4M3   | 7    | 3             | 448        | none       | `S.1111.111`     |
//! | E5M2   | 15   | 2             | 57344      | `S.11111.00` | `S.11111.{01,10,11}` |
//!
//! Both have subnormals (exponent field 0: `(-1)^s · 2^(1-bias) · m/2^mbits`). BF16 is the top
//! half of an IEEE binary32.
//!
//! Nothing here calls the `float8` or `half` crates: those are what this module is checked
//! against (`runtime/tests/fp8.rs`), and the interpreter's `round_to_dtype` rounds through them.
//!
//! Conventions, chosen to match CUDA's `__nv_cvt_float_to_fp8` bit for bit:
//! - Rounding is to nearest, ties to even, of the exact input (f32 and f64 inputs are decomposed
//!   exactly, so there is no double rounding).
//! - [`Overflow::Saturate`] (CUDA's `__NV_SATFINITE`): a finite value whose rounding exceeds the
//!   largest finite magnitude, and ±inf, become ±max (448 or 57344).
//!   [`Overflow::NonSaturating`] is OCP's other mode: overflow and ±inf give ±inf in E5M2 and NaN
//!   in E4M3 (which has no infinity).
//! - NaN stays NaN, sign kept: E4M3 has one NaN per sign (`S.1111.111`); an E5M2 NaN keeps the
//!   input's next payload bit and is always quiet (`S.11111.1p`), as an IEEE narrowing does.
//! - Underflow keeps the sign: a negative value that rounds to zero gives -0 (`0x80`).
//! - Decoding NaN gives a quiet f32 NaN with the code's sign (and, for E5M2, its payload bit),
//!   so `encode(decode(c)) == c` for every code except E5M2's signalling NaNs `S.11111.01`,
//!   which come back quiet (`S.11111.11`).

/// One of the two OCP FP8 formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, bias 7, no infinities: DeepSeek-V3's format for every
    /// FP8 GEMM operand.
    E4M3,
    /// 5 exponent bits, 2 mantissa bits, bias 15, IEEE-like infinities and NaNs.
    E5M2,
}

/// What a conversion does with magnitudes beyond the format's largest finite value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// Clamp to ±max, infinities included (CUDA's `__NV_SATFINITE`).
    Saturate,
    /// ±inf for E5M2, NaN for E4M3 (OCP's non-saturating mode; the IEEE behaviour for E5M2).
    NonSaturating,
}

impl Fp8Format {
    /// Bits of the exponent field.
    pub const fn exponent_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 4,
            Fp8Format::E5M2 => 5,
        }
    }

    /// Bits of the mantissa (trailing significand) field.
    pub const fn mantissa_bits(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// The exponent bias.
    pub const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// The code of the largest finite positive value.
    pub const fn max_finite_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// The largest finite value: 448 for E4M3, 57344 for E5M2.
    pub const fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Whether `code` is a NaN of this format.
    pub const fn is_nan_code(self, code: u8) -> bool {
        match self {
            Fp8Format::E4M3 => code & 0x7F == 0x7F,
            Fp8Format::E5M2 => code & 0x7F > 0x7C,
        }
    }

    /// The value of `code`, exactly (every FP8 value is an f32).
    pub fn decode(self, code: u8) -> f32 {
        let sign = u32::from(code >> 7) << 31;
        let mbits = self.mantissa_bits();
        let exp_field = i32::from((code & 0x7F) >> mbits);
        let mantissa = u32::from(code) & ((1 << mbits) - 1);
        let all_ones = (1 << self.exponent_bits()) - 1;
        match self {
            Fp8Format::E4M3 if exp_field == all_ones && mantissa == (1 << mbits) - 1 => {
                return f32::from_bits(sign | F32_QUIET_NAN);
            }
            Fp8Format::E5M2 if exp_field == all_ones => {
                return if mantissa == 0 {
                    f32::from_bits(sign | F32_INFINITY)
                } else {
                    // The top mantissa bit is the quiet bit; the other one is carried as payload.
                    f32::from_bits(sign | F32_QUIET_NAN | ((mantissa & 1) << 21))
                };
            }
            _ => {}
        }
        // value = significand · 2^(exponent - mbits): the subnormal significand has no implicit
        // leading one and shares the smallest normal exponent, 1 - bias.
        let (significand, exponent) = if exp_field == 0 {
            (mantissa, 1 - self.bias())
        } else {
            ((1 << mbits) | mantissa, exp_field - self.bias())
        };
        // A small integer times a power of two in f32's normal range: exact.
        let magnitude = significand as f32 * pow2(exponent - mbits as i32);
        f32::from_bits(sign | magnitude.to_bits())
    }

    /// The code nearest to `x` (ties to even), with `overflow` deciding what lies beyond the
    /// largest finite value.
    pub fn encode(self, x: f32, overflow: Overflow) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 31) as u8) << 7;
        let abs = bits & 0x7FFF_FFFF;
        if abs > F32_INFINITY {
            return sign | self.nan_code((bits >> 21) & 1 == 1);
        }
        if abs == F32_INFINITY {
            return sign | self.overflow_code(overflow);
        }
        let exp_field = (abs >> 23) as i32;
        let mantissa = u64::from(abs & 0x7F_FFFF);
        // |x| = significand · 2^exponent with an integer significand (f32: 24 bits at most).
        let (significand, exponent) = if exp_field == 0 {
            (mantissa, -149)
        } else {
            (mantissa | (1 << 23), exp_field - 150)
        };
        sign | self.encode_magnitude(significand, exponent, overflow)
    }

    /// Like [`encode`](Self::encode) for an f64, rounded once, directly (the quantizer divides
    /// by the scale in f64 and rounds the quotient here).
    pub fn encode_f64(self, x: f64, overflow: Overflow) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 63) as u8) << 7;
        let abs = bits & 0x7FFF_FFFF_FFFF_FFFF;
        if abs > F64_INFINITY {
            return sign | self.nan_code((bits >> 50) & 1 == 1);
        }
        if abs == F64_INFINITY {
            return sign | self.overflow_code(overflow);
        }
        let exp_field = (abs >> 52) as i32;
        let mantissa = abs & ((1 << 52) - 1);
        let (significand, exponent) = if exp_field == 0 {
            (mantissa, -1074)
        } else {
            (mantissa | (1 << 52), exp_field - 1075)
        };
        sign | self.encode_magnitude(significand, exponent, overflow)
    }

    /// `x` rounded to this format and back: the nearest FP8 value as an f32.
    pub fn round(self, x: f32, overflow: Overflow) -> f32 {
        self.decode(self.encode(x, overflow))
    }

    /// The code (without sign) of `significand · 2^exponent`, a finite magnitude with
    /// `significand < 2^53`.
    fn encode_magnitude(self, significand: u64, exponent: i32, overflow: Overflow) -> u8 {
        if significand == 0 {
            return 0;
        }
        let mbits = self.mantissa_bits() as i32;
        // floor(log2 |x|)
        let leading = 63 - significand.leading_zeros() as i32 + exponent;
        let min_normal_exponent = 1 - self.bias();
        // The spacing of FP8 values around |x| is 2^quantum: 2^(leading - mbits) within a normal
        // binade, and the subnormal spacing 2^(1 - bias - mbits) below the smallest normal.
        let quantum = leading.max(min_normal_exponent) - mbits;
        // n = |x| / 2^quantum rounded to an integer; n <= 2^(mbits+1), the upper end meaning the
        // rounding carried into the next binade.
        let n = round_shift_right(significand, quantum - exponent);
        if n == 0 {
            return 0;
        }
        // Codes are ordered like magnitudes, and consecutive codes differ by one quantum within
        // a binade, so the code is (binades above the subnormal one) · 2^mbits + n. A carry
        // (n = 2^(mbits+1)) lands on the next binade's first code, as it should. Computed
        // without the format's exponent limit, then compared with the largest finite code.
        let code = i64::from(quantum - (min_normal_exponent - mbits)) * (1 << mbits) + n as i64;
        if code > i64::from(self.max_finite_code()) {
            self.overflow_code(overflow)
        } else {
            code as u8
        }
    }

    /// The positive code that an overflow (or an infinity) becomes.
    fn overflow_code(self, overflow: Overflow) -> u8 {
        match (overflow, self) {
            (Overflow::Saturate, _) => self.max_finite_code(),
            (Overflow::NonSaturating, Fp8Format::E4M3) => 0x7F,
            (Overflow::NonSaturating, Fp8Format::E5M2) => 0x7C,
        }
    }

    /// The positive NaN code for an input NaN whose payload bit below the quiet bit is `low`.
    fn nan_code(self, low: bool) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7F,
            Fp8Format::E5M2 => 0x7E | u8::from(low),
        }
    }
}

const F32_INFINITY: u32 = 0x7F80_0000;
const F32_QUIET_NAN: u32 = 0x7FC0_0000;
const F64_INFINITY: u64 = 0x7FF0_0000_0000_0000;

/// 2^e for e in f32's normal exponent range.
fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `significand / 2^shift` rounded to the nearest integer, ties to even (`shift` may be
/// negative: then the division is an exact multiplication).
fn round_shift_right(significand: u64, shift: i32) -> u64 {
    if shift <= 0 {
        // Only small results reach here (n <= 2^(mbits+1)), so the shift cannot overflow.
        return significand << (-shift);
    }
    if shift > 63 {
        // significand < 2^53 is below half of 2^shift: rounds to zero.
        return 0;
    }
    let truncated = significand >> shift;
    let remainder = significand & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if remainder > half || (remainder == half && truncated & 1 == 1) {
        truncated + 1
    } else {
        truncated
    }
}

/// `x` as an E4M3 code, rounded to nearest even and saturating (CUDA's `__NV_SATFINITE`:
/// ±inf and finite overflow give ±448, NaN gives `S.1111.111`).
pub fn f32_to_e4m3(x: f32) -> u8 {
    Fp8Format::E4M3.encode(x, Overflow::Saturate)
}

/// The value of an E4M3 code.
pub fn e4m3_to_f32(code: u8) -> f32 {
    Fp8Format::E4M3.decode(code)
}

/// `x` as an E5M2 code, rounded to nearest even and saturating (±inf and finite overflow give
/// ±57344; NaN stays NaN).
pub fn f32_to_e5m2(x: f32) -> u8 {
    Fp8Format::E5M2.encode(x, Overflow::Saturate)
}

/// `x` as an E5M2 code, rounded to nearest even, IEEE style: overflow gives ±inf (values from
/// 61440, the midpoint between 57344 and 2^16, up), ±inf stays ±inf, NaN stays NaN.
pub fn f32_to_e5m2_ieee(x: f32) -> u8 {
    Fp8Format::E5M2.encode(x, Overflow::NonSaturating)
}

/// The value of an E5M2 code.
pub fn e5m2_to_f32(code: u8) -> f32 {
    Fp8Format::E5M2.decode(code)
}

/// `x` as bf16 bits: round to nearest even on the 16 bits dropped; overflow gives ±inf (IEEE);
/// NaN stays NaN, made quiet, sign and top payload bits kept.
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & 0x7FFF_FFFF > F32_INFINITY {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let upper = bits >> 16;
    let dropped = bits & 0xFFFF;
    let round_up = dropped > 0x8000 || (dropped == 0x8000 && upper & 1 == 1);
    // A carry out of the mantissa increments the exponent, which is exactly right; from the
    // largest finite bf16 it reaches the infinity pattern.
    (upper + u32::from(round_up)) as u16
}

/// The value of bf16 bits (exact); a signalling NaN comes back quiet.
pub fn bf16_to_f32(bits: u16) -> f32 {
    let bits = if bits & 0x7FFF > 0x7F80 {
        bits | 0x0040
    } else {
        bits
    };
    f32::from_bits(u32::from(bits) << 16)
}

/// `x` rounded to the nearest bf16 value, as an f32.
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_e4m3_codes() {
        assert_eq!(f32_to_e4m3(448.0), 0x7E);
        assert_eq!(f32_to_e4m3(-448.0), 0xFE);
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        assert_eq!(f32_to_e4m3(2f32.powi(-9)), 0x01);
        assert_eq!(f32_to_e4m3(2f32.powi(-6)), 0x08);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xFF);
        assert_eq!(f32_to_e4m3(-1e-30), 0x80);
        assert_eq!(Fp8Format::E4M3.encode(500.0, Overflow::NonSaturating), 0x7F);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn known_e5m2_codes() {
        assert_eq!(f32_to_e5m2(57344.0), 0x7B);
        assert_eq!(f32_to_e5m2(61440.0), 0x7B);
        assert_eq!(f32_to_e5m2_ieee(61440.0), 0x7C);
        assert_eq!(f32_to_e5m2_ieee(61439.996), 0x7B);
        assert_eq!(f32_to_e5m2(f32::INFINITY), 0x7B);
        assert_eq!(f32_to_e5m2_ieee(f32::NEG_INFINITY), 0xFC);
        assert_eq!(f32_to_e5m2(2f32.powi(-16)), 0x01);
        assert_eq!(e5m2_to_f32(0x7C), f32::INFINITY);
        assert!(e5m2_to_f32(0x7D).is_nan());
    }

    #[test]
    fn bf16_rounds_to_even_and_overflows_to_infinity() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x7F80_0001)), 0x7FC0);
        assert_eq!(bf16_to_f32(0x7F81).to_bits(), 0x7FC1_0000);
    }
}
