#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a few minutes each (by hand, not in CI):
#   gguf_header, safetensors_header, delta_pack, merge_config (fuzz/README.md describes them).
# Usage: scripts/fuzz.sh [TARGET...]        (default: all four, one after the other)
# Environment:
#   FUZZ_SECONDS  seconds per target (default 180)
#   FUZZ_JOBS     libFuzzer processes per target (default 1: -jobs=1 -workers=1)
#   FUZZ_ARGS     more libFuzzer options, after the target's own (e.g. "-len_control=0 -timeout=3"
#                 to try long inputs at once and flag slow ones sooner)
#   FUZZ_CMIN     1 to minimize each working corpus afterwards with `cargo fuzz cmin` (default 0)
#   FUZZ_PICK     N > 0 to refresh the committed corpus afterwards with the N inputs that cover
#                 the most (fuzz/pick_corpus.py; default 0: leave it alone)
# Needs a nightly toolchain and cargo-fuzz; both are installed when missing. Each target reads
# the committed corpus fuzz/corpus/TARGET/ (seeds and a few dozen picked inputs) and keeps what
# it finds in fuzz/corpus-work/TARGET/ (ignored by git, kept between runs). Crashes, timeouts
# and out-of-memory inputs go to fuzz/artifacts/TARGET/ (ignored by git: copy a reproducer worth
# keeping to fuzz/artifacts-found/). Logs: fuzz/logs/TARGET.log. Exits 1 if any target found
# something.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-180}
jobs=${FUZZ_JOBS:-1}

scripts/setup.sh
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain (cargo fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi

# Per-target libFuzzer options. -max_len bounds the inputs (the seeds are all far smaller);
# -timeout (seconds per input) flags slow inputs such as deeply nested configs; -rss_limit_mb
# flags inputs that make a huge allocation.
opts() {
  case $1 in
    gguf_header | safetensors_header) echo "-max_len=65536 -timeout=10 -rss_limit_mb=2048" ;;
    delta_pack) echo "-max_len=16384 -timeout=10 -rss_limit_mb=2048" ;;
    merge_config) echo "-max_len=65536 -timeout=10 -rss_limit_mb=2048" ;;
    *) echo "unknown fuzz target $1" >&2; exit 2 ;;
  esac
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_header safetensors_header delta_pack merge_config)
mkdir -p fuzz/logs
failed=()
for t in "${targets[@]}"; do
  o="$(opts "$t") ${FUZZ_ARGS:-}"
  mkdir -p "fuzz/corpus/$t" "fuzz/corpus-work/$t"
  echo "== $t: ${secs}s, $o, corpus $(ls "fuzz/corpus/$t" | wc -l) committed +" \
    "$(ls "fuzz/corpus-work/$t" | wc -l) working files" >&2
  cargo +nightly fuzz build "$t"
  # libFuzzer writes the jobs' output to fuzz-N.log in the working directory.
  # shellcheck disable=SC2086
  if (cd fuzz/logs && cargo +nightly fuzz run --fuzz-dir .. "$t" "../corpus-work/$t" "../corpus/$t" -- \
        $o -max_total_time="$secs" -jobs="$jobs" -workers="$jobs" -print_final_stats=1 \
        -artifact_prefix="../artifacts/$t/"); then
    status=ok
  else
    status=FOUND
    failed+=("$t")
  fi
  cat fuzz/logs/fuzz-*.log > "fuzz/logs/$t.log" 2>/dev/null || true
  rm -f fuzz/logs/fuzz-*.log
  echo "== $t: $status; working corpus $(ls "fuzz/corpus-work/$t" | wc -l) files;" \
    "$(grep -o 'exec/s: [0-9]*' "fuzz/logs/$t.log" | tail -1)" >&2
  if [ "${FUZZ_CMIN:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    cargo +nightly fuzz cmin "$t" "fuzz/corpus-work/$t" -- $o
    echo "== $t: working corpus after cmin $(ls "fuzz/corpus-work/$t" | wc -l) files" >&2
  fi
  if [ "${FUZZ_PICK:-0}" -gt 0 ]; then
    fuzz/pick_corpus.py "$t" "$FUZZ_PICK"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "found crashes, timeouts or OOMs in: ${failed[*]} (see fuzz/artifacts/)" >&2
  exit 1
fi
