//! Philox4x32-10 batches with explicit AVX2 instructions, for builds where AVX2 is enabled at
//! compile time (`-C target-cpu=native` on any x86-64 CPU since 2013, see
//! `.cargo/config.toml`); other builds use the portable lane loop of the parent module.
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
//! Intrinsics come from `safe_arch`, whose functions are safe and exist only when the target
//! feature is enabled, so this module has no `unsafe`. The results equal the portable path's
//! bit for bit (tests in the parent module compare both with the scalar reference).

use core::arch::x86_64::_CMP_NEQ_UQ;

use safe_arch::{
    add_i32_m256i, bitand_m256, bitxor_m256i, blend_imm_i32_m256i, cast_to_m256_from_m256i,
    cmp_gt_mask_i32_m256i, cmp_op_mask_m256, m256, m256i, move_mask_m256, mul_m256,
    mul_u64_low_bits_m256i, permute2z_m256i, set_splat_i32_m256i, set_splat_m256,
    shl_imm_u64_m256i, shr_imm_u64_m256i, unpack_high_i32_m256i, unpack_high_i64_m256i,
    unpack_low_i32_m256i, unpack_low_i64_m256i, zeroed_m256, zeroed_m256i,
};

use super::{Lanes, MaskKey, BATCH, LANES, PHILOX_M4X32_0, PHILOX_M4X32_1, PHILOX_W32_0};
use super::{PHILOX_ROUNDS, PHILOX_W32_1};

/// Blocks per AVX2 register (8 lanes of u32).
const GROUP: usize = 8;
/// Register groups per batch.
const GROUPS: usize = LANES / GROUP;

/// The four counter words of one group of 8 blocks, one register per word.
type Words = [m256i; 4];

/// Whether the 16 blocks `k..k + 16` share the high half of their block number (then rounds 0
/// and 1 can treat counter word 1 as a constant).
#[inline(always)]
pub(super) fn uniform_high_word(k: u64) -> bool {
    (k as u32) <= u32::MAX - (LANES as u32 - 1)
}

#[inline(always)]
fn splat(x: u32) -> m256i {
    set_splat_i32_m256i(x as i32)
}

/// The high and low 32-bit halves of `a · m` per lane (`m` the same in every lane).
#[inline(always)]
fn mulhilo(a: m256i, m: m256i) -> (m256i, m256i) {
    // vpmuludq multiplies the low u32 of each u64 lane: the even lanes directly, the odd
    // lanes after shifting them down.
    let even = mul_u64_low_bits_m256i(a, m);
    let odd = mul_u64_low_bits_m256i(shr_imm_u64_m256i::<32>(a), m);
    let lo = blend_imm_i32_m256i::<0b1010_1010>(even, shl_imm_u64_m256i::<32>(odd));
    let hi = blend_imm_i32_m256i::<0b1010_1010>(shr_imm_u64_m256i::<32>(even), odd);
    (hi, lo)
}

/// Philox4x32-10 of the 16 blocks `k..k + 16` (requires [`uniform_high_word`]`(k)`), as two
/// groups of 8: `out[g][w]` lane `j` is word `w` of block `k + 8g + j`.
#[inline(always)]
fn philox_groups(key: &MaskKey, k: u64) -> [Words; GROUPS] {
    debug_assert!(uniform_high_word(k));
    let m0 = splat(PHILOX_M4X32_0);
    let m1 = splat(PHILOX_M4X32_1);
    let [mut k0, mut k1] = key.words();
    let high = (k >> 32) as u32;
    let first = add_i32_m256i(splat(k as u32), m256i::from([0i32, 1, 2, 3, 4, 5, 6, 7]));
    let c0 = [first, add_i32_m256i(first, splat(GROUP as u32))];

    // Round 0 on (c0, high, 0, 0): the product of word 2 (zero) is zero.
    //   → (high ^ k0, 0, hi(M0·c0) ^ k1, lo(M0·c0)); word 0 is the same in every lane.
    let r0_word0 = high ^ k0;
    let mut c2 = [zeroed_m256i(); GROUPS];
    let mut c3 = [zeroed_m256i(); GROUPS];
    for g in 0..GROUPS {
        let (hi0, lo0) = mulhilo(c0[g], m0);
        c2[g] = bitxor_m256i(hi0, splat(k1));
        c3[g] = lo0;
    }
    // Round 1: word 0 is uniform (one scalar product), word 1 is zero.
    k0 = k0.wrapping_add(PHILOX_W32_0);
    k1 = k1.wrapping_add(PHILOX_W32_1);
    let p = u64::from(r0_word0) * u64::from(PHILOX_M4X32_0);
    let (hi0, lo0) = ((p >> 32) as u32, p as u32);
    let mut c = [[zeroed_m256i(); 4]; GROUPS];
    for g in 0..GROUPS {
        let (hi1, lo1) = mulhilo(c2[g], m1);
        c[g] = [
            bitxor_m256i(hi1, splat(k0)),
            lo1,
            bitxor_m256i(c3[g], splat(hi0 ^ k1)),
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
                bitxor_m256i(bitxor_m256i(hi1, x1), kk0),
                lo1,
                bitxor_m256i(bitxor_m256i(hi0, x3), kk1),
                lo0,
            ];
        }
    }
    c
}

