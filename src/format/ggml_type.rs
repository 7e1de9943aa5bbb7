//! The one table of ggml tensor types (ids 0–42), and the one checked size computation.
//!
//! Every other module asks this table about a type — its name, block size, bytes per block,
//! whether ggmerge can dequantize or quantize it — instead of matching on type ids. The ids and
//! sizes are part of the GGUF format, which is why the table lives in `format`; `quant` adds the
//! codecs behind the `dequantize`/`quantize` capabilities and a test checks every row against
//! ggml's own `ggml_get_type_traits`.
//!
//! Ids 4, 5 (Q4_2, Q4_3), 31–33 (Q4_0_4_4/4_8/8_8) and 36–38 (IQ4_NL_4_4/4_8/8_8) were removed
//! from ggml; they and ids ≥ 43 are not representable as a [`GgmlType`].

use std::fmt;

/// What ggmerge can do when asked to produce a type.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum QuantizeSupport {
    /// `ggml_quantize_chunk` produces it from f32 without extra data.
    Yes,
    /// ggml (or llama.cpp's policy, as in `llama-quantize`) needs an importance matrix, which
    /// ggmerge does not compute: asking for it is an error.
    NeedsImatrix,
    /// Not a storage type that can be quantized to (integer types, F64, Q8_1, Q8_K).
    No,
}

/// Static facts about one ggml type. One row of [`TYPES`].
#[derive(Debug)]
pub struct TypeTraits {
    /// The ggml type id as stored in GGUF tensor infos.
    pub id: u32,
    /// The name users know (`Q4_K`, `F16`), as gguf-py and llama.cpp's docs spell it.
    pub name: &'static str,
    /// The name ggml itself prints (`ggml_type_name`), e.g. `q4_K`.
    pub ggml_name: &'static str,
    /// Elements per block.
    pub block_size: u32,
    /// Bytes per block.
    pub type_size: u32,
    /// Whether this is a block-quantized type.
    pub is_quantized: bool,
    /// Whether ggmerge can turn it into f32 (ggml `to_float`, or Rust for F32/F16/BF16).
    pub can_dequantize: bool,
    /// Whether ggmerge can produce it from f32.
    pub quantize: QuantizeSupport,
}

use QuantizeSupport::{NeedsImatrix, No, Yes};

macro_rules! types {
    ($( $id:literal $name:literal $gname:literal $blk:literal $size:literal $q:literal $deq:literal $quant:ident ;)*) => {
        /// Every type ggmerge knows, in id order. Removed ids have no row.
        pub static TYPES: &[TypeTraits] = &[
            $( TypeTraits { id: $id, name: $name, ggml_name: $gname, block_size: $blk, type_size: $size,
                            is_quantized: $q, can_dequantize: $deq, quantize: $quant }, )*
        ];
    };
}

