//! On-grid requantization: merged values re-encoded on the base block's own quantization grid.
//!
//! When a merged tensor keeps the base tensor's type, requantizing it afresh with ggml's
//! quantizer ([`Requant::Full`]) is not the identity: K-quants search new scales, every element
//! is rounded again, and a delta far below the quantization step is rounded away. On the grid
//! ([`Requant::Grid`], [`Requant::GridStochastic`]) instead:
//!
//! * a block in which no element changed keeps the base's bytes exactly;
//! * a block in which some elements changed keeps the base block's scales and mins (for
//!   K-quants and IQ4_XS its sub-block scales too) and only the changed elements get new codes
//!   on that grid — the nearest code, or stochastic rounding (up with probability equal to the
//!   fractional position between the two neighbouring levels, so the expected value is the
//!   merged value however small the change); unchanged elements keep their codes bit for bit;
//! * a block where a changed value lies beyond the extreme levels by more than half a step, or
//!   falls in a group whose step is 0, is quantized the usual way (ggml's quantizer, the same
//!   bytes [`Requant::Full`] gives that block) and counted ([`GridCounts::fallback`]).
//!
//! "Changed" means the merged value differs from the base's decoded value (`!=` on `f32`, so
//! ±0 are the same): an element a DARE mask dropped is unchanged.
//!
//! # What lives here
//!
//! * [`Requant`] — the mode, with its names (`full`, `grid`, `grid-stochastic`) and the
//!   default ([`Requant::DEFAULT`]).
//! * [`GridCodec`] and [`GRIDS`] — the one table: per supported type a small view of a block
//!   (per group of elements its `(step, offset)` with value = step · level + offset, the
//!   type's [`Levels`], and how to unpack every element's code and pack them back). Supported:
//!   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (codes −127..127 only: ggml's AVX2 dot products misbehave on
//!   −128), Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS (non-uniform levels: nearest or
//!   stochastic between neighbouring levels). Other types have no row: callers requantize them
//!   in full.
//! * [`requantize`] — whole blocks: the procedure above, returning [`GridCounts`]. Per changed
//!   block the codes are unpacked, the changed ones placed in one branch-free pass over the
//!   block (positions in `f32`), and packed back.
//!
//! What does not live here: the random draws. Stochastic rounding takes them from the caller
//! ([`Rounding::Stochastic`]); the merge layer derives them from the Philox stream of
//! `DESIGN.md` keyed by (seed, tensor, element) (`crate::merge::mask::RoundingKey`), so a
//! result does not depend on threads or chunking.
//!
//! The bit layouts follow ggml's `dequantize_row_*` (ggml-quants.c); the tests decode every
//! type's blocks through this view and through ggml's dequantizer and compare.

use half::f16;

use crate::format::GgmlType;
use crate::quant::codec;

/// How merged tensors whose output type is the base tensor's type are requantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Requant {
    /// Every changed chunk is quantized afresh by ggml's quantizer (new scales, every element
    /// rounded again); rows left unchanged keep the base's bytes.
    Full,
    /// On the base's grid: changed elements move to the nearest code of their block's grid.
    Grid,
    /// On the base's grid: changed elements are rounded stochastically between the two
    /// neighbouring codes, so the expected change equals the merged delta.
    GridStochastic,
}

impl Requant {
    /// Every mode, in the order the help text lists them.
    pub const ALL: [Requant; 3] = [Requant::Full, Requant::Grid, Requant::GridStochastic];

    /// The mode when none is given (merges, `apply`, runtime switches): grid-stochastic, the
    /// only mode that keeps a dense delta through a 4-bit output (docs/results.md, experiment
    /// 6: task arithmetic into Q4_1/Q4_K_M keeps both abilities, full and grid lose them) and
    /// the fastest runtime switch on K-quants (no scale search).
    pub const DEFAULT: Requant = Requant::GridStochastic;

