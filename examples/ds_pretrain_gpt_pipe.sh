#!/bin/bash
# GPT through DeepSpeed's pipeline engine (GPTModelPipe), PP stages (default 2) with
# ZeRO-1 over the data-parallel ranks; TP=... adds tensor parallelism.
#   PP=4 DATA_PATH=... bash examples/ds_pretrain_gpt_pipe.sh
source "$(dirname "$0")/ds_gpt_env.sh"
PP=${PP:-2}
TP=${TP:-1}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt_${MODEL_SIZE}_pp${PP}}

$LAUNCHER $REPO_DIR/pretrain_gpt.py $GPT_ARGS \
    --pipeline-model-parallel-size $PP --tensor-model-parallel-size $TP \
    --deepspeed --deepspeed_config $REPO_DIR/examples/ds_config_gpt_zero1.json --zero-stage 1 \
    --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH "$@"
