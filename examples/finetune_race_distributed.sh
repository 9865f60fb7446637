#!/bin/bash
# Fine-tune a pretrained 345M BERT on RACE (the train/middle folder of RACE's *.txt
# files) and report the accuracy on dev/middle and dev/high after every epoch.
# --micro-batch-size counts questions: each passes through the model as four sequences,
# one per option. PRETRAINED_CHECKPOINT is a pretrain_bert.py checkpoint; the fine-tuned
# model is saved to CHECKPOINT_PATH after every epoch (rerun the script to resume from
# it). Extra flags after the script's name are passed on and win over the ones below.

WORLD_SIZE=${WORLD_SIZE:-8}

DISTRIBUTED_ARGS="--nproc_per_node $WORLD_SIZE \
                  --nnodes 1 \
                  --node_rank 0 \
                  --master_addr localhost \
                  --master_port ${MASTER_PORT:-6000}"

TRAIN_DATA=${TRAIN_DATA:-"data/RACE/train/middle"}
VALID_DATA=${VALID_DATA:-"data/RACE/dev/middle \
            data/RACE/dev/high"}
VOCAB_FILE=${VOCAB_FILE:-bert-vocab.txt}
PRETRAINED_CHECKPOINT=${PRETRAINED_CHECKPOINT:-checkpoints/bert_345m}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/bert_345m_race}
# --fp16 needs a GPU; PRECISION="" trains in fp32
PRECISION=${PRECISION---fp16}

python -m torch.distributed.run $DISTRIBUTED_ARGS ./tasks/main.py \
               --task RACE \
               --seed 1234 \
               --train-data $TRAIN_DATA \
               --valid-data $VALID_DATA \
               --tokenizer-type BertWordPieceLowerCase \
               --vocab-file $VOCAB_FILE \
               --epochs 3 \
               --pretrained-checkpoint $PRETRAINED_CHECKPOINT \
               --tensor-model-parallel-size 1 \
               --num-layers 24 \
               --hidden-size 1024 \
               --num-attention-heads 16 \
               --micro-batch-size 4 \
               --checkpoint-activations \
               --lr 1.0e-5 \
               --lr-decay-style linear \
               --lr-warmup-fraction 0.06 \
               --seq-length 512 \
               --max-position-embeddings 512 \
               --save-interval 100000 \
               --save $CHECKPOINT_PATH \
               --load $CHECKPOINT_PATH \
               --log-interval 10 \
               --eval-interval 100 \
               --eval-iters 50 \
               --weight-decay 1.0e-1 \
               --clip-grad 1.0 \
               --hidden-dropout 0.1 \
               --attention-dropout 0.1 \
               $PRECISION \
               "$@"