    /// The name on the command line and in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Requant::Full => "full",
            Requant::Grid => "grid",
            Requant::GridStochastic => "grid-stochastic",
        }
    }

    /// The mode called `name` (as [`Requant::name`] writes it; `_` accepted for `-`).
    pub fn from_name(name: &str) -> Option<Requant> {
        let name = name.replace('_', "-");
        Requant::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether this mode works on the base's grid.
    pub fn on_grid(self) -> bool {
        self != Requant::Full
    }
}

impl Default for Requant {
    fn default() -> Requant {
        Requant::DEFAULT
    }
}

impl std::fmt::Display for Requant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a type's codes map to levels (ascending in the code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Levels {
    /// Level of code `c` is `c − zero`, for codes `0..count`; codes below `lowest` are read
    /// but never written (Q8_0's −128).
    Uniform {
        /// The code of level 0.
        zero: u8,
        /// Number of codes.
        count: u16,
        /// The lowest code ever written.
        lowest: u8,
    },
    /// Level of code `c` is `table[c]` (IQ4_NL's non-uniform levels).
    Table(&'static [i8; 16]),
}

impl Levels {
    /// Number of codes.
    pub fn count(self) -> usize {
        match self {
            Levels::Uniform { count, .. } => usize::from(count),
            Levels::Table(t) => t.len(),
        }
    }

    /// The lowest code [`requantize`] writes.
    pub fn lowest(self) -> u8 {
        match self {
            Levels::Uniform { lowest, .. } => lowest,
            Levels::Table(_) => 0,
        }
    }

    /// The level of code `c`.
    pub fn level(self, c: u8) -> f32 {
        match self {
            Levels::Uniform { zero, .. } => f32::from(i16::from(c) - i16::from(zero)),
            Levels::Table(t) => f32::from(t[usize::from(c)]),
        }
    }
}

/// ggml's IQ4_NL / IQ4_XS levels (`kvalues_iq4nl`).
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// One group of a block's elements: value = `step · level + offset`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Affine {
    /// Value per level (the group's scale; may be negative or zero).
    pub step: f32,
    /// Value at level 0 (minus the group's min for types with mins; 0 otherwise).
    pub offset: f32,
}

/// The grid view of one ggml block type: a row of [`GRIDS`].
///
/// A block's codes are unpacked to one byte per element and packed back whole; `pack` after
/// `unpack` gives back every bit of the code fields, so unchanged elements keep their codes.
#[derive(Debug)]
pub struct GridCodec {
    /// The type.
    pub ty: GgmlType,
    /// Elements per block.
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
    /// Consecutive elements sharing one [`Affine`] (the block, or a K-quant sub-block).
    pub group: usize,
    /// Codes → levels.
    pub levels: Levels,
    /// Writes each group's `(step, offset)` of a block (`block / group` entries).
    pub groups: fn(&[u8], &mut [Affine]),
    /// Writes the code of every element of a block (`block` entries).
    pub unpack: fn(&[u8], &mut [u8]),
    /// Writes every element's code into a block's code fields (scales and mins untouched).
    pub pack: fn(&[u8], &mut [u8]),
}

/// Most groups in a block (16-element sub-blocks of a 256-element super-block).
const MAX_GROUPS: usize = 16;
/// Most elements in a block.
pub const MAX_BLOCK: usize = 256;

impl GridCodec {
    /// Decodes a block through this view (the reference the tests hold against ggml's
    /// dequantizer; merges decode with ggml).
    pub fn decode(&self, block: &[u8], out: &mut [f32]) {
        let mut affine = [Affine::default(); MAX_GROUPS];
        (self.groups)(block, &mut affine[..self.block / self.group]);
        let mut codes = [0u8; MAX_BLOCK];
        (self.unpack)(block, &mut codes[..self.block]);
        for (j, o) in out[..self.block].iter_mut().enumerate() {
            let a = affine[j / self.group];
            *o = a.step * self.levels.level(codes[j]) + a.offset;
        }
    }
}

