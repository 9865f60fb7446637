"""Reshape Megatron checkpoints between tensor- and pipeline-parallel layouts.

A checkpoint is a grid of files `mp_rank_TT[_PPP]/model_optim_rng.pt`, one per
(tensor rank, pipeline rank). Because module names are checkpoint keys, reshaping is a
table over key names plus layer renumbering; no model is built and no process group is
needed.

Tensor parallelism (which keys are split, on which dim):

    column-parallel  Y = X A, A = [A_1 .. A_p] split by output rows (dim 0):
                     query_key_value.{weight,bias}, dense_h_to_4h.{weight,bias}.
                     The fused QKV rows are laid out per head, [np, 3, hn], so a
                     contiguous row split gives each rank whole heads with their q, k, v.
    row-parallel     Y = sum_i X_i A_i, A split by input columns (dim 1):
                     self_attention.dense.weight, dense_4h_to_h.weight.
    vocab-parallel   word_embeddings.weight (and BERT's lm_head.bias) split on dim 0
                     over the padded vocabulary.
    replicated       layer norms, row-parallel biases, position and token-type
                     embeddings, BERT's pooler / binary head / lm_head dense.

Pipeline parallelism (non-interleaved): stage p holds global layers
[p*L/pp, (p+1)*L/pp), numbered from 0 in its file. With v model chunks per stage
(interleaved, keys model0..model{v-1}), chunk c of stage p holds n = L/(pp*v) layers
starting at c*pp*n + p*n. The first stage holds the embeddings, the last stage the final
layer norm, any heads and, when pp > 1, `word_embeddings_for_head`: the tied copy of the
word embeddings used by the output layer.

The canonical form is the TP = 1, PP = 1 model state, flattened to
{path tuple: tensor} with global layer numbers; every reshape goes through it.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Dict, List, Tuple

import torch

Path = Tuple[str, ...]
FlatState = Dict[Path, torch.Tensor]

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
HEAD_COPY_KEY = "word_embeddings_for_head"

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_RANK_DIR_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")

# (pattern on the dotted key, kind, partition dim); first match wins.
PARTITION_RULES: List[Tuple[re.Pattern, str, int | None]] = [
    (re.compile(r"(^|\.)query_key_value\.(weight|bias)$"), "column", 0),
    (re.compile(r"(^|\.)dense_h_to_4h\.(weight|bias)$"), "column", 0),
    (re.compile(r"(^|\.)(self_attention|attention|inter_attention)\.dense\.weight$"), "row", 1),
    (re.compile(r"(^|\.)dense_4h_to_h\.weight$"), "row", 1),
    (
        re.compile(r"(^|\.)(self_attention|attention|inter_attention)\.dense\.bias$"),
        "replicated",
        None,
    ),
    (re.compile(r"(^|\.)dense_4h_to_h\.bias$"), "replicated", None),
    (re.compile(r"(^|\.)word_embeddings\.weight$"), "vocab", 0),
    (re.compile(r"^word_embeddings_for_head\.weight$"), "vocab", 0),
    (re.compile(r"(^|\.)lm_head\.bias$"), "vocab", 0),
    (re.compile(r"(^|\.)(position_embeddings|tokentype_embeddings)\.weight$"), "replicated", None),
    (re.compile(r"layernorm\.(weight|bias)$"), "replicated", None),
    (
        re.compile(r"(^|\.)(pooler(\.dense)?|binary_head|lm_head\.dense)\.(weight|bias)$"),
        "replicated",
        None,
    ),
]


class ReshapeError(ValueError):
    """A checkpoint that cannot be reshaped as asked; the message names the file or key."""


# ----------------------------------------------------------------------------------------
# Key tables
# ----------------------------------------------------------------------------------------


def dotted(path: Path) -> str:
    return ".".join(path)


def partition_rule(name: str) -> Tuple[str, int | None]:
    """('column' | 'row' | 'vocab' | 'replicated', split dim or None) for a dotted key."""
    for pattern, kind, dim in PARTITION_RULES:
        if pattern.search(name):
            return kind, dim
    raise ReshapeError(
        f"checkpoint key {name!r} is not in the tensor-parallel tables of "
        "megatron/checkpoint_reshape.py; cannot tell how it is split"
    )


def flatten_state(state: dict, prefix: Path = ()) -> FlatState:
    """Nested dicts of tensors -> {path tuple: tensor} (non-tensor leaves are dropped)."""
    flat: FlatState = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(flatten_state(value, prefix + (key,)))
        elif torch.is_tensor(value):
            flat[prefix + (key,)] = value
    return flat


def unflatten_state(flat: FlatState) -> dict:
    """Inverse of flatten_state."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


