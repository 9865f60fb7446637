#!/bin/bash
# Single-device T5-base pretraining (12 encoder + 12 decoder layers, span corruption with
# 100 sentinel tokens). Data: sentence-split documents with the uncased BERT vocabulary,
#   python tools/preprocess_data.py --input my-corpus.json --output-prefix my-t5 \
#          --vocab-file bert-vocab.txt --dataset-impl mmap \
#          --tokenizer-type BertWordPieceLowerCase --split-sentences
# writes my-t5_text_sentence.bin/.idx. Set DATA_PATH to that prefix and VOCAB_FILE to the
# vocabulary (bash dataset/download_vocab.sh). T5 runs with pipeline-parallel size 1.

RANK=0
WORLD_SIZE=1

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/t5_base}
VOCAB_FILE=${VOCAB_FILE:-bert-vocab.txt}
DATA_PATH=${DATA_PATH:-my-t5_text_sentence}

python pretrain_t5.py \
       --num-layers 12 \
       --hidden-size 768 \
       --num-attention-heads 12 \
       --kv-channels 64 \
       --ffn-hidden-size 3072 \
       --encoder-seq-length 512 \
       --decoder-seq-length 128 \
       --micro-batch-size 16 \
       --global-batch-size 16 \
       --max-position-embeddings 512 \
       --train-iters 1000000 \
       --lr-decay-iters 1000000 \
       --save $CHECKPOINT_PATH \
       --load $CHECKPOINT_PATH \
       --data-path $DATA_PATH \
       --vocab-file $VOCAB_FILE \
       --data-impl mmap \
       --split 949,50,1 \
       --lr 0.0001 \
       --min-lr 0.00001 \
       --lr-decay-style linear \
       --lr-warmup-fraction .01 \
       --weight-decay 1e-2 \
       --clip-grad 1.0 \
       --log-interval 100 \
       --save-interval 10000 \
       --eval-interval 1000 \
       --eval-iters 10 \
       --fp16 \
       --vocab-extra-ids 100 \
       "$@"
