"""Hugging Face transformers models <-> this project's Megatron checkpoints.

Two model classes are mapped, both to the one GPT stack (decoder-only, pre-LN):

    GPT2LMHeadModel   LayerNorm, GeLU MLP, learned positions, biases everywhere, tied head
    LlamaForCausalLM  RMSNorm, SwiGLU MLP, RoPE (rotate-half pairing), grouped-query
                      attention, no biases, tied or untied head

The Megatron side is the canonical form of megatron/checkpoint_reshape.py: the TP = 1,
PP = 1 `model` state flattened to {path tuple: tensor}, layers numbered globally:

    language_model.embedding.word_embeddings.weight       [padded vocab, h]
    language_model.embedding.position_embeddings.weight   [max positions, h]   (GPT-2)
    language_model.transformer.layers.{i}.<key>           (tables below)
    language_model.transformer.final_layernorm.{weight,bias}
    language_model.output_layer.weight                    [padded vocab, h]    (untied)

Layouts (h hidden, N heads, G key/value heads, r = N / G, hn per-head width, f ffn):

* Fused QKV `query_key_value` [(N + 2G) hn, h] is G blocks of (r + 2) hn rows,
  [q_{g r} .. q_{g r + r - 1}, k_g, v_g]; with G = N that is Megatron's per-head [q, k, v].
  Llama's q_proj / k_proj / v_proj are plain head-major rows, so they are cut per group and
  interleaved; GPT-2's c_attn is Conv1D ([in, out], the transpose of a Linear weight) with
  outputs [q (N hn); k; v], cut per head the same way. The rows are not permuted within a
  head: our RoPE and Llama's both rotate channel k with channel k + hn/2 (rotate-half).
* SwiGLU `dense_h_to_4h` [2f, h] at TP = 1 is [gate_proj; up_proj]; `dense_4h_to_h` is
  down_proj.
* GPT-2's Conv1D weights (c_attn, c_proj, c_fc, mlp.c_proj) are transposed.
* The vocabulary is padded with zero rows to Megatron's padded size (a multiple of
  --make-vocab-size-divisible-by x TP over the tokenizer's vocabulary) on import, and the
  padding rows are cut off on export.

Import: `read_hf_model(hf_dir)` reads config.json and model.safetensors or
pytorch_model.bin (or their sharded form with an .index.json) and the tokenizer found
beside them (tokenizer.json -> HFTokenizer, tokenizer.model -> GPTSentencePieceTokenizer,
vocab.json + merges.txt -> GPT2BPETokenizer); it returns an HFImport with the canonical
state, the Megatron flags by arguments.py dest, and `train_command()`. Export:
`write_hf_model(canonical, args, save_dir, tokenizer_info)` writes config.json,
model.safetensors (sharded with an index above max_shard_size) and tokenizer files that
AutoTokenizer loads. Whatever one side cannot express (MoE into a dense class, LayerNorm or
GeLU into Llama, RMSNorm, RoPE or SwiGLU into GPT-2, partial rotary, biases in Llama's
linears, RoPE scaling, ...) is an HFInteropError naming it, raised before anything is
written. transformers itself is not needed to convert (only to use the result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from .checkpoint_reshape import FlatState, Path, padded_vocab_size, repad_vocab
from .errors import register_one_line_error


@register_one_line_error
class HFInteropError(ValueError):
    """A model, file or option that cannot be converted; one line naming it and why."""


# ----------------------------------------------------------------------------------------
# Key tables
# ----------------------------------------------------------------------------------------

WORD = ("language_model", "embedding", "word_embeddings", "weight")
POSITION = ("language_model", "embedding", "position_embeddings", "weight")
OUTPUT = ("language_model", "output_layer", "weight")


def _stack(key: str) -> Path:
    return ("language_model", "transformer", key)


@dataclass(frozen=True)
class _Dims:
    """Sizes that the layout functions need."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: _Dims) -> torch.Tensor:
    """q [N hn, ...], k and v [G hn, ...] -> G blocks [q_{g r} .. q_{g r + r - 1}, k_g, v_g]."""
    g, hn, rest = d.kv_heads, d.head_dim, q.shape[1:]
    r = d.heads // g
    blocks = (q.reshape(g, r * hn, *rest), k.reshape(g, hn, *rest), v.reshape(g, hn, *rest))
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


def _unpack_qkv(t: torch.Tensor, d: _Dims) -> Tuple[torch.Tensor, ...]:
    g, hn, rest = d.kv_heads, d.head_dim, t.shape[1:]
    r = d.heads // g
    q, k, v = torch.split(t.reshape(g, (r + 2) * hn, *rest), [r * hn, hn, hn], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))


# kind: (HF tensors -> Megatron tensor, Megatron tensor -> HF tensors)
_KINDS: Dict[str, Tuple[Callable, Callable]] = {
    "copy": (lambda ts, d: ts[0], lambda t, d: (t,)),
    "conv1d": (lambda ts, d: ts[0].t(), lambda t, d: (t.t(),)),
    "qkv": (lambda ts, d: _pack_qkv(*ts, d), _unpack_qkv),
    "gate_up": (lambda ts, d: torch.cat(ts, dim=0), lambda t, d: tuple(torch.chunk(t, 2, dim=0))),
    "conv1d_qkv": (
        lambda ts, d: _pack_qkv(*torch.chunk(ts[0].t(), 3, dim=0), d),
        lambda t, d: (torch.cat(_unpack_qkv(t, d), dim=0).t(),),
    ),
    "fused_qkv": (
        lambda ts, d: _pack_qkv(*torch.chunk(ts[0], 3, dim=0), d),
        lambda t, d: (torch.cat(_unpack_qkv(t, d), dim=0),),
    ),
}

