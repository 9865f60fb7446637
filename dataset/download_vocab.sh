#!/usr/bin/env bash
# Fetch the GPT-2 BPE vocabulary and merge table (and, with `bert`, the BERT WordPiece
# vocabularies) used by --vocab-file / --merge-file.
#
# usage: bash dataset/download_vocab.sh [bert] [TARGET_DIR]
#   TARGET_DIR defaults to the current directory.
#   If MEGATRON_VOCAB_DIR is set and holds a file, it is copied from there (no network);
#   otherwise it is downloaded. The GPT-2 files are checked against their known md5.
set -euo pipefail

BASE_URL="https://s3.amazonaws.com/models.huggingface.co/bert"
GPT2_VOCAB_MD5="dffec25a898b1f5e569bec4dffd7e5c0"
GPT2_MERGES_MD5="75a37753dd7a28a2c5df80c28bf06e4e"

WITH_BERT=0
TARGET="."
for arg in "$@"; do
    case "$arg" in
        bert) WITH_BERT=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) TARGET="$arg" ;;
    esac
done
mkdir -p "$TARGET"

md5_of() {
    if command -v md5sum >/dev/null 2>&1; then
        md5sum "$1" | cut -d' ' -f1
    else
        md5 -q "$1"
    fi
}

download() {  # download URL DEST -> 0 on success
    local url="$1" dest="$2"
    if command -v wget >/dev/null 2>&1; then
        wget -q -O "$dest" "$url"
    elif command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$dest" "$url"
    else
        echo "download_vocab.sh: neither wget nor curl is installed" >&2
        return 1
    fi
}

# fetch NAME [MD5]: copy from MEGATRON_VOCAB_DIR or download into TARGET, then verify.
fetch() {
    local name="$1" want_md5="${2:-}" dest="$TARGET/$1" tmp="$TARGET/.$1.part"
    local local_dir="${MEGATRON_VOCAB_DIR:-}"
    if [[ -n "$local_dir" && -f "$local_dir/$name" ]]; then
        if [[ "$(cd "$local_dir" && pwd)/$name" != "$(cd "$TARGET" && pwd)/$name" ]]; then
            cp "$local_dir/$name" "$tmp"
            mv "$tmp" "$dest"
        fi
        echo "copied $name from MEGATRON_VOCAB_DIR=$local_dir"
    elif download "$BASE_URL/$name" "$tmp"; then
        mv "$tmp" "$dest"
        echo "downloaded $name from $BASE_URL/$name"
    else
        rm -f "$tmp"
        echo "ERROR: could not get $name: not in MEGATRON_VOCAB_DIR (${local_dir:-unset})" \
             "and download of $BASE_URL/$name failed" >&2
        exit 1
    fi
    if [[ -n "$want_md5" ]]; then
        local got
        got="$(md5_of "$dest")"
        if [[ "$got" != "$want_md5" ]]; then
            echo "ERROR: $dest has md5 $got, expected $want_md5 (corrupt or wrong file)" >&2
            exit 1
        fi
        echo "md5 ok: $name"
    fi
}

fetch gpt2-vocab.json "$GPT2_VOCAB_MD5"
fetch gpt2-merges.txt "$GPT2_MERGES_MD5"
if [[ "$WITH_BERT" == 1 ]]; then
    fetch bert-large-uncased-vocab.txt
    fetch bert-large-cased-vocab.txt
fi
echo "vocabulary files are in $TARGET"