// id  name        ggml name   block bytes quantized dequant quantize
types! {
    0  "F32"     "f32"       1   4   false true  Yes;
    1  "F16"     "f16"       1   2   false true  Yes;
    2  "Q4_0"    "q4_0"      32  18  true  true  Yes;
    3  "Q4_1"    "q4_1"      32  20  true  true  Yes;
    6  "Q5_0"    "q5_0"      32  22  true  true  Yes;
    7  "Q5_1"    "q5_1"      32  24  true  true  Yes;
    8  "Q8_0"    "q8_0"      32  34  true  true  Yes;
    9  "Q8_1"    "q8_1"      32  36  true  false No;
    10 "Q2_K"    "q2_K"      256 84  true  true  Yes;
    11 "Q3_K"    "q3_K"      256 110 true  true  Yes;
    12 "Q4_K"    "q4_K"      256 144 true  true  Yes;
    13 "Q5_K"    "q5_K"      256 176 true  true  Yes;
    14 "Q6_K"    "q6_K"      256 210 true  true  Yes;
    15 "Q8_K"    "q8_K"      256 292 true  false No;
    16 "IQ2_XXS" "iq2_xxs"   256 66  true  true  NeedsImatrix;
    17 "IQ2_XS"  "iq2_xs"    256 74  true  true  NeedsImatrix;
    18 "IQ3_XXS" "iq3_xxs"   256 98  true  true  NeedsImatrix;
    19 "IQ1_S"   "iq1_s"     256 50  true  true  NeedsImatrix;
    20 "IQ4_NL"  "iq4_nl"    32  18  true  true  Yes;
    21 "IQ3_S"   "iq3_s"     256 110 true  true  Yes;
    22 "IQ2_S"   "iq2_s"     256 82  true  true  NeedsImatrix;
    23 "IQ4_XS"  "iq4_xs"    256 136 true  true  Yes;
    24 "I8"      "i8"        1   1   false false No;
    25 "I16"     "i16"       1   2   false false No;
    26 "I32"     "i32"       1   4   false false No;
    27 "I64"     "i64"       1   8   false false No;
    28 "F64"     "f64"       1   8   false false No;
    29 "IQ1_M"   "iq1_m"     256 56  true  true  NeedsImatrix;
    30 "BF16"    "bf16"      1   2   false true  Yes;
    34 "TQ1_0"   "tq1_0"     256 54  true  true  Yes;
    35 "TQ2_0"   "tq2_0"     256 66  true  true  Yes;
    39 "MXFP4"   "mxfp4"     32  17  true  true  Yes;
    40 "NVFP4"   "nvfp4"     64  36  true  true  Yes;
    41 "Q1_0"    "q1_0"      128 18  true  true  Yes;
    42 "Q2_0"    "q2_0"      64  18  true  true  Yes;
}

/// Number of type ids ggml reserves (`GGML_TYPE_COUNT`); every valid id is below it.
pub const TYPE_ID_COUNT: u32 = 43;

/// A valid ggml tensor type. Only ids with a row in [`TYPES`] can be constructed.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(u8);

impl GgmlType {
    /// F32.
    pub const F32: GgmlType = GgmlType(0);
    /// F16.
    pub const F16: GgmlType = GgmlType(1);
    /// Q4_0.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// Q4_1.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// Q5_0.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// Q5_1.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// Q8_0.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// Q2_K.
    pub const Q2_K: GgmlType = GgmlType(10);
    /// Q3_K.
    pub const Q3_K: GgmlType = GgmlType(11);
    /// Q4_K.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// Q5_K.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// Q6_K.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// IQ2_XXS.
    pub const IQ2_XXS: GgmlType = GgmlType(16);
    /// IQ2_XS.
    pub const IQ2_XS: GgmlType = GgmlType(17);
    /// IQ3_XXS.
    pub const IQ3_XXS: GgmlType = GgmlType(18);
    /// IQ1_S.
    pub const IQ1_S: GgmlType = GgmlType(19);
    /// IQ4_NL.
    pub const IQ4_NL: GgmlType = GgmlType(20);
    /// IQ3_S.
    pub const IQ3_S: GgmlType = GgmlType(21);
    /// IQ2_S.
    pub const IQ2_S: GgmlType = GgmlType(22);
    /// IQ4_XS.
    pub const IQ4_XS: GgmlType = GgmlType(23);
    /// IQ1_M.
    pub const IQ1_M: GgmlType = GgmlType(29);
    /// BF16.
    pub const BF16: GgmlType = GgmlType(30);
    /// I32.
    pub const I32: GgmlType = GgmlType(26);
    /// TQ1_0.
    pub const TQ1_0: GgmlType = GgmlType(34);
    /// TQ2_0.
    pub const TQ2_0: GgmlType = GgmlType(35);
    /// MXFP4.
    pub const MXFP4: GgmlType = GgmlType(39);
    /// Q1_0.
    pub const Q1_0: GgmlType = GgmlType(41);
    /// Q2_0.
    pub const Q2_0: GgmlType = GgmlType(42);

