//! Fuzzes the delta-pack reader (`ggmerge::delta::pack::DeltaPack::open`): any file must give
//! `Ok` or an error, never a panic, an out-of-bounds read or a huge allocation.
//!
//! Two input modes, picked by the first byte:
//! - `G` (a GGUF file's magic): the input is the pack file as is (the corpus holds small real
//!   packs; libFuzzer mutates their bytes).
//! - anything else: the rest of the input drives [`Spec`] (`arbitrary`), which is rendered into
//!   a well-formed GGUF file (the crate's own header encoder) with pack metadata: each key is
//!   absent, its valid value, or a value of any type; tensors are `NAME.dv` values, `NAME.di`
//!   indices or others, of any type and size, with zero, arbitrary or ascending data. This gets
//!   past the GGUF parser at once and exercises the pack's own validation.
//!
//! `DeltaPack` opens files (and maps them), so each input is written to one scratch file per
//! process (in /dev/shm where there is one).
//!
//! A pack that opens is checked: every listed tensor has a `tensor` and a `sparse` view; the
//! values hold the type's bytes for their shape and at least `kept` values; explicit indices
//! are `kept` ascending u32s. Then the view is merged (task arithmetic, the engine's sparse
//! path) into a small F32 base of at least `kept` elements, as `ggmerge merge` would after its
//! own `kept <= elements` check: that must give `Ok` or an error, never a panic.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use ggmerge::delta::pack::{DeltaPack, MaskKind, INDICES_SUFFIX, PACK_TYPE, VALUES_SUFFIX};
use ggmerge::format::gguf::read::align_up;
use ggmerge::format::gguf::write::encode_header;
use ggmerge::format::gguf::{Array, Metadata, TensorSpec, Value};
use ggmerge::format::{nbytes, GgmlType};
use ggmerge::merge::engine::{
    merge_tensor, InputTensor, JobOutput, Kind, MethodSpec, ModelInput, ModelParams, RescaleMode,
    SparseMask, TensorJob,
};
use ggmerge::merge::kernel::Sparsifier;
use libfuzzer_sys::fuzz_target;

/// Base tensor names the spec picks from.
const NAMES: &[&str] = &[
    "blk.0.attn_q.weight",
    "blk.0.ffn_up.weight",
    "token_embd.weight",
    "output_norm.weight",
];
/// Strings the spec picks from for string keys.
const STRINGS: &[&str] = &[
    PACK_TYPE,
    "philox",
    "explicit",
    "dense",
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "I32",
    "dare",
    "magnitude",
    "della",
    "inverse",
    "l1",
    "none",
    "0123456789abcdef",
    "",
];
/// Largest tensor the spec makes, in elements.
const MAX_ELEMS: u64 = 4096;

/// A metadata value: the key's valid one, a known string, or anything.
#[derive(Arbitrary, Debug)]
enum Val {
    Good,
    Absent,
    Known(u8),
    Str(String),
    U8(u8),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
    Bool(bool),
    ArrU64(Vec<u64>),
    ArrU32(Vec<u32>),
}

/// `delta.kept`.
#[derive(Arbitrary, Debug)]
enum Kept {
    /// One count per `.dv` tensor: its element count minus a small amount (Q8_0 padding).
    Auto(Vec<u8>),
    Other(Val),
}

