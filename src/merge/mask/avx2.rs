//! Philox4x32-10 batches with explicit AVX2 instructions, run where the CPU has AVX2 (detected
//! at run time, see [`crate::merge::simd`]); elsewhere the portable lane loop of the parent
//! module runs.
//!
//! The same 16-block batches as [`super::philox_lanes`], but written with AVX2 instructions
//! because the compiler's version of the portable loop widens every word to 64 bits and packs
//! the products back (measured 2.2–2.5× slower on `dare_in_place`). Here:
//!
//! * one 32×32→64-bit multiply of 8 lanes is two `vpmuludq` (even and odd lanes) and two
//!   blends to regroup the high and low halves ([`mulhilo`]);
//! * rounds 0 and 1 use what is known about the counter — words 2 and 3 are zero and word 1
//!   (the block number's high half) is the same in all 16 lanes — so each of them needs one
//!   vector multiply instead of two. Callers check the second condition with
//!   [`uniform_high_word`] and take the portable path otherwise (a batch that crosses a
//!   multiple of 2³² blocks, i.e. an element index near 2³⁴);
//! * DARE's compare-and-scale runs on the draws transposed to element order, 8 floats at a time.
//!
//! The bodies are `#[target_feature(enable = "avx2,popcnt")]` functions with `core::arch`
//! intrinsics (safe to call there); registers go to and from arrays with `bytemuck::cast`, so
//! the only `unsafe` is the call of each body from its entry point, which takes an [`Avx2`]
//! proof. The results equal the portable path's bit for bit (tests in the parent module compare
//! both with the scalar reference).

use core::arch::x86_64::{
    __m256, __m256i, _mm256_add_epi32, _mm256_and_ps, _mm256_blend_epi32, _mm256_castsi256_ps,
    _mm256_cmp_ps, _mm256_cmpgt_epi32, _mm256_movemask_ps, _mm256_mul_epu32, _mm256_mul_ps,
    _mm256_permute2x128_si256, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setr_epi32,
    _mm256_setzero_ps, _mm256_setzero_si256, _mm256_slli_epi64, _mm256_srli_epi64,
    _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpacklo_epi32, _mm256_unpacklo_epi64,
    _mm256_xor_si256, _CMP_NEQ_UQ,
};

use super::{Lanes, MaskKey, BATCH, LANES, PHILOX_M4X32_0, PHILOX_M4X32_1, PHILOX_W32_0};
use super::{BLOCK_MASK, PHILOX_ROUNDS, PHILOX_W32_1};
use crate::merge::simd::Avx2;

/// Blocks per AVX2 register (8 lanes of u32).
const GROUP: usize = 8;
/// Register groups per batch.
const GROUPS: usize = LANES / GROUP;

/// The four counter words of one group of 8 blocks, one register per word.
type Words = [__m256i; 4];

/// Whether the 16 blocks `k..k + 16` share the high half of their block number (then rounds 0
/// and 1 can treat counter word 1 as a constant).
#[inline(always)]
pub(super) fn uniform_high_word(k: u64) -> bool {
    (k as u32) <= u32::MAX - (LANES as u32 - 1)
}

#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn splat(x: u32) -> __m256i {
    _mm256_set1_epi32(x as i32)
}

/// The high and low 32-bit halves of `a · m` per lane (`m` the same in every lane).
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn mulhilo(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
    // vpmuludq multiplies the low u32 of each u64 lane: the even lanes directly, the odd
    // lanes after shifting them down.
    let even = _mm256_mul_epu32(a, m);
    let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
    let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
    let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
    (hi, lo)
}