def _layer_of(path: Path) -> Tuple[int, str] | None:
    m = _LAYER_RE.match(path[-1])
    return (int(m.group(1)), m.group(2)) if m else None


def _with_layer(path: Path, layer: int, rest: str) -> Path:
    return path[:-1] + (f"layers.{layer}.{rest}",)


def _is_head_copy(path: Path) -> bool:
    return path[0] == HEAD_COPY_KEY


def _is_first_stage_key(path: Path) -> bool:
    """Embeddings live on the first pipeline stage; everything else that is not a layer
    (final layer norm, pooler, heads) lives on the last."""
    return "embedding" in path[:-1] or any(
        p.startswith(
            ("embedding.", "word_embeddings", "position_embeddings", "tokentype_embeddings")
        )
        for p in path
    )


# ----------------------------------------------------------------------------------------
# Vocabulary padding
# ----------------------------------------------------------------------------------------


def padded_vocab_size(true_vocab_size: int, divisible_by: int, tp: int) -> int:
    """Smallest multiple of divisible_by * tp that is >= true_vocab_size."""
    multiple = divisible_by * tp
    return -(-true_vocab_size // multiple) * multiple


def repad_vocab(
    tensor: torch.Tensor, target_rows: int, true_vocab_size: int | None, name: str
) -> torch.Tensor:
    """Cut or zero-pad dim 0 to target_rows; rows past the true vocabulary are padding."""
    rows = tensor.size(0)
    if rows == target_rows:
        return tensor
    if true_vocab_size is not None and target_rows < true_vocab_size:
        raise ReshapeError(
            f"{name}: target padded vocab {target_rows} is smaller than the "
            f"true vocab size {true_vocab_size}"
        )
    if target_rows < rows:
        return tensor[:target_rows].clone()
    pad = torch.zeros((target_rows - rows,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


# ----------------------------------------------------------------------------------------
# Tensor parallelism
# ----------------------------------------------------------------------------------------


def merge_tensor_parallel(shards: List[FlatState]) -> FlatState:
    """TP shards of one pipeline stage -> the TP = 1 stage state (rules above)."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(dotted(k) for k in set(shard) ^ set(keys))[:4]
            raise ReshapeError(f"tensor rank {rank} has different keys from rank 0: {diff}")
    merged: FlatState = {}
    for path in keys:
        kind, dim = partition_rule(dotted(path))
        if dim is None:
            merged[path] = shards[0][path]
        else:
            merged[path] = torch.cat([s[path] for s in shards], dim=dim)
    return merged


def split_tensor_parallel(state: FlatState, tp: int) -> List[FlatState]:
    """The TP = 1 stage state -> tp shards; split dims must divide evenly."""
    shards: List[FlatState] = [{} for _ in range(tp)]
    for path, tensor in state.items():
        kind, dim = partition_rule(dotted(path))
        if dim is None:
            for shard in shards:
                shard[path] = tensor.clone()
            continue
        if tensor.size(dim) % tp != 0:
            raise ReshapeError(
                f"{dotted(path)}: size {tensor.size(dim)} on dim {dim} is not "
                f"divisible by the target tensor-parallel size {tp}"
            )
        for rank, part in enumerate(torch.chunk(tensor, tp, dim=dim)):
            shards[rank][path] = part.clone()
    return shards


# ----------------------------------------------------------------------------------------
# Pipeline parallelism
# ----------------------------------------------------------------------------------------


def chunk_layer_offset(stage: int, pp: int, layers_per_chunk: int, chunk: int = 0) -> int:
    """Global number of the first layer of model chunk `chunk` on pipeline stage `stage`."""
    return chunk * pp * layers_per_chunk + stage * layers_per_chunk


def _count_layers(state: FlatState) -> int:
    numbers = {lay[0] for lay in map(_layer_of, state) if lay is not None}
    if numbers and numbers != set(range(len(numbers))):
        raise ReshapeError(f"layer numbers {sorted(numbers)} of a stage are not 0..n-1")
    return len(numbers)


def merge_pipeline(stages: List[List[FlatState]]) -> FlatState:
    """stages[p][c]: the TP = 1 state of chunk c of stage p -> the canonical full state.

    The last stage's tied `word_embeddings_for_head` copy is dropped (the first stage's
    word embeddings are the model's)."""
    pp, v = len(stages), len(stages[0])
    counts = {_count_layers(chunk) for stage in stages for chunk in stage}
    if len(counts) != 1:
        raise ReshapeError(f"pipeline stages hold different numbers of layers: {sorted(counts)}")
    per_chunk = counts.pop()
    full: FlatState = {}
    for p, stage in enumerate(stages):
        for c, chunk in enumerate(stage):
            offset = chunk_layer_offset(p, pp, per_chunk, c)
            for path, tensor in chunk.items():
                if _is_head_copy(path):
                    continue
                layer = _layer_of(path)
                if layer is not None:
                    path = _with_layer(path, layer[0] + offset, layer[1])
                if path in full:
                    raise ReshapeError(f"key {dotted(path)} appears on two pipeline stages")
                full[path] = tensor
    if per_chunk * pp * v != _count_layers(full):
        raise ReshapeError("pipeline stages do not cover the layers 0..L-1 exactly once")
    return full


def _word_embeddings_path(full: FlatState) -> Path | None:
    for path in full:
        if not _is_head_copy(path) and dotted(path).endswith("word_embeddings.weight"):
            return path
    return None


def split_pipeline(full: FlatState, pp: int) -> List[FlatState]:
    """The canonical full state -> pp stage states (layers renumbered from 0 per stage);
    with pp > 1 the last stage gets `word_embeddings_for_head`, a copy of the first
    stage's word embeddings."""
    num_layers = _count_layers(full)
    if num_layers % pp != 0:
        raise ReshapeError(
            f"{num_layers} layers are not divisible by the target pipeline-parallel size {pp}"
        )
    per_stage = num_layers // pp
    stages: List[FlatState] = [{} for _ in range(pp)]
    for path, tensor in full.items():
        layer = _layer_of(path)
        if layer is not None:
            stage = layer[0] // per_stage
            stages[stage][_with_layer(path, layer[0] - stage * per_stage, layer[1])] = tensor
        elif _is_first_stage_key(path):
            stages[0][path] = tensor
        else:
            stages[-1][path] = tensor
    if pp > 1:
        word = _word_embeddings_path(full)
        if word is not None:
            stages[-1][(HEAD_COPY_KEY, "weight")] = full[word].clone()
    return stages


# ----------------------------------------------------------------------------------------
# Whole layouts
# ----------------------------------------------------------------------------------------


def model_chunks(state: dict) -> List[dict]:
    """The model state dicts of one checkpoint file: [model] or [model0, model1, ...]."""
    if "model" in state:
        return [state["model"]]
    chunks = []
    while f"model{len(chunks)}" in state:
        chunks.append(state[f"model{len(chunks)}"])
    if not chunks:
        raise ReshapeError("checkpoint file has no 'model' or 'model0' entry")
    return chunks


def to_canonical(grid: Dict[Tuple[int, int], List[dict]]) -> FlatState:
    """{(tp rank, pp rank): [chunk model states]} -> the canonical full state."""
    tp = 1 + max(t for t, _ in grid)
    pp = 1 + max(p for _, p in grid)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in grid]
    if missing:
        raise ReshapeError(f"checkpoint is missing the files of (tensor, pipeline) ranks {missing}")
    stages = []
    for p in range(pp):
        v = len(grid[(0, p)])
        stages.append(
            [
                merge_tensor_parallel([flatten_state(grid[(t, p)][c]) for t in range(tp)])
                for c in range(v)
            ]
        )
    return merge_pipeline(stages)


def from_canonical(
    full: FlatState,
    tp: int,
    pp: int,
    padded_vocab: int | None = None,
    true_vocab_size: int | None = None,
) -> Dict[Tuple[int, int], dict]:
    """Canonical full state -> {(tp rank, pp rank): nested model state}, re-padding the
    vocabulary-parallel tensors to `padded_vocab` rows first when given."""
    full = dict(full)
    if padded_vocab is not None:
        for path, tensor in full.items():
            if partition_rule(dotted(path))[0] == "vocab":
                full[path] = repad_vocab(tensor, padded_vocab, true_vocab_size, dotted(path))
    grid = {}
    for p, stage in enumerate(split_pipeline(full, pp)):
        for t, shard in enumerate(split_tensor_parallel(stage, tp)):
            grid[(t, p)] = unflatten_state(shard)
    return grid


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------


def read_tracker(load_dir: str) -> Tuple[str, int, bool]:
    """(iteration folder, iteration, release) named by load_dir's tracker file."""
    tracker = os.path.join(load_dir, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        raise ReshapeError(
            f"no checkpoint tracker {tracker}: is --load-dir a Megatron checkpoint folder?"
        )
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(load_dir, "release"), 0, True
    if not text.isdigit():
        raise ReshapeError(f"corrupt checkpoint tracker {tracker}: {text[:40]!r}")
    return os.path.join(load_dir, f"iter_{int(text):07d}"), int(text), False


def load_checkpoint_grid(load_dir: str) -> Tuple[Dict[Tuple[int, int], dict], int, bool]:
    """Every rank file of the latest checkpoint: ({(tp, pp): state}, iteration, release)."""
    folder, iteration, release = read_tracker(load_dir)
    if not os.path.isdir(folder):
        raise ReshapeError(f"checkpoint folder {folder} named by the tracker does not exist")
    grid = {}
    for name in sorted(os.listdir(folder)):
        m = _RANK_DIR_RE.match(name)
        if not m:
            continue
        path = os.path.join(folder, name, "model_optim_rng.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            raise ReshapeError(f"could not read checkpoint file {path}: {e}") from e
        version = state.get("checkpoint_version", 0)
        if version < 2.0:
            raise ReshapeError(
                f"{path}: checkpoint_version {version} stores QKV as [3, np, hn]"
                "; only version >= 2.0 ([np, 3, hn]) can be reshaped"
            )
        grid[(int(m.group(1)), int(m.group(2) or 0))] = state
    if not grid:
        raise ReshapeError(f"no mp_rank_* folders in {folder}")
    return grid, iteration, release


def _source_args(grid: dict):
    return grid[min(grid)].get("args")


def _true_vocab_from_args(args) -> int | None:
    """The tokenizer's vocabulary size from a checkpoint's args, when its files exist."""
    if args is None or getattr(args, "tokenizer_type", None) is None:
        return None
    files = [getattr(args, n, None) for n in ("vocab_file", "merge_file", "tokenizer_model")]
    if not any(f is not None and os.path.isfile(f) for f in files):
        return None
    from .tokenizer.tokenizer import build_tokenizer

    probe = copy.copy(args)
    probe.rank = 1  # silence the tokenizer's log lines
    return build_tokenizer(probe).vocab_size


def reshape_checkpoint(
    load_dir: str,
    save_dir: str,
    target_tp: int,
    target_pp: int,
    true_vocab_size: int | None = None,
    divisible_by: int | None = None,
) -> Dict[str, int]:
    """Write load_dir's latest checkpoint to save_dir at target_tp x target_pp.

    The model weights, args (with the new layout and padded vocab), iteration and consumed
    sample counts are written; optimizer and RNG states are not (they belong to the old
    layout): resume with --no-load-optim --no-load-rng. Returns a summary dict.
    """
    if target_tp < 1 or target_pp < 1:
        raise ReshapeError(
            f"target tensor ({target_tp}) and pipeline ({target_pp}) parallel sizes must be >= 1"
        )
    grid, iteration, release = load_checkpoint_grid(load_dir)
    args = _source_args(grid)
    full = to_canonical({k: model_chunks(v) for k, v in grid.items()})
    num_layers = _count_layers(full)
    if args is not None and getattr(args, "num_layers", num_layers) != num_layers:
        raise ReshapeError(
            f"{load_dir}: args say --num-layers {args.num_layers} but the "
            f"files hold {num_layers} layers"
        )
    if true_vocab_size is None:
        true_vocab_size = _true_vocab_from_args(args)
    if divisible_by is None:
        divisible_by = getattr(args, "make_vocab_size_divisible_by", 128) if args else 128
    word = _word_embeddings_path(full)
    source_padded = full[word].size(0) if word is not None else None
    target_padded = source_padded
    if source_padded is not None and true_vocab_size is not None:
        target_padded = padded_vocab_size(true_vocab_size, divisible_by, target_tp)
    elif source_padded is not None and source_padded % (divisible_by * target_tp) != 0:
        raise ReshapeError(
            f"the padded vocab ({source_padded}) must be re-padded for tensor-parallel size "
            f"{target_tp}, but the true vocab size is unknown: give --true-vocab-size or "
            "--vocab-file"
        )
    out = from_canonical(full, target_tp, target_pp, target_padded, true_vocab_size)
    _write_grid(
        save_dir, out, grid[min(grid)], iteration, release, target_tp, target_pp, target_padded
    )
    return {
        "iteration": iteration,
        "num_layers": num_layers,
        "padded_vocab_size": target_padded or 0,
        "source_tp": 1 + max(t for t, _ in grid),
        "source_pp": 1 + max(p for _, p in grid),
    }


def _write_grid(
    save_dir: str,
    out: dict,
    template: dict,
    iteration: int,
    release: bool,
    tp: int,
    pp: int,
    padded_vocab: int | None,
) -> None:
    args = copy.copy(template.get("args"))
    if args is not None:
        args.tensor_model_parallel_size = tp
        args.pipeline_model_parallel_size = pp
        args.virtual_pipeline_model_parallel_size = None
        args.num_layers_per_virtual_pipeline_stage = None
        if padded_vocab is not None:
            args.padded_vocab_size = padded_vocab
    folder = os.path.join(save_dir, "release" if release else f"iter_{iteration:07d}")
    for (t, p), model in out.items():
        sub = f"mp_rank_{t:02d}_{p:03d}" if pp > 1 else f"mp_rank_{t:02d}"
        state = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "model": model,
        }
        for key in ("consumed_train_samples", "consumed_valid_samples"):
            if key in template:
                state[key] = template[key]
        path = os.path.join(folder, sub, "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    tracker = os.path.join(save_dir, TRACKER_FILENAME)
    with open(tracker + ".tmp", "w") as f:
        f.write("release" if release else str(iteration))
    os.replace(tracker + ".tmp", tracker)


__all__ = [
    "PARTITION_RULES",
    "ReshapeError",
    "partition_rule",
    "flatten_state",
    "unflatten_state",
    "padded_vocab_size",
    "repad_vocab",
    "merge_tensor_parallel",
    "split_tensor_parallel",
    "chunk_layer_offset",
    "merge_pipeline",
    "split_pipeline",
    "model_chunks",
    "to_canonical",
    "from_canonical",
    "load_checkpoint_grid",
    "reshape_checkpoint",
]
