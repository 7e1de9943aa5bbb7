//! Hostile-input tests of the GGUF header parser (`format::gguf::read::parse_header`).
//!
//! Every malformed file must give a [`FormatError`] whose message starts with the file's path:
//! never a panic, never an allocation sized by a count read from the file, never a wrong
//! acceptance.
//!
//! - Valid files written by [`GgufWriter`] (many value types, F32/F16/Q8_0/Q4_K tensors, GGUF v2
//!   and v3, several alignments) parse back exactly.
//! - [`Bytes`], a field-by-field GGUF builder, crafts files that break exactly one rule each.
//! - Every prefix of a small valid file, and ~250 prefixes of the real SmolLM2 model, fail
//!   cleanly up to the end of the last tensor's data.
//! - proptest: up to 8 random byte edits (and an optional cut) of a small valid file never
//!   panic, and whatever is accepted satisfies the header's invariants and is accepted by
//!   ggml's own GGUF reader (`gguf_init_from_buffer`, linked from the pinned llama.cpp), so the
//!   parser is never more lenient than llama.cpp. It is stricter on purpose in a few places
//!   (see `stricter_than_ggml`).
//!
//! A tracking global allocator records the largest single allocation made on the parsing
//! thread, so "no huge allocation" is checked, not assumed: every parse must stay under
//! [`ALLOC_FACTOR`] × input length + [`ALLOC_SLACK`].

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use ggmerge::format::gguf::read::{parse_header, Header, MAX_NAME_LEN};
use ggmerge::format::gguf::{Array, GgufFile, GgufWriter, Metadata, TensorSpec, Value, ValueType};
use ggmerge::format::{nbytes, FormatError, GgmlType};
use llama_cpp_sys_2 as sys;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Allocation tracking

/// Forwards to [`System`], recording the largest request made on the current thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: while a thread is torn down its slot may be gone; nothing is recorded then.
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; recording a size in a const-initialised thread-local `Cell` neither
// allocates nor unwinds.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// A parse may allocate at most this many bytes per input byte in one allocation (the parser
/// pre-sizes its lists by counts that it first bounds by the bytes left: 32 bytes per tensor
/// info, 13 per key/value, 8 per string)…
const ALLOC_FACTOR: usize = 8;
/// …plus this much.
const ALLOC_SLACK: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Parsing helpers

/// The path every in-memory case is parsed under; errors must name it.
const PATH: &str = "hostile/input.gguf";

/// Parses `bytes` as the file `path`, checking that no single allocation was out of proportion
/// to the input.
fn parse_at(bytes: &[u8], path: &Path) -> Result<Header, FormatError> {
    LARGEST.with(|m| m.set(0));
    let result = parse_header(bytes, path);
    let largest = LARGEST.with(Cell::get);
    let bound = ALLOC_FACTOR * bytes.len() + ALLOC_SLACK;
    assert!(
        largest <= bound,
        "parsing {} input bytes made a {largest}-byte allocation (bound {bound})",
        bytes.len()
    );
    result
}

fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
    parse_at(bytes, Path::new(PATH))
}

/// Parses `bytes`, which must be rejected with an error that names the file; returns the error.
#[track_caller]
fn fails(bytes: &[u8]) -> FormatError {
    match parse(bytes) {
        Ok(h) => panic!(
            "accepted a malformed file: {} keys, {} tensors {:?}",
            h.metadata.len(),
            h.tensors.len(),
            h.tensors
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("{PATH}: ")),
                "error does not name the file: {msg}"
            );
            e
        }
    }
}

/// Parses `bytes`, which must be accepted.
#[track_caller]
fn parses(bytes: &[u8]) -> Header {
    parse(bytes).unwrap_or_else(|e| panic!("valid file rejected: {e}"))
}

/// Expects `$bytes` to fail with an error matching `$pat` (matched against `&FormatError`, so
/// guards see references); evaluates to the error.
macro_rules! assert_fails {
    ($bytes:expr, $pat:pat $(if $guard:expr)?) => {{
        let e = fails(AsRef::<[u8]>::as_ref(&$bytes));
        assert!(matches!(&e, $pat $(if $guard)?), "wrong error: {e}");
        e
    }};
}

