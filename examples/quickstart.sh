#!/bin/bash
# The main job on a fresh machine, with no data of your own:
#   1. sets up .venv (torch, deepspeed, this project),
#   2. gets the GPT-2 vocabulary (download, or offline from $MEGATRON_VOCAB_DIR),
#   3. builds a small real English corpus (the Python standard library's documentation),
#   4. preprocesses it with tools/preprocess_data.py,
#   5. trains a small GPT (on the GPU if there is one, else on the CPU), saves a checkpoint,
#   6. resumes from that checkpoint and continues training.
# Everything lands in ./quickstart/. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source tools/setup_env.sh
WORK=${QUICKSTART_DIR:-quickstart}
ITERS=${QUICKSTART_ITERS:-300}
FIRST=$((ITERS * 2 / 3))
mkdir -p "$WORK"

echo "== vocabulary"
if [ ! -f "$WORK/vocab/gpt2-vocab.json" ]; then
  bash dataset/download_vocab.sh "$WORK/vocab"
fi

echo "== corpus"
if [ ! -f "$WORK/corpus.json" ]; then
  python tools/bench/make_corpus.py --min-mb "${QUICKSTART_CORPUS_MB:-4}" --output "$WORK/corpus.json"
fi

echo "== preprocess"
if [ ! -f "$WORK/my-gpt2_text_document.idx" ]; then
  python tools/preprocess_data.py \
         --input "$WORK/corpus.json" \
         --output-prefix "$WORK/my-gpt2" \
         --vocab "$WORK/vocab/gpt2-vocab.json" \
         --dataset-impl mmap \
         --tokenizer-type GPT2BPETokenizer \
         --merge-file "$WORK/vocab/gpt2-merges.txt" \
         --append-eod \
         --workers 2
fi

GPT_ARGS="--num-layers 2 \
          --hidden-size 128 \
          --num-attention-heads 4 \
          --seq-length 128 \
          --max-position-embeddings 128 \
          --micro-batch-size 8 \
          --global-batch-size 8 \
          --lr 0.002 \
          --min-lr 0.0002 \
          --lr-decay-style cosine \
          --lr-warmup-iters 20 \
          --train-iters $ITERS \
          --weight-decay 0.01 \
          --clip-grad 1.0 \
          --vocab-file $WORK/vocab/gpt2-vocab.json \
          --merge-file $WORK/vocab/gpt2-merges.txt \
          --tokenizer-type GPT2BPETokenizer \
          --data-path $WORK/my-gpt2_text_document \
          --split 949,50,1 \
          --log-interval 20 \
          --eval-interval 100 \
          --eval-iters 5 \
          --save $WORK/checkpoints \
          --load $WORK/checkpoints \
          --save-interval $FIRST"

echo "== train (iterations 1-$FIRST, then save and stop)"
python pretrain_gpt.py $GPT_ARGS --exit-interval "$FIRST" "$@"
echo "== resume from the checkpoint at iteration $FIRST and continue to $ITERS"
python pretrain_gpt.py $GPT_ARGS "$@"
echo "== done: checkpoints in $WORK/checkpoints (latest: $(cat "$WORK/checkpoints/latest_checkpointed_iteration.txt"))"
echo "== generate 2 samples from the trained model (tools/generate_samples_gpt.py)"
python tools/generate_samples_gpt.py $GPT_ARGS --num-samples 2 --genfile "$WORK/samples.json" \
       --out-seq-length 48 --top_p 0.9
echo "== samples in $WORK/samples.json"
