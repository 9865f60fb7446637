"""Small helpers of the model stack: initialisers, the attention mask function, GeLUs."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Callable, Iterator

import torch

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def jit_script(fn: Callable) -> Callable:
    """`torch.jit.script(fn)` (kernel fusion on GPU), or `fn` itself where scripting is
    unavailable; torch's deprecation notice for TorchScript is not repeated per op."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(fn)
    except Exception:  # noqa: BLE001 - any scripting failure leaves the eager function
        return fn


def _compiled_on_cuda(fn: Callable, fallback: Callable, fallback_name: str,
                      **compile_kwargs) -> Callable:
    """`fn` compiled by torch.compile on CUDA tensors, `fallback` on other tensors, after a
    compile failure (one log line naming `fallback_name`) or with MEGATRON_TORCH_COMPILE=0."""
    state: dict = {"compiled": None, "failed": os.environ.get("MEGATRON_TORCH_COMPILE") == "0"}

    def call(*args):
        on_cuda = any(torch.is_tensor(a) and a.is_cuda for a in args)
        if not on_cuda or state["failed"]:
            return fallback(*args)
        try:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, **compile_kwargs)
            return state["compiled"](*args)
        except Exception as exc:  # noqa: BLE001 - any compile problem keeps the fallback
            state["failed"] = True
            print(f"> torch.compile of {fn.__name__} failed ({type(exc).__name__}: {exc}); "
                  f"{fallback_name}", flush=True)
            return fallback(*args)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def fuse_pointwise(fn: Callable) -> Callable:
    """A pointwise function fused for the device it runs on: torch.compile (one Triton
    kernel) on CUDA tensors, TorchScript elsewhere. A compile failure falls back to the
    TorchScript version with one log line; MEGATRON_TORCH_COMPILE=0 turns compiling off.
    `fn` must be free of randomness (compiled RNG would not follow Megatron's trackers)."""
    return _compiled_on_cuda(fn, jit_script(fn), "using the TorchScript fusion", dynamic=False)


def compile_for_cuda(fn: Callable) -> Callable:
    """`fn` on CPU tensors; on CUDA tensors `fn` compiled by torch.compile (its pointwise
    ops fused into one kernel forward and one backward; autograd goes through it). A
    compile failure, or MEGATRON_TORCH_COMPILE=0, keeps `fn` with one log line. Unlike
    fuse_pointwise the CPU path is `fn` itself, so CPU results do not change at all.
    `fn` must be free of randomness."""
    return _compiled_on_cuda(fn, fn, "running it eagerly")


def init_full_parameter(param: torch.Tensor, init_method: InitMethod) -> None:
    """Run `init_method` on a parameter created before it (e.g. a torch.nn.Embedding).

    Under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`) the parameter is already partitioned
    when the constructor returns, so it is gathered, initialised on rank 0 and
    re-partitioned; otherwise it is initialised in place. A meta parameter (a model built
    under `with torch.device("meta")`) has no values and is left as it is."""
    if param.is_meta:
        return
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
            init_method(param)
        return
    init_method(param)


def init_method_normal(sigma: float) -> InitMethod:
    """Initialiser drawing from N(0, sigma^2)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(sigma: float, num_layers: int) -> InitMethod:
    """Initialiser drawing from N(0, (sigma / sqrt(2 * num_layers))^2), for the output
    projections that add into the residual stream (two per layer)."""
    std = sigma / math.sqrt(2.0 * num_layers)

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def xavier_uniform_init(tensor: torch.Tensor) -> torch.Tensor:
    """torch's xavier_uniform_: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) of the full
    (unsplit) weight, which the parallel layers initialise before taking their slice."""
    return torch.nn.init.xavier_uniform_(tensor)


def init_methods(config) -> tuple[InitMethod, InitMethod]:
    """(init_method, output-projection init_method) of a model built from `config`.

    N(0, std^2) and N(0, std^2 / (2 L)) by default; with `init_method_xavier_uniform`
    (--init-method-xavier-uniform) Xavier uniform for both, as Megatron-DeepSpeed does."""
    if getattr(config, "init_method_xavier_uniform", False):
        return xavier_uniform_init, xavier_uniform_init
    return (init_method_normal(config.init_method_std),
            scaled_init_method_normal(config.init_method_std, config.num_layers))


def attention_mask_func(attention_scores: torch.Tensor, attention_mask: torch.Tensor):
    """Set the scores where `attention_mask` is True (masked out) to -10000, in place."""
    attention_scores.masked_fill_(attention_mask, -10000.0)
    return attention_scores


def get_linear_layer(rows: int, columns: int, init_method: InitMethod) -> torch.nn.Linear:
    """A plain (not parallel) `rows -> columns` linear layer, weight by `init_method`,
    bias zero."""
    layer = torch.nn.Linear(rows, columns)
    if layer.weight.is_meta:
        return layer
    init_method(layer.weight)
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def _gelu_impl(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


gelu_impl = jit_script(_gelu_impl)


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GeLU used by OpenAI's GPT-2 (--openai-gelu)."""
    return gelu_impl(x)


