#!/usr/bin/env bash
# Scale benchmark: do ggmerge's streaming commands cost time linear in the model's size and
# memory that stays flat? On synthetic llama models of ~0.1B, ~0.5B and ~1.1B parameters
# (examples/make_llama.rs: ggmerge's own GGUF writer, F16 weights, SmolLM2's tokenizer so that
# llama.cpp loads them; nothing is downloaded), it measures
#
#   quantize  base F16 -> Q8_0 and -> Q4_K_M, next to llama.cpp's own quantizer
#             (`llama_model_quantize`, the engine of llama-quantize, from the llama.cpp ggmerge
#             links: examples/llama_quantize.rs), alternating, in the same run;
#   merge     base + 2 F16 experts (examples/make_expert.rs, seeds 1 and 2, noise 1e-2 of each
#             tensor's RMS), dare_ties, weight 0.5, density 0.1, seed 1 -> Q8_0;
#   extract   base + expert 1 -> a pack (density 0.1, F16 values);
#   apply     base + the packs of both experts (0.5 / 0.5, dare_ties) -> Q8_0;
#
# each with -t $THREADS (default: all cores), best of $RUNS (default 3) for wall and CPU time,
# the largest peak RSS and private peak over the runs (examples/measure.rs: peak RSS is the
# kernel's high-water mark and counts the resident pages of memory-mapped inputs; the private
# peak is the largest RssAnon sampled every 5 ms, memory the process allocated itself).
#
# Disk: the work directory (under $BENCH_DIR, default $TMPDIR or /tmp) holds at most a base and
# two experts in F16, two packs and one output: about 4 GB at 0.5B and 8.5 GB at 1.1B; each
# size is removed before the next, everything on exit. A size whose estimate does not fit the
# free space is skipped with a message. Sizes: the arguments, else $SIZES, else "0.1b 0.5b
# 1.1b" (e.g. `scripts/bench-scale.sh 0.1b`).
#
# Prints a Markdown table, the load average before and after (the machine may be shared: ratios
# are measured within one run, alternating, best of $RUNS), and whether issue 16's targets are
# met: peak RSS of every streaming command at most 15% of its inputs and its private peak under
# 128 MiB at the largest size measured; quantize at most 1.0x llama-quantize's time at every
# size.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
runs=${RUNS:-3}
sizes=${*:-${SIZES:-"0.1b 0.5b 1.1b"}}

models=${GGMERGE_MODELS:-.cache/models}
smol=$models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$smol" ]; then
  scripts/setup.sh
  models=$(scripts/fetch-models.sh)
  smol=$models/SmolLM2-135M-Instruct.Q4_1.gguf
fi
cargo build --release --quiet --bins --example make_llama --example make_expert \
  --example llama_quantize --example measure
rev=$(git describe --always --dirty 2>/dev/null || echo unknown)

if [ -n "${BENCH_DIR:-}" ]; then
  mkdir -p "$BENCH_DIR"
  work=$(mktemp -d "$BENCH_DIR/ggmerge-scale.XXXXXX")
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/ggmerge-scale.XXXXXX")
fi
trap 'rm -rf "$work"' EXIT
# Copies, so that a concurrent `cargo build` cannot swap a binary between measurements.
for b in ggmerge examples/make_llama examples/make_expert examples/llama_quantize examples/measure; do
  cp "target/release/$b" "$work/"
done
G=$work/ggmerge
measure=$work/measure

# run_once OUT CMD...: runs CMD once (its output file OUT removed first, and after, so that
# outputs do not pile up on disk); prints "WALL CPU PEAK_RSS_KIB PRIVATE_PEAK_KIB".
run_once() {
  local out=$1 w u s rss anon
  shift
  rm -f "$out"
  if ! "$measure" --print -- "$@" >"$work/measured" 2>"$work/log"; then
    echo "failed: $*" >&2
    cat "$work/log" >&2
    exit 1
  fi
  read -r w u s rss anon < <(tail -1 "$work/measured")
  rm -f "$out"
  awk -v w="$w" -v u="$u" -v s="$s" -v r="$rss" -v a="$anon" 'BEGIN { print w, u + s, r, a }'
}