#[derive(Arbitrary, Debug)]
enum Suffix {
    Values,
    Indices,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Ty {
    /// The pack's value type for `.dv`, I32 for `.di`.
    Good,
    Id(u8),
}

#[derive(Arbitrary, Debug)]
enum Data {
    Zero,
    Bytes(Vec<u8>),
    /// u32 indices, each the previous plus one plus the step.
    Ascending(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct TensorSpecIn {
    base: u8,
    suffix: Suffix,
    ty: Ty,
    elems: u16,
    rows: Option<u8>,
    data: Data,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    general_type: Val,
    fingerprint: Val,
    method: Val,
    density: Val,
    seed: Val,
    stream: Val,
    rescale: Val,
    mask: Val,
    values: Val,
    kept: Kept,
    tensors: Vec<TensorSpecIn>,
    /// Steps of the ascending `NAME.di` indices added for every `NAME.dv` that keeps values and
    /// has none (explicit masks are otherwise rarely well-formed).
    indices: Option<Vec<u8>>,
    /// Elements of the base tensor beyond `kept`, for the engine run.
    base_extra: u16,
    base_row: u8,
}

fn value(v: &Val, good: Value) -> Option<Value> {
    Some(match v {
        Val::Good => good,
        Val::Absent => return None,
        Val::Known(i) => Value::String(STRINGS[*i as usize % STRINGS.len()].into()),
        Val::Str(s) => Value::String(s.clone()),
        Val::U8(x) => Value::U8(*x),
        Val::U32(x) => Value::U32(*x),
        Val::I32(x) => Value::I32(*x),
        Val::U64(x) => Value::U64(*x),
        Val::F32(x) => Value::F32(*x),
        Val::F64(x) => Value::F64(*x),
        Val::Bool(x) => Value::Bool(*x),
        Val::ArrU64(x) => Value::Array(Array::U64(x.clone())),
        Val::ArrU32(x) => Value::Array(Array::U32(x.clone())),
    })
}

/// The type `delta.values` names, when it names one.
fn values_type(md: &Metadata) -> GgmlType {
    md.get("delta.values")
        .and_then(Value::as_str)
        .and_then(GgmlType::from_name)
        .unwrap_or(GgmlType::F32)
}

/// `size` bytes of ascending u32s: each the previous plus one plus the next step.
fn ascending(steps: &[u8], size: u64) -> Vec<u8> {
    let mut next = 0u32;
    let mut out = Vec::with_capacity(size as usize);
    for i in 0..size.div_ceil(4) as usize {
        out.extend_from_slice(&next.to_le_bytes());
        let step = steps.get(i % steps.len().max(1)).copied().unwrap_or(0);
        next = next.wrapping_add(1 + u32::from(step));
    }
    out.truncate(size as usize);
    out
}

/// Renders a spec as a GGUF file, or `None` when the writer refuses it.
fn render(spec: &Spec) -> Option<Vec<u8>> {
    let mut md = Metadata::new();
    md.set("general.architecture", Value::String("llama".into()));
    let keys: [(&str, &Val, Value); 9] = [
        (
            "general.type",
            &spec.general_type,
            Value::String(PACK_TYPE.into()),
        ),
        (
            "delta.base.fingerprint",
            &spec.fingerprint,
            Value::String("0123456789abcdef".into()),
        ),
        ("delta.method", &spec.method, Value::String("dare".into())),
        ("delta.density", &spec.density, Value::F64(0.5)),
        ("delta.seed", &spec.seed, Value::U64(42)),
        ("delta.stream", &spec.stream, Value::U32(0)),
        (
            "delta.rescale",
            &spec.rescale,
            Value::String("inverse".into()),
        ),
        ("delta.mask", &spec.mask, Value::String("explicit".into())),
        ("delta.values", &spec.values, Value::String("F32".into())),
    ];
    for (k, v, good) in keys {
        if let Some(v) = value(v, good) {
            md.set(k, v);
        }
    }
    let vty = values_type(&md);
    let i32_ty = GgmlType::from_id(26).expect("I32");

    let mut specs = Vec::new();
    let mut data = Vec::new();
    for t in spec.tensors.iter().take(16) {
        let base = NAMES[t.base as usize % NAMES.len()];
        let name = match &t.suffix {
            Suffix::Values => format!("{base}{VALUES_SUFFIX}"),
            Suffix::Indices => format!("{base}{INDICES_SUFFIX}"),
            Suffix::Other(s) => s.chars().take(63).collect(),
        };
        let ty = match t.ty {
            Ty::Good if matches!(t.suffix, Suffix::Indices) => i32_ty,
            Ty::Good => vty,
            Ty::Id(id) => GgmlType::from_id(u32::from(id % 40)).unwrap_or(GgmlType::F32),
        };
        let blk = ty.block_size();
        let elems = (u64::from(t.elems) % MAX_ELEMS).max(1).div_ceil(blk) * blk;
        let shape = match t.rows {
            Some(r) if r > 1 => vec![elems, u64::from(r % 8).max(1)],
            _ => vec![elems],
        };
        let size = nbytes(&shape, ty).ok()?;
        let bytes: Vec<u8> = match &t.data {
            Data::Zero => vec![0; size as usize],
            Data::Bytes(b) if b.is_empty() => vec![0; size as usize],
            Data::Bytes(b) => b.iter().copied().cycle().take(size as usize).collect(),
            Data::Ascending(steps) => ascending(steps, size),
        };
        specs.push(TensorSpec { name, shape, ty });
        data.push(bytes);
    }

    let auto: Vec<(String, u64)> = specs
        .iter()
        .filter_map(|s| s.name.strip_suffix(VALUES_SUFFIX).map(|b| (b, s)))
        .enumerate()
        .map(|(i, (base, s))| {
            let minus = match &spec.kept {
                Kept::Auto(m) => u64::from(*m.get(i).unwrap_or(&0)),
                Kept::Other(_) => 0,
            };
            let n: u64 = s.shape.iter().product();
            (base.to_string(), n.saturating_sub(minus))
        })
        .collect();
    if let Some(steps) = &spec.indices {
        for (base, k) in &auto {
            let name = format!("{base}{INDICES_SUFFIX}");
            if *k > 0 && !specs.iter().any(|s| s.name == name) {
                data.push(ascending(steps, 4 * k));
                specs.push(TensorSpec {
                    name,
                    shape: vec![*k],
                    ty: i32_ty,
                });
            }
        }
    }
    let kept = match &spec.kept {
        Kept::Auto(_) => Some(Value::Array(Array::U64(
            auto.iter().map(|(_, k)| *k).collect(),
        ))),
        Kept::Other(v) => value(v, Value::Array(Array::U64(Vec::new()))),
    };
    if let Some(k) = kept {
        md.set("delta.kept", k);
    }

    let (mut file, sizes, alignment) = encode_header(3, &md, &specs, Path::new("fuzz")).ok()?;
    for (bytes, size) in data.iter().zip(sizes) {
        debug_assert_eq!(bytes.len() as u64, size);
        file.resize(align_up(file.len() as u64, alignment)? as usize, 0);
        file.extend_from_slice(bytes);
    }
    file.resize(align_up(file.len() as u64, alignment)? as usize, 0);
    Some(file)
}

/// One file per fuzzing process, written and removed every iteration.
fn scratch() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("ggmerge-fuzz-pack-{}.dpk.gguf", std::process::id()))
    })
}

