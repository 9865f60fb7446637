#!/bin/bash
# A LLaMA-3.2-1B-shaped model on one GPU: 16 layers, hidden 2048, 32 heads with 8 key/value
# heads, SwiGLU FFN 8192, RMSNorm, RoPE (theta 500000), tied embeddings, no linear biases,
# a 128256-token vocabulary, sequence 2048, bf16 with flash attention.
#
# With no DATA_PATH it trains on --mock-data (random tokens, NullTokenizer): a throughput run
# that needs no corpus. With data, pass the tokenizer it was preprocessed with:
#   DATA_PATH=my-llama_text_document TOKENIZER_ARGS="--tokenizer-type HFTokenizer \
#     --tokenizer-model /path/to/Llama-3.2-1B" bash examples/pretrain_llama_1b.sh
# Any further pretrain_gpt.py flags can follow on the command line.
set -e
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"

NUM_LAYERS=${NUM_LAYERS:-16}
HIDDEN_SIZE=${HIDDEN_SIZE:-2048}
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-8192}
NUM_HEADS=${NUM_HEADS:-32}
NUM_KV_HEADS=${NUM_KV_HEADS:-8}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
VOCAB_SIZE=${VOCAB_SIZE:-128256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-4}
TRAIN_ITERS=${TRAIN_ITERS:-100}
LOG_INTERVAL=${LOG_INTERVAL:-10}
CHECKPOINT_PATH=${CHECKPOINT_PATH-checkpoints/llama_1b}  # set empty for no checkpoints
PRECISION_ARGS=${PRECISION_ARGS:-"--bf16 --use-flash-attn"}

SAVE_ARGS=""
if [ -n "$CHECKPOINT_PATH" ]; then
  SAVE_ARGS="--save-interval ${SAVE_INTERVAL:-1000} --save $CHECKPOINT_PATH"
fi
if [ -n "${DATA_PATH:-}" ]; then
  DATA_ARGS="--data-path $DATA_PATH --split 949,50,1 ${TOKENIZER_ARGS:?set TOKENIZER_ARGS}"
else
  # NullTokenizer adds one id (end of document) to --vocab-size
  DATA_ARGS="--mock-data --tokenizer-type NullTokenizer --vocab-size $((VOCAB_SIZE - 1))"
fi

# shellcheck disable=SC2086
python "$REPO_DIR/pretrain_gpt.py" \
       --num-layers $NUM_LAYERS \
       --hidden-size $HIDDEN_SIZE \
       --ffn-hidden-size $FFN_HIDDEN_SIZE \
       --num-attention-heads $NUM_HEADS \
       --num-key-value-heads $NUM_KV_HEADS \
       --seq-length $SEQ_LENGTH \
       --max-position-embeddings $SEQ_LENGTH \
       --micro-batch-size $MICRO_BATCH_SIZE \
       --global-batch-size $GLOBAL_BATCH_SIZE \
       --train-iters $TRAIN_ITERS \
       --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters ${LR_WARMUP_ITERS:-10} \
       --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 \
       --use-rotary-position-embeddings --no-position-embedding \
       --rotary-position-embeddings-theta 500000 \
       --swiglu --normalization rmsnorm --layernorm-epsilon 1e-5 --disable-bias-linear \
       --attention-dropout 0 --hidden-dropout 0 \
       --make-vocab-size-divisible-by 128 \
       $PRECISION_ARGS \
       $DATA_ARGS \
       --log-interval $LOG_INTERVAL --eval-iters 0 \
       $SAVE_ARGS \
       "$@"
