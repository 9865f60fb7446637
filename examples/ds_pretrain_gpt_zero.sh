#!/bin/bash
# GPT through DeepSpeed ZeRO (no pipeline): ZERO_STAGE=1|2|3, OFFLOAD=1 for ZeRO-3 with
# parameters and optimizer in host memory (DeepSpeed's CPU Adam on GPUs).
#   ZERO_STAGE=2 DATA_PATH=... bash examples/ds_pretrain_gpt_zero.sh
source "$(dirname "$0")/ds_gpt_env.sh"
ZERO_STAGE=${ZERO_STAGE:-1}
CONFIG=$REPO_DIR/examples/ds_config_gpt_zero${ZERO_STAGE}.json
EXTRA=""
if [ "${OFFLOAD:-0}" = 1 ]; then
    CONFIG=$REPO_DIR/examples/ds_config_gpt_zero3_offload.json
    ZERO_STAGE=3
    [ -n "$GPUS" ] && EXTRA="--cpu-optimizer"
fi
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt_${MODEL_SIZE}_zero${ZERO_STAGE}}

$LAUNCHER $REPO_DIR/pretrain_gpt.py $GPT_ARGS \
    --deepspeed --deepspeed_config $CONFIG --zero-stage $ZERO_STAGE --no-pipeline-parallel \
    --checkpoint-activations --deepspeed-activation-checkpointing \
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH $EXTRA "$@"
