#!/usr/bin/env bash
# Issue 5's experiments, end to end (see docs/results.md): builds ggmerge, makes the F32 base
# (SmolLM2-135M-Instruct, the Q4_1 fixture dequantized), writes the invented-fact datasets,
# fine-tunes one knowledge expert per domain with llama.cpp's training API
# (`ggmerge finetune`), then runs every experiment and writes docs/results.md and its plots.
# Experiment 6 also runs on Gemma 3 270M (the Q4_K_M fixture dequantized to F32), whose
# experts are trained by scripts/train_gemma_expert.py (JAX on the CPU, installed here with
# pip): llama.cpp cannot train Gemma (ggml has no backward pass for GEGLU).
#
# Experts and intermediate files live in $GGMERGE_EXPERIMENTS (default
# ~/.cache/ggmerge-experiments), outside the repository; experts are recreated only when
# missing (delete them to retrain after changing the recipe below). Threads: $THREADS (default:
# all cores). Set ONLY=experts to stop after fine-tuning, ONLY=gemma-requant-modes to train the
# Gemma experts if missing and run only experiment 6 on Gemma (its part of docs/results.md is
# replaced, the rest kept).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
work=${GGMERGE_EXPERIMENTS:-$HOME/.cache/ggmerge-experiments}
mkdir -p "$work"

scripts/setup.sh
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq fonts-dejavu-core >/dev/null; }
models=$(scripts/fetch-models.sh)
cargo build --release --quiet --bins --example experiments
ggmerge=target/release/ggmerge
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# Fine-tuning settings (calibrated on this base; see docs/results.md): windows of CTX tokens
# without overlap, the learning rate decaying from LR to LR_MIN over EPOCHS (this recipe
# reaches over 50% exact match on the 12 facts of each expert). The two experts train at the
# same time, one thread each (on 2 cores this is faster than one after the other with 2 threads
# each).
LR=1e-4
LR_MIN=1e-5
EPOCHS=8
CTX=256

base=$work/smollm2-135m-f32.gguf
if [ "${ONLY:-}" = gemma-requant-modes ]; then :; elif [ ! -f "$base" ]; then
  log "F32 base: $ggmerge quantize SmolLM2-135M-Instruct.Q4_1.gguf F32"
  "$ggmerge" quantize "$models/SmolLM2-135M-Instruct.Q4_1.gguf" "$base" F32 -q
fi
target/release/examples/experiments data "$work"
finetune() {
  local domain=$1 expert=$work/expert-$1.gguf start
  [ -f "$expert" ] && return 0
  log "fine-tuning the $domain expert (lr $LR to $LR_MIN, $EPOCHS epochs, ctx $CTX, 1 thread)"
  start=$(date +%s)
  "$ggmerge" finetune --base "$base" --data "$work/data/$domain.train.txt" \
    -o "$expert.partial" --lr "$LR" --lr-min "$LR_MIN" --epochs "$EPOCHS" --ctx "$CTX" --stride "$CTX" \
    --val-split 0 -t 1 >"$work/finetune-$domain.log" 2>&1 || {
    tail -20 "$work/finetune-$domain.log" >&2
    return 1
  }
  mv "$expert.partial" "$expert"
  echo "$(($(date +%s) - start))" >"$work/finetune-$domain.seconds"
  log "  $domain expert done in $(cat "$work/finetune-$domain.seconds") s"
}
if [ "${ONLY:-}" != gemma-requant-modes ]; then
  finetune capitals &
  first=$!
  finetune birthplaces
  wait "$first"
fi

# The Gemma experts: the same facts, text and recipe, trained by scripts/train_gemma_expert.py
# on llama.cpp's token ids (`experiments tokens`), one thread each, both at once.
gemma_base=$work/gemma3-270m-f32.gguf
if [ ! -f "$gemma_base" ]; then
  log "F32 Gemma base: $ggmerge quantize gemma-3-270m-q4_k_m.gguf F32"
  "$ggmerge" quantize "$models/gemma-3-270m-q4_k_m.gguf" "$gemma_base" F32 -q
fi
py=${PYTHON:-python3}
gemma_train() {
  local domain=$1 expert=$work/gemma-expert-$1.gguf dir=$work/gemma-train start
  [ -f "$expert" ] && return 0
  mkdir -p "$dir"
  log "training the Gemma $domain expert (scripts/train_gemma_expert.py, lr $LR to $LR_MIN, $EPOCHS epochs, ctx $CTX, 1 thread)"
  start=$(date +%s)
  target/release/examples/experiments tokens "$gemma_base" "$work/data/$domain.train.txt" \
    "$dir/$domain.tokens.json" 2>"$dir/$domain.tokens.log" || {
    tail -5 "$dir/$domain.tokens.log" >&2
    return 1
  }
  "$py" scripts/train_gemma_expert.py --base "$gemma_base" --tokens "$dir/$domain.tokens.json" \
    --out "$expert" --lr "$LR" --lr-min "$LR_MIN" --epochs "$EPOCHS" --ctx "$CTX" --stride "$CTX" \
    --threads 1 --log "$dir/$domain.log.json" >"$work/gemma-finetune-$domain.log" 2>&1 || {
    tail -20 "$work/gemma-finetune-$domain.log" >&2
    return 1
  }
  echo "$(($(date +%s) - start))" >"$work/gemma-finetune-$domain.seconds"
  log "  Gemma $domain expert done in $(cat "$work/gemma-finetune-$domain.seconds") s"
}
if [ ! -f "$work/gemma-expert-capitals.gguf" ] || [ ! -f "$work/gemma-expert-birthplaces.gguf" ]; then
  "$py" -c 'import jax, gguf' 2>/dev/null || "$py" -m pip install --quiet 'jax[cpu]' gguf
fi
gemma_train capitals &
first=$!
gemma_train birthplaces
wait "$first"
[ "${ONLY:-}" = experts ] && exit 0
if [ "${ONLY:-}" = gemma-requant-modes ]; then
  log "experiment 6 on Gemma"
  exec target/release/examples/experiments run "$work" -t "$threads" --only gemma-requant-modes
fi

log "experiments"
target/release/examples/experiments run "$work" -t "$threads"
