#!/usr/bin/env bash
# Merge benchmark (DESIGN.md "Performance model"): on each real fixture, the wall time and peak
# RSS of a 2-expert dare_ties merge next to `ggmerge quantize` of the base to the same types (the
# unavoidable cost: one model's worth of quantization), measured in one run on this machine.
#
# Per fixture (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M; from scripts/fetch-models.sh):
#   - two synthetic F16 fine-tunes (examples/make_expert.rs: seeds 1 and 2, rel 1e-3, all tensors);
#   - an F16 copy of the base (ggmerge quantize BASE F16);
#   - quantize: base-f16 -> the mixture that reproduces the base's per-tensor types (checked);
#   - merge:    --base BASE + 2 experts, weight 0.5, density 0.1, dare_ties, seed 1, output in
#               the base's types, once per requantization mode of $REQUANT (`--requant`;
#               default "full", the previous default; e.g. REQUANT="full grid grid-stochastic").
# Both run with the same threads (-t, default: $THREADS or nproc), alternating, timed with
# /usr/bin/time: best of $RUNS (default 2) each for wall time and for CPU time (user + system,
# a steadier ratio on a busy machine), largest peak RSS; the merge's private (anonymous) peak is sampled in one more run,
# since peak RSS also counts the pages of the memory-mapped inputs. Work files go to a temporary
# directory (under $BENCH_DIR if set), removed on exit. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
runs=${RUNS:-2}
read -r -a requants <<<"${REQUANT:-full}"

scripts/setup.sh
models=$(scripts/fetch-models.sh)
if [ ! -x /usr/bin/time ]; then
  echo "installing Debian package: time" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq time >/dev/null
fi
cargo build --release --quiet --examples --bins
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)

if [ -n "${BENCH_DIR:-}" ]; then
  mkdir -p "$BENCH_DIR"
  work=$(mktemp -d "$BENCH_DIR/ggmerge-bench.XXXXXX")
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/ggmerge-bench.XXXXXX")
fi
trap 'rm -rf "$work"' EXIT
# Copies, so that a concurrent `cargo build` cannot swap the binary between measurements.
cp target/release/ggmerge target/release/examples/make_expert "$work/"
ggmerge=$work/ggmerge
make_expert=$work/make_expert

# run_once OUT CMD...: runs CMD once, removing its output file OUT first; prints
# "WALL_SECONDS CPU_SECONDS PEAK_RSS_KIB" (CPU: user + system, all threads).
run_once() {
  local out=$1 e u s m
  shift
  rm -f "$out"
  /usr/bin/time -f '%e %U %S %M' -o "$work/time" "$@" >"$work/log" 2>&1 || {
    echo "failed: $*" >&2
    cat "$work/log" >&2
    exit 1
  }
  read -r e u s m <"$work/time"
  awk -v e="$e" -v u="$u" -v s="$s" -v m="$m" 'BEGIN { print e, u + s, m }'
}

# best A B: folds two "WALL CPU RSS" lines (A may be empty): best wall, best CPU, largest RSS.
best() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "") { print b; exit }
    split(a, x, " "); split(b, y, " ")
    print (y[1] + 0 < x[1] + 0 ? y[1] : x[1]), (y[2] + 0 < x[2] + 0 ? y[2] : x[2]), (y[3] + 0 > x[3] + 0 ? y[3] : x[3])
  }'
}

# anon_peak CMD...: runs CMD once, sampling /proc/PID/status every 20 ms; prints the largest
# RssAnon in KiB: the process's private memory, without the file-backed pages of the memory-
# mapped inputs that /usr/bin/time's peak RSS also counts (shared page cache, reclaimable).
anon_peak() {
  local peak=0 k v running=1
  rm -f "$out"
  "$@" >"$work/log" 2>&1 &
  local pid=$!
  while [ "$running" = 1 ]; do
    running=0
    while read -r k v _; do
      case $k in
        State:) [ "$v" = Z ] || running=1 ;;
        RssAnon:) [ "$v" -gt "$peak" ] && peak=$v ;;
      esac
    done 2>/dev/null <"/proc/$pid/status" || true
    sleep 0.02
  done
  wait "$pid" || { echo "failed: $*" >&2; cat "$work/log" >&2; exit 1; }
  echo "$peak"
}