/// The grid codecs, one per supported type. Layouts as in ggml's `dequantize_row_*`.
pub static GRIDS: [GridCodec; 12] = [
    GridCodec {
        ty: GgmlType::Q4_0,
        block: 32,
        bytes: 18,
        group: 32,
        levels: uniform(8, 16),
        // d | qs[16]: element j in the low nibble of byte j, j + 16 in its high nibble
        groups: |b, g| g[0] = scale_only(f16_at(b, 0)),
        unpack: |b, c| unpack_nibbles(&b[2..18], c),
        pack: |c, b| pack_nibbles(c, &mut b[2..18]),
    },
    GridCodec {
        ty: GgmlType::Q4_1,
        block: 32,
        bytes: 20,
        group: 32,
        levels: uniform(0, 16),
        // d | m | qs[16]
        groups: |b, g| g[0] = affine(f16_at(b, 0), f16_at(b, 2)),
        unpack: |b, c| unpack_nibbles(&b[4..20], c),
        pack: |c, b| pack_nibbles(c, &mut b[4..20]),
    },
    GridCodec {
        ty: GgmlType::Q5_0,
        block: 32,
        bytes: 22,
        group: 32,
        levels: uniform(16, 32),
        // d | qh (u32: bit j is element j's fifth bit) | qs[16]
        groups: |b, g| g[0] = scale_only(f16_at(b, 0)),
        unpack: |b, c| unpack_q5(&b[2..22], c),
        pack: |c, b| pack_q5(c, &mut b[2..22]),
    },
    GridCodec {
        ty: GgmlType::Q5_1,
        block: 32,
        bytes: 24,
        group: 32,
        levels: uniform(0, 32),
        // d | m | qh | qs[16]
        groups: |b, g| g[0] = affine(f16_at(b, 0), f16_at(b, 2)),
        unpack: |b, c| unpack_q5(&b[4..24], c),
        pack: |c, b| pack_q5(c, &mut b[4..24]),
    },
    GridCodec {
        ty: GgmlType::Q8_0,
        block: 32,
        bytes: 34,
        group: 32,
        // Code = the stored i8 + 128; −128 (code 0) is read but never written.
        levels: Levels::Uniform {
            zero: 128,
            count: 256,
            lowest: 1,
        },
        // d | qs[32] (i8)
        groups: |b, g| g[0] = scale_only(f16_at(b, 0)),
        unpack: |b, c| {
            for (c, q) in c.iter_mut().zip(&b[2..34]) {
                *c = q ^ 0x80;
            }
        },
        pack: |c, b| {
            for (q, c) in b[2..34].iter_mut().zip(c) {
                *q = c ^ 0x80;
            }
        },
    },
    GridCodec {
        ty: GgmlType::Q2_K,
        block: 256,
        bytes: 84,
        group: 16,
        levels: uniform(0, 4),
        // scales[16] (low nibble scale, high nibble min) | qs[64] | d | dmin. Each 128-element
        // half uses 32 bytes of qs; its quarter r / 32 sits at bit 2 · (r / 32).
        groups: |b, g| {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (i, a) in g.iter_mut().enumerate() {
                let sc = b[i];
                *a = with_min(d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
            }
        },
        unpack: |b, c| {
            for (e, c) in c.iter_mut().enumerate() {
                *c = (b[16 + 32 * (e / 128) + e % 32] >> (2 * (e % 128 / 32))) & 3;
            }
        },
        pack: |c, b| {
            b[16..80].fill(0);
            for (e, &c) in c.iter().enumerate() {
                b[16 + 32 * (e / 128) + e % 32] |= (c & 3) << (2 * (e % 128 / 32));
            }
        },
    },
    GridCodec {
        ty: GgmlType::Q3_K,
        block: 256,
        bytes: 110,
        group: 16,
        levels: uniform(4, 8),
        // hmask[32] | qs[64] | scales[12] (6-bit, minus 32) | d. Low two bits as Q2_K's (qs at
        // 32); the high bit of element e (half h, quarter q, index l in the quarter) is bit
        // 4h + q of hmask[l].
        groups: |b, g| {
            let d = f16_at(b, 108);
            let s = &b[96..108];
            for (i, a) in g.iter_mut().enumerate() {
                let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
                let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
                *a = scale_only(d * f32::from(i16::from(low | (high << 4)) - 32));
            }
        },
        unpack: |b, c| {
            for (e, c) in c.iter_mut().enumerate() {
                let (h, q, l) = (e / 128, e % 128 / 32, e % 32);
                let low = (b[32 + 32 * h + l] >> (2 * q)) & 3;
                *c = low | (((b[l] >> (4 * h + q)) & 1) << 2);
            }
        },
        pack: |c, b| {
            b[..96].fill(0);
            for (e, &c) in c.iter().enumerate() {
                let (h, q, l) = (e / 128, e % 128 / 32, e % 32);
                b[32 + 32 * h + l] |= (c & 3) << (2 * q);
                b[l] |= ((c >> 2) & 1) << (4 * h + q);
            }
        },
    },
    GridCodec {
        ty: GgmlType::Q4_K,
        block: 256,
        bytes: 144,
        group: 32,
        levels: uniform(0, 16),
        // d | dmin | scales[12] | qs[128]: each 64 elements use 32 bytes, low nibbles first
        groups: |b, g| k_scales_mins(b, g),
        unpack: |b, c| {
            for (q, c) in b[16..144].chunks_exact(32).zip(c.chunks_exact_mut(64)) {
                unpack_nibbles(q, c);
            }
        },
        pack: |c, b| {
            for (c, q) in c.chunks_exact(64).zip(b[16..144].chunks_exact_mut(32)) {
                pack_nibbles(c, q);
            }
        },
    },
    GridCodec {
        ty: GgmlType::Q5_K,
        block: 256,
        bytes: 176,
        group: 32,
        levels: uniform(0, 32),
        // d | dmin | scales[12] | qh[32] | qs[128]: nibbles as Q4_K; the fifth bit of element
        // e is bit e / 32 of qh[e % 32].
        groups: |b, g| k_scales_mins(b, g),
        unpack: |b, c| {
            for (q, c) in b[48..176].chunks_exact(32).zip(c.chunks_exact_mut(64)) {
                unpack_nibbles(q, c);
            }
            for (e, c) in c.iter_mut().enumerate() {
                *c |= ((b[16 + e % 32] >> (e / 32)) & 1) << 4;
            }
        },
        pack: |c, b| {
            for (c, q) in c.chunks_exact(64).zip(b[48..176].chunks_exact_mut(32)) {
                pack_nibbles(c, q);
            }
            b[16..48].fill(0);
            for (e, &c) in c.iter().enumerate() {
                b[16 + e % 32] |= ((c >> 4) & 1) << (e / 32);
            }
        },
    },
    GridCodec {
        ty: GgmlType::Q6_K,
        block: 256,
        bytes: 210,
        group: 16,
        levels: uniform(32, 64),
        // ql[128] | qh[64] | scales[16] (i8) | d. Element e = 128n + 32k + l: low nibble in
        // ql[64n + l + 32(k % 2)] (high nibble for k ≥ 2), two high bits at 2k of qh[32n + l].
        groups: |b, g| {
            let d = f16_at(b, 208);
            for (i, a) in g.iter_mut().enumerate() {
                *a = scale_only(d * f32::from(b[192 + i] as i8));
            }
        },
        unpack: |b, c| {
            for (e, c) in c.iter_mut().enumerate() {
                let (n, k, l) = (e / 128, e % 128 / 32, e % 32);
                let low = (b[64 * n + l + 32 * (k % 2)] >> (4 * (k / 2))) & 0xF;
                *c = low | (((b[128 + 32 * n + l] >> (2 * k)) & 3) << 4);
            }
        },
        pack: |c, b| {
            b[..192].fill(0);
            for (e, &c) in c.iter().enumerate() {
                let (n, k, l) = (e / 128, e % 128 / 32, e % 32);
                b[64 * n + l + 32 * (k % 2)] |= (c & 0xF) << (4 * (k / 2));
                b[128 + 32 * n + l] |= ((c >> 4) & 3) << (2 * k);
            }
        },
    },
    GridCodec {
        ty: GgmlType::IQ4_NL,
        block: 32,
        bytes: 18,
        group: 32,
        levels: Levels::Table(&IQ4_LEVELS),
        // d | qs[16], nibbles as Q4_0
        groups: |b, g| g[0] = scale_only(f16_at(b, 0)),
        unpack: |b, c| unpack_nibbles(&b[2..18], c),
        pack: |c, b| pack_nibbles(c, &mut b[2..18]),
    },
    GridCodec {
        ty: GgmlType::IQ4_XS,
        block: 256,
        bytes: 136,
        group: 32,
        levels: Levels::Table(&IQ4_LEVELS),
        // d | scales_h (u16: 2 high bits per sub-block) | scales_l[4] (nibbles) | qs[128]:
        // each 32 elements use 16 bytes, nibbles as Q4_0; sub-block scale d · (ls − 32).
        groups: |b, g| {
            let d = f16_at(b, 0);
            let high = u16::from_le_bytes([b[2], b[3]]);
            for (i, a) in g.iter_mut().enumerate() {
                let low = (b[4 + i / 2] >> (4 * (i % 2))) & 0xF;
                let ls = i16::from(low) | ((((high >> (2 * i)) & 3) as i16) << 4);
                *a = scale_only(d * f32::from(ls - 32));
            }
        },
        unpack: |b, c| {
            for (q, c) in b[8..136].chunks_exact(16).zip(c.chunks_exact_mut(32)) {
                unpack_nibbles(q, c);
            }
        },
        pack: |c, b| {
            for (c, q) in c.chunks_exact(32).zip(b[8..136].chunks_exact_mut(16)) {
                pack_nibbles(c, q);
            }
        },
    },
];

/// The grid codec of `ty`, if it has one.
pub fn grid_of(ty: GgmlType) -> Option<&'static GridCodec> {
    GRIDS.iter().find(|g| g.ty == ty)
}

