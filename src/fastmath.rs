//! Inlined, branch-free `exp` and `ln` for f32 that the compiler can vectorize (libm's are
//! opaque calls, one element at a time), shared by the fused ops and the noise generator.
//! f64 keeps the standard library's functions.

use num_traits::Float;

/// `exp` for the kernels: f32 gets an inlined, branch-free version the compiler can vectorize
/// (libm's `expf` is an opaque call per element); f64 keeps `f64::exp`.
pub trait FastExp: Float {
    fn fexp(self) -> Self;
    /// Natural logarithm of a positive normal number.
    fn fln(self) -> Self;
    /// `ln(1 + u)` for u >= 0, accurate for tiny u.
    fn fln_1p(self) -> Self;
}

impl FastExp for f32 {
    /// Cody-Waite reduction x = n ln 2 + r (|r| <= ln 2 / 2), exp(r) by its degree-7 Taylor
    /// polynomial (truncation < 5e-9 relative), 2^n by building the exponent bits. Relative
    /// error within 2 ulp on [-80, 88] (tests/ops.rs); clamped to [-87, 88] (results near the
    /// bottom are subnormal, where f32 itself has no relative precision).
    #[inline(always)]
    fn fexp(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, so n * LN2_HI is exact
        const LN2_LO: f32 = -2.121_944_4e-4;
        const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = self.clamp(-87.0, 88.0);
        let shifted = x * LOG2E + ROUND;
        let n = shifted - ROUND;
        let r = x - n * LN2_HI - n * LN2_LO;
        let p = 1.0
            + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        // 2^n: the integer n sits in the low mantissa bits of `shifted` (its bits are
        // 0x4b40_0000 + n for |n| < 2^22), so n + 127 is an integer subtraction. `n as i32`
        // would be Rust's saturating cast, which compiles to a scalar convert-and-compare per
        // lane and kept every loop calling fexp from vectorizing.
        let biased = shifted.to_bits().wrapping_sub(0x4b40_0000 - 127);
        let scale = f32::from_bits(biased << 23);
        p * scale
    }

    /// x = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m - 1) / (m + 1),
    /// |s| <= 0.172, by its series to s^9 (truncation < 3e-9 relative); branch-free, so the
    /// loops that call it vectorize (libm's `logf` / `log1pf` are opaque calls). Within a few
    /// ulp of the f64 logarithm (tests/ops.rs). For positive normal x only.
    #[inline(always)]
    fn fln(self) -> f32 {
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let bits = self.to_bits();
        let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
        let big = m > std::f32::consts::SQRT_2;
        let m = if big { m * 0.5 } else { m };
        let e = (((bits >> 23) & 0xff) as i32 - 127 + big as i32) as f32;
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let p = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))));
        e * LN2_HI + (e * LN2_LO + p)
    }

    /// ln(w) u / (w - 1) with w = 1 + u rounded: the quotient corrects the rounding of 1 + u
    /// (Goldberg), so tiny u keep full relative precision.
    #[inline(always)]
    fn fln_1p(self) -> f32 {
        let w = 1.0 + self;
        let d = w - 1.0;
        if d == 0.0 {
            self
        } else {
            w.fln() * (self / d)
        }
    }
}

impl FastExp for f64 {
    #[inline(always)]
    fn fexp(self) -> f64 {
        self.exp()
    }
    #[inline(always)]
    fn fln(self) -> f64 {
        self.ln()
    }
    #[inline(always)]
    fn fln_1p(self) -> f64 {
        self.ln_1p()
    }
}