/// The draws of one batch in lane layout, like the portable [`super::philox_lanes`]
/// (requires [`uniform_high_word`]`(k)`).
#[inline(always)]
pub(super) fn philox_lanes(key: &MaskKey, k: u64) -> Lanes {
    let groups = philox_groups(key, k);
    let mut lanes = [[0u32; LANES]; 4];
    for (g, words) in groups.iter().enumerate() {
        for (w, &reg) in words.iter().enumerate() {
            let a: [u32; GROUP] = reg.into();
            lanes[w][g * GROUP..(g + 1) * GROUP].copy_from_slice(&a);
        }
    }
    lanes
}

/// Transposes a group's words (lane `j` of word `w` = element `4j + w`) into element order:
/// register `q` holds elements `8q..8q + 8`.
#[inline(always)]
fn element_order(w: Words) -> [m256i; 4] {
    let t0 = unpack_low_i32_m256i(w[0], w[1]); // blocks 0, 1 | 4, 5 of words 0 and 1
    let t1 = unpack_high_i32_m256i(w[0], w[1]); // blocks 2, 3 | 6, 7
    let t2 = unpack_low_i32_m256i(w[2], w[3]);
    let t3 = unpack_high_i32_m256i(w[2], w[3]);
    let u0 = unpack_low_i64_m256i(t0, t2); // block 0 | block 4, all four words
    let u1 = unpack_high_i64_m256i(t0, t2); // block 1 | block 5
    let u2 = unpack_low_i64_m256i(t1, t3); // block 2 | block 6
    let u3 = unpack_high_i64_m256i(t1, t3); // block 3 | block 7
    [
        permute2z_m256i::<0x20>(u0, u1),
        permute2z_m256i::<0x20>(u2, u3),
        permute2z_m256i::<0x31>(u0, u1),
        permute2z_m256i::<0x31>(u2, u3),
    ]
}

/// DARE on one batch, the 64 elements of blocks `k..k + 16` (requires
/// [`uniform_high_word`]`(k)`): each element becomes `value · scale` if its draw is below
/// `threshold`, else `0.0`. Returns the number kept, or with `NONZEROS` the number of non-zero
/// results (NaN counts as non-zero).
#[inline(always)]
pub(super) fn dare_batch<const NONZEROS: bool>(
    key: &MaskKey,
    threshold: u32,
    k: u64,
    values: &mut [f32; BATCH],
    scale: f32,
) -> u32 {
    // Unsigned `draw < threshold` as a signed compare of both with the sign bit flipped.
    let sign = splat(0x8000_0000);
    let limit = splat(threshold ^ 0x8000_0000);
    let scale = set_splat_m256(scale);
    let (eights, _) = values.as_chunks_mut::<GROUP>();
    let mut kept = 0;
    for (g, words) in philox_groups(key, k).into_iter().enumerate() {
        for (q, draws) in element_order(words).into_iter().enumerate() {
            let keep =
                cast_to_m256_from_m256i(cmp_gt_mask_i32_m256i(limit, bitxor_m256i(draws, sign)));
            let v = &mut eights[4 * g + q];
            let r = bitand_m256(mul_m256(m256::from(*v), scale), keep);
            *v = r.into();
            kept += if NONZEROS {
                move_mask_m256(cmp_op_mask_m256::<_CMP_NEQ_UQ>(r, zeroed_m256())).count_ones()
            } else {
                move_mask_m256(keep).count_ones()
            };
        }
    }
    kept
}