const fn uniform(zero: u8, count: u16) -> Levels {
    Levels::Uniform {
        zero,
        count,
        lowest: 0,
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn scale_only(step: f32) -> Affine {
    Affine { step, offset: 0.0 }
}

fn affine(step: f32, offset: f32) -> Affine {
    Affine { step, offset }
}

/// ggml's `dl * q - ml`: the offset is `-ml` (`a - b` and `a + (-b)` are the same in IEEE).
fn with_min(step: f32, min: f32) -> Affine {
    Affine { step, offset: -min }
}

/// `2n` codes from `n` bytes: element `j` in the low nibble of byte `j`, `j + n` in the high.
fn unpack_nibbles(q: &[u8], c: &mut [u8]) {
    let (low, high) = c.split_at_mut(q.len());
    for ((q, l), h) in q.iter().zip(low).zip(high) {
        *l = q & 0xF;
        *h = q >> 4;
    }
}

fn pack_nibbles(c: &[u8], q: &mut [u8]) {
    let (low, high) = c.split_at(q.len());
    for ((q, l), h) in q.iter_mut().zip(low).zip(high) {
        *q = (l & 0xF) | (h << 4);
    }
}

/// Q5_0 / Q5_1 from their `qh` (little-endian u32, bit `j` = element `j`'s fifth bit)
/// followed by `qs` (nibbles as Q4_0).
fn unpack_q5(b: &[u8], c: &mut [u8]) {
    unpack_nibbles(&b[4..20], c);
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, c) in c.iter_mut().enumerate() {
        *c |= (((qh >> j) & 1) as u8) << 4;
    }
}

fn pack_q5(c: &[u8], b: &mut [u8]) {
    pack_nibbles(c, &mut b[4..20]);
    let qh = c
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &c)| h | (u32::from((c >> 4) & 1) << j));
    b[..4].copy_from_slice(&qh.to_le_bytes());
}