# best A B: folds two "WALL CPU RSS PRIVATE" lines (A may be empty): the smallest times, the
# largest memory.
best() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "") { print b; exit }
    split(a, x, " "); split(b, y, " ")
    print (y[1] + 0 < x[1] + 0 ? y[1] : x[1]), (y[2] + 0 < x[2] + 0 ? y[2] : x[2]),
      (y[3] + 0 > x[3] + 0 ? y[3] : x[3]), (y[4] + 0 > x[4] + 0 ? y[4] : x[4])
  }'
}

# Appends a table row: LABEL COMMAND INPUT_BYTES RESULT [REFERENCE_RESULT]; the reference's
# wall time gives the ratio column.
# Facts for the targets, one "SIZE|LABEL|RSS/INPUTS|PRIVATE_MIB|RATIO" line per row.
rows=() facts=()
row() {
  local size=$1 label=$2 inb=$3 res=$4 ref=${5:-}
  facts+=("$(awk -v size="$size" -v l="$label" -v inb="$inb" -v res="$res" -v ref="$ref" 'BEGIN {
    split(res, r, " "); ratio = "-"
    if (ref != "") { split(ref, f, " "); ratio = sprintf("%.2f", r[1] / f[1]) }
    printf "%s|%s|%.3f|%.0f|%s", size, l, r[3] * 1024 / inb, r[4] / 1024, ratio }')")
  rows+=("$(awk -v size="$size" -v l="$label" -v inb="$inb" -v res="$res" -v ref="$ref" 'BEGIN {
    split(res, r, " ")
    ratio = "";
    if (ref != "") { split(ref, f, " "); ratio = sprintf("**%.2f**", r[1] / f[1]) }
    printf "| %s | %s | %.2f GB | %.2f s | %.2f s | %s | %.1f s | %.0f MiB | %.3f | %.0f MiB |",
      size, l, inb / 1e9, r[1], r[1] / (inb / 1e9), ratio, r[2], r[3] / 1024, r[3] * 1024 / inb, r[4] / 1024 }')")
}

