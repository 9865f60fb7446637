#!/bin/bash
# 345M GPT on 8 GPUs of one node: 2-way tensor x 2-way pipeline parallelism, so 2-way data
# parallelism (the seed README's distributed command). Set DATA_PATH, VOCAB_FILE and
# MERGE_FILE as in examples/pretrain_gpt.sh.

WORLD_SIZE=${WORLD_SIZE:-8}
TENSOR_MP_SIZE=${TENSOR_MP_SIZE:-2}
PIPELINE_MP_SIZE=${PIPELINE_MP_SIZE:-2}

DISTRIBUTED_ARGS="--nproc_per_node $WORLD_SIZE \
                  --nnodes 1 \
                  --node_rank 0 \
                  --master_addr localhost \
                  --master_port ${MASTER_PORT:-6000}"

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt2_345m}
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}
DATA_PATH=${DATA_PATH:-my-gpt2_text_document}

MODEL_ARGS="--num-layers 24 \
            --hidden-size 1024 \
            --num-attention-heads 16 \
            --seq-length 1024 \
            --max-position-embeddings 1024 \
            --micro-batch-size 4 \
            --global-batch-size 16 \
            --lr 0.00015 \
            --train-iters 500000 \
            --lr-decay-iters 320000 \
            --lr-decay-style cosine \
            --vocab-file $VOCAB_FILE \
            --merge-file $MERGE_FILE \
            --lr-warmup-fraction .01 \
            --fp16"

OUTPUT_ARGS="--log-interval 10 \
             --save-interval 500 \
             --eval-interval 100 \
             --eval-iters 10 \
             --checkpoint-activations"

python -m torch.distributed.launch $DISTRIBUTED_ARGS ./pretrain_gpt.py \
                $MODEL_ARGS \
                $OUTPUT_ARGS \
                --save $CHECKPOINT_PATH \
                --load $CHECKPOINT_PATH \
                --data-path $DATA_PATH \
                --tensor-model-parallel-size $TENSOR_MP_SIZE \
                --pipeline-model-parallel-size $PIPELINE_MP_SIZE \
                --DDP-impl torch \
                "$@"