/// Q4_K / Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes at 4 (ggml's
/// `get_scale_min_k4`), times the super-block's `d` and `dmin`.
fn k_scales_mins(b: &[u8], g: &mut [Affine]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let q = &b[4..16];
    for (j, a) in g.iter_mut().enumerate() {
        let (sc, m) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
        *a = with_min(d * f32::from(sc), dmin * f32::from(m));
    }
}

/// What [`requantize`] did with the blocks it was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GridCounts {
    /// Blocks with no changed element: the base's bytes.
    pub kept: u64,
    /// Blocks whose changed elements moved on the base's grid.
    pub moved: u64,
    /// Blocks quantized the usual way: a changed value beyond the grid's range (more than half
    /// a step past the extreme levels) or in a group of step 0.
    pub fallback: u64,
}

impl GridCounts {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &GridCounts) {
        self.kept += other.kept;
        self.moved += other.moved;
        self.fallback += other.fallback;
    }
}

/// How changed elements are rounded to the grid.
#[derive(Clone, Copy)]
pub enum Rounding<'a> {
    /// The nearest level (ties to the even code on uniform grids; to the upper level on IQ4's,
    /// as ggml's `best_index_int8`).
    Nearest,
    /// Up with probability equal to the fractional position `f` between the neighbouring
    /// levels: element `k` rounds up iff `(draw_k >> 8) < f · 2²⁴` (24-bit resolution). The
    /// function fills `out[k]` with the draw of element `offset + k`, `offset` counted from the
    /// first element given to [`requantize`] (called for windows of up to 256 elements that
    /// hold changed blocks).
    Stochastic(&'a (dyn Fn(usize, &mut [u32]) + 'a)),
}