size_of() { stat -c %s "$@" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for size in $sizes; do
  # GB needed: F16 base and experts (2 bytes per parameter each), packs, one output.
  case $size in
    0.1b) need_gb=1 ;;
    0.5b) need_gb=4 ;;
    1.1b) need_gb=9 ;;
    *) echo "unknown size $size (0.1b, 0.5b, 1.1b)" >&2; exit 2 ;;
  esac
  free_gb=$(df -P -k "$work" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "== $size: skipped, needs ~$need_gb GB on $(df -P "$work" | awk 'NR == 2 { print $6 }'), $free_gb GB free" >&2
    continue
  fi
  base=$work/base.gguf e1=$work/expert1.gguf e2=$work/expert2.gguf
  p1=$work/expert1.dpk.gguf p2=$work/expert2.dpk.gguf
  echo "== $size: generating the base and two experts in $work" >&2
  "$work/make_llama" --size "$size" --tokenizer-from "$smol" "$base"
  "$work/make_expert" "$base" "$e1" --seed 1 --rel 1e-2 --type F16
  "$work/make_expert" "$base" "$e2" --seed 2 --rel 1e-2 --type F16
  base_b=$(size_of "$base")

  for ty in Q8_0 Q4_K_M; do
    echo "== $size: quantize -> $ty, ggmerge and llama.cpp alternating (x$runs)" >&2
    g_res="" l_res=""
    for ((i = 0; i < runs; i++)); do
      r=$(run_once "$work/out.gguf" "$G" quantize "$base" "$work/out.gguf" "$ty" -t "$threads" -q)
      g_res=$(best "$g_res" "$r")
      r=$(run_once "$work/out.gguf" "$work/llama_quantize" "$base" "$work/out.gguf" "$ty" -t "$threads")
      l_res=$(best "$l_res" "$r")
    done
    echo "   ggmerge: $g_res; llama.cpp: $l_res" >&2
    row "$size" "quantize → $ty" "$base_b" "$g_res" "$l_res"
    row "$size" "llama-quantize → $ty" "$base_b" "$l_res"
  done

  echo "== $size: extract (x$runs), packs of both experts" >&2
  x_res=""
  for ((i = 0; i < runs; i++)); do
    r=$(run_once "$work/x.dpk.gguf" "$G" extract --base "$base" --finetuned "$e1" --density 0.1 \
      --seed 1 -t "$threads" -q -o "$work/x.dpk.gguf")
    x_res=$(best "$x_res" "$r")
  done
  row "$size" "extract (density 0.1, F16 values)" "$((base_b + $(size_of "$e1")))" "$x_res"
  "$G" extract --base "$base" --finetuned "$e1" --density 0.1 --seed 1 --stream 0 -q -o "$p1"
  "$G" extract --base "$base" --finetuned "$e2" --density 0.1 --seed 1 --stream 1 -q -o "$p2"

  echo "== $size: merge and apply -> Q8_0, alternating (x$runs)" >&2
  m_res="" a_res=""
  for ((i = 0; i < runs; i++)); do
    r=$(run_once "$work/out.gguf" "$G" merge --base "$base" \
      --model "$e1" --weight 0.5 --density 0.1 --model "$e2" --weight 0.5 --density 0.1 \
      --method dare_ties --seed 1 --type Q8_0 -t "$threads" -q -o "$work/out.gguf")
    m_res=$(best "$m_res" "$r")
    r=$(run_once "$work/out.gguf" "$G" apply --base "$base" --expert "$p1:0.5" --expert "$p2:0.5" \
      --method dare_ties --type Q8_0 -t "$threads" -q -o "$work/out.gguf")
    a_res=$(best "$a_res" "$r")
  done
  row "$size" "merge (2 experts, dare_ties → Q8_0)" "$((base_b + $(size_of "$e1" "$e2")))" "$m_res"
  row "$size" "apply (2 packs, dare_ties → Q8_0)" "$((base_b + $(size_of "$p1" "$p2")))" "$a_res"
  rm -f "$work"/*.gguf
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

echo
echo "ggmerge scale benchmark: $(nproc) cores, -t $threads, best of $runs; $(date -u +%Y-%m-%d); ggmerge $rev"
echo "load average before: $load_before; after: $load_after"
echo
echo "| size | command | inputs | wall | s / GB of input | × llama-quantize | CPU | peak RSS | RSS / inputs | private peak |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

[ ${#facts[@]} -gt 0 ] || exit 0
echo
echo "Targets (issue 16):"
printf '%s\n' "${facts[@]}" | awk -F'|' '
  { size[NR] = $1; label[NR] = $2; rss[NR] = $3; priv[NR] = $4; ratio[NR] = $5; last = $1 }
  END {
    worst_rss = 0; worst_priv = 0; worst_ratio = 0
    for (i = 1; i <= NR; i++) {
      if (label[i] ~ /^llama-quantize/) continue
      if (size[i] == last && rss[i] + 0 > worst_rss) { worst_rss = rss[i] + 0; rss_at = label[i] }
      if (size[i] == last && priv[i] + 0 > worst_priv) { worst_priv = priv[i] + 0; priv_at = label[i] }
      if (ratio[i] != "-" && ratio[i] + 0 > worst_ratio) { worst_ratio = ratio[i] + 0; ratio_at = size[i] " " label[i] }
    }
    printf "- peak RSS <= 15%% of inputs at %s: %s (largest %.1f%%, %s)\n", last,
      (worst_rss <= 0.15 ? "met" : "NOT met"), worst_rss * 100, rss_at
    printf "- private peak < 128 MiB at %s: %s (largest %d MiB, %s)\n", last,
      (worst_priv < 128 ? "met" : "NOT met"), worst_priv, priv_at
    if (ratio_at != "")
      printf "- quantize <= 1.0x llama-quantize at every size: %s (largest %.2fx, %s)\n",
        (worst_ratio <= 1.0 ? "met" : "NOT met"), worst_ratio, ratio_at
  }'