def _erf_gelu(x: torch.Tensor) -> torch.Tensor:
    # exact GeLU written with erf only, for ONNX export: x * Phi(x)
    return x * 0.5 * (torch.erf(x / 1.41421) + 1.0)


erf_gelu = jit_script(_erf_gelu)


# Initialisation seeds. Each transformer layer, the embedding and the pooler draw their
# initial weights from a generator seeded from (base seed, component), not from the
# running default generator, so that a component's initial weights do not depend on the
# pipeline stage that builds it or on what was built before it: a model split over PP
# stages starts from exactly the weights of the unsplit model (Megatron itself does not
# give this). Tensor-parallel layers build the full weight from that generator and keep
# their slice, so TP shards are slices of the TP=1 weights as well.
INIT_SALT_EMBEDDING = 0
INIT_SALT_POOLER = 1
INIT_SALT_HEAD = 2
INIT_SALT_OUTPUT_LAYER = 3
_INIT_SALT_ENCODER_LAYER = 1_000
_INIT_SALT_DECODER_LAYER = 1_000_000


def layer_init_salt(layer_number: int, decoder: bool = False) -> int:
    """The seed salt of the layer with global (1-based) number `layer_number`."""
    base = _INIT_SALT_DECODER_LAYER if decoder else _INIT_SALT_ENCODER_LAYER
    return base + layer_number


def derived_seed(seed: int, salt: int) -> int:
    """A 63-bit seed for component `salt` of a model seeded with `seed`."""
    return (seed * 1_000_003 + salt * 7_919 + 104_729) % (2**63 - 1)


@contextlib.contextmanager
def init_rng(seed: int, salt: int) -> Iterator[None]:
    """Inside the block the CPU generator and this rank's accelerator generator are
    seeded with derived_seed(seed, salt); both are restored on exit."""
    from megatron.accelerator import device_name, get_accelerator

    device_type = device_name()
    devices = [] if device_type == "cpu" else [get_accelerator().current_device()]
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        value = derived_seed(seed, salt)
        torch.default_generator.manual_seed(value)
        if devices:
            get_accelerator().manual_seed(value)
        yield


def count_parameters_on_meta(
    args_or_config: Any,
    model: str = "gpt",
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    pipeline_model_parallel_rank: int = 0,
) -> int:
    """Parameters of a model built on the meta device: shapes only, no memory, no process
    groups (a 175B GPT counts in seconds within a few MB of host memory).

    `args_or_config` is a TransformerConfig or parsed arguments (turned into one with
    config_from_args; `padded_vocab_size` must be set). `model` is 'gpt', 'bert' or 't5'.
    With the default sizes the count is the whole model's; otherwise it is what one
    tensor-parallel rank of pipeline stage `pipeline_model_parallel_rank` holds (the
    first stage has the word embeddings, the last its copy of them for the tied head).
    Any model-parallel state of the caller is left as it was.

        from megatron.model.utils import count_parameters_on_meta
        count_parameters_on_meta(config)                     # whole model
        count_parameters_on_meta(config, tensor_model_parallel_size=8,
                                 pipeline_model_parallel_size=16)   # one GPU's share
    """
    from megatron import mpu

    from .config import TransformerConfig, config_from_args

    if isinstance(args_or_config, TransformerConfig):
        config = args_or_config
    else:
        config = config_from_args(args_or_config)
    if config.padded_vocab_size <= 0:
        raise ValueError(
            "count_parameters_on_meta: padded_vocab_size is not set (got "
            f"{config.padded_vocab_size}); pad the vocabulary first"
        )
    if not 0 <= pipeline_model_parallel_rank < pipeline_model_parallel_size:
        raise ValueError(
            f"count_parameters_on_meta: pipeline_model_parallel_rank "
            f"{pipeline_model_parallel_rank} is not in [0, {pipeline_model_parallel_size})"
        )
    builders = _meta_model_builders()
    if model not in builders:
        raise ValueError(
            f"count_parameters_on_meta: model must be one of {sorted(builders)}, got {model!r}"
        )
    layout = mpu.model_parallel_overrides(
        tensor_model_parallel_size, 0, pipeline_model_parallel_size, pipeline_model_parallel_rank
    )
    with layout, torch.device("meta"):
        built = builders[model](
            config,
            pre_process=pipeline_model_parallel_rank == 0,
            post_process=pipeline_model_parallel_rank == pipeline_model_parallel_size - 1,
        )
    return sum(p.numel() for p in built.parameters())


def _meta_model_builders() -> dict:
    from .bert_model import BertModel
    from .gpt_model import GPTModel
    from .t5_model import T5Model

    return {"gpt": GPTModel, "bert": BertModel, "t5": T5Model}
