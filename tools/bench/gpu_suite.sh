#!/bin/bash
# The GPU benchmark runs recorded in docs/benchmarks.md, in one go.
#   bash tools/bench/gpu_suite.sh OUT_DIR [single|parallel|all]
# single:   one H200, GPT 1.3B: bf16 matmul ceiling, this project's training step, and the
#           peers (HF GPT2LMHeadModel, a compact plain-torch GPT eager and compiled); 125M too.
# parallel: two H200s, GPT 1.3B: DP=2, TP=2, PP=2 (8 micro-batches) against 1 GPU.
set -uo pipefail
out=${1:?output folder}
what=${2:-all}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
b="python3 tools/bench/bench_gpt_gpu.py --json $out/bench.jsonl"
if [ "$what" = single ] || [ "$what" = all ]; then
  $b --shape 1.3B --impls matmul,megatron,hf,compact,compact-compiled 2>&1 | tee "$out/single_1.3B.log"
  $b --shape 125M --impls megatron,hf,compact-compiled 2>&1 | tee "$out/single_125M.log"
fi
if [ "$what" = parallel ] || [ "$what" = all ]; then
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--global-batch-size 16" 2>&1 | tee "$out/dp2.log"
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--tensor-model-parallel-size 2" 2>&1 | tee "$out/tp2.log"
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--pipeline-model-parallel-size 2 --global-batch-size 64" 2>&1 | tee "$out/pp2.log"
fi