# (Megatron key after `layers.{i}.`, HF keys after the HF layer prefix, kind)
_LLAMA_LAYER = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (
        "self_attention.query_key_value.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ("self_attention.dense.weight", ("self_attn.o_proj.weight",), "copy"),
    ("post_attention_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.dense_h_to_4h.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.dense_4h_to_h.weight", ("mlp.down_proj.weight",), "copy"),
)
_GPT2_LAYER = (
    ("input_layernorm.weight", ("ln_1.weight",), "copy"),
    ("input_layernorm.bias", ("ln_1.bias",), "copy"),
    ("self_attention.query_key_value.weight", ("attn.c_attn.weight",), "conv1d_qkv"),
    ("self_attention.query_key_value.bias", ("attn.c_attn.bias",), "fused_qkv"),
    ("self_attention.dense.weight", ("attn.c_proj.weight",), "conv1d"),
    ("self_attention.dense.bias", ("attn.c_proj.bias",), "copy"),
    ("post_attention_layernorm.weight", ("ln_2.weight",), "copy"),
    ("post_attention_layernorm.bias", ("ln_2.bias",), "copy"),
    ("mlp.dense_h_to_4h.weight", ("mlp.c_fc.weight",), "conv1d"),
    ("mlp.dense_h_to_4h.bias", ("mlp.c_fc.bias",), "copy"),
    ("mlp.dense_4h_to_h.weight", ("mlp.c_proj.weight",), "conv1d"),
    ("mlp.dense_4h_to_h.bias", ("mlp.c_proj.bias",), "copy"),
)


@dataclass(frozen=True)
class _Arch:
    """One HF class: its key prefixes and tables."""

    name: str
    hf_class: str
    prefix: str  # of every key but lm_head's
    layer_prefix: str  # after prefix, before the layer number
    layer_rules: tuple
    global_rules: tuple  # (canonical path, HF key after prefix)
    tie_default: bool
    ignored: re.Pattern  # buffers some versions save

    def layer_key(self, i: int, rest: str) -> str:
        return f"{self.prefix}{self.layer_prefix}{i}.{rest}"


LLAMA = _Arch(
    "llama",
    "LlamaForCausalLM",
    "model.",
    "layers.",
    _LLAMA_LAYER,
    ((WORD, "embed_tokens.weight"), (_stack("final_layernorm.weight"), "norm.weight")),
    False,
    re.compile(r"\.rotary_emb\.inv_freq$"),
)
GPT2 = _Arch(
    "gpt2",
    "GPT2LMHeadModel",
    "transformer.",
    "h.",
    _GPT2_LAYER,
    (
        (WORD, "wte.weight"),
        (POSITION, "wpe.weight"),
        (_stack("final_layernorm.weight"), "ln_f.weight"),
        (_stack("final_layernorm.bias"), "ln_f.bias"),
    ),
    True,
    re.compile(r"\.attn\.(masked_)?bias$"),
)
ARCHS = {"llama": LLAMA, "gpt2": GPT2}
_CLASS_NAMES = {
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
}


def _expected_keys(
    arch: _Arch, num_layers: int, tied: bool
) -> List[Tuple[Path, Tuple[str, ...], str]]:
    """(canonical path, full HF keys, kind) of every tensor of the model, in HF order:
    embeddings, layers, final norm, untied head."""
    embeddings = [(p, (arch.prefix + k,), "copy") for p, k in arch.global_rules
                  if p in (WORD, POSITION)]  # fmt: skip
    final = [(p, (arch.prefix + k,), "copy") for p, k in arch.global_rules
             if p not in (WORD, POSITION)]  # fmt: skip
    layers = [
        (_stack(f"layers.{i}.{key}"), tuple(arch.layer_key(i, k) for k in hf_keys), kind)
        for i in range(num_layers)
        for key, hf_keys, kind in arch.layer_rules
    ]
    head = [] if tied else [(OUTPUT, ("lm_head.weight",), "copy")]
    return embeddings + layers + final + head


# ----------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------


