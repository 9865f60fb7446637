#!/bin/bash
# The GPU benchmark runs recorded in docs/benchmarks.md, in one go.
#   bash tools/bench/gpu_suite.sh OUT_DIR [single|parallel|all]
# single:   one H200, GPT 1.3B: bf16 matmul ceiling, this project's training step, and the
#           peers (HF GPT2LMHeadModel, a compact plain-torch GPT eager and compiled); 125M too.
# parallel: two H200s, GPT 1.3B: DP=2, TP=2, PP=2 (8 micro-batches) against 1 GPU.
# tp:       two H200s, GPT 1.3B: TP=2 with the row-parallel all-reduce in 1, 2 and 4
#           overlapped pieces, and with sequence parallelism, against 1 GPU; a profile.
# tp-overlap: two H200s, GPT 1.3B: TP=2 with --sequence-parallel --tp-comm-overlap against
#           plain TP=2 and 1 GPU (overlap twice), and at micro-batch 16 against 1 GPU; the
#           overlap's GPU test first.
# tp-mb16:  two H200s, GPT 1.3B at micro-batch 16: 1 GPU, TP=2, TP=2 with --tp-comm-overlap.
# moe:      two H200s, GPT 1.3B through DeepSpeed (ZeRO-1, DP=2): dense against MoE with 2
#           experts every other layer, expert-parallel size 2, and MoE with activation
#           recompute (moe-recompute runs only that one).
# offload:  one H200: the largest GPT of a ladder (13B, then 6.7B, 2.7B) that trains with
#           ZeRO-3 and DeepSpeed's CPU Adam (optimizer state in host memory), activation
#           recompute, 4 micro-batches per step.
# llama:    one H200, the LLaMA-3.2-1B shape (GQA 32/8 heads, SwiGLU 8192, vocab 128256, tied,
#           seq 2048, micro-batch 4): this project's step against HF LlamaForCausalLM and a
#           compact LLaMA eager and compiled; then examples/pretrain_llama_1b.sh itself
#           (pretrain_gpt.py on --mock-data), its log lines in OUT/llama_1b_script.log.
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
if [ "$what" = llama ]; then
  $b --shape llama-1b --impls megatron,compact-compiled,hf,compact 2>&1 | tee "$out/llama_1b.log"
  TRAIN_ITERS=40 LOG_INTERVAL=10 CHECKPOINT_PATH= \
    bash examples/pretrain_llama_1b.sh > "$out/llama_1b_script.log" 2>&1
  grep -E "iteration +[0-9]+/|rmsnorm|attention backend|Error" "$out/llama_1b_script.log" | cut -c1-400
fi
if [ "$what" = tp ]; then
  $b --shape 1.3B --impls megatron 2>&1 | tee "$out/tp_1gpu.log"
  tp="--tensor-model-parallel-size 2"
  for flags in "$tp" "$tp --tp-comm-overlap-chunks 2" "$tp --tp-comm-overlap-chunks 4" \
               "$tp --sequence-parallel"; do
    CUDA_DEVICE_MAX_CONNECTIONS=1 $b --shape 1.3B --impls megatron --nproc 2 \
      --megatron-flags "$flags" 2>&1 | tee -a "$out/tp2.log"
  done
  BENCH_PROFILE=$out/tp2_profile.txt CUDA_DEVICE_MAX_CONNECTIONS=1 $b --shape 1.3B \
    --impls megatron --nproc 2 --megatron-flags "$tp --tp-comm-overlap-chunks 4" \
    --warmup 2 --iters 3 2>&1 | tee -a "$out/tp2.log"
fi
if [ "$what" = tp-overlap ]; then
  # --tp-comm-overlap (sequence parallelism, pieces moved by copy engines) against plain
  # TP=2 and 1 GPU in one call, at micro-batch 8 (the shape's) and 16; a profile of the first
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_tp_comm_overlap.py \
    2>&1 | tail -5 | tee "$out/tp_overlap_test.log"
  tp="--tensor-model-parallel-size 2"
  ovl="$tp --sequence-parallel --tp-comm-overlap"
  mb16="--micro-batch-size 16 --global-batch-size 16"
  timeout 240 $b --shape 1.3B --impls megatron 2>&1 | tee -a "$out/tp_1gpu.log"
  BENCH_PROFILE=$out/tp2_overlap_profile.txt timeout 300 $b --shape 1.3B --impls megatron \
    --nproc 2 --megatron-flags "$ovl" 2>&1 | tee -a "$out/tp2.log"
  CUDA_DEVICE_MAX_CONNECTIONS=1 timeout 240 $b --shape 1.3B --impls megatron --nproc 2 \
    --megatron-flags "$tp" 2>&1 | tee -a "$out/tp2.log"
  timeout 240 $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "$ovl" 2>&1 \
    | tee -a "$out/tp2.log"
  timeout 240 $b --shape 1.3B --impls megatron --megatron-flags "$mb16" 2>&1 \
    | tee -a "$out/tp_1gpu.log"
  timeout 240 $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "$ovl $mb16" 2>&1 \
    | tee -a "$out/tp2.log"
