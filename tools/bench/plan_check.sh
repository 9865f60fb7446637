#!/usr/bin/env bash
# Predicted against measured: peak memory and tokens/s of tools/plan_parallelism.py for six
# one-GPU layouts, each run with the exact command the planner prints.
#
#   bash tools/bench/plan_check.sh [OUT_DIR]        # on a GPU machine, from the repo root
#
# Layouts (GPT 1.3B and the LLaMA-3.2-1B shape of tools/bench/bench_gpt_gpu.py SHAPES):
# recompute none / selective (flash attention) / full, ZeRO off / 1 / 3, micro-batch 4 and 8.
# Each run: pretrain_gpt.py --mock-data, bf16, dropout 0, 30 iterations, a log line every
# 10. Measured peak memory: "max allocated" of the memory line after the first 10
# iterations (torch's allocator peak, what the planner predicts); tokens/s: the mean of
# the log lines of iterations 20 and 30. Bars: memory within 10%, tokens/s within 15%.
# PLAN_ONLY=1 prints the commands without running them.
# Writes OUT_DIR/<name>.log, OUT_DIR/<name>.plan.json and OUT_DIR/plan_check.jsonl.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-${OUT:-plan_check_out}}"
mkdir -p "$OUT"
GPU_TYPE="${GPU_TYPE:-h200}"
PY="${PYTHON:-python3}"

GPT13="--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048
  --max-position-embeddings 2048 --vocab-size 51199"
LLAMA1B="--num-layers 16 --hidden-size 2048 --num-attention-heads 32 --num-key-value-heads 8
  --ffn-hidden-size 8192 --seq-length 2048 --max-position-embeddings 2048 --vocab-size 128255
  --use-rotary-position-embeddings --no-position-embedding --rotary-position-embeddings-theta
  500000 --swiglu --normalization rmsnorm --layernorm-epsilon 1e-5 --disable-bias-linear"
TRAIN="--bf16 --mock-data --train-iters 30 --log-interval 10 --eval-iters 1 --lr 1e-4
  --min-lr 1e-5 --hidden-dropout 0 --attention-dropout 0 --clip-grad 1.0
  --make-vocab-size-divisible-by 128"
# one line each (the rows below are split on '|' by read, which stops at a newline)
GPT13=$(echo $GPT13); LLAMA1B=$(echo $LLAMA1B); TRAIN=$(echo $TRAIN)

# name | model | micro-batch | recompute | sharding
LAYOUTS=(
  "gpt13-mb4-none-nozero|$GPT13|4|none|none"
  "gpt13-mb8-selective-nozero|$GPT13|8|selective|none"
  "gpt13-mb8-full-zero1|$GPT13|8|full|zero1"
  "llama1b-mb4-selective-nozero|$LLAMA1B|4|selective|none"
  "llama1b-mb4-selective-zero1|$LLAMA1B|4|selective|zero1"
  "llama1b-mb8-full-zero3|$LLAMA1B|8|full|zero3"
)

: > "$OUT/plan_check.jsonl"
for row in "${LAYOUTS[@]}"; do
  IFS='|' read -r name model mb recompute sharding <<< "$row"
  # shellcheck disable=SC2086
  if ! $PY tools/plan_parallelism.py $model $TRAIN --num-gpus 1 --gpus-per-node 1 \
      --gpu-type "$GPU_TYPE" --global-batch-size "$mb" --micro-batch-size "$mb" \
      --recompute "$recompute" --sharding "$sharding" --json > "$OUT/$name.plan.json" \
      2> "$OUT/$name.plan.err"; then
    echo "$name: the planner found no layout that fits (see $OUT/$name.plan.err)"
    continue
  fi
  cmd=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['layouts'][0]['command'])" \
        "$OUT/$name.plan.json")
  echo "== $name: $cmd"
  [ -n "${PLAN_ONLY:-}" ] && continue
  (eval "$cmd") > "$OUT/$name.log" 2>&1
  echo "   exit $?"
  $PY - "$name" "$OUT/$name.plan.json" "$OUT/$name.log" >> "$OUT/plan_check.jsonl" <<'EOF'
import json, re, sys
name, plan_path, log_path = sys.argv[1:]
lay = json.load(open(plan_path))["layouts"][0]
text = open(log_path, errors="replace").read()
peak = re.findall(r"max allocated: ([0-9.]+)", text)
rates = [float(x) for x in re.findall(r"tokens per second: ([0-9.]+)", text)]
row = {"name": name, "layout": lay["layout"],
       "predicted_peak_gib": lay["peak_memory_gib"],
       "predicted_tokens_per_s": lay["tokens_per_s"],
       "measured_peak_gib": float(peak[0]) / 1024 if peak else None,
       "measured_tokens_per_s": sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else None}
print(json.dumps(row))
EOF
done
[ -n "${PLAN_ONLY:-}" ] && exit 0

$PY - "$OUT/plan_check.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"\n| run | predicted GiB | measured GiB | error | predicted tokens/s | measured tokens/s "
      "| error |")
print("|---|---:|---:|---:|---:|---:|---:|")
bad = 0
for r in rows:
    def err(p, m, bar):
        global bad
        if m is None:
            bad += 1
            return "no measurement"
        e = p / m - 1
        bad += abs(e) > bar
        return f"{e:+.1%}{'' if abs(e) <= bar else ' (over the bar)'}"
    mem = err(r["predicted_peak_gib"], r["measured_peak_gib"], 0.10)
    tps = err(r["predicted_tokens_per_s"], r["measured_tokens_per_s"], 0.15)
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    print(f"| {r['name']} | {r['predicted_peak_gib']:.1f} | {fmt(r['measured_peak_gib'], '.1f')} "
          f"| {mem} | {r['predicted_tokens_per_s']:.0f} | "
          f"{fmt(r['measured_tokens_per_s'], '.0f')} | {tps} |")
print(f"\n{len(rows)} runs; {bad} figures outside the bars (memory 10%, tokens/s 15%)")
sys.exit(1 if bad else 0)
EOF
