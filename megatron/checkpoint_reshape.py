"""Reshape Megatron checkpoints between tensor- and pipeline-parallel layouts.

A checkpoint is a grid of files `mp_rank_TT[_PPP]/model_optim_rng.pt`, one per
(tensor rank, pipeline rank). Because module names are checkpoint keys, reshaping is a
table over key names plus layer renumbering; no model is built and no process group is
needed.

Tensor parallelism (which keys are split, on which dim):

    column-parallel  Y = X A, A = [A_1 .. A_p] split by output rows (dim 0):
                     query_key_value.{weight,bias}, dense_h_to_4h.{weight,bias}.
                     The fused QKV rows are laid out per key/value group, G blocks of
                     [q_1 .. q_r, k, v] (r = heads / G; G = heads is Megatron's per-head
                     [np, 3, hn]), so a contiguous row split gives each rank whole groups
                     when the TP size divides G.
                     With --swiglu, dense_h_to_4h is [G; U] (2 ffn rows: gate, then up)
                     split with partition stride 2: rank r holds [G_r; U_r], so a merge
                     joins the gate halves and the up halves of the shards separately.
    row-parallel     Y = sum_i X_i A_i, A split by input columns (dim 1):
                     self_attention.dense.weight, dense_4h_to_h.weight.
    vocab-parallel   word_embeddings.weight, the untied output_layer.weight
                     (--untie-embeddings-and-output-weights) and BERT's lm_head.bias,
                     split on dim 0 over the padded vocabulary.
    replicated       layer norms (RMSNorm: weight only), row-parallel biases, position
                     and token-type embeddings, BERT's pooler / binary head / lm_head dense.

Pipeline parallelism (non-interleaved): stage p holds global layers
[p*L/pp, (p+1)*L/pp), numbered from 0 in its file. With v model chunks per stage
(interleaved, keys model0..model{v-1}), chunk c of stage p holds n = L/(pp*v) layers
starting at c*pp*n + p*n. The first stage holds the embeddings, the last stage the final
layer norm, any heads, the untied output layer and, when pp > 1 and the output layer is
tied, `word_embeddings_for_head`: the copy of the word embeddings that it uses.

The saved args say what the shapes alone cannot (ModelOptions): SwiGLU (checked against
the shapes: its dense_h_to_4h has twice the rows of dense_4h_to_h's columns) and the
head and key/value-head counts that a target TP size must divide.

The canonical form is the TP = 1, PP = 1 model state, flattened to
{path tuple: tensor} with global layer numbers; every reshape goes through it.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

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
    (re.compile(r"(^|\.)output_layer\.weight$"), "vocab", 0),
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


_SWIGLU_RE = re.compile(r"(^|\.)dense_h_to_4h\.(weight|bias)$")
_MLP_IN = "dense_h_to_4h.weight"
_MLP_OUT = "dense_4h_to_h.weight"


def partition_stride(name: str, swiglu: bool) -> int:
    """How many sub-matrices a split tensor holds, each split over the ranks on its own
    (mpu/layers.py `_rank_slice`): 2 for SwiGLU's fused gate/up projection, else 1."""
    return 2 if swiglu and _SWIGLU_RE.search(name) else 1