/// Philox4x32-10 of the 16 blocks `k..k + 16` (requires [`uniform_high_word`]`(k)`), as two
/// groups of 8: `out[g][w]` lane `j` is word `w` of block `k + 8g + j`.
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn philox_groups(key: &MaskKey, k: u64) -> [Words; GROUPS] {
    debug_assert!(uniform_high_word(k));
    let m0 = splat(PHILOX_M4X32_0);
    let m1 = splat(PHILOX_M4X32_1);
    let [mut k0, mut k1] = key.words();
    let high = (k >> 32) as u32;
    let first = _mm256_add_epi32(splat(k as u32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    let c0 = [first, _mm256_add_epi32(first, splat(GROUP as u32))];

    // Round 0 on (c0, high, 0, 0): the product of word 2 (zero) is zero.
    //   → (high ^ k0, 0, hi(M0·c0) ^ k1, lo(M0·c0)); word 0 is the same in every lane.
    let r0_word0 = high ^ k0;
    let mut c2 = [_mm256_setzero_si256(); GROUPS];
    let mut c3 = [_mm256_setzero_si256(); GROUPS];
    for g in 0..GROUPS {
        let (hi0, lo0) = mulhilo(c0[g], m0);
        c2[g] = _mm256_xor_si256(hi0, splat(k1));
        c3[g] = lo0;
    }
    // Round 1: word 0 is uniform (one scalar product), word 1 is zero.
    k0 = k0.wrapping_add(PHILOX_W32_0);
    k1 = k1.wrapping_add(PHILOX_W32_1);
    let p = u64::from(r0_word0) * u64::from(PHILOX_M4X32_0);
    let (hi0, lo0) = ((p >> 32) as u32, p as u32);
    let mut c = [[_mm256_setzero_si256(); 4]; GROUPS];
    for g in 0..GROUPS {
        let (hi1, lo1) = mulhilo(c2[g], m1);
        c[g] = [
            _mm256_xor_si256(hi1, splat(k0)),
            lo1,
            _mm256_xor_si256(c3[g], splat(hi0 ^ k1)),
            splat(lo0),
        ];
    }
    // Rounds 2..10, the general round.
    for _ in 2..PHILOX_ROUNDS {
        k0 = k0.wrapping_add(PHILOX_W32_0);
        k1 = k1.wrapping_add(PHILOX_W32_1);
        let (kk0, kk1) = (splat(k0), splat(k1));
        for words in c.iter_mut() {
            let [x0, x1, x2, x3] = *words;
            let (hi0, lo0) = mulhilo(x0, m0);
            let (hi1, lo1) = mulhilo(x2, m1);
            *words = [
                _mm256_xor_si256(_mm256_xor_si256(hi1, x1), kk0),
                lo1,
                _mm256_xor_si256(_mm256_xor_si256(hi0, x3), kk1),
                lo0,
            ];
        }
    }
    c
}

/// The draws of one batch in lane layout, like the portable [`super::philox_lanes`]
/// (requires [`uniform_high_word`]`(k)`).
#[inline]
pub(super) fn philox_lanes(_: Avx2, key: &MaskKey, k: u64) -> Lanes {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { philox_lanes_avx2(key, k) }
}

/// The body of [`philox_lanes`].
#[target_feature(enable = "avx2,popcnt")]
fn philox_lanes_avx2(key: &MaskKey, k: u64) -> Lanes {
    let groups = philox_groups(key, k);
    let mut lanes = [[0u32; LANES]; 4];
    for (g, words) in groups.iter().enumerate() {
        for (w, &reg) in words.iter().enumerate() {
            let a: [u32; GROUP] = bytemuck::cast(reg);
            lanes[w][g * GROUP..(g + 1) * GROUP].copy_from_slice(&a);
        }
    }
    lanes
}

/// Transposes a group's words (lane `j` of word `w` = element `4j + w`) into element order:
/// register `q` holds elements `8q..8q + 8`.
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn element_order(w: Words) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(w[0], w[1]); // blocks 0, 1 | 4, 5 of words 0 and 1
    let t1 = _mm256_unpackhi_epi32(w[0], w[1]); // blocks 2, 3 | 6, 7
    let t2 = _mm256_unpacklo_epi32(w[2], w[3]);
    let t3 = _mm256_unpackhi_epi32(w[2], w[3]);
    let u0 = _mm256_unpacklo_epi64(t0, t2); // block 0 | block 4, all four words
    let u1 = _mm256_unpackhi_epi64(t0, t2); // block 1 | block 5
    let u2 = _mm256_unpacklo_epi64(t1, t3); // block 2 | block 6
    let u3 = _mm256_unpackhi_epi64(t1, t3); // block 3 | block 7
    [
        _mm256_permute2x128_si256::<0x20>(u0, u1),
        _mm256_permute2x128_si256::<0x20>(u2, u3),
        _mm256_permute2x128_si256::<0x31>(u0, u1),
        _mm256_permute2x128_si256::<0x31>(u2, u3),
    ]
}

/// DARE on consecutive batches, the first at block `k` (block numbers modulo 2⁶²): each
/// element becomes `value · scale` if its draw is below `threshold`, else `0.0`. Returns the
/// number kept, or with `NONZEROS` the number of non-zero results (NaN counts as non-zero).
/// A batch without [`uniform_high_word`] goes to `portable(k, batch)`, which must do the same.
///
/// The whole loop runs in the AVX2 body, so that each batch's kernel is inlined into it.
#[inline]
pub(super) fn dare<const NONZEROS: bool>(
    _: Avx2,
    key: &MaskKey,
    threshold: u32,
    k: u64,
    batches: &mut [[f32; BATCH]],
    scale: f32,
    portable: impl FnMut(u64, &mut [f32; BATCH]) -> u32,
) -> u64 {
    // SAFETY: the body's one precondition is its target features (AVX2, POPCNT), which the
    // `Avx2` proof guarantees the CPU has; it touches memory only through safe references.
    unsafe { dare_avx2::<NONZEROS>(key, threshold, k, batches, scale, portable) }
}

/// The body of [`dare`].
#[target_feature(enable = "avx2,popcnt")]
fn dare_avx2<const NONZEROS: bool>(
    key: &MaskKey,
    threshold: u32,
    mut k: u64,
    batches: &mut [[f32; BATCH]],
    scale: f32,
    mut portable: impl FnMut(u64, &mut [f32; BATCH]) -> u32,
) -> u64 {
    let mut kept = 0u64;
    for values in batches {
        kept += u64::from(if uniform_high_word(k) {
            dare_batch::<NONZEROS>(key, threshold, k, values, scale)
        } else {
            rare(&mut portable, k, values)
        });
        k = k.wrapping_add(LANES as u64) & BLOCK_MASK;
    }
    kept
}

/// Calls `f(k, values)` out of line: the portable batch of [`dare_avx2`], one in 2²⁸ at most,
/// kept out of its loop.
#[cold]
#[inline(never)]
fn rare<F: FnMut(u64, &mut [f32; BATCH]) -> u32>(
    f: &mut F,
    k: u64,
    values: &mut [f32; BATCH],
) -> u32 {
    f(k, values)
}

/// DARE on one batch, the 64 elements of blocks `k..k + 16` (requires
/// [`uniform_high_word`]`(k)`); see [`dare`].
#[target_feature(enable = "avx2,popcnt")]
#[inline]
fn dare_batch<const NONZEROS: bool>(
    key: &MaskKey,
    threshold: u32,
    k: u64,
    values: &mut [f32; BATCH],
    scale: f32,
) -> u32 {
    // Unsigned `draw < threshold` as a signed compare of both with the sign bit flipped.
    let sign = splat(0x8000_0000);
    let limit = splat(threshold ^ 0x8000_0000);
    let scale = _mm256_set1_ps(scale);
    let (eights, _) = values.as_chunks_mut::<GROUP>();
    let mut kept = 0;
    for (g, words) in philox_groups(key, k).into_iter().enumerate() {
        for (q, draws) in element_order(words).into_iter().enumerate() {
            let keep =
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_xor_si256(draws, sign)));
            let v = &mut eights[4 * g + q];
            let r = _mm256_and_ps(_mm256_mul_ps(bytemuck::cast::<_, __m256>(*v), scale), keep);
            *v = bytemuck::cast(r);
            kept += if NONZEROS {
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(r, _mm256_setzero_ps()))
                    .count_ones()
            } else {
                _mm256_movemask_ps(keep).count_ones()
            };
        }
    }
    kept
}
