//! Reproducible random drop masks (DARE, DELLA) and stochastic rounding draws from a
//! counter-based RNG.
//!
//! This module implements the normative "Mask RNG" of `DESIGN.md`:
//!
//! * the generator is [Philox4x32-10](philox4x32_10) (Salmon et al., "Parallel random numbers: as
//!   easy as 1, 2, 3", SC'11; the Random123 library), checked against Random123's published
//!   known-answer vectors;
//! * the 2×u32 key ([`MaskKey`]) is the 64-bit FNV-1a hash of
//!   `seed (u64 LE) ‖ stream (u32 LE) ‖ tensor name bytes`, split into (low, high) 32 bits;
//!   `stream` is the model's index among the merge inputs (0-based, base excluded) or the value
//!   stored in a delta pack, and the tensor name is the output (GGUF) name;
//! * element `i` of a tensor uses the counter `(i / 4 low 32 bits, i / 4 high 32 bits, 0, 0)`:
//!   one Philox call yields the four u32 draws of elements `4k..4k+3`, element `i` taking output
//!   word `i % 4` ([`draws`]);
//! * element `i` is **kept** iff its draw is below `⌊density · 2³²⌋` ([`keep_threshold`]);
//!   density 1 keeps everything.
//!
//! # The stochastic rounding stream
//!
//! On-grid requantization with stochastic rounding (`crate::quant::grid`) draws one u32 per
//! changed element from a second Philox stream, [`RoundingKey`], which never yields a mask
//! draw:
//!
//! * key = the [`MaskKey`] derivation with stream [`ROUNDING_STREAM`] (`0xFFFF_FFFF`):
//!   FNV-1a of `seed (u64 LE) ‖ 0xFFFF_FFFF (u32 LE) ‖ tensor name bytes`, split (low, high) —
//!   `seed` is the merge's seed (`--seed`, the runtime's 0), the tensor name the output name;
//! * element `i` (`i < 2⁶³`) takes the draw of element `i + 2⁶³` ([`ROUNDING_OFFSET`]) under
//!   that key, i.e. word `i % 4` of `philox4x32_10([k low, k high, 0, 0], key)` with
//!   `k = i / 4 + 2⁶¹` ([`RoundingKey::fill`]). A mask of a tensor of fewer than 2⁶³ elements
//!   (every tensor a GGUF file can hold) only uses counters with `k < 2⁶¹`, so no draw of the
//!   rounding stream is ever one of a mask, whatever the streams — and the vectorized kernels
//!   of [`draws`] compute it;
//! * element `i` rounds up iff the top 24 bits of its draw are below `fraction · 2²⁴`, the
//!   fraction being its position between the two neighbouring levels of its block's grid
//!   (`crate::quant::grid::Rounding`).
//!
//! Like the masks, rounding then depends only on (seed, tensor, element index), never on
//! threads or chunking.
//!
//! # Why a counter-based RNG
//!
//! A mask bit depends only on (seed, stream, tensor name, element index), never on the order
//! in which elements are visited. So:
//!
//! * the merged output is byte-identical for any thread count and any row-chunking (each worker
//!   passes the absolute index of its first element as `start`);
//! * a delta pack with `delta.mask = philox` stores only the kept values, compacted in element
//!   order: the reader regenerates the mask from `(seed, stream, name)` and needs no indices;
//! * the masks are portable across platforms and versions (unlike `rand`'s `StdRng`/`SmallRng`,
//!   which are documented as non-portable) — any Philox4x32-10 + FNV-1a implementation
//!   reproduces them.
//!
//! # What lives here
//!
//! The primitives only: [`philox4x32_10`], [`MaskKey`], [`RoundingKey`], [`keep_threshold`],
//! [`draws`], and the slice kernels [`dare_in_place`] (drop and rescale), [`keep_mask`] (the
//! mask as booleans, e.g. to compact or expand a delta pack) and [`keep_with_probability`]
//! (per-element keep probabilities, for DELLA). Choosing the rescale factor, TIES sign election, magnitude ranking
//! and threading live in the merge methods that call these.
//!
//! The slice kernels compute Philox for 16 consecutive blocks at once, lane-wise: with
//! explicit AVX2 instructions where the CPU has AVX2 (submodule `avx2`, chosen at run time,
//! about 2.2–2.5× faster on [`dare_in_place`]), else a portable loop the compiler vectorizes.
//! The scalar [`philox4x32_10`] is the reference both are tested against.
//!
//! Every function is total: no input makes it panic. Element indices are taken modulo 2⁶⁴
//! (so `start + len` may wrap), densities and probabilities outside `(0, 1]` are clamped
//! (≥ 1 keeps everything, ≤ 0 or NaN drops everything).

#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;

/// Philox4x32 round multiplier for counter word 0 (Random123 `PHILOX_M4x32_0`).
const PHILOX_M4X32_0: u32 = 0xD251_1F53;
/// Philox4x32 round multiplier for counter word 2 (Random123 `PHILOX_M4x32_1`).
const PHILOX_M4X32_1: u32 = 0xCD9E_8D57;
/// Weyl key increment for key word 0: golden ratio (Random123 `PHILOX_W32_0`).
const PHILOX_W32_0: u32 = 0x9E37_79B9;
/// Weyl key increment for key word 1: √3 − 1 (Random123 `PHILOX_W32_1`).
const PHILOX_W32_1: u32 = 0xBB67_AE85;
/// Number of Philox rounds (the Random123 default, "Philox4x32-10").
const PHILOX_ROUNDS: usize = 10;