def strided_cat(parts: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Shards -> the full tensor. With stride s each shard is s blocks [B_r; B_{r+p}; ..];
    the full tensor is B_0 .. B_{sp-1} (s = 2, SwiGLU: [G_0..G_{p-1}; U_0..U_{p-1}])."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    blocks = [torch.chunk(part, stride, dim=dim) for part in parts]
    return torch.cat([b[j] for j in range(stride) for b in blocks], dim=dim)


def strided_chunk(tensor: torch.Tensor, tp: int, dim: int, stride: int) -> List[torch.Tensor]:
    """The inverse of strided_cat: rank r gets blocks r, r + tp, .. of tp * stride."""
    blocks = torch.chunk(tensor, tp * stride, dim=dim)
    return [torch.cat(blocks[r::tp], dim=dim) for r in range(tp)]


def resolve_swiglu(state: FlatState, swiglu: bool | None) -> bool:
    """Whether the MLPs of `state` (a full state or one TP shard) are SwiGLU: their
    dense_h_to_4h has twice as many rows as dense_4h_to_h has columns (gate and up).
    `swiglu` (the saved args' --swiglu) must agree with the shapes; None: they decide."""
    kinds = {}
    for path, tensor in state.items():
        if not path[-1].endswith(_MLP_IN):
            continue
        partner = path[:-1] + (path[-1][: -len(_MLP_IN)] + _MLP_OUT,)
        if partner not in state or tensor.dim() != 2:
            continue
        rows, cols = tensor.size(0), state[partner].size(1)
        kind = True if rows == 2 * cols else False if rows == cols else None
        if kind is None or (swiglu is not None and kind != swiglu):
            shapes = {True: "a SwiGLU MLP's", False: "a GeLU MLP's", None: "no MLP's"}[kind]
            said = {None: "", True: "--swiglu", False: "no --swiglu"}[swiglu]
            raise ReshapeError(
                f"{dotted(path)} has {rows} rows for the {cols} columns of {dotted(partner)}: "
                f"{shapes} shapes" + (f", but the saved args say {said}" if said else "")
            )
        kinds[path] = kind
    if len(set(kinds.values())) > 1:
        raise ReshapeError("the checkpoint mixes SwiGLU and GeLU MLP shapes")
    return next(iter(kinds.values()), bool(swiglu))


def merge_tensor_parallel(shards: List[FlatState], swiglu: bool | None = None) -> FlatState:
    """TP shards of one pipeline stage -> the TP = 1 stage state (rules above; `swiglu`:
    see resolve_swiglu)."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(dotted(k) for k in set(shard) ^ set(keys))[:4]
            raise ReshapeError(f"tensor rank {rank} has different keys from rank 0: {diff}")
    swiglu = resolve_swiglu(shards[0], swiglu)
    merged: FlatState = {}
    for path in keys:
        name = dotted(path)
        kind, dim = partition_rule(name)
        shapes = [tuple(s[path].shape) for s in shards]
        if len(set(shapes)) != 1:
            raise ReshapeError(f"{name} has different shapes on the tensor ranks: {shapes}")
        if dim is None:
            merged[path] = shards[0][path]
            continue
        stride = partition_stride(name, swiglu)
        if stride > 1 and shapes[0][dim] % stride != 0:
            raise ReshapeError(f"{name}: {shapes[0][dim]} rows do not split into gate and up")
        merged[path] = strided_cat([s[path] for s in shards], dim, stride)
    return merged


def split_tensor_parallel(state: FlatState, tp: int, swiglu: bool | None = None) -> List[FlatState]:
    """The TP = 1 stage state -> tp shards; split dims must divide evenly (SwiGLU's
    dense_h_to_4h: each of its gate and up halves)."""
    swiglu = resolve_swiglu(state, swiglu)
    shards: List[FlatState] = [{} for _ in range(tp)]
    for path, tensor in state.items():
        name = dotted(path)
        kind, dim = partition_rule(name)
        if dim is None:
            for shard in shards:
                shard[path] = tensor.clone()
            continue
        stride = partition_stride(name, swiglu)
        if tensor.size(dim) % (tp * stride) != 0:
            what = "each SwiGLU half of " if stride > 1 else ""
            raise ReshapeError(
                f"{what}{name}: size {tensor.size(dim) // stride} on dim {dim} is not "
                f"divisible by the target tensor-parallel size {tp}"
            )
        for rank, part in enumerate(strided_chunk(tensor, tp, dim, stride)):
            shards[rank][path] = part.clone()
    return shards


@dataclass(frozen=True)
class ModelOptions:
    """What of a checkpoint's saved args decides how its tensors split (None: unknown)."""

    swiglu: bool | None = None  # --swiglu: dense_h_to_4h is [gate; up], stride 2
    num_attention_heads: int | None = None  # a TP size must divide it (whole heads)
    num_key_value_heads: int | None = None  # ... and this (whole key/value groups)
    ffn_hidden_size: int | None = None  # ... and this (the MLP's columns / rows)

    @classmethod
    def from_args(cls, args) -> ModelOptions:
        if args is None:
            return cls()
        heads = _int_arg(args, "num_attention_heads")
        return cls(
            swiglu=bool(getattr(args, "swiglu", False)),
            num_attention_heads=heads,
            num_key_value_heads=_int_arg(args, "num_key_value_heads") or heads,
            ffn_hidden_size=_int_arg(args, "ffn_hidden_size"),
        )

    def check_target(self, tp: int) -> None:
        """A ReshapeError naming each count that tensor-parallel size `tp` does not divide."""
        heads, kv, ffn = self.num_attention_heads, self.num_key_value_heads, self.ffn_hidden_size
        checks = [
            (heads, "--num-attention-heads", "whole attention heads"),
            (kv if kv != heads else None, "--num-key-value-heads", "whole key/value groups"),
            (
                ffn,
                "the SwiGLU --ffn-hidden-size" if self.swiglu else "--ffn-hidden-size",
                "ffn/TP gate and up rows" if self.swiglu else "ffn/TP MLP rows",
            ),
        ]
        wrong = [
            f"{flag} ({n}) is not divisible by it (each rank must hold {what})"
            for n, flag, what in checks
            if n is not None and n % tp != 0
        ]
        if wrong:
            raise ReshapeError(f"target tensor-parallel size {tp}: " + "; ".join(wrong))


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


def _is_untied(full: FlatState) -> bool:
    """The model has an output layer of its own (--untie-embeddings-and-output-weights)."""
    return any(dotted(path).endswith("output_layer.weight") for path in full)


def split_pipeline(full: FlatState, pp: int) -> List[FlatState]:
    """The canonical full state -> pp stage states (layers renumbered from 0 per stage);
    with pp > 1 and a tied output layer the last stage gets `word_embeddings_for_head`, a
    copy of the first stage's word embeddings (an untied output_layer is the last
    stage's own)."""
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
    if pp > 1 and not _is_untied(full):
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


def to_canonical(
    grid: Dict[Tuple[int, int], List[dict]], options: ModelOptions | None = None
) -> FlatState:
    """{(tp rank, pp rank): [chunk model states]} -> the canonical full state."""
    swiglu = (options or ModelOptions()).swiglu
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
                merge_tensor_parallel([flatten_state(grid[(t, p)][c]) for t in range(tp)], swiglu)
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
    options: ModelOptions | None = None,
) -> Dict[Tuple[int, int], dict]:
    """Canonical full state -> {(tp rank, pp rank): nested model state}, re-padding the
    vocabulary-parallel tensors (word embeddings, untied output layer) to `padded_vocab`
    rows first when given. `options` (the saved args) are checked against tp first."""
    options = options or ModelOptions()
    options.check_target(tp)
    swiglu = resolve_swiglu(full, options.swiglu)
    full = dict(full)
    if padded_vocab is not None:
        for path, tensor in full.items():
            if partition_rule(dotted(path))[0] == "vocab":
                full[path] = repad_vocab(tensor, padded_vocab, true_vocab_size, dotted(path))
    grid = {}
    for p, stage in enumerate(split_pipeline(full, pp)):
        for t, shard in enumerate(split_tensor_parallel(stage, tp, swiglu)):
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


