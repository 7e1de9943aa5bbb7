//! Exact rank selection over |δ| of a whole tensor without sorting or materializing it.
//!
//! TIES keeps the top-k magnitudes of each delta, breadcrumbs a window of ranks. Both need the
//! magnitude at a given rank of a tensor that is only ever seen chunk by chunk. Non-negative
//! f32 values order like their bit patterns as u32, so a two-level radix histogram (high 16 bits,
//! then low 16 bits inside the chosen bucket) finds the exact value at any rank in two streaming
//! passes with 2 × 64 Ki counters per selection.
//!
//! Ranks are over the total order "larger magnitude first, then lower index first", so a rank
//! window selects exactly k elements even when magnitudes tie (they do, often, for deltas of
//! quantized models); [`RankCut`] says how an element compares with a rank.

/// Number of buckets per radix level.
const BUCKETS: usize = 1 << 16;

/// Histogram of the high 16 bits of |x| (first pass).
#[derive(Clone)]
pub struct HighHistogram(pub Vec<u64>);

impl Default for HighHistogram {
    fn default() -> Self {
        HighHistogram(vec![0; BUCKETS])
    }
}

impl HighHistogram {
    /// Counts the magnitudes of `values`.
    pub fn add(&mut self, values: &[f32]) {
        for v in values {
            self.0[(v.abs().to_bits() >> 16) as usize] += 1;
        }
    }
    /// Adds another histogram (from another chunk).
    pub fn merge(&mut self, other: &HighHistogram) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }
}

/// Histogram of the low 16 bits of |x| for values whose high bits equal `high` (second pass).
#[derive(Clone)]
pub struct LowHistogram {
    /// The high bucket this histogram refines.
    pub high: u32,
    /// Counts by low 16 bits.
    pub counts: Vec<u64>,
}

impl LowHistogram {
    /// An empty refinement of bucket `high`.
    pub fn new(high: u32) -> LowHistogram {
        LowHistogram {
            high,
            counts: vec![0; BUCKETS],
        }
    }
    /// Counts the magnitudes of `values` that fall in the bucket.
    pub fn add(&mut self, values: &[f32]) {
        for v in values {
            let b = v.abs().to_bits();
            if b >> 16 == self.high {
                self.counts[(b & 0xffff) as usize] += 1;
            }
        }
    }
    /// Adds another histogram of the same bucket.
    pub fn merge(&mut self, other: &LowHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }
}

/// Where rank `rank` (0 = largest magnitude) falls in the high histogram: the bucket and how
/// many elements are in higher buckets.
pub fn locate_high(h: &HighHistogram, rank: u64) -> (u32, u64) {
    let mut above = 0u64;
    for bucket in (0..BUCKETS).rev() {
        let c = h.0[bucket];
        if above + c > rank {
            return (bucket as u32, above);
        }
        above += c;
    }
    (0, above)
}

/// The magnitude at a rank, and how elements compare with it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankCut {
    /// |x| bits of the element at the rank.
    pub value_bits: u32,
    /// Elements with a strictly larger magnitude.
    pub greater: u64,
    /// Elements with exactly this magnitude whose rank is below the cut (the first ones by
    /// index): `rank - greater`.
    pub equal_before: u64,
}

/// Refines a high-bucket location with its low histogram into the exact cut for `rank`.
pub fn locate_low(low: &LowHistogram, above_bucket: u64, rank: u64) -> RankCut {
    let mut above = above_bucket;
    for l in (0..BUCKETS).rev() {
        let c = low.counts[l];
        if above + c > rank {
            return RankCut {
                value_bits: (low.high << 16) | l as u32,
                greater: above,
                equal_before: rank - above,
            };
        }
        above += c;
    }
    RankCut {
        value_bits: 0,
        greater: above,
        equal_before: 0,
    }
}

impl RankCut {
    /// A cut that everything is below (rank ≥ n): every element has a rank under it.
    pub fn everything() -> RankCut {
        RankCut {
            value_bits: 0,
            greater: u64::MAX,
            equal_before: u64::MAX,
        }
    }
    /// A cut nothing is below (rank 0 with nothing selected).
    pub fn nothing() -> RankCut {
        RankCut {
            value_bits: u32::MAX,
            greater: 0,
            equal_before: 0,
        }
    }

    /// Whether the element with magnitude bits `bits`, which is preceded (in index order) by
    /// `equal_seen` elements of exactly the cut magnitude, has a rank below the cut.
    #[inline]
    pub fn below(&self, bits: u32, equal_seen: u64) -> bool {
        if self.greater == u64::MAX {
            return true;
        }
        bits > self.value_bits || (bits == self.value_bits && equal_seen < self.equal_before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_of(values: &[f32], rank: u64) -> RankCut {
        let mut h = HighHistogram::default();
        h.add(values);
        let (bucket, above) = locate_high(&h, rank);
        let mut l = LowHistogram::new(bucket);
        l.add(values);
        locate_low(&l, above, rank)
    }

    /// Reference: indices of the top k by (|x| desc, index asc).
    fn top_k(values: &[f32], k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| {
            values[b]
                .abs()
                .partial_cmp(&values[a].abs())
                .unwrap()
                .then(a.cmp(&b))
        });
        let mut top = idx[..k].to_vec();
        top.sort();
        top
    }

    #[test]
    fn selects_exactly_k_with_ties() {
        // Quantized-like deltas: few distinct magnitudes, many ties, both signs.
        let values: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 13) as f32 - 6.0) * 0.01)
            .collect();
        for k in [1u64, 10, 999, 2500, 4999] {
            let cut = cut_of(&values, k);
            let mut seen = 0;
            let mut kept = Vec::new();
            for (i, v) in values.iter().enumerate() {
                let b = v.abs().to_bits();
                if cut.below(b, seen) {
                    kept.push(i);
                }
                if b == cut.value_bits {
                    seen += 1;
                }
            }
            assert_eq!(kept, top_k(&values, k as usize), "k = {k}");
        }
    }
}
