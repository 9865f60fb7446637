#!/usr/bin/env bash
# Fetch NVIDIA's pretrained Megatron GPT-2 345M checkpoint (NGC megatron_lm_345m v0.0)
# and extract it into Megatron's release layout, which --load reads as it is:
#   TARGET_DIR/latest_checkpointed_iteration.txt          "release"
#   TARGET_DIR/release/mp_rank_00/model_optim_rng.pt
#
# usage: bash dataset/download_ckpt.sh [TARGET_DIR]
#   TARGET_DIR defaults to checkpoints/gpt2_345m (what examples/generate_text.sh loads).
#   MEGATRON_CKPT_ZIP=FILE extracts a zip already on disk instead of downloading it.
# The vocabulary comes from dataset/download_vocab.sh.
set -euo pipefail

URL="https://api.ngc.nvidia.com/v2/models/nvidia/megatron_lm_345m/versions/v0.0/zip"
TARGET="checkpoints/gpt2_345m"
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) TARGET="$arg" ;;
    esac
done
mkdir -p "$TARGET"
TRACKER="$TARGET/latest_checkpointed_iteration.txt"
WEIGHTS="$TARGET/release/mp_rank_00/model_optim_rng.pt"
if [[ -f "$TRACKER" && -f "$WEIGHTS" ]]; then
    echo "checkpoint already in $TARGET ($WEIGHTS)"
    exit 0
fi

download() {  # download URL DEST -> 0 on success
    local url="$1" dest="$2"
    if command -v wget >/dev/null 2>&1; then
        wget -q -O "$dest" "$url"
    elif command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$dest" "$url"
    else
        echo "download_ckpt.sh: neither wget nor curl is installed" >&2
        return 1
    fi
}

extract() {  # extract ZIP DIR: unzip, or Python's zipfile where unzip is missing
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2"
    else
        python3 -m zipfile -e "$1" "$2"
    fi
}

ZIP="$TARGET/.megatron_lm_345m_v0.0.zip.part"
if [[ -n "${MEGATRON_CKPT_ZIP:-}" ]]; then
    if [[ ! -f "$MEGATRON_CKPT_ZIP" ]]; then
        echo "ERROR: MEGATRON_CKPT_ZIP=$MEGATRON_CKPT_ZIP: no such file" >&2
        exit 1
    fi
    cp "$MEGATRON_CKPT_ZIP" "$ZIP"
    echo "copied $MEGATRON_CKPT_ZIP"
elif download "$URL" "$ZIP"; then
    echo "downloaded $URL"
else
    rm -f "$ZIP"
    echo "ERROR: download of $URL failed (or set MEGATRON_CKPT_ZIP to a downloaded copy)" >&2
    exit 1
fi
# Extract into a temporary folder beside TARGET and move the checkpoint in: an interrupted
# run never leaves a tracker without its weights.
STAGE="$(mktemp -d "$TARGET/.extract.XXXXXX")"
trap 'rm -rf "$STAGE" "$ZIP"' EXIT
if ! extract "$ZIP" "$STAGE"; then
    echo "ERROR: $ZIP is not a readable zip archive (corrupt or incomplete download)" >&2
    exit 1
fi
# the archive holds the tracker and release/ at its top, or under one folder
ROOT_DIR="$(dirname "$(find "$STAGE" -name latest_checkpointed_iteration.txt | head -n 1)")"
if [[ ! -f "$ROOT_DIR/latest_checkpointed_iteration.txt" || \
      ! -f "$ROOT_DIR/release/mp_rank_00/model_optim_rng.pt" ]]; then
    echo "ERROR: the archive has no latest_checkpointed_iteration.txt and" \
         "release/mp_rank_00/model_optim_rng.pt" >&2
    exit 1
fi
if [[ "$(tr -d '[:space:]' < "$ROOT_DIR/latest_checkpointed_iteration.txt")" != "release" ]]; then
    echo "ERROR: the archive's latest_checkpointed_iteration.txt does not say 'release'" >&2
    exit 1
fi
rm -rf "$TARGET/release"
mv "$ROOT_DIR/release" "$TARGET/release"
mv "$ROOT_DIR/latest_checkpointed_iteration.txt" "$TRACKER"
echo "checkpoint extracted into $TARGET (load it with --load $TARGET)"