RANK_FILENAME = "model_optim_rng.pt"
_MAX_PROBLEMS = 4


@dataclass
class SourceCheckpoint:
    """The rank files of one checkpoint, checked against the layout they describe."""

    folder: str
    iteration: int
    release: bool
    tp: int
    pp: int
    vp: int
    grid: Dict[Tuple[int, int], dict]
    args: Any
    layout_from_args: bool

    @property
    def template(self) -> dict:
        return self.grid[(0, 0)]

    def describe(self) -> str:
        where = "saved args" if self.layout_from_args else "rank folders"
        return f"TP={self.tp}, PP={self.pp}, virtual PP={self.vp} ({where})"


def rank_folder_name(tp_rank: int, pp_rank: int, suffixed: bool) -> str:
    """mp_rank_TT, or mp_rank_TT_PPP when the checkpoint is pipeline-parallel."""
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}" if suffixed else f"mp_rank_{tp_rank:02d}"


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summarise(problems: List[str]) -> str:
    shown = "; ".join(problems[:_MAX_PROBLEMS])
    more = len(problems) - _MAX_PROBLEMS
    return shown + (f"; and {more} more" if more > 0 else "")


class _RankReader:
    """Loads each rank file of an iteration folder once, noting the unreadable ones."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.states: Dict[str, dict] = {}
        self.bad: Dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name, RANK_FILENAME)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.path(name))

    def load(self, name: str) -> dict | None:
        if name not in self.states and name not in self.bad:
            self._read(name)
        return self.states.get(name)

    def _read(self, name: str) -> None:
        path = self.path(name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
            self.bad[name] = f"{path} is unreadable ({_one_line(e)})"
            return
        if not isinstance(state, dict):
            self.bad[name] = f"{path} does not hold a checkpoint dict"
            return
        self.states[name] = state


def _rank_folders(folder: str) -> Dict[str, Tuple[int, int, bool]]:
    """{folder name: (tensor rank, pipeline rank, has the _PPP suffix)}."""
    found = {}
    for name in sorted(os.listdir(folder)):
        m = _RANK_DIR_RE.match(name)
        if m:
            found[name] = (int(m.group(1)), int(m.group(2) or 0), m.group(2) is not None)
    if not found:
        raise ReshapeError(f"no mp_rank_* folders in {folder}")
    return found


def _reference_state(reader: _RankReader, names: List[str]) -> dict:
    """The first readable rank file (rank 0 when it is readable): its args name the layout."""
    for name in names:
        if reader.exists(name) and reader.load(name) is not None:
            return reader.states[name]
    bad = list(reader.bad.values()) or [f"no {RANK_FILENAME} in any of {names}"]
    raise ReshapeError(f"checkpoint {reader.folder} cannot be read: {_summarise(bad)}")


def saved_layout(args) -> Tuple[int, int, int] | None:
    """(TP, PP, virtual PP) recorded in a checkpoint's args, or None when not recorded."""
    tp = getattr(args, "tensor_model_parallel_size", None)
    if tp is None:
        return None
    pp = getattr(args, "pipeline_model_parallel_size", None) or 1
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    return int(tp), int(pp), int(vp)


