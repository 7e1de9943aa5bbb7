#!/usr/bin/env bash
# The main job, end to end on a real model (SmolLM2-135M-Instruct, Q4_1, fetched from PyPI):
#   inspect → quantize to Q4_K_M → make two synthetic fine-tunes → merge them with dare_ties
#   into the quantized base → extract them as delta packs → run llama.cpp with the packs applied
#   at load time → switch the expert mixture inside one chat session.
# Outputs go to ./out/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
models=$(scripts/fetch-models.sh)
cargo build --release --quiet --bins --examples
G=target/release/ggmerge
mkdir -p out
smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
t=$(nproc)

step() { printf '\n== %s\n' "$*"; }

step "inspect the base"
$G inspect "$smol" | sed -n '1,16p'

step "quantize the base to llama.cpp's Q4_K_M mixture"
$G quantize "$smol" out/SmolLM2-135M-Instruct.Q4_K_M.gguf Q4_K_M -t "$t"

step "two synthetic fine-tunes at F16 (the real base perturbed by 2% of each tensor's RMS)"
target/release/examples/make_expert "$smol" out/math.f16.gguf --seed 1 --rel 2e-2 --type F16
target/release/examples/make_expert "$smol" out/code.f16.gguf --seed 2 --rel 2e-2 --type F16

step "merge them into the Q4_1 base with DARE-TIES (output keeps the base's types)"
$G merge --base "$smol" \
  --model out/math.f16.gguf --weight 0.5 --density 0.1 \
  --model out/code.f16.gguf --weight 0.5 --density 0.1 \
  --method dare_ties --seed 42 -t "$t" -o out/merged.gguf

step "extract each fine-tune as a sparse delta pack (density 0.1)"
$G extract --base "$smol" --finetuned out/math.f16.gguf --density 0.1 --seed 42 -o out/math.dpk.gguf -t "$t"
$G extract --base "$smol" --finetuned out/code.f16.gguf --density 0.1 --seed 42 -o out/code.dpk.gguf -t "$t"

step "run llama.cpp on the base with both packs applied in memory (no merged file)"
$G run --base "$smol" --expert out/math.dpk.gguf:0.5 --expert out/code.dpk.gguf:0.5 \
  -p "The capital of France is" -n 24 -c 512 -t "$t"

step "chat, switching experts in place (/experts), the second switch back is cached"
printf '/experts\nWhat is the capital of France?\n/experts math=0 code=1\nWhat is the capital of France?\n/experts math=1 code=0\n/quit\n' |
  $G chat --base "$smol" --expert out/math.dpk.gguf --expert out/code.dpk.gguf:0 -n 24 -c 512 -t "$t"

step "score questions under a mixture: greedy exact match and answer log-likelihood"
printf '%s\n' \
  '{"prompt": "Question: What is the capital of France?\nAnswer:", "answer": " Paris"}' \
  '{"prompt": "Question: What is the capital of Italy?\nAnswer:", "answer": " Rome"}' \
  '{"prompt": "Question: What is the capital of Japan?\nAnswer:", "answer": " Tokyo"}' >out/capitals.jsonl
$G eval --base "$smol" --expert out/math.dpk.gguf:0.5 --expert out/code.dpk.gguf:0.5 \
  -f out/capitals.jsonl -c 512 -t "$t" -v