# Per-tensor "name type" lines of a GGUF, sorted.
types_of() {
  "$ggmerge" inspect --json "$1" |
    python3 -c 'import json, sys; [print(t["name"], t["ty"]) for t in json.load(sys.stdin)["tensors"]]' |
    sort
}

# Warns unless $2 has the same per-tensor types as $1; $3 names what $2 is.
check_types() {
  if ! diff <(types_of "$1") <(types_of "$2") >"$work/typediff"; then
    echo "WARNING: $3 does not have the base's per-tensor types ($(grep -c '^>' "$work/typediff") tensors differ):" >&2
    head -6 "$work/typediff" >&2
  fi
}

fixtures=(
  "SmolLM2-135M Q4_1|SmolLM2-135M-Instruct.Q4_1.gguf|Q4_1"
  "Gemma3-270M Q4_K_M|gemma-3-270m-q4_k_m.gguf|Q4_K_M"
)
rows=()
memrows=()
load=$(cut -d' ' -f1-3 /proc/loadavg)
for f in "${fixtures[@]}"; do
  IFS='|' read -r label file mixture <<<"$f"
  base=$models/$file
  echo "== $label: preparing experts and an F16 base in $work" >&2
  e1=$work/expert1.gguf e2=$work/expert2.gguf f16=$work/base-f16.gguf
  "$make_expert" "$base" "$e1" --seed 1 --rel 1e-3 --type F16
  "$make_expert" "$base" "$e2" --seed 2 --rel 1e-3 --type F16
  "$ggmerge" quantize "$base" "$f16" F16 -t "$threads" -q

  # Quantize and merge alternate, so that both see the same machine: on a shared machine
  # speed drifts over minutes, and timing all quantize runs before all merge runs skews the
  # ratio.
  echo "== $label: ggmerge quantize base-f16 -> $mixture and merge dare_ties (--requant ${requants[*]}), alternating (x$runs)" >&2
  quantize_cmd=("$ggmerge" quantize "$f16" "$work/quantized.gguf" "$mixture" -t "$threads" -q)
  # merge_cmd MODE: the merge with --requant MODE, into the array merge.
  merge_cmd() {
    merge=("$ggmerge" merge --base "$base"
      --model "$e1" --weight 0.5 --density 0.1
      --model "$e2" --weight 0.5 --density 0.1
      --method dare_ties --seed 1 --requant "$1" -t "$threads" -q -o "$work/merged.gguf")
  }
  q_res=""
  declare -A m_res=() m_anons=()
  for ((i = 0; i < runs; i++)); do
    # (Assignments, so that `set -e` stops the script when a run fails.)
    r=$(run_once "$work/quantized.gguf" "${quantize_cmd[@]}")
    q_res=$(best "$q_res" "$r")
    for mode in "${requants[@]}"; do
      merge_cmd "$mode"
      r=$(run_once "$work/merged.gguf" "${merge[@]}")
      m_res[$mode]=$(best "${m_res[$mode]:-}" "$r")
    done
  done
  read -r q_s q_cpu q_kib <<<"$q_res"
  echo "   quantize: $q_s s (CPU $q_cpu s), peak RSS $q_kib KiB" >&2
  check_types "$base" "$work/quantized.gguf" "quantize to $mixture"
  inputs=$(($(stat -c %s "$base") + $(stat -c %s "$e1") + $(stat -c %s "$e2")))
  for mode in "${requants[@]}"; do
    read -r m_s m_cpu m_kib <<<"${m_res[$mode]}"
    out=$work/merged.gguf
    merge_cmd "$mode"
    m_anon=$(anon_peak "${merge[@]}")
    m_anons[$mode]=$m_anon
    echo "   merge --requant $mode: $m_s s (CPU $m_cpu s), peak RSS $m_kib KiB (private: $m_anon KiB)" >&2
    check_types "$base" "$out" "the merge output"
    rows+=("$(awk -v l="$label" -v rq="$mode" -v qs="$q_s" -v ms="$m_s" -v qk="$q_kib" -v mk="$m_kib" -v inb="$inputs" -v ma="$m_anon" -v qc="$q_cpu" -v mc="$m_cpu" 'BEGIN {
      printf "| %s | %s | %.2f s | %.2f s | **%.2f** | %.1f / %.1f s = %.2f | %.0f MiB | %.0f MiB | %.0f MiB | %.2f | %.0f MiB |",
        l, rq, qs, ms, ms / qs, mc, qc, mc / qc, qk / 1024, mk / 1024, inb / 1048576, mk * 1024 / inb, ma / 1024 }')")
  done
  # The memory comparison below uses the first mode's merge.
  read -r m_s m_cpu m_kib <<<"${m_res[${requants[0]}]}"
  m_anon=${m_anons[${requants[0]}]}

  if [ "$file" = SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    # The same merge with every input a Hugging Face safetensors directory (F32), written as
    # safetensors: both input kinds must release what they have read the same way.
    echo "== $label: the same merge on F32 safetensors directories (base, experts, output)" >&2
    for x in base e1 e2; do
      src=$base
      [ $x = e1 ] && src=$e1
      [ $x = e2 ] && src=$e2
      "$ggmerge" convert "$src" "$work/hf-$x/" --type F32 -t "$threads" -q
    done
    st_cmd=("$ggmerge" merge --base "$work/hf-base/"
      --model "$work/hf-e1/" --weight 0.5 --density 0.1
      --model "$work/hf-e2/" --weight 0.5 --density 0.1
      --method dare_ties --seed 1 -t "$threads" -q -o "$work/hf-out/" --force)
    s_res=""
    for ((i = 0; i < runs; i++)); do
      r=$(run_once "$work/hf-out/model.safetensors" "${st_cmd[@]}")
      s_res=$(best "$s_res" "$r")
    done
    read -r s_s s_cpu s_kib <<<"$s_res"
    out=$work/hf-out/model.safetensors
    s_anon=$(anon_peak "${st_cmd[@]}")
    st_inputs=$(du -cb "$work"/hf-base/*.safetensors "$work"/hf-e1/*.safetensors "$work"/hf-e2/*.safetensors | tail -1 | cut -f1)
    memrows+=("$(awk -v l="$label GGUF (Q4_1 base, F16 experts)" -v ms="$m_s" -v mk="$m_kib" -v inb="$inputs" -v ma="$m_anon" 'BEGIN {
      printf "| %s | %.2f s | %.0f MiB | %.0f MiB | %.2f | %.0f MiB |", l, ms, inb / 1048576, mk / 1024, mk * 1024 / inb, ma / 1024 }')")
    memrows+=("$(awk -v l="$label safetensors (F32 HF directories)" -v ms="$s_s" -v mk="$s_kib" -v inb="$st_inputs" -v ma="$s_anon" 'BEGIN {
      printf "| %s | %.2f s | %.0f MiB | %.0f MiB | %.2f | %.0f MiB |", l, ms, inb / 1048576, mk / 1024, mk * 1024 / inb, ma / 1024 }')")
    rm -rf "$work"/hf-*
  fi
  rm -f "$work"/*.gguf
done

echo
echo "ggmerge merge (dare_ties, 2 F16 experts, density 0.1, per --requant mode) vs ggmerge quantize (base F16 -> base's types)"
echo "$(nproc) cores, -t $threads, best of $runs; $(date -u +%Y-%m-%d); ggmerge $rev; load average before: $load"
echo
echo "| fixture | requant | quantize | merge | merge / quantize | CPU time merge / quantize | quantize peak RSS | merge peak RSS | merge inputs (base + 2 experts) | merge RSS / inputs | merge private peak |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Memory by input kind (same merge; peak RSS counts the inputs' mapped pages, private peak does not)"
echo
echo "| inputs | merge | inputs size | peak RSS | RSS / inputs | private peak |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${memrows[@]}"