def _folder_layout(folder: str, found: dict, reference: dict) -> Tuple[int, int, int, bool]:
    """(TP, PP, virtual PP, suffixed names) inferred from the folder names alone."""
    suffixed = {s for _, _, s in found.values()}
    if len(suffixed) > 1:
        raise ReshapeError(
            f"{folder} mixes mp_rank_TT and mp_rank_TT_PPP folders ({sorted(found)}) and "
            "its files record no parallel layout"
        )
    tp = 1 + max(t for t, _, _ in found.values())
    pp = 1 + max(p for _, p, _ in found.values())
    try:
        vp = len(model_chunks(reference))
    except ReshapeError:
        vp = 1  # reported with the file's path by _file_problems
    return tp, pp, vp, suffixed.pop()


def _layout_problems(
    reader: _RankReader, found: dict, expected: Dict[str, Tuple[int, int]], layout: str
) -> List[str]:
    """Missing, unreadable and unexpected rank files of an iteration folder."""
    problems = []
    missing = [reader.path(n) for n in expected if not reader.exists(n)]
    if missing:
        problems.append(f"missing rank file(s) {', '.join(missing)} of {layout}")
    for name in expected:
        if reader.exists(name):
            reader.load(name)
    problems += [reader.bad[n] for n in expected if n in reader.bad]
    extra = [n for n in found if n not in expected]
    if extra:
        problems.append(
            f"{reader.folder} also holds rank folder(s) {', '.join(extra)} outside {layout}: "
            "left over from another layout? move them away"
        )
    return problems


