#!/bin/bash
# LLaMA-2-style pretraining on one node through DeepSpeed: 2-way tensor x 2-way pipeline
# parallelism (DeepSpeed's pipeline engine), grouped-query attention (16 heads, 4 key/value
# heads), RoPE, SwiGLU, RMSNorm, untied output weights, no linear biases, SentencePiece.
# The flags are those of Megatron-DeepSpeed's examples_deepspeed/pretrain_llama2_distributed.sh;
# every setting below can be overridden from the environment, e.g.
#   DATASET_1=my-llama_text_document TOKENIZER_PATH=tokenizer.model \
#     bash examples/pretrain_llama2_distributed.sh
# Prepare the data with the same tokenizer:
#   python tools/preprocess_data.py --input corpus.json --output-prefix my-llama \
#     --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tokenizer.model \
#     --dataset-impl mmap --append-eod --workers 8
set -e
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"

BASE_PATH=${BASE_PATH:-./tmp}
DS_CONFIG=${DS_CONFIG:-${BASE_PATH}/deepspeed.json}
DATASET_1=${DATASET_1:-./tmp/data/bookcorpus_train_1m_text_sentence}
DATASET=${DATASET:-"1 ${DATASET_1}"}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-./tmp}
TOKENIZER_PATH=${TOKENIZER_PATH:-./tmp/tokenizer.model}  # a LLaMA tokenizer.model

TP=${TP:-2}
PP=${PP:-2}
ZERO_STAGE=${ZERO_STAGE:-0}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

HIDDEN_SIZE=${HIDDEN_SIZE:-2048}          # llama-13b: 5120
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-5504}  # llama-13b: 13824
NUM_LAYERS=${NUM_LAYERS:-24}              # llama-13b: 40
NUM_HEADS=${NUM_HEADS:-16}                # llama-13b: 40
SEQ_LENGTH=${SEQ_LENGTH:-2048}
NUM_KV_HEADS=${NUM_KV_HEADS:-4}           # grouped-query attention, as llama2-70b

MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}  # llama: 4M tokens
TRAIN_STEPS=${TRAIN_STEPS:-250000}          # llama: 1T tokens / 4M tokens per batch
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
LR_WARMUP_STEPS=${LR_WARMUP_STEPS:-2000}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}
GRAD_CLIP=${GRAD_CLIP:-1}
SAVE_INTERVAL=${SAVE_INTERVAL:-10000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
EVAL_ITERS=${EVAL_ITERS:-10}

# Activation checkpointing saves memory at the cost of one more forward pass per layer.
activation_checkpoint=${ACTIVATION_CHECKPOINT:-false}

mkdir -p "$(dirname "$DS_CONFIG")"
cat <<EOT > "$DS_CONFIG"
{
  "train_batch_size" : $GLOBAL_BATCH_SIZE,
  "train_micro_batch_size_per_gpu": $MICRO_BATCH_SIZE,
  "steps_per_print": 1,
  "zero_optimization": {
    "stage": $ZERO_STAGE
  },
  "bf16": {
    "enabled": true
  }
}
EOT

ds_args=" --deepspeed"
ds_args=" --deepspeed_config=$DS_CONFIG ${ds_args}"
ds_args=" --zero-stage=$ZERO_STAGE ${ds_args}"
if [ "${activation_checkpoint}" = "true" ]; then
  ds_args="--deepspeed-activation-checkpointing --checkpoint-activations ${ds_args}"
fi

DISTRIBUTED_ARGS="--nproc_per_node $GPUS_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK \
  --master_addr $MASTER_ADDR --master_port $MASTER_PORT"

# shellcheck disable=SC2086
torchrun $DISTRIBUTED_ARGS \
       "$REPO_DIR/pretrain_gpt.py" \
       --tensor-model-parallel-size $TP \
       --pipeline-model-parallel-size $PP \
       --num-layers $NUM_LAYERS \
       --hidden-size $HIDDEN_SIZE \
       --ffn-hidden-size $FFN_HIDDEN_SIZE \
       --num-attention-heads $NUM_HEADS \
       --micro-batch-size $MICRO_BATCH_SIZE \
       --global-batch-size $GLOBAL_BATCH_SIZE \
       --seq-length $SEQ_LENGTH \
       --max-position-embeddings $SEQ_LENGTH \
       --train-iters $TRAIN_STEPS \
       --save $CHECKPOINT_PATH \
       --load $CHECKPOINT_PATH \
       --data-path $DATASET \
       --data-impl mmap \
       --tokenizer-type GPTSentencePieceTokenizer \
       --tokenizer-model $TOKENIZER_PATH \
       --split 949,50,1 \
       --distributed-backend nccl \
       --lr $LR \
       --lr-decay-style cosine \
       --min-lr $MIN_LR \
       --weight-decay $WEIGHT_DECAY \
       --clip-grad $GRAD_CLIP \
       --lr-warmup-iters $LR_WARMUP_STEPS \
       --optimizer adam \
       --adam-beta1 0.9 \
       --adam-beta2 0.95 \
       --log-interval 1 \
       --save-interval $SAVE_INTERVAL \
       --eval-interval $EVAL_INTERVAL \
       --eval-iters $EVAL_ITERS \
       --bf16 \
       --no-query-key-layer-scaling \
       --attention-dropout 0 \
       --hidden-dropout 0 \
       --use-rotary-position-embeddings \
       --untie-embeddings-and-output-weights \
       --swiglu \
       --normalization rmsnorm \
       --disable-bias-linear \
       --num-key-value-heads $NUM_KV_HEADS \
       $ds_args "$@"
