#!/bin/bash
# Single-device 345M BERT pretraining (masked LM + sentence-order prediction).
# Data: sentence-split documents with the uncased BERT vocabulary, e.g.
#   python tools/preprocess_data.py --input my-corpus.json --output-prefix my-bert \
#          --vocab-file bert-vocab.txt --dataset-impl mmap \
#          --tokenizer-type BertWordPieceLowerCase --split-sentences
# writes my-bert_text_sentence.bin/.idx. Set DATA_PATH to that prefix and VOCAB_FILE to
# the vocabulary (bash dataset/download_vocab.sh).

RANK=0
WORLD_SIZE=1

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/bert_345m}
VOCAB_FILE=${VOCAB_FILE:-bert-vocab.txt}
DATA_PATH=${DATA_PATH:-my-bert_text_sentence}

BERT_ARGS="--num-layers 24 \
           --hidden-size 1024 \
           --num-attention-heads 16 \
           --seq-length 512 \
           --max-position-embeddings 512 \
           --micro-batch-size 4 \
           --global-batch-size 8 \
           --lr 0.0001 \
           --train-iters 2000000 \
           --lr-decay-iters 990000 \
           --lr-decay-style linear \
           --min-lr 0.00001 \
           --weight-decay 1e-2 \
           --clip-grad 1.0 \
           --lr-warmup-fraction .01 \
           --vocab-file $VOCAB_FILE \
           --data-impl mmap \
           --split 949,50,1 \
           --fp16"

OUTPUT_ARGS="--log-interval 100 \
             --save-interval 10000 \
             --eval-interval 1000 \
             --eval-iters 10"

python pretrain_bert.py \
       $BERT_ARGS \
       $OUTPUT_ARGS \
       --save $CHECKPOINT_PATH \
       --load $CHECKPOINT_PATH \
       --data-path $DATA_PATH \
       "$@"