def _int_arg(args, name: str) -> int | None:
    value = getattr(args, name, None)
    return int(value) if isinstance(value, int) else None


def _product(*factors: int | None) -> int | None:
    if any(f is None for f in factors):
        return None
    result = 1
    for f in factors:
        result *= f
    return result


def _full_shapes(args) -> List[Tuple[re.Pattern, Tuple[int, ...]]]:
    """(key pattern, TP = 1 shape) for the tensors whose shape the saved args fix."""
    h = _int_arg(args, "hidden_size")
    heads = _int_arg(args, "num_attention_heads")
    kv_heads = _int_arg(args, "num_key_value_heads") or heads
    hn = _int_arg(args, "kv_channels") or (h // heads if h and heads else None)
    proj = _product(hn, heads)
    qkv = None if heads is None or hn is None else (heads + 2 * kv_heads) * hn
    ffn = _int_arg(args, "ffn_hidden_size") or _product(4, h)
    ffn_in = _product(2, ffn) if getattr(args, "swiglu", False) else ffn  # [gate; up]
    vocab = _int_arg(args, "padded_vocab_size")
    layer = r"(^|\.)layers\.\d+\."
    table = [
        (layer + r"self_attention\.query_key_value\.weight$", (qkv, h)),
        (layer + r"self_attention\.query_key_value\.bias$", (qkv,)),
        (layer + r"self_attention\.dense\.weight$", (h, proj)),
        (layer + r"mlp\.dense_h_to_4h\.weight$", (ffn_in, h)),
        (layer + r"mlp\.dense_h_to_4h\.bias$", (ffn_in,)),
        (layer + r"mlp\.dense_4h_to_h\.weight$", (h, ffn)),
        (layer + r"(self_attention\.dense|mlp\.dense_4h_to_h)\.bias$", (h,)),
        (r"layernorm\.(weight|bias)$", (h,)),  # RMSNorm: weight only
        (r"(^|\.)(word_embeddings(_for_head)?|output_layer)\.weight$", (vocab, h)),
        (r"(^|\.)position_embeddings\.weight$", (_int_arg(args, "max_position_embeddings"), h)),
    ]
    return [(re.compile(p), shape) for p, shape in table if None not in shape]


def _ruled_out(args) -> List[Tuple[re.Pattern, str]]:
    """(key pattern, the saved flag) of tensors that the saved args say a model lacks."""
    layer = r"(^|\.)layers\.\d+\."
    table = [
        (
            getattr(args, "normalization", None) == "rmsnorm",
            r"layernorm\.bias$",
            "--normalization rmsnorm",
        ),
        (
            getattr(args, "add_bias_linear", True) is False,
            layer
            + r"(self_attention\.(query_key_value|dense)|mlp\.dense_(h_to_4h|4h_to_h))\.bias$",
            "--disable-bias-linear",
        ),
        (
            getattr(args, "add_position_embedding", True) is False
            or getattr(args, "use_rotary_position_embeddings", False),
            r"(^|\.)position_embeddings\.weight$",
            "--no-position-embedding or RoPE",
        ),
        (
            getattr(args, "untie_embeddings_and_output_weights", False),
            r"^word_embeddings_for_head\.weight$",
            "--untie-embeddings-and-output-weights",
        ),
    ]
    return [(re.compile(p), flag) for on, p, flag in table if on]


def _key_problems(path: str, chunks: List[dict], args) -> List[str]:
    """One line for the first tensor of a rank file that the saved args rule out."""
    table = _ruled_out(args)
    for chunk in chunks:
        for key in flatten_state(chunk):
            name = dotted(key)
            flag = next((f for pattern, f in table if pattern.search(name)), None)
            if flag is not None:
                return [f"{path}: holds {name}, which a model saved with {flag} does not have"]
    return []


def _shard_shape(full: Tuple[int, ...], dim: int | None, tp: int) -> Tuple[int, ...] | None:
    """The shape of one of tp shards of a `full` tensor split on dim (None: not even)."""
    if dim is None:
        return full
    if full[dim] % tp != 0:
        return None
    return full[:dim] + (full[dim] // tp,) + full[dim + 1 :]


def _wrong_shapes(chunks: List[dict], args, tp: int) -> List[Tuple[str, list, list]]:
    """(key, shape, expected shape) of the tensors the saved args give another shape."""
    table = _full_shapes(args)
    wrong = []
    for chunk in chunks:
        for key, tensor in flatten_state(chunk).items():
            name = dotted(key)
            full = next((shape for pattern, shape in table if pattern.search(name)), None)
            if full is None:
                continue
            expect = _shard_shape(full, partition_rule(name)[1], tp)
            if expect != tuple(tensor.shape):
                shown = list(expect) if expect else f"{list(full)} split {tp} ways"
                wrong.append((name, list(tensor.shape), shown))
    return wrong


def _shape_problems(path: str, chunks: List[dict], args, tp: int) -> List[str]:
    """At most one line per rank file: its first wrong shape and how many there are."""
    wrong = _wrong_shapes(chunks, args, tp)
    if not wrong:
        return []
    name, shape, expect = wrong[0]
    more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
    return [f"{path}: {name} has shape {shape} but the saved args (TP={tp}) give {expect}{more}"]


def _layer_count_problems(path: str, chunks: List[dict], args, pp: int, vp: int) -> List[str]:
    num_layers = _int_arg(args, "num_layers")
    if num_layers is None:
        return []
    per_chunk = num_layers / (pp * vp)
    problems = []
    for c, chunk in enumerate(chunks):
        count = _count_layers(flatten_state(chunk))
        if count != per_chunk:
            problems.append(
                f"{path}: model chunk {c} holds {count} layers, the saved args "
                f"({num_layers} layers, PP={pp}, virtual PP={vp}) give {per_chunk:g}"
            )
    return problems


def _file_problems(path: str, state: dict, source: SourceCheckpoint) -> List[str]:
    """What is wrong with one rank file of `source`: version, layout, chunks, shapes."""
    version = state.get("checkpoint_version", 0)
    if version < 2.0:
        return [
            f"{path}: checkpoint_version {version} stores QKV as [3, np, hn]; only "
            "version >= 2.0 ([np, 3, hn]) can be reshaped"
        ]
    try:
        chunks = model_chunks(state)
    except ReshapeError as e:
        return [f"{path}: {e}"]
    if len(chunks) != source.vp:
        return [f"{path} holds {len(chunks)} model chunk(s), not {source.vp} ({source.describe()})"]
    if not source.layout_from_args:
        return []
    own = saved_layout(state.get("args"))
    if own is not None and own != (source.tp, source.pp, source.vp):
        return [f"{path} records TP, PP, virtual PP = {own}, unlike {source.describe()}"]
    return (
        _layer_count_problems(path, chunks, source.args, source.pp, source.vp)
        + _key_problems(path, chunks, source.args)
        + _shape_problems(path, chunks, source.args, source.tp)
    )


def load_source(load_dir: str) -> SourceCheckpoint:
    """Every rank file of the latest checkpoint, checked before anything is reshaped.

    The layout (TP, PP, virtual PP) is the one the checkpoint's saved args record (else the
    one its rank folders spell). Missing, unreadable and unexpected rank files, files of
    another layout and shards whose shapes the saved args contradict are all errors, named
    together in one ReshapeError."""
    folder, iteration, release = read_tracker(load_dir)
    if not os.path.isdir(folder):
        raise ReshapeError(f"checkpoint folder {folder} named by the tracker does not exist")
    found = _rank_folders(folder)
    reader = _RankReader(folder)
    reference = _reference_state(reader, list(found))
    args = reference.get("args")
    layout = saved_layout(args)
    if layout is not None:
        tp, pp, vp = layout
        suffixed = pp > 1
    else:
        tp, pp, vp, suffixed = _folder_layout(folder, found, reference)
    source = SourceCheckpoint(folder, iteration, release, tp, pp, vp, {}, args, layout is not None)
    expected = {rank_folder_name(t, p, suffixed): (t, p) for t in range(tp) for p in range(pp)}
    problems = _layout_problems(reader, found, expected, source.describe())
    for name, rank in expected.items():
        if name in reader.states:
            problems += _file_problems(reader.path(name), reader.states[name], source)
            source.grid[rank] = reader.states[name]
    if problems:
        raise ReshapeError(f"checkpoint {folder} is not usable: {_summarise(problems)}")
    return source


def load_checkpoint_grid(load_dir: str) -> Tuple[Dict[Tuple[int, int], dict], int, bool]:
    """Every rank file of the latest checkpoint: ({(tp, pp): state}, iteration, release)."""
    source = load_source(load_dir)
    return source.grid, source.iteration, source.release


def _true_vocab_from_args(args) -> int | None:
    """The tokenizer's vocabulary size from a checkpoint's args, when its files exist."""
    if args is None or getattr(args, "tokenizer_type", None) is None:
        return None
    files = [getattr(args, n, None) for n in ("vocab_file", "merge_file", "tokenizer_model")]
    null = args.tokenizer_type == "NullTokenizer" and getattr(args, "vocab_size", None)
    if not null and not any(f is not None and os.path.isfile(f) for f in files):
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
    source: SourceCheckpoint | None = None,
) -> Dict[str, int]:
    """Write load_dir's latest checkpoint to save_dir at target_tp x target_pp.

    The model weights, args (with the new layout and padded vocab), iteration and consumed
    sample counts are written; optimizer and RNG states are not (they belong to the old
    layout): resume with --no-load-optim --no-load-rng. Everything is checked before the
    first file is written, and a failed write removes the files and folders it created.
    `source` is load_source(load_dir) when the caller has it already. Returns a summary.
    """
    if target_tp < 1 or target_pp < 1:
        raise ReshapeError(
            f"target tensor ({target_tp}) and pipeline ({target_pp}) parallel sizes must be >= 1"
        )
    source = source or load_source(load_dir)
    args = source.args
    options = ModelOptions.from_args(args)
    options.check_target(target_tp)
    full = to_canonical({k: model_chunks(v) for k, v in source.grid.items()}, options)
    _check_output_layer(load_dir, full, args)
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
    target_padded = _target_padded_vocab(full, true_vocab_size, divisible_by, target_tp)
    out = from_canonical(full, target_tp, target_pp, target_padded, true_vocab_size, options)
    files = _output_files(out, source, target_tp, target_pp, target_padded)
    _write_files(save_dir, files, "release" if source.release else str(source.iteration))
    return {
        "iteration": source.iteration,
        "num_layers": num_layers,
        "padded_vocab_size": target_padded or 0,
        "source_tp": source.tp,
        "source_pp": source.pp,
        "source_vp": source.vp,
    }


def _check_output_layer(load_dir: str, full: FlatState, args) -> None:
    """An untied model (saved args) has its output layer; a tied one has none."""
    untied = getattr(args, "untie_embeddings_and_output_weights", None)
    if untied is not None and bool(untied) != _is_untied(full):
        raise ReshapeError(
            f"{load_dir}: the saved args say "
            + ("" if untied else "no ")
            + "--untie-embeddings-and-output-weights but the files hold "
            + ("no " if untied else "a ")
            + "language_model.output_layer.weight"
        )


def _target_padded_vocab(
    full: FlatState, true_vocab_size: int | None, divisible_by: int, target_tp: int
) -> int | None:
    """Rows of the target's word embeddings (None: the model has none)."""
    word = _word_embeddings_path(full)
    if word is None:
        return None
    source_padded = full[word].size(0)
    if true_vocab_size is not None:
        return padded_vocab_size(true_vocab_size, divisible_by, target_tp)
    if source_padded % (divisible_by * target_tp) != 0:
        raise ReshapeError(
            f"the padded vocab ({source_padded}) must be re-padded for tensor-parallel size "
            f"{target_tp}, but the true vocab size is unknown: give --true-vocab-size or "
            "--vocab-file"
        )
    return source_padded


def _target_args(template_args, tp: int, pp: int, padded_vocab: int | None):
    args = copy.copy(template_args)
    if args is not None:
        args.tensor_model_parallel_size = tp
        args.pipeline_model_parallel_size = pp
        args.virtual_pipeline_model_parallel_size = None
        args.num_layers_per_virtual_pipeline_stage = None
        if padded_vocab is not None:
            args.padded_vocab_size = padded_vocab
    return args


def _output_files(
    out: dict, source: SourceCheckpoint, tp: int, pp: int, padded_vocab: int | None
) -> Dict[str, dict]:
    """{path relative to the save folder: state} of the target checkpoint."""
    template = source.template
    args = _target_args(template.get("args"), tp, pp, padded_vocab)
    folder = "release" if source.release else f"iter_{source.iteration:07d}"
    files = {}
    for (t, p), model in out.items():
        state = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": source.iteration,
            "model": model,
        }
        for key in ("consumed_train_samples", "consumed_valid_samples", "consumed_train_tokens"):
            if key in template:
                state[key] = template[key]
        files[os.path.join(folder, rank_folder_name(t, p, pp > 1), RANK_FILENAME)] = state
    return files


