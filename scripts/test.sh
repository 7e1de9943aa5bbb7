#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs build/test dependencies, fetches the real
# test models (cached in .cache/models), then runs every test optimized (the real-model tests
# are 20-50x slower unoptimized; --release also reuses the llama.cpp build of the binary).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
GGMERGE_MODELS=${GGMERGE_MODELS:-$PWD/.cache/models} scripts/fetch-models.sh >/dev/null
export GGMERGE_MODELS=${GGMERGE_MODELS:-$PWD/.cache/models}
cargo test --release "$@"