/// Asserts the error's message contains every one of `parts`.
#[track_caller]
fn says(e: &FormatError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

extern "C" fn quiet_log(
    _level: sys::ggml_log_level,
    _text: *const std::os::raw::c_char,
    _user_data: *mut std::ffi::c_void,
) {
}

/// Whether ggml's own GGUF reader accepts `bytes`. Without a ggml context it checks the header
/// and the data layout, not that the tensor data is present.
fn ggml_accepts(bytes: &[u8]) -> bool {
    static QUIET: Once = Once::new();
    // SAFETY: `quiet_log` ignores its arguments and never unwinds.
    QUIET.call_once(|| unsafe { sys::ggml_log_set(Some(quiet_log), std::ptr::null_mut()) });
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: `bytes` is valid for reads of `bytes.len()` bytes during the call; with a null
    // `ctx`, ggml keeps no pointer into it; a non-null context is freed exactly once.
    unsafe {
        let ctx = sys::gguf_init_from_buffer(bytes.as_ptr().cast(), bytes.len(), params);
        if ctx.is_null() {
            return false;
        }
        sys::gguf_free(ctx);
    }
    true
}

// ---------------------------------------------------------------------------------------------
// A field-by-field GGUF builder

const T_U8: u32 = ValueType::U8 as u32;
const T_U16: u32 = ValueType::U16 as u32;
const T_U32: u32 = ValueType::U32 as u32;
const T_I32: u32 = ValueType::I32 as u32;
const T_BOOL: u32 = ValueType::Bool as u32;
const T_STRING: u32 = ValueType::String as u32;
const T_ARRAY: u32 = ValueType::Array as u32;
const T_U64: u32 = ValueType::U64 as u32;

/// ggml type ids used below (checked against the table in `type_ids_match_the_table`).
const F32: u32 = 0;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;

/// A GGUF file written field by field, so that each case can break exactly one rule.
#[derive(Clone, Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    /// Magic, version, tensor count, key/value count.
    fn start(version: u32, n_tensors: u64, n_kv: u64) -> Bytes {
        Bytes::default()
            .raw(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, bytes: &[u8]) -> Bytes {
        self.0.extend_from_slice(bytes);
        self
    }
    fn u8(self, v: u8) -> Bytes {
        self.raw(&[v])
    }
    fn u32(self, v: u32) -> Bytes {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Bytes {
        self.raw(&v.to_le_bytes())
    }
    /// A GGUF string: u64 length, then the bytes (UTF-8 or not).
    fn str(self, s: impl AsRef<[u8]>) -> Bytes {
        let s = s.as_ref();
        self.u64(s.len() as u64).raw(s)
    }
    /// A key and a value type id; the value follows.
    fn key(self, key: impl AsRef<[u8]>, ty: u32) -> Bytes {
        self.str(key).u32(ty)
    }
    fn kv_u32(self, key: &str, v: u32) -> Bytes {
        self.key(key, T_U32).u32(v)
    }
    fn kv_str(self, key: &str, v: impl AsRef<[u8]>) -> Bytes {
        self.key(key, T_STRING).str(v)
    }
    /// An array key: element type and length; the elements follow.
    fn array(self, key: &str, elem: u32, len: u64) -> Bytes {
        self.key(key, T_ARRAY).u32(elem).u64(len)
    }
    /// A tensor info whose dimension count is `n_dims` whatever `shape` holds.
    fn tensor_dims(
        self,
        name: impl AsRef<[u8]>,
        n_dims: u32,
        shape: &[u64],
        ty: u32,
        offset: u64,
    ) -> Bytes {
        let mut b = self.str(name).u32(n_dims);
        for &d in shape {
            b = b.u64(d);
        }
        b.u32(ty).u64(offset)
    }
    /// A tensor info.
    fn tensor(self, name: impl AsRef<[u8]>, shape: &[u64], ty: u32, offset: u64) -> Bytes {
        let n_dims = shape.len() as u32;
        self.tensor_dims(name, n_dims, shape, ty, offset)
    }
    /// Zero bytes up to the next multiple of `align`.
    fn pad(mut self, align: usize) -> Bytes {
        let len = self.0.len().next_multiple_of(align);
        self.0.resize(len, 0);
        self
    }
    /// `n` bytes of tensor data.
    fn data(mut self, n: usize) -> Bytes {
        self.0.resize(self.0.len() + n, 0x5a);
        self
    }
    fn build(self) -> Vec<u8> {
        self.0
    }
}

/// The header of [`valid`]: two keys, three tensors — `a` F32 [8, 2] (64 B at 0), `b` Q8_0
/// [32, 2] (68 B at 64), `c` Q4_K [256] (144 B at 160).
fn valid_header() -> Bytes {
    Bytes::start(3, 3, 2)
        .kv_str("general.architecture", "llama")
        .kv_u32("general.alignment", 32)
        .tensor("a", &[8, 2], F32, 0)
        .tensor("b", &[32, 2], Q8_0, 64)
        .tensor("c", &[256], Q4_K, 160)
}

/// Bytes of [`valid`]'s data section without the final padding.
const VALID_DATA: usize = 160 + 144;

/// A small valid file, byte-identical to what [`GgufWriter`] writes for the same input.
fn valid() -> Vec<u8> {
    // `a` and `b` (64 + 68 bytes), zero padding, `c` (144 bytes), zero padding.
    valid_header()
        .pad(32)
        .data(64 + 68)
        .pad(32)
        .data(144)
        .pad(32)
        .build()
}

/// A file with one tensor `t` and `data` bytes of data (default alignment 32).
fn one_tensor(name: impl AsRef<[u8]>, shape: &[u64], ty: u32, data: usize) -> Vec<u8> {
    Bytes::start(3, 1, 0)
        .tensor(name, shape, ty, 0)
        .pad(32)
        .data(data)
        .build()
}

/// A file with no tensors and one key whose type id is `ty`, followed by `value`.
fn one_key(ty: u32, value: Bytes) -> Vec<u8> {
    let mut b = Bytes::start(3, 0, 1).key("k", ty);
    b.0.extend(value.0);
    b.build()
}

// ---------------------------------------------------------------------------------------------
// Valid files

fn sample_metadata() -> Metadata {
    let mut md = Metadata::new();
    let mut set = |k: &str, v: Value| md.set(k, v);
    set("general.architecture", Value::String("llama".into()));
    set("general.name", Value::String("tiny ünïcode ✓".into()));
    set("t.empty_string", Value::String(String::new()));
    set("t.u8", Value::U8(255));
    set("t.i8", Value::I8(-128));
    set("t.u16", Value::U16(65535));
    set("t.i16", Value::I16(-32768));
    set("t.u32", Value::U32(u32::MAX));
    set("t.i32", Value::I32(i32::MIN));
    set("t.f32", Value::F32(-0.5));
    set("t.bool", Value::Bool(true));
    set("t.u64", Value::U64(u64::MAX));
    set("t.i64", Value::I64(i64::MIN));
    set("t.f64", Value::F64(1e300));
    set(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(
            ["<s>", "", "héllo", " ", "\u{1F600}"].into_iter().collect(),
        )),
    );
    set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vec![0.0, -1.5, 2.25])),
    );
    set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vec![1, 2, 3, 6])),
    );
    set(
        "t.bools",
        Value::Array(Array::Bool(vec![true, false, true])),
    );
    set("t.u8s", Value::Array(Array::U8(vec![0, 1, 255])));
    set("t.u64s", Value::Array(Array::U64(vec![u64::MAX, 0])));
    set("t.f64s", Value::Array(Array::F64(vec![f64::MIN_POSITIVE])));
    set(
        "t.no_strings",
        Value::Array(Array::String(Default::default())),
    );
    md
}

