#!/bin/bash
# GPT-3 175B on 1024 GPUs (128 nodes x 8) with slurm: 8-way tensor x 16-way pipeline
# parallelism, so 8-way data parallelism. The global batch ramps up from 16 to 1536 in
# steps of 16 over the first 5,859,375 samples.
#
#   sbatch examples/pretrain_gpt3_175B.sh
#
# Set the paths below (or export them) before submitting. The launch uses srun: every task
# is one rank; rank, world size and the rendezvous address come from slurm's variables.

#SBATCH --nodes=128
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --job-name=megatron_gpt3_175b

DIR=${DIR:-$(pwd)}
DATETIME=$(date +'date_%y-%m-%d_time_%H-%M-%S')
mkdir -p "$DIR/logs"

# Training data: three preprocessed corpora blended with weights 0.2, 0.3 and 0.5.
DATASET_1=${DATASET_1:-data/dataset1_text_document}
DATASET_2=${DATASET_2:-data/dataset2_text_document}
DATASET_3=${DATASET_3:-data/dataset3_text_document}
DATASET="0.2 ${DATASET_1} 0.3 ${DATASET_2} 0.5 ${DATASET_3}"

VOCAB_FILE=${VOCAB_FILE:-gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-gpt2-merges.txt}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt3_175b}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-tensorboard/gpt3_175b}

options=" \
    --tensor-model-parallel-size 8 \
    --pipeline-model-parallel-size 16 \
    --num-layers 96 \
    --hidden-size 12288 \
    --num-attention-heads 96 \
    --seq-length 2048 \
    --max-position-embeddings 2048 \
    --micro-batch-size 1 \
    --global-batch-size 1536 \
    --rampup-batch-size 16 16 5859375 \
    --train-samples 146484375 \
    --lr-decay-samples 126953125 \
    --lr-warmup-samples 183105 \
    --lr 6.0e-5 \
    --min-lr 6.0e-6 \
    --lr-decay-style cosine \
    --log-interval 10 \
    --eval-iters 40 \
    --eval-interval 1000 \
    --data-path ${DATASET} \
    --vocab-file ${VOCAB_FILE} \
    --merge-file ${MERGE_FILE} \
    --save-interval 1000 \
    --save ${CHECKPOINT_PATH} \
    --load ${CHECKPOINT_PATH} \
    --split 98,2,0 \
    --clip-grad 1.0 \
    --weight-decay 0.1 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --init-method-std 0.006 \
    --tensorboard-dir ${TENSORBOARD_DIR} \
    --fp16 \
    --checkpoint-activations "

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-6000}

run_cmd="RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID WORLD_SIZE=\$SLURM_NTASKS \
    python -u ${DIR}/pretrain_gpt.py $* ${options}"

srun -l --output="$DIR/logs/%x_%j_$DATETIME.log" sh -c "${run_cmd}"

set +x