/// 64-bit FNV-1a offset basis.
const FNV64_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// 64-bit FNV prime.
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 2³², the scale from a probability to a u32 threshold.
const TWO_POW_32: f64 = 4_294_967_296.0;

/// Element indices are taken modulo 2⁶⁴, so block numbers (index / 4) are modulo 2⁶².
const BLOCK_MASK: u64 = (1 << 62) - 1;

/// Returns the (high, low) 32-bit halves of the 64-bit product `a · b`.
#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 round (Random123 `_philox4x32round`).
#[inline(always)]
fn philox_round(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M4X32_0, ctr[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M4X32_1, ctr[2]);
    [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]
}

/// Random123's Philox4x32 with 10 rounds: the counter-based bijection `ctr ↦ output` keyed by
/// `key`.
///
/// Round `r` (0-based) uses the key `key + r · (0x9E3779B9, 0xBB67AE85)` (wrapping), and the
/// round function multiplies counter words 0 and 2 by `0xD2511F53` and `0xCD9E8D57`. The result
/// equals Random123's `philox4x32(ctr, key)` (`philox4x32_R(10, …)`), word for word.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut ctr = ctr;
    let mut key = key;
    for r in 0..PHILOX_ROUNDS {
        if r > 0 {
            key = [
                key[0].wrapping_add(PHILOX_W32_0),
                key[1].wrapping_add(PHILOX_W32_1),
            ];
        }
        ctr = philox_round(ctr, key);
    }
    ctr
}

/// Feeds `bytes` into a running 64-bit FNV-1a hash `h`.
#[inline]
fn fnv1a64_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV64_PRIME);
    }
    h
}

/// The Philox key of one (seed, stream, tensor) mask.
///
/// Built by [`MaskKey::new`]; the two words are the low and high halves of the 64-bit FNV-1a
/// hash of `seed.to_le_bytes() ‖ stream.to_le_bytes() ‖ tensor_name.as_bytes()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaskKey([u32; 2]);

impl MaskKey {
    /// Derives the mask key of tensor `tensor_name` (the output GGUF name) for input model
    /// `stream` (its 0-based index among the merge inputs, base excluded, or the stream stored
    /// in a delta pack) under the user's `seed`.
    pub fn new(seed: u64, stream: u32, tensor_name: &str) -> MaskKey {
        let mut h = FNV64_OFFSET_BASIS;
        h = fnv1a64_update(h, &seed.to_le_bytes());
        h = fnv1a64_update(h, &stream.to_le_bytes());
        h = fnv1a64_update(h, tensor_name.as_bytes());
        MaskKey([h as u32, (h >> 32) as u32])
    }

    /// Wraps raw Philox key words (low, high), e.g. to reproduce a mask whose key was recorded
    /// elsewhere.
    pub fn from_words(words: [u32; 2]) -> MaskKey {
        MaskKey(words)
    }

    /// The Philox key words (low, high).
    pub fn words(&self) -> [u32; 2] {
        self.0
    }
}

/// The mask stream number reserved for the stochastic rounding key ([`RoundingKey`]).
pub const ROUNDING_STREAM: u32 = u32::MAX;

/// What the rounding stream adds to an element index (2⁶³): its counters are disjoint from
/// those of every mask of a tensor with fewer than 2⁶³ elements.
pub const ROUNDING_OFFSET: u64 = 1 << 63;

/// The Philox key of one tensor's stochastic rounding (the module's "stochastic rounding
/// stream"): [`MaskKey::new`]`(seed, `[`ROUNDING_STREAM`]`, tensor_name)`, drawn at element
/// indices offset by [`ROUNDING_OFFSET`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundingKey(MaskKey);

impl RoundingKey {
    /// The rounding key of tensor `tensor_name` (the output GGUF name) under `seed`.
    pub fn new(seed: u64, tensor_name: &str) -> RoundingKey {
        RoundingKey(MaskKey::new(seed, ROUNDING_STREAM, tensor_name))
    }

    /// The Philox key words (low, high).
    pub fn words(&self) -> [u32; 2] {
        self.0.words()
    }

    /// Fills `out[j]` with the rounding draw of element `start + j`: [`draws`] of element
    /// `start + j + 2⁶³` under this key.
    pub fn fill(&self, start: u64, out: &mut [u32]) {
        draws(&self.0, start.wrapping_add(ROUNDING_OFFSET), out);
    }
}

/// The keep threshold for `density` (the expected fraction of elements kept): element `i` is
/// kept iff `draw_i < threshold`.
///
/// Returns `None` when `density >= 1` (keep everything, no draws needed), otherwise
/// `Some(⌊density · 2³²⌋)` computed in `f64`. `density` is expected in `(0, 1]`; values `<= 0`
/// and NaN give `Some(0)`, which drops everything.
pub fn keep_threshold(density: f64) -> Option<u32> {
    if density >= 1.0 {
        return None;
    }
    let t = (density * TWO_POW_32).floor();
    if t.is_nan() || t <= 0.0 {
        Some(0)
    } else if t >= f64::from(u32::MAX) {
        Some(u32::MAX)
    } else {
        Some(t as u32)
    }
}

/// The four draws of block `k` (elements `4k..4k+3`).
#[inline(always)]
fn block_draws(key: &MaskKey, k: u64) -> [u32; 4] {
    philox4x32_10([k as u32, (k >> 32) as u32, 0, 0], key.0)
}