fn check(pack: &DeltaPack, base_extra: u64, base_row: u64) {
    for (name, kept) in &pack.tensors {
        let t = pack.tensor(name).expect("a listed tensor has a view");
        let sp = pack
            .sparse(name)
            .expect("a listed tensor has a sparse view");
        assert_eq!(t.kept, *kept);
        let info = t.values.info;
        assert_eq!(info.ty, pack.values);
        assert!(
            *kept <= info.n_elements(),
            "{name}: kept {kept} > {}",
            info.n_elements()
        );
        assert_eq!(
            Ok(sp.values.len() as u64),
            nbytes(&info.shape, pack.values).map_err(|_| ())
        );
        if pack.mask == MaskKind::Explicit {
            let idx = t.indices.expect("explicit masks have indices").data;
            assert_eq!(idx.len() as u64, 4 * kept);
            let SparseMask::Indices(view) = sp.mask else {
                panic!("an explicit pack's sparse view is not indices");
            };
            assert_eq!(view, idx);
            let v: Vec<u32> = idx
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert!(v.windows(2).all(|w| w[0] < w[1]), "indices not ascending");
        }

        // Merge the view into a small base, as a merge would (it checks kept <= elements).
        let n = (kept + base_extra).max(1);
        if n > 1 << 16 {
            continue;
        }
        let row = base_row.clamp(1, n);
        let n_rows = n.div_ceil(row);
        let base = vec![0u8; (row * n_rows * 4) as usize];
        let job = TensorJob {
            name,
            n_per_row: row as usize,
            n_rows: n_rows as usize,
            base: Some(InputTensor {
                data: &base,
                ty: GgmlType::F32,
            }),
            models: vec![ModelInput::Sparse(sp)],
            params: vec![ModelParams {
                weight: 1.0,
                density: 1.0,
                gamma: 0.0,
                epsilon: 0.0,
                stream: 0,
            }],
            method: MethodSpec {
                kind: Kind::TaskVector,
                sparsifier: Sparsifier::None,
                consensus: false,
                normalize: false,
                rescale: RescaleMode::None,
            },
            lambda: 1.0,
            t: 0.5,
            seed: 0,
            out_ty: GgmlType::F32,
            chunk_elems: 256,
            output: JobOutput::Merged,
            measure: true,
            rows_done: None,
            slabs: None,
        };
        let mut out = 0usize;
        if merge_tensor(&job, &mut |b| {
            out += b.len();
            Ok(())
        })
        .is_ok()
        {
            assert_eq!(out, base.len(), "{name}: merged output size");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (file, base_extra, base_row) = if mode == b'G' {
        (data.to_vec(), 0, 64)
    } else {
        let Ok(spec) = Spec::arbitrary(&mut Unstructured::new(rest)) else {
            return;
        };
        let Some(file) = render(&spec) else {
            return;
        };
        (file, u64::from(spec.base_extra), u64::from(spec.base_row))
    };
    let path = scratch();
    if std::fs::write(path, &file).is_err() {
        return;
    }
    if let Ok(pack) = DeltaPack::open(path) {
        check(&pack, base_extra, base_row);
    }
    let _ = std::fs::remove_file(path);
});