fn sample_tensors() -> Vec<TensorSpec> {
    let spec = |name: &str, shape: &[u64], ty| TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        ty,
    };
    vec![
        spec("token_embd.weight", &[8, 2], GgmlType::F32),
        spec("blk.0.attn_q.weight", &[32, 2], GgmlType::Q8_0),
        spec("blk.0.ffn_down.weight", &[512, 2, 1], GgmlType::Q4_K),
        // 6 bytes: the next tensor needs padding.
        spec("blk.0.attn_norm.weight", &[3], GgmlType::F16),
        spec("t.4d", &[2, 1, 1, 2], GgmlType::F32),
        spec(&"n".repeat(MAX_NAME_LEN), &[256], GgmlType::Q4_K),
    ]
}

/// Writes the sample model with `GgufWriter`; returns its bytes and each tensor's data.
fn write_sample(
    dir: &Path,
    version: u32,
    alignment: Option<u32>,
) -> (PathBuf, Vec<u8>, Metadata, Vec<Vec<u8>>) {
    let mut md = sample_metadata();
    if let Some(a) = alignment {
        md.set("general.alignment", Value::U32(a));
    }
    let specs = sample_tensors();
    let path = dir.join(format!("v{version}-a{}.gguf", alignment.unwrap_or(0)));
    let mut w = GgufWriter::create(&path, version, &md, &specs, &[]).expect("writer");
    let mut datas = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let n = nbytes(&s.shape, s.ty).unwrap() as usize;
        let data: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
        w.write_tensor(&data).expect("tensor data");
        datas.push(data);
    }
    w.finish().expect("finish");
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes, md, datas)
}

/// The writer's sample file (v3, default alignment), made once.
fn sample_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = common::tempdir();
        write_sample(dir.path(), 3, None).1
    })
}

/// Byte length of a file's meaningful content: the end of its last tensor's data.
fn data_end(h: &Header) -> usize {
    let last = h.tensors.last().expect("tensors");
    (h.data_offset + last.offset + last.nbytes) as usize
}

/// What any accepted header must satisfy, whatever the input.
fn check_invariants(h: &Header, file_len: usize) {
    assert!(h.version == 2 || h.version == 3);
    assert!(h.alignment.is_power_of_two());
    assert_eq!(h.data_offset % h.alignment, 0);
    let mut expected = 0;
    for t in &h.tensors {
        assert!(t.name.len() <= MAX_NAME_LEN, "{t:?}");
        assert!((1..=4).contains(&t.shape.len()), "{t:?}");
        assert!(!t.shape.contains(&0), "{t:?}");
        assert_eq!(Ok(t.nbytes), nbytes(&t.shape, t.ty), "{t:?}");
        assert_eq!(t.offset, expected, "{t:?}");
        let end = h.data_offset + t.offset + t.nbytes;
        assert!(end <= file_len as u64, "{t:?} ends past the file");
        expected = (t.offset + t.nbytes).next_multiple_of(h.alignment);
    }
}

#[test]
fn tracking_allocator_sees_allocations() {
    LARGEST.with(|m| m.set(0));
    let v: Vec<u8> = Vec::with_capacity(1 << 20);
    assert!(LARGEST.with(Cell::get) >= 1 << 20);
    drop(v);
}

#[test]
fn type_ids_match_the_table() {
    assert_eq!(GgmlType::from_id(F32), Some(GgmlType::F32));
    assert_eq!(GgmlType::from_id(Q8_0), Some(GgmlType::Q8_0));
    assert_eq!(GgmlType::from_id(Q4_K), Some(GgmlType::Q4_K));
}

#[test]
fn writer_output_parses_back() {
    let dir = common::tempdir();
    for version in [2, 3] {
        for alignment in [None, Some(1), Some(8), Some(64), Some(4096)] {
            let (path, bytes, md, datas) = write_sample(dir.path(), version, alignment);
            let h = parses(&bytes);
            check_invariants(&h, bytes.len());
            assert!(ggml_accepts(&bytes));
            assert_eq!(h.version, version);
            assert_eq!(h.alignment, u64::from(alignment.unwrap_or(32)));
            assert_eq!(h.metadata, md);
            let specs = sample_tensors();
            assert_eq!(h.tensors.len(), specs.len());
            for (t, s) in h.tensors.iter().zip(&specs) {
                assert_eq!((&t.name, &t.shape, t.ty), (&s.name, &s.shape, s.ty));
            }
            assert_eq!(
                data_end(&h).next_multiple_of(h.alignment as usize),
                bytes.len()
            );

            let file = GgufFile::open(&path).expect("open");
            for (i, data) in datas.iter().enumerate() {
                assert_eq!(file.tensor_data(i), &data[..], "tensor {i}");
            }
        }
    }
}