/// 1.5 · 2²³: adding and subtracting it rounds an `f32` of magnitude below 2²² to the nearest
/// integer, ties to even (the FPU's rounding, as ggml's `nearest_int`; `round_ties_even` is a
/// libm call on x86-64 builds without SSE4.1).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Elements whose draws are asked for at once: a multiple of every block size.
const DRAW_WINDOW: usize = 256;

/// 2²⁴: a fraction's scale to compare with a draw's top 24 bits.
const TWO_POW_24: f32 = 16_777_216.0;

/// One group, ready for placing values: position in code units =
/// `value · inv_step + shift`, where `shift = zero − offset · inv_step`; NaN for a group of
/// step 0 (or not finite), so that nothing is ever placed there.
#[derive(Clone, Copy, Default)]
struct Placer {
    inv_step: f32,
    shift: f32,
}

impl Placer {
    fn of(a: Affine, zero: f32) -> Placer {
        if a.step == 0.0 || !a.step.is_finite() {
            return Placer {
                inv_step: f32::NAN,
                shift: f32::NAN,
            };
        }
        let inv_step = 1.0 / a.step;
        Placer {
            inv_step,
            shift: zero - a.offset * inv_step,
        }
    }
}

/// The codes of one block's changed elements on a uniform grid, written into `codes` (which
/// holds the base's codes; unchanged elements keep theirs). Returns (whether any element
/// changed, whether every changed value was in range).
#[inline(always)]
fn place_uniform(
    span: (f32, f32),
    group: &[Placer],
    base: &[f32],
    merged: &[f32],
    draws: Option<&[u32]>,
    codes: &mut [u8],
) -> (bool, bool) {
    let (mut any, mut bad) = (0u8, 0u8);
    let n = codes.len() / group.len();
    for (g, p) in group.iter().enumerate() {
        let r = g * n..(g + 1) * n;
        let (b, m, c) = (&base[r.clone()], &merged[r.clone()], &mut codes[r.clone()]);
        let (a, x) = match draws {
            None => place_nearest(*p, span, b, m, c),
            Some(d) => place_stochastic(*p, span, b, m, &d[r], c),
        };
        any |= a;
        bad |= x;
    }
    (any != 0, bad != 0)
}

/// The code of position `at` (an integer-valued `f32` in 0..=255): the low byte of
/// `at + 1.5 · 2²³`, whose mantissa is then `2²² + at`.
#[inline(always)]
fn code_of(at: f32) -> u8 {
    ((at + ROUND_MAGIC).to_bits() & 0xFF) as u8
}

