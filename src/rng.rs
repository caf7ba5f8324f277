//! A small seeded random number generator (xoshiro256++ seeded by SplitMix64).
//!
//! klspeech draws every random number (initialization, KL-Norm noise, dropout masks, data order)
//! from this generator so that the same seed gives the same run on every platform and device;
//! candle's own `randn` uses an unseeded thread RNG on CPU.

use rayon::prelude::*;

use crate::fastmath::FastExp;

/// Values per parallel task of the keyed (counter-based) draws; even, so no Box-Muller pair
/// straddles two tasks.
const CHUNK: usize = 1 << 14;

/// Output `i` of the SplitMix64 stream that starts at `key`: random bits addressed by index, so
/// any element of a large draw can be computed on any thread in any order.
#[inline]
pub fn keyed_u64(key: u64, i: u64) -> u64 {
    let mut z = key.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 53 bits, element `i` of the stream at `key`.
#[inline]
pub fn keyed_uniform(key: u64, i: u64) -> f64 {
    (keyed_u64(key, i) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Box-Muller pairs per block of the keyed normal stream: the uniforms of a block are drawn
/// first, then the transcendental part runs as branch-free loops that vectorize.
const PAIRS: usize = 64;

/// Elements 2p .. 2p + 2n of the keyed standard normal stream, n <= PAIRS, as interleaved
/// Box-Muller pairs (r cos theta, r sin theta): r = sqrt(-2 ln u1), theta uniform on the circle.
///
/// u1 in (0, 1] keeps 53 bits (so |x| reaches 8.6, not the 5.8 of a 24-bit uniform) and its
/// logarithm is taken in f32 ([`FastExp::fln`], a few ulp). theta = k pi/2 + phi from u2: the
/// quadrant k = floor(4 u2) and phi = (frac(4 u2) - 1/2) pi/2 in [-pi/4, pi/4), where sin and
/// cos are their Taylor polynomials to degree 9 / 10 (truncation below 3e-9).
#[inline(always)]
fn keyed_normal_block(key: u64, first_pair: u64, out: &mut [f32]) {
    let n = out.len().div_ceil(2);
    debug_assert!(n <= PAIRS);
    let (mut u1, mut a) = ([1f32; PAIRS], [0f32; PAIRS]);
    for j in 0..n {
        let p = first_pair + j as u64;
        u1[j] = (1.0 - keyed_uniform(key, 2 * p)) as f32; // (0, 1]
        a[j] = (keyed_uniform(key, 2 * p + 1) * 4.0) as f32;
    }
    let (mut c, mut s) = ([0f32; PAIRS], [0f32; PAIRS]);
    for j in 0..PAIRS {
        let r = (-2.0 * u1[j].fln()).sqrt();
        // SAFETY: a[j] is finite and in [0, 4), so the unchecked cast is exact; the checked
        // `as` cast (saturating) would compile to scalar code and stop the loop vectorizing.
        let k = unsafe { a[j].to_int_unchecked::<u32>() }.min(3);
        let phi = (a[j] - k as f32 - 0.5) * std::f32::consts::FRAC_PI_2;
        let p2 = phi * phi;
        let sin = phi * (1.0 - p2 * (1.0 / 6.0) * (1.0 - p2 * (1.0 / 20.0) * (1.0 - p2 * (1.0 / 42.0) * (1.0 - p2 * (1.0 / 72.0)))));
        let cos = 1.0 - p2 * 0.5 * (1.0 - p2 * (1.0 / 12.0) * (1.0 - p2 * (1.0 / 30.0) * (1.0 - p2 * (1.0 / 56.0) * (1.0 - p2 * (1.0 / 90.0)))));
        // Rotate (cos, sin) by k quarter turns.
        let (x, y) = if k & 1 == 0 { (cos, sin) } else { (-sin, cos) };
        let sign = if k >= 2 { -1.0 } else { 1.0 };
        c[j] = r * x * sign;
        s[j] = r * y * sign;
    }
    for (j, pair) in out.chunks_mut(2).enumerate() {
        pair[0] = c[j];
        if let Some(second) = pair.get_mut(1) {
            *second = s[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keyed_normal_block_avx2(key: u64, first_pair: u64, out: &mut [f32]) {
    keyed_normal_block(key, first_pair, out)
}

/// AVX-512 (with DQ's 64-bit multiplies for the SplitMix64 stream): the same operations, the
/// same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2")]
unsafe fn keyed_normal_block_avx512(key: u64, first_pair: u64, out: &mut [f32]) {
    keyed_normal_block(key, first_pair, out)
}

/// Elements 2p and 2p + 1 of the keyed standard normal stream.
#[cfg(test)]
fn keyed_normal_pair(key: u64, p: u64) -> (f64, f64) {
    let mut v = [0f32; 2];
    keyed_normal_block(key, p, &mut v);
    (v[0] as f64, v[1] as f64)
}

/// `n` standard normal f32 values of the stream at `key`, computed in parallel; value i
/// depends only on the key and i (not on the thread count or n). The loops run compiled for
/// AVX-512 or AVX2 where the CPU has it (no FMA: the same bits either way).
pub fn keyed_normal_vec(key: u64, n: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    #[cfg(target_arch = "x86_64")]
    let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq");
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        for (j, block) in out.chunks_mut(2 * PAIRS).enumerate() {
            let first_pair = ((c * CHUNK) / 2 + j * PAIRS) as u64;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has AVX-512F, AVX-512DQ and AVX2 (checked above).
                unsafe { keyed_normal_block_avx512(key, first_pair, block) };
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { keyed_normal_block_avx2(key, first_pair, block) };
                continue;
            }
            keyed_normal_block(key, first_pair, block);
        }
    });
    v
}

/// xoshiro256++.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            // SplitMix64: spreads any seed (including 0) over the whole state.
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// An independent stream derived from this one (for per-purpose generators).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n) (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift; the bias for n << 2^64 is negligible for shuffling data.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller; one draw per call keeps the stream position simple).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` standard normal f32 values: one draw from this generator keys a counter-based
    /// stream ([`keyed_normal_vec`]), so large draws (KL-Norm noise) run in parallel.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        keyed_normal_vec(self.next_u64(), n)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorized_noise_gives_the_portable_bits() {
        // keyed_normal_vec runs the AVX-512 or AVX2 build of the block kernel where the CPU
        // has it: the same values as the portable build, in any chunk.
        let n = 3 * CHUNK + 77;
        let v = keyed_normal_vec(11, n);
        let mut portable = vec![0f32; n];
        for (c, out) in portable.chunks_mut(CHUNK).enumerate() {
            for (j, block) in out.chunks_mut(2 * PAIRS).enumerate() {
                keyed_normal_block(11, ((c * CHUNK) / 2 + j * PAIRS) as u64, block);
            }
        }
        assert!(v.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn same_seed_same_stream_and_sane_moments() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xa: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(Rng::new(8).next_u64(), xa[0]);
        let mut r = Rng::new(1);
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
    }

    #[test]
    fn keyed_normals_are_standard_independent_and_thread_count_free() {
        let n = 400_001; // odd: the last pair is cut in half
        let v: Vec<f64> = keyed_normal_vec(3, n).into_iter().map(f64::from).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.006 && (var - 1.0).abs() < 0.01, "mean {mean} var {var}");
        // The two halves of a Box-Muller pair, and neighbouring pairs, are uncorrelated.
        let lag1 = v.windows(2).map(|w| w[0] * w[1]).sum::<f64>() / (n - 1) as f64;
        assert!(lag1.abs() < 0.006, "lag-1 correlation {lag1}");
        // Tails: P(|x| > 3) = 0.0027.
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n as f64;
        assert!((tail - 0.0027).abs() < 0.0005, "tail mass {tail}");
        // Counter-based: a shorter draw is a prefix, any thread count gives the same values.
        assert_eq!(keyed_normal_vec(3, 1001)[..], keyed_normal_vec(3, n)[..1001]);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| keyed_normal_vec(3, 70_001));
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| keyed_normal_vec(3, 70_001));
        assert_eq!(one, three);
        assert_ne!(keyed_normal_vec(4, 10), keyed_normal_vec(3, 10));
        // The polynomial sine and cosine (f32): every pair lies on its circle, angles cover it
        // evenly.
        let mut quadrants = [0usize; 4];
        for p in 0..100_000u64 {
            let (c, s) = keyed_normal_pair(9, p);
            let r = (-2.0 * (1.0 - keyed_uniform(9, 2 * p)).ln()).sqrt();
            // (f32 ln: radii below ~3e-4, from u1 within 1e-7 of 1, are quantized: 6e-8 of draws.)
            assert!(((c * c + s * s).sqrt() - r).abs() <= 1e-6 * r + 5e-4, "pair {p}");
            quadrants[(s.atan2(c).rem_euclid(std::f64::consts::TAU) / std::f64::consts::FRAC_PI_2) as usize % 4] += 1;
        }
        assert!(quadrants.iter().all(|&q| (q as f64 - 25_000.0).abs() < 600.0), "{quadrants:?}");
    }
}
