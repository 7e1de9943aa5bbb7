#!/usr/bin/env bash
# The main job, end to end on a real model: set up, build, fetch SmolLM2-135M-Instruct (Q4_1),
# inspect it, requantize it to llama.cpp's Q4_K_M mixture and to Q8_0, and inspect the result.
# Outputs go to ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
models=$(scripts/fetch-models.sh)
cargo build --release --quiet
ggmerge=target/release/ggmerge
mkdir -p out
smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"

echo "== ggmerge inspect $smol"
$ggmerge inspect "$smol"
echo
echo "== ggmerge quantize -> Q4_K_M"
$ggmerge quantize "$smol" out/SmolLM2-135M-Instruct.Q4_K_M.gguf Q4_K_M -t "$(nproc)"
echo
echo "== ggmerge quantize -> Q8_0"
$ggmerge quantize "$smol" out/SmolLM2-135M-Instruct.Q8_0.gguf Q8_0 -t "$(nproc)"
echo
echo "== ggmerge inspect out/SmolLM2-135M-Instruct.Q4_K_M.gguf --tensors (first rows)"
$ggmerge inspect out/SmolLM2-135M-Instruct.Q4_K_M.gguf --tensors | sed -n '1,20p;/^tensor /,+12p'