    /// The type with this GGUF id, or `None` for removed and unknown ids.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES
            .binary_search_by_key(&id, |t| t.id)
            .ok()
            .map(|_| GgmlType(id as u8))
    }

    /// The type named `name` (case-insensitive, `Q4_K` or ggml's `q4_K`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .map(|t| GgmlType(t.id as u8))
    }

    /// Every known type, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| GgmlType(t.id as u8))
    }

    /// This type's row of the table.
    pub fn traits(self) -> &'static TypeTraits {
        // Construction goes through `from_id`/constants only, so the id has a row.
        let i = TYPES
            .binary_search_by_key(&u32::from(self.0), |t| t.id)
            .unwrap_or_else(|_| unreachable!("GgmlType holds only ids from TYPES"));
        &TYPES[i]
    }

    /// GGUF type id.
    pub fn id(self) -> u32 {
        u32::from(self.0)
    }
    /// User-facing name (`Q4_K`).
    pub fn name(self) -> &'static str {
        self.traits().name
    }
    /// Elements per block.
    pub fn block_size(self) -> u64 {
        u64::from(self.traits().block_size)
    }
    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        u64::from(self.traits().type_size)
    }
    /// Whether this is a block-quantized type.
    pub fn is_quantized(self) -> bool {
        self.traits().is_quantized
    }
    /// Bits per weight of this type (e.g. 4.5 for Q4_0).
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    /// Bytes of one row of `ne0` elements, or `None` when `ne0` is not a multiple of the block
    /// size or the size overflows.
    pub fn row_bytes(self, ne0: u64) -> Option<u64> {
        if !ne0.is_multiple_of(self.block_size()) {
            return None;
        }
        (ne0 / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a tensor's size cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// `ne[0]` is not a multiple of the type's block size.
    RowNotBlockAligned {
        /// Elements per row.
        ne0: u64,
        /// The type's block size.
        block_size: u64,
    },
    /// The element count or byte size does not fit in 64 bits.
    Overflow,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::RowNotBlockAligned { ne0, block_size } => write!(
                f,
                "row length {ne0} is not a multiple of the block size {block_size}"
            ),
            SizeError::Overflow => f.write_str("size overflows 64 bits"),
        }
    }
}

/// Number of elements of a shape, checked.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a tensor of `shape` (ggml order: `shape[0]` is the row length) and type `ty`.
///
/// The only size computation in ggmerge: the GGUF parser, planners and writers all call it.
pub fn nbytes(shape: &[u64], ty: GgmlType) -> Result<u64, SizeError> {
    let ne0 = shape.first().copied().unwrap_or(1);
    if ne0 % ty.block_size() != 0 {
        return Err(SizeError::RowNotBlockAligned {
            ne0,
            block_size: ty.block_size(),
        });
    }
    let row = ty.row_bytes(ne0).ok_or(SizeError::Overflow)?;
    let rows = element_count(shape.get(1..).unwrap_or(&[])).ok_or(SizeError::Overflow)?;
    row.checked_mul(rows).ok_or(SizeError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_and_unknown_ids_are_rejected() {
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, 44, 1000, u32::MAX] {
            assert!(GgmlType::from_id(id).is_none(), "id {id}");
        }
        let valid = (0..TYPE_ID_COUNT)
            .filter(|&i| GgmlType::from_id(i).is_some())
            .count();
        assert_eq!(valid, TYPES.len());
        assert_eq!(valid, 43 - 8);
    }

    #[test]
    fn table_is_sorted_and_names_round_trip() {
        assert!(TYPES.windows(2).all(|w| w[0].id < w[1].id));
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert_eq!(GgmlType::from_name(t.traits().ggml_name), Some(t));
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
        }
    }

    #[test]
    fn nbytes_checks_blocks_and_overflow() {
        assert_eq!(
            nbytes(&[576, 49152], GgmlType::Q8_0),
            Ok(576 / 32 * 34 * 49152)
        );
        assert_eq!(nbytes(&[576], GgmlType::F32), Ok(2304));
        assert_eq!(
            nbytes(&[640, 2], GgmlType::Q4_K),
            Err(SizeError::RowNotBlockAligned {
                ne0: 640,
                block_size: 256
            })
        );
        assert_eq!(
            nbytes(&[u64::MAX, 2], GgmlType::F32),
            Err(SizeError::Overflow)
        );
        assert_eq!(
            nbytes(&[1 << 40, 1 << 40], GgmlType::F32),
            Err(SizeError::Overflow)
        );
    }
}
