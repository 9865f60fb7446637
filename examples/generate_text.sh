#!/bin/bash
# Unconditional samples from the 345M GPT checkpoint (the seed README's command).
#   bash dataset/download_ckpt.sh     # checkpoint into checkpoints/gpt2_345m
#   bash dataset/download_vocab.sh    # gpt2-vocab.json and gpt2-merges.txt
#   bash examples/generate_text.sh    # samples.json: {"text", "length", "finished"} per line
# The variables below can be overridden from the environment. Extra flags go to the
# script, e.g. `--sample-input-file prompts.txt` for conditional generation (one prompt
# per line, continuations in prompts.txt.out), `--greedy`, `--top_k 40`.

CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt2_345m}
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}

GPT_ARGS="--num-layers 24 \
          --hidden-size 1024 \
          --num-attention-heads 16 \
          --seq-length 1024 \
          --max-position-embeddings 1024 \
          --micro-batch-size 2 \
          --global-batch-size 2 \
          --vocab-file $VOCAB_FILE \
          --merge-file $MERGE_FILE \
          --tokenizer-type GPT2BPETokenizer \
          --fp16"

MAX_OUTPUT_SEQUENCE_LENGTH=${MAX_OUTPUT_SEQUENCE_LENGTH:-1024}
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_P=${TOP_P:-0.9}
NUMBER_OF_SAMPLES=${NUMBER_OF_SAMPLES:-2}
OUTPUT_FILE=${OUTPUT_FILE:-samples.json}

python tools/generate_samples_gpt.py \
       $GPT_ARGS \
       --load $CHECKPOINT_PATH \
       --out-seq-length $MAX_OUTPUT_SEQUENCE_LENGTH \
       --temperature $TEMPERATURE \
       --genfile $OUTPUT_FILE \
       --num-samples $NUMBER_OF_SAMPLES \
       --top_p $TOP_P \
       --recompute \
       "$@"
