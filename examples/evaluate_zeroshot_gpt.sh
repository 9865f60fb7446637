#!/bin/bash
# Zero-shot evaluation of a GPT checkpoint: WikiText-103 perplexity (TASK=WIKITEXT103,
# a wiki.test.tokens file) or LAMBADA cloze accuracy (TASK=LAMBADA, JSON lines {"text"}).
# Set the model flags to the ones the checkpoint was trained with (345M here).

WORLD_SIZE=${WORLD_SIZE:-1}

DISTRIBUTED_ARGS="--nproc_per_node $WORLD_SIZE \
                  --nnodes 1 \
                  --node_rank 0 \
                  --master_addr localhost \
                  --master_port 6000"

TASK=${TASK:-"WIKITEXT103"}

VALID_DATA=${VALID_DATA:-<wikitext path>.txt}
VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}
CHECKPOINT=${CHECKPOINT:-checkpoints/gpt2_345m}

TASK_ARGS=""
if [ "$TASK" = "LAMBADA" ]; then
    TASK_ARGS="--strict-lambada"
fi

python -m torch.distributed.run $DISTRIBUTED_ARGS ./tasks/main.py \
       --task $TASK \
       $TASK_ARGS \
       --valid-data $VALID_DATA \
       --tokenizer-type GPT2BPETokenizer \
       --vocab-file $VOCAB_FILE \
       --merge-file $MERGE_FILE \
       --load $CHECKPOINT \
       --tensor-model-parallel-size 1 \
       --num-layers 24 \
       --hidden-size 1024 \
       --num-attention-heads 16 \
       --seq-length 1024 \
       --max-position-embeddings 1024 \
       --fp16 \
       --micro-batch-size 8 \
       --checkpoint-activations \
       --log-interval 10 \
       --overlapping-eval 32 \
       --no-load-optim \
       --no-load-rng
