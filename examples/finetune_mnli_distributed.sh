#!/bin/bash
# Fine-tune a pretrained 345M BERT on MNLI (GLUE's train.tsv) and report the accuracy on
# dev_matched.tsv and dev_mismatched.tsv after every epoch. For QQP set TASK=QQP,
# TRAIN_DATA=data/glue_data/QQP/train.tsv and VALID_DATA=data/glue_data/QQP/dev.tsv.
# PRETRAINED_CHECKPOINT is a pretrain_bert.py checkpoint; the fine-tuned model is saved
# to CHECKPOINT_PATH after every epoch (rerun the script to resume from it). Extra
# flags after the script's name are passed on and win over the ones below.

WORLD_SIZE=${WORLD_SIZE:-8}

DISTRIBUTED_ARGS="--nproc_per_node $WORLD_SIZE \
                  --nnodes 1 \
                  --node_rank 0 \
                  --master_addr localhost \
                  --master_port ${MASTER_PORT:-6000}"

TASK=${TASK:-MNLI}
TRAIN_DATA=${TRAIN_DATA:-"data/glue_data/MNLI/train.tsv"}
VALID_DATA=${VALID_DATA:-"data/glue_data/MNLI/dev_matched.tsv \
            data/glue_data/MNLI/dev_mismatched.tsv"}
PRETRAINED_CHECKPOINT=${PRETRAINED_CHECKPOINT:-checkpoints/bert_345m}
VOCAB_FILE=${VOCAB_FILE:-bert-vocab.txt}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/bert_345m_mnli}
# --fp16 needs a GPU; PRECISION="" trains in fp32
PRECISION=${PRECISION---fp16}

python -m torch.distributed.run $DISTRIBUTED_ARGS ./tasks/main.py \
               --task $TASK \
               --seed 1234 \
               --train-data $TRAIN_DATA \
               --valid-data $VALID_DATA \
               --tokenizer-type BertWordPieceLowerCase \
               --vocab-file $VOCAB_FILE \
               --epochs 5 \
               --pretrained-checkpoint $PRETRAINED_CHECKPOINT \
               --tensor-model-parallel-size 1 \
               --num-layers 24 \
               --hidden-size 1024 \
               --num-attention-heads 16 \
               --micro-batch-size 8 \
               --checkpoint-activations \
               --lr 5.0e-5 \
               --lr-decay-style linear \
               --lr-warmup-fraction 0.065 \
               --seq-length 512 \
               --max-position-embeddings 512 \
               --save-interval 500000 \
               --save $CHECKPOINT_PATH \
               --load $CHECKPOINT_PATH \
               --log-interval 10 \
               --eval-interval 100 \
               --eval-iters 50 \
               --weight-decay 1.0e-1 \
               $PRECISION \
               "$@"