/// `at` clamped to `[lowest, top]` (NaN stays NaN: it is out of range anyway).
#[inline(always)]
fn clamp_position(pos: f32, (lowest, top): (f32, f32)) -> f32 {
    let at = if pos > top { top } else { pos };
    if at < lowest {
        lowest
    } else {
        at
    }
}

/// Whether `pos` lies within half a step of `[lowest, top]` (false for NaN), as 0 or 1.
#[inline(always)]
fn within(pos: f32, (lowest, top): (f32, f32)) -> u8 {
    u8::from(pos >= lowest - 0.5) & u8::from(pos <= top + 0.5)
}

/// One group of a uniform grid, nearest rounding, branch-free (the loops vectorize; every
/// instruction set computes the same bits: each step is an exact IEEE operation, none fused).
/// Returns (any changed, any changed out of range) as 0/1.
#[multiversion::multiversion(targets("x86_64+avx2+fma+f16c", "x86_64+sse4.1", "aarch64+neon"))]
fn place_nearest(
    p: Placer,
    span: (f32, f32),
    base: &[f32],
    merged: &[f32],
    codes: &mut [u8],
) -> (u8, u8) {
    let (mut any, mut bad) = (0u8, 0u8);
    for ((&b, &m), c) in base.iter().zip(merged).zip(codes.iter_mut()) {
        let changed = u8::from(b != m);
        let pos = m * p.inv_step + p.shift;
        let code = code_of(clamp_position(pos, span));
        let keep = changed.wrapping_sub(1);
        *c = (code & !keep) | (*c & keep);
        any |= changed;
        bad |= changed & (within(pos, span) ^ 1);
    }
    (any, bad)
}

/// [`place_nearest`] with stochastic rounding: up iff `(draw >> 8) < fraction · 2²⁴`.
#[multiversion::multiversion(targets("x86_64+avx2+fma+f16c", "x86_64+sse4.1", "aarch64+neon"))]
fn place_stochastic(
    p: Placer,
    span: (f32, f32),
    base: &[f32],
    merged: &[f32],
    draws: &[u32],
    codes: &mut [u8],
) -> (u8, u8) {
    let (mut any, mut bad) = (0u8, 0u8);
    for (((&b, &m), &d), c) in base.iter().zip(merged).zip(draws).zip(codes.iter_mut()) {
        let changed = u8::from(b != m);
        let pos = m * p.inv_step + p.shift;
        let at = clamp_position(pos, span);
        // ⌊at⌋: the nearest integer, less one where that is above `at`.
        let near = (at + ROUND_MAGIC) - ROUND_MAGIC;
        let lo = near - f32::from(u8::from(near > at));
        let up = ((d >> 8) as i32 as f32) < (at - lo) * TWO_POW_24;
        let code = code_of(lo).wrapping_add(u8::from(up));
        let keep = changed.wrapping_sub(1);
        *c = (code & !keep) | (*c & keep);
        any |= changed;
        bad |= changed & (within(pos, span) ^ 1);
    }
    (any, bad)
}

/// [`place_uniform`] for a table of levels (IQ4): between the neighbouring levels of the
/// position `value · inv_step + shift` (here `shift = −offset · inv_step`, offsets being 0).
#[inline(always)]
fn place_table(
    table: &[i8; 16],
    group: &[Placer],
    base: &[f32],
    merged: &[f32],
    draws: Option<&[u32]>,
    codes: &mut [u8],
) -> (bool, bool) {
    let l = |i: usize| f32::from(table[i]);
    let (first, last) = (l(0) - (l(1) - l(0)) / 2.0, l(15) + (l(15) - l(14)) / 2.0);
    let (mut any, mut bad) = (false, false);
    let n = codes.len() / group.len();
    for (g, p) in group.iter().enumerate() {
        let r = g * n..(g + 1) * n;
        for j in r.clone() {
            let changed = base[j] != merged[j];
            let y = merged[j] * p.inv_step + p.shift;
            let in_range = y >= first && y <= last;
            // The upper neighbour: the first level above y, within 1..=15.
            let hi = table
                .iter()
                .filter(|&&v| f32::from(v) <= y)
                .count()
                .clamp(1, 15);
            let (lo_v, hi_v) = (l(hi - 1), l(hi));
            let up = match draws {
                None => y - lo_v >= hi_v - y,
                Some(d) => {
                    let f = ((y - lo_v) / (hi_v - lo_v)).clamp(0.0, 1.0);
                    ((d[j] >> 8) as f32) < f * TWO_POW_24
                }
            };
            any |= changed;
            bad |= changed & !in_range;
            if changed {
                codes[j] = (hi - 1 + usize::from(up)) as u8;
            }
        }
    }
    (any, bad)
}