#[test]
fn builder_matches_the_writer() {
    let h = parses(&valid());
    check_invariants(&h, valid().len());
    assert!(ggml_accepts(&valid()));
    let offsets: Vec<u64> = h.tensors.iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 64, 160]);

    let dir = common::tempdir();
    let path = dir.path().join("same.gguf");
    let mut md = Metadata::new();
    md.set("general.architecture", Value::String("llama".into()));
    md.set("general.alignment", Value::U32(32));
    let specs: Vec<TensorSpec> = h
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ty: t.ty,
        })
        .collect();
    let mut w = GgufWriter::create(&path, 3, &md, &specs, &[]).unwrap();
    for t in &h.tensors {
        w.write_tensor(&vec![0x5a; t.nbytes as usize]).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), valid());
}

// ---------------------------------------------------------------------------------------------
// Truncation

/// Every prefix shorter than the end of the last tensor's data fails with a truncation error;
/// every longer one (only the final padding missing) parses.
fn check_every_prefix(bytes: &[u8]) {
    let full = parses(bytes);
    let end = data_end(&full);
    let data_offset = full.data_offset as usize;
    for k in 0..=bytes.len() {
        let prefix = &bytes[..k];
        if k >= end {
            check_invariants(&parses(prefix), k);
            continue;
        }
        let e = fails(prefix);
        if k < data_offset {
            // Cut inside the header or its padding: only "not enough bytes" errors are possible.
            assert!(
                matches!(
                    e,
                    FormatError::Truncated { .. } | FormatError::ImpossibleCount { .. }
                ),
                "cut at {k}: {e}"
            );
        } else {
            assert!(
                matches!(e, FormatError::DataOutOfBounds { .. }),
                "cut at {k}: {e}"
            );
        }
    }
}

#[test]
fn every_prefix_of_the_built_file_fails() {
    check_every_prefix(&valid());
}

#[test]
fn every_prefix_of_the_written_file_fails() {
    check_every_prefix(sample_bytes());
}

#[test]
fn every_prefix_of_a_v2_file_with_alignment_1_fails() {
    let dir = common::tempdir();
    check_every_prefix(&write_sample(dir.path(), 2, Some(1)).1);
}

