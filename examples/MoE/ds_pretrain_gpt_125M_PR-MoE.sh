#!/bin/bash
# PR-MoE (pyramid-residual MoE): every MoE layer keeps a dense MLP next to its experts
# (--mlp-type residual) and later MoE layers have more experts (one count per MoE layer).
#   EXPERTS_PER_LAYER="32 32 32 32 64 64" EP=8 bash examples/MoE/ds_pretrain_gpt_125M_PR-MoE.sh
source "$(dirname "$0")/../ds_gpt_env.sh"
EP=${EP:-$NPROC}
MOE_LAYERS=$((LAYERS / 2))
if [ -z "$EXPERTS_PER_LAYER" ]; then  # pyramid: EP experts, then 2 x EP in the last half
    EXPERTS_PER_LAYER=""
    for i in $(seq 1 $MOE_LAYERS); do
        n=$EP; [ $((2 * i)) -gt $MOE_LAYERS ] && n=$((2 * EP))
        EXPERTS_PER_LAYER="$EXPERTS_PER_LAYER $n"
    done
fi
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt_${MODEL_SIZE}_pr-moe}

$LAUNCHER $REPO_DIR/pretrain_gpt.py $GPT_ARGS \
    --deepspeed --deepspeed_config $REPO_DIR/examples/MoE/ds_config_gpt_MoE.json \
    --zero-stage 1 --no-pipeline-parallel \
    --num-experts $EXPERTS_PER_LAYER --mlp-type residual --moe-expert-parallel-size $EP \
    --expert-interval 2 --topk 1 --moe-loss-coeff 0.01 --create-moe-param-group \
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH "$@"
