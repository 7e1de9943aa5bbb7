//! Fuzzes the GGUF header parser: any input must give `Ok` or a `FormatError`, never a panic,
//! an out-of-bounds read or a huge allocation (libFuzzer's `-rss_limit_mb` catches the last).
#![no_main]

use std::path::Path;

use ggmerge::format::gguf::read::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = parse_header(data, Path::new("fuzz")) {
        // Every tensor an accepted header describes lies inside the input.
        for t in &header.tensors {
            let end = header.data_offset + t.offset + t.nbytes;
            assert!(end <= data.len() as u64, "tensor {:?} ends past the input", t.name);
        }
    }
});