#[test]
fn truncated_real_model_fails_cleanly() {
    let path = common::smollm2();
    let bytes = std::fs::read(&path).expect("read the model");
    let full = parse_at(&bytes, &path).expect("the real model parses");
    check_invariants(&full, bytes.len());
    let data_offset = full.data_offset as usize;
    let end = data_end(&full);
    assert!(end <= bytes.len());

    let mut cuts: Vec<usize> = (0..200).map(|i| i * data_offset / 200).collect();
    cuts.extend((0..50).map(|i| data_offset + i * (end - data_offset) / 50));
    cuts.extend([1, 3, 4, 23, 24, data_offset - 1, data_offset, end - 1]);
    for k in cuts {
        let e = match parse_at(&bytes[..k], &path) {
            Ok(_) => panic!("the model cut at byte {k} of {} was accepted", bytes.len()),
            Err(e) => e,
        };
        assert!(
            e.to_string().starts_with(&path.display().to_string()),
            "error does not name the file: {e}"
        );
        if k < data_offset {
            assert!(
                matches!(
                    e,
                    FormatError::Truncated { .. } | FormatError::ImpossibleCount { .. }
                ),
                "cut at {k}: {e}"
            );
        } else {
            // The error names the first tensor whose data the cut removes.
            let first_cut = full
                .tensors
                .iter()
                .find(|t| (data_offset as u64 + t.offset + t.nbytes) > k as u64)
                .unwrap();
            assert!(
                matches!(&e, FormatError::DataOutOfBounds { name, file_len, .. }
                    if *name == first_cut.name && *file_len == k as u64),
                "cut at {k}: {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Magic and version

#[test]
fn bad_magic_and_tiny_files() {
    assert_fails!(
        b"",
        FormatError::Truncated {
            needed: 4,
            available: 0,
            ..
        }
    );
    assert_fails!(b"GGU", FormatError::Truncated { .. });
    assert_fails!(b"GGUF", FormatError::Truncated { offset: 4, .. });
    assert_fails!(b"GGUF\x03\0\0", FormatError::Truncated { .. });
    for magic in [b"GGML", b"gguf", b"FUGG", b"\0\0\0\0", b"GGJT"] {
        let mut bytes = valid();
        bytes[..4].copy_from_slice(magic);
        let e = assert_fails!(bytes, FormatError::BadMagic { found, .. } if found == magic);
        says(&e, &["not a GGUF file"]);
    }
}

#[test]
fn unsupported_versions() {
    let with_version = |v: u32| {
        let mut bytes = valid();
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        bytes
    };
    for (version, hint) in [
        (1, "v1"),
        (4, ""),
        (5, ""),
        (u32::MAX, ""),
        (0x0300_0000, "big-endian"),
        (0x0200_0000, "big-endian"),
    ] {
        let e = assert_fails!(
            with_version(version),
            FormatError::UnsupportedVersion { version: v, .. } if *v == version
        );
        says(&e, &[&format!("version {version}"), hint]);
    }
    assert_fails!(
        with_version(0),
        FormatError::UnsupportedVersion { version: 0, .. }
    );
    assert_eq!(parses(&with_version(2)).version, 2);
}

// ---------------------------------------------------------------------------------------------
// Counts and lengths

#[test]
fn hostile_counts() {
    let huge = [u64::MAX, u64::MAX / 32 + 1, 1 << 63, 1 << 40, 1 << 32];
    for n in huge {
        // Tensor count: each info is at least 32 bytes.
        let mut bytes = valid();
        bytes[8..16].copy_from_slice(&n.to_le_bytes());
        let e = assert_fails!(
            bytes,
            FormatError::ImpossibleCount { count, offset: 8, .. } if *count == n
        );
        says(&e, &["tensor count", &n.to_string()]);
        // Key/value count: each is at least 13 bytes.
        let mut bytes = valid();
        bytes[16..24].copy_from_slice(&n.to_le_bytes());
        let e = assert_fails!(
            bytes,
            FormatError::ImpossibleCount { count, offset: 16, .. } if *count == n
        );
        says(&e, &["metadata key/value count"]);
    }
    // Counts that fit in the file but promise more entries than there are.
    let mut bytes = valid();
    bytes[8..16].copy_from_slice(&4u64.to_le_bytes());
    fails(&bytes);
    let mut bytes = valid();
    bytes[16..24].copy_from_slice(&3u64.to_le_bytes());
    fails(&bytes);
    // No tensors, no keys, nothing else: a valid (empty) file.
    let h = parses(&Bytes::start(3, 0, 0).build());
    assert!(h.tensors.is_empty() && h.metadata.is_empty());
}

/// Counts as large as the bytes left allow, followed by garbage: the parse fails at the first
/// entry, and must not have reserved memory for all the entries the count promised (which,
/// bounded only by the file size, would be several times a multi-GB model file).
#[test]
fn counts_that_fit_the_file_reserve_little() {
    let len = 16usize << 20;
    let starts = [
        ("tensor", Bytes::start(3, (len as u64 - 24) / 32, 0)),
        ("key/value", Bytes::start(3, 0, (len as u64 - 24) / 13)),
        (
            "string array",
            Bytes::start(3, 0, 1).array("k", T_STRING, (len as u64 - 53) / 8),
        ),
    ];
    for (what, start) in starts {
        // 0xff: the first name, key or string claims 2^64 - 1 bytes.
        let mut bytes = start.build();
        bytes.resize(len, 0xff);
        LARGEST.with(|m| m.set(0));
        let e = fails(&bytes);
        let largest = LARGEST.with(Cell::get);
        assert!(matches!(e, FormatError::Truncated { .. }), "{what}: {e}");
        assert!(
            largest <= 1 << 20,
            "{what}: a count that fits a {len}-byte file reserved {largest} bytes"
        );
    }
}

#[test]
fn hostile_array_lengths() {
    for len in [u64::MAX, u64::MAX / 8 + 1, 1 << 63, 1 << 40, 1 << 20] {
        for elem in [T_U8, T_BOOL, T_U16, T_I32, T_U64, T_STRING] {
            let bytes = Bytes::start(3, 0, 1).array("k", elem, len).data(64).build();
            let e = assert_fails!(
                bytes,
                FormatError::ImpossibleCount { count, .. } if *count == len
            );
            says(&e, &["array length of metadata key \"k\""]);
        }
    }
    // A length that fits the bytes left but not the elements actually there.
    let bytes = Bytes::start(3, 0, 1)
        .array("k", T_STRING, 3)
        .str("one")
        .str("two two two")
        .build();
    assert_fails!(bytes, FormatError::Truncated { .. });
}

#[test]
fn hostile_string_lengths() {
    for len in [u64::MAX, u64::MAX - 7, 1 << 63, 1 << 40, 1000] {
        let tail = Bytes::default().raw(b"abc").data(64);
        // In a key.
        let bytes = Bytes::start(3, 0, 1).u64(len).raw(&tail.0).build();
        assert_fails!(bytes, FormatError::Truncated { needed, .. } if *needed == len);
        // In a string value.
        let bytes = one_key(T_STRING, Bytes::default().u64(len).raw(&tail.0));
        assert_fails!(bytes, FormatError::Truncated { needed, .. } if *needed == len);
        // In an array element.
        let bytes = Bytes::start(3, 0, 1)
            .array("k", T_STRING, 2)
            .str("ok")
            .u64(len)
            .raw(&tail.0)
            .build();
        assert_fails!(bytes, FormatError::Truncated { needed, .. } if *needed == len);
        // In a tensor name.
        let bytes = Bytes::start(3, 1, 0).u64(len).raw(&tail.0).build();
        assert_fails!(bytes, FormatError::Truncated { needed, .. } if *needed == len);
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata values and keys

#[test]
fn unknown_value_types() {
    for id in [13, 14, 255, 0x0800_0000, u32::MAX] {
        let bytes = one_key(id, Bytes::default().data(64));
        let e = assert_fails!(
            bytes,
            FormatError::UnknownValueType { key, id: found, .. } if key == "k" && *found == id
        );
        says(&e, &[&id.to_string()]);
        // As an array's element type.
        let bytes = Bytes::start(3, 0, 1).array("k", id, 1).data(64).build();
        assert_fails!(
            bytes,
            FormatError::UnknownValueType { id: found, .. } if *found == id
        );
    }
}

#[test]
fn nested_arrays_are_refused() {
    let inner = Bytes::default().u32(T_U8).u64(1).u8(7);
    let bytes = Bytes::start(3, 0, 1)
        .array("k", T_ARRAY, 1)
        .raw(&inner.0)
        .build();
    let e = assert_fails!(bytes, FormatError::BadValue { key, .. } if key == "k");
    says(&e, &["nested"]);
    // Even an empty one.
    let bytes = Bytes::start(3, 0, 1).array("k", T_ARRAY, 0).build();
    assert_fails!(bytes, FormatError::BadValue { .. });
}

#[test]
fn bools_must_be_0_or_1() {
    for b in [2, 3, 0x80, 0xff] {
        let e = assert_fails!(
            one_key(T_BOOL, Bytes::default().u8(b)),
            FormatError::BadValue { key, .. } if key == "k"
        );
        says(&e, &["bool", &b.to_string()]);
        let bytes = Bytes::start(3, 0, 1)
            .array("k", T_BOOL, 3)
            .raw(&[1, 0, b])
            .build();
        assert_fails!(bytes, FormatError::BadValue { .. });
    }
    for b in [0, 1] {
        let h = parses(&one_key(T_BOOL, Bytes::default().u8(b)));
        assert_eq!(h.metadata.get("k"), Some(&Value::Bool(b == 1)));
    }
}

#[test]
fn truncated_scalar_values() {
    for (ty, size) in [(T_U8, 1), (T_U16, 2), (T_U32, 4), (T_U64, 8)] {
        for have in 0..size {
            let bytes = one_key(ty, Bytes::default().raw(&[1; 8][..have]));
            assert_fails!(bytes, FormatError::Truncated { needed, .. } if *needed == size as u64);
        }
    }
}

#[test]
fn invalid_utf8() {
    let bad: &[&[u8]] = &[b"\xff", b"ab\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"x\x80y"];
    for &s in bad {
        // Key.
        let bytes = Bytes::start(3, 0, 1).key(s, T_U8).u8(0).build();
        let e = assert_fails!(bytes, FormatError::InvalidUtf8 { offset: 32, .. });
        says(&e, &["key of metadata entry 0", "UTF-8"]);
        // String value.
        let bytes = one_key(T_STRING, Bytes::default().str(s));
        assert_fails!(bytes, FormatError::InvalidUtf8 { .. });
        // Array element.
        let bytes = Bytes::start(3, 0, 1)
            .array("k", T_STRING, 2)
            .str("fine")
            .str(s)
            .build();
        assert_fails!(bytes, FormatError::InvalidUtf8 { .. });
        // Tensor name.
        let e = assert_fails!(
            one_tensor(s, &[8], F32, 32),
            FormatError::InvalidUtf8 { .. }
        );
        says(&e, &["name of tensor 0"]);
    }
}

#[test]
fn duplicate_keys() {
    let bytes = Bytes::start(3, 0, 3)
        .kv_u32("a", 1)
        .kv_str("b", "x")
        .kv_str("a", "again")
        .build();
    let e = assert_fails!(bytes, FormatError::DuplicateKey { key, .. } if key == "a");
    says(&e, &["duplicate metadata key \"a\""]);
    // Keys differing only in case are different keys.
    let bytes = Bytes::start(3, 0, 2).kv_u32("a", 1).kv_u32("A", 2).build();
    assert_eq!(parses(&bytes).metadata.len(), 2);
}

#[test]
fn empty_keys_are_refused() {
    // gguf.cpp refuses them, so llama.cpp could not load the file.
    let bytes = Bytes::start(3, 0, 2).kv_u32("a", 1).kv_u32("", 2).build();
    let e = assert_fails!(bytes, FormatError::BadValue { key, .. } if key.is_empty());
    says(&e, &["metadata entry 1 has an empty key"]);
    assert!(!ggml_accepts(&bytes));
}

/// Files that ggml's reader accepts (header only) and ggmerge refuses, on purpose.
#[test]
fn stricter_than_ggml() {
    let cases = [
        // Keys, strings and names must be UTF-8 (GGUF says they are).
        Bytes::start(3, 0, 1).key(b"\xff", T_U8).u8(0).build(),
        one_key(T_STRING, Bytes::default().str(b"\xc3")),
        // Bools must be 0 or 1 (ggml reads any non-zero byte as true).
        one_key(T_BOOL, Bytes::default().u8(2)),
        // ggml treats 0 dims as a scalar and allows empty tensors; ggmerge's shapes are 1-4 dims,
        // none zero (the design's rule; no converter writes either).
        one_tensor("t", &[], F32, 64),
        one_tensor("t", &[8, 0], F32, 64),
        // ggml's reader does not check, without a context, that the data is in the file.
        valid_header().pad(32).data(VALID_DATA - 1).build(),
    ];
    for bytes in cases {
        fails(&bytes);
        assert!(ggml_accepts(&bytes));
    }
}

#[test]
fn bad_alignment() {
    let with = |value: Bytes| {
        let mut b = Bytes::start(3, 1, 1).raw(&value.0);
        b = b.tensor("t", &[8], F32, 0);
        b.pad(64).data(32).build()
    };
    let cases = [
        Bytes::default().kv_u32("general.alignment", 0),
        Bytes::default().kv_u32("general.alignment", 3),
        Bytes::default().kv_u32("general.alignment", 48),
        Bytes::default().kv_u32("general.alignment", u32::MAX),
        Bytes::default().kv_str("general.alignment", "32"),
        Bytes::default().key("general.alignment", T_U64).u64(32),
        Bytes::default().key("general.alignment", T_I32).u32(32),
        Bytes::default()
            .key("general.alignment", T_U16)
            .raw(&32u16.to_le_bytes()),
        Bytes::default()
            .array("general.alignment", T_U32, 1)
            .u32(32),
    ];
    for value in cases {
        let e = assert_fails!(
            with(value),
            FormatError::BadValue { key, .. } if key == "general.alignment"
        );
        says(&e, &["power of two"]);
    }
    for a in [1, 2, 16, 64] {
        let h = parses(&with(Bytes::default().kv_u32("general.alignment", a)));
        assert_eq!(h.alignment, u64::from(a));
        assert_eq!(h.data_offset % u64::from(a), 0);
    }
    // A huge alignment puts the data section past the end of the file.
    let e = fails(&with(Bytes::default().kv_u32("general.alignment", 1 << 31)));
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    // Without tensors there is no data section, so any valid alignment is fine.
    let bytes = Bytes::start(3, 0, 1)
        .kv_u32("general.alignment", 1 << 31)
        .build();
    parses(&bytes);
}

// ---------------------------------------------------------------------------------------------
// Tensor infos

#[test]
fn tensor_names() {
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let e = assert_fails!(
        one_tensor(&long, &[8], F32, 32),
        FormatError::BadTensor { name, .. } if *name == long
    );
    says(&e, &["64 bytes", "at most 63"]);
    let e = fails(&one_tensor("é".repeat(32), &[8], F32, 32));
    assert!(matches!(e, FormatError::BadTensor { .. }), "{e}");
    let ok = "x".repeat(MAX_NAME_LEN);
    assert_eq!(parses(&one_tensor(&ok, &[8], F32, 32)).tensors[0].name, ok);
    // The empty name is legal in GGUF.
    parses(&one_tensor("", &[8], F32, 32));

    let bytes = Bytes::start(3, 3, 0)
        .tensor("a", &[8], F32, 0)
        .tensor("b", &[8], F32, 32)
        .tensor("a", &[8], F32, 64)
        .pad(32)
        .data(96)
        .build();
    let e = assert_fails!(bytes, FormatError::DuplicateTensor { name, .. } if name == "a");
    says(&e, &["duplicate tensor \"a\""]);
}

#[test]
fn dimension_counts() {
    for n_dims in [0u32, 5, 8, 64, u32::MAX] {
        let shape = vec![1u64; n_dims.min(8) as usize];
        let bytes = Bytes::start(3, 1, 0)
            .tensor_dims("t", n_dims, &shape, F32, 0)
            .pad(32)
            .data(64)
            .build();
        let e = assert_fails!(bytes, FormatError::BadTensor { name, .. } if name == "t");
        says(&e, &[&format!("has {n_dims} dimensions")]);
    }
    for n_dims in 1..=4 {
        let h = parses(&one_tensor("t", &vec![1; n_dims], F32, 32));
        assert_eq!(h.tensors[0].shape.len(), n_dims);
    }
}

#[test]
fn zero_dimensions() {
    for shape in [&[0][..], &[8, 0], &[0, 8], &[8, 1, 1, 0], &[256, 0]] {
        let e = assert_fails!(
            one_tensor("t", shape, F32, 64),
            FormatError::BadTensor { .. }
        );
        says(&e, &["zero dimension"]);
    }
}

#[test]
fn element_count_overflow() {
    let shapes: &[&[u64]] = &[
        &[u64::MAX],
        &[1 << 63],
        &[u64::MAX, 2],
        &[1 << 32, 1 << 32],
        &[1 << 62, 2],
        &[2, 1 << 62],
        &[1 << 16, 1 << 16, 1 << 16, 1 << 16],
        &[u64::MAX, u64::MAX, u64::MAX, u64::MAX],
    ];
    for &shape in shapes {
        for ty in [F32, Q8_0, Q4_K] {
            let bytes = one_tensor("t", shape, ty, 64);
            let e = assert_fails!(bytes, FormatError::BadTensor { name, .. } if name == "t");
            says(&e, &["2^63 elements"]);
        }
    }
    // The element count fits in i64 but the byte size does not fit in u64.
    for shape in [&[1u64 << 62][..], &[i64::MAX as u64], &[1 << 31, 1 << 31]] {
        fails(&one_tensor("t", shape, F32, 64));
    }
    // Sizes that fit but are far beyond the file.
    let e = fails(&one_tensor("t", &[1 << 40], F32, 64));
    assert!(matches!(e, FormatError::DataOutOfBounds { .. }), "{e}");
}

#[test]
fn unknown_and_removed_tensor_types() {
    for id in [
        4,
        5,
        31,
        32,
        33,
        36,
        37,
        38,
        43,
        44,
        100,
        1000,
        0x0100_0000,
        u32::MAX,
    ] {
        let e = assert_fails!(
            one_tensor("t", &[256], id, 1024),
            FormatError::UnknownTensorType { name, id: found, .. } if name == "t" && *found == id
        );
        says(&e, &[&format!("type id {id}"), "\"t\""]);
    }
}

#[test]
fn rows_not_a_multiple_of_the_block() {
    for (ty, ne0, block) in [
        (Q4_K, 100, 256),
        (Q4_K, 128, 256),
        (Q4_K, 257, 256),
        (Q8_0, 16, 32),
        (Q8_0, 33, 32),
    ] {
        let e = assert_fails!(
            one_tensor("t", &[ne0, 256], ty, 1 << 16),
            FormatError::BadTensor { name, .. } if name == "t"
        );
        says(
            &e,
            &[&format!("row length {ne0}"), &format!("block size {block}")],
        );
    }
    // Only ne[0] is blocked: Q4_K [256, 100] is fine.
    let h = parses(&one_tensor("t", &[256, 100], Q4_K, 144 * 100));
    assert_eq!(h.tensors[0].nbytes, 144 * 100);
}

// ---------------------------------------------------------------------------------------------
// Data layout

/// [`valid`] with tensor `b`'s offset set to `b` and tensor `c`'s to `c`.
fn with_offsets(b: u64, c: u64) -> Vec<u8> {
    Bytes::start(3, 3, 2)
        .kv_str("general.architecture", "llama")
        .kv_u32("general.alignment", 32)
        .tensor("a", &[8, 2], F32, 0)
        .tensor("b", &[32, 2], Q8_0, b)
        .tensor("c", &[256], Q4_K, c)
        .pad(32)
        .data(VALID_DATA + 1024)
        .build()
}

#[test]
fn offsets_must_be_contiguous_and_aligned() {
    let bad_offset = |bytes: Vec<u8>, tensor: &str, found: u64, expected: u64| {
        let e = assert_fails!(
            bytes,
            FormatError::BadOffset { name, found: f, expected: x, alignment: 32, .. }
                if name == tensor && *f == found && *x == expected
        );
        says(
            &e,
            &[&format!("offset {found}"), &format!("expected {expected}")],
        );
    };
    assert!(parse(&with_offsets(64, 160)).is_ok());
    // Misaligned: `c` right after `b`'s 68 bytes, not padded to 32.
    bad_offset(with_offsets(64, 132), "c", 132, 160);
    bad_offset(with_offsets(64, 161), "c", 161, 160);
    bad_offset(with_offsets(65, 160), "b", 65, 64);
    // Overlapping: `b` on top of `a`, `c` on top of `b`.
    bad_offset(with_offsets(0, 160), "b", 0, 64);
    bad_offset(with_offsets(32, 160), "b", 32, 64);
    bad_offset(with_offsets(64, 64), "c", 64, 160);
    bad_offset(with_offsets(64, 128), "c", 128, 160);
    // Gaps.
    bad_offset(with_offsets(96, 192), "b", 96, 64);
    bad_offset(with_offsets(64, 192), "c", 192, 160);
    // Out of order, and hostile values.
    bad_offset(with_offsets(160, 64), "b", 160, 64);
    bad_offset(with_offsets(u64::MAX, 160), "b", u64::MAX, 64);
    bad_offset(with_offsets(64, u64::MAX - 31), "c", u64::MAX - 31, 160);
    // The first tensor must start the data section.
    let bytes = Bytes::start(3, 1, 0)
        .tensor("t", &[8], F32, 32)
        .pad(32)
        .data(64)
        .build();
    bad_offset(bytes, "t", 32, 0);
}

#[test]
fn data_past_the_end_of_the_file() {
    let header = valid_header().pad(32);
    let header_len = header.0.len() as u64;
    // No data at all.
    let e = assert_fails!(
        header.clone().build(),
        FormatError::DataOutOfBounds { name, end, .. } if name == "a" && *end == header_len + 64
    );
    says(&e, &["truncated"]);
    // Data of `a` only.
    assert_fails!(
        header.clone().data(64).build(),
        FormatError::DataOutOfBounds { name, .. } if name == "b"
    );
    // One byte short.
    assert_fails!(
        header.clone().data(VALID_DATA - 1).build(),
        FormatError::DataOutOfBounds { name, end, file_len, .. }
            if name == "c" && *end == *file_len + 1
    );
    // Exactly enough (no final padding) is accepted.
    parses(&header.data(VALID_DATA).build());
    // Header without its padding.
    let e = assert_fails!(valid_header().build(), FormatError::Truncated { .. });
    says(&e, &["padding before the data section"]);
}

// ---------------------------------------------------------------------------------------------
// Random mutations

/// One edit: at a position, either XOR one bit or replace the byte.
fn edit() -> impl Strategy<Value = (prop::sample::Index, u8, bool)> {
    (any::<prop::sample::Index>(), any::<u8>(), any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec(edit(), 1..=8),
        cut in any::<Option<prop::sample::Index>>(),
        built in any::<bool>(),
    ) {
        let mut bytes = if built { valid() } else { sample_bytes().to_vec() };
        for (at, byte, flip) in edits {
            let i = at.index(bytes.len());
            if flip {
                bytes[i] ^= 1 << (byte % 8);
            } else {
                bytes[i] = byte;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        match parse(&bytes) {
            Ok(h) => {
                check_invariants(&h, bytes.len());
                prop_assert!(ggml_accepts(&bytes), "accepted, but ggml refuses it");
            }
            Err(e) => prop_assert!(e.to_string().starts_with(PATH), "{}", e),
        }
    }

    #[test]
    fn mutated_header_counts_never_panic(
        field in 0usize..3,
        value in prop_oneof![
            any::<u64>(),
            0u64..64,
            (0u32..64).prop_map(|s| 1u64 << s),
            (0u32..64).prop_map(|s| (1u64 << s).wrapping_sub(1)),
        ],
    ) {
        // Overwrite the version (low half), tensor count or key count of the written sample.
        let mut bytes = sample_bytes().to_vec();
        match field {
            0 => bytes[4..8].copy_from_slice(&(value as u32).to_le_bytes()),
            1 => bytes[8..16].copy_from_slice(&value.to_le_bytes()),
            _ => bytes[16..24].copy_from_slice(&value.to_le_bytes()),
        }
        if let Ok(h) = parse(&bytes) {
            check_invariants(&h, bytes.len());
            prop_assert!(ggml_accepts(&bytes), "accepted, but ggml refuses it");
        }
    }
}