/// Number of Philox blocks computed together by [`philox_lanes`]. 16 lanes of u32 fill two
/// AVX2 registers per counter word; with 8 the compiler leaves the loop scalar (measured:
/// 4.2 vs 1.8 ns per element for [`dare_in_place`]).
const LANES: usize = 16;
/// Elements covered by one [`philox_lanes`] batch.
const BATCH: usize = 4 * LANES;

/// Draws of one batch, structure of arrays: `lanes[w][j]` is word `w` of block `k + j`, the
/// draw of element `4(k + j) + w`.
type Lanes = [[u32; LANES]; 4];

#[cfg(target_arch = "x86_64")]
mod avx2;

/// The draws of the [`LANES`] consecutive blocks `k, k+1, …` (block numbers modulo 2⁶²): the
/// AVX2 kernel where the CPU has it and the batch allows it, else [`philox_lanes_portable`].
#[inline(always)]
fn philox_lanes(key: &MaskKey, k: u64) -> Lanes {
    #[cfg(target_arch = "x86_64")]
    if let (Some(cpu), true) = (Avx2::get(), avx2::uniform_high_word(k)) {
        return avx2::philox_lanes(cpu, key, k);
    }
    philox_lanes_portable(key, k)
}

/// [`philox_lanes`] without explicit SIMD.
///
/// The same function as [`philox4x32_10`], evaluated lane-wise (structure of arrays) so the
/// independent blocks interleave and the compiler vectorizes the 32×32→64-bit multiplies;
/// the scalar [`philox4x32_10`] is its reference in the tests.
#[inline(always)]
fn philox_lanes_portable(key: &MaskKey, k: u64) -> Lanes {
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    let mut c2 = [0u32; LANES];
    let mut c3 = [0u32; LANES];
    for (j, (lo, hi)) in c0.iter_mut().zip(c1.iter_mut()).enumerate() {
        let b = k.wrapping_add(j as u64) & BLOCK_MASK;
        *lo = b as u32;
        *hi = (b >> 32) as u32;
    }
    let [mut k0, mut k1] = key.0;
    for r in 0..PHILOX_ROUNDS {
        if r > 0 {
            k0 = k0.wrapping_add(PHILOX_W32_0);
            k1 = k1.wrapping_add(PHILOX_W32_1);
        }
        for j in 0..LANES {
            let (hi0, lo0) = mulhilo(PHILOX_M4X32_0, c0[j]);
            let (hi1, lo1) = mulhilo(PHILOX_M4X32_1, c2[j]);
            let n0 = hi1 ^ c1[j] ^ k0;
            let n2 = hi0 ^ c3[j] ^ k1;
            c0[j] = n0;
            c1[j] = lo1;
            c2[j] = n2;
            c3[j] = lo0;
        }
    }
    [c0, c1, c2, c3]
}

/// A batch's draws in element order: `out[4j + w] = lanes[w][j]`.
#[inline(always)]
fn element_order(lanes: &Lanes) -> [u32; BATCH] {
    let mut out = [0u32; BATCH];
    for j in 0..LANES {
        for w in 0..4 {
            out[4 * j + w] = lanes[w][j];
        }
    }
    out
}

