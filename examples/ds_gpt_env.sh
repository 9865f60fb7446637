#!/bin/bash
# Shared settings of the DeepSpeed GPT examples (sourced by ds_pretrain_gpt_*.sh,
# MoE/*.sh and curriculum_learning/*.sh). Override any of them in the environment.
#
#   DATA_PATH VOCAB_FILE MERGE_FILE   preprocessed data (tools/preprocess_data.py) and vocab
#   MODEL_SIZE   tiny | 125M | 350M | 1.3B  (default 1.3B on GPUs, tiny on CPU)
#   NPROC        ranks on this node (default: the GPU count, or 2 on CPU)
#   MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS SEQ_LEN   batch and schedule

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DATA_PATH=${DATA_PATH:-my-gpt2_text_document}
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPUS=$(nvidia-smi -L | wc -l)
    NPROC=${NPROC:-$GPUS}
    MODEL_SIZE=${MODEL_SIZE:-1.3B}
    PRECISION=${PRECISION:---bf16}
else
    NPROC=${NPROC:-2}
    MODEL_SIZE=${MODEL_SIZE:-tiny}
    PRECISION=${PRECISION:-}          # fp32 on CPU
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

case $MODEL_SIZE in
    tiny) LAYERS=2;  HIDDEN=64;   HEADS=4;  SEQ_LEN=${SEQ_LEN:-128} ;;
    125M) LAYERS=12; HIDDEN=768;  HEADS=12 ;;
    350M) LAYERS=24; HIDDEN=1024; HEADS=16 ;;
    1.3B) LAYERS=24; HIDDEN=2048; HEADS=16 ;;
    *) echo "unknown MODEL_SIZE $MODEL_SIZE (tiny, 125M, 350M, 1.3B)" >&2; exit 1 ;;
esac
SEQ_LEN=${SEQ_LEN:-1024}
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-$((MICRO_BATCH * NPROC))}
TRAIN_ITERS=${TRAIN_ITERS:-500000}

LAUNCHER="torchrun --nproc_per_node $NPROC --nnodes ${NNODES:-1} --node_rank ${NODE_RANK:-0} \
    --master_addr ${MASTER_ADDR:-localhost} --master_port ${MASTER_PORT:-6000}"

GPT_ARGS="--num-layers $LAYERS --hidden-size $HIDDEN --num-attention-heads $HEADS \
    --seq-length $SEQ_LEN --max-position-embeddings $SEQ_LEN \
    --micro-batch-size $MICRO_BATCH --global-batch-size $GLOBAL_BATCH \
    --train-iters $TRAIN_ITERS --lr-decay-iters $TRAIN_ITERS --lr 1.5e-4 --min-lr 1.0e-5 \
    --lr-decay-style cosine --lr-warmup-fraction .01 --weight-decay 0.01 --clip-grad 1.0 \
    --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE \
    --tokenizer-type GPT2BPETokenizer --data-impl mmap --split 949,50,1 \
    --log-interval ${LOG_INTERVAL:-10} --eval-interval ${EVAL_INTERVAL:-1000} \
    --eval-iters ${EVAL_ITERS:-10} --save-interval ${SAVE_INTERVAL:-1000} $PRECISION"