/// Requantizes `merged` on the grid of the base blocks `base_bytes` into `out` (same size as
/// `base_bytes`), block by block, as the module describes. `base` is `base_bytes` decoded (by
/// ggml's dequantizer: the values the merge started from), `merged` the merged values.
///
/// Panics (a caller bug, never data) if the lengths are not the same whole number of blocks.
pub fn requantize(
    codec: &GridCodec,
    base_bytes: &[u8],
    base: &[f32],
    merged: &[f32],
    out: &mut [u8],
    rounding: Rounding<'_>,
) -> GridCounts {
    let blocks = merged.len() / codec.block;
    assert!(
        merged.len() == blocks * codec.block
            && base.len() == merged.len()
            && base_bytes.len() == blocks * codec.bytes
            && out.len() == base_bytes.len(),
        "{}: grid requantization of mismatched buffers",
        codec.ty
    );
    let mut counts = GridCounts::default();
    let n_groups = codec.block / codec.group;
    let mut affine = [Affine::default(); MAX_GROUPS];
    let mut placers = [Placer::default(); MAX_GROUPS];
    let mut codes = [0u8; MAX_BLOCK];
    // Draws are asked for whole windows of DRAW_WINDOW elements (the caller's generator is
    // fastest on long runs); `drawn` is the window held.
    let mut draws = [0u32; DRAW_WINDOW];
    let mut drawn = usize::MAX;
    let zero = match codec.levels {
        Levels::Uniform { zero, .. } => f32::from(zero),
        Levels::Table(_) => 0.0,
    };
    // The base's bytes first (one copy), then each changed block rewritten in place.
    out.copy_from_slice(base_bytes);
    for (k, ((src, dst), (b, m))) in base_bytes
        .chunks_exact(codec.bytes)
        .zip(out.chunks_exact_mut(codec.bytes))
        .zip(
            base.chunks_exact(codec.block)
                .zip(merged.chunks_exact(codec.block)),
        )
        .enumerate()
    {
        if b == m {
            counts.kept += 1;
            continue;
        }
        (codec.groups)(src, &mut affine[..n_groups]);
        for (p, a) in placers.iter_mut().zip(&affine[..n_groups]) {
            *p = Placer::of(*a, zero);
        }
        let codes = &mut codes[..codec.block];
        (codec.unpack)(src, codes);
        let block_draws = match rounding {
            Rounding::Nearest => None,
            Rounding::Stochastic(fill) => {
                let at = k * codec.block;
                let window = at - at % DRAW_WINDOW;
                if drawn != window {
                    let len = DRAW_WINDOW.min(merged.len() - window);
                    fill(window, &mut draws[..len]);
                    drawn = window;
                }
                Some(&draws[at - window..at - window + codec.block])
            }
        };
        let group = &placers[..n_groups];
        let (any, bad) = match codec.levels {
            Levels::Uniform { count, lowest, .. } => {
                let span = (f32::from(lowest), f32::from(count - 1));
                place_uniform(span, group, b, m, block_draws, codes)
            }
            Levels::Table(t) => place_table(t, group, b, m, block_draws, codes),
        };
        if !any {
            // Only ±0 differed: equal values, the base's bytes.
            counts.kept += 1;
        } else if bad {
            codec::quantize_into(codec.ty, m, codec.block as u64, dst);
            counts.fallback += 1;
        } else {
            (codec.pack)(codes, dst);
            counts.moved += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests;