@dataclass
class TokenizerInfo:
    """A Megatron tokenizer by its flags (arguments.py dests)."""

    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    _built: Any = field(default=None, repr=False, compare=False)

    def megatron_args(self) -> Dict[str, Any]:
        args = {"tokenizer_type": self.tokenizer_type}
        for name in ("vocab_file", "merge_file", "tokenizer_model"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        return args

    def build(self):
        """The Megatron tokenizer (built once, quietly)."""
        if self._built is None:
            from .tokenizer import build_tokenizer

            probe = argparse.Namespace(
                rank=1, make_vocab_size_divisible_by=1, tensor_model_parallel_size=1,
                vocab_extra_ids=0, **self.megatron_args(),
            )  # fmt: skip
            self._built = build_tokenizer(probe)
        return self._built

    @property
    def vocab_size(self) -> int:
        return self.build().vocab_size


_EXPORTABLE_TOKENIZERS = ("GPT2BPETokenizer", "HFTokenizer", "GPTSentencePieceTokenizer")


def find_tokenizer(folder: str, prefer: str = "auto") -> TokenizerInfo | None:
    """The tokenizer files in folder: tokenizer.json (HFTokenizer), else tokenizer.model
    (GPTSentencePieceTokenizer), else vocab.json + merges.txt (GPT2BPETokenizer); `prefer`
    (one of those type names) picks one when several are there. None when none is."""
    found = {}
    folder = os.path.abspath(folder)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        found["HFTokenizer"] = TokenizerInfo("HFTokenizer", tokenizer_model=path)
    path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(path):
        found["GPTSentencePieceTokenizer"] = TokenizerInfo(
            "GPTSentencePieceTokenizer", tokenizer_model=path
        )
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        found["GPT2BPETokenizer"] = TokenizerInfo(
            "GPT2BPETokenizer", vocab_file=vocab, merge_file=merges
        )
    if prefer != "auto":
        if prefer not in _EXPORTABLE_TOKENIZERS:
            raise HFInteropError(
                f"tokenizer {prefer!r}: choose auto or one of {', '.join(_EXPORTABLE_TOKENIZERS)}"
            )
        if prefer not in found:
            raise HFInteropError(f"{folder} holds no {prefer} files")
        return found[prefer]
    return next(iter(found.values()), None)


def tokenizer_info_from_args(args) -> TokenizerInfo | None:
    """The tokenizer that Megatron args (a Namespace or dict) name, or None."""
    get = args.get if isinstance(args, Mapping) else lambda k, d=None: getattr(args, k, d)
    if get("tokenizer_type") is None:
        return None
    return TokenizerInfo(
        get("tokenizer_type"), get("vocab_file"), get("merge_file"), get("tokenizer_model")
    )


# ----------------------------------------------------------------------------------------
# Reading a Hugging Face folder
# ----------------------------------------------------------------------------------------

_WEIGHT_FORMATS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_SHARD_RE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)$")


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise HFInteropError(f"{what} {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise HFInteropError(f"{what} {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFInteropError(f"{what} {path} does not hold a JSON object")
    return data


def _load_file(path: str) -> Dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise HFInteropError(f"could not read weights file {path} ({reason})") from None
    if not isinstance(state, dict):
        raise HFInteropError(f"weights file {path} does not hold a state dict")
    return state


def read_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    """{HF key: tensor} from model.safetensors, pytorch_model.bin, or the shards an
    .index.json names (safetensors first); every key of an index must be in its shard."""
    for single, index in _WEIGHT_FORMATS:
        index_path = os.path.join(hf_dir, index)
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path, "weights index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFInteropError(f"weights index {index_path} has no weight_map")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
            if missing:
                raise HFInteropError(
                    f"weights index {index_path} names shards that are missing: "
                    f"{', '.join(missing[:4])}"
                )
            state: Dict[str, torch.Tensor] = {}
            for name in files:
                state.update(_load_file(os.path.join(hf_dir, name)))
            absent = [k for k in weight_map if k not in state]
            if absent:
                raise HFInteropError(
                    f"{hf_dir}: {len(absent)} tensors of {index} are not in their shards "
                    f"(first: {absent[0]} in {weight_map[absent[0]]})"
                )
            return state
        if os.path.isfile(os.path.join(hf_dir, single)):
            return _load_file(os.path.join(hf_dir, single))
    raise HFInteropError(
        f"{hf_dir} holds no model weights (model.safetensors, pytorch_model.bin or their "
        ".index.json)"
    )


def _arch_of(config: dict, path: str) -> _Arch:
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    unknown = [n for n in names if n not in _CLASS_NAMES]
    if model_type not in ARCHS or unknown:
        what = ", ".join(unknown) if unknown else f"model_type {model_type!r}"
        raise HFInteropError(
            f"{path}: {what} is not supported; only GPT2LMHeadModel and LlamaForCausalLM "
            "(model_type gpt2 or llama) are converted"
        )
    return ARCHS[model_type]


def _rope_settings(config: dict) -> Tuple[float, dict]:
    """(theta, scaling) from config.json: transformers 4's rope_theta / rope_scaling or
    5's rope_parameters."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = dict(config.get("rope_scaling") or {})
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    return float(theta), scaling


def _llama_args(config: dict, path: str) -> Tuple[dict, _Dims]:
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hn = config.get("head_dim") or h // heads
    theta, scaling = _rope_settings(config)
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (the SwiGLU MLP is silu-gated)")
    for name in ("attention_bias", "mlp_bias"):
        if config.get(name):
            problems.append(f"{name} true (biases in Llama's linear layers are not mapped)")
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    partial = float(scaling.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r} (only plain RoPE is implemented)")
    if partial != 1.0:
        problems.append(f"partial rotary (partial_rotary_factor {partial})")
    if theta != int(theta):
        problems.append(
            f"rope_theta {theta} is not an integer (--rotary-position-embeddings-theta)"
        )
    if heads % kv != 0:
        problems.append(f"num_attention_heads {heads} not divisible by num_key_value_heads {kv}")
    if problems:
        raise HFInteropError(f"{path}: cannot convert this LlamaForCausalLM: {'; '.join(problems)}")
    mpe = config.get("max_position_embeddings", 2048)
    args = dict(
        num_layers=config["num_hidden_layers"], hidden_size=h,
        ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=kv, kv_channels=hn, max_position_embeddings=mpe, seq_length=mpe,
        swiglu=True, normalization="rmsnorm", layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        use_rotary_position_embeddings=True, rope_theta=int(theta), rotary_percent=1.0,
        add_position_embedding=False, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=float(config.get("attention_dropout", 0.0)),
    )  # fmt: skip
    return args, _Dims(h, heads, kv, hn)


_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _gpt2_args(config: dict, path: str) -> Tuple[dict, _Dims]:
    h, heads = config.get("n_embd", 768), config.get("n_head", 12)
    act = config.get("activation_function", "gelu_new")
    problems = []
    if act not in _TANH_GELU + ("gelu",):
        problems.append(f"activation_function {act!r} (gelu_new, gelu_pytorch_tanh or gelu)")
    if not config.get("scale_attn_weights", True):
        problems.append("scale_attn_weights false (attention is always scaled by 1/sqrt(hn))")
    if config.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx true")
    if config.get("add_cross_attention"):
        problems.append("add_cross_attention true (decoder-only models only)")
    if h % heads != 0:
        problems.append(f"n_embd {h} not divisible by n_head {heads}")
    if problems:
        raise HFInteropError(f"{path}: cannot convert this GPT2LMHeadModel: {'; '.join(problems)}")
    tanh = act in _TANH_GELU
    mpe = config.get("n_positions", 1024)
    args = dict(
        num_layers=config.get("n_layer", 12), hidden_size=h,
        ffn_hidden_size=config.get("n_inner") or 4 * h, num_attention_heads=heads,
        num_key_value_heads=heads, kv_channels=h // heads, max_position_embeddings=mpe,
        seq_length=mpe, swiglu=False, normalization="layernorm",
        layernorm_epsilon=config.get("layer_norm_epsilon", 1e-5),
        use_rotary_position_embeddings=False, add_position_embedding=True, add_bias_linear=True,
        # Megatron's fused bias-GeLU is the tanh approximation; the exact GeLU needs it off
        openai_gelu=tanh, bias_gelu_fusion=tanh,
        hidden_dropout=float(config.get("resid_pdrop", 0.1)),
        attention_dropout=float(config.get("attn_pdrop", 0.1)),
    )  # fmt: skip
    return args, _Dims(h, heads, heads, h // heads)


def _strip_prefix(state: Dict[str, torch.Tensor], arch: _Arch) -> Dict[str, torch.Tensor]:
    """Keys of a base-model save (GPT2Model, LlamaModel: no `transformer.` / `model.`)
    get the LM class's prefix."""
    if any(k.startswith(arch.prefix) for k in state):
        return state
    return {(k if k == "lm_head.weight" else arch.prefix + k): v for k, v in state.items()}


def _to_canonical(
    state: Dict[str, torch.Tensor], arch: _Arch, num_layers: int, tied: bool, d: _Dims, where: str
) -> FlatState:
    table = _expected_keys(arch, num_layers, tied)
    wanted = {k for _, keys, _ in table for k in keys}
    missing = sorted(wanted - set(state))
    if missing:
        raise HFInteropError(
            f"{where}: {len(missing)} tensors of the {arch.hf_class} config are missing from "
            f"the weights (first: {', '.join(missing[:3])})"
        )
    extra = sorted(
        k for k in state if k not in wanted and not arch.ignored.search(k)
        and not (tied and k == "lm_head.weight")
    )  # fmt: skip
    if extra:
        raise HFInteropError(
            f"{where}: {len(extra)} tensors are not part of a {arch.hf_class} with this "
            f"config (first: {', '.join(extra[:3])})"
        )
    canonical: FlatState = {}
    for path, keys, kind in table:
        try:
            tensor = _KINDS[kind][0]([state[k] for k in keys], d)
        except RuntimeError:
            shapes = ", ".join(f"{k} {list(state[k].shape)}" for k in keys)
            raise HFInteropError(
                f"{where}: {shapes} do not fit the config ({d.heads} heads, {d.kv_heads} "
                f"key/value heads of {d.head_dim}, hidden {d.hidden})"
            ) from None
        canonical[path] = tensor.contiguous()
    return canonical


def _check_shapes(canonical: FlatState, d: _Dims, args: dict, rows: int, where: str) -> None:
    qkv = (d.heads + 2 * d.kv_heads) * d.head_dim
    ffn = args["ffn_hidden_size"] * (2 if args["swiglu"] else 1)
    expect = {
        "self_attention.query_key_value.weight": (qkv, d.hidden),
        "self_attention.dense.weight": (d.hidden, d.heads * d.head_dim),
        "mlp.dense_h_to_4h.weight": (ffn, d.hidden),
        "mlp.dense_4h_to_h.weight": (d.hidden, args["ffn_hidden_size"]),
    }
    for path, tensor in canonical.items():
        if path in (WORD, OUTPUT):
            want = (rows, d.hidden)
        elif path == POSITION:
            want = (args["max_position_embeddings"], d.hidden)
        else:
            want = next((s for k, s in expect.items() if path[-1].endswith(k)), None)
        if want is not None and tuple(tensor.shape) != want:
            raise HFInteropError(
                f"{where}: {'.'.join(path)} has shape {list(tensor.shape)}, the config gives "
                f"{list(want)}"
            )


@dataclass
class HFImport:
    """A Hugging Face model read into this project's canonical form."""

    state: FlatState
    """Canonical TP = 1 model state; vocabulary padded to args['padded_vocab_size']."""
    args: Dict[str, Any]
    """Megatron model flags by arguments.py dest (plus padded_vocab_size)."""
    tokenizer: TokenizerInfo | None
    """The tokenizer found beside the model (None: give the tokenizer flags yourself)."""
    arch: str
    """'gpt2' or 'llama'."""
    true_vocab_size: int
    """Ids of the tokenizer (the config's vocab_size without one); rows past it are padding."""
    hf_config: Dict[str, Any]
    """config.json as read."""

    def namespace(self) -> argparse.Namespace:
        return argparse.Namespace(**self.args)

    def model_flags(self) -> List[str]:
        """The command-line flags that give this model (and its tokenizer)."""
        return megatron_flags(self.args)

    def checkpoint_args(self, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1) -> argparse.Namespace:
        """The validated Megatron args of this model at that layout (as a checkpoint of it
        records them, so that --use-checkpoint-args can read them back)."""
        from .arguments import build_parser, validate_args

        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        padded = padded_vocab_size(
            self.true_vocab_size, self.args["make_vocab_size_divisible_by"], tp
        )
        argv = self.model_flags() + [
            "--micro-batch-size", "1", "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp),
        ]  # fmt: skip
        args = validate_args(build_parser().parse_args(argv), world_size=tp * pp, rank=1)
        args.rank, args.padded_vocab_size = 0, padded
        return args

    def train_command(self, load_dir: str, **kwargs) -> List[str]:
        return train_command(self, load_dir, **kwargs)


def read_hf_model(
    hf_dir: str,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
    tokenizer: str = "auto",
    tokenizer_dir: str | None = None,
    dtype: torch.dtype | None = None,
    weights: Dict[str, torch.Tensor] | None = None,
) -> HFImport:
    """Read a GPT2LMHeadModel or LlamaForCausalLM folder into the canonical form.

    The vocabulary is padded with zero rows to padded_vocab_size(tokenizer ids,
    make_vocab_size_divisible_by, tensor_model_parallel_size), the size a Megatron run with
    that tokenizer builds. `tokenizer` picks among several tokenizer files (see
    find_tokenizer); `tokenizer_dir` looks for them elsewhere; `dtype` casts the weights
    (else they keep the file's dtype); `weights` are the model's tensors already read
    (else read_hf_weights reads them)."""
    config_path = os.path.join(hf_dir, "config.json")
    config = _read_json(config_path, "model config")
    arch = _arch_of(config, config_path)
    try:
        args, dims = (_llama_args if arch is LLAMA else _gpt2_args)(config, config_path)
    except KeyError as e:
        raise HFInteropError(f"{config_path} has no {e.args[0]}") from None
    tied = bool(config.get("tie_word_embeddings", arch.tie_default))
    args["untie_embeddings_and_output_weights"] = not tied
    args["init_method_std"] = float(config.get("initializer_range", 0.02))
    state = _strip_prefix(weights if weights is not None else read_hf_weights(hf_dir), arch)
    canonical = _to_canonical(state, arch, args["num_layers"], tied, dims, hf_dir)
    rows = canonical[WORD].size(0)
    _check_shapes(canonical, dims, args, rows, hf_dir)
    if config.get("vocab_size", rows) != rows:
        raise HFInteropError(
            f"{config_path}: vocab_size {config['vocab_size']} but the embeddings have {rows} rows"
        )
    info = find_tokenizer(tokenizer_dir or hf_dir, tokenizer)
    true_vocab = rows
    if info is not None:
        true_vocab = info.vocab_size
        if true_vocab > rows:
            raise HFInteropError(
                f"{hf_dir}: the {info.tokenizer_type} tokenizer has {true_vocab} ids but the "
                f"model embeds only {rows}"
            )
        args.update(info.megatron_args())
    d, tp = make_vocab_size_divisible_by, tensor_model_parallel_size
    padded = padded_vocab_size(true_vocab, d, tp)
    if rows > padded:
        raise HFInteropError(
            f"{hf_dir}: the model's {rows} vocabulary rows do not fit the padded vocabulary "
            f"of {padded} (tokenizer ids {true_vocab}, --make-vocab-size-divisible-by {d} x "
            f"TP {tp}); give a --make-vocab-size-divisible-by whose multiple reaches {rows}"
        )
    for path in (WORD, OUTPUT):
        if path in canonical:
            canonical[path] = repad_vocab(canonical[path], padded, true_vocab, ".".join(path))
    if dtype is not None:
        canonical = {k: v.to(dtype) for k, v in canonical.items()}
    args.update(make_vocab_size_divisible_by=d, padded_vocab_size=padded)
    return HFImport(canonical, args, info, arch.name, true_vocab, config)


# ----------------------------------------------------------------------------------------
# Megatron flags and the training command
# ----------------------------------------------------------------------------------------

# dest -> flag, for flags that take a value
_VALUE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_key_value_heads": "--num-key-value-heads",
    "kv_channels": "--kv-channels",
    "max_position_embeddings": "--max-position-embeddings",
    "seq_length": "--seq-length",
    "normalization": "--normalization",
    "layernorm_epsilon": "--layernorm-epsilon",
    "rope_theta": "--rotary-position-embeddings-theta",
    "rotary_percent": "--rotary-percent",
    "hidden_dropout": "--hidden-dropout",
    "attention_dropout": "--attention-dropout",
    "init_method_std": "--init-method-std",
    "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
    "tokenizer_type": "--tokenizer-type",
    "vocab_file": "--vocab-file",
    "merge_file": "--merge-file",
    "tokenizer_model": "--tokenizer-model",
    "vocab_size": "--vocab-size",
}
# dest -> (flag, the value the flag sets)
_SWITCHES = {
    "swiglu": ("--swiglu", True),
    "use_rotary_position_embeddings": ("--use-rotary-position-embeddings", True),
    "untie_embeddings_and_output_weights": ("--untie-embeddings-and-output-weights", True),
    "openai_gelu": ("--openai-gelu", True),
    "add_position_embedding": ("--no-position-embedding", False),
    "add_bias_linear": ("--disable-bias-linear", False),
    "bias_gelu_fusion": ("--no-bias-gelu-fusion", False),
}
_NOT_FLAGS = ("padded_vocab_size",)  # derived from the tokenizer by every run


def megatron_flags(args: Mapping[str, Any]) -> List[str]:
    """Megatron args by dest -> the command-line flags that set them."""
    flags: List[str] = []
    for dest, value in args.items():
        if dest in _NOT_FLAGS or value is None:
            continue
        if dest in _SWITCHES:
            flag, sets = _SWITCHES[dest]
            if bool(value) == sets:
                flags.append(flag)
        elif dest in _VALUE_FLAGS:
            flags += [_VALUE_FLAGS[dest], str(value)]
        else:
            raise HFInteropError(f"no command-line flag for the Megatron arg {dest!r}")
    return flags


def train_command(
    hf_import: HFImport,
    load_dir: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    extra_flags: Sequence[str] = (),
    python: str = "python",
    script: str = "pretrain_gpt.py",
) -> List[str]:
    """The pretrain_gpt.py command line that trains on from the Megatron checkpoint of
    `hf_import` in load_dir: the model and tokenizer flags, the layout, --load with
    --finetune (the weights only, from iteration 0). Data, batch and schedule flags go in
    extra_flags, which come last (a flag repeated there overrides the one before)."""
    return [
        python, script, *hf_import.model_flags(),
        "--tensor-model-parallel-size", str(tensor_model_parallel_size),
        "--pipeline-model-parallel-size", str(pipeline_model_parallel_size),
        "--load", load_dir, "--finetune", *extra_flags,
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------
# Writing a Hugging Face folder
# ----------------------------------------------------------------------------------------


def _config_of(args) -> Any:
    from .model.config import config_from_args

    ns = argparse.Namespace(**args) if isinstance(args, Mapping) else args
    return config_from_args(ns)


def _transformer_path(path: Path) -> Path:
    """Newer Megatron checkpoints call the stack `encoder`; this model calls it `transformer`."""
    if path[:2] == ("language_model", "encoder"):
        return ("language_model", "transformer") + path[2:]
    return path


def _is_llama_like(c) -> bool:
    return c.swiglu or c.normalization == "rmsnorm" or c.use_rotary_position_embeddings


_GPT_PARTS = {
    ("language_model", "embedding"),
    ("language_model", "transformer"),
    ("language_model", "output_layer"),
}


def _export_problems(c, arch: _Arch, canonical: FlatState) -> List[str]:
    """What a model of TransformerConfig c has that arch cannot express."""
    problems = []
    experts = max(c.num_experts or [1])
    if experts > 1 or any("deepspeed_moe" in p[-1] or ".experts." in p[-1] for p in canonical):
        problems.append(f"MoE layers (--num-experts {experts}) into the dense {arch.hf_class}")
    foreign = sorted({".".join(p[:2]) for p in canonical if p[:2] not in _GPT_PARTS})
    if foreign:
        problems.append(f"parts that are not a GPT model's ({', '.join(foreign[:3])})")
    if any(p[:3] == ("language_model", "embedding", "tokentype_embeddings") for p in canonical):
        problems.append("token-type embeddings")
    if c.apply_residual_connection_post_layernorm:
        problems.append("--apply-residual-connection-post-layernorm")
    if arch is LLAMA:
        if c.normalization != "rmsnorm":
            problems.append("LayerNorm (LlamaForCausalLM has RMSNorm; --normalization rmsnorm)")
        if not c.swiglu:
            problems.append("a GeLU MLP (LlamaForCausalLM's MLP is SwiGLU; --swiglu)")
        if not c.use_rotary_position_embeddings:
            problems.append("no rotary position embeddings (--use-rotary-position-embeddings)")
        elif c.rotary_percent != 1.0:
            problems.append(f"partial rotary (--rotary-percent {c.rotary_percent})")
        if c.add_position_embedding:
            problems.append("learned position embeddings")
        if c.add_bias_linear:
            problems.append("biases in the linear layers (LlamaForCausalLM has none; "
                            "--disable-bias-linear)")
    else:
        if c.normalization != "layernorm":
            problems.append("RMSNorm (GPT2LMHeadModel has LayerNorm)")
        if c.use_rotary_position_embeddings:
            problems.append("rotary position embeddings (GPT2LMHeadModel has learned ones)")
        elif not c.add_position_embedding:
            problems.append("no position embeddings (--no-position-embedding)")
        if c.swiglu:
            problems.append("a SwiGLU MLP (GPT2LMHeadModel's is GeLU)")
        if c.num_key_value_heads != c.num_attention_heads:
            problems.append(f"grouped-query attention (--num-key-value-heads "
                            f"{c.num_key_value_heads} of {c.num_attention_heads} heads)")
        if c.kv_channels * c.num_attention_heads != c.hidden_size:
            problems.append(f"--kv-channels {c.kv_channels} x {c.num_attention_heads} heads "
                            f"!= --hidden-size {c.hidden_size}")
        if not c.add_bias_linear:
            problems.append("no linear biases (--disable-bias-linear; GPT-2's linears have them)")
    return problems


def _tanh_gelu(c) -> bool:
    """Whether the MLP's GeLU is the tanh approximation (fused bias-GeLU or --openai-gelu)."""
    return c.openai_gelu or (c.bias_gelu_fusion and c.add_bias_linear and not c.swiglu)


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _hf_config(c, arch: _Arch, vocab: int, dtype: torch.dtype, special: dict) -> dict:
    common = dict(
        architectures=[arch.hf_class], model_type=arch.name, vocab_size=vocab,
        initializer_range=c.init_method_std, tie_word_embeddings=not
        c.untie_embeddings_and_output_weights, torch_dtype=_DTYPE_NAMES.get(dtype, "float32"),
        dtype=_DTYPE_NAMES.get(dtype, "float32"),  # transformers >= 4.56 spells it so
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"), use_cache=True,
    )  # fmt: skip
    if arch is LLAMA:
        theta = float(c.rope_theta)
        return dict(
            common, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
            num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.kv_channels,
            hidden_act="silu", max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.layernorm_epsilon, rope_theta=theta, rope_scaling=None,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            attention_bias=False, mlp_bias=False, attention_dropout=c.attention_dropout,
            pretraining_tp=1,
        )  # fmt: skip
    return dict(
        common, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_attention_heads,
        n_inner=c.ffn_hidden_size, n_positions=c.max_position_embeddings,
        activation_function="gelu_new" if _tanh_gelu(c) else "gelu",
        layer_norm_epsilon=c.layernorm_epsilon, resid_pdrop=c.hidden_dropout,
        embd_pdrop=c.hidden_dropout, attn_pdrop=c.attention_dropout, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
    )  # fmt: skip


def _parse_size(size: int | str) -> int:
    """Bytes of 10GB, 500MB, 64KiB, ... (decimal units, binary with an i) or an int."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise HFInteropError(f"max_shard_size {size!r}: expected bytes or e.g. 5GB, 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_"))


def _plan_shards(tensors: List[Tuple[str, torch.Tensor]], limit: int) -> List[dict]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _existing_model_files(save_dir: str) -> List[str]:
    if not os.path.isdir(save_dir):
        return []
    names = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return sorted(n for n in os.listdir(save_dir) if n in names or _SHARD_RE.match(n))


class _Writer:
    """Files written under NAME.tmp.PID and renamed; on failure the renamed ones go too."""

    def __init__(self, save_dir: str) -> None:
        self.save_dir = save_dir
        self.done: List[str] = []

    def write(self, name: str, write: Callable[[str], None]) -> None:
        path = os.path.join(self.save_dir, name)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.done.append(name)

    def json(self, name: str, data: dict) -> None:
        def dump(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")

        self.write(name, dump)

    def copy(self, name: str, source: str) -> None:
        self.write(name, lambda tmp: shutil.copyfile(source, tmp))

    def undo(self) -> None:
        for name in self.done:
            path = os.path.join(self.save_dir, name)
            if os.path.exists(path):
                os.remove(path)


def _maybe_id(get: Callable[[], int]) -> int | None:
    """A special token id, None where the tokenizer has none (-1, None or not provided)."""
    try:
        value = get()
    except NotImplementedError:
        return None
    return value if value is not None and value >= 0 else None


def _special_ids(info: TokenizerInfo | None) -> Dict[str, int | None]:
    """{'bos', 'eos', 'pad'} ids of the tokenizer (None where it has none)."""
    if info is None:
        return {}
    tok = info.build()
    if info.tokenizer_type == "GPT2BPETokenizer":
        return {"bos": tok.eod, "eos": tok.eod, "pad": None}
    return {
        "bos": _maybe_id(lambda: tok.bos),
        "eos": _maybe_id(lambda: tok.eod),
        "pad": _maybe_id(lambda: tok.pad),
    }


def _tokenizer_source(info: TokenizerInfo) -> str:
    """The tokenizer.json or tokenizer.model file that info names."""
    path = info.tokenizer_model
    if path is not None and os.path.isdir(path) and info.tokenizer_type == "HFTokenizer":
        path = os.path.join(path, "tokenizer.json")
    if path is None or not os.path.isfile(path):
        raise HFInteropError(f"--tokenizer-model {path} of {info.tokenizer_type} not found")
    return path


def _tokenizer_files(info: TokenizerInfo, max_length: int) -> Tuple[Dict[str, str], dict | None]:
    """({file name in the HF folder: source path}, the tokenizer_config.json to write, or
    None when the one beside the source file is copied)."""
    kind = info.tokenizer_type
    if kind == "GPT2BPETokenizer":
        eod = "<|endoftext|>"
        files = {"vocab.json": info.vocab_file, "merges.txt": info.merge_file}
        return files, dict(tokenizer_class="GPT2Tokenizer", bos_token=eod, eos_token=eod,
                           unk_token=eod, add_prefix_space=False, model_max_length=max_length)
    source = _tokenizer_source(info)
    name = "tokenizer.json" if kind == "HFTokenizer" else "tokenizer.model"
    files = {name: source}
    beside = os.path.dirname(os.path.abspath(source))
    if os.path.isfile(os.path.join(beside, "tokenizer_config.json")):
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(beside, extra)):
                files[extra] = os.path.join(beside, extra)
        return files, None
    tok = info.build()
    text = {k: (tok.inv_vocab.get(v) if v is not None else None)
            for k, v in _special_ids(info).items()}  # fmt: skip
    config = dict(model_max_length=max_length, bos_token=text["bos"], eos_token=text["eos"],
                  pad_token=text["pad"])  # fmt: skip
    if kind == "HFTokenizer":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        # as GPTSentencePieceTokenizer (and so preprocess_data.py) encodes: no bos/eos added
        unk = _maybe_id(tok.tokenizer.unk_id)
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False,
                      unk_token=tok.inv_vocab.get(unk) if unk is not None else None)
    return files, config


def write_hf_model(
    canonical: FlatState,
    args,
    save_dir: str,
    tokenizer_info: TokenizerInfo | bool | None = None,
    max_shard_size: int | str = "5GB",
    model_class: str | None = None,
    true_vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Dict[str, Any]:
    """Write the canonical state of a Megatron GPT model with Megatron args (a Namespace or
    a dict by dest) as a Hugging Face folder: config.json, model.safetensors (or shards of
    at most max_shard_size with model.safetensors.index.json) and the tokenizer files of
    tokenizer_info (None: the tokenizer the args name, if any; False: none).

    model_class 'gpt2' / 'llama' (or the class names); by default LlamaForCausalLM for a
    model with SwiGLU, RMSNorm or RoPE, else GPT2LMHeadModel. The vocabulary rows past the
    tokenizer's ids (or true_vocab_size) are cut off; with neither, every row is kept.
    save_dir must not hold a model already. Returns a summary."""
    c = _config_of(args)
    canonical = {_transformer_path(p): t for p, t in canonical.items()}
    name = _CLASS_NAMES.get(model_class, model_class) if model_class else None
    if name is None:
        name = "llama" if _is_llama_like(c) else "gpt2"
    if name not in ARCHS:
        raise HFInteropError(f"model_class {model_class!r}: choose gpt2 or llama")
    arch = ARCHS[name]
    problems = _export_problems(c, arch, canonical)
    if problems:
        raise HFInteropError(f"cannot write a {arch.hf_class}: {'; '.join(problems)}")
    if tokenizer_info is None:
        tokenizer_info = tokenizer_info_from_args(args)
    elif tokenizer_info is False:
        tokenizer_info = None
    if tokenizer_info is not None and tokenizer_info.tokenizer_type not in _EXPORTABLE_TOKENIZERS:
        raise HFInteropError(
            f"--tokenizer-type {tokenizer_info.tokenizer_type} has no Hugging Face form here; "
            f"use one of {', '.join(_EXPORTABLE_TOKENIZERS)} or write no tokenizer "
            "(tokenizer_info=False)"
        )
    tied = not c.untie_embeddings_and_output_weights
    table = _expected_keys(arch, c.num_layers, tied)
    wanted = {path for path, _, _ in table}
    if set(canonical) != wanted:
        diff = sorted(".".join(p) for p in set(canonical) ^ wanted)
        raise HFInteropError(
            f"cannot write a {arch.hf_class}: the state does not match its args "
            f"({len(diff)} keys differ, first: {', '.join(diff[:3])})"
        )
    rows = canonical[WORD].size(0)
    vocab = true_vocab_size or (tokenizer_info.vocab_size if tokenizer_info else rows)
    if vocab > rows:
        raise HFInteropError(f"the tokenizer has {vocab} ids but the model embeds only {rows}")
    existing = _existing_model_files(save_dir)
    if existing:
        raise HFInteropError(f"{save_dir} already holds a model ({', '.join(existing[:3])}); "
                             "choose an empty folder")
    tok_files, tok_config = ({}, None)
    if tokenizer_info is not None:
        tok_files, tok_config = _tokenizer_files(tokenizer_info, c.max_position_embeddings)
    dims = _Dims(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.kv_channels)
    dtype = dtype or canonical[WORD].dtype
    tensors: List[Tuple[str, torch.Tensor]] = []
    for path, keys, kind in table:
        t = canonical[path][:vocab] if path in (WORD, OUTPUT) else canonical[path]
        for key, out in zip(keys, _KINDS[kind][1](t, dims)):
            tensors.append((key, out.to(dtype).contiguous().clone()))
    config = _hf_config(c, arch, vocab, dtype, _special_ids(tokenizer_info))
    os.makedirs(save_dir, exist_ok=True)
    writer = _Writer(save_dir)
    try:
        shards = _write_weights(writer, tensors, _parse_size(max_shard_size))
        for file_name, source in tok_files.items():
            writer.copy(file_name, source)
        if tok_config is not None:
            writer.json("tokenizer_config.json", tok_config)
        writer.json("config.json", config)  # last: the folder is a model once it is there
    except BaseException:
        writer.undo()
        raise
    return {"model_class": arch.hf_class, "vocab_size": vocab, "shards": shards,
            "files": list(writer.done)}


def _write_weights(writer: _Writer, tensors: List[Tuple[str, torch.Tensor]], limit: int) -> int:
    from safetensors.torch import save_file

    shards = _plan_shards(tensors, limit)
    if len(shards) == 1:
        writer.write("model.safetensors", lambda tmp: save_file(shards[0], tmp, {"format": "pt"}))
        return 1
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        writer.write(file_name, lambda tmp, s=shard: save_file(s, tmp, {"format": "pt"}))
        for key, tensor in shard.items():
            weight_map[key] = file_name
            total += tensor.numel() * tensor.element_size()
    writer.json("model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return len(shards)


__all__ = [
    "HFInteropError",
    "HFImport",
    "TokenizerInfo",
    "ARCHS",
    "find_tokenizer",
    "tokenizer_info_from_args",
    "read_hf_weights",
    "read_hf_model",
    "megatron_flags",
    "train_command",
    "write_hf_model",
]
