#!/usr/bin/env bash
# A ggmerge for other x86-64 Linux machines: llama.cpp's ggml as shared libraries, its CPU
# backend built once per x86-64 level (sse42 … haswell … zen4, sapphirerapids) and the best one
# for the running CPU loaded at start (cargo feature dynamic-backends). The default build instead
# compiles ggml-cpu for AVX2/FMA/F16C/BMI2 only.
#
# Output: target/portable/dist/ — the binary, libllama/libggml/libggml-base and the
# libggml-cpu-*.so variants. Copy the directory anywhere and run
#   LD_LIBRARY_PATH=DIR DIR/ggmerge …
# (ggml looks for the CPU variants beside the executable). The build compiles ggml-cpu 14 times:
# about 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR=target/portable
cargo build --release --features dynamic-backends --bins
out=$(ls -d "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/backends | head -1)
out=${out%/backends}
dist=$CARGO_TARGET_DIR/dist
rm -rf "$dist"
mkdir -p "$dist"
cp "$CARGO_TARGET_DIR/release/ggmerge" "$dist/"
cp -P "$out"/lib/lib*.so* "$dist/"
cp "$out"/backends/libggml-cpu-*.so "$dist/"
LD_LIBRARY_PATH=$dist "$dist/ggmerge" --version
echo "portable build in $dist ($(du -sh "$dist" | cut -f1)): run it as LD_LIBRARY_PATH=$dist $dist/ggmerge"