def _refuse_mixed_layouts(save_dir: str, files: Dict[str, dict]) -> None:
    """An iteration folder of save_dir that holds rank folders the target does not write
    would end up with two layouts in it."""
    ours: Dict[str, set] = {}
    for rel in files:
        iteration_dir, rank_dir = rel.split(os.sep)[:2]
        ours.setdefault(iteration_dir, set()).add(rank_dir)
    for iteration_dir, names in ours.items():
        folder = os.path.join(save_dir, iteration_dir)
        if not os.path.isdir(folder):
            continue
        stale = sorted(n for n in os.listdir(folder) if _RANK_DIR_RE.match(n) and n not in names)
        if stale:
            raise ReshapeError(
                f"{folder} already holds rank folder(s) {', '.join(stale)} that the target "
                "layout does not write; choose an empty --save-dir"
            )


def _new_folders(paths: List[str]) -> List[str]:
    """The top-most folders on the way to `paths` that do not exist yet."""
    tops = set()
    for path in paths:
        folder, top = os.path.dirname(os.path.abspath(path)), None
        while not os.path.exists(folder):
            folder, top = os.path.dirname(folder), folder
        if top is not None:
            tops.add(top)
    return sorted(tops)


def _undo_write(paths: List[str], new_files: List[str], new_folders: List[str]) -> None:
    for path in paths:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
    for path in new_files:
        if os.path.exists(path):
            os.remove(path)
    for folder in new_folders:
        shutil.rmtree(folder, ignore_errors=True)


def _write_files(save_dir: str, files: Dict[str, dict], tracker_text: str) -> None:
    """Write every file under a temporary name, then rename them all and write the tracker;
    on any failure remove what this call created (files and folders that were there before
    are kept)."""
    _refuse_mixed_layouts(save_dir, files)
    targets = {os.path.join(save_dir, rel): state for rel, state in files.items()}
    tracker = os.path.join(save_dir, TRACKER_FILENAME)
    paths = list(targets) + [tracker]
    new_folders = _new_folders(paths)
    new_files = [p for p in paths if not os.path.exists(p)]
    try:
        for path, state in targets.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path + ".tmp")
        with open(tracker + ".tmp", "w") as f:
            f.write(tracker_text)
        for path in paths:
            os.replace(path + ".tmp", path)
    except BaseException:
        _undo_write(paths, new_files, new_folders)
        raise


__all__ = [
    "PARTITION_RULES",
    "ReshapeError",
    "partition_rule",
    "partition_stride",
    "strided_cat",
    "strided_chunk",
    "resolve_swiglu",
    "ModelOptions",
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
    "SourceCheckpoint",
    "saved_layout",
    "rank_folder_name",
    "load_source",
    "load_checkpoint_grid",
    "reshape_checkpoint",
]