fi
if [ "$what" = tp-mb16 ]; then
  # micro-batch 16 (global batch 16) for 1 GPU, TP=2 and TP=2 with --tp-comm-overlap
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
  tp="--tensor-model-parallel-size 2"
  mb16="--micro-batch-size 16 --global-batch-size 16"
  timeout 240 $b --shape 1.3B --impls megatron --megatron-flags "$mb16" 2>&1 \
    | tee -a "$out/tp_1gpu.log"
  for run in ovl tp ovl; do
    if [ $run = ovl ]; then
      timeout 240 $b --shape 1.3B --impls megatron --nproc 2 \
        --megatron-flags "$tp --sequence-parallel --tp-comm-overlap $mb16" 2>&1 | tee -a "$out/tp2.log"
    else
      CUDA_DEVICE_MAX_CONNECTIONS=1 timeout 240 $b --shape 1.3B --impls megatron --nproc 2 \
        --megatron-flags "$tp $mb16" 2>&1 | tee -a "$out/tp2.log"
    fi
  done
fi
if [ "$what" = nccl ]; then
  # all-reduce bandwidth by NCCL protocol, then TP=2 with the protocols that matter
  for proto in default Simple LL128 LL; do
    if [ $proto = default ]; then env=""; else env="NCCL_PROTO=$proto"; fi
    env $env torchrun --standalone --nproc_per_node 2 tools/bench/bench_allreduce.py \
      2>&1 | grep RESULT | tee -a "$out/allreduce.log"
  done
  $b --shape 1.3B --impls megatron 2>&1 | tee "$out/nccl_1gpu.log"
  tp="--tensor-model-parallel-size 2"
  for proto in "^LL" Simple; do
    for flags in "$tp" "$tp --sequence-parallel"; do
      NCCL_PROTO=$proto CUDA_DEVICE_MAX_CONNECTIONS=1 $b --shape 1.3B --impls megatron \
        --nproc 2 --megatron-flags "$flags" 2>&1 | tee -a "$out/nccl_tp2.log"
    done
  done
fi
if [ "$what" = nccl-channels ]; then
  # NCCL channel counts: more channels (bandwidth) against fewer (SMs left to the GEMMs)
  for ch in "NCCL_MIN_NCHANNELS=32" "NCCL_MAX_NCHANNELS=8"; do
    env $ch torchrun --standalone --nproc_per_node 2 tools/bench/bench_allreduce.py \
      --sizes-mb 16,64 2>&1 | grep RESULT | tee -a "$out/allreduce.log"
  done
  $b --shape 1.3B --impls megatron 2>&1 | tee "$out/nccl_1gpu.log"
  for ch in "NCCL_MIN_NCHANNELS=32" "NCCL_MAX_NCHANNELS=8"; do
    env $ch CUDA_DEVICE_MAX_CONNECTIONS=1 $b --shape 1.3B --impls megatron --nproc 2 \
      --megatron-flags "--tensor-model-parallel-size 2" 2>&1 | tee -a "$out/nccl_tp2.log"
  done
fi
# DeepSpeed data-parallel 2 (ZeRO-1), and the MoE flags on top of it
ds_dp2="--deepspeed --deepspeed_config examples/MoE/ds_config_gpt_MoE.json --zero-stage 1"
ds_dp2="$ds_dp2 --no-pipeline-parallel --global-batch-size 16"
moe="--num-experts 2 --moe-expert-parallel-size 2 --expert-interval 2 --topk 1"
moe="$moe --moe-loss-coeff 0.01 --create-moe-param-group"
if [ "$what" = moe ]; then
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "$ds_dp2" 2>&1 | tee "$out/moe.log"
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "$ds_dp2 $moe" 2>&1 \
    | tee -a "$out/moe.log"
fi
if [ "$what" = moe ] || [ "$what" = moe-recompute ]; then
  $b --shape 1.3B --impls megatron --nproc 2 \
    --megatron-flags "$ds_dp2 $moe --checkpoint-activations" 2>&1 | tee -a "$out/moe.log"
fi
if [ "$what" = offload ]; then
  ds="--deepspeed --deepspeed_config examples/ds_config_gpt_zero3.json --zero-stage 3"
  ds="$ds --cpu-optimizer --checkpoint-activations --global-batch-size 32"
  (while sleep 5; do echo "$(date +%T) $(free -g | sed -n 2p)"; done) > "$out/offload_free.log" &
  sampler=$!
  # build DeepSpeed's CPU Adam extension once, outside the timed runs
  python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
    2>&1 | tail -2 | tee -a "$out/offload.log"
  for shape in 13B 6.7B 2.7B; do
    if CUDA_VISIBLE_DEVICES=0 timeout 420 $b --shape $shape --impls megatron --warmup 1 \
        --iters 2 --megatron-flags "$ds" 2>&1 | tee -a "$out/offload.log" \
        | grep -q '"impl": "megatron"'; then
      break
    fi
    free -g | tee -a "$out/offload.log"
  done
  kill $sampler
fi
if [ "$what" = parallel ] || [ "$what" = all ]; then
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--global-batch-size 16" 2>&1 | tee "$out/dp2.log"
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--tensor-model-parallel-size 2" 2>&1 | tee "$out/tp2.log"
  $b --shape 1.3B --impls megatron --nproc 2 --megatron-flags "--pipeline-model-parallel-size 2 --global-batch-size 64" 2>&1 | tee "$out/pp2.log"
fi
