#!/bin/bash
# GPT-125M with a Mixture of Experts in every second layer (DeepSpeed MoE): EXPERTS
# experts per MoE layer spread over EP expert-parallel ranks, top-1 routing, the aux
# loss (x 0.01) added to the LM loss and logged as 'moe loss'.
#   EXPERTS=64 EP=8 DATA_PATH=... bash examples/MoE/ds_pretrain_gpt_125M_MoE.sh
source "$(dirname "$0")/../ds_gpt_env.sh"
EXPERTS=${EXPERTS:-$NPROC}
EP=${EP:-$NPROC}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt_${MODEL_SIZE}_moe${EXPERTS}}

$LAUNCHER $REPO_DIR/pretrain_gpt.py $GPT_ARGS \
    --deepspeed --deepspeed_config $REPO_DIR/examples/MoE/ds_config_gpt_MoE.json \
    --zero-stage 1 --no-pipeline-parallel \
    --num-experts $EXPERTS --moe-expert-parallel-size $EP --expert-interval 2 --topk 1 \
    --moe-train-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 \
    --moe-loss-coeff 0.01 --create-moe-param-group \
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH "$@"