/// The draws of one piece of a range (see [`for_each_batch`]).
enum Draws<'a> {
    /// A whole batch in lane layout: element `offset + 4j + w` has draw `lanes[w][j]`.
    Batch(&'a Lanes),
    /// A few elements in element order: element `offset + j` has draw `draws[j]`.
    Piece(&'a [u32]),
}

/// Visits the draws of elements `start..start + len` (indices modulo 2⁶⁴) in counter-aligned
/// pieces, each Philox block computed exactly once: `f(offset, draws)` for consecutive pieces
/// covering the range once — whole batches of [`LANES`] blocks as [`Draws::Batch`], the
/// unaligned head and the tail as [`Draws::Piece`]. Kernels take batches in lane layout
/// because comparing there and writing in element order vectorizes better than transposing
/// first.
#[inline(always)]
fn for_each_batch(key: &MaskKey, start: u64, len: usize, mut f: impl FnMut(usize, Draws<'_>)) {
    if len == 0 {
        return;
    }
    let mut k = start >> 2;
    let mut pos = 0usize;
    let head = (start & 3) as usize;
    if head != 0 {
        let n = (4 - head).min(len);
        let d = block_draws(key, k);
        f(0, Draws::Piece(&d[head..head + n]));
        pos = n;
        k = (k + 1) & BLOCK_MASK;
    }
    while len - pos >= BATCH {
        f(pos, Draws::Batch(&philox_lanes(key, k)));
        pos += BATCH;
        k = k.wrapping_add(LANES as u64) & BLOCK_MASK;
    }
    while len - pos >= 4 {
        let d = block_draws(key, k);
        f(pos, Draws::Piece(&d));
        pos += 4;
        k = (k + 1) & BLOCK_MASK;
    }
    if pos < len {
        let d = block_draws(key, k);
        f(pos, Draws::Piece(&d[..len - pos]));
    }
}

/// [`for_each_batch`] with every piece in element order (batches transposed).
#[inline(always)]
fn for_each_block(key: &MaskKey, start: u64, len: usize, mut f: impl FnMut(usize, &[u32])) {
    for_each_batch(key, start, len, |pos, d| match d {
        Draws::Batch(lanes) => f(pos, &element_order(lanes)),
        Draws::Piece(d) => f(pos, d),
    });
}

/// Fills `out[j]` with the u32 draw of element `start + j` (index modulo 2⁶⁴).
///
/// Element `i` takes word `i % 4` of `philox4x32_10([i/4 low, i/4 high, 0, 0], key)`. Any
/// `start` and length are accepted; the result does not depend on how a range is split.
pub fn draws(key: &MaskKey, start: u64, out: &mut [u32]) {
    for_each_block(key, start, out.len(), |pos, d| {
        out[pos..pos + d.len()].copy_from_slice(d);
    });
}

/// Runs `apply(value, draw < threshold)` on each element of `values` (elements
/// `start..start + values.len()`) and returns the sum of what `apply` returned (the number
/// kept, or of non-zero results: whatever the caller counts).
///
/// Whole batches go through `batches(k, values)` (consecutive batches of 64 elements, the
/// first at block `k`, block numbers modulo 2⁶²), which must do the same as `apply` on each
/// and return the same sum: [`apply_lanes`] on each through [`each_batch`], or a kernel
/// specialised for one `apply`.
///
/// Written out rather than through [`for_each_batch`]: with the batch loop and the compare in
/// one function body the compiler keeps the lanes in registers (measured 1.8 vs 3.0 ns per
/// element for [`dare_in_place`]).
#[inline(always)]
fn threshold_each<T>(
    key: &MaskKey,
    threshold: u32,
    start: u64,
    values: &mut [T],
    apply: impl Fn(&mut T, bool) -> u32,
    batches: impl FnOnce(u64, &mut [[T; BATCH]]) -> u64,
) -> u64 {
    let len = values.len();
    // Unaligned head up to the next block boundary.
    let head = (((4 - (start & 3)) & 3) as usize).min(len);
    let mut kept = 0u64;
    let mut piece = |pos: usize, d: &[u32], values: &mut [T]| {
        for (v, &r) in values[pos..pos + d.len()].iter_mut().zip(d) {
            kept += u64::from(apply(v, r < threshold));
        }
    };
    if head > 0 {
        let d = block_draws(key, start >> 2);
        let from = (start & 3) as usize;
        piece(0, &d[from..from + head], values);
    }
    let k = (start.wrapping_add(head as u64) >> 2) & BLOCK_MASK;
    let (body, tail) = values[head..].split_at_mut((len - head) / BATCH * BATCH);
    let (whole, _) = body.as_chunks_mut::<BATCH>();
    let n = whole.len() as u64;
    let batch_kept = batches(k, whole);
    let mut k = k.wrapping_add(n * LANES as u64) & BLOCK_MASK;
    let mut pos = 0;
    while pos < tail.len() {
        let d = block_draws(key, k);
        let n = (tail.len() - pos).min(4);
        piece(pos, &d[..n], tail);
        pos += n;
        k = (k + 1) & BLOCK_MASK;
    }
    kept + batch_kept
}

/// Runs `batch(k, values)` on consecutive batches, the first at block `k` (block numbers modulo
/// 2⁶²), and returns the sum of what it returned.
#[inline(always)]
fn each_batch<T>(
    mut k: u64,
    batches: &mut [[T; BATCH]],
    mut batch: impl FnMut(u64, &mut [T; BATCH]) -> u32,
) -> u64 {
    let mut sum = 0u64;
    for v in batches {
        sum += u64::from(batch(k, v));
        k = k.wrapping_add(LANES as u64) & BLOCK_MASK;
    }
    sum
}

/// The generic batch step of [`threshold_each`]: `apply(value, draw < threshold)` on the 64
/// elements of blocks `k..k + 16`, comparing in lane layout and writing in element order.
#[inline(always)]
fn apply_lanes<T>(
    key: &MaskKey,
    threshold: u32,
    k: u64,
    values: &mut [T; BATCH],
    apply: &impl Fn(&mut T, bool) -> u32,
) -> u32 {
    let lanes = philox_lanes(key, k);
    let mut count = 0u32;
    for j in 0..LANES {
        for w in 0..4 {
            count += apply(&mut values[4 * j + w], lanes[w][j] < threshold);
        }
    }
    count
}

/// DARE drop-and-rescale of `values`, the elements `start..start + values.len()` of one
/// tensor's delta: each dropped element becomes `0.0`, each kept one is multiplied by `scale`.
/// Returns the number of kept elements.
///
/// `density` is the keep probability, expected in `(0, 1]` (see [`keep_threshold`]);
/// `density >= 1` keeps (and scales) every element without drawing, `density <= 0` drops every
/// element. The caller chooses `scale` (e.g. `1 / density` for DARE's inverse rescale).
pub fn dare_in_place(
    key: &MaskKey,
    density: f64,
    start: u64,
    values: &mut [f32],
    scale: f32,
) -> u64 {
    dare::<false>(key, density, start, values, scale)
}

/// [`dare_in_place`], returning instead the number of elements that are non-zero afterwards
/// (NaN counts as non-zero), which the merge report needs: counted on the way rather than in
/// another pass over `values`.
pub fn dare_in_place_nonzeros(
    key: &MaskKey,
    density: f64,
    start: u64,
    values: &mut [f32],
    scale: f32,
) -> u64 {
    dare::<true>(key, density, start, values, scale)
}

/// DARE in place, counting kept elements or (`NONZEROS`) non-zero results.
#[inline(always)]
fn dare<const NONZEROS: bool>(
    key: &MaskKey,
    density: f64,
    start: u64,
    values: &mut [f32],
    scale: f32,
) -> u64 {
    let count = |v: f32, keep: bool| u32::from(if NONZEROS { v != 0.0 } else { keep });
    let Some(threshold) = keep_threshold(density) else {
        for v in values.iter_mut() {
            *v *= scale;
        }
        return values.iter().map(|&v| u64::from(count(v, true))).sum();
    };
    if threshold == 0 {
        values.fill(0.0);
        return 0;
    }
    let apply = |v: &mut f32, keep: bool| {
        *v = if keep { *v * scale } else { 0.0 };
        count(*v, keep)
    };
    let portable = |k, batch: &mut _| apply_lanes(key, threshold, k, batch, &apply);
    threshold_each(key, threshold, start, values, apply, |k, batches| {
        #[cfg(target_arch = "x86_64")]
        if let Some(cpu) = Avx2::get() {
            return avx2::dare::<NONZEROS>(cpu, key, threshold, k, batches, scale, portable);
        }
        each_batch(k, batches, portable)
    })
}

/// Writes the DARE keep mask of elements `start..start + out.len()` at `density` into `out`
/// (`true` = kept) and returns the number kept: the same mask [`dare_in_place`] applies, e.g.
/// to compact kept values into a delta pack or scatter them back.
///
/// `density` is expected in `(0, 1]`; `>= 1` keeps all, `<= 0` keeps none.
pub fn keep_mask(key: &MaskKey, density: f64, start: u64, out: &mut [bool]) -> u64 {
    let Some(threshold) = keep_threshold(density) else {
        out.fill(true);
        return out.len() as u64;
    };
    if threshold == 0 {
        out.fill(false);
        return 0;
    }
    let apply = |o: &mut bool, keep: bool| {
        *o = keep;
        u32::from(keep)
    };
    threshold_each(key, threshold, start, out, apply, |k, batches| {
        each_batch(k, batches, |k, batch| {
            apply_lanes(key, threshold, k, batch, &apply)
        })
    })
}

/// Per-element Bernoulli keep decisions (DELLA): element `start + j` is kept iff its draw is
/// below `⌊probs[j] · 2³²⌋`, written to `out[j]`.
///
/// `probs[j] >= 1` is always kept, `probs[j] <= 0` (or NaN) never. Only the first
/// `min(probs.len(), out.len())` elements are decided; any further entries of `out` are left
/// unchanged.
pub fn keep_with_probability(key: &MaskKey, start: u64, probs: &[f32], out: &mut [bool]) {
    let n = probs.len().min(out.len());
    for_each_block(key, start, n, |pos, d| {
        let p = &probs[pos..pos + d.len()];
        for ((o, &r), &p) in out[pos..pos + d.len()].iter_mut().zip(d).zip(p) {
            *o = match keep_threshold(f64::from(p)) {
                None => true,
                Some(t) => r < t,
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::simd::with_portable;
    use proptest::prelude::*;

    /// Both batch paths: the AVX2 kernel where the CPU has AVX2 (`false`), the portable loop.
    const PATHS: [bool; 2] = [false, true];

    /// Known-answer vectors for philox4x32 10 from Random123 `tests/kat_vectors`
    /// (github.com/DEShawResearch/random123, commit 9545ff6413f258be2f04c1d319d99aaef7521150):
    /// `philox4x32 10 CTR(4 words) KEY(2 words) EXPECTED(4 words)`.
    const PHILOX_KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0x0000_0000, 0x0000_0000, 0x0000_0000, 0x0000_0000],
            [0x0000_0000, 0x0000_0000],
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
        ),
        (
            [0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff],
            [0xffff_ffff, 0xffff_ffff],
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
        ),
        (
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0],
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
        ),
    ];

    #[test]
    fn philox_known_answers() {
        for (ctr, key, want) in PHILOX_KAT {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "ctr {ctr:08x?} key {key:08x?}"
            );
        }
    }

    fn fnv1a64(bytes: &[u8]) -> u64 {
        fnv1a64_update(FNV64_OFFSET_BASIS, bytes)
    }

    #[test]
    fn fnv1a64_known_answers() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn mask_key_layout() {
        // The key is FNV-1a over seed LE ‖ stream LE ‖ name, split low/high.
        let seed = 0x0123_4567_89ab_cdef_u64;
        let stream = 7u32;
        let name = "blk.0.attn_q.weight";
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&seed.to_le_bytes());
        bytes.extend_from_slice(&stream.to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        let h = fnv1a64(&bytes);
        let k = MaskKey::new(seed, stream, name);
        assert_eq!(k.words(), [h as u32, (h >> 32) as u32]);
        assert_eq!(MaskKey::from_words(k.words()), k);
    }

    #[test]
    fn mask_key_pinned() {
        // Pinned values (computed by an independent Python FNV-1a): changing them would make
        // existing delta packs unreadable.
        assert_eq!(MaskKey::new(0, 0, "").words(), MASK_KEY_0_0_EMPTY);
        assert_eq!(
            MaskKey::new(42, 1, "blk.0.attn_q.weight").words(),
            MASK_KEY_42_1_ATTN_Q
        );
    }

    #[test]
    fn rounding_stream_is_its_own() {
        let name = "blk.0.ffn_down.weight";
        let key = RoundingKey::new(42, name);
        let mask_key = MaskKey::new(42, ROUNDING_STREAM, name);
        assert_eq!(key.words(), mask_key.words());
        // Element i is Philox at block i / 4 + 2^61: word 1 carries bit 29 …
        let mut got = [0u32; 12];
        key.fill(4, &mut got);
        for (j, &g) in got.iter().enumerate() {
            let i = 4 + j as u64;
            let k = (i >> 2) + (1 << 61);
            let want = philox4x32_10([k as u32, (k >> 32) as u32, 0, 0], key.words());
            assert_eq!(g, want[(i % 4) as usize], "element {i}");
        }
        // … so it is not the mask of the same key, and does not depend on how it is split.
        let mut mask = [0u32; 12];
        draws(&mask_key, 4, &mut mask);
        assert_ne!(got, mask);
        let mut long = vec![0u32; 300];
        key.fill(1, &mut long);
        let mut parts = vec![0u32; 300];
        key.fill(1, &mut parts[..77]);
        key.fill(78, &mut parts[77..]);
        assert_eq!(long, parts);
        assert_eq!(&long[3..15], &got[..]);
        // Seeds and tensors give different streams.
        let mut other = [0u32; 12];
        RoundingKey::new(43, name).fill(4, &mut other);
        assert_ne!(other, got);
        RoundingKey::new(42, "output.weight").fill(4, &mut other);
        assert_ne!(other, got);
    }

    const MASK_KEY_0_0_EMPTY: [u32; 2] = [0x1d10_6495, 0x5467_b0da];
    const MASK_KEY_42_1_ATTN_Q: [u32; 2] = [0x9f6a_254e, 0x5616_169a];

    #[test]
    fn draws_pinned() {
        // End-to-end pinned draws of elements 0..10 for (42, 1, "blk.0.attn_q.weight"),
        // computed by an independent Python Philox4x32-10 + FNV-1a (itself checked against
        // the Random123 vectors above).
        let key = MaskKey::new(42, 1, "blk.0.attn_q.weight");
        let want = [
            0xc061_352a,
            0xcbb8_f338,
            0xbb48_dc9f,
            0x7442_5f77,
            0x7f37_f86a,
            0xcdab_48d4,
            0x1609_f252,
            0x8704_cd54,
            0xe12b_61ea,
            0x16f9_a7ea,
        ];
        let mut out = [0u32; 10];
        draws(&key, 0, &mut out);
        assert_eq!(out, want);
        let mut mask = [false; 10];
        assert_eq!(keep_mask(&key, 0.5, 0, &mut mask), 4);
        let keep = [
            false, false, false, true, true, false, true, false, false, true,
        ];
        assert_eq!(mask, keep);
    }

    #[test]
    fn threshold_edges() {
        assert_eq!(keep_threshold(1.0), None);
        assert_eq!(keep_threshold(2.5), None);
        assert_eq!(keep_threshold(f64::INFINITY), None);
        assert_eq!(keep_threshold(0.5), Some(1 << 31));
        assert_eq!(keep_threshold(0.25), Some(1 << 30));
        assert_eq!(keep_threshold(0.1), Some(429_496_729));
        assert_eq!(keep_threshold(1.0 - f64::EPSILON / 2.0), Some(u32::MAX));
        assert_eq!(keep_threshold(0.0), Some(0));
        assert_eq!(keep_threshold(-3.0), Some(0));
        assert_eq!(keep_threshold(f64::NEG_INFINITY), Some(0));
        assert_eq!(keep_threshold(f64::NAN), Some(0));
        assert_eq!(keep_threshold(1e-300), Some(0));
    }

    /// Reference draw of element `i`, straight from the spec.
    fn draw_ref(key: &MaskKey, i: u64) -> u32 {
        let k = i / 4;
        philox4x32_10([k as u32, (k >> 32) as u32, 0, 0], key.words())[(i % 4) as usize]
    }

    #[test]
    fn draws_match_reference() {
        let key = MaskKey::new(1234, 3, "output.weight");
        for start in [0u64, 1, 2, 3, 4, 5, 1 << 32, (1 << 34) + 3, u64::MAX - 9] {
            for len in (0..=40usize).chain([63, 64, 65, 100, 131]) {
                let mut out = vec![0u32; len];
                draws(&key, start, &mut out);
                for (j, &d) in out.iter().enumerate() {
                    assert_eq!(d, draw_ref(&key, start.wrapping_add(j as u64)));
                }
            }
        }
    }

    #[test]
    fn lanes_match_scalar_philox() {
        let key = MaskKey::new(77, 5, "blk.9.attn_output.weight");
        let mut s = 17u64;
        let mut ks: Vec<u64> = (0..200).map(|_| splitmix64(&mut s) & BLOCK_MASK).collect();
        // Around each multiple of 2³² blocks the high counter word changes inside a batch
        // (the AVX2 kernel hands those to the portable loop).
        for edge in [1u64 << 32, 7 << 32, BLOCK_MASK + 1] {
            ks.extend((edge - 17..edge + 1).map(|k| k & BLOCK_MASK));
        }
        ks.extend([0, 1, BLOCK_MASK - 2, BLOCK_MASK]);
        let portable = |key: &MaskKey, k| philox_lanes_portable(key, k);
        let dispatched = |key: &MaskKey, k| philox_lanes(key, k);
        for lanes in [&portable as &dyn Fn(&MaskKey, u64) -> Lanes, &dispatched] {
            for &k in &ks {
                let got = element_order(&lanes(&key, k));
                for j in 0..LANES {
                    let b = k.wrapping_add(j as u64) & BLOCK_MASK;
                    assert_eq!(
                        got[4 * j..4 * j + 4],
                        block_draws(&key, b),
                        "k {k} lane {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn dare_across_high_word_boundaries() {
        // Batches on both sides of and across a change of the counter's high word.
        let key = MaskKey::new(3, 1, "blk.1.ffn_up.weight");
        for edge in [1u64 << 34, 5 << 34] {
            for offset in [0u64, 4, 36, 60, 64, 3] {
                let start = edge - 256 + offset;
                let values = test_values(700, offset);
                let mut want = values.clone();
                let kw = dare_ref(&key, 0.3, start, &mut want, 3.0);
                for portable in PATHS {
                    let mut got = values.clone();
                    let kg =
                        with_portable(portable, || dare_in_place(&key, 0.3, start, &mut got, 3.0));
                    assert_eq!(kg, kw, "start {start} portable {portable}");
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "start {start} portable {portable}"
                    );
                }
            }
        }
    }

    #[test]
    fn draws_use_high_counter_word() {
        // Blocks 0 and 2^32 differ only in the counter's high word.
        let key = MaskKey::new(5, 0, "x");
        let mut a = [0u32; 4];
        let mut b = [0u32; 4];
        draws(&key, 0, &mut a);
        draws(&key, 4 << 32, &mut b);
        assert_ne!(a, b);
        assert_eq!(b, philox4x32_10([0, 1, 0, 0], key.words()));
    }

    /// Scalar reference of DARE, element by element.
    fn dare_ref(key: &MaskKey, density: f64, start: u64, values: &mut [f32], scale: f32) -> u64 {
        let t = keep_threshold(density);
        let mut kept = 0;
        for (j, v) in values.iter_mut().enumerate() {
            let keep = match t {
                None => true,
                Some(t) => draw_ref(key, start.wrapping_add(j as u64)) < t,
            };
            if keep {
                *v *= scale;
                kept += 1;
            } else {
                *v = 0.0;
            }
        }
        kept
    }

    /// Deterministic test data without a `rand` dependency.
    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn test_values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| (splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn dare_matches_reference() {
        let key = MaskKey::new(99, 2, "blk.3.ffn_down.weight");
        for density in [0.0, 0.01, 0.1, 0.5, 0.9, 1.0] {
            for start in [0u64, 1, 6, 1_000_003] {
                let v0 = test_values(257, start);
                let mut b = v0.clone();
                let kb = dare_ref(&key, density, start, &mut b, 3.0);
                for portable in PATHS {
                    let mut a = v0.clone();
                    let ka = with_portable(portable, || {
                        dare_in_place(&key, density, start, &mut a, 3.0)
                    });
                    assert_eq!(ka, kb, "portable {portable}");
                    assert_eq!(a, b, "portable {portable}");
                }
            }
        }
    }

    #[test]
    fn dare_counting_non_zeros_matches_reference() {
        let key = MaskKey::new(41, 1, "blk.2.ffn_gate.weight");
        for density in [0.0, 0.05, 0.5, 1.0] {
            for start in [0u64, 3, 64, 999_999, (1 << 34) - 100] {
                // Some values are zero already, so non-zeros and kept differ.
                let mut v0 = test_values(1000, start ^ 5);
                for v in v0.iter_mut().step_by(7) {
                    *v = 0.0;
                }
                let mut b = v0.clone();
                dare_ref(&key, density, start, &mut b, 2.5);
                for portable in PATHS {
                    let mut a = v0.clone();
                    let nonzero = with_portable(portable, || {
                        dare_in_place_nonzeros(&key, density, start, &mut a, 2.5)
                    });
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
                    assert_eq!(nonzero, b.iter().filter(|v| **v != 0.0).count() as u64);
                }
            }
        }
    }

    #[test]
    fn dare_chunking_independent() {
        let key = MaskKey::new(7, 1, "blk.0.attn_v.weight");
        let v0 = test_values(10_000, 1);
        let mut whole = v0.clone();
        let kept_whole = dare_in_place(&key, 0.3, 0, &mut whole, 1.0 / 0.3);
        for trial in 0..20u64 {
            let mut s = trial;
            let mut chunked = v0.clone();
            let mut kept = 0;
            let mut pos = 0usize;
            while pos < chunked.len() {
                let n = (1 + splitmix64(&mut s) % 700) as usize;
                let end = (pos + n).min(chunked.len());
                kept += dare_in_place(&key, 0.3, pos as u64, &mut chunked[pos..end], 1.0 / 0.3);
                pos = end;
            }
            assert_eq!(kept, kept_whole);
            assert_eq!(chunked, whole);
        }
    }

    #[test]
    fn kept_fraction_is_binomial() {
        let n = 1_000_000usize;
        let key = MaskKey::new(2024, 0, "token_embd.weight");
        let mut mask = vec![false; n];
        for density in [0.5, 0.1, 0.01] {
            let kept = keep_mask(&key, density, 0, &mut mask) as f64;
            assert_eq!(kept as usize, mask.iter().filter(|&&k| k).count());
            let mean = n as f64 * density;
            let sigma = (n as f64 * density * (1.0 - density)).sqrt();
            assert!(
                (kept - mean).abs() < 5.0 * sigma,
                "density {density}: kept {kept}, expected {mean} ± {sigma}"
            );
            let mut values = vec![1.0f32; n];
            assert_eq!(
                dare_in_place(&key, density, 0, &mut values, 2.0) as f64,
                kept
            );
            for (v, &m) in values.iter().zip(&mask) {
                assert_eq!(*v, if m { 2.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn masks_differ_by_stream_name_and_seed() {
        let n = 4096;
        let mask_of = |seed, stream, name: &str| {
            let mut m = vec![false; n];
            keep_mask(&MaskKey::new(seed, stream, name), 0.5, 0, &mut m);
            m
        };
        let base = mask_of(1, 0, "blk.0.attn_k.weight");
        assert_eq!(base, mask_of(1, 0, "blk.0.attn_k.weight"));
        assert_ne!(base, mask_of(1, 1, "blk.0.attn_k.weight"));
        assert_ne!(base, mask_of(1, 0, "blk.1.attn_k.weight"));
        assert_ne!(base, mask_of(2, 0, "blk.0.attn_k.weight"));
    }

    #[test]
    fn density_one_keeps_all_and_zero_drops_all() {
        let key = MaskKey::new(0, 0, "w");
        let v0 = test_values(103, 3);
        let mut v = v0.clone();
        assert_eq!(dare_in_place(&key, 1.0, 5, &mut v, 0.5), 103);
        for (a, b) in v.iter().zip(&v0) {
            assert_eq!(*a, b * 0.5);
        }
        let mut v = v0.clone();
        assert_eq!(dare_in_place(&key, 0.0, 5, &mut v, 0.5), 0);
        assert!(v.iter().all(|&x| x == 0.0));
        let mut v = v0;
        assert_eq!(dare_in_place(&key, f64::NAN, 5, &mut v, 0.5), 0);
        assert!(v.iter().all(|&x| x == 0.0));
        let mut m = vec![false; 9];
        assert_eq!(keep_mask(&key, 1.0, 0, &mut m), 9);
        assert!(m.iter().all(|&k| k));
        assert_eq!(keep_mask(&key, -1.0, 0, &mut m), 0);
        assert!(m.iter().all(|&k| !k));
    }

    #[test]
    fn keep_with_probability_matches_threshold() {
        let key = MaskKey::new(11, 4, "blk.2.ffn_up.weight");
        let n = 1001;
        let start = 3;
        let probs: Vec<f32> = (0..n)
            .map(|j| match j % 5 {
                0 => 1.0,
                1 => 0.0,
                2 => -0.5,
                3 => 1.5,
                _ => (j as f32) / n as f32,
            })
            .collect();
        let mut out = vec![false; n];
        keep_with_probability(&key, start, &probs, &mut out);
        for (j, (&p, &o)) in probs.iter().zip(&out).enumerate() {
            let d = draw_ref(&key, start + j as u64);
            let want = match keep_threshold(f64::from(p)) {
                None => true,
                Some(t) => d < t,
            };
            assert_eq!(o, want, "element {j}, p {p}");
        }
        // A uniform probability gives the same mask as keep_mask.
        let probs = vec![0.25f32; n];
        keep_with_probability(&key, start, &probs, &mut out);
        let mut m = vec![false; n];
        keep_mask(&key, 0.25, start, &mut m);
        assert_eq!(out, m);
    }

    #[test]
    fn keep_with_probability_mismatched_lengths() {
        let key = MaskKey::new(0, 0, "w");
        let mut out = vec![true; 10];
        keep_with_probability(&key, 0, &[0.0; 6], &mut out);
        assert_eq!(&out[..6], &[false; 6]);
        assert_eq!(&out[6..], &[true; 4]);
        let mut out = vec![true; 3];
        keep_with_probability(&key, 0, &[0.0; 6], &mut out);
        assert_eq!(out, [false; 3]);
    }

    #[test]
    fn wraps_at_end_of_index_space() {
        // Indices are modulo 2^64: the element after u64::MAX is element 0.
        let key = MaskKey::new(1, 2, "w");
        let mut a = [0u32; 6];
        draws(&key, u64::MAX - 1, &mut a);
        let mut b = [0u32; 4];
        draws(&key, 0, &mut b);
        assert_eq!(&a[2..], &b);
        let mut v = vec![1.0f32; 10];
        dare_in_place(&key, 0.5, u64::MAX - 3, &mut v, 2.0);
    }

    proptest! {
        #[test]
        fn chunked_equals_unchunked(
            seed in any::<u64>(),
            stream in any::<u32>(),
            start in prop_oneof![0u64..1_000_000, any::<u64>()],
            len in 0usize..600,
            split in 0usize..600,
            density in 0.0f64..1.2,
        ) {
            let split = split.min(len);
            let key = MaskKey::new(seed, stream, "blk.0.ffn_gate.weight");
            let v0 = test_values(len, seed);
            let scale = 1.0 / density.max(1e-3) as f32;
            let mut whole = v0.clone();
            let k_whole = dare_in_place(&key, density, start, &mut whole, scale);
            let mut parts = v0;
            let (lo, hi) = parts.split_at_mut(split);
            let k_parts = dare_in_place(&key, density, start, lo, scale)
                + dare_in_place(&key, density, start.wrapping_add(split as u64), hi, scale);
            prop_assert_eq!(k_whole, k_parts);
            prop_assert_eq!(&whole, &parts);

            let mut d_whole = vec![0u32; len];
            draws(&key, start, &mut d_whole);
            let mut d_parts = vec![0u32; len];
            let (lo, hi) = d_parts.split_at_mut(split);
            draws(&key, start, lo);
            draws(&key, start.wrapping_add(split as u64), hi);
            prop_assert_eq!(d_whole, d_parts);
        }
    }
}
