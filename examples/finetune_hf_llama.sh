#!/bin/bash
# Finetune a Hugging Face LLaMA (LlamaForCausalLM: LLaMA-2, LLaMA-3, TinyLlama, ...) with
# Megatron, then hand it back to transformers:
#   1. tools/checkpoint_util.py --loader hf: the HF folder (config.json, safetensors or
#      pytorch_model.bin, tokenizer.json or tokenizer.model) -> a Megatron checkpoint at
#      TP x PP (release/, the model and tokenizer flags in its saved args);
#   2. pretrain_gpt.py --load it --finetune --use-checkpoint-args on DATA_PATH (the model's
#      shape and tokenizer come from the checkpoint: no model flags here);
#   3. with EXPORT_DIR set, tools/checkpoint_util.py --saver hf: the finetuned checkpoint
#      -> a HF folder that AutoModelForCausalLM / AutoTokenizer load.
# Settings come from the environment, e.g.
#   HF_DIR=Llama-3.2-1B DATA_PATH=my-llama_text_document TP=2 PP=2 GPUS_PER_NODE=4 \
#     EXPORT_DIR=Llama-3.2-1B-finetuned bash examples/finetune_hf_llama.sh
# Prepare DATA_PATH with the model's own tokenizer (tokenizer.json: HFTokenizer):
#   python tools/preprocess_data.py --input corpus.json --output-prefix my-llama \
#     --tokenizer-type HFTokenizer --tokenizer-model $HF_DIR/tokenizer.json \
#     --dataset-impl mmap --append-eod --workers 8
# Extra pretrain_gpt.py flags go after the script's name (they override the ones below).
set -e
REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"

: "${HF_DIR:?set HF_DIR to a Hugging Face LlamaForCausalLM folder}"
: "${DATA_PATH:?set DATA_PATH to a preprocessed dataset prefix (..._text_document)}"
TP=${TP:-1}
PP=${PP:-1}
WORK_DIR=${WORK_DIR:-./tmp/finetune_hf_llama}
CONVERTED_DIR=${CONVERTED_DIR:-${WORK_DIR}/converted_tp${TP}_pp${PP}}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-${WORK_DIR}/checkpoints}
EXPORT_DIR=${EXPORT_DIR:-}              # set it to write the finetuned model as HF
MAX_SHARD_SIZE=${MAX_SHARD_SIZE:-5GB}

GPUS_PER_NODE=${GPUS_PER_NODE:-$((TP * PP))}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}

SEQ_LENGTH=${SEQ_LENGTH:-2048}          # else the model's max_position_embeddings
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-1}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-32}
TRAIN_ITERS=${TRAIN_ITERS:-1000}
LR=${LR:-2e-5}
MIN_LR=${MIN_LR:-2e-6}
LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-50}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
PRECISION=${PRECISION:---bf16}          # --fp16, or empty for fp32

# 1. Hugging Face -> Megatron (skipped when CONVERTED_DIR holds a checkpoint already)
if [ ! -f "$CONVERTED_DIR/latest_checkpointed_iteration.txt" ]; then
  python "$REPO_DIR/tools/checkpoint_util.py" --loader hf --saver megatron \
    --load-dir "$HF_DIR" --save-dir "$CONVERTED_DIR" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
fi

# 2. Finetune: weights from CONVERTED_DIR (iteration 0, fresh optimizer), saves to
#    CHECKPOINT_PATH; a later run of this script resumes from CHECKPOINT_PATH instead.
LOAD_DIR=$CONVERTED_DIR
FINETUNE=--finetune
if [ -f "$CHECKPOINT_PATH/latest_checkpointed_iteration.txt" ]; then
  LOAD_DIR=$CHECKPOINT_PATH
  FINETUNE=
fi

# shellcheck disable=SC2086
torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
       "$REPO_DIR/pretrain_gpt.py" \
       --load "$LOAD_DIR" $FINETUNE --use-checkpoint-args \
       --tensor-model-parallel-size "$TP" \
       --pipeline-model-parallel-size "$PP" \
       --seq-length "$SEQ_LENGTH" \
       --micro-batch-size "$MICRO_BATCH_SIZE" \
       --global-batch-size "$GLOBAL_BATCH_SIZE" \
       --train-iters "$TRAIN_ITERS" \
       --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine \
       --lr-warmup-iters "$LR_WARMUP_ITERS" \
       --weight-decay 0.1 --clip-grad 1.0 \
       --adam-beta1 0.9 --adam-beta2 0.95 \
       --data-path "$DATA_PATH" --data-impl mmap --split 949,50,1 \
       --save "$CHECKPOINT_PATH" --save-interval "$SAVE_INTERVAL" \
       --log-interval 10 --eval-interval 500 --eval-iters 10 \
       $PRECISION "$@"

# 3. Megatron -> Hugging Face (the padding rows of the vocabulary are cut off)
if [ -n "$EXPORT_DIR" ]; then
  python "$REPO_DIR/tools/checkpoint_util.py" --loader megatron --saver hf \
    --load-dir "$CHECKPOINT_PATH" --save-dir "$EXPORT_DIR" --max-shard-size "$MAX_SHARD_SIZE"
fi
