#!/bin/bash
# GPT (125M preset; tiny on CPU) with the sequence-length curriculum of ds_config_gpt_curriculum.json: batches
# start at 64 tokens and grow linearly (multiples of 8) to --seq-length over 15000 steps;
# the log line's 'curriculum seqlen' column shows the current length.
#   DATA_PATH=... bash examples/curriculum_learning/ds_pretrain_gpt_125M_curriculum.sh
source "$(dirname "$0")/../ds_gpt_env.sh"
CONFIG=${CONFIG:-$REPO_DIR/examples/curriculum_learning/ds_config_gpt_curriculum.json}
if [ "$SEQ_LEN" != 1024 ]; then  # e.g. the tiny CPU preset: the curriculum ends at SEQ_LEN
    SHORT=$(mktemp --suffix .json)
    python -c "import json, sys; c = json.load(open(sys.argv[1])); \
c['curriculum_learning'].update(min_difficulty=8, max_difficulty=$SEQ_LEN); \
c['curriculum_learning']['schedule_config']['total_curriculum_step'] = 10; \
json.dump(c, open(sys.argv[2], 'w'))" "$CONFIG" "$SHORT"
    CONFIG=$SHORT
fi
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt_${MODEL_SIZE}_curriculum}

$LAUNCHER $REPO_DIR/pretrain_gpt.py $GPT_ARGS \
    --deepspeed --deepspeed_config $CONFIG --zero-stage 1 --no-pipeline-parallel \
    --curriculum-learning --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH "$@"
